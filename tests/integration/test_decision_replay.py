"""`medledger decision replay` against a running stack (identity, consent, audit): a real check,
then its replay by a privacy officer through GetDecision, the log's entries about the patient and
their tlog-proofs, valid; the same decision entry with a considered version removed fails replay
(the deciding one: the outcome no longer follows; another: named, once outside the propagation
window); bad input exits 2 and a decision nobody made exits 1."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from medledger.audit.v1 import audit_service_pb2 as au_pb
from medledger.audit.v1 import audit_service_pb2_grpc as au_grpc
from medledger.consent.v1 import consent_service_pb2 as pb
from medledger.consent.v1 import consent_service_pb2_grpc as pb_grpc
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_sdk.channels import make_channel
from medledger_sdk.cli import main as medledger
from medledger_verifier.decision_replay import replay
from medledger_verifier.proof_files import TrustPolicy

Kind = vocab.PrincipalKind
READ, OBS, TREAT = (
    vocab.Action.ACTION_READ,
    vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS,
    vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT,
)


def rid() -> str:
    return str(uuid.uuid4())


async def test_a_privacy_officer_replays_a_real_decision_and_a_tampered_copy_fails(
    start_stack: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with start_stack(audit=True) as stack:
        assert stack.consent is not None and stack.audit is not None
        consent_address = f"127.0.0.1:{stack.consent.grpc_port}"
        audit_address = f"127.0.0.1:{stack.audit.grpc_port}"
        admin = id_grpc.IdentityServiceStub(stack.admin().channel(stack.identity_address, "medledger.identity"))
        public = id_grpc.IdentityServiceStub(make_channel(stack.identity_address))

        async def register(kind: int, role: int = 0, **fields: Any) -> id_pb.RegisterPrincipalResponse:
            reply = await admin.RegisterPrincipal(id_pb.RegisterPrincipalRequest(request_id=rid(), kind=kind, **fields))
            if role:
                await admin.AssignRole(
                    id_pb.AssignRoleRequest(request_id=rid(), principal_id=reply.principal.principal_id, role=role)
                )
            return reply

        fhir = {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": uuid.uuid4().hex}]}
        patient = await public.RegisterPatient(
            id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=json.dumps(fhir).encode())
        )
        patient_id = patient.principal.principal_id
        org = (await register(Kind.PRINCIPAL_KIND_ORGANIZATION)).principal.principal_id

        def practitioner() -> bytes:
            identifier = [{"system": "urn:npi", "value": uuid.uuid4().hex}]
            return json.dumps({"resourceType": "Practitioner", "identifier": identifier}).encode()

        doctor = (
            await register(Kind.PRINCIPAL_KIND_PRACTITIONER, organization_id=org, fhir_resource=practitioner())
        ).principal.principal_id
        colleague = (
            await register(Kind.PRINCIPAL_KIND_PRACTITIONER, organization_id=org, fhir_resource=practitioner())
        ).principal.principal_id
        officer = await register(
            Kind.PRINCIPAL_KIND_PRACTITIONER,
            vocab.Role.ROLE_PRIVACY_OFFICER,
            organization_id=org,
            fhir_resource=practitioner(),
        )
        await stack.known_to_consent(patient_id, org, doctor, colleague)
        as_patient = pb_grpc.ConsentServiceStub(
            stack.client(patient_id, patient.client_secret).channel(consent_address, "medledger.consent")
        )

        # The patient grants the doctor, and denies a colleague; the doctor is permitted.
        def grant(grantee: str, provision: int) -> pb.GrantConsentRequest:
            return pb.GrantConsentRequest(
                request_id=rid(),
                patient_id=patient_id,
                grantee_id=grantee,
                provision=provision,
                actions=[READ],
                categories=[OBS],
                purposes=[TREAT],
            )

        await as_patient.GrantConsent(grant(doctor, pb.ProvisionType.PROVISION_TYPE_PERMIT))
        await as_patient.GrantConsent(grant(colleague, pb.ProvisionType.PROVISION_TYPE_DENY))
        answer = await as_patient.CheckConsent(
            pb.CheckConsentRequest(patient_id=patient_id, actor_id=doctor, action=READ, category=OBS, purpose=TREAT)
        )
        assert answer.decision == pb.Decision.DECISION_PERMIT

        # The trust policy: the log's published keys (the chain is not consulted by a replay).
        audit = au_grpc.AuditServiceStub(make_channel(audit_address))
        keys = await audit.GetVerifierKeys(au_pb.GetVerifierKeysRequest())
        trust = tmp_path / "trust.json"
        trust.write_text(TrustPolicy(keys.origin, tuple(keys.verifier_keys), 31337, "0x" + "00" * 20).to_json())
        secret = tmp_path / "officer.secret"
        secret.write_text(officer.client_secret)
        common = [
            "--trust",
            str(trust),
            "--principal",
            officer.principal.principal_id,
            "--secret-file",
            str(secret),
            "--identity-address",
            stack.identity_address,
            "--consent-address",
            consent_address,
            "--audit-address",
            audit_address,
        ]

        def run(*argv: str) -> tuple[int, str]:
            capsys.readouterr()
            code = medledger(["decision", "replay", *argv, *common])
            out = capsys.readouterr()
            return code, out.out + out.err

        started = time.monotonic()
        code, out = await asyncio.to_thread(run, answer.decision_id)
        assert code == 0, out
        assert "VALID" in out and "PERMIT (PERMITTED)" in out and "2 version(s) considered" in out, out
        assert "signed by the trusted keys" in out, out
        assert time.monotonic() - started < 60

        # The very entry, with the colleague's deny removed from what was considered: a replay
        # from the same log names the version left out.
        listed = await au_grpc.AuditServiceStub(
            stack.client(officer.principal.principal_id, officer.client_secret).channel(
                audit_address, "medledger.audit"
            )
        ).ListEntries(au_pb.ListEntriesRequest(patient_id=patient_id, page_size=1000))
        entries = [json.loads(e.entry) for e in listed.entries if e.entry]
        (logged,) = [e for e in entries if e.get("decision_id") == answer.decision_id]
        versions = [e for e in entries if e["type"] == "consent.version_recorded"]
        (deny,) = [v for v in versions if v["grantee_id"] == colleague]
        assert replay(logged, entries).valid
        without_deny = {**logged, "considered": [c for c in logged["considered"] if c != deny["commitment"]]}
        # Recorded moments before the check, the deny could fairly have been missing from the
        # deciding replica: within the propagation window it is reported, not failed ...
        report = replay(without_deny, entries)
        assert report.valid and [n.code for n in report.notes] == ["version-within-window"], report
        # ... and without that allowance it is a failure naming it.
        report = replay(without_deny, entries, window_seconds=0)
        assert [f.code for f in report.failures] == ["version-not-considered"], report
        assert f"{deny['consent_id']} version 1" in report.failures[0].message
        # The doctor's grant removed: the permit no longer follows.
        (permit,) = [v for v in versions if v["grantee_id"] == doctor]
        without_permit = {**logged, "considered": [c for c in logged["considered"] if c != permit["commitment"]]}
        report = replay(without_permit, entries)
        assert "outcome-differs" in [f.code for f in report.failures], report
        assert "NO_CONSENT" in report.failures[-1].message

        # Bad input is exit 2; a decision that is not (or not visible) is exit 1.
        code, out = await asyncio.to_thread(run, "dec_nope")
        assert code == 2 and "not a decision id" in out, out
        code, out = await asyncio.to_thread(run, "dec_" + "0" * 32)
        assert code == 1 and "NOT_FOUND" in out, out
