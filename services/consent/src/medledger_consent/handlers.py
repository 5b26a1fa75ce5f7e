"""Consent's event handlers: identity events keep the principal directory current; an
erasure's request destroys the patient's key."""

from __future__ import annotations

import logging
from collections.abc import Callable

from medledger.events.v1 import consent_events_pb2, identity_events_pb2
from medledger.types.v1 import vocabulary_pb2

from medledger_consent import break_glass_storage, storage
from medledger_consent.domain import ConsentIndex, justification_key_name
from medledger_runtime.db import Database
from medledger_runtime.erasure import destroy_keys, erasure_asked_of, keys_destroyed_event
from medledger_runtime.errors import Unavailable
from medledger_runtime.events import TOPICS, unpack
from medledger_runtime.kafka import ConsumedMessage
from medledger_runtime.keys import KeyShredder
from medledger_runtime.outbox import claim_inbox, enqueue

log = logging.getLogger(__name__)

DIRECTORY_CONSUMER = "consent.principal-directory"
_REGISTERED = identity_events_pb2.PrincipalRegistered.DESCRIPTOR.full_name
_DEACTIVATED = identity_events_pb2.PrincipalDeactivated.DESCRIPTOR.full_name


class PrincipalDirectoryHandler:
    """Applies identity events once each (inbox), ignoring stale versions."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def __call__(self, message: ConsumedMessage) -> None:
        event = message.event
        if event is None or event.type not in (_REGISTERED, _DEACTIVATED):
            return
        async with self.db.transaction() as conn:
            if not await claim_inbox(conn, DIRECTORY_CONSUMER, event.id):
                return
            if event.type == _REGISTERED:
                reg = unpack(event, identity_events_pb2.PrincipalRegistered)
                await storage.upsert_principal(
                    conn,
                    storage.KnownPrincipal(
                        principal_id=reg.principal_id,  # type: ignore[attr-defined]
                        kind=reg.kind,  # type: ignore[attr-defined]
                        status=vocabulary_pb2.PrincipalStatus.PRINCIPAL_STATUS_ACTIVE,
                        organization_id=reg.organization_id,  # type: ignore[attr-defined]
                        version=event.version,
                    ),
                )
            else:
                dea = unpack(event, identity_events_pb2.PrincipalDeactivated)
                await storage.set_status(
                    conn,
                    dea.principal_id,  # type: ignore[attr-defined]
                    vocabulary_pb2.PrincipalStatus.PRINCIPAL_STATUS_DEACTIVATED,
                    event.version,
                )


INDEX_CONSUMER = "consent.index"
_VERSION_RECORDED = consent_events_pb2.ConsentVersionRecorded.DESCRIPTOR.full_name
_BREAK_GLASS_CHANGED = {
    consent_events_pb2.BreakGlassAccessStarted.DESCRIPTOR.full_name,
    consent_events_pb2.BreakGlassAccessReviewed.DESCRIPTOR.full_name,
}


class ConsentIndexHandler:
    """Keeps this replica's consent index current with the consent versions and break-glass
    accesses other replicas recorded."""

    def __init__(self, db: Database, index: ConsentIndex) -> None:
        self.db = db
        self.index = index

    async def __call__(self, message: ConsumedMessage) -> None:
        event = message.event
        if event is not None and event.type in _BREAK_GLASS_CHANGED:
            await self._break_glass_changed(event.aggregate_id)
        if event is None or event.type != _VERSION_RECORDED:
            return
        recorded = unpack(event, consent_events_pb2.ConsentVersionRecorded)
        async with self.db.connect() as conn:
            found = await storage.get_version(conn, recorded.consent_id, recorded.version)  # type: ignore[attr-defined]
        if found is None:
            # Published after its commit, so it is there; if not, retry until it is.
            raise Unavailable("a consent version announced by its event is not in the database yet")
        self.index.add(found[0])

    async def _break_glass_changed(self, access_id: str) -> None:
        async with self.db.connect() as conn:
            found = await break_glass_storage.get_access(conn, access_id)
        if found is None:
            raise Unavailable("a break-glass access announced by its event is not in the database yet")
        self.index.put_break_glass(found[0])


ERASURE_CONSUMER = "consent.erasures"
ERASURE_PARTICIPANT = "consent"


class PatientErasureHandler:
    """On PatientKeysErasureRequested: destroy the patient's key in consent's key manager (the
    patient's break-glass justifications are encrypted under it: none decrypts afterwards) and
    confirm with PatientKeysDestroyed. On every delivery: a redelivered request re-confirms and
    a key already gone counts as destroyed. Consents and decisions stay: they hold ids and
    codes, not personal data, and the accountability trail needs them."""

    def __init__(
        self, db: Database, shredder: KeyShredder, source: str, after_commit: Callable[[], None] = lambda: None
    ) -> None:
        self.db = db
        self.shredder = shredder  # consent's erasure credential
        self.source = source
        self.after_commit = after_commit  # the outbox relay's wake-up

    async def __call__(self, message: ConsumedMessage) -> None:
        request = erasure_asked_of(message.event, ERASURE_PARTICIPANT)
        if request is None:
            return
        destroyed = await destroy_keys(self.shredder, [justification_key_name(request.patient_id)])
        async with self.db.transaction() as conn:
            confirmation = keys_destroyed_event(self.source, ERASURE_PARTICIPANT, request, destroyed)
            await enqueue(conn, TOPICS["consent"], confirmation, key=request.patient_id.encode())
        self.after_commit()
        log.info("patient's key destroyed for an erasure", extra={"erasure_id": request.erasure_id})
