"""FHIR search through a FHIR client nobody here wrote (fhirpy): a doctor's app searches a
patient's compartment by code, date and category with paging and totals, a category consent
denies is neither returned nor counted, Provenance comes along on request, `$everything` pages
over every type, and bad or unknown parameters are answered as FHIR says."""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import parse_qs, urlparse

import aiohttp
from fhirpy import AsyncFHIRClient
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.records.v1 import records_service_pb2 as pb
from medledger.records.v1 import records_service_pb2_grpc as pb_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_sdk.channels import make_channel

Cat = vocab.DataCategory
Kind = vocab.PrincipalKind
LOINC = "http://loinc.org"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"


def rid() -> str:
    return str(uuid.uuid4())


def fhir_id(principal_id: str) -> str:
    return principal_id.replace("_", "-")


def observation(code: str, category: str, when: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": category}]}],
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "effectiveDateTime": when,
        "valueQuantity": {"value": 37.1, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"},
    }


def condition(code: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}]},
        "onsetDateTime": "2021-03-06T09:00:00Z",
    }


async def fetch(url: str, token: str, *, method: str = "GET", **kw: Any) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}", **kw.pop("headers", {})}
    async with aiohttp.ClientSession() as http, http.request(method, url, headers=headers, **kw) as response:
        return response.status, await response.json(content_type=None)


