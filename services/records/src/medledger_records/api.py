"""The gRPC API of records: medledger.records.v1.RecordsService.

Its RPCs are built by the records issue; until then they answer UNIMPLEMENTED, which is what the
generated base servicer does.
"""

from __future__ import annotations

from medledger.records.v1 import records_service_pb2_grpc as pb_grpc

from medledger_common.auth import Access
from medledger_common.service import ServiceRuntime

_SERVICE = "/medledger.records.v1.RecordsService/"
PUBLIC_METHODS: tuple[str, ...] = ()
# The coarse table; keep it equal to services/records/README.md (a test compares them). The
# records issue adds the finer rules (consent decisions, a patient's own records).
ACCESS: dict[str, Access] = {
    _SERVICE + "PutRecord": Access.of(kinds=["practitioner"]),
    _SERVICE + "GetRecord": Access.of(kinds=["practitioner", "patient", "researcher"]),
}


class RecordsApi(pb_grpc.RecordsServiceServicer):
    def __init__(self, runtime: ServiceRuntime) -> None:
        self.rt = runtime
