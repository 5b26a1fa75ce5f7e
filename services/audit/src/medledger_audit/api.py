"""The gRPC API of audit: medledger.audit.v1.AuditService.

Its RPCs are built by the audit issue; until then they answer UNIMPLEMENTED, which is what the
generated base servicer does.
"""

from __future__ import annotations

from medledger.audit.v1 import audit_service_pb2_grpc as pb_grpc

from medledger_common.service import ServiceRuntime


class AuditApi(pb_grpc.AuditServiceServicer):
    def __init__(self, runtime: ServiceRuntime) -> None:
        self.rt = runtime
