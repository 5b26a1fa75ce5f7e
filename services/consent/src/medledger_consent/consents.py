"""Consent's use cases on consents and guardians, apart from any transport (the gRPC API in
``api.py`` is one caller of these): grant, revoke, get and list consents; appoint and remove a
guardian. The decision point (checks) is in ``checks.py``, break-glass in ``break_glass.py``.

Each takes the caller and a command of plain values and returns plain results or raises the
errors of ``medledger_runtime.errors``. A grant or a revocation is a new consent version, written
with its event in one transaction (run by the caller's `transaction`, see ``writes.py``) and
added to this replica's index as soon as it commits. The rules without I/O are in ``domain.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, overload

from medledger.consent.v1 import consent_service_pb2 as pb
from medledger.events.v1 import consent_events_pb2
from medledger.types.v1 import vocabulary_pb2
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_consent import domain, fhir, storage
from medledger_consent.writes import RunWrite, T, Transaction, Write, write_then_index
from medledger_runtime.auth import Caller
from medledger_runtime.db import Database
from medledger_runtime.errors import InvalidArgument, NotFound, PermissionDenied
from medledger_runtime.events import TOPICS, new_event
from medledger_runtime.outbox import enqueue
from medledger_runtime.timestamps import timestamp

Kind = vocabulary_pb2.PrincipalKind
PRINCIPAL_ACTIVE = vocabulary_pb2.PrincipalStatus.PRINCIPAL_STATUS_ACTIVE
_GRANTEE_KINDS = {
    Kind.PRINCIPAL_KIND_PRACTITIONER,
    Kind.PRINCIPAL_KIND_ORGANIZATION,
    Kind.PRINCIPAL_KIND_RESEARCHER,
    Kind.PRINCIPAL_KIND_SERVICE,
}
_GUARDIAN_KINDS = {Kind.PRINCIPAL_KIND_PATIENT, Kind.PRINCIPAL_KIND_PRACTITIONER, Kind.PRINCIPAL_KIND_RESEARCHER}
# Who sees any patient's consents.
_OVERSEERS = ("admin", "privacy-officer", "auditor")
MAX_PAGE_SIZE = 1000
# Versions are stored as 32-bit integers: none is larger.
MAX_VERSION = 2**31 - 1


# Commands.


@dataclass(frozen=True)
class GrantConsent:
    """A new consent of the patient for the grantee; each code list empty for "all"; no start:
    from now; no end: open-ended."""

    patient_id: str
    grantee_id: str
    provision: int
    actions: tuple[int, ...] = ()
    categories: tuple[int, ...] = ()
    purposes: tuple[int, ...] = ()
    period_start: float | None = None
    period_end: float | None = None


@dataclass(frozen=True)
class RevokeConsent:
    consent_id: str


@dataclass(frozen=True)
class GetConsent:
    """One version of a consent (0: the latest)."""

    consent_id: str
    version: int = 0


@dataclass(frozen=True)
class ListConsents:
    """The latest versions of a patient's consents, or of those naming a grantee (one of the two)."""

    patient_id: str = ""
    grantee_id: str = ""
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class ChangeGuardian:
    patient_id: str
    guardian_id: str


# Results.


@dataclass(frozen=True)
class Recorded:
    """A consent version as recorded, with its salt (for the grantor) and its FHIR form."""

    version: domain.ConsentVersion
    salt: bytes
    fhir_consent_json: str


@dataclass(frozen=True)
class ConsentRead:
    """A consent version; the salt only for the patient and admins (else empty)."""

    version: domain.ConsentVersion
    fhir_consent_json: str
    salt: bytes = b""


@dataclass(frozen=True)
class ConsentPage:
    versions: list[domain.ConsentVersion]
    next_page_token: str
    # Each version's FHIR Consent, in order: what GetConsent gives for it.
    fhir_consent_json: list[str]


@dataclass(frozen=True)
class Guardianship:
    patient_id: str
    guardian_id: str
    active: bool
    changed_by: str
    changed_at: float


async def acts_for(db: Database, caller: Caller, patient_id: str, conn: AsyncConnection | None = None) -> bool:
    """The patient, an admin, or a guardian the patient appointed who holds the guardian role."""
    if domain.may_manage(caller, patient_id):
        return True
    if not caller.has_role("guardian"):
        return False
    if conn is not None:
        return await storage.is_guardian(conn, patient_id, caller.principal_id)
    async with db.connect() as own:
        return await storage.is_guardian(own, patient_id, caller.principal_id)


