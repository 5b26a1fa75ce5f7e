"""The gRPC API of audit: medledger.audit.v1.AuditService.

Checkpoints, verifier keys and proofs are public: anyone may verify the log. Entries are read by
the patient they are about (found through their `subject`, the HMAC under the patient's audit
key), by a guardian the patient appointed (holding the role) for them, and by auditors. Proofs
are computed from the stored tiles (one read per proof).
"""

from __future__ import annotations

import json
import re
from typing import Any

import grpc
from medledger.audit.v1 import audit_service_pb2 as pb
from medledger.audit.v1 import audit_service_pb2_grpc as pb_grpc

from medledger_audit import fhir_audit, storage, tile_store
from medledger_audit.checkpoints import Checkpointer
from medledger_audit.entries import REDACTION, EntryDraft, redaction_entry, subject_key_name
from medledger_audit.sequencer import Sequencer
from medledger_runtime.auth import Access, Caller, ScopeNeed, current_caller, patient_id_field
from medledger_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from medledger_runtime.guardians import Guardians
from medledger_runtime.idempotency import check_request_id
from medledger_runtime.service import ServiceRuntime
from medledger_runtime.timestamps import seconds
from medledger_verifier import notes, tlog

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
    _SERVICE + "ListEntries": Access.of(kinds=["patient"], roles=["auditor", "guardian", "privacy-officer"]),
    _SERVICE + "ExportAuditEvents": Access.of(kinds=["patient"], roles=["auditor", "guardian", "privacy-officer"]),
    _SERVICE + "RedactEntry": Access.of(roles=["privacy-officer"]),
}
# What a token with SMART scopes needs (medledger_runtime.auth.scopes); any RPC not here refuses
# such a token: commitments, proofs and redaction are the log's, not FHIR AuditEvents (the proofs
# are public RPCs anyway). Keep it equal to the README's scopes table.
SCOPES: dict[str, ScopeNeed] = {
    _SERVICE + "ListEntries": ScopeNeed("AuditEvent", "s", patient=patient_id_field),
    # The patient's AuditEvents in bulk, as ExportRecords is their records': a read.
    _SERVICE + "ExportAuditEvents": ScopeNeed("AuditEvent", "r", patient=patient_id_field),
}
MAX_REASON = 500
# Tree sizes are 64-bit signed integers in the database; a uint64 above is no size the log had.
MAX_TREE_SIZE = 2**63 - 1
_PAGE_TOKEN = re.compile(r"[0-9]{1,18}")
DEFAULT_PAGE, MAX_PAGE = 100, 1000
MAX_EXPORT = 10_000
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _log_entry(row: Any, redacted_leaf: bytes = b"") -> pb.LogEntry:
    """An entry row as the API gives it. A redacted row has no bytes to hash: its leaf hash,
    read from the tiles, is passed in."""
    if row.entry is None:
        return pb.LogEntry(index=int(row.entry_index), leaf_hash=redacted_leaf, redacted=True)
    data = bytes(row.entry)
    return pb.LogEntry(index=int(row.entry_index), entry=data, leaf_hash=tlog.leaf_hash(data))


