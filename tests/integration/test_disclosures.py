"""Every read of personal data leaves a durable disclosure entry, on a live stack (identity,
consent, records and audit on PostgreSQL and Tansu).

Which RPCs answer with personal data is read from the service descriptors (response fields marked
`personal_data: PERSONAL_DATA_CONTENT`), not listed by hand: the test fails if one is added without
a call here. Each is called by a principal it allows, and right after the answer the answering
service's outbox must hold a committed read event naming the caller as actor and the patient as
subject (durable before the answer); called by a principal it refuses, it must leave none. Then the
patient's own entries show who saw their data, the auditor's reading of them included.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
from google.protobuf import message as pb_message
from medledger.anchoring.v1 import anchoring_service_pb2
from medledger.audit.v1 import audit_service_pb2 as au_pb
from medledger.audit.v1 import audit_service_pb2_grpc as au_grpc
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
from medledger.events.v1.disclosure_events_pb2 import PersonalDataDisclosed
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.records.v1 import records_service_pb2 as rec_pb
from medledger.records.v1 import records_service_pb2_grpc as rec_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab
from sqlalchemy import func, select

from medledger_audit import event_types
from medledger_devstack import synthetic
from medledger_devstack.testing import eventually, status_of
from medledger_identity import main as identity_main
from medledger_runtime.disclosures import disclosing_methods
from medledger_runtime.events import decode, unpack
from medledger_runtime.outbox import outbox

CODE = grpc.StatusCode
Kind = vocab.PrincipalKind
OBS = vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS
TREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT
READ = vocab.Action.ACTION_READ
DESCRIPTORS = {
    "identity": id_pb.DESCRIPTOR.services_by_name["IdentityService"],
    "consent": co_pb.DESCRIPTOR.services_by_name["ConsentService"],
    "records": rec_pb.DESCRIPTOR.services_by_name["RecordsService"],
    "audit": au_pb.DESCRIPTOR.services_by_name["AuditService"],
    "anchoring": anchoring_service_pb2.DESCRIPTOR.services_by_name["AnchoringService"],
}
STUBS = {
    "identity": id_grpc.IdentityServiceStub,
    "consent": co_grpc.ConsentServiceStub,
    "records": rec_grpc.RecordsServiceStub,
    "audit": au_grpc.AuditServiceStub,
}


# HTTP routes have no proto options: each is decided here, and a new route fails the test until
# it is. None is a disclosure (services/audit/README.md, "Reading entries is a disclosure; fetching
# tiles is not").
HTTP_ROUTES_NOT_DISCLOSURES = {
    ("identity", "/.well-known/jwks.json"): "public keys",
    ("identity", "/oauth2/token"): "a SMART client's access token: no personal data",
    ("audit", "/checkpoint"): "the signed checkpoint: public",
    ("audit", "/tile/{path:.+}"): "hash tiles (public) and entry bundles (auditors): pseudonymous "
    "subjects only, the whole log unselected; logging a monitor's fetches would feed back into itself",
}


BIRTH_DATE = "1970-01-01"
JUSTIFICATION = "Unconscious on arrival; need the medication history now"


def rid() -> str:
    return uuid.uuid4().hex


def service_of(method: str) -> str:
    """`/medledger.consent.v1.ConsentService/GetConsent` -> `consent`."""
    return method.split(".")[1]


@dataclass(frozen=True)
class Read:
    """One RPC answering with personal data: who may call it, and who is refused."""

    caller: str
    request: pb_message.Message
    patient: str  # whose data the answer holds
    refused: str  # a principal the RPC refuses for the same request


@dataclass(frozen=True)
class Seen:
    """A read event in an outbox: who read, about whom, of what type."""

    row_id: int
    type: str
    actor: str | None
    patient: str
    payload: pb_message.Message


async def last_row(db: Any) -> int:
    async with db.connect() as conn:
        return int((await conn.execute(select(func.coalesce(func.max(outbox.c.id), 0)))).scalar_one())


async def reads_since(db: Any, after: int) -> list[Seen]:
    """The successful read events (a log entry of action R, outcome 0) written after row `after`."""
    async with db.connect() as conn:
        rows = (await conn.execute(select(outbox.c.id, outbox.c.value).where(outbox.c.id > after))).all()
    seen = []
    for row_id, value in rows:
        event = decode(bytes(value))
        known = event_types.by_event_type(event.type)
        if known is None or known.audit_event.action != "R" or known.audit_event.outcome != "0":
            continue
        payload = unpack(event, known.message_class)
        actor = next((getattr(payload, f) for f in known.actor_fields if getattr(payload, f)), None)
        seen.append(Seen(row_id, event.type, actor, event.subject, payload))
    return seen


async def test_every_rpc_answering_with_personal_data_logs_its_disclosure_before_the_answer(start_stack: Any) -> None:
    async with start_stack(records=True, audit=True) as stack:
        addresses = {
            "identity": stack.identity_address,
            "consent": stack.consent_address,
            "records": f"127.0.0.1:{stack.records.grpc_port}",
            "audit": f"127.0.0.1:{stack.audit.grpc_port}",
        }
        secrets: dict[str, tuple[str, str]] = {}
        stubs: dict[tuple[str, str], Any] = {}

        def stub(service: str, who: str) -> Any:
            if (service, who) not in stubs:
                pid, secret = secrets[who]
                channel = stack.client(pid, secret).channel(addresses[service], f"medledger.{service}")
                stubs[(service, who)] = STUBS[service](channel)
            return stubs[(service, who)]

        secrets["admin"] = (identity_main.BOOTSTRAP_ADMIN, stack.admin_secret)
        admin_ids = stub("identity", "admin")

        async def register(name: str, kind: Any, organization_id: str = "", role: Any = 0) -> str:
            fhir = b""
            identifier = [{"system": "urn:oid:1.2.3", "value": rid()}]
            if kind == Kind.PRINCIPAL_KIND_PATIENT:
                patient = {"resourceType": "Patient", "identifier": identifier, "name": [{"family": "Example"}]}
                fhir = json.dumps({**patient, "birthDate": BIRTH_DATE}).encode()
            elif kind == Kind.PRINCIPAL_KIND_PRACTITIONER:
                fhir = json.dumps({"resourceType": "Practitioner", "identifier": identifier}).encode()
            reply = await admin_ids.RegisterPrincipal(
                id_pb.RegisterPrincipalRequest(
                    request_id=rid(), kind=kind, organization_id=organization_id, fhir_resource=fhir
                )
            )
            if role:
                await admin_ids.AssignRole(
                    id_pb.AssignRoleRequest(request_id=rid(), principal_id=reply.principal.principal_id, role=role)
                )
            secrets[name] = (reply.principal.principal_id, reply.client_secret)
            return str(reply.principal.principal_id)

        org = await register("organization", Kind.PRINCIPAL_KIND_ORGANIZATION)
        patient = await register("patient", Kind.PRINCIPAL_KIND_PATIENT)
        other = await register("other patient", Kind.PRINCIPAL_KIND_PATIENT)
        doctor = await register("doctor", Kind.PRINCIPAL_KIND_PRACTITIONER, org)
        researcher = await register("researcher", Kind.PRINCIPAL_KIND_RESEARCHER)
        auditor = await register("auditor", Kind.PRINCIPAL_KIND_ORGANIZATION, role=vocab.Role.ROLE_AUDITOR)
        await stack.known_to_consent(org, patient, other, doctor, researcher, auditor)

        granted = await stub("consent", "patient").GrantConsent(
            co_pb.GrantConsentRequest(
                request_id=rid(),
                patient_id=patient,
                grantee_id=doctor,
                provision=co_pb.ProvisionType.PROVISION_TYPE_PERMIT,
                actions=[READ],
                categories=[OBS],
                purposes=[TREAT],
            )
        )
        stored = await stub("records", "patient").PutRecord(
            rec_pb.PutRecordRequest(
                request_id=rid(),
                patient_id=patient,
                category=OBS,
                content=json.dumps(synthetic.population().first("Observation")).encode(),
                media_type="application/fhir+json",
            )
        )
        await stub("consent", "admin").SetBreakGlassPolicy(
            co_pb.SetBreakGlassPolicyRequest(
                request_id=rid(), policy=co_pb.BreakGlassPolicy(organization_id=org, enabled=True)
            )
        )
        broken = await stub("consent", "doctor").BreakGlass(
            co_pb.BreakGlassRequest(
                request_id=rid(),
                patient_id=other,
                reason=co_pb.BreakGlassReason.BREAK_GLASS_REASON_LIFE_THREATENING,
                justification=JUSTIFICATION,
            )
        )

        # A decision about the patient's data with the doctor as the actor (the patient asks).
        decided = await stub("consent", "patient").CheckConsent(
            co_pb.CheckConsentRequest(patient_id=patient, actor_id=doctor, action=READ, category=OBS, purpose=TREAT)
        )

        async def patients_entries_in_log() -> bool:
            listed = await stub("audit", "patient").ListEntries(au_pb.ListEntriesRequest())
            return bool(listed.entries)

        await eventually(patients_entries_in_log, "the patient's first entries in the log")

        reads: dict[str, Read] = {
            "/medledger.identity.v1.IdentityService/GetPrincipal": Read(
                "admin", id_pb.GetPrincipalRequest(principal_id=patient, include_fhir_resource=True), patient, "doctor"
            ),
            "/medledger.consent.v1.ConsentService/GetConsent": Read(
                "doctor", co_pb.GetConsentRequest(consent_id=granted.consent.consent_id), patient, "researcher"
            ),
            "/medledger.consent.v1.ConsentService/ListConsents": Read(
                "doctor", co_pb.ListConsentsRequest(grantee_id=doctor), patient, "researcher"
            ),
            "/medledger.consent.v1.ConsentService/GetDecision": Read(
                "doctor", co_pb.GetDecisionRequest(decision_id=decided.decision_id), patient, "researcher"
            ),
            "/medledger.consent.v1.ConsentService/GetBreakGlassAccess": Read(
                "admin", co_pb.GetBreakGlassAccessRequest(access_id=broken.access.access_id), other, "doctor"
            ),
            "/medledger.records.v1.RecordsService/GetRecord": Read(
                "doctor", rec_pb.GetRecordRequest(record_id=stored.record_id, purpose=TREAT), patient, "researcher"
            ),
            "/medledger.records.v1.RecordsService/SearchRecords": Read(
                "doctor",
                rec_pb.SearchRecordsRequest(patient_id=patient, resource_type="Observation", purpose=TREAT),
                patient,
                "other patient",
            ),
            "/medledger.records.v1.RecordsService/ExportRecords": Read(
                "patient", rec_pb.ExportRecordsRequest(patient_id=patient), patient, "doctor"
            ),
            "/medledger.audit.v1.AuditService/ListEntries": Read(
                "auditor", au_pb.ListEntriesRequest(patient_id=patient), patient, "other patient"
            ),
            "/medledger.audit.v1.AuditService/ExportAuditEvents": Read(
                "auditor", au_pb.ExportAuditEventsRequest(patient_id=patient), patient, "other patient"
            ),
        }
        # From the options, not by hand: every RPC whose response carries personal data is called.
        marked = set(disclosing_methods(DESCRIPTORS.values()))
        assert marked == set(reads), f"RPCs answering with personal data without a call here: {marked ^ set(reads)}"

        for method, read in reads.items():
            service = service_of(method)
            db = getattr(stack, service).db
            call = getattr(stub(service, read.refused), method.rsplit("/", 1)[1])
            before = await last_row(db)
            # Refused outright, or (consent's rule for a version the caller is no party to) as missing.
            assert await status_of(call(read.request)) in (CODE.PERMISSION_DENIED, CODE.NOT_FOUND), method
            assert not [s for s in await reads_since(db, before) if s.actor == secrets[read.refused][0]], (
                f"{method}: a refused call left a disclosure"
            )

            before = await last_row(db)
            reply = await getattr(stub(service, read.caller), method.rsplit("/", 1)[1])(read.request)
            # Read at once, after the answer: the disclosure was committed before it was sent.
            seen = [s for s in await reads_since(db, before) if s.actor == secrets[read.caller][0]]
            assert seen, f"{method}: no disclosure committed before the answer"
            assert read.patient in {s.patient for s in seen}, f"{method}: the disclosure names another patient"
            assert reply.ByteSize() > 0
            for s in seen:
                if isinstance(s.payload, PersonalDataDisclosed):
                    assert s.payload.method == method and s.payload.patient_id == s.patient
                    # The patient's id only as the subject, never among the resources.
                    assert all(not r.startswith("pat_") for r in s.payload.resource_ids)

        # What was disclosed is in no event: ids only.
        for name in ("identity", "consent", "records", "audit"):
            async with getattr(stack, name).db.connect() as conn:
                values = b"".join(bytes(v) for v in (await conn.execute(select(outbox.c.value))).scalars())
            assert BIRTH_DATE.encode() not in values and JUSTIFICATION.encode() not in values, name

        # The HTTP routes: each decided, and an auditor's entry bundle leaves nothing to log (a
        # monitor fetching the log does not grow it).
        served = {
            (name, route.path)
            for name in ("identity", "consent", "records", "audit")
            if getattr(stack, name).http is not None
            for route in getattr(stack, name).http._declared.values()
        }
        assert served == set(HTTP_ROUTES_NOT_DISCLOSURES)
        before = await last_row(stack.audit.db)
        token = await stack.client(*secrets["auditor"]).token("medledger.audit")
        url = f"http://127.0.0.1:{stack.audit.http_port}/tile/entries/000.p/1"
        async with aiohttp.ClientSession() as http, http.get(url, headers={"Authorization": f"Bearer {token}"}) as got:
            assert got.status == 200 and await got.read()
        assert not await reads_since(stack.audit.db, before)

        # An answer without personal data is no disclosure: the principal without its resource.
        db = stack.identity.db
        before = await last_row(db)
        plain = await admin_ids.GetPrincipal(id_pb.GetPrincipalRequest(principal_id=patient))
        assert plain.principal.principal_id == patient and not plain.fhir_resource
        assert not await reads_since(db, before)

        # Who saw my data: the patient's own entries show each of these reads, the auditor's
        # reading of their entries included (who audited whom); the other patient's, the reading of
        # the justification of the break-glass access to their data.
        admin = identity_main.BOOTSTRAP_ADMIN

        def disclosed_in(entries: Any) -> set[tuple[str, str]]:
            parsed = (json.loads(x.entry) for x in entries)
            return {(e["actor_id"], e["method"]) for e in parsed if e["type"] == "personal_data.disclosed"}

        async def patient_sees_every_read() -> bool:
            listed = await stub("audit", "patient").ListEntries(au_pb.ListEntriesRequest(page_size=1000))
            return {
                (admin, "/medledger.identity.v1.IdentityService/GetPrincipal"),
                (doctor, "/medledger.consent.v1.ConsentService/GetConsent"),
                (doctor, "/medledger.consent.v1.ConsentService/ListConsents"),
                (auditor, "/medledger.audit.v1.AuditService/ListEntries"),
                (auditor, "/medledger.audit.v1.AuditService/ExportAuditEvents"),
            } <= disclosed_in(listed.entries)

        await eventually(patient_sees_every_read, "the disclosures in the patient's own entries")

        async def other_patient_sees_the_justification_read() -> set[tuple[str, str]] | None:
            listed = await stub("audit", "other patient").ListEntries(au_pb.ListEntriesRequest(page_size=1000))
            found = disclosed_in(listed.entries)
            return found if (admin, "/medledger.consent.v1.ConsentService/GetBreakGlassAccess") in found else None

        found = await eventually(other_patient_sees_the_justification_read, "the other patient's disclosure")
        assert not {m for _, m in found if m.endswith(("/GetConsent", "/GetPrincipal"))}, "another patient's reads"
