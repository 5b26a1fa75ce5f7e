"""A SMART scoped token can do no more over FHIR than over gRPC, and no more than its scopes
(issue 24: "a scoped token refused beyond its scopes on both FHIR and gRPC").

identity issues the tokens (`IssueToken.scope`); the gateway passes the caller's token to the
services, which enforce its scopes (medledger_runtime.auth.scopes). Each refusal is shown beside
the same request with the principal's unscoped token succeeding, so it is the scope that refuses.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import aiohttp
import grpc
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.records.v1 import records_service_pb2 as rec_pb
from medledger.records.v1 import records_service_pb2_grpc as rec_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_devstack.testing import status_of
from medledger_sdk.channels import make_channel

Cat = vocab.DataCategory
Kind = vocab.PrincipalKind
CODE = grpc.StatusCode
FHIR_JSON = "application/fhir+json"
TREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT


def rid() -> str:
    return str(uuid.uuid4())


def as_fhir(principal_id: str) -> str:
    return principal_id.replace("_", "-")


async def fhir(
    http: aiohttp.ClientSession, method: str, url: str, token: str, body: Any = None
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        headers["Content-Type"] = FHIR_JSON
        data = json.dumps(body).encode()
    async with http.request(method, url, headers=headers, data=data) as response:
        return response.status, await response.json(content_type=None)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def test_a_scoped_token_is_refused_beyond_its_scopes_over_fhir_and_grpc(start_stack: Any) -> None:
    async with start_stack(records=True, audit=True, fhir=True) as stack, aiohttp.ClientSession() as http:
        base = stack.fhir_base
        public = id_grpc.IdentityServiceStub(make_channel(stack.identity_address))
        admin = id_grpc.IdentityServiceStub(stack.admin().channel(stack.identity_address, "medledger.identity"))
        patient = await public.RegisterPatient(
            id_pb.RegisterPatientRequest(
                request_id=rid(),
                fhir_patient=json.dumps(
                    {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": rid()}]}
                ).encode(),
            )
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
                    {"resourceType": "Practitioner", "identifier": [{"system": "urn:npi", "value": rid()}]}
                ).encode(),
            )
        )
        patient_id, doctor_id = patient.principal.principal_id, doctor.principal.principal_id
        await stack.known_to_consent(patient_id, doctor_id)
        records_address = f"127.0.0.1:{stack.records.grpc_port}"
        me = stack.client(patient_id, patient.client_secret)
        my_records = rec_grpc.RecordsServiceStub(me.channel(records_address, "medledger.records"))
        granted = await co_grpc.ConsentServiceStub(me.channel(stack.consent_address, "medledger.consent")).GrantConsent(
            co_pb.GrantConsentRequest(
                request_id=rid(),
                patient_id=patient_id,
                grantee_id=doctor_id,
                provision=co_pb.ProvisionType.PROVISION_TYPE_PERMIT,
                actions=[vocab.Action.ACTION_READ],
                categories=[Cat.DATA_CATEGORY_OBSERVATIONS, Cat.DATA_CATEGORY_CONDITIONS],
                purposes=[TREAT],
            )
        )
        consent_id = granted.consent.consent_id
        patient_ref = f"Patient/{as_fhir(patient_id)}"
        observation = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": patient_ref},
        }
        condition = {
            "resourceType": "Condition",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
            "subject": {"reference": patient_ref},
        }
        written = {}
        for name, resource, category in (
            ("Observation", observation, Cat.DATA_CATEGORY_OBSERVATIONS),
            ("Condition", condition, Cat.DATA_CATEGORY_CONDITIONS),
        ):
            put = await my_records.PutRecord(
                rec_pb.PutRecordRequest(
                    request_id=rid(),
                    patient_id=patient_id,
                    category=category,
                    content=json.dumps(resource).encode(),
                    media_type=FHIR_JSON,
                    assign_fhir_identity=True,
                )
            )
            written[name] = put.record_id
        obs_url, cond_url = (f"{base}/{t}/{as_fhir(written[t])}" for t in ("Observation", "Condition"))

        async def scoped(principal: Any, audience: str, scope: str) -> str:
            issued = await public.IssueToken(
                id_pb.IssueTokenRequest(
                    principal_id=principal.principal.principal_id,
                    client_secret=principal.client_secret,
                    audience=audience,
                    scope=scope,
                )
            )
            assert issued.scope == scope
            return str(issued.access_token)

        async def stored() -> list[str]:
            listed = await my_records.ListRecords(rec_pb.ListRecordsRequest(patient_id=patient_id, page_size=100))
            return sorted(r.record_id for r in listed.records)

        before = await stored()

        # --- a patient's app with patient/Observation.rs --------------------------------------------
        issued = await public.IssueToken(
            id_pb.IssueTokenRequest(
                principal_id=patient_id,
                client_secret=patient.client_secret,
                audience="medledger.fhir",
                scope="patient/Observation.rs",
            )
        )
        assert issued.scope == "patient/Observation.rs" and issued.patient == patient_id
        app, unscoped = issued.access_token, await me.token("medledger.fhir")

        # Over FHIR: reads and searches its Observations...
        status, got = await fhir(http, "GET", obs_url, app)
        assert status == 200 and got["resourceType"] == "Observation", got
        status, got = await fhir(http, "GET", f"{base}/Observation?patient={patient_ref}", app)
        assert status == 200 and [e["resource"]["id"] for e in got["entry"]] == [as_fhir(written["Observation"])]
        # ...and nothing else: a Condition read or search, a create, an update (the unscoped token may).
        for method, url, body in (
            ("GET", cond_url, None),
            ("GET", f"{base}/Condition?patient={patient_ref}", None),
            ("POST", f"{base}/Observation", observation),
            ("PUT", obs_url, {**observation, "id": as_fhir(written["Observation"]), "status": "amended"}),
            ("POST", f"{base}/Condition", condition),
        ):
            status, got = await fhir(http, method, url, app, body)
            assert status == 403 and got["resourceType"] == "OperationOutcome", (method, url, status, got)
            assert got["issue"][0]["code"] == "forbidden"
        status, got = await fhir(http, "GET", cond_url, unscoped)
        assert status == 200 and got["resourceType"] == "Condition"

        # Over gRPC, the same token's twin for records: the same reads allowed, the same refused.
        app_records = rec_grpc.RecordsServiceStub(make_channel(records_address))
        grpc_token = await scoped(patient, "medledger.records", "patient/Observation.rs")
        got_obs = await app_records.GetRecord(
            rec_pb.GetRecordRequest(record_id=written["Observation"]), metadata=bearer(grpc_token)
        )
        assert json.loads(got_obs.content)["resourceType"] == "Observation"
        assert (
            await status_of(
                app_records.GetRecord(
                    rec_pb.GetRecordRequest(record_id=written["Condition"]), metadata=bearer(grpc_token)
                )
            )
            == CODE.PERMISSION_DENIED
        )
        put = rec_pb.PutRecordRequest(
            request_id=rid(),
            patient_id=patient_id,
            category=Cat.DATA_CATEGORY_OBSERVATIONS,
            content=json.dumps(observation).encode(),
            media_type=FHIR_JSON,
        )
        assert await status_of(app_records.PutRecord(put, metadata=bearer(grpc_token))) == CODE.PERMISSION_DENIED
        search = rec_pb.SearchRecordsRequest(patient_id=patient_id, resource_type="Condition", page_size=10)
        assert await status_of(app_records.SearchRecords(search, metadata=bearer(grpc_token))) == CODE.PERMISSION_DENIED
        # The FHIR token itself is no key to more over gRPC (its audiences list records).
        assert await status_of(app_records.PutRecord(put, metadata=bearer(app))) == CODE.PERMISSION_DENIED
        # Nothing refused was stored.
        assert await stored() == before

        # --- a practitioner's app with user/Observation.rs -------------------------------------------
        doctor_app = await scoped(doctor, "medledger.fhir", "user/Observation.rs")
        doctor_unscoped = await stack.client(doctor_id, doctor.client_secret).token("medledger.fhir")
        status, got = await fhir(http, "GET", obs_url, doctor_app)
        assert status == 200 and got["resourceType"] == "Observation", got
        consent_url = f"{base}/Consent/{as_fhir(consent_id)}"
        status, got = await fhir(http, "GET", consent_url, doctor_unscoped)
        assert status == 200 and got["resourceType"] == "Consent", got
        for url in (consent_url, cond_url, f"{base}/Consent?actor=Practitioner/{as_fhir(doctor_id)}"):
            status, got = await fhir(http, "GET", url, doctor_app)
            assert status == 403 and got["resourceType"] == "OperationOutcome", (url, status, got)
        # Over gRPC: GetConsent refused to the scoped token, answered to the unscoped one.
        consent_channel = make_channel(stack.consent_address)
        consents = co_grpc.ConsentServiceStub(consent_channel)
        get = co_pb.GetConsentRequest(consent_id=consent_id)
        doctor_consent_token = await scoped(doctor, "medledger.consent", "user/Observation.rs")
        assert (
            await status_of(consents.GetConsent(get, metadata=bearer(doctor_consent_token))) == CODE.PERMISSION_DENIED
        )
        doctor_login = stack.client(doctor_id, doctor.client_secret)
        assert (
            await status_of(consents.GetConsent(get, metadata=bearer(await doctor_login.token("medledger.consent"))))
            == CODE.OK
        )
        doctor_records_token = await scoped(doctor, "medledger.records", "user/Observation.rs")
        read = rec_pb.GetRecordRequest(record_id=written["Observation"], purpose=TREAT)
        assert await status_of(app_records.GetRecord(read, metadata=bearer(doctor_records_token))) == CODE.OK
        read_condition = rec_pb.GetRecordRequest(record_id=written["Condition"], purpose=TREAT)
        assert (
            await status_of(app_records.GetRecord(read_condition, metadata=bearer(doctor_records_token)))
            == CODE.PERMISSION_DENIED
        )
