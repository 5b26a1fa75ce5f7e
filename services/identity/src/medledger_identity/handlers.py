"""Identity's event handlers: a patient whose records were erased loses their personal data here
too."""

from __future__ import annotations

import logging

from medledger.events.v1 import records_events_pb2

from medledger_common.db import Database
from medledger_common.events import unpack
from medledger_common.kafka import ConsumedMessage
from medledger_common.keys import KeyManager, patient_key_name
from medledger_common.outbox import claim_inbox
from medledger_identity import storage

log = logging.getLogger(__name__)
ERASURE_CONSUMER = "identity.erasures"
_ERASED = records_events_pb2.PatientRecordsErased.DESCRIPTOR.full_name


class PatientErasedHandler:
    """On PatientRecordsErased: drop the patient's FHIR resource and identifier indexes, and the
    patient's key in identity's own key manager (with the local keyring, identity's copy of the
    patient's resource is under a key of the same name in identity's keyring; with Vault it is
    the same key, which records already deleted). The principal itself stays: a pseudonym with a
    kind and a status, which the audit trail refers to."""

    def __init__(self, db: Database, keys: KeyManager) -> None:
        self.db = db
        self.keys = keys

    async def __call__(self, message: ConsumedMessage) -> None:
        event = message.event
        if event is None or event.type != _ERASED:
            return
        certificate = unpack(event, records_events_pb2.PatientRecordsErased).certificate  # type: ignore[attr-defined]
        patient_id: str = certificate.patient_id
        # The key first (repeatable), then the rows with the inbox entry: a crash in between
        # redelivers the event and both run again.
        await self.keys.erase_key(patient_key_name(patient_id))
        async with self.db.transaction() as conn:
            if not await claim_inbox(conn, ERASURE_CONSUMER, event.id):
                return
            forgotten = await storage.forget_personal_data(conn, patient_id)
        log.info("patient's personal data dropped after erasure", extra={"forgotten": forgotten})
