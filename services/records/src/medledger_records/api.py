"""The gRPC API of records: medledger.records.v1.RecordsService.

Its RPCs are built by the records issue; until then they answer UNIMPLEMENTED, which is what the
generated base servicer does.
"""

from __future__ import annotations

from medledger.records.v1 import records_service_pb2_grpc as pb_grpc

from medledger_common.service import ServiceRuntime


class RecordsApi(pb_grpc.RecordsServiceServicer):
    def __init__(self, runtime: ServiceRuntime) -> None:
        self.rt = runtime
