"""The medledger story, told through the SDK against a running stack.

A hospital, two of its practitioners, its privacy officer, a patient and a researcher are
registered; the patient grants one doctor read and write of Observations for treatment for 30
days; the doctor stores a blood-pressure Observation and reads it; the researcher is denied; an
emergency practitioner reads it after breaking the glass, and the privacy officer reviews that;
the patient revokes the consent and the doctor is denied; the patient lists who saw their data;
the record's proof is fetched once anchored and verified against the chain and the trust policy;
the latest checkpoint is shown anchored; the patient's erasure is requested, approved and carried
out, and a read then fails while the proof still verifies.

``run_story`` does all of it and returns every verification it made; ``medledger demo`` prints
the story as it happens and the table at the end, and the end-to-end test asserts on the result.
Nothing here reaches into a service: only the public gRPC APIs, as any client would use them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from medledger.anchoring.v1 import anchoring_service_pb2 as anchoring_pb
from medledger.audit.v1 import audit_service_pb2 as audit_pb
from medledger.consent.v1 import consent_service_pb2 as consent_pb
from medledger.identity.v1 import identity_service_pb2 as identity_pb
from medledger.records.v1 import records_service_pb2 as records_pb
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_runtime.errors import InvalidArgument
from medledger_runtime.files import write_atomically
from medledger_sdk.calls import RpcError, pages
from medledger_sdk.client import Endpoints, Medledger
from medledger_verifier import chain, commitments, notes
from medledger_verifier.anchored_proofs import TrustPolicy, Verification, verify_anchored_proof
from medledger_verifier.erasure_certificates import open_certificate

_T = TypeVar("_T")

Kind = vocab.PrincipalKind
OBSERVATIONS = vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS
TREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT
ETREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_ETREAT
HRESCH = vocab.PurposeOfUse.PURPOSE_OF_USE_HRESCH
READ, WRITE = vocab.Action.ACTION_READ, vocab.Action.ACTION_WRITE
CONSENT_DAYS = 30
# Defaults of `medledger up`: checkpoints every 5 s, anchors every 10 s; two minutes is generous.
ANCHOR_WAIT_SECONDS = 120.0
# Identity announces new principals by event; consent and audit learn them within a moment.
LEARN_WAIT_SECONDS = 30.0
POLL_SECONDS = 0.5

# The files `--out` writes, as named by the platform issue and read by `medledger verify`.
OUT_FILES = (
    "record.json",
    "record.salt",
    "record.tlog-proof",
    "record.entry",
    "record-anchor.json",
    "access.tlog-proof",
    "access.entry",
    "access-anchor.json",
    "log.vkey",
    "trust.json",
    "erasure-certificate.note",
)


@dataclass(frozen=True)
class Outcome:
    """One verification of the story: what was checked, whether it held, what was seen."""

    name: str
    passed: bool
    detail: str


@dataclass
class StoryConfig:
    endpoints: Endpoints
    admin_id: str
    admin_secret: str
    trust_policy: TrustPolicy
    rpc_url: str
    out_dir: Path | None = None
    anchor_wait_seconds: float = ANCHOR_WAIT_SECONDS


@dataclass
class StoryResult:
    outcomes: list[Outcome] = field(default_factory=list)
    # Who is who: principal id -> the name the story gives them.
    cast: dict[str, str] = field(default_factory=dict)
    patient_id: str = ""
    record_id: str = ""
    record: bytes = b""
    salt: str = ""
    record_proof: anchoring_pb.GetAnchoredProofResponse | None = None
    access_proof: anchoring_pb.GetAnchoredProofResponse | None = None
    # The erasure certificate, a C2SP signed note.
    erasure_certificate: str = ""
    written: list[Path] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.outcomes) and all(o.passed for o in self.outcomes)


class Narrator:
    """Says what the story does, in words; the default prints, a test may collect."""

    def __init__(self, write: Callable[[str], None] = print) -> None:
        self._write = write
        self._step = 0

    def step(self, text: str) -> None:
        self._step += 1
        self._write(f"\n{self._step:>2}. {text}")

    def say(self, text: str) -> None:
        self._write(f"    {text}")

    def checked(self, outcome: Outcome) -> None:
        self._write(f"    {'✓' if outcome.passed else '✗'} {outcome.detail}")


def rid() -> str:
    return str(uuid.uuid4())


def _timestamp(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def patient_resource() -> bytes:
    """A synthetic patient: the name and birth date are personal data that must stay in
    identity, encrypted, and never reach an event, a log line or the chain."""
    return json.dumps(
        {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:oid:2.16.840.1.113883.4.1", "value": f"demo-{uuid.uuid4().hex[:12]}"}],
            "name": [{"family": "Rivera", "given": ["Alex"]}],
            "gender": "female",
            "birthDate": "1984-03-02",
        }
    ).encode()


def practitioner_resource(family: str, given: str) -> bytes:
    return json.dumps(
        {
            "resourceType": "Practitioner",
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": f"demo-{uuid.uuid4().hex[:10]}"}],
            "name": [{"family": family, "given": [given], "prefix": ["Dr."]}],
        }
    ).encode()


def blood_pressure(patient_id: str) -> bytes:
    """A FHIR R4 vital-signs Observation (LOINC 85354-9), 128/82 mmHg."""

    def component(code: str, display: str, value: int) -> dict[str, Any]:
        return {
            "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
            "valueQuantity": {"value": value, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
        }

    return json.dumps(
        {
            "resourceType": "Observation",
            "status": "final",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "vital-signs",
                        }
                    ]
                }
            ],
            "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure panel"}]},
            "subject": {"reference": f"Patient/{patient_id}"},
            "effectiveDateTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "component": [
                component("8480-6", "Systolic blood pressure", 128),
                component("8462-4", "Diastolic blood pressure", 82),
            ],
        },
        indent=2,
    ).encode()


async def _code_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    """The status a call ended with (OK if it succeeded) and its message."""
    try:
        await call
    except RpcError as exc:
        return exc.code(), exc.message
    return grpc.StatusCode.OK, ""


async def _eventually(
    attempt: Callable[[], Awaitable[_T | None]],
    what: str,
    within: float,
    narrator: Narrator | None = None,
    every: float = POLL_SECONDS,
) -> _T:
    """``attempt()`` until it returns something, saying every 5 s how long it has waited."""
    started = time.monotonic()
    said = started
    while True:
        found = await attempt()
        if found is not None:
            return found
        now = time.monotonic()
        if now - started > within:
            raise TimeoutError(f"{what}: not within {within:.0f} s")
        if narrator is not None and now - said >= 5:
            narrator.say(f"… still waiting for {what} ({now - started:.0f} s)")
            said = now
        await asyncio.sleep(every)


async def until_known(call: Callable[[], Awaitable[_T]], within: float = LEARN_WAIT_SECONDS) -> _T:
    """Consent learns new principals from identity's events, a moment after registration; a call
    naming one is retried (the same request, so the same request_id) until it has."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except RpcError as exc:
            unknown = exc.code() == grpc.StatusCode.INVALID_ARGUMENT and any(
                "not a registered" in v.description for v in exc.field_violations
            )
            if not unknown or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


