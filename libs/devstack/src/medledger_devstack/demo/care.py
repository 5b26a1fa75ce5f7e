"""The story's care chapters: who is who, the patient's consent, the record stored and read, a
researcher denied, an emergency read after breaking the glass and its review, the consent revoked."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import grpc
from medledger.consent.v1 import consent_service_pb2 as consent_pb
from medledger.identity.v1 import identity_service_pb2 as identity_pb
from medledger.records.v1 import records_service_pb2 as records_pb
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_devstack.demo.fhir import blood_pressure, patient_resource, practitioner_resource
from medledger_devstack.demo.terms import (
    CONSENT_DAYS,
    ETREAT,
    HRESCH,
    OBSERVATIONS,
    READ,
    TREAT,
    WRITE,
    Kind,
    rid,
    timestamp,
)
from medledger_devstack.demo.waiting import until_known
from medledger_sdk.calls import pages
from medledger_sdk.client import Medledger
from medledger_verifier import commitments

if TYPE_CHECKING:
    from medledger_devstack.demo.story import Story


async def register_everyone(story: Story) -> None:
    story.say.step("Registering a hospital, its people, a patient and a researcher")
    admin = story.client(story.config.admin_id, story.config.admin_secret)
    story.admin = admin

    async def register(kind: vocab.PrincipalKind.ValueType, name: str, **fields: Any) -> tuple[str, Medledger]:
        reply = await admin.identity.RegisterPrincipal(
            identity_pb.RegisterPrincipalRequest(request_id=rid(), kind=kind, **fields)
        )
        pid = reply.principal.principal_id
        story.result.cast[pid] = name
        story.say.say(f"{name}: {pid}")
        return pid, story.client(pid, reply.client_secret)

    story.hospital_id, _ = await register(Kind.PRINCIPAL_KIND_ORGANIZATION, "St. Mary's Hospital")
    staff = {"organization_id": story.hospital_id}
    story.doctor_id, story.doctor = await register(
        Kind.PRINCIPAL_KIND_PRACTITIONER,
        "Dr. Grey (doctor)",
        fhir_resource=practitioner_resource("Grey", "Meredith"),
        **staff,
    )
    story.emergency_id, story.emergency = await register(
        Kind.PRINCIPAL_KIND_PRACTITIONER,
        "Dr. Ross (emergency)",
        fhir_resource=practitioner_resource("Ross", "Doug"),
        **staff,
    )
    story.officer_id, story.officer = await register(
        Kind.PRINCIPAL_KIND_PRACTITIONER,
        "Ms. Lee (privacy officer)",
        fhir_resource=practitioner_resource("Lee", "Kim"),
        **staff,
    )
    await admin.identity.AssignRole(
        identity_pb.AssignRoleRequest(
            request_id=rid(), principal_id=story.officer_id, role=vocab.Role.ROLE_PRIVACY_OFFICER
        )
    )
    story.say.say("  … given the privacy-officer role")
    story.researcher_id, story.researcher = await register(Kind.PRINCIPAL_KIND_RESEARCHER, "a researcher")

    # The patient registers themselves: a public RPC, no token.
    anonymous = story.client()
    resource = patient_resource()
    registered = await anonymous.identity.RegisterPatient(
        identity_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=resource)
    )
    story.patient_identifier = json.loads(resource)["identifier"][0]
    story.patient_id = registered.principal.principal_id
    story.result.patient_id = story.patient_id
    story.result.cast[story.patient_id] = "the patient"
    story.patient = story.client(story.patient_id, registered.client_secret)
    story.say.say(f"the patient: {story.patient_id} (name and birth date kept encrypted in identity only)")

    # The hospital allows emergency access; its privacy officer reviews every use.
    await until_known(
        lambda: admin.consent.SetBreakGlassPolicy(
            consent_pb.SetBreakGlassPolicyRequest(
                request_id=rid(),
                policy=consent_pb.BreakGlassPolicy(organization_id=story.hospital_id, enabled=True),
            )
        )
    )
    story.say.say("the hospital's break-glass policy: enabled, each use reviewed by its privacy officer")


async def grant_consent(story: Story) -> None:
    story.say.step(f"The patient grants Dr. Grey read and write of Observations for treatment, {CONSENT_DAYS} days")
    now = time.time()
    request = consent_pb.GrantConsentRequest(
        request_id=rid(),
        patient_id=story.patient_id,
        grantee_id=story.doctor_id,
        provision=consent_pb.ProvisionType.PROVISION_TYPE_PERMIT,
        actions=[READ, WRITE],
        categories=[OBSERVATIONS],
        purposes=[TREAT],
        period_start=timestamp(now),
        period_end=timestamp(now + CONSENT_DAYS * 86400),
    )
    granted = await until_known(lambda: story.patient.consent.GrantConsent(request))
    story.consent_id = granted.consent.consent_id
    story.say.say(
        f"consent {story.consent_id} version {granted.consent.version}, commitment "
        f"{granted.consent.commitment[:16]}… (a FHIR Consent; its commitment goes on chain, never its content)"
    )


async def store_and_read(story: Story) -> None:
    story.say.step("Dr. Grey stores a blood-pressure Observation (128/82 mmHg)")
    content = blood_pressure(story.patient_id)
    put = await story.doctor.records.PutRecord(
        records_pb.PutRecordRequest(
            request_id=rid(),
            patient_id=story.patient_id,
            category=OBSERVATIONS,
            content=content,
            media_type="application/fhir+json",
        )
    )
    story.record_id = story.result.record_id = put.record_id
    story.receipt = put.receipt
    story.say.say(
        f"record {put.record_id} version {put.version}: encrypted under the patient's key; "
        f"receipt commitment {put.receipt.commitment[:16]}…"
    )

    story.say.step("Dr. Grey reads it for treatment")
    got = await story.doctor.records.GetRecord(records_pb.GetRecordRequest(record_id=story.record_id, purpose=TREAT))
    story.result.record, story.result.salt = got.content, got.receipt.salt
    story.read_decision_id = got.decision_id
    story.say.say(f"permitted (decision {got.decision_id}); {len(got.content)} bytes returned")
    recomputed = commitments.record_commitment(got.content, bytes.fromhex(got.receipt.salt))
    story.check(
        "receipt commitment",
        recomputed == story.receipt.commitment,
        "the receipt's commitment recomputes from the bytes returned and the salt",
    )


async def deny_the_researcher(story: Story) -> None:
    story.say.step("A researcher asks for the record for research")
    await story.expect(
        "researcher denied",
        story.researcher.records.GetRecord(records_pb.GetRecordRequest(record_id=story.record_id, purpose=HRESCH)),
        grpc.StatusCode.PERMISSION_DENIED,
        "the researcher is denied",
    )


async def break_the_glass(story: Story) -> None:
    story.say.step("Dr. Ross, in the emergency room, has no consent: they break the glass")
    await story.expect(
        "no emergency read without break-glass",
        story.emergency.records.GetRecord(records_pb.GetRecordRequest(record_id=story.record_id, purpose=ETREAT)),
        grpc.StatusCode.PERMISSION_DENIED,
        "before breaking the glass, Dr. Ross is denied",
    )
    access = (
        await until_known(
            lambda: story.emergency.consent.BreakGlass(
                consent_pb.BreakGlassRequest(
                    request_id=rid(),
                    patient_id=story.patient_id,
                    reason=consent_pb.BreakGlassReason.BREAK_GLASS_REASON_PATIENT_UNABLE_TO_CONSENT,
                    justification="Patient unconscious on arrival; blood pressure history needed now.",
                )
            )
        )
    ).access
    story.break_glass_access_id = access.access_id
    story.say.say(
        f"break-glass access {access.access_id}: read only, for emergency treatment, until "
        f"{access.expires_at.ToDatetime():%H:%M} UTC; the patient and the privacy officers are notified"
    )
    got = await story.emergency.records.GetRecord(
        records_pb.GetRecordRequest(record_id=story.record_id, purpose=ETREAT)
    )
    story.check(
        "break-glass read",
        got.content == story.result.record,
        f"Dr. Ross reads the record under break-glass (decision {got.decision_id})",
    )

    story.say.say("the privacy officer reviews the pending use")
    pending = [
        a
        async for a in pages(
            story.officer.consent.ListBreakGlassAccesses,
            consent_pb.ListBreakGlassAccessesRequest(organization_id=story.hospital_id, pending_only=True),
            "accesses",
        )
    ]
    story.check(
        "break-glass pending review",
        any(a.access_id == access.access_id for a in pending),
        f"the use is pending review ({len(pending)} pending at the hospital)",
    )
    reviewed = await story.officer.consent.ReviewBreakGlassAccess(
        consent_pb.ReviewBreakGlassAccessRequest(
            request_id=rid(),
            access_id=access.access_id,
            review=consent_pb.BreakGlassReview.BREAK_GLASS_REVIEW_JUSTIFIED,
        )
    )
    story.check(
        "break-glass reviewed",
        reviewed.access.review == consent_pb.BreakGlassReview.BREAK_GLASS_REVIEW_JUSTIFIED,
        f"the privacy officer judged it justified ({consent_pb.BreakGlassReview.Name(reviewed.access.review)})",
    )


async def revoke(story: Story) -> None:
    story.say.step("The patient revokes the consent")
    revoked = await story.patient.consent.RevokeConsent(
        consent_pb.RevokeConsentRequest(request_id=rid(), consent_id=story.consent_id)
    )
    story.say.say(
        f"consent {story.consent_id} version {revoked.consent.version}: "
        f"{consent_pb.ConsentStatus.Name(revoked.consent.status)}"
    )
    await story.expect(
        "revoked consent denies",
        story.doctor.records.GetRecord(records_pb.GetRecordRequest(record_id=story.record_id, purpose=TREAT)),
        grpc.StatusCode.PERMISSION_DENIED,
        "Dr. Grey is now denied",
    )
