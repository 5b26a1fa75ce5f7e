"""Anchoring keeps only checkpoints the log's keys signed. A CheckpointSigned event is a claim
anyone with write access to the audit topic could make; the newest kept checkpoint is what the
anchorer sends, so a planted one (the contract refuses it) would stall anchoring. Found by the
hostile-input review: the handler stored the event as it came."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka.structs import ConsumerRecord
from cryptography.hazmat.primitives.asymmetric import ed25519
from medledger.events.v1 import audit_events_pb2

from medledger_anchoring import storage
from medledger_anchoring.handlers import CheckpointHandler
from medledger_runtime.db import Database
from medledger_runtime.errors import InvalidArgument
from medledger_runtime.events import new_event
from medledger_runtime.kafka import ConsumedMessage
from medledger_runtime.outbox import COMMON_MIGRATIONS
from medledger_verifier import notes, tlog

ORIGIN = "medledger.test/audit"


def signer() -> notes.NoteSigner:
    key = ed25519.Ed25519PrivateKey.generate()

    async def sign(message: bytes) -> bytes:
        return key.sign(message)

    return notes.NoteSigner(notes.NoteVerifier.from_public_key(ORIGIN, key.public_key()), sign)


async def checkpoint_event(size: int, root: bytes, by: notes.NoteSigner, *, claimed_root: bytes | None = None):
    note = await notes.sign_note(notes.Checkpoint(ORIGIN, size, root).body(), [by])
    payload = audit_events_pb2.CheckpointSigned(
        origin=ORIGIN, tree_size=size, root=claimed_root or root, note=note.format()
    )
    event = new_event(source="medledger.audit", payload=payload, aggregate_id=ORIGIN, version=size)
    record = ConsumerRecord("medledger.audit.v1", 0, size, 0, 0, None, event.SerializeToString(), None, 0, 0, ())
    return ConsumedMessage(record, event)


async def test_only_checkpoints_the_logs_keys_signed_are_kept(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'anchoring.db'}")
    await db.migrate("common", COMMON_MIGRATIONS)
    await db.migrate("anchoring", storage.MIGRATIONS)
    log_key, other_key = signer(), signer()
    woken = []
    handler = CheckpointHandler(db, ORIGIN, lambda: woken.append(1), [log_key.verifier])
    root = tlog.leaf_hash(b"entry")
    try:
        await handler(await checkpoint_event(1, root, log_key))
        for forged in (
            await checkpoint_event(5, root, other_key),  # signed by another key
            await checkpoint_event(7, root, log_key, claimed_root=bytes(32)),  # the event lies about the root
        ):
            with pytest.raises(InvalidArgument):
                await handler(forged)
        async with db.connect() as conn:
            newest = await storage.newest_signed_checkpoint(conn, ORIGIN)
        assert newest is not None and (newest.tree_size, newest.root) == (1, root)
        assert woken == [1]
    finally:
        await db.close()
