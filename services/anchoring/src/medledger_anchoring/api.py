"""The gRPC API of anchoring: medledger.anchoring.v1.AnchoringService.

Each RPC parses its request into a command of ``witness.py``, calls the use case and maps the
result to its response; the use cases hold the rules. The audit log's proofs come through
:class:`AuditProofs`, audit's gRPC API as the use cases' :class:`witness.EntryProofs` port.
"""

from __future__ import annotations

import grpc
from medledger.anchoring.v1 import anchoring_service_pb2 as pb
from medledger.anchoring.v1 import anchoring_service_pb2_grpc as pb_grpc
from medledger.audit.v1 import audit_service_pb2 as audit_pb
from medledger.audit.v1 import audit_service_pb2_grpc as audit_grpc

from medledger_anchoring import storage
from medledger_anchoring.witness import GetAnchoredProof, ListAnchoredCheckpoints, VerifyProof, Witness
from medledger_runtime.auth import Access, ScopeNeed
from medledger_runtime.errors import InvalidArgument, NotFound, Unavailable
from medledger_runtime.timestamps import timestamp

_SERVICE = "/medledger.anchoring.v1.AnchoringService/"
# Anyone may look up and verify anchors: that is what a witness is for.
PUBLIC_METHODS: tuple[str, ...] = tuple(
    _SERVICE + name for name in ("ListAnchoredCheckpoints", "GetLatestAnchor", "VerifyProof")
)
# The coarse table; keep it equal to services/anchoring/README.md (a test compares them).
ACCESS: dict[str, Access] = {
    # Whoever holds a receipt's commitment (or an entry's index) gets its proof.
    _SERVICE + "GetAnchoredProof": Access(),
}
# SMART scopes grant FHIR interactions, and proofs are no FHIR resource: a scoped token is refused
# every RPC that needs a token (medledger_runtime.auth.scopes), while anyone, token or not, still
# verifies through the public RPCs. Keep it equal to the README.
SCOPES: dict[str, ScopeNeed] = {}


def anchored_checkpoint(row: storage.AnchorRow) -> pb.AnchoredCheckpoint:
    return pb.AnchoredCheckpoint(
        origin=row.origin,
        tree_size=row.tree_size,
        root=row.root,
        chain_id=row.chain_id,
        contract_address=row.contract_address,
        transaction_hash=row.transaction_hash,
        block_number=row.block_number,
        block_time=timestamp(row.block_time),
    )


def _audit_error(exc: grpc.aio.AioRpcError, what: str) -> Exception:
    if exc.code() == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what}: {exc.details()}")
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(f"{what}: {exc.details()}")
    return Unavailable(f"the audit log did not answer ({exc.code().name}); retry later")


class AuditProofs:
    """The proofs' port over audit's gRPC API (FindCommitment as anchoring itself, GetTlogProof)."""

    def __init__(self, stub: audit_grpc.AuditServiceStub, *, timeout: float = 10) -> None:
        self.stub, self.timeout = stub, timeout

    async def find_commitment(self, commitment: str) -> tuple[int, bytes]:
        try:
            found: audit_pb.FindCommitmentResponse = await self.stub.FindCommitment(
                audit_pb.FindCommitmentRequest(commitment=commitment), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _audit_error(exc, "no log entry holds this commitment") from None
        return found.entry.index, found.entry.entry

    async def tlog_proof(self, index: int, tree_size: int) -> str:
        try:
            proof: audit_pb.GetTlogProofResponse = await self.stub.GetTlogProof(
                audit_pb.GetTlogProofRequest(index=index, tree_size=tree_size), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _audit_error(exc, "the audit log has no proof of this entry") from None
        return proof.tlog_proof


class AnchoringApi(pb_grpc.AnchoringServiceServicer):
    def __init__(self, witness: Witness) -> None:
        self.witness = witness

    async def ListAnchoredCheckpoints(
        self, request: pb.ListAnchoredCheckpointsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAnchoredCheckpointsResponse:
        command = ListAnchoredCheckpoints(page_size=request.page_size, page_token=request.page_token)
        page = await self.witness.anchored_checkpoints(command)
        return pb.ListAnchoredCheckpointsResponse(
            checkpoints=[anchored_checkpoint(r) for r in page.anchors], next_page_token=page.next_page_token
        )

    async def GetLatestAnchor(
        self, request: pb.GetLatestAnchorRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetLatestAnchorResponse:
        latest = await self.witness.latest()
        return pb.GetLatestAnchorResponse(
            anchor=anchored_checkpoint(latest.anchor), latest_signed_tree_size=latest.latest_signed_tree_size
        )

    async def GetAnchoredProof(
        self, request: pb.GetAnchoredProofRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAnchoredProofResponse:
        target = request.WhichOneof("target")
        command = GetAnchoredProof(
            commitment=request.commitment if target == "commitment" else None,
            entry_index=request.entry_index if target == "entry_index" else None,
        )
        proof = await self.witness.anchored_proof(command)
        return pb.GetAnchoredProofResponse(
            tlog_proof=proof.tlog_proof,
            entry=proof.entry,
            anchor=anchored_checkpoint(proof.anchor),
            anchor_json=proof.anchor_json,
            entry_index=proof.entry_index,
        )

    async def VerifyProof(
        self, request: pb.VerifyProofRequest, context: grpc.aio.ServicerContext
    ) -> pb.VerifyProofResponse:
        command = VerifyProof(
            tlog_proof=request.tlog_proof,
            entry=request.entry,
            anchor_json=request.anchor_json,
            record=request.record,
            salt=request.salt,
            media_type=request.media_type,
        )
        result = await self.witness.verify(command)
        reply = pb.VerifyProofResponse(
            verified=result.verified,
            checks=[pb.VerificationCheck(name=c.name, passed=bool(c.passed), detail=c.detail) for c in result.checks],
            verdict=result.verdict(),
        )
        if result.verified and result.anchored_at is not None:
            reply.existed_no_later_than.CopyFrom(timestamp(result.anchored_at.timestamp()))
        return reply
