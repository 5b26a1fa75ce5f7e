"""The checkpointer: signs the log's checkpoints, keeps them, and announces them.

A checkpoint is signed only when the tree grew since the last one, and then once
`every_entries` entries were added or `interval_seconds` passed since the last one, whichever
comes first: stable checkpoints, never one per entry. Each is signed with both of the log's keys
in the key manager (Ed25519, and ECDSA P-256 for the chain's contract), its note kept verbatim
in `checkpoints`, and a `CheckpointSigned` event written to the outbox in the same transaction.

The last signed checkpoint is also kept outside the database, in a file written before the
database commits. A checkpoint that does not extend it (a database restored from an older
backup, rows deleted) is never signed: the log would be signing two histories. The checkpointer
logs the refusal, raises `medledger_audit_checkpoint_refusals_total`, and keeps refusing; the
remedy is a new origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medledger.events.v1 import audit_events_pb2
from prometheus_client import Counter, Gauge

from medledger_audit import storage, tile_store
from medledger_runtime import files
from medledger_runtime.db import Database
from medledger_runtime.errors import DataLoss, FailedPrecondition, InvalidArgument
from medledger_runtime.events import TOPICS, new_event
from medledger_runtime.keys import KeyManager, KeyType
from medledger_runtime.keys.note_signer import key_manager_signer
from medledger_runtime.outbox import enqueue
from medledger_verifier import notes, tlog

log = logging.getLogger(__name__)

ED25519_KEY = "audit-checkpoint-ed25519"
P256_KEY = "audit-checkpoint-p256"
CHECKPOINT_LOCK = "audit-checkpointer"

SIGNED = Counter("medledger_audit_checkpoints_signed_total", "Checkpoints the log signed.")
REFUSALS = Counter(
    "medledger_audit_checkpoint_refusals_total",
    "Checkpoints not signed because the tree does not extend the last signed one (alert on any).",
)
LAST_SIGNED_SIZE = Gauge("medledger_audit_checkpoint_tree_size", "Tree size of the last signed checkpoint.")
LAST_SIGNED_TIME = Gauge("medledger_audit_checkpoint_signed_timestamp_seconds", "When the last checkpoint was signed.")


@dataclass(frozen=True)
class SignedCheckpoint:
    checkpoint: notes.Checkpoint
    note: str


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` whole (see medledger_runtime.files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomically(path, text.encode("utf-8"))


class Checkpointer:
    """See the module. `start()` before `run()`; `latest()` for the API."""

    def __init__(
        self,
        db: Database,
        keys: KeyManager,
        *,
        origin: str,
        last_checkpoint_file: Path,
        source: str = "medledger.audit",
        every_entries: int = 1000,
        interval_seconds: float = 5.0,
        poll_seconds: float = 1.0,
    ) -> None:
        self.db = db
        self.keys = keys
        self.origin = origin
        self.last_checkpoint_file = last_checkpoint_file
        self.source = source
        self.every_entries = every_entries
        self.interval_seconds = interval_seconds
        # How often the tree size is read (other replicas append too); this replica's own
        # appends wake the checkpointer at once through `tree_grew`.
        self.poll_seconds = min(poll_seconds, interval_seconds)
        self.tiles = tile_store.DatabaseTiles(db)
        self.signers: list[notes.NoteSigner] = []
        self.last: SignedCheckpoint | None = None
        self.refused: str | None = None
        """Why the last attempt refused to sign, while it does."""
        self._last_signed_at = time.monotonic()
        self._known_size = 0
        self._grew = asyncio.Event()
        # Called after a checkpoint's event is in the outbox (the relay, to publish it now).
        self.after_commit: Callable[[], None] | None = None

    @property
    def verifiers(self) -> list[notes.NoteVerifier]:
        return [s.verifier for s in self.signers]

    def verifier_keys(self) -> list[str]:
        """The log's verifier keys in C2SP note-verifier form: Ed25519 first, then P-256."""
        return [v.text() for v in self.verifiers]

    async def start(self) -> None:
        """Make sure both signing keys exist, and load the last signed checkpoint."""
        await self.keys.ensure_key(ED25519_KEY, KeyType.ED25519)
        await self.keys.ensure_key(P256_KEY, KeyType.ECDSA_P256)
        self.signers = [
            await key_manager_signer(self.keys, ED25519_KEY, self.origin),
            await key_manager_signer(self.keys, P256_KEY, self.origin),
        ]
        self.last = await self._load_last()
        if self.last is not None:
            LAST_SIGNED_SIZE.set(self.last.checkpoint.tree_size)

    async def _load_last(self) -> SignedCheckpoint | None:
        """The last signed checkpoint: the file's, else (first start, or the file lost) the
        database's latest, which is all there is to go by."""
        text = await asyncio.to_thread(self._read_file)
        if text is not None:
            note = notes.parse_note(text)  # verified below only if it names our origin
            checkpoint = notes.Checkpoint.parse(note.text)
            if checkpoint.origin == self.origin:
                notes.verify_note(note, self.verifiers)
                return SignedCheckpoint(checkpoint, text)
            log.warning(
                "the last checkpoint file is of another origin: this log starts afresh under its own",
                extra={"file_origin": checkpoint.origin, "origin": self.origin},
            )
            return None
        async with self.db.read() as conn:
            latest = await storage.latest_checkpoint(conn, self.origin)
        if latest is None:
            return None
        log.warning("no last checkpoint file: taking the database's latest checkpoint as the last signed")
        checkpoint, _ = notes.open_checkpoint(latest[0], self.verifiers, origin=self.origin)
        return SignedCheckpoint(checkpoint, latest[0])

    def _read_file(self) -> str | None:
        try:
            return self.last_checkpoint_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def tree_grew(self, tree_size: int) -> None:
        """The sequencer appended: maybe time for a checkpoint."""
        self._known_size = max(self._known_size, tree_size)
        self._grew.set()

    async def latest(self) -> tuple[str, int] | None:
        """The latest signed checkpoint note of this log, verbatim, and its tree size."""
        async with self.db.read() as conn:
            return await storage.latest_checkpoint(conn, self.origin)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._grew.wait(), self.poll_seconds)
            self._grew.clear()
            try:
                await self.maybe_sign()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database or key manager away: try again next round
                log.warning("checkpoint not signed this round", extra={"error": type(exc).__name__})

    def _due(self, tree_size: int, root: bytes) -> bool:
        if self.last is not None and (
            tree_size < self.last.checkpoint.tree_size
            or (tree_size == self.last.checkpoint.tree_size and root != self.last.checkpoint.root)
        ):
            return True  # not a tree the log signed: `sign` refuses it, loudly
        last_size = self.last.checkpoint.tree_size if self.last else 0
        if tree_size <= last_size:
            return False
        return (
            tree_size - last_size >= self.every_entries
            or time.monotonic() - self._last_signed_at >= self.interval_seconds
        )

    async def maybe_sign(self) -> SignedCheckpoint | None:
        """Sign a checkpoint of the current tree if one is due (see the module)."""
        async with self.db.read() as conn:
            size, root = await storage.read_state(conn)
        self._known_size = max(self._known_size, size)
        if not self._due(size, root):
            return None
        return await self.sign(size, root)

    async def sign(self, tree_size: int, root: bytes) -> SignedCheckpoint | None:
        """Sign the checkpoint of the tree at `tree_size` (whose root the state says is `root`),
        if it extends the last signed one; None if another replica is signing right now."""
        async with self.db.transaction() as conn:
            if not await self.db.try_xact_lock(conn, CHECKPOINT_LOCK):
                return None
            # The tiles, not the state row alone, are what proofs are made from: they must agree.
            try:
                from_tiles = await tlog.tree_root(self.tiles, tree_size)
                if from_tiles != root:
                    raise FailedPrecondition(f"the stored tiles do not give the log's root at size {tree_size}")
                checkpoint = notes.Checkpoint(self.origin, tree_size, from_tiles)
                await self._check_extends_last(checkpoint)
            except (FailedPrecondition, DataLoss) as exc:
                self._refuse(str(exc))
                return None
            if self.last is not None and self.last.checkpoint == checkpoint:
                return None  # signed by another replica already
            note = await notes.sign_checkpoint(checkpoint, self.signers)
            signed_at = time.time()
            # The file first: once a note may be published, it must guard every later signing.
            await asyncio.to_thread(write_atomically, self.last_checkpoint_file, note)
            await storage.store_checkpoint(conn, self.origin, tree_size, note, signed_at)
            payload = audit_events_pb2.CheckpointSigned(
                origin=self.origin, tree_size=tree_size, root=checkpoint.root, note=note
            )
            event = new_event(source=self.source, payload=payload, aggregate_id=self.origin, version=tree_size)
            # Keyed by origin: one partition, so the anchoring service sees checkpoints in order.
            await enqueue(conn, TOPICS["audit"], event, key=self.origin.encode())
        signed = SignedCheckpoint(checkpoint, note)
        self.last = signed
        self.refused = None
        self._last_signed_at = time.monotonic()
        SIGNED.inc()
        LAST_SIGNED_SIZE.set(tree_size)
        LAST_SIGNED_TIME.set(signed_at)
        if self.after_commit is not None:
            self.after_commit()
        log.info("checkpoint signed", extra={"tree_size": tree_size})
        return signed

    async def _check_extends_last(self, checkpoint: notes.Checkpoint) -> None:
        last = self.last
        if last is None:
            return
        old = last.checkpoint
        if old.tree_size > checkpoint.tree_size:
            proof: list[bytes] = []
        else:
            try:
                proof = await tlog.consistency_proof(self.tiles, old.tree_size, checkpoint.tree_size)
            except InvalidArgument as exc:
                raise FailedPrecondition(f"no consistency proof from the last checkpoint: {exc}") from None
        notes.check_extends(old, checkpoint, proof)

    def _refuse(self, reason: str) -> None:
        REFUSALS.inc()
        if reason == self.refused:
            return  # logged already; it keeps refusing until the log has a new origin
        self.refused = reason
        log.error(
            "refusing to sign a checkpoint that does not extend the last signed one; "
            "the database was rolled back or altered: investigate, then continue under a new origin",
            extra={"reason": reason},
        )
