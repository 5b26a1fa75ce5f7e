"""The gRPC API of audit: medledger.audit.v1.AuditService.

Its RPCs are built by the audit issue; until then they answer UNIMPLEMENTED, which is what the
generated base servicer does.
"""

from __future__ import annotations

from medledger.audit.v1 import audit_service_pb2_grpc as pb_grpc

from medledger_common.auth import Access
from medledger_common.service import ServiceRuntime

_SERVICE = "/medledger.audit.v1.AuditService/"
# Transparency data (checkpoints, proofs) is public: anyone may verify the log.
PUBLIC_METHODS: tuple[str, ...] = tuple(
    _SERVICE + name
    for name in (
        "GetLatestCheckpoint",
        "GetCheckpoint",
        "GetVerifierKeys",
        "GetInclusionProof",
        "GetConsistencyProof",
        "GetTlogProof",
    )
)
# The coarse table; keep it equal to services/audit/README.md (a test compares them).
ACCESS: dict[str, Access] = {
    # Whoever holds a receipt's commitment finds its entry.
    _SERVICE + "FindCommitment": Access(),
    _SERVICE + "ListEntries": Access.of(kinds=["patient"], roles=["auditor"]),
    _SERVICE + "ExportAuditEvents": Access.of(kinds=["patient"], roles=["auditor"]),
}


class AuditApi(pb_grpc.AuditServiceServicer):
    def __init__(self, runtime: ServiceRuntime) -> None:
        self.rt = runtime
