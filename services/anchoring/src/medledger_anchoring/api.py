"""The gRPC API of anchoring: medledger.anchoring.v1.AnchoringService.

Anchors and proofs are transparency data: hashes, sizes and chain coordinates. An entry's bytes
are handed out only for a commitment lookup, as the audit log's FindCommitment does (whoever
holds a receipt's commitment finds its entry); by index, read the entry in audit, which decides
who may.
"""

from __future__ import annotations

import re

import grpc
from medledger.anchoring.v1 import anchoring_service_pb2 as pb
from medledger.anchoring.v1 import anchoring_service_pb2_grpc as pb_grpc
from medledger.audit.v1 import audit_service_pb2 as audit_pb
from medledger.audit.v1 import audit_service_pb2_grpc as audit_grpc

from medledger_anchoring import storage
from medledger_anchoring.anchorer import Anchorer
from medledger_runtime.auth import Access
from medledger_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from medledger_runtime.service import ServiceRuntime
from medledger_runtime.timestamps import timestamp
from medledger_verifier import anchored_proofs

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
DEFAULT_PAGE, MAX_PAGE = 20, 100
MAX_PROOF_BYTES = 64 * 1024
# Indexes are 64-bit signed integers in the databases; a uint64 above is no entry.
MAX_ENTRY_INDEX = 2**63 - 2
_PAGE_TOKEN = re.compile(r"[0-9]{1,18}")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


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


def anchor_file(row: storage.AnchorRow) -> anchored_proofs.Anchor:
    return anchored_proofs.Anchor(
        chain_id=row.chain_id,
        contract_address=row.contract_address,
        tx_hash=row.transaction_hash,
        block_number=row.block_number,
        origin=row.origin,
        tree_size=row.tree_size,
        root=row.root,
    )


def _audit_error(exc: grpc.aio.AioRpcError, what: str) -> Exception:
    if exc.code() == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what}: {exc.details()}")
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(f"{what}: {exc.details()}")
    return Unavailable(f"the audit log did not answer ({exc.code().name}); retry later")


class AnchoringApi(pb_grpc.AnchoringServiceServicer):
    def __init__(
        self,
        runtime: ServiceRuntime,
        anchorer: Anchorer,
        audit: audit_grpc.AuditServiceStub,
        policy: anchored_proofs.TrustPolicy | None,
    ) -> None:
        self.rt, self.anchorer, self.audit, self.policy = runtime, anchorer, audit, policy

    async def ListAnchoredCheckpoints(
        self, request: pb.ListAnchoredCheckpointsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAnchoredCheckpointsResponse:
        if request.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        below: int | None = None
        if request.page_token:
            # ASCII digits only (str.isdigit takes "²", which int() refuses), few enough for BIGINT.
            if not _PAGE_TOKEN.fullmatch(request.page_token):
                raise InvalidArgument.field("page_token", "not a token this RPC returned")
            below = int(request.page_token)
        async with self.rt.db.read() as conn:
            rows = await storage.list_anchors(conn, self.anchorer.origin, below_size=below, limit=size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return pb.ListAnchoredCheckpointsResponse(
            checkpoints=[anchored_checkpoint(r) for r in rows],
            next_page_token=str(rows[-1].tree_size) if more else "",
        )

    async def GetLatestAnchor(
        self, request: pb.GetLatestAnchorRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetLatestAnchorResponse:
        async with self.rt.db.read() as conn:
            row = await storage.latest_anchor(conn, self.anchorer.origin)
            newest = await storage.newest_signed_checkpoint(conn, self.anchorer.origin)
        if row is None:
            raise NotFound("nothing is anchored yet")
        return pb.GetLatestAnchorResponse(
            anchor=anchored_checkpoint(row), latest_signed_tree_size=newest.tree_size if newest else 0
        )

    async def GetAnchoredProof(
        self, request: pb.GetAnchoredProofRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAnchoredProofResponse:
        target = request.WhichOneof("target")
        entry = b""
        if target == "commitment":
            if not _HEX64.match(request.commitment):
                raise InvalidArgument.field("commitment", "a SHA-256, 64 lowercase hex digits")
            try:
                found = await self.audit.FindCommitment(
                    audit_pb.FindCommitmentRequest(commitment=request.commitment), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                raise _audit_error(exc, "no log entry holds this commitment") from None
            index, entry = found.entry.index, found.entry.entry
        elif target == "entry_index":
            index = request.entry_index
            if index > MAX_ENTRY_INDEX:
                raise InvalidArgument.field("entry_index", "beyond the largest index a log can have")
        else:
            raise InvalidArgument.field("target", "give a commitment or an entry index")
        async with self.rt.db.read() as conn:
            row = await storage.anchor_covering(conn, self.anchorer.origin, index)
            latest = await storage.latest_anchor(conn, self.anchorer.origin) if row is None else None
        if row is None:
            anchored = latest.tree_size if latest else 0
            raise FailedPrecondition(
                f"entry {index} is not covered by an anchor yet (anchored tree size {anchored}); retry later"
            )
        try:
            proof = await self.audit.GetTlogProof(
                audit_pb.GetTlogProofRequest(index=index, tree_size=row.tree_size), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            raise _audit_error(exc, "the audit log has no proof of this entry") from None
        return pb.GetAnchoredProofResponse(
            tlog_proof=proof.tlog_proof,
            entry=entry,
            anchor=anchored_checkpoint(row),
            anchor_json=anchor_file(row).to_json().encode(),
            entry_index=index,
        )

    async def VerifyProof(
        self, request: pb.VerifyProofRequest, context: grpc.aio.ServicerContext
    ) -> pb.VerifyProofResponse:
        if self.policy is None:
            raise FailedPrecondition("this deployment has no trust policy configured (MEDLEDGER_TRUST_POLICY_FILE)")
        for name in ("tlog_proof", "entry", "anchor_json", "record"):
            if len(getattr(request, name)) > MAX_PROOF_BYTES * (16 if name == "record" else 1):
                raise InvalidArgument.field(name, "too large")
        if bool(request.record) != bool(request.salt):
            raise InvalidArgument.field("salt", "give the record and its salt together")
        if request.media_type and not request.record:
            raise InvalidArgument.field("media_type", "give it with the record (a document's media type)")
        result = await anchored_proofs.verify_anchored_proof(
            self.policy,
            request.tlog_proof,
            request.entry,
            request.anchor_json,
            self.anchorer.sender.w3,
            record=request.record or None,
            salt_hex=request.salt or None,
            media_type=request.media_type or None,
        )
        reply = pb.VerifyProofResponse(
            verified=result.verified,
            checks=[pb.VerificationCheck(name=c.name, passed=bool(c.passed), detail=c.detail) for c in result.checks],
            verdict=result.verdict(),
        )
        if result.verified and result.anchored_at is not None:
            reply.existed_no_later_than.CopyFrom(timestamp(result.anchored_at.timestamp()))
        return reply
