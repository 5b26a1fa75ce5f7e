"""Consent end to end: grants and checks through the API with real tokens, decision records
written before the answer, invalid grants refused with the field, the FHIR export, who may
ask what, and a revocation reaching a second consent replica."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from typing import Any

import grpc
import pytest
from fhir.resources.R4B.consent import Consent as FhirConsent
from google.protobuf.timestamp_pb2 import Timestamp
from medledger.consent.v1 import consent_service_pb2 as pb
from medledger.consent.v1 import consent_service_pb2_grpc as pb_grpc
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab
from sqlalchemy import func, select

from medledger_consent import storage
from medledger_devstack.testing import bad_request_fields, status_of
from medledger_runtime.outbox import outbox
from medledger_sdk.channels import make_channel

Kind = vocab.PrincipalKind
READ, WRITE = vocab.Action.ACTION_READ, vocab.Action.ACTION_WRITE
OBS, MEDS = vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS, vocab.DataCategory.DATA_CATEGORY_MEDICATIONS
TREAT, HRESCH = vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT, vocab.PurposeOfUse.PURPOSE_OF_USE_HRESCH
CODE = grpc.StatusCode


def rid() -> str:
    return str(uuid.uuid4())


def patient_json() -> bytes:
    return json.dumps(
        {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": uuid.uuid4().hex}]}
    ).encode()


def ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


class World:
    """A patient, two doctors of one organization, a pdp-client service, and their clients."""

    async def build(self, stack: Any) -> World:
        self.stack = stack
        self.public = id_grpc.IdentityServiceStub(make_channel(stack.identity_address))
        admin = stack.admin()
        self.admin_identity = id_grpc.IdentityServiceStub(admin.channel(stack.identity_address, "medledger.identity"))
        self.admin_consent = self.consent_as(admin)
        patient = await self.public.RegisterPatient(
            id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=patient_json())
        )
        other = await self.public.RegisterPatient(
            id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=patient_json())
        )
        self.patient_id = patient.principal.principal_id
        self.other_patient_id = other.principal.principal_id
        self.patient = self.consent_as(stack.client(self.patient_id, patient.client_secret))
        self.other_patient = self.consent_as(stack.client(self.other_patient_id, other.client_secret))
        org = await self.register(Kind.PRINCIPAL_KIND_ORGANIZATION)
        self.org_id = org.principal.principal_id
        self.doctor_id = (
            await self.register(
                Kind.PRINCIPAL_KIND_PRACTITIONER, organization_id=self.org_id, fhir_resource=self.practitioner()
            )
        ).principal.principal_id
        self.colleague_id = (
            await self.register(
                Kind.PRINCIPAL_KIND_PRACTITIONER, organization_id=self.org_id, fhir_resource=self.practitioner()
            )
        ).principal.principal_id
        pdp = await self.register(Kind.PRINCIPAL_KIND_SERVICE)
        await self.admin_identity.AssignRole(
            id_pb.AssignRoleRequest(
                request_id=rid(), principal_id=pdp.principal.principal_id, role=vocab.Role.ROLE_PDP_CLIENT
            )
        )
        self.pdp_client = stack.client(pdp.principal.principal_id, pdp.client_secret)
        self.pdp = self.consent_as(self.pdp_client)
        await stack.known_to_consent(
            self.patient_id, self.other_patient_id, self.org_id, self.doctor_id, self.colleague_id
        )
        return self

    def practitioner(self) -> bytes:
        return json.dumps(
            {"resourceType": "Practitioner", "identifier": [{"system": "urn:npi", "value": uuid.uuid4().hex}]}
        ).encode()

    def consent_as(self, client: Any, replica: Any = None) -> pb_grpc.ConsentServiceStub:
        address = f"127.0.0.1:{(replica or self.stack.consent).grpc_port}"
        return pb_grpc.ConsentServiceStub(client.channel(address, "medledger.consent"))

    async def register(self, kind: int, **fields: Any) -> id_pb.RegisterPrincipalResponse:
        return await self.admin_identity.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(request_id=rid(), kind=kind, **fields)
        )

    def grant(self, **fields: Any) -> pb.GrantConsentRequest:
        base: dict[str, Any] = {
            "request_id": rid(),
            "patient_id": self.patient_id,
            "grantee_id": self.doctor_id,
            "provision": pb.ProvisionType.PROVISION_TYPE_PERMIT,
            "actions": [READ],
            "categories": [OBS],
            "purposes": [TREAT],
        }
        base.update(fields)
        return pb.GrantConsentRequest(**base)

    def question(self, **fields: Any) -> pb.CheckConsentRequest:
        base: dict[str, Any] = {
            "patient_id": self.patient_id,
            "actor_id": self.doctor_id,
            "action": READ,
            "category": OBS,
            "purpose": TREAT,
        }
        base.update(fields)
        return pb.CheckConsentRequest(**base)


async def test_grant_check_and_the_decision_record_written_before_the_answer(start_stack) -> None:
    async with start_stack() as stack:
        w = await World().build(stack)
        before = await w.pdp.CheckConsent(w.question())
        assert (before.decision, before.reason_code) == (pb.Decision.DECISION_NO_CONSENT, "NO_CONSENT_FOR_PATIENT")
        granted = await w.patient.GrantConsent(w.grant())
        consent = granted.consent
        assert consent.version == 1 and consent.status == pb.ConsentStatus.CONSENT_STATUS_ACTIVE
        assert len(granted.salt) == 32 and len(consent.commitment) == 64

        answer = await w.pdp.CheckConsent(w.question())
        assert answer.decision == pb.Decision.DECISION_PERMIT
        assert [(r.consent_id, r.version) for r in answer.deciding] == [(consent.consent_id, 1)]
        assert answer.rule_version == "medledger-consent-rules/2" and answer.decision_id.startswith("dec_")
        # The record was durable when the answer came: read it right after.
        async with stack.consent.db.connect() as conn:
            row = (
                await conn.execute(
                    select(storage.consent_decisions).where(
                        storage.consent_decisions.c.decision_id == answer.decision_id
                    )
                )
            ).one()
            events = (await conn.execute(select(func.count()).select_from(outbox))).scalar_one()
        assert (row.decision, row.reason_code, row.deciding) == (1, "PERMITTED", f"{consent.consent_id}@1")
        assert row.decided_at == pytest.approx(answer.decided_at.ToNanoseconds() / 1e9, abs=1e-3)
        assert events >= 3, "each decision and the grant went out through the outbox"

        # Organization grants cover its practitioners; a patient's deny of one doctor wins.
        await w.patient.GrantConsent(w.grant(grantee_id=w.org_id, purposes=[]))
        assert (await w.pdp.CheckConsent(w.question(actor_id=w.colleague_id))).decision == pb.Decision.DECISION_PERMIT
        deny = await w.patient.GrantConsent(
            w.grant(
                grantee_id=w.colleague_id,
                provision=pb.ProvisionType.PROVISION_TYPE_DENY,
                actions=[],
                categories=[],
                purposes=[],
            )
        )
        denied = await w.pdp.CheckConsent(w.question(actor_id=w.colleague_id))
        assert denied.decision == pb.Decision.DECISION_DENY and denied.reason_code == "EXPLICIT_DENY"
        assert [r.consent_id for r in denied.deciding] == [deny.consent.consent_id]

        # The patient reads the decision back with what it was decided on: the colleague's
        # organization, and every version of the patient's consents recorded by then.
        recorded = (await w.patient.GetDecision(pb.GetDecisionRequest(decision_id=denied.decision_id))).decision
        listed_now = await w.patient.ListConsents(pb.ListConsentsRequest(patient_id=w.patient_id))
        assert sorted(recorded.considered) == sorted(c.commitment for c in listed_now.consents)
        assert (recorded.actor_id, recorded.actor_organization_id) == (w.colleague_id, w.org_id)
        assert (recorded.decision, recorded.reason_code) == (denied.decision, "EXPLICIT_DENY")
        assert [r.consent_id for r in recorded.deciding] == [deny.consent.consent_id]
        assert (recorded.decided_at, recorded.rule_version) == (denied.decided_at, denied.rule_version)
        assert (recorded.action, recorded.category, recorded.purpose) == (READ, OBS, TREAT)
        assert (
            await status_of(w.other_patient.GetDecision(pb.GetDecisionRequest(decision_id=denied.decision_id)))
            == CODE.NOT_FOUND
        )
        assert (await w.pdp.CheckConsent(w.question())).decision == pb.Decision.DECISION_PERMIT

        # Revocation is a new version; the old one still answers GetConsent by number.
        revoked = await w.patient.RevokeConsent(
            pb.RevokeConsentRequest(request_id=rid(), consent_id=consent.consent_id)
        )
        assert revoked.consent.version == 2 and revoked.consent.status == pb.ConsentStatus.CONSENT_STATUS_INACTIVE
        assert revoked.consent.commitment != consent.commitment
        first = await w.patient.GetConsent(pb.GetConsentRequest(consent_id=consent.consent_id, version=1))
        assert first.consent.status == pb.ConsentStatus.CONSENT_STATUS_ACTIVE and first.salt == granted.salt
        exported = FhirConsent.model_validate_json(first.fhir_consent_json)
        assert exported.status == "active" and exported.provision.type == "permit"
        listed = await w.patient.ListConsents(pb.ListConsentsRequest(patient_id=w.patient_id))
        assert {c.consent_id: c.version for c in listed.consents}[consent.consent_id] == 2


async def test_who_may_grant_get_and_check(start_stack) -> None:
    async with start_stack() as stack:
        w = await World().build(stack)
        granted = await w.patient.GrantConsent(w.grant())
        # Another patient can neither grant for this one, nor see, nor ask about them.
        assert await status_of(w.other_patient.GrantConsent(w.grant())) == CODE.PERMISSION_DENIED
        assert (
            await status_of(w.other_patient.GetConsent(pb.GetConsentRequest(consent_id=granted.consent.consent_id)))
            == CODE.NOT_FOUND
        )
        assert await status_of(w.other_patient.CheckConsent(w.question())) == CODE.PERMISSION_DENIED
        # The patient may ask about themselves; an admin may grant for them.
        assert (await w.patient.CheckConsent(w.question())).decision == pb.Decision.DECISION_PERMIT
        by_admin = await w.admin_consent.GrantConsent(w.grant(grantee_id=w.colleague_id))
        assert by_admin.consent.recorded_by == "svc_admin"
        # A grantee sees the consent naming them, without its salt.
        doctor = await w.register(Kind.PRINCIPAL_KIND_RESEARCHER)
        await stack.known_to_consent(doctor.principal.principal_id)
        research = await w.patient.GrantConsent(w.grant(grantee_id=doctor.principal.principal_id, purposes=[HRESCH]))
        seen = await w.consent_as(stack.client(doctor.principal.principal_id, doctor.client_secret)).GetConsent(
            pb.GetConsentRequest(consent_id=research.consent.consent_id)
        )
        assert seen.consent.grantee_id == doctor.principal.principal_id and seen.salt == b""


async def test_invalid_grants_name_the_field_and_change_nothing(start_stack) -> None:
    async with start_stack() as stack:
        w = await World().build(stack)
        async with stack.consent.db.connect() as conn:
            versions = (await conn.execute(select(func.count()).select_from(storage.consent_versions))).scalar_one()
        now = time.time()
        cases = {
            "grantee_id": w.grant(grantee_id="prn_" + "0" * 32),
            "patient_id": w.grant(patient_id="pat_" + "0" * 32),
            "period_end": w.grant(period_start=ts(now + 100), period_end=ts(now + 50)),
            "purposes": w.grant(purposes=[999]),
            "categories": w.grant(categories=[999]),
            "actions": w.grant(actions=[0]),
            "provision": w.grant(provision=pb.ProvisionType.PROVISION_TYPE_UNSPECIFIED),
        }
        for field, request in cases.items():
            caller = w.admin_consent if field == "patient_id" else w.patient
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await caller.GrantConsent(request)
            assert err.value.code() == CODE.INVALID_ARGUMENT, field
            assert bad_request_fields(err.value) == [field]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await w.pdp.CheckConsent(pb.CheckConsentRequest(patient_id=w.patient_id))
        assert err.value.code() == CODE.INVALID_ARGUMENT
        async with stack.consent.db.connect() as conn:
            assert (
                await conn.execute(select(func.count()).select_from(storage.consent_versions))
            ).scalar_one() == versions


async def test_a_revocation_reaches_a_second_consent_replica(start_stack) -> None:
    async with start_stack(consent_replicas=2) as stack:
        w = await World().build(stack)
        first, second = stack.consent_replicas
        pdp_second = w.consent_as(w.pdp_client, replica=second)
        granted = await w.patient.GrantConsent(w.grant())  # through the first replica
        started = time.monotonic()
        while (await pdp_second.CheckConsent(w.question())).decision != pb.Decision.DECISION_PERMIT:
            assert time.monotonic() - started < 10, "the second replica never saw the grant"
            await asyncio.sleep(0.02)
        await w.patient.RevokeConsent(pb.RevokeConsentRequest(request_id=rid(), consent_id=granted.consent.consent_id))
        started = time.monotonic()
        while (answer := await pdp_second.CheckConsent(w.question())).decision == pb.Decision.DECISION_PERMIT:
            assert time.monotonic() - started < 10, "the second replica still permits after 10 s"
            await asyncio.sleep(0.02)
        print(f"revocation reached the second replica in {time.monotonic() - started:.3f} s")
        assert answer.reason_code == "REVOKED"
        assert first is not second


async def test_a_guardian_acts_for_the_patient_only_while_appointed_and_holding_the_role(start_stack) -> None:
    async with start_stack() as stack:
        w = await World().build(stack)
        parent = await w.public.RegisterPatient(
            id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=patient_json())
        )
        parent_id = parent.principal.principal_id
        await stack.known_to_consent(parent_id)
        await w.admin_identity.AssignRole(
            id_pb.AssignRoleRequest(request_id=rid(), principal_id=parent_id, role=vocab.Role.ROLE_GUARDIAN)
        )
        guardian = w.consent_as(stack.client(parent_id, parent.client_secret))
        # Holding the role is not enough: the patient has not appointed them.
        assert await status_of(guardian.GrantConsent(w.grant())) == CODE.PERMISSION_DENIED
        # Only the patient (or an admin) appoints; not the would-be guardian.
        appoint = pb.AppointGuardianRequest(request_id=rid(), patient_id=w.patient_id, guardian_id=parent_id)
        assert await status_of(guardian.AppointGuardian(appoint)) == CODE.PERMISSION_DENIED
        appointed = await w.patient.AppointGuardian(appoint)
        assert appointed.guardianship.active and appointed.guardianship.changed_by == w.patient_id

        granted = await guardian.GrantConsent(w.grant())
        assert granted.consent.recorded_by == parent_id
        assert (await guardian.CheckConsent(w.question())).decision == pb.Decision.DECISION_PERMIT
        # A guardian of one patient is nobody's guardian else.
        assert await status_of(guardian.GrantConsent(w.grant(patient_id=w.other_patient_id))) == CODE.PERMISSION_DENIED

        await w.patient.RemoveGuardian(
            pb.RemoveGuardianRequest(request_id=rid(), patient_id=w.patient_id, guardian_id=parent_id)
        )
        revoke = pb.RevokeConsentRequest(request_id=rid(), consent_id=granted.consent.consent_id)
        assert await status_of(guardian.RevokeConsent(revoke)) == CODE.PERMISSION_DENIED
        assert await status_of(guardian.CheckConsent(w.question())) == CODE.PERMISSION_DENIED
        # Appointed again but without the role (revoked in identity): the new token lacks it.
        await w.patient.AppointGuardian(
            pb.AppointGuardianRequest(request_id=rid(), patient_id=w.patient_id, guardian_id=parent_id)
        )
        await w.admin_identity.RevokeRole(
            id_pb.RevokeRoleRequest(request_id=rid(), principal_id=parent_id, role=vocab.Role.ROLE_GUARDIAN)
        )
        without_role = w.consent_as(stack.client(parent_id, parent.client_secret))
        assert await status_of(without_role.RevokeConsent(revoke)) == CODE.PERMISSION_DENIED


# -- break-glass ------------------------------------------------------------------------------------

ETREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_ETREAT
LIFE_THREATENING = pb.BreakGlassReason.BREAK_GLASS_REASON_LIFE_THREATENING
JUSTIFICATION = "Unconscious on arrival after a road accident; need allergy and medication history now"


async def test_break_glass_from_policy_to_review(start_stack, caplog) -> None:
    from medledger.events.v1 import consent_events_pb2, notification_events_pb2
    from prometheus_client import REGISTRY

    from medledger_runtime.events import decode, unpack

    async with start_stack() as stack:
        w = await World().build(stack)

        async def staff(role: int | None = None) -> tuple[str, Any]:
            registered = await w.register(
                Kind.PRINCIPAL_KIND_PRACTITIONER, organization_id=w.org_id, fhir_resource=w.practitioner()
            )
            pid = registered.principal.principal_id
            if role is not None:
                await w.admin_identity.AssignRole(
                    id_pb.AssignRoleRequest(request_id=rid(), principal_id=pid, role=role)
                )
            await stack.known_to_consent(pid)
            return pid, w.consent_as(stack.client(pid, registered.client_secret))

        doctor_id, doctor = await staff()
        nurse_id, nurse = await staff()
        _, org_admin = await staff(vocab.Role.ROLE_ORG_ADMIN)
        officer_id, officer = await staff(vocab.Role.ROLE_PRIVACY_OFFICER)
        other_org = await w.register(Kind.PRINCIPAL_KIND_ORGANIZATION)
        outsider = await w.register(
            Kind.PRINCIPAL_KIND_PRACTITIONER,
            organization_id=other_org.principal.principal_id,
            fhir_resource=w.practitioner(),
        )
        await w.admin_identity.AssignRole(
            id_pb.AssignRoleRequest(
                request_id=rid(), principal_id=outsider.principal.principal_id, role=vocab.Role.ROLE_PRIVACY_OFFICER
            )
        )
        outside_officer = w.consent_as(stack.client(outsider.principal.principal_id, outsider.client_secret))

        def breaking(patient_id: str = w.patient_id, **fields: Any) -> pb.BreakGlassRequest:
            return pb.BreakGlassRequest(
                request_id=rid(), patient_id=patient_id, reason=LIFE_THREATENING, justification=JUSTIFICATION, **fields
            )

        def emergency(actor_id: str, **fields: Any) -> pb.CheckConsentRequest:
            return w.question(actor_id=actor_id, purpose=ETREAT, **fields)

        async def accesses() -> int:
            async with stack.consent.db.connect() as conn:
                return (await conn.execute(select(func.count()).select_from(storage.break_glass_accesses))).scalar_one()

        # Off until the organization enables it: refused, nothing stored.
        assert await status_of(doctor.BreakGlass(breaking())) == CODE.PERMISSION_DENIED
        policy = pb.BreakGlassPolicy(organization_id=w.org_id, enabled=True, max_uses=2)
        outsider_admin = pb.BreakGlassPolicy(organization_id=other_org.principal.principal_id, enabled=True)
        assert (
            await status_of(
                org_admin.SetBreakGlassPolicy(pb.SetBreakGlassPolicyRequest(request_id=rid(), policy=outsider_admin))
            )
            == CODE.PERMISSION_DENIED
        )
        set_policy = await org_admin.SetBreakGlassPolicy(pb.SetBreakGlassPolicyRequest(request_id=rid(), policy=policy))
        assert set_policy.policy.access_duration.ToSeconds() == 4 * 3600 and not set_policy.policy.overrides_deny
        assert await accesses() == 0
        uses_before = (
            REGISTRY.get_sample_value(
                "medledger_consent_break_glass_uses_total", {"reason": "BREAK_GLASS_REASON_LIFE_THREATENING"}
            )
            or 0.0
        )

        # On: an emergency read without consent is permitted for this doctor, this patient, read only.
        assert (await w.pdp.CheckConsent(emergency(doctor_id))).decision == pb.Decision.DECISION_NO_CONSENT
        started = (await doctor.BreakGlass(breaking())).access
        assert started.review == pb.BreakGlassReview.BREAK_GLASS_REVIEW_PENDING and started.organization_id == w.org_id
        lasts = started.expires_at.ToNanoseconds() - started.started_at.ToNanoseconds()
        assert lasts == 4 * 3600 * 10**9
        permitted = await w.pdp.CheckConsent(emergency(doctor_id))
        assert (permitted.decision, permitted.reason_code) == (pb.Decision.DECISION_PERMIT, "BREAK_GLASS")
        assert permitted.break_glass_access_id == started.access_id
        for wrong in (emergency(doctor_id, action=WRITE), w.question(actor_id=doctor_id), emergency(nurse_id)):
            assert (await w.pdp.CheckConsent(wrong)).decision == pb.Decision.DECISION_NO_CONSENT
        assert (
            REGISTRY.get_sample_value(
                "medledger_consent_break_glass_uses_total", {"reason": "BREAK_GLASS_REASON_LIFE_THREATENING"}
            )
            == uses_before + 1
        )

        # Rate-limited per practitioner: the third use within the window is refused, nothing stored.
        await doctor.BreakGlass(breaking(w.other_patient_id))
        assert await status_of(doctor.BreakGlass(breaking())) == CODE.RESOURCE_EXHAUSTED
        assert await accesses() == 2

        # A patient's explicit deny stands unless the policy says break-glass overrides it.
        deny = await w.patient.GrantConsent(
            w.grant(
                grantee_id=nurse_id,
                provision=pb.ProvisionType.PROVISION_TYPE_DENY,
                actions=[],
                categories=[],
                purposes=[],
            )
        )
        nurse_access = (await nurse.BreakGlass(breaking())).access
        assert (await w.pdp.CheckConsent(emergency(nurse_id))).decision == pb.Decision.DECISION_DENY
        policy.overrides_deny = True
        await org_admin.SetBreakGlassPolicy(pb.SetBreakGlassPolicyRequest(request_id=rid(), policy=policy))
        overriding = (await nurse.BreakGlass(breaking())).access
        assert overriding.overrides_deny and not nurse_access.overrides_deny
        overridden = await w.pdp.CheckConsent(emergency(nurse_id))
        assert (overridden.decision, overridden.reason_code) == (
            pb.Decision.DECISION_PERMIT,
            "BREAK_GLASS_OVERRIDES_DENY",
        )
        assert [r.consent_id for r in overridden.deciding] == [deny.consent.consent_id]

        # Stored encrypted; events carry the hash and the reason code; the patient and the
        # privacy officers are told; the text is in no event and no log line.
        async with stack.consent.db.connect() as conn:
            row = (
                await conn.execute(
                    select(storage.break_glass_accesses).where(
                        storage.break_glass_accesses.c.access_id == started.access_id
                    )
                )
            ).one()
            published = [(r.topic, bytes(r.value)) for r in await conn.execute(select(outbox.c.topic, outbox.c.value))]
        assert (
            row.justification_ciphertext.startswith("vault:v1:") and "road accident" not in row.justification_ciphertext
        )
        assert (
            row.justification_sha256
            == hashlib.sha256(b"medledger:break-glass-justification:v1\n" + JUSTIFICATION.encode()).hexdigest()
        )
        events = [decode(payload) for _, payload in published]
        starts = [
            unpack(e, consent_events_pb2.BreakGlassAccessStarted)
            for e in events
            if e.type == consent_events_pb2.BreakGlassAccessStarted.DESCRIPTOR.full_name
        ]
        first = next(s for s in starts if s.access_id == started.access_id)
        assert (first.reason_code, first.justification_sha256) == (
            "BREAK_GLASS_REASON_LIFE_THREATENING",
            row.justification_sha256,
        )
        notes = [
            unpack(e, notification_events_pb2.NotificationRequested)
            for e in events
            if e.type == notification_events_pb2.NotificationRequested.DESCRIPTOR.full_name
        ]
        told = {
            (n.recipient_id, n.organization_id, n.recipient_role) for n in notes if n.subject_id == started.access_id
        }
        assert told == {(w.patient_id, "", ""), ("", w.org_id, "privacy-officer")}
        decisions = [
            unpack(e, consent_events_pb2.ConsentDecisionRecorded)
            for e in events
            if e.type == consent_events_pb2.ConsentDecisionRecorded.DESCRIPTOR.full_name
        ]
        assert any(
            d.decision_id == permitted.decision_id and d.break_glass_access_id == started.access_id for d in decisions
        )
        for text in (JUSTIFICATION, "road accident"):
            assert all(text.encode() not in payload for _, payload in published)
            assert text not in caplog.text

        # Pending until a privacy officer of the organization reviews it.
        pending = await officer.ListBreakGlassAccesses(
            pb.ListBreakGlassAccessesRequest(organization_id=w.org_id, pending_only=True)
        )
        assert {a.access_id for a in pending.accesses} == {
            started.access_id,
            nurse_access.access_id,
            overriding.access_id,
        } | {a.access_id for a in pending.accesses if a.patient_id == w.other_patient_id}
        assert len(pending.accesses) == 4
        read = await officer.GetBreakGlassAccess(pb.GetBreakGlassAccessRequest(access_id=started.access_id))
        assert read.justification == JUSTIFICATION
        assert (
            await status_of(
                outside_officer.GetBreakGlassAccess(pb.GetBreakGlassAccessRequest(access_id=started.access_id))
            )
            == CODE.NOT_FOUND
        )
        assert (
            await status_of(
                outside_officer.ListBreakGlassAccesses(pb.ListBreakGlassAccessesRequest(organization_id=w.org_id))
            )
            == CODE.PERMISSION_DENIED
        )

        def review(access_id: str, outcome: int) -> pb.ReviewBreakGlassAccessRequest:
            return pb.ReviewBreakGlassAccessRequest(request_id=rid(), access_id=access_id, review=outcome)

        justified = pb.BreakGlassReview.BREAK_GLASS_REVIEW_JUSTIFIED
        unjustified = pb.BreakGlassReview.BREAK_GLASS_REVIEW_UNJUSTIFIED
        assert (
            await status_of(doctor.ReviewBreakGlassAccess(review(started.access_id, justified)))
            == CODE.PERMISSION_DENIED
        )
        done = (await officer.ReviewBreakGlassAccess(review(started.access_id, justified))).access
        assert (done.review, done.reviewed_by, done.HasField("ended_at")) == (justified, officer_id, False)
        assert (
            await status_of(officer.ReviewBreakGlassAccess(review(started.access_id, unjustified)))
            == CODE.FAILED_PRECONDITION
        )
        # An unjustified use ends at once: the patient's deny of the nurse holds again.
        ended = (await officer.ReviewBreakGlassAccess(review(overriding.access_id, unjustified))).access
        assert ended.HasField("ended_at")
        assert (await w.pdp.CheckConsent(emergency(nurse_id))).decision == pb.Decision.DECISION_DENY
        assert (await w.pdp.CheckConsent(emergency(doctor_id))).decision == pb.Decision.DECISION_PERMIT
        still = await officer.ListBreakGlassAccesses(
            pb.ListBreakGlassAccessesRequest(organization_id=w.org_id, pending_only=True)
        )
        assert started.access_id not in {a.access_id for a in still.accesses} and len(still.accesses) == 2