async def test_search_with_paging_totals_consent_and_everything(start_stack: Any) -> None:
    async with start_stack(records=True, audit=True, fhir=True) as stack:
        base = stack.fhir_base
        public = id_grpc.IdentityServiceStub(make_channel(stack.identity_address))
        admin = id_grpc.IdentityServiceStub(stack.admin().channel(stack.identity_address, "medledger.identity"))
        patient_resource = {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:oid:1.2.3", "value": uuid.uuid4().hex}],
            "birthDate": "1990-01-01",
        }
        patient = await public.RegisterPatient(
            id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=json.dumps(patient_resource).encode())
        )
        org = await admin.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(request_id=rid(), kind=Kind.PRINCIPAL_KIND_ORGANIZATION)
        )
        doctor = await admin.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(
                request_id=rid(),
                kind=Kind.PRINCIPAL_KIND_PRACTITIONER,
                organization_id=org.principal.principal_id,
                fhir_resource=json.dumps(
                    {"resourceType": "Practitioner", "identifier": [{"system": "urn:npi", "value": uuid.uuid4().hex}]}
                ).encode(),
            )
        )
        patient_id, doctor_id = patient.principal.principal_id, doctor.principal.principal_id
        await stack.known_to_consent(patient_id, doctor_id)
        me = stack.client(patient_id, patient.client_secret)
        records = pb_grpc.RecordsServiceStub(me.channel(f"127.0.0.1:{stack.records.grpc_port}", "medledger.records"))
        consent = co_grpc.ConsentServiceStub(me.channel(stack.consent_address, "medledger.consent"))

        # The patient's own records: six Observations, two Conditions, one Immunization.
        written = [
            (Cat.DATA_CATEGORY_OBSERVATIONS, observation("8310-5", "vital-signs", f"{year}-04-06T09:10:00Z"))
            for year in (2019, 2020, 2021, 2022)
        ]
        written += [
            (Cat.DATA_CATEGORY_OBSERVATIONS, observation("94500-6", "laboratory", f"2021-0{m}-06T09:20:00Z"))
            for m in (3, 4)
        ]
        written += [(Cat.DATA_CATEGORY_CONDITIONS, condition(c)) for c in ("49727002", "840539006")]
        written += [
            (
                Cat.DATA_CATEGORY_IMMUNIZATIONS,
                {
                    "resourceType": "Immunization",
                    "status": "completed",
                    "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "140"}]},
                    "occurrenceDateTime": "2019-04-06T09:15:00Z",
                },
            )
        ]
        reference = {"reference": f"Patient/{fhir_id(patient_id)}"}
        put = await records.PutRecords(
            pb.PutRecordsRequest(
                request_id=rid(),
                patient_id=patient_id,
                assign_fhir_identity=True,
                records=[
                    pb.RecordWrite(
                        category=category,
                        media_type="application/fhir+json",
                        content=json.dumps(
                            {**r, ("patient" if r["resourceType"] == "Immunization" else "subject"): reference}
                        ).encode(),
                    )
                    for category, r in written
                ],
            )
        )
        assert len(put.records) == 9
        # The doctor may read observations, immunizations and demographics; not conditions.
        await consent.GrantConsent(
            co_pb.GrantConsentRequest(
                request_id=rid(),
                patient_id=patient_id,
                grantee_id=doctor_id,
                provision=co_pb.ProvisionType.PROVISION_TYPE_PERMIT,
                actions=[vocab.Action.ACTION_READ],
                categories=[
                    Cat.DATA_CATEGORY_OBSERVATIONS,
                    Cat.DATA_CATEGORY_IMMUNIZATIONS,
                    Cat.DATA_CATEGORY_DEMOGRAPHICS,
                ],
                purposes=[vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT],
            )
        )
        doctor_token = await stack.client(doctor_id, doctor.client_secret).token("medledger.fhir")
        patient_token = await me.token("medledger.fhir")
        app = AsyncFHIRClient(base, authorization=f"Bearer {doctor_token}")
        own = AsyncFHIRClient(base, authorization=f"Bearer {patient_token}")
        subject = f"Patient/{fhir_id(patient_id)}"

        # By code, two per page: fhirpy follows the next links; the total says four on every page.
        temperatures = app.resources("Observation").search(patient=subject, code=f"{LOINC}|8310-5").limit(2)
        found = await temperatures.fetch_all()
        assert len(found) == 4 and {o["code"]["coding"][0]["code"] for o in found} == {"8310-5"}
        assert len({o["id"] for o in found}) == 4 and all(o["id"].startswith("rec-") for o in found)
        first = await temperatures.fetch_raw()
        assert first["type"] == "searchset" and first["total"] == 4 and len(first["entry"]) == 2
        assert all(e["search"]["mode"] == "match" for e in first["entry"])
        assert first["entry"][0]["fullUrl"] == f"{base}/Observation/{first['entry'][0]['resource']['id']}"
        next_url = next(link["url"] for link in first["link"] if link["relation"] == "next")
        assert parse_qs(urlparse(next_url).query)["_page_token"]
        assert await temperatures.count() == 4  # _summary=count's figure, through fhirpy's count()

        # By date with prefixes (a range), and by category; any system or the exact one.
        recent = (
            await app.resources("Observation").search(patient=subject, code="8310-5", date__ge="2021-01-01").fetch_all()
        )
        assert sorted(o["effectiveDateTime"][:4] for o in recent) == ["2021", "2022"]
        ranged = app.resources("Observation").search(patient=subject, date=["ge2020-01-01", "lt2021-04-01"])
        assert await ranged.count() == 2
        assert sorted(o["effectiveDateTime"][:7] for o in await ranged.fetch_all()) == ["2020-04", "2021-03"]
        labs = app.resources("Observation").search(subject=subject, category=f"{OBS_CATEGORY}|laboratory")
        assert await labs.count() == 2
        assert await app.resources("Immunization").search(patient=subject, **{"vaccine-code": "140"}).count() == 1

        # By FHIR id, and by write time (operational metadata, not the clinical date).
        by_id = await app.resources("Observation").search(patient=subject, _id=found[0]["id"]).fetch_all()
        assert [o["id"] for o in by_id] == [found[0]["id"]]
        written_at = found[0]["meta"]["lastUpdated"]
        assert await app.resources("Observation").search(patient=subject, _lastUpdated__ge=written_at[:10]).count() == 6
        assert await app.resources("Observation").search(patient=subject, _lastUpdated__lt="2000-01-01").count() == 0

        # A category consent denies is neither returned nor counted: the same search as the patient finds two.
        assert await app.resources("Condition").search(patient=subject).count() == 0
        assert await app.resources("Condition").search(patient=subject).fetch_all() == []
        assert await own.resources("Condition").search(patient=subject).count() == 2

        # POST _search with a form body answers as GET does.
        status, posted = await fetch(
            f"{base}/Observation/_search",
            doctor_token,
            method="POST",
            data={"patient": subject, "category": "laboratory"},
        )
        assert status == 200 and posted["total"] == 2

        # The Provenance of each version returned, as included entries.
        status, with_provenance = await fetch(
            f"{base}/Observation?patient={subject}&category=laboratory&_revinclude=Provenance:target", doctor_token
        )
        modes = [e["search"]["mode"] for e in with_provenance["entry"]]
        assert status == 200 and modes.count("match") == 2 and modes.count("include") == 2
        matched = {e["resource"]["id"] for e in with_provenance["entry"] if e["search"]["mode"] == "match"}
        included = [e["resource"] for e in with_provenance["entry"] if e["search"]["mode"] == "include"]
        assert {p["resourceType"] for p in included} == {"Provenance"}
        assert {p["target"][0]["reference"] for p in included} == {f"Observation/{i}/_history/1" for i in matched}
        assert {p["id"] for p in included} == {f"{i}-1" for i in matched}

        # The patient of the results, included once (identity asks consent for demographics).
        status, with_patient = await fetch(
            f"{base}/Observation?patient={subject}&category=laboratory&_include=Observation:patient", doctor_token
        )
        patients = [e for e in with_patient["entry"] if e["search"]["mode"] == "include"]
        assert status == 200 and [e["fullUrl"] for e in patients] == [f"{base}/{subject}"]

        # Unknown parameters: ignored (and left out of the self link), or 400 under Prefer: handling=strict.
        status, lenient = await fetch(f"{base}/Observation?patient={subject}&colour=blue", doctor_token)
        assert status == 200 and lenient["total"] == 6 and "colour" not in lenient["link"][0]["url"]
        status, strict = await fetch(
            f"{base}/Observation?patient={subject}&colour=blue", doctor_token, headers={"Prefer": "handling=strict"}
        )
        assert status == 400 and strict["resourceType"] == "OperationOutcome"
        assert "colour" in strict["issue"][0]["diagnostics"]
        # No patient: 400, saying search is within one patient's compartment.
        status, outcome = await fetch(f"{base}/Observation?code=8310-5", doctor_token)
        assert status == 400 and "compartment" in outcome["issue"][0]["diagnostics"]
        # An injection-shaped code is only a value: nothing matches it; an overlong one is refused.
        status, injected = await fetch(f"{base}/Observation?patient={subject}&code=' OR '1'='1", doctor_token)
        assert status == 200 and injected["total"] == 0
        status, _ = await fetch(f"{base}/Observation?patient={subject}&code={'x' * 2000}", doctor_token)
        assert status == 400

        # $everything, three a page: the Patient, then what the doctor may read, never the Conditions.
        url: str | None = f"{base}/Patient/{fhir_id(patient_id)}/$everything?_count=3"
        seen: list[dict[str, Any]] = []
        pages = 0
        while url:
            status, page = await fetch(url, doctor_token)
            assert status == 200 and page["type"] == "searchset" and len(page["entry"]) <= 3
            seen += [e["resource"] for e in page["entry"]]
            url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
            pages += 1
        kinds = sorted(r["resourceType"] for r in seen)
        assert kinds == ["Immunization"] + ["Observation"] * 6 + ["Patient"] and pages == 3
        assert next(r for r in seen if r["resourceType"] == "Patient")["birthDate"] == "1990-01-01"
        # The patient's own $everything holds the Conditions too.
        status, everything = await fetch(f"{base}/Patient/{fhir_id(patient_id)}/$everything", patient_token)
        assert status == 200
        assert sum(e["resource"]["resourceType"] == "Condition" for e in everything["entry"]) == 2