class ConsentDesk:
    """Consents' and guardians' use cases; versions join `index` as soon as they commit (other
    replicas add them from their events)."""

    def __init__(
        self,
        db: Database,
        index: domain.ConsentIndex,
        notify: Callable[[], None],
        *,
        source: str = "medledger.consent",
    ) -> None:
        self.db = db
        self.index = index
        self.source = source
        # Writes without a transaction of the caller's: committed, then the relay woken.
        self.transaction = Transaction(db, notify)

    async def _write_versions(
        self, write: Write[Recorded], transaction: RunWrite[Recorded, Any] | None, recorded: list[domain.ConsentVersion]
    ) -> Any:
        return await write_then_index(transaction or self.transaction, write, recorded, self.index.add)

    async def _record_version(self, conn: AsyncConnection, v: domain.ConsentVersion) -> Recorded:
        salt = domain.new_salt()
        document = fhir.fhir_consent(v)
        v = replace(v, commitment=fhir.commitment(document, salt))
        await storage.insert_version(conn, v, salt)
        event = new_event(
            source=self.source,
            payload=consent_events_pb2.ConsentVersionRecorded(
                consent_id=v.consent_id,
                version=v.version,
                patient_id=v.patient_id,
                grantee_id=v.grantee_id,
                revoked=v.status == domain.INACTIVE,
                commitment=v.commitment,
                period_start=timestamp(v.period_start),
                period_end=timestamp(v.period_end) if v.period_end is not None else None,
                provision=pb.ProvisionType.Name(v.provision),  # type: ignore[arg-type]
                actions=sorted(v.actions),  # type: ignore[arg-type]
                categories=sorted(v.categories),  # type: ignore[arg-type]
                purposes=sorted(v.purposes),  # type: ignore[arg-type]
                recorded_at=timestamp(v.recorded_at),
            ),
            aggregate_id=v.consent_id,
            version=v.version,
            subject=v.patient_id,
        )
        await enqueue(conn, TOPICS["consent"], event, key=v.patient_id.encode())
        return Recorded(v, salt, fhir.fhir_json(document))

    # -- grant and revoke -----------------------------------------------------------------------

    @overload
    async def grant(self, caller: Caller, command: GrantConsent) -> Recorded: ...

    @overload
    async def grant(self, caller: Caller, command: GrantConsent, transaction: RunWrite[Recorded, T]) -> T: ...

    async def grant(
        self, caller: Caller, command: GrantConsent, transaction: RunWrite[Recorded, Any] | None = None
    ) -> Any:
        """Record version 1 of a new consent. Its fields are checked before any transaction; who
        may grant and the principals, inside it."""
        now = time.time()
        c = command
        start, end = domain.check_grant(
            c.patient_id,
            c.grantee_id,
            c.provision,
            c.actions,
            c.categories,
            c.purposes,
            c.period_start,
            c.period_end,
            now,
        )
        recorded: list[domain.ConsentVersion] = []

        async def write(conn: AsyncConnection) -> Recorded:
            if not await acts_for(self.db, caller, c.patient_id, conn):
                raise PermissionDenied("only the patient, their guardian or an admin grants their consent")
            patient = await storage.get_principal(conn, c.patient_id)
            if patient is None or patient.kind != Kind.PRINCIPAL_KIND_PATIENT:
                raise InvalidArgument.field("patient_id", "not a registered patient")
            grantee = await storage.get_principal(conn, c.grantee_id)
            if grantee is None or grantee.kind not in _GRANTEE_KINDS:
                raise InvalidArgument.field(
                    "grantee_id", "not a registered practitioner, organization, researcher or service"
                )
            if grantee.status != PRINCIPAL_ACTIVE:
                raise InvalidArgument.field("grantee_id", "the grantee is deactivated")
            version = domain.ConsentVersion(
                consent_id=domain.new_consent_id(),
                version=1,
                patient_id=c.patient_id,
                grantee_id=c.grantee_id,
                provision=c.provision,
                actions=frozenset(c.actions),
                categories=frozenset(c.categories),
                purposes=frozenset(c.purposes),
                period_start=start,
                period_end=end,
                status=domain.ACTIVE,
                recorded_by=caller.principal_id,
                recorded_at=now,
            )
            out = await self._record_version(conn, version)
            recorded.append(out.version)
            return out

        return await self._write_versions(write, transaction, recorded)

    @overload
    async def revoke(self, caller: Caller, command: RevokeConsent) -> Recorded: ...

    @overload
    async def revoke(self, caller: Caller, command: RevokeConsent, transaction: RunWrite[Recorded, T]) -> T: ...

    async def revoke(
        self, caller: Caller, command: RevokeConsent, transaction: RunWrite[Recorded, Any] | None = None
    ) -> Any:
        """Record a revoked version of the consent; revoking a revoked consent returns its latest."""
        recorded: list[domain.ConsentVersion] = []

        async def write(conn: AsyncConnection) -> Recorded:
            found = await storage.get_version(conn, command.consent_id, for_update=True)
            if found is None:
                raise NotFound("no such consent")
            latest, salt = found
            if not await acts_for(self.db, caller, latest.patient_id, conn):
                raise PermissionDenied("only the patient, their guardian or an admin revokes their consent")
            if latest.status == domain.INACTIVE:
                return Recorded(latest, salt, fhir.fhir_json(fhir.fhir_consent(latest)))
            revoked = replace(
                latest,
                version=latest.version + 1,
                status=domain.INACTIVE,
                recorded_by=caller.principal_id,
                recorded_at=time.time(),
                commitment="",
            )
            out = await self._record_version(conn, revoked)
            recorded.append(out.version)
            return out

        return await self._write_versions(write, transaction, recorded)

    # -- reading --------------------------------------------------------------------------------

    async def get(self, caller: Caller, command: GetConsent) -> ConsentRead:
        if command.version < 0:
            raise InvalidArgument.field("version", "0 for the latest, or a version number")
        if command.version > MAX_VERSION:
            raise NotFound("no such consent version")
        async with self.db.connect() as conn:
            found = await storage.get_version(conn, command.consent_id, command.version)
        if found is None:
            raise NotFound("no such consent version")
        v, salt = found
        overseer = any(caller.has_role(r) for r in _OVERSEERS)
        if not (overseer or caller.principal_id in (v.patient_id, v.grantee_id)):
            # The same answer as a missing consent: ids must not reveal whom a patient sees.
            raise NotFound("no such consent version")
        document = fhir.fhir_json(fhir.fhir_consent(v))
        return ConsentRead(v, document, salt if domain.may_manage(caller, v.patient_id) else b"")

    async def list(self, caller: Caller, command: ListConsents) -> ConsentPage:
        if bool(command.patient_id) == bool(command.grantee_id):
            raise InvalidArgument.field("patient_id", "give a patient_id or a grantee_id, not both")
        if not any(caller.has_role(r) for r in _OVERSEERS) and caller.principal_id not in (
            command.patient_id,
            command.grantee_id,
        ):
            raise PermissionDenied("principals list their own consents; overseers list anyone's")
        if command.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        size = min(command.page_size or 100, MAX_PAGE_SIZE)
        async with self.db.connect() as conn:
            versions = await storage.latest_versions(
                conn,
                patient_id=command.patient_id,
                grantee_id=command.grantee_id,
                after=command.page_token,
                limit=size + 1,
            )
        more = len(versions) > size
        versions = versions[:size]
        documents = [fhir.fhir_json(fhir.fhir_consent(v)) for v in versions]
        return ConsentPage(versions, versions[-1].consent_id if more else "", documents)

    # -- guardians ------------------------------------------------------------------------------

    @overload
    async def appoint_guardian(self, caller: Caller, command: ChangeGuardian) -> Guardianship: ...

    @overload
    async def appoint_guardian(
        self, caller: Caller, command: ChangeGuardian, transaction: RunWrite[Guardianship, T]
    ) -> T: ...

    async def appoint_guardian(
        self, caller: Caller, command: ChangeGuardian, transaction: RunWrite[Guardianship, Any] | None = None
    ) -> Any:
        return await self._change_guardianship(caller, command, True, transaction)

    @overload
    async def remove_guardian(self, caller: Caller, command: ChangeGuardian) -> Guardianship: ...

    @overload
    async def remove_guardian(
        self, caller: Caller, command: ChangeGuardian, transaction: RunWrite[Guardianship, T]
    ) -> T: ...

    async def remove_guardian(
        self, caller: Caller, command: ChangeGuardian, transaction: RunWrite[Guardianship, Any] | None = None
    ) -> Any:
        return await self._change_guardianship(caller, command, False, transaction)

    async def _change_guardianship(
        self, caller: Caller, command: ChangeGuardian, active: bool, transaction: RunWrite[Guardianship, Any] | None
    ) -> Any:
        patient_id, guardian_id = command.patient_id, command.guardian_id
        if not domain.may_manage(caller, patient_id):
            raise PermissionDenied("only the patient, or an admin for them, appoints or removes a guardian")
        if not guardian_id:
            raise InvalidArgument.field("guardian_id", "required")
        if guardian_id == patient_id:
            raise InvalidArgument.field("guardian_id", "a patient is not their own guardian")

        async def write(conn: AsyncConnection) -> Guardianship:
            patient = await storage.get_principal(conn, patient_id)
            if patient is None or patient.kind != Kind.PRINCIPAL_KIND_PATIENT:
                raise InvalidArgument.field("patient_id", "not a registered patient")
            guardian = await storage.get_principal(conn, guardian_id)
            if guardian is None or guardian.kind not in _GUARDIAN_KINDS:
                raise InvalidArgument.field("guardian_id", "not a registered patient, practitioner or researcher")
            now = time.time()
            await storage.set_guardianship(conn, patient_id, guardian_id, active, caller.principal_id, now)
            event = new_event(
                source=self.source,
                payload=consent_events_pb2.GuardianshipChanged(
                    patient_id=patient_id,
                    guardian_id=guardian_id,
                    active=active,
                    changed_by=caller.principal_id,
                ),
                aggregate_id=f"{patient_id}/{guardian_id}",
                version=int(now * 1000),
                subject=patient_id,
            )
            await enqueue(conn, TOPICS["consent"], event, key=patient_id.encode())
            return Guardianship(patient_id, guardian_id, active, caller.principal_id, now)

        return await (transaction or self.transaction)(write)
