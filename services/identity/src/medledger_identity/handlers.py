"""Identity's event handlers: a patient whose records were erased loses their personal data here
too."""

from __future__ import annotations

import logging

from medledger.events.v1 import records_events_pb2

from medledger_common.db import Database
from medledger_common.events import unpack
from medledger_common.kafka import ConsumedMessage
from medledger_common.keys import KeyShredder, patient_key_name
from medledger_common.outbox import claim_inbox
from medledger_identity import storage

log = logging.getLogger(__name__)
ERASURE_CONSUMER = "identity.erasures"
_ERASED = records_events_pb2.PatientRecordsErased.DESCRIPTOR.full_name


class PatientErasedHandler:
    """On PatientRecordsErased: drop the patient's FHIR resource and identifier indexes, and the
    patient's key identity owns (`identity-patient-<id>`, and the old shared name with it),
    through identity's erasure credential. The principal itself stays: a pseudonym with a kind
    and a status, which the audit trail refers to."""

    def __init__(self, db: Database, shredder: KeyShredder) -> None:
        self.db = db
        self.shredder = shredder

    async def __call__(self, message: ConsumedMessage) -> None:
        event = message.event
        if event is None or event.type != _ERASED:
            return
        certificate = unpack(event, records_events_pb2.PatientRecordsErased).certificate  # type: ignore[attr-defined]
        patient_id: str = certificate.patient_id
        # The key first (repeatable), then the rows with the inbox entry: a crash in between
        # redelivers the event and both run again.
        await self.shredder.shred(patient_key_name("identity", patient_id))
        async with self.db.transaction() as conn:
            if not await claim_inbox(conn, ERASURE_CONSUMER, event.id):
                return
            forgotten = await storage.forget_personal_data(conn, patient_id)
        log.info("patient's personal data dropped after erasure", extra={"forgotten": forgotten})
