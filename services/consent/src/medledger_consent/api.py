"""The gRPC API of consent: medledger.consent.v1.ConsentService.

Each RPC parses its request into a command (or, for the hot CheckConsent, the plain values) of
the use cases, calls them with the caller, and maps the result to its response: consents and
guardians in ``consents.py``, checks in ``checks.py``, break-glass in ``break_glass.py``. Their
errors become statuses at the runtime's boundary (medledger_runtime.errors). Idempotency stays
here (see :meth:`ConsentApi._once`): what it keys and keeps is the wire's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import grpc
from google.protobuf import message as pb_message
from medledger.consent.v1 import consent_service_pb2 as pb
from medledger.consent.v1 import consent_service_pb2_grpc as pb_grpc

from medledger_consent import break_glass_rules, domain
from medledger_consent.break_glass import BreakGlassDesk
from medledger_consent.break_glass_commands import (
    BreakGlass,
    ListBreakGlassAccesses,
    ReviewBreakGlassAccess,
    SetBreakGlassPolicy,
)
from medledger_consent.checks import ConsentChecks
from medledger_consent.consents import (
    ChangeGuardian,
    ConsentDesk,
    GetConsent,
    GrantConsent,
    Guardianship,
    ListConsents,
    Recorded,
    RevokeConsent,
)
from medledger_consent.writes import RunWrite
from medledger_runtime.auth import ANY_CALLER, Access, ScopeNeed, current_caller, patient_id_field
from medledger_runtime.idempotency import once_per_request
from medledger_runtime.service import ServiceRuntime
from medledger_runtime.timestamps import duration, seconds, timestamp

_SERVICE = "/medledger.consent.v1.ConsentService/"
PUBLIC_METHODS: tuple[str, ...] = ()
# The coarse table; keep it equal to services/consent/README.md (a test compares them).
ACCESS: dict[str, Access] = {
    _SERVICE + "GrantConsent": ANY_CALLER,
    _SERVICE + "RevokeConsent": ANY_CALLER,
    _SERVICE + "GetConsent": ANY_CALLER,
    _SERVICE + "ListConsents": ANY_CALLER,
    _SERVICE + "CheckConsent": Access.of(roles=["pdp-client", "guardian"], kinds=["patient"]),
    # Who may read which decision is the use case's: the patient's side, the actor, overseers.
    _SERVICE + "GetDecision": ANY_CALLER,
    _SERVICE + "AppointGuardian": ANY_CALLER,
    _SERVICE + "RemoveGuardian": ANY_CALLER,
    _SERVICE + "SetBreakGlassPolicy": Access.of(roles=["admin", "org-admin"]),
    _SERVICE + "GetBreakGlassPolicy": ANY_CALLER,
    _SERVICE + "BreakGlass": Access.of(kinds=["practitioner"]),
    _SERVICE + "ListBreakGlassAccesses": Access.of(roles=["admin", "privacy-officer", "auditor"]),
    _SERVICE + "GetBreakGlassAccess": Access.of(roles=["admin", "privacy-officer"]),
    _SERVICE + "ReviewBreakGlassAccess": Access.of(roles=["privacy-officer"]),
}
R = TypeVar("R")
Response = TypeVar("Response", bound=pb_message.Message)
# What a token with SMART scopes needs (medledger_runtime.auth.scopes); any RPC not here refuses
# such a token. The decision point (CheckConsent, GetDecision) serves services with unscoped
# tokens; guardianship and break-glass are not FHIR Consent interactions. Revoke and Get name no
# patient: the use cases' own rules (the patient's side, the grantee) bound them.
# Keep it equal to the README's scopes table.
SCOPES: dict[str, ScopeNeed] = {
    _SERVICE + "GrantConsent": ScopeNeed("Consent", "c", patient=patient_id_field),
    _SERVICE + "RevokeConsent": ScopeNeed("Consent", "u"),
    _SERVICE + "GetConsent": ScopeNeed("Consent", "r"),
    _SERVICE + "ListConsents": ScopeNeed("Consent", "s", patient=patient_id_field),
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


def policy_proto(p: break_glass_rules.BreakGlassPolicy) -> pb.BreakGlassPolicy:
    out = pb.BreakGlassPolicy(
        organization_id=p.organization_id,
        enabled=p.enabled,
        overrides_deny=p.overrides_deny,
        access_duration=duration(p.access_seconds),
        max_uses=p.max_uses,
        rate_window=duration(p.rate_window_seconds),
        changed_by=p.changed_by,
    )
    if p.changed_at:
        out.changed_at.CopyFrom(timestamp(p.changed_at))
    return out


def access_proto(a: domain.BreakGlassAccess) -> pb.BreakGlassAccess:
    out = pb.BreakGlassAccess(
        access_id=a.access_id,
        patient_id=a.patient_id,
        practitioner_id=a.practitioner_id,
        organization_id=a.organization_id,
        reason=a.reason,  # type: ignore[arg-type]
        justification_sha256=a.justification_sha256,
        started_at=timestamp(a.started_at),
        expires_at=timestamp(a.expires_at),
        overrides_deny=a.overrides_deny,
        review=a.review,  # type: ignore[arg-type]
        reviewed_by=a.reviewed_by,
    )
    if a.ended_at is not None:
        out.ended_at.CopyFrom(timestamp(a.ended_at))
    if a.reviewed_at is not None:
        out.reviewed_at.CopyFrom(timestamp(a.reviewed_at))
    return out


def _guardianship(g: Guardianship) -> pb.Guardianship:
    return pb.Guardianship(
        patient_id=g.patient_id,
        guardian_id=g.guardian_id,
        active=g.active,
        changed_by=g.changed_by,
        changed_at=timestamp(g.changed_at),
    )


class ConsentApi(pb_grpc.ConsentServiceServicer):
    def __init__(
        self, runtime: ServiceRuntime, consents: ConsentDesk, checks: ConsentChecks, break_glass: BreakGlassDesk
    ) -> None:
        self.rt = runtime
        self.consents = consents
        self.checks = checks
        self.break_glass = break_glass

    def _once(
        self,
        scope: str,
        request: pb_message.Message,
        response_cls: type[Response],
        respond: Callable[[R], Response],
    ) -> RunWrite[R, Response]:
        """The transaction of a mutating RPC's write: once per request id (see
        ``idempotency.once_per_request``)."""
        return once_per_request(
            self.rt.db,
            scope=scope,
            request=request,
            response_cls=response_cls,
            respond=respond,
            after_commit=self.rt.relay.notify,
        )

    # -- consents ---------------------------------------------------------------------------------

    async def GrantConsent(
        self, request: pb.GrantConsentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GrantConsentResponse:
        command = GrantConsent(
            patient_id=request.patient_id,
            grantee_id=request.grantee_id,
            provision=request.provision,
            actions=tuple(request.actions),
            categories=tuple(request.categories),
            purposes=tuple(request.purposes),
            period_start=seconds(request.period_start) if request.HasField("period_start") else None,
            period_end=seconds(request.period_end) if request.HasField("period_end") else None,
        )

        def respond(r: Recorded) -> pb.GrantConsentResponse:
            return pb.GrantConsentResponse(
                consent=to_proto(r.version), salt=r.salt, fhir_consent_json=r.fhir_consent_json
            )

        once = self._once("consent.GrantConsent", request, pb.GrantConsentResponse, respond)
        return await self.consents.grant(current_caller(), command, once)

    async def RevokeConsent(
        self, request: pb.RevokeConsentRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeConsentResponse:
        def respond(r: Recorded) -> pb.RevokeConsentResponse:
            return pb.RevokeConsentResponse(
                consent=to_proto(r.version), salt=r.salt, fhir_consent_json=r.fhir_consent_json
            )

        once = self._once("consent.RevokeConsent", request, pb.RevokeConsentResponse, respond)
        return await self.consents.revoke(current_caller(), RevokeConsent(consent_id=request.consent_id), once)

    async def GetConsent(
        self, request: pb.GetConsentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetConsentResponse:
        command = GetConsent(consent_id=request.consent_id, version=request.version)
        r = await self.consents.get(current_caller(), command)
        return pb.GetConsentResponse(consent=to_proto(r.version), fhir_consent_json=r.fhir_consent_json, salt=r.salt)

    async def ListConsents(
        self, request: pb.ListConsentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListConsentsResponse:
        command = ListConsents(
            patient_id=request.patient_id,
            grantee_id=request.grantee_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        page = await self.consents.list(current_caller(), command)
        return pb.ListConsentsResponse(
            consents=[to_proto(v) for v in page.versions],
            next_page_token=page.next_page_token,
            fhir_consent_json=page.fhir_consent_json,
        )

    async def CheckConsent(
        self, request: pb.CheckConsentRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckConsentResponse:
        outcome, decision_id, decided_at = await self.checks.check(
            current_caller(), request.patient_id, request.actor_id, request.action, request.category, request.purpose
        )
        return pb.CheckConsentResponse(
            decision=outcome.decision,  # type: ignore[arg-type]
            decision_id=decision_id,
            reason=outcome.reason,
            reason_code=outcome.reason_code,
            deciding=[pb.ConsentRef(consent_id=c, version=v) for c, v in outcome.deciding],
            rule_version=domain.RULE_VERSION,
            decided_at=timestamp(decided_at),
            break_glass_access_id=outcome.break_glass_access_id,
        )

    async def GetDecision(
        self, request: pb.GetDecisionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDecisionResponse:
        d = await self.checks.decision(current_caller(), request.decision_id)
        return pb.GetDecisionResponse(
            decision=pb.ConsentDecision(
                decision_id=d.decision_id,
                patient_id=d.patient_id,
                actor_id=d.actor_id,
                actor_organization_id=d.actor_organization_id,
                action=d.action,  # type: ignore[arg-type]
                category=d.category,  # type: ignore[arg-type]
                purpose=d.purpose,  # type: ignore[arg-type]
                decided_at=timestamp(d.decided_at),
                decision=d.decision,  # type: ignore[arg-type]
                reason_code=d.reason_code,
                deciding=[pb.ConsentRef(consent_id=c, version=v) for c, v in d.deciding],
                rule_version=d.rule_version,
                break_glass_access_id=d.break_glass_access_id,
                considered=d.considered,
            )
        )

    # -- guardians --------------------------------------------------------------------------------

    async def AppointGuardian(
        self, request: pb.AppointGuardianRequest, context: grpc.aio.ServicerContext
    ) -> pb.AppointGuardianResponse:
        def respond(g: Guardianship) -> pb.AppointGuardianResponse:
            return pb.AppointGuardianResponse(guardianship=_guardianship(g))

        once = self._once("consent.AppointGuardian", request, pb.AppointGuardianResponse, respond)
        command = ChangeGuardian(patient_id=request.patient_id, guardian_id=request.guardian_id)
        return await self.consents.appoint_guardian(current_caller(), command, once)

    async def RemoveGuardian(
        self, request: pb.RemoveGuardianRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveGuardianResponse:
        def respond(g: Guardianship) -> pb.RemoveGuardianResponse:
            return pb.RemoveGuardianResponse(guardianship=_guardianship(g))

        once = self._once("consent.RemoveGuardian", request, pb.RemoveGuardianResponse, respond)
        command = ChangeGuardian(patient_id=request.patient_id, guardian_id=request.guardian_id)
        return await self.consents.remove_guardian(current_caller(), command, once)

    # -- break-glass ------------------------------------------------------------------------------

    async def SetBreakGlassPolicy(
        self, request: pb.SetBreakGlassPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetBreakGlassPolicyResponse:
        p = request.policy
        command = SetBreakGlassPolicy(
            organization_id=p.organization_id,
            enabled=p.enabled,
            overrides_deny=p.overrides_deny,
            access_seconds=seconds(p.access_duration) if p.HasField("access_duration") else None,
            max_uses=p.max_uses,
            rate_window_seconds=seconds(p.rate_window) if p.HasField("rate_window") else None,
        )

        def respond(stored: break_glass_rules.BreakGlassPolicy) -> pb.SetBreakGlassPolicyResponse:
            return pb.SetBreakGlassPolicyResponse(policy=policy_proto(stored))

        once = self._once("consent.SetBreakGlassPolicy", request, pb.SetBreakGlassPolicyResponse, respond)
        return await self.break_glass.set_policy(current_caller(), command, once)

    async def GetBreakGlassPolicy(
        self, request: pb.GetBreakGlassPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetBreakGlassPolicyResponse:
        policy = await self.break_glass.get_policy(current_caller(), request.organization_id)
        return pb.GetBreakGlassPolicyResponse(policy=policy_proto(policy))

    async def BreakGlass(
        self, request: pb.BreakGlassRequest, context: grpc.aio.ServicerContext
    ) -> pb.BreakGlassResponse:
        command = BreakGlass(patient_id=request.patient_id, reason=request.reason, justification=request.justification)

        def respond(a: domain.BreakGlassAccess) -> pb.BreakGlassResponse:
            return pb.BreakGlassResponse(access=access_proto(a))

        once = self._once("consent.BreakGlass", request, pb.BreakGlassResponse, respond)
        return await self.break_glass.break_glass(current_caller(), command, once)

    async def ListBreakGlassAccesses(
        self, request: pb.ListBreakGlassAccessesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListBreakGlassAccessesResponse:
        command = ListBreakGlassAccesses(
            organization_id=request.organization_id,
            pending_only=request.pending_only,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        page = await self.break_glass.list_accesses(current_caller(), command)
        return pb.ListBreakGlassAccessesResponse(
            accesses=[access_proto(a) for a in page.accesses], next_page_token=page.next_page_token
        )

    async def GetBreakGlassAccess(
        self, request: pb.GetBreakGlassAccessRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetBreakGlassAccessResponse:
        read = await self.break_glass.get_access(current_caller(), request.access_id)
        return pb.GetBreakGlassAccessResponse(access=access_proto(read.access), justification=read.justification)

    async def ReviewBreakGlassAccess(
        self, request: pb.ReviewBreakGlassAccessRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReviewBreakGlassAccessResponse:
        def respond(a: domain.BreakGlassAccess) -> pb.ReviewBreakGlassAccessResponse:
            return pb.ReviewBreakGlassAccessResponse(access=access_proto(a))

        once = self._once("consent.ReviewBreakGlassAccess", request, pb.ReviewBreakGlassAccessResponse, respond)
        command = ReviewBreakGlassAccess(access_id=request.access_id, review=request.review)
        return await self.break_glass.review(current_caller(), command, once)
