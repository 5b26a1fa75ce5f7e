"""The gRPC API of consent: medledger.consent.v1.ConsentService.

Checks decide on this replica's in-memory index (ConsentIndex) and record every decision
before answering (DecisionLog, group-committed). Grants and revocations are new consent
versions, written with their event in one transaction and added to the index at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import grpc
from medledger.consent.v1 import consent_service_pb2 as pb
from medledger.consent.v1 import consent_service_pb2_grpc as pb_grpc
from medledger.events.v1 import consent_events_pb2
from medledger.types.v1 import vocabulary_pb2
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_consent import domain, storage
from medledger_consent.break_glass import BreakGlassDesk
from medledger_consent.writes import write_once
from medledger_runtime.auth import ANY_CALLER, Access, Caller, current_caller
from medledger_runtime.errors import InvalidArgument, NotFound, PermissionDenied
from medledger_runtime.events import TOPICS, new_event
from medledger_runtime.idempotency import run_idempotent
from medledger_runtime.outbox import enqueue
from medledger_runtime.service import ServiceRuntime
from medledger_runtime.timestamps import timestamp

Kind = vocabulary_pb2.PrincipalKind
PRINCIPAL_ACTIVE = vocabulary_pb2.PrincipalStatus.PRINCIPAL_STATUS_ACTIVE
_GRANTEE_KINDS = {
    Kind.PRINCIPAL_KIND_PRACTITIONER,
    Kind.PRINCIPAL_KIND_ORGANIZATION,
    Kind.PRINCIPAL_KIND_RESEARCHER,
    Kind.PRINCIPAL_KIND_SERVICE,
}

_SERVICE = "/medledger.consent.v1.ConsentService/"
PUBLIC_METHODS: tuple[str, ...] = ()
# The coarse table; keep it equal to services/consent/README.md (a test compares them).
ACCESS: dict[str, Access] = {
    _SERVICE + "GrantConsent": ANY_CALLER,
    _SERVICE + "RevokeConsent": ANY_CALLER,
    _SERVICE + "GetConsent": ANY_CALLER,
    _SERVICE + "ListConsents": ANY_CALLER,
    _SERVICE + "CheckConsent": Access.of(roles=["pdp-client", "guardian"], kinds=["patient"]),
    _SERVICE + "AppointGuardian": ANY_CALLER,
    _SERVICE + "RemoveGuardian": ANY_CALLER,
    _SERVICE + "SetBreakGlassPolicy": Access.of(roles=["admin", "org-admin"]),
    _SERVICE + "GetBreakGlassPolicy": ANY_CALLER,
    _SERVICE + "BreakGlass": Access.of(kinds=["practitioner"]),
    _SERVICE + "ListBreakGlassAccesses": Access.of(roles=["admin", "privacy-officer", "auditor"]),
    _SERVICE + "GetBreakGlassAccess": Access.of(roles=["admin", "privacy-officer"]),
    _SERVICE + "ReviewBreakGlassAccess": Access.of(roles=["privacy-officer"]),
}
# Who sees any patient's consents.
_OVERSEERS = ("admin", "privacy-officer", "auditor")
MAX_PAGE_SIZE = 1000
# Versions are stored as 32-bit integers: none is larger.
MAX_VERSION = 2**31 - 1
INDEX_REPAIRS = Counter(
    "medledger_consent_index_repairs_total",
    "Consent versions and break-glass accesses this replica's index got from the database, not from their event.",
)


DECISIONS = Counter(
    "medledger_consent_decisions_total",
    "Consent decisions made (CheckConsent), by decision and reason code: permits, denials, no consent.",
    ["decision", "reason_code"],
)
# Each (decision, reason code) counter looked up once, here: CheckConsent is the hot path.
_DECISION_COUNTERS = {
    (getattr(pb.Decision, f"DECISION_{decision}"), code): DECISIONS.labels(decision, code)
    for decision, code in domain.DECISION_CODES
}


def to_proto(v: domain.ConsentVersion) -> pb.Consent:
    consent = pb.Consent(
        consent_id=v.consent_id,
        version=v.version,
        patient_id=v.patient_id,
        grantee_id=v.grantee_id,
        provision=v.provision,  # type: ignore[arg-type]
        actions=sorted(v.actions),  # type: ignore[arg-type]
        categories=sorted(v.categories),  # type: ignore[arg-type]
        purposes=sorted(v.purposes),  # type: ignore[arg-type]
        period_start=timestamp(v.period_start),
        status=v.status,  # type: ignore[arg-type]
        recorded_by=v.recorded_by,
        recorded_at=timestamp(v.recorded_at),
        commitment=v.commitment,
    )
    if v.period_end is not None:
        consent.period_end.CopyFrom(timestamp(v.period_end))
    return consent


def may_manage(caller: Caller, patient_id: str) -> bool:
    """The patient, or an admin acting for them (guardians: see ConsentApi.acts_for)."""
    return caller.principal_id == patient_id or caller.has_role("admin")


_GUARDIAN_KINDS = {Kind.PRINCIPAL_KIND_PATIENT, Kind.PRINCIPAL_KIND_PRACTITIONER, Kind.PRINCIPAL_KIND_RESEARCHER}


class ConsentApi(pb_grpc.ConsentServiceServicer):
    def __init__(
        self,
        runtime: ServiceRuntime,
        index: domain.ConsentIndex,
        log: storage.DecisionLog,
        break_glass: BreakGlassDesk,
    ) -> None:
        self.rt = runtime
        self.index = index
        self.log = log
        self.break_glass = break_glass
        self._loaded_until = 0.0
        # A practitioner's organization never changes in identity: remembered once read.
        self._organization_of: dict[str, str] = {}

    async def acts_for(self, caller: Caller, patient_id: str, conn: AsyncConnection | None = None) -> bool:
        """The patient, an admin, or a guardian the patient appointed who holds the guardian role."""
        if may_manage(caller, patient_id):
            return True
        if not caller.has_role("guardian"):
            return False
        if conn is not None:
            return await storage.is_guardian(conn, patient_id, caller.principal_id)
        async with self.rt.db.connect() as own:
            return await storage.is_guardian(own, patient_id, caller.principal_id)

    async def load_index(self) -> None:
        started = time.time()
        async with self.rt.db.connect() as conn:
            for v in await storage.all_versions(conn):
                self.index.add(v)
            for a in await storage.accesses_running_after(conn, started - 60):
                self.index.put_break_glass(a)
        self._loaded_until = started

    async def reconcile_index(self, every_seconds: float = 2.0, overlap_seconds: float = 10.0) -> None:
        """Read recently recorded versions from the database now and then: events keep the index
        current within milliseconds, and this keeps it right should one ever not arrive. The
        overlap covers transactions that commit after the time they recorded."""
        while True:
            await asyncio.sleep(every_seconds)
            started = time.time()
            async with self.rt.db.connect() as conn:
                since = self._loaded_until - overlap_seconds
                for v in await storage.versions_recorded_since(conn, since):
                    if self.index.add(v):
                        INDEX_REPAIRS.inc()
                for a in await storage.accesses_changed_since(conn, since):
                    if self.index.put_break_glass(a):
                        INDEX_REPAIRS.inc()
            self._loaded_until = started

    async def _record_version(
        self, conn: AsyncConnection, v: domain.ConsentVersion
    ) -> tuple[domain.ConsentVersion, bytes, str]:
        salt = domain.new_salt()
        document = domain.fhir_consent(v)
        v = replace(v, commitment=domain.commitment(document, salt))
        await storage.insert_version(conn, v, salt)
        event = new_event(
            source=self.rt.source,
            payload=consent_events_pb2.ConsentVersionRecorded(
                consent_id=v.consent_id,
                version=v.version,
                patient_id=v.patient_id,
                grantee_id=v.grantee_id,
                revoked=v.status == domain.INACTIVE,
                commitment=v.commitment,
                period_start=timestamp(v.period_start),
                period_end=timestamp(v.period_end) if v.period_end is not None else None,
            ),
            aggregate_id=v.consent_id,
            version=v.version,
            subject=v.patient_id,
        )
        await enqueue(conn, TOPICS["consent"], event, key=v.patient_id.encode())
        return v, salt, domain.fhir_json(document)

    async def GrantConsent(
        self, request: pb.GrantConsentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GrantConsentResponse:
        caller = current_caller()
        now = time.time()
        start, end = domain.check_grant(request, now)

        async def work(conn: AsyncConnection, recorded: list[domain.ConsentVersion]) -> pb.GrantConsentResponse:
            if not await self.acts_for(caller, request.patient_id, conn):
                raise PermissionDenied("only the patient, their guardian or an admin grants their consent")
            patient = await storage.get_principal(conn, request.patient_id)
            if patient is None or patient.kind != Kind.PRINCIPAL_KIND_PATIENT:
                raise InvalidArgument.field("patient_id", "not a registered patient")
            grantee = await storage.get_principal(conn, request.grantee_id)
            if grantee is None or grantee.kind not in _GRANTEE_KINDS:
                raise InvalidArgument.field(
                    "grantee_id", "not a registered practitioner, organization, researcher or service"
                )
            if grantee.status != PRINCIPAL_ACTIVE:
                raise InvalidArgument.field("grantee_id", "the grantee is deactivated")
            version = domain.ConsentVersion(
                consent_id=domain.new_consent_id(),
                version=1,
                patient_id=request.patient_id,
                grantee_id=request.grantee_id,
                provision=request.provision,
                actions=frozenset(request.actions),
                categories=frozenset(request.categories),
                purposes=frozenset(request.purposes),
                period_start=start,
                period_end=end,
                status=domain.ACTIVE,
                recorded_by=caller.principal_id,
                recorded_at=now,
            )
            v, salt, document = await self._record_version(conn, version)
            recorded.append(v)
            return pb.GrantConsentResponse(consent=to_proto(v), salt=salt, fhir_consent_json=document)

        response, _ = await write_once(
            self.rt,
            self.index,
            scope="consent.GrantConsent",
            request=request,
            response_cls=pb.GrantConsentResponse,
            work=work,
        )
        return response

    async def RevokeConsent(
        self, request: pb.RevokeConsentRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeConsentResponse:
        caller = current_caller()

        async def work(conn: AsyncConnection, recorded: list[domain.ConsentVersion]) -> pb.RevokeConsentResponse:
            found = await storage.get_version(conn, request.consent_id, for_update=True)
            if found is None:
                raise NotFound("no such consent")
            latest, salt = found
            if not await self.acts_for(caller, latest.patient_id, conn):
                raise PermissionDenied("only the patient, their guardian or an admin revokes their consent")
            if latest.status == domain.INACTIVE:
                return pb.RevokeConsentResponse(
                    consent=to_proto(latest), salt=salt, fhir_consent_json=domain.fhir_json(domain.fhir_consent(latest))
                )
            revoked = replace(
                latest,
                version=latest.version + 1,
                status=domain.INACTIVE,
                recorded_by=caller.principal_id,
                recorded_at=time.time(),
                commitment="",
            )
            v, new_salt, document = await self._record_version(conn, revoked)
            recorded.append(v)
            return pb.RevokeConsentResponse(consent=to_proto(v), salt=new_salt, fhir_consent_json=document)

        response, _ = await write_once(
            self.rt,
            self.index,
            scope="consent.RevokeConsent",
            request=request,
            response_cls=pb.RevokeConsentResponse,
            work=work,
        )
        return response

    async def GetConsent(
        self, request: pb.GetConsentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetConsentResponse:
        caller = current_caller()
        if request.version < 0:
            raise InvalidArgument.field("version", "0 for the latest, or a version number")
        if request.version > MAX_VERSION:
            raise NotFound("no such consent version")
        async with self.rt.db.connect() as conn:
            found = await storage.get_version(conn, request.consent_id, request.version)
        if found is None:
            raise NotFound("no such consent version")
        v, salt = found
        overseer = any(caller.has_role(r) for r in _OVERSEERS)
        if not (overseer or caller.principal_id in (v.patient_id, v.grantee_id)):
            # The same answer as a missing consent: ids must not reveal whom a patient sees.
            raise NotFound("no such consent version")
        response = pb.GetConsentResponse(
            consent=to_proto(v), fhir_consent_json=domain.fhir_json(domain.fhir_consent(v))
        )
        if may_manage(caller, v.patient_id):
            response.salt = salt
        return response

    async def ListConsents(
        self, request: pb.ListConsentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListConsentsResponse:
        caller = current_caller()
        if bool(request.patient_id) == bool(request.grantee_id):
            raise InvalidArgument.field("patient_id", "give a patient_id or a grantee_id, not both")
        if not any(caller.has_role(r) for r in _OVERSEERS) and caller.principal_id not in (
            request.patient_id,
            request.grantee_id,
        ):
            raise PermissionDenied("principals list their own consents; overseers list anyone's")
        if request.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        size = min(request.page_size or 100, MAX_PAGE_SIZE)
        async with self.rt.db.connect() as conn:
            versions = await storage.latest_versions(
                conn,
                patient_id=request.patient_id,
                grantee_id=request.grantee_id,
                after=request.page_token,
                limit=size + 1,
            )
        more = len(versions) > size
        versions = versions[:size]
        return pb.ListConsentsResponse(
            consents=[to_proto(v) for v in versions], next_page_token=versions[-1].consent_id if more else ""
        )

    async def _organization(self, actor_id: str) -> str:
        organization = self._organization_of.get(actor_id)
        if organization is None:
            async with self.rt.db.connect() as conn:
                known = await storage.get_principal(conn, actor_id)
            if known is None:
                return ""  # not known (yet): no organization grant can cover it
            organization = self._organization_of[actor_id] = known.organization_id
        return organization

    async def CheckConsent(
        self, request: pb.CheckConsentRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckConsentResponse:
        domain.check_question(request)
        caller = current_caller()
        if not caller.has_role("pdp-client") and not await self.acts_for(caller, request.patient_id):
            # A patient (or their guardian) asks about themselves only: checks must not reveal
            # whom others see.
            raise PermissionDenied("a patient may check consents about themselves only")
        question = domain.Question(
            patient_id=request.patient_id,
            actor_id=request.actor_id,
            actor_organization_id=await self._organization(request.actor_id),
            action=request.action,
            category=request.category,
            purpose=request.purpose,
            now=time.time(),
        )
        outcome = self.index.decide(question)
        decision_id = domain.new_decision_id()
        deciding = [f"{cid}@{ver}" for cid, ver in outcome.deciding]
        decision_name = pb.Decision.Name(outcome.decision)  # type: ignore[arg-type]
        event = new_event(
            source=self.rt.source,
            payload=consent_events_pb2.ConsentDecisionRecorded(
                decision_id=decision_id,
                patient_id=question.patient_id,
                actor_id=question.actor_id,
                action=question.action,  # type: ignore[arg-type]
                category=question.category,  # type: ignore[arg-type]
                purpose=question.purpose,  # type: ignore[arg-type]
                decided_at=timestamp(question.now),
                decision=decision_name,
                reason_code=outcome.reason_code,
                deciding=deciding,
                rule_version=domain.RULE_VERSION,
                break_glass_access_id=outcome.break_glass_access_id,
            ),
            aggregate_id=decision_id,
            version=1,
            subject=question.patient_id,
        )
        await self.log.record(
            {
                "decision_id": decision_id,
                "decided_at": question.now,
                "patient_id": question.patient_id,
                "actor_id": question.actor_id,
                "action": question.action,
                "category": question.category,
                "purpose": question.purpose,
                "decision": outcome.decision,
                "reason_code": outcome.reason_code,
                "deciding": " ".join(deciding),
                "break_glass_access_id": outcome.break_glass_access_id,
                "rule_version": domain.RULE_VERSION,
            },
            event,
        )
        counter = _DECISION_COUNTERS.get((outcome.decision, outcome.reason_code))
        if counter is None:  # a pair DECISION_CODES lacks (the property test keeps this from happening)
            counter = DECISIONS.labels(decision_name.removeprefix("DECISION_"), outcome.reason_code)
        counter.inc()
        return pb.CheckConsentResponse(
            decision=outcome.decision,  # type: ignore[arg-type]
            decision_id=decision_id,
            reason=outcome.reason,
            reason_code=outcome.reason_code,
            deciding=[pb.ConsentRef(consent_id=c, version=v) for c, v in outcome.deciding],
            rule_version=domain.RULE_VERSION,
            decided_at=timestamp(question.now),
            break_glass_access_id=outcome.break_glass_access_id,
        )

    async def _change_guardianship(
        self, request: pb.AppointGuardianRequest | pb.RemoveGuardianRequest, active: bool
    ) -> pb.Guardianship:
        caller = current_caller()
        if not may_manage(caller, request.patient_id):
            raise PermissionDenied("only the patient, or an admin for them, appoints or removes a guardian")
        if not request.guardian_id:
            raise InvalidArgument.field("guardian_id", "required")
        if request.guardian_id == request.patient_id:
            raise InvalidArgument.field("guardian_id", "a patient is not their own guardian")
        response_cls = pb.AppointGuardianResponse if active else pb.RemoveGuardianResponse

        async def work(conn: AsyncConnection) -> pb.AppointGuardianResponse | pb.RemoveGuardianResponse:
            patient = await storage.get_principal(conn, request.patient_id)
            if patient is None or patient.kind != Kind.PRINCIPAL_KIND_PATIENT:
                raise InvalidArgument.field("patient_id", "not a registered patient")
            guardian = await storage.get_principal(conn, request.guardian_id)
            if guardian is None or guardian.kind not in _GUARDIAN_KINDS:
                raise InvalidArgument.field("guardian_id", "not a registered patient, practitioner or researcher")
            now = time.time()
            await storage.set_guardianship(
                conn, request.patient_id, request.guardian_id, active, caller.principal_id, now
            )
            event = new_event(
                source=self.rt.source,
                payload=consent_events_pb2.GuardianshipChanged(
                    patient_id=request.patient_id,
                    guardian_id=request.guardian_id,
                    active=active,
                    changed_by=caller.principal_id,
                ),
                aggregate_id=f"{request.patient_id}/{request.guardian_id}",
                version=int(now * 1000),
                subject=request.patient_id,
            )
            await enqueue(conn, TOPICS["consent"], event, key=request.patient_id.encode())
            return response_cls(
                guardianship=pb.Guardianship(
                    patient_id=request.patient_id,
                    guardian_id=request.guardian_id,
                    active=active,
                    changed_by=caller.principal_id,
                    changed_at=timestamp(now),
                )
            )

        response = await run_idempotent(
            self.rt.db,
            scope="consent.AppointGuardian" if active else "consent.RemoveGuardian",
            request_id=request.request_id,
            request=request,
            response_cls=response_cls,
            work=work,
            after_commit=self.rt.relay.notify,
        )
        guardianship: pb.Guardianship = response.guardianship  # type: ignore[attr-defined]
        return guardianship

    async def AppointGuardian(
        self, request: pb.AppointGuardianRequest, context: grpc.aio.ServicerContext
    ) -> pb.AppointGuardianResponse:
        return pb.AppointGuardianResponse(guardianship=await self._change_guardianship(request, active=True))

    async def RemoveGuardian(
        self, request: pb.RemoveGuardianRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveGuardianResponse:
        return pb.RemoveGuardianResponse(guardianship=await self._change_guardianship(request, active=False))

    # -- break-glass (medledger_consent.break_glass) ---------------------------------------------

    async def SetBreakGlassPolicy(
        self, request: pb.SetBreakGlassPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetBreakGlassPolicyResponse:
        return await self.break_glass.set_policy(request)

    async def GetBreakGlassPolicy(
        self, request: pb.GetBreakGlassPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetBreakGlassPolicyResponse:
        return await self.break_glass.get_policy(request)

    async def BreakGlass(
        self, request: pb.BreakGlassRequest, context: grpc.aio.ServicerContext
    ) -> pb.BreakGlassResponse:
        return await self.break_glass.break_glass(request)

    async def ListBreakGlassAccesses(
        self, request: pb.ListBreakGlassAccessesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListBreakGlassAccessesResponse:
        return await self.break_glass.list_accesses(request)

    async def GetBreakGlassAccess(
        self, request: pb.GetBreakGlassAccessRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetBreakGlassAccessResponse:
        return await self.break_glass.get_access(request)

    async def ReviewBreakGlassAccess(
        self, request: pb.ReviewBreakGlassAccessRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReviewBreakGlassAccessResponse:
        return await self.break_glass.review(request)
