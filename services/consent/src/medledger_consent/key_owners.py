"""Consent's part of the key-owner migration, and the backfill of erasures that completed before
consent took part in them.

- The migration (medledger_runtime.key_owners): each break-glass justification moves from the old
  shared key `patient-<id>` to consent's own `consent-patient-<id>`, with the same associated
  data (the access id). A background job at start; progress is the `justifications_under_old_keys`
  table, so a crash loses at most the page in flight.
- The backfill: records announces each completed erasure (PatientRecordsErased on its topic).
  Consent reads that topic from the beginning with a consumer group of its own and, for each,
  destroys consent's keys of the patient (its own and the old shared one, through its erasure
  token) and drops the justifications' ciphertexts. The key first, then the rows with the inbox
  entry in one transaction: a crash in between redelivers the event and both run again (a key
  already gone is done). It is idempotent, so erasures consent handles as they happen are
  harmless here too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from medledger.events.v1 import records_events_pb2
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_consent import break_glass_storage
from medledger_runtime.db import Database
from medledger_runtime.errors import NotFound
from medledger_runtime.events import unpack
from medledger_runtime.kafka import ConsumedMessage
from medledger_runtime.key_owners import KeyOwnerMigration, reencrypt
from medledger_runtime.keys import KeyManager, KeyShredder, patient_key_name
from medledger_runtime.outbox import claim_inbox

log = logging.getLogger(__name__)
ERASURE_BACKFILL_CONSUMER = "consent.erasure-backfill"
_ERASED = records_events_pb2.PatientRecordsErased.DESCRIPTOR.full_name


def justification_migration(db: Database, keys: KeyManager, legacy: Callable[[], KeyManager]) -> KeyOwnerMigration:
    """``legacy`` gives the key manager that reads the old shared keys (``ServiceRuntime.legacy_keys``)."""

    async def move(conn: AsyncConnection, old: KeyManager, access_id: str) -> bool:
        found = await break_glass_storage.justification_for_update(conn, access_id)
        if found is None:
            return False
        patient_id, ciphertext = found
        moved = ""
        if ciphertext:
            try:
                moved = await reencrypt(
                    keys, old, "consent", patient_id, ciphertext, associated_data=access_id.encode()
                )
            except NotFound:
                moved = ""  # the old key is gone (the patient was erased): unreadable already
        await break_glass_storage.move_justification(conn, access_id, moved)
        return bool(moved)

    return KeyOwnerMigration("consent", db, legacy, break_glass_storage.justifications_under_old_keys_after, move)


class ErasedJustificationsHandler:
    """On PatientRecordsErased: consent's keys of the patient go, and the justifications'
    ciphertexts with them."""

    def __init__(self, db: Database, shredder: KeyShredder) -> None:
        self.db = db
        self.shredder = shredder

    async def __call__(self, message: ConsumedMessage) -> None:
        event = message.event
        if event is None or event.type != _ERASED:
            return
        certificate = unpack(event, records_events_pb2.PatientRecordsErased).certificate  # type: ignore[attr-defined]
        patient_id: str = certificate.patient_id
        await self.shredder.shred(patient_key_name("consent", patient_id))  # and the old shared key
        async with self.db.transaction() as conn:
            if not await claim_inbox(conn, ERASURE_BACKFILL_CONSUMER, event.id):
                return
            dropped = await break_glass_storage.forget_justifications(conn, patient_id)
        log.info("an erased patient's break-glass justifications dropped", extra={"justifications": dropped})
