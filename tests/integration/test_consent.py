"""Consent end to end: grants and checks through the API with real tokens, decision records
written before the answer, invalid grants refused with the field, the FHIR export, who may
ask what, and a revocation reaching a second consent replica."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import grpc
import pytest
from fhir.resources.R4B.consent import Consent as FhirConsent
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from medledger.consent.v1 import consent_service_pb2 as pb
from medledger.consent.v1 import consent_service_pb2_grpc as pb_grpc
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab
from sqlalchemy import func, select

from medledger_common.grpc_client import make_channel
from medledger_common.outbox import outbox
from medledger_common.testing import status_of
from medledger_consent import storage

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
        await self.known_to_consent(
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

    async def known_to_consent(self, *ids: str) -> None:
        """Consent learns principals from identity's events; grants wait until it has."""
        deadline = time.monotonic() + 20
        while True:
            async with self.stack.consent.db.connect() as conn:
                known = [await storage.get_principal(conn, i) for i in ids]
            if all(known):
                return
            assert time.monotonic() < deadline, "consent did not learn the principals"
            await asyncio.sleep(0.05)

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
        assert answer.rule_version == "medledger-consent-rules/1" and answer.decision_id.startswith("dec_")
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
        await w.known_to_consent(doctor.principal.principal_id)
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
            status = rpc_status.from_call(err.value)
            bad = error_details_pb2.BadRequest()
            assert status is not None and status.details[0].Unpack(bad)
            assert [v.field for v in bad.field_violations] == [field]
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
        await w.known_to_consent(parent_id)
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