class AuditApi(pb_grpc.AuditServiceServicer):
    def __init__(
        self, runtime: ServiceRuntime, checkpointer: Checkpointer, sequencer: Sequencer, guardians: Guardians
    ) -> None:
        self.rt = runtime
        self.guardians = guardians
        self.checkpointer = checkpointer
        self.sequencer = sequencer
        self.tiles = tile_store.DatabaseTiles(runtime.db)

    async def _tree_size(self) -> int:
        async with self.rt.db.read() as conn:
            size, _ = await storage.read_state(conn)
        return size

    # Checkpoints and keys.

    async def GetLatestCheckpoint(
        self, request: pb.GetLatestCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetLatestCheckpointResponse:
        latest = await self.checkpointer.latest()
        if latest is None:
            raise NotFound("no checkpoint has been signed yet")
        note, size = latest
        return pb.GetLatestCheckpointResponse(note=note.encode(), tree_size=size)

    async def GetCheckpoint(
        self, request: pb.GetCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCheckpointResponse:
        if request.tree_size > MAX_TREE_SIZE:
            raise NotFound(f"no checkpoint was signed at tree size {request.tree_size}")
        async with self.rt.db.read() as conn:
            note = await storage.checkpoint_at(conn, self.checkpointer.origin, request.tree_size)
        if note is None:
            raise NotFound(f"no checkpoint was signed at tree size {request.tree_size}")
        return pb.GetCheckpointResponse(note=note.encode(), tree_size=request.tree_size)

    async def GetVerifierKeys(
        self, request: pb.GetVerifierKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetVerifierKeysResponse:
        return pb.GetVerifierKeysResponse(
            origin=self.checkpointer.origin, verifier_keys=self.checkpointer.verifier_keys()
        )

    # Proofs.

    async def _check_index(self, index: int, tree_size: int) -> None:
        current = await self._tree_size()
        if tree_size > current:
            raise FailedPrecondition(f"the tree has {current} entries, not {tree_size}")
        if index >= tree_size:
            raise InvalidArgument.field("index", f"not an entry of a tree of size {tree_size}")

    async def GetInclusionProof(
        self, request: pb.GetInclusionProofRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetInclusionProofResponse:
        await self._check_index(request.index, request.tree_size)
        leaf = (await tlog.leaf_hashes(self.tiles, request.index, request.index + 1, request.tree_size))[0]
        hashes = await tlog.inclusion_proof(self.tiles, request.index, request.tree_size)
        return pb.GetInclusionProofResponse(
            index=request.index, tree_size=request.tree_size, leaf_hash=leaf, hashes=hashes
        )

    async def GetConsistencyProof(
        self, request: pb.GetConsistencyProofRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetConsistencyProofResponse:
        if request.old_size > request.new_size:
            raise InvalidArgument.field("old_size", "at most new_size")
        current = await self._tree_size()
        if request.new_size > current:
            raise FailedPrecondition(f"the tree has {current} entries, not {request.new_size}")
        hashes = await tlog.consistency_proof(self.tiles, request.old_size, request.new_size)
        return pb.GetConsistencyProofResponse(hashes=hashes)

    async def GetTlogProof(
        self, request: pb.GetTlogProofRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTlogProofResponse:
        if request.tree_size > MAX_TREE_SIZE:
            raise NotFound("no checkpoint was signed at that tree size")
        async with self.rt.db.read() as conn:
            if request.tree_size:
                note = await storage.checkpoint_at(conn, self.checkpointer.origin, request.tree_size)
                size = request.tree_size
            else:
                latest = await storage.latest_checkpoint(conn, self.checkpointer.origin)
                note, size = latest if latest is not None else (None, 0)
        if note is None:
            raise NotFound("no checkpoint was signed at that tree size")
        if request.index >= size:
            raise InvalidArgument.field("index", f"not an entry of the checkpoint's tree of size {size}")
        hashes = await tlog.inclusion_proof(self.tiles, request.index, size)
        proof = notes.TlogProof(index=request.index, hashes=tuple(hashes), checkpoint=note)
        return pb.GetTlogProofResponse(tlog_proof=proof.format())

    # Entries.

    async def FindCommitment(
        self, request: pb.FindCommitmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.FindCommitmentResponse:
        if not _HEX64.match(request.commitment):
            raise InvalidArgument.field("commitment", "a SHA-256, 64 lowercase hex digits")
        async with self.rt.db.read() as conn:
            row = await storage.entry_by_commitment(conn, request.commitment)
        if row is None:
            raise NotFound("no entry holds this commitment (yet)")
        return pb.FindCommitmentResponse(entry=await self._with_leaf(row))

    async def ListEntries(
        self, request: pb.ListEntriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListEntriesResponse:
        if request.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        after = _page_position(request.page_token)
        rows = await self._select(current_caller(), request, after=after, limit=size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return pb.ListEntriesResponse(
            entries=[await self._with_leaf(r) for r in rows],
            next_page_token=str(int(rows[-1].entry_index)) if more else "",
        )

    async def ExportAuditEvents(
        self, request: pb.ExportAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExportAuditEventsResponse:
        if request.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        size = min(request.page_size or MAX_EXPORT, MAX_EXPORT)
        after = _page_position(request.page_token)
        rows = await self._select(current_caller(), request, after=after, limit=size + 1)
        more = len(rows) > size
        rows = rows[:size]
        events = []
        for row in rows:
            if row.entry is None:
                continue  # redacted: nothing left to describe
            data = bytes(row.entry)
            events.append(
                fhir_audit.audit_event(
                    json.loads(data), index=int(row.entry_index), leaf_hash_hex=tlog.leaf_hash(data).hex()
                )
            )
        bundle = fhir_audit.audit_event_bundle(events)
        return pb.ExportAuditEventsResponse(
            fhir_bundle_json=json.dumps(bundle).encode(),
            entries=len(events),
            next_page_token=str(int(rows[-1].entry_index)) if more else "",
        )

    async def _select(
        self, caller: Caller, request: pb.ListEntriesRequest | pb.ExportAuditEventsRequest, *, after: int, limit: int
    ) -> list[Any]:
        auditor = caller.has_role("auditor")
        patient_id = request.patient_id
        if not auditor and caller.has_role("privacy-officer"):
            # A privacy officer reviews one patient's trail (a decision's replay needs the
            # patient's consent versions; a patient's access request, their AuditEvents), never
            # the whole log.
            if not patient_id:
                raise InvalidArgument.field("patient_id", "a privacy officer reads the entries of one patient")
        elif not auditor:
            # A patient reads the entries about themselves, and only those; their guardian reads
            # them for the patient, naming the patient.
            if patient_id and patient_id != caller.principal_id:
                if not await self.guardians.acts_for(caller, patient_id):
                    raise PermissionDenied("a patient (or their guardian) reads their own entries only")
            elif caller.kind != "patient":
                raise InvalidArgument.field("patient_id", "required: the patient the guardian acts for")
            else:
                patient_id = caller.principal_id
        actor_id = getattr(request, "actor_id", "")
        record_id = getattr(request, "record_id", "")
        if sum(bool(x) for x in (request.patient_id, actor_id, record_id)) > 1:
            raise InvalidArgument.field("patient_id", "at most one of patient_id, actor_id and record_id")
        subject = None
        if patient_id:
            subject = await self._subject_of(patient_id)
            if subject is None:
                return []  # no entries about this patient (or erased: unlinkable now)
        async with self.rt.db.read() as conn:
            return await storage.select_entries(
                conn,
                subject=subject,
                actor_id=actor_id,
                record_id=record_id,
                time_from=seconds(request.time_from) if request.HasField("time_from") else None,
                time_before=seconds(request.time_before) if request.HasField("time_before") else None,
                after_index=after,
                limit=limit,
            )

    async def RedactEntry(
        self, request: pb.RedactEntryRequest, context: grpc.aio.ServicerContext
    ) -> pb.RedactEntryResponse:
        """Redaction for retention: the redaction is appended as an entry first (durable, and
        deduplicated by the request id), then the payload goes; a retry finishes a redaction a
        crash interrupted."""
        caller = current_caller()
        check_request_id(request.request_id)
        if not request.reason or len(request.reason) > MAX_REASON:
            raise InvalidArgument.field("reason", f"required: why, at most {MAX_REASON} characters")
        size = await self._tree_size()
        if request.index >= size:
            raise NotFound(f"the log has no entry {request.index}")
        async with self.rt.db.read() as conn:
            (row,) = await storage.read_entries(conn, request.index, request.index + 1)
            draft_id = f"redaction:{request.request_id}"[:200]
            retried = await storage.entry_index_of(conn, draft_id) is not None
        if row.type == REDACTION:
            raise FailedPrecondition("a redaction's own entry stays: it is what says the redaction happened")
        if row.entry is None and not retried:
            raise FailedPrecondition(f"entry {request.index} is redacted already")
        leaf = (await tlog.leaf_hashes(self.tiles, request.index, request.index + 1, size))[0]
        await self.sequencer.append([_redaction_of(request, caller, leaf)])
        async with self.rt.db.transaction() as conn:
            await storage.redact_entry(conn, request.index)
            redaction_index = await storage.entry_index_of(conn, draft_id)
            (row,) = await storage.read_entries(conn, request.index, request.index + 1)
        assert redaction_index is not None
        return pb.RedactEntryResponse(entry=_log_entry(row, leaf), redaction_index=redaction_index)

    async def _subject_of(self, patient_id: str) -> str | None:
        """The patient's `subject`, without creating a key for a patient the log never saw."""
        keys = self.rt.require_keys()
        try:
            return await keys.hmac(subject_key_name(patient_id), patient_id.encode())
        except NotFound:
            return None
        except InvalidArgument:
            return None  # not a name a key can have: no such patient

    async def _with_leaf(self, row: Any) -> pb.LogEntry:
        if row.entry is not None:
            return _log_entry(row)
        size = await self._tree_size()
        leaf = (await tlog.leaf_hashes(self.tiles, int(row.entry_index), int(row.entry_index) + 1, size))[0]
        return _log_entry(row, leaf)


def _redaction_of(request: pb.RedactEntryRequest, caller: Caller, leaf: bytes) -> EntryDraft:
    return redaction_entry(request.index, leaf.hex(), request.reason, caller.principal_id, request.request_id)


def _page_position(token: str) -> int:
    if not token:
        return -1
    # ASCII digits only (str.isdigit takes "²", which int() refuses), few enough for BIGINT.
    if not _PAGE_TOKEN.fullmatch(token):
        raise InvalidArgument.field("page_token", "not a token this RPC returned")
    return int(token)