class Story:
    def __init__(self, config: StoryConfig, narrator: Narrator) -> None:
        self.config = config
        self.say = narrator
        self.result = StoryResult()
        self._clients: list[Medledger] = []
        self.break_glass_access_id = ""

    # --- helpers ------------------------------------------------------------------------------

    def client(self, principal_id: str | None = None, secret: str | None = None) -> Medledger:
        ml = Medledger(self.config.endpoints, principal_id=principal_id, client_secret=secret)
        self._clients.append(ml)
        return ml

    def check(self, name: str, passed: bool, detail: str) -> bool:
        outcome = Outcome(name, passed, detail)
        self.result.outcomes.append(outcome)
        self.say.checked(outcome)
        return passed

    async def expect(self, name: str, call: Awaitable[Any], code: grpc.StatusCode, saying: str) -> None:
        got, message = await _code_of(call)
        detail = f"{saying}: {got.name}" + (f" ({message})" if message else "")
        self.check(name, got == code, detail if got == code else f"{detail}; expected {code.name}")

    def name(self, principal_id: str) -> str:
        return self.result.cast.get(principal_id, principal_id)

    async def close(self) -> None:
        for ml in self._clients:
            await ml.aclose()

    # --- the story ----------------------------------------------------------------------------

    async def run(self) -> StoryResult:
        steps = (
            self.register_everyone,
            self.grant_consent,
            self.store_and_read,
            self.deny_the_researcher,
            self.break_the_glass,
            self.revoke,
            self.list_who_saw,
            self.prove_the_record,
            self.show_the_latest_anchor,
            self.erase,
            self.write_files,
        )
        try:
            for step in steps:
                try:
                    await step()
                except (RpcError, TimeoutError, OSError) as exc:
                    # The story cannot go on without this step: say which failed and why.
                    self.check(step.__name__.replace("_", " "), False, f"failed: {type(exc).__name__}: {exc}")
                    break
        finally:
            await self.close()
        return self.result

    async def register_everyone(self) -> None:
        self.say.step("Registering a hospital, its people, a patient and a researcher")
        admin = self.client(self.config.admin_id, self.config.admin_secret)
        self.admin = admin

        async def register(kind: vocab.PrincipalKind.ValueType, name: str, **fields: Any) -> tuple[str, Medledger]:
            reply = await admin.identity.RegisterPrincipal(
                identity_pb.RegisterPrincipalRequest(request_id=rid(), kind=kind, **fields)
            )
            pid = reply.principal.principal_id
            self.result.cast[pid] = name
            self.say.say(f"{name}: {pid}")
            return pid, self.client(pid, reply.client_secret)

        self.hospital_id, _ = await register(Kind.PRINCIPAL_KIND_ORGANIZATION, "St. Mary's Hospital")
        staff = {"organization_id": self.hospital_id}
        self.doctor_id, self.doctor = await register(
            Kind.PRINCIPAL_KIND_PRACTITIONER,
            "Dr. Grey (doctor)",
            fhir_resource=practitioner_resource("Grey", "Meredith"),
            **staff,
        )
        self.emergency_id, self.emergency = await register(
            Kind.PRINCIPAL_KIND_PRACTITIONER,
            "Dr. Ross (emergency)",
            fhir_resource=practitioner_resource("Ross", "Doug"),
            **staff,
        )
        self.officer_id, self.officer = await register(
            Kind.PRINCIPAL_KIND_PRACTITIONER,
            "Ms. Lee (privacy officer)",
            fhir_resource=practitioner_resource("Lee", "Kim"),
            **staff,
        )
        await admin.identity.AssignRole(
            identity_pb.AssignRoleRequest(
                request_id=rid(), principal_id=self.officer_id, role=vocab.Role.ROLE_PRIVACY_OFFICER
            )
        )
        self.say.say("  … given the privacy-officer role")
        self.researcher_id, self.researcher = await register(Kind.PRINCIPAL_KIND_RESEARCHER, "a researcher")

        # The patient registers themselves: a public RPC, no token.
        anonymous = self.client()
        registered = await anonymous.identity.RegisterPatient(
            identity_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=patient_resource())
        )
        self.patient_id = registered.principal.principal_id
        self.result.patient_id = self.patient_id
        self.result.cast[self.patient_id] = "the patient"
        self.patient = self.client(self.patient_id, registered.client_secret)
        self.say.say(f"the patient: {self.patient_id} (name and birth date kept encrypted in identity only)")

        # The hospital allows emergency access; its privacy officer reviews every use.
        await until_known(
            lambda: admin.consent.SetBreakGlassPolicy(
                consent_pb.SetBreakGlassPolicyRequest(
                    request_id=rid(),
                    policy=consent_pb.BreakGlassPolicy(organization_id=self.hospital_id, enabled=True),
                )
            )
        )
        self.say.say("the hospital's break-glass policy: enabled, each use reviewed by its privacy officer")

    async def grant_consent(self) -> None:
        self.say.step(f"The patient grants Dr. Grey read and write of Observations for treatment, {CONSENT_DAYS} days")
        now = time.time()
        request = consent_pb.GrantConsentRequest(
            request_id=rid(),
            patient_id=self.patient_id,
            grantee_id=self.doctor_id,
            provision=consent_pb.ProvisionType.PROVISION_TYPE_PERMIT,
            actions=[READ, WRITE],
            categories=[OBSERVATIONS],
            purposes=[TREAT],
            period_start=_timestamp(now),
            period_end=_timestamp(now + CONSENT_DAYS * 86400),
        )
        granted = await until_known(lambda: self.patient.consent.GrantConsent(request))
        self.consent_id = granted.consent.consent_id
        self.say.say(
            f"consent {self.consent_id} version {granted.consent.version}, commitment "
            f"{granted.consent.commitment[:16]}… (a FHIR Consent; its commitment goes on chain, never its content)"
        )

    async def store_and_read(self) -> None:
        self.say.step("Dr. Grey stores a blood-pressure Observation (128/82 mmHg)")
        content = blood_pressure(self.patient_id)
        put = await self.doctor.records.PutRecord(
            records_pb.PutRecordRequest(
                request_id=rid(),
                patient_id=self.patient_id,
                category=OBSERVATIONS,
                content=content,
                media_type="application/fhir+json",
            )
        )
        self.record_id = self.result.record_id = put.record_id
        self.receipt = put.receipt
        self.say.say(
            f"record {put.record_id} version {put.version}: encrypted under the patient's key; "
            f"receipt commitment {put.receipt.commitment[:16]}…"
        )

        self.say.step("Dr. Grey reads it for treatment")
        got = await self.doctor.records.GetRecord(records_pb.GetRecordRequest(record_id=self.record_id, purpose=TREAT))
        self.result.record, self.result.salt = got.content, got.receipt.salt
        self.say.say(f"permitted (decision {got.decision_id}); {len(got.content)} bytes returned")
        recomputed = commitments.record_commitment(got.content, bytes.fromhex(got.receipt.salt))
        self.check(
            "receipt commitment",
            recomputed == self.receipt.commitment,
            "the receipt's commitment recomputes from the bytes returned and the salt",
        )

    async def deny_the_researcher(self) -> None:
        self.say.step("A researcher asks for the record for research")
        await self.expect(
            "researcher denied",
            self.researcher.records.GetRecord(records_pb.GetRecordRequest(record_id=self.record_id, purpose=HRESCH)),
            grpc.StatusCode.PERMISSION_DENIED,
            "the researcher is denied",
        )

    async def break_the_glass(self) -> None:
        self.say.step("Dr. Ross, in the emergency room, has no consent: they break the glass")
        await self.expect(
            "no emergency read without break-glass",
            self.emergency.records.GetRecord(records_pb.GetRecordRequest(record_id=self.record_id, purpose=ETREAT)),
            grpc.StatusCode.PERMISSION_DENIED,
            "before breaking the glass, Dr. Ross is denied",
        )
        access = (
            await until_known(
                lambda: self.emergency.consent.BreakGlass(
                    consent_pb.BreakGlassRequest(
                        request_id=rid(),
                        patient_id=self.patient_id,
                        reason=consent_pb.BreakGlassReason.BREAK_GLASS_REASON_PATIENT_UNABLE_TO_CONSENT,
                        justification="Patient unconscious on arrival; blood pressure history needed now.",
                    )
                )
            )
        ).access
        self.break_glass_access_id = access.access_id
        self.say.say(
            f"break-glass access {access.access_id}: read only, for emergency treatment, until "
            f"{access.expires_at.ToDatetime():%H:%M} UTC; the patient and the privacy officers are notified"
        )
        got = await self.emergency.records.GetRecord(
            records_pb.GetRecordRequest(record_id=self.record_id, purpose=ETREAT)
        )
        self.check(
            "break-glass read",
            got.content == self.result.record,
            f"Dr. Ross reads the record under break-glass (decision {got.decision_id})",
        )

        self.say.say("the privacy officer reviews the pending use")
        pending = [
            a
            async for a in pages(
                self.officer.consent.ListBreakGlassAccesses,
                consent_pb.ListBreakGlassAccessesRequest(organization_id=self.hospital_id, pending_only=True),
                "accesses",
            )
        ]
        self.check(
            "break-glass pending review",
            any(a.access_id == access.access_id for a in pending),
            f"the use is pending review ({len(pending)} pending at the hospital)",
        )
        reviewed = await self.officer.consent.ReviewBreakGlassAccess(
            consent_pb.ReviewBreakGlassAccessRequest(
                request_id=rid(),
                access_id=access.access_id,
                review=consent_pb.BreakGlassReview.BREAK_GLASS_REVIEW_JUSTIFIED,
            )
        )
        self.check(
            "break-glass reviewed",
            reviewed.access.review == consent_pb.BreakGlassReview.BREAK_GLASS_REVIEW_JUSTIFIED,
            f"the privacy officer judged it justified ({consent_pb.BreakGlassReview.Name(reviewed.access.review)})",
        )

    async def revoke(self) -> None:
        self.say.step("The patient revokes the consent")
        revoked = await self.patient.consent.RevokeConsent(
            consent_pb.RevokeConsentRequest(request_id=rid(), consent_id=self.consent_id)
        )
        self.say.say(
            f"consent {self.consent_id} version {revoked.consent.version}: "
            f"{consent_pb.ConsentStatus.Name(revoked.consent.status)}"
        )
        await self.expect(
            "revoked consent denies",
            self.doctor.records.GetRecord(records_pb.GetRecordRequest(record_id=self.record_id, purpose=TREAT)),
            grpc.StatusCode.PERMISSION_DENIED,
            "Dr. Grey is now denied",
        )

    async def list_who_saw(self) -> None:
        self.say.step("The patient asks the audit log who saw their data")

        # Two reads and three denials went out as events; the log has them a moment later.
        async def all_accesses() -> list[tuple[int, bytes, dict[str, Any]]] | None:
            listed = [
                (e.index, e.entry, json.loads(e.entry))
                async for e in pages(
                    self.patient.audit.ListEntries, audit_pb.ListEntriesRequest(patient_id=self.patient_id), "entries"
                )
                if e.entry
            ]
            accesses = [(i, b, e) for i, b, e in listed if e["type"] in ("record.disclosed", "record.access_denied")]
            return accesses if len(accesses) >= 5 else None

        accesses = await _eventually(all_accesses, "the audit log to hold every access", LEARN_WAIT_SECONDS, self.say)
        for _, _, entry in accesses:
            verb = "read" if entry["type"] == "record.disclosed" else "was DENIED"
            why = "" if entry["type"] == "record.disclosed" else f" ({entry.get('reason_code', '')})"
            self.say.say(
                f"{entry['event_time'][:19]}  {self.name(entry['actor_id'])} {verb} record for "
                f"{entry['purpose'].removeprefix('PURPOSE_OF_USE_')}{why}"
            )
        readers = {e["actor_id"] for _, _, e in accesses if e["type"] == "record.disclosed"}
        self.check(
            "who saw my data",
            readers == {self.doctor_id, self.emergency_id},
            "the log shows exactly who read the record: " + ", ".join(sorted(self.name(r) for r in readers)),
        )
        # The patient's first disclosure: its entry exactly as the log holds it, for its proof.
        self.access_index, self.access_bytes = next((i, b) for i, b, e in accesses if e["type"] == "record.disclosed")

    async def anchored_proof(
        self, request: anchoring_pb.GetAnchoredProofRequest, what: str
    ) -> anchoring_pb.GetAnchoredProofResponse:
        async def fetch() -> anchoring_pb.GetAnchoredProofResponse | None:
            try:
                reply: anchoring_pb.GetAnchoredProofResponse = await self.patient.anchoring.GetAnchoredProof(request)
                return reply
            except RpcError as exc:
                if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                    return None  # not in the log yet, or not anchored yet
                raise

        return await _eventually(fetch, what, self.config.anchor_wait_seconds, self.say, every=1.0)

    async def verify(self, proof: anchoring_pb.GetAnchoredProofResponse, entry: bytes, **record: Any) -> Verification:
        w3 = chain.connect(self.config.rpc_url)
        try:
            return await verify_anchored_proof(
                self.config.trust_policy, proof.tlog_proof, entry, proof.anchor_json, w3, **record
            )
        finally:
            await w3.provider.disconnect()

    def report(self, name: str, verification: Verification) -> bool:
        for c in verification.checks:
            self.say.say(f"  {'✓' if c.passed else '✗'} {c.name}: {c.detail}")
        self.say.say(verification.verdict())
        v = verification
        if v.verified and v.anchored_at is not None:
            detail = (
                f"all {len(v.checks)} checks: entry {v.index} in the signed checkpoint of {v.checkpoint_size}, "
                f"anchored in block {v.block_number} at {v.anchored_at:%H:%M:%S} UTC"
            )
        else:
            detail = v.verdict()
        return self.check(name, v.verified, detail)

    async def prove_the_record(self) -> None:
        self.say.step("Fetching the record's proof once its checkpoint is anchored on chain")
        started = time.monotonic()
        proof = await self.anchored_proof(
            anchoring_pb.GetAnchoredProofRequest(commitment=self.receipt.commitment), "the record's anchored proof"
        )
        self.result.record_proof = proof
        a = proof.anchor
        self.say.say(
            f"after {time.monotonic() - started:.0f} s: entry {proof.entry_index} is in checkpoint {a.tree_size}, "
            f"anchored in block {a.block_number} (transaction {a.transaction_hash[:18]}…)"
        )
        self.say.say("verifying it against the trust policy and the chain, trusting nothing the services say:")
        self.report(
            "record proof verifies",
            await self.verify(proof, proof.entry, record=self.result.record, salt_hex=self.result.salt),
        )

        self.say.say(f"and the patient's first disclosure (entry {self.access_index}):")
        access = await self.anchored_proof(
            anchoring_pb.GetAnchoredProofRequest(entry_index=self.access_index), "the disclosure's anchored proof"
        )
        self.result.access_proof = access
        self.report("disclosure proof verifies", await self.verify(access, self.access_bytes))

    async def show_the_latest_anchor(self) -> None:
        self.say.step("The log's latest signed checkpoint, anchored")
        latest = await self.patient.audit.GetLatestCheckpoint(audit_pb.GetLatestCheckpointRequest())
        self.say.say(f"the log has signed a checkpoint of {latest.tree_size} entries")

        async def covered() -> anchoring_pb.GetLatestAnchorResponse | None:
            reply = await self.patient.anchoring.GetLatestAnchor(anchoring_pb.GetLatestAnchorRequest())
            return reply if reply.anchor.tree_size >= latest.tree_size else None

        reply = await _eventually(covered, "an anchor of that checkpoint", self.config.anchor_wait_seconds, self.say)
        a = reply.anchor
        on_chain = await _registry_latest_size(self.config.rpc_url, self.config.trust_policy)
        self.check(
            "latest checkpoint anchored",
            on_chain >= latest.tree_size,
            f"AnchorRegistry {a.contract_address[:10]}… on chain {a.chain_id} holds tree size {on_chain} "
            f"(block {a.block_number}), covering the checkpoint of {latest.tree_size}",
        )

    async def erase(self) -> None:
        self.say.step("The patient asks for their records to be erased; the privacy officer approves")
        requested = (
            await self.patient.records.RequestErasure(
                records_pb.RequestErasureRequest(
                    request_id=rid(), patient_id=self.patient_id, reason="the patient withdraws from the hospital"
                )
            )
        ).erasure
        self.say.say(
            f"erasure {requested.erasure_id}: {records_pb.ErasureState.Name(requested.state)} until approved "
            f"or {requested.runs_after.ToDatetime():%Y-%m-%d}"
        )
        approved = (
            await self.officer.records.ApproveErasure(records_pb.ApproveErasureRequest(erasure_id=requested.erasure_id))
        ).erasure
        self.say.say(
            "approved: every service holding the patient's material destroys its keys and confirms"
            + (f" (awaiting {', '.join(approved.awaiting)})" if approved.awaiting else "")
        )

        async def completed() -> records_pb.Erasure | None:
            reply = await self.officer.records.GetErasure(records_pb.GetErasureRequest(erasure_id=requested.erasure_id))
            return reply.erasure if reply.erasure.state == records_pb.ErasureState.ERASURE_STATE_COMPLETED else None

        done = await _eventually(
            completed, "every participant's confirmation of the erasure", self.config.anchor_wait_seconds, self.say
        )
        cert = done.certificate
        self.check(
            "erasure completed",
            bool(cert.participants) and all(p.outcome for p in cert.participants),
            f"the patient's keys destroyed in {len([p for p in cert.participants if p.keys])} services "
            f"(crypto-shredding); {cert.records_erased} record(s), {cert.versions_erased} version(s); no backup "
            f"can restore a key after {cert.unrecoverable_after.ToDatetime():%Y-%m-%d}",
        )
        self.result.erasure_certificate = done.signed_certificate
        try:
            certified = open_certificate(done.signed_certificate, self.config.trust_policy.erasure_certificate_keys)
        except InvalidArgument as exc:
            self.check("erasure certificate verified", False, f"refused: {exc.message}")
        else:
            self.check(
                "erasure certificate verified",
                certified.facts["erasure"] == requested.erasure_id,
                "the certificate is a signed note that verifies offline against the trust policy; it says:",
            )
            for line in certified.describe():
                self.say.say(line.strip())
        if self.break_glass_access_id:
            reply = await self.officer.consent.GetBreakGlassAccess(
                consent_pb.GetBreakGlassAccessRequest(access_id=self.break_glass_access_id)
            )
            self.check(
                "break-glass justification erased",
                reply.justification == "",
                "consent destroyed its key: the emergency's justification no longer decrypts; the access stays",
            )
        await self.expect(
            "erased record unreadable",
            self.patient.records.GetRecord(records_pb.GetRecordRequest(record_id=self.record_id, purpose=TREAT)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "reading it now fails",
        )
        assert self.result.record_proof is not None
        self.say.say("the proof still verifies: the chain and the log keep hashes, never the record")
        self.report(
            "proof verifies after erasure",
            await self.verify(
                self.result.record_proof,
                self.result.record_proof.entry,
                record=self.result.record,
                salt_hex=self.result.salt,
            ),
        )

    async def write_files(self) -> None:
        out = self.config.out_dir
        if out is None:
            return
        record, access = self.result.record_proof, self.result.access_proof
        assert record is not None and access is not None
        out.mkdir(parents=True, exist_ok=True)
        policy = self.config.trust_policy
        ed25519 = [
            k for k in policy.log_verifier_keys if notes.NoteVerifier.parse(k).signature_type == notes.SIGNATURE_ED25519
        ]
        files = {
            "record.json": self.result.record,
            "record.salt": (self.result.salt + "\n").encode(),
            "record.tlog-proof": record.tlog_proof.encode(),
            "record.entry": record.entry,
            "record-anchor.json": record.anchor_json,
            "access.tlog-proof": access.tlog_proof.encode(),
            "access.entry": self.access_bytes,
            "access-anchor.json": access.anchor_json,
            "log.vkey": "".join(k + "\n" for k in ed25519).encode(),
            "trust.json": policy.to_json().encode(),
        }
        if self.result.erasure_certificate:
            files["erasure-certificate.note"] = self.result.erasure_certificate.encode()
        for name, data in files.items():
            write_atomically(out / name, data)
            self.result.written.append(out / name)


async def _registry_latest_size(rpc_url: str, policy: TrustPolicy) -> int:
    """The tree size AnchorRegistry itself holds for the log: the chain's word, not the service's."""
    w3 = chain.connect(rpc_url)
    try:
        registry = chain.contract(w3, chain.ANCHOR_REGISTRY, policy.anchor_registry)
        latest = await registry.functions.latest(policy.origin).call()
        return int(latest[0])
    finally:
        await w3.provider.disconnect()


async def run_story(config: StoryConfig, narrator: Narrator | None = None) -> StoryResult:
    return await Story(config, narrator or Narrator()).run()
