"""The gRPC API of consent: medledger.consent.v1.ConsentService.

The decision point is built by the consent issue; until then its RPCs answer UNIMPLEMENTED,
which is what the generated base servicer does.
"""

from __future__ import annotations

from medledger.consent.v1 import consent_service_pb2_grpc as pb_grpc

from medledger_common.auth import Access
from medledger_common.service import ServiceRuntime

_SERVICE = "/medledger.consent.v1.ConsentService/"
PUBLIC_METHODS: tuple[str, ...] = ()
# The coarse table; keep it equal to services/consent/README.md (a test compares them).
ACCESS: dict[str, Access] = {
    _SERVICE + "CheckConsent": Access.of(roles=["pdp-client"]),
}


class ConsentApi(pb_grpc.ConsentServiceServicer):
    def __init__(self, runtime: ServiceRuntime) -> None:
        self.rt = runtime
