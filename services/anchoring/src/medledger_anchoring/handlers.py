"""Anchoring's event handlers: the audit log's signed checkpoints, and consent versions whose
commitments go to ConsentRegistry. Each event is applied once (the inbox, in the same
transaction as its effect); the chain work happens later, in the anchorer and the consent writer,
so a slow or unreachable chain never holds up the consumers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from medledger.events.v1 import audit_events_pb2, consent_events_pb2

from medledger_anchoring import storage
from medledger_runtime.db import Database
from medledger_runtime.errors import InvalidArgument
from medledger_runtime.events import unpack
from medledger_runtime.kafka import ConsumedMessage
from medledger_runtime.outbox import claim_inbox
from medledger_runtime.timestamps import seconds
from medledger_verifier import notes

log = logging.getLogger(__name__)

CHECKPOINTS_CONSUMER = "anchoring.checkpoints"
CONSENTS_CONSUMER = "anchoring.consents"
_CHECKPOINT_SIGNED = audit_events_pb2.CheckpointSigned.DESCRIPTOR.full_name
_CONSENT_VERSION = consent_events_pb2.ConsentVersionRecorded.DESCRIPTOR.full_name


class CheckpointHandler:
    """Keeps every checkpoint the log signed; the anchorer picks the newest.

    With the log's verifier keys (from the trust policy) a checkpoint is kept only if its note
    carries a valid signature of every key and states the event's size and root: anyone who can
    write to the audit topic could otherwise plant a checkpoint the anchorer would pick as the
    newest, and the contract's refusal of it would stall anchoring. Such an event is refused
    (InvalidArgument), so the consumer sends it to the dead-letter topic."""

    def __init__(
        self,
        db: Database,
        origin: str,
        on_new: Callable[[], None],
        verifiers: Sequence[notes.NoteVerifier] = (),
    ) -> None:
        self.db, self.origin, self.on_new = db, origin, on_new
        self.verifiers = tuple(verifiers)

    async def __call__(self, message: ConsumedMessage) -> None:
        event = message.event
        if event is None or event.type != _CHECKPOINT_SIGNED:
            return
        signed = unpack(event, audit_events_pb2.CheckpointSigned)
        if signed.origin != self.origin:  # type: ignore[attr-defined]
            return  # another log's checkpoints are another anchorer's
        if self.verifiers:
            checkpoint, _ = notes.open_checkpoint(
                signed.note,  # type: ignore[attr-defined]
                self.verifiers,
                origin=self.origin,
                require_all=True,
            )
            if (checkpoint.tree_size, checkpoint.root) != (signed.tree_size, signed.root):  # type: ignore[attr-defined]
                raise InvalidArgument.field("note", "the signed note states another tree size or root")
        async with self.db.transaction() as conn:
            if not await claim_inbox(conn, CHECKPOINTS_CONSUMER, event.id):
                return
            await storage.save_signed_checkpoint(
                conn,
                storage.SignedCheckpoint(
                    origin=signed.origin,  # type: ignore[attr-defined]
                    tree_size=signed.tree_size,  # type: ignore[attr-defined]
                    root=signed.root,  # type: ignore[attr-defined]
                    note=signed.note,  # type: ignore[attr-defined]
                    received_at=time.time(),
                ),
            )
        self.on_new()


class ConsentVersionHandler:
    """Queues each consent version for ConsentRegistry, in the order consent recorded them."""

    def __init__(self, db: Database, on_new: Callable[[], None]) -> None:
        self.db, self.on_new = db, on_new

    async def __call__(self, message: ConsumedMessage) -> None:
        event = message.event
        if event is None or event.type != _CONSENT_VERSION:
            return
        version = unpack(event, consent_events_pb2.ConsentVersionRecorded)
        commitment = str(version.commitment)  # type: ignore[attr-defined]
        if len(commitment) != 64:
            log.warning("consent event %s has no commitment; nothing to write on chain", event.id)
            return
        start = version.period_start  # type: ignore[attr-defined]
        end = version.period_end  # type: ignore[attr-defined]
        async with self.db.transaction() as conn:
            if not await claim_inbox(conn, CONSENTS_CONSUMER, event.id):
                return
            await storage.queue_consent_write(
                conn,
                storage.ConsentWrite(
                    seq=0,
                    event_id=event.id,
                    consent_id=version.consent_id,  # type: ignore[attr-defined]
                    version=version.version,  # type: ignore[attr-defined]
                    commitment=commitment,
                    revoked=bool(version.revoked),  # type: ignore[attr-defined]
                    valid_from=int(seconds(start)) if version.HasField("period_start") else 0,
                    valid_until=int(seconds(end)) if version.HasField("period_end") else 0,
                ),
            )
        self.on_new()
