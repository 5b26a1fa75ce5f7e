"""Identity's event handlers: a patient whose erasure runs loses their personal data here too."""

from __future__ import annotations

import logging
from collections.abc import Callable

from medledger.types.v1 import vocabulary_pb2

from medledger_identity import storage
from medledger_identity.resources import resource_key
from medledger_runtime.db import Database
from medledger_runtime.erasure import destroy_keys, erasure_asked_of, keys_destroyed_event
from medledger_runtime.events import TOPICS
from medledger_runtime.kafka import ConsumedMessage
from medledger_runtime.keys import KeyShredder
from medledger_runtime.outbox import enqueue

log = logging.getLogger(__name__)
ERASURE_CONSUMER = "identity.erasures"
PARTICIPANT = "identity"
SOURCE = "medledger.identity"
_PATIENT = vocabulary_pb2.PrincipalKind.PRINCIPAL_KIND_PATIENT


class PatientErasureHandler:
    """On PatientKeysErasureRequested: destroy the patient's key identity owns
    (`identity-patient-<id>`, under which the patient's FHIR resource is, and the old shared name
    with it) through identity's erasure credential, drop the resource and identifier indexes, and confirm
    with PatientKeysDestroyed. On every delivery: a redelivered request re-confirms (records
    keeps the first confirmation). The principal itself stays: a pseudonym with a kind and a
    status, which the audit trail refers to."""

    def __init__(self, db: Database, shredder: KeyShredder, after_commit: Callable[[], None] = lambda: None) -> None:
        self.db = db
        self.shredder = shredder
        self.after_commit = after_commit  # the outbox relay's wake-up

    async def __call__(self, message: ConsumedMessage) -> None:
        request = erasure_asked_of(message.event, PARTICIPANT)
        if request is None:
            return
        # The key first (repeatable), then the rows and the confirmation in one transaction: a
        # crash in between redelivers the request and both run again.
        destroyed = await destroy_keys(self.shredder, [resource_key(request.patient_id, _PATIENT)])
        async with self.db.transaction() as conn:
            forgotten = await storage.forget_personal_data(conn, request.patient_id)
            confirmation = keys_destroyed_event(SOURCE, PARTICIPANT, request, destroyed)
            await enqueue(conn, TOPICS["identity"], confirmation, key=request.patient_id.encode())
        self.after_commit()
        log.info(
            "patient's key destroyed and personal data dropped for an erasure",
            extra={"erasure_id": request.erasure_id, "forgotten": forgotten},
        )
