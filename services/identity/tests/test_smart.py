"""identity as the SMART on FHIR authorization server: the scope grammar, scoped tokens, SMART
clients and their JWKS, the OAuth 2.0 token endpoint over HTTP (client_credentials with an
ES384 assertion made here with joserfc), and finding principals by identifier. On SQLite with
identity's migrations, a real local keyring and the runtime's HTTP server and token verifier."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwk, jwt
from medledger.events.v1 import identity_events_pb2 as ev
from medledger.types.v1 import vocabulary_pb2 as v
from sqlalchemy import func, select

from medledger_identity import domain, storage
from medledger_identity.credentials import SecretHasher
from medledger_identity.oauth import JWT_BEARER, PATH, ClientCredentials, token_route
from medledger_identity.principal_commands import (
    DeactivatePrincipal,
    FindPrincipals,
    GetPrincipal,
    Registered,
    RegisterPatient,
    RegisterPrincipal,
    RegisterSmartClient,
    UpdatePrincipalResource,
)
from medledger_identity.principals import Directory
from medledger_identity.scopes import Scope, narrow, parse_scope, parse_scopes, scope_string
from medledger_identity.tokens import IssueToken, OwnTokens, TokenDesk, TokenSigner
from medledger_runtime.auth import Caller, TokenVerifier
from medledger_runtime.consent_checks import ConsentAnswer
from medledger_runtime.db import Database
from medledger_runtime.errors import AlreadyExists, InvalidArgument, PermissionDenied, Unauthenticated
from medledger_runtime.events import decode, unpack
from medledger_runtime.http_server import HttpServer
from medledger_runtime.keys import LocalKeyring, create_master_key_file
from medledger_runtime.outbox import COMMON_MIGRATIONS, outbox

Kind = v.PrincipalKind
ADMIN = Caller("svc_admin", "service", frozenset({"admin"}), "", "tok_admin", 0.0)
SSN = "urn:oid:2.16.840.1.113883.4.1"
NPI = "http://hl7.org/fhir/sid/us-npi"


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


# -- the scope grammar (pure) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("patient/Observation.rs", Scope("patient", "Observation", "rs")),
        ("user/*.cruds", Scope("user", "*", "cruds")),
        ("system/*.rs", Scope("system", "*", "rs")),
        ("system/MedicationRequest.c", Scope("system", "MedicationRequest", "c")),
        # v1, written as v2.
        ("patient/Observation.read", Scope("patient", "Observation", "rs")),
        ("user/Patient.write", Scope("user", "Patient", "cud")),
        ("system/*.*", Scope("system", "*", "cruds")),
    ],
)
def test_a_scope_parses_to_its_v2_form(text: str, expected: Scope) -> None:
    assert parse_scope(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "patient/Observation.sr",  # letters out of order
        "patient/Observation.rr",
        "patient/Observation.",
        "patient/Observation.x",
        "patient/observation.rs",  # not a resource type
        "patient/Observation.rs?category=laboratory",
        "group/Observation.rs",
        "patient/Observation",
        "openid",
        "launch/patient",
        "offline_access",
        "patient/*.cruds ",  # trailing space
        "patient/*.rs  user/*.rs",  # two spaces
    ],
)
def test_a_malformed_scope_is_invalid_argument_naming_scope(text: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse_scopes(text)
    assert raised.value.violations[0].field == "scope"


def test_scopes_are_listed_once_and_narrowed_to_what_is_allowed() -> None:
    requested = parse_scopes("system/Observation.cruds system/Patient.rs system/Observation.cruds system/Encounter.r")
    assert scope_string(requested) == "system/Observation.cruds system/Patient.rs system/Encounter.r"
    allowed = parse_scopes("system/Observation.rs system/*.s")
    assert scope_string(narrow(requested, allowed)) == "system/Observation.rs system/Patient.s"
    assert narrow(parse_scopes("system/Encounter.c"), allowed) == ()
    assert narrow(parse_scopes("user/Observation.rs"), allowed) == ()
    assert parse_scopes("") == ()


# -- fixtures ----------------------------------------------------------------------------------------


@dataclass
class Desk:
    principals: Directory
    tokens: TokenDesk
    db: Database
    keys: LocalKeyring

    async def count(self, table: object) -> int:
        async with self.db.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())  # type: ignore[arg-type]

    async def event_names(self) -> list[str]:
        async with self.db.connect() as conn:
            rows = (await conn.execute(select(outbox.c.value).order_by(outbox.c.id))).all()
        return [decode(raw).type.rsplit(".", 1)[1] for (raw,) in rows]

    def verifier(self, audience: str) -> TokenVerifier:
        return TokenVerifier(issuer=domain.ISSUER, audience=audience, fetch_jwks=self.tokens.signer.jwks)


@pytest.fixture
async def desk(tmp_path: Path) -> AsyncIterator[Desk]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/identity.db")
    await db.migrate("common", COMMON_MIGRATIONS)
    await db.migrate("identity", storage.MIGRATIONS)
    master = create_master_key_file(tmp_path / "secrets" / "master.key")
    keys = await LocalKeyring.open(tmp_path / "keys" / "identity.keyring", master)
    hasher = SecretHasher()
    principals = Directory(db, keys, hasher, lambda: None)
    tokens = TokenDesk(db, TokenSigner(keys), hasher, lambda: None)
    await principals.start()
    await tokens.start()
    try:
        yield Desk(principals, tokens, db, keys)
    finally:
        await db.close()
        await keys.aclose()


def resource(resource_type: str, system: str, value: str) -> bytes:
    return json.dumps({"resourceType": resource_type, "identifier": [{"system": system, "value": value}]}).encode()


async def register(desk: Desk, kind: int, organization_id: str = "", fhir: bytes = b"") -> Registered:
    registered: Registered = await desk.principals.register_principal(
        ADMIN, RegisterPrincipal(kind, organization_id, fhir)
    )
    return registered


async def a_patient(desk: Desk, ssn: str = "123-45-6789") -> Registered:
    registered: Registered = await desk.principals.register_patient(
        RegisterPatient(fhir_patient=resource("Patient", SSN, ssn))
    )
    return registered


def es384_key(kid: str = "k1") -> jwk.ECKey:
    return jwk.ECKey.generate_key("P-384", parameters={"kid": kid}, private=True)


def public_jwks(*keys: jwk.ECKey | jwk.RSAKey) -> str:
    return json.dumps({"keys": [k.as_dict(private=False) for k in keys]})


# -- scoped IssueToken -------------------------------------------------------------------------------


async def test_a_patients_scoped_token_names_the_patient_and_carries_the_scope(desk: Desk) -> None:
    registered = await a_patient(desk)
    pid = registered.principal.principal_id
    issued = await desk.tokens.issue(
        IssueToken(pid, registered.client_secret, "medledger.records", "patient/Observation.rs patient/Patient.read")
    )
    assert (issued.scope, issued.patient) == ("patient/Observation.rs patient/Patient.rs", pid)
    claims = claims_of(issued.access_token)
    assert claims["scope"] == "patient/Observation.rs patient/Patient.rs" and claims["patient"] == pid
    assert claims["aud"] == "medledger.records" and claims["kind"] == "patient"

    # A patient asks for their own context only.
    for scope in ("user/Observation.rs", "system/*.rs", "patient/Observation.rs user/*.r"):
        with pytest.raises(InvalidArgument) as raised:
            await desk.tokens.issue(IssueToken(pid, registered.client_secret, "medledger.records", scope))
        assert raised.value.violations[0].field == "scope"

    # Unscoped tokens are as before: no scope, no patient.
    plain = await desk.tokens.issue(IssueToken(pid, registered.client_secret, "medledger.records"))
    assert (plain.scope, plain.patient) == ("", "")
    assert "scope" not in claims_of(plain.access_token) and "patient" not in claims_of(plain.access_token)


async def test_a_practitioners_scoped_token_is_in_user_context(desk: Desk) -> None:
    org = (await register(desk, Kind.PRINCIPAL_KIND_ORGANIZATION)).principal
    doctor = await register(
        desk, Kind.PRINCIPAL_KIND_PRACTITIONER, org.principal_id, resource("Practitioner", NPI, "1")
    )
    pid = doctor.principal.principal_id
    issued = await desk.tokens.issue(IssueToken(pid, doctor.client_secret, "medledger.consent", "user/*.cruds"))
    assert (issued.scope, issued.patient) == ("user/*.cruds", "")
    claims = claims_of(issued.access_token)
    assert claims["scope"] == "user/*.cruds" and "patient" not in claims and claims["org"] == org.principal_id
    for scope in ("patient/Observation.rs", "system/*.rs"):
        with pytest.raises(InvalidArgument):
            await desk.tokens.issue(IssueToken(pid, doctor.client_secret, "medledger.consent", scope))
    # A malformed scope is refused too, whoever asks, before the secret is even checked.
    with pytest.raises(InvalidArgument):
        await desk.tokens.issue(IssueToken(pid, "wrong", "medledger.consent", "user/*.sr"))
    with pytest.raises(Unauthenticated):
        await desk.tokens.issue(IssueToken(pid, "wrong", "medledger.consent", "user/*.rs"))


async def test_a_token_for_the_fhir_gateway_is_accepted_by_the_services_it_calls(desk: Desk) -> None:
    registered = await a_patient(desk)
    pid = registered.principal.principal_id
    issued = await desk.tokens.issue(IssueToken(pid, registered.client_secret, "medledger.fhir", "patient/*.rs"))
    assert claims_of(issued.access_token)["aud"] == list(domain.FHIR_TOKEN_AUDIENCES)
    for audience in domain.FHIR_TOKEN_AUDIENCES:
        caller = await desk.verifier(audience).verify(issued.access_token)
        # The runtime reads what identity wrote: the scopes and the patient in context.
        assert (caller.principal_id, caller.patient_context) == (pid, pid)
        assert caller.scopes is not None and str(caller.scopes) == "patient/*.rs"
        caller.require_scope("Observation", "r", pid)
        with pytest.raises(PermissionDenied):
            caller.require_scope("Observation", "r", "pat_someone_else")
        with pytest.raises(PermissionDenied):
            caller.require_scope("Observation", "c", pid)
    with pytest.raises(Unauthenticated):
        await desk.verifier("medledger.anchoring").verify(issued.access_token)


# -- RegisterSmartClient -----------------------------------------------------------------------------


async def test_a_smart_client_is_registered_with_its_public_keys_and_system_scopes(desk: Desk) -> None:
    org = (await register(desk, Kind.PRINCIPAL_KIND_ORGANIZATION)).principal
    key = es384_key()
    org_admin = Caller("prn_oa", "practitioner", frozenset({"org-admin"}), org.principal_id, "tok", 0.0)
    row = await desk.principals.register_smart_client(
        org_admin,
        RegisterSmartClient(org.principal_id, public_jwks(key), ("system/Observation.rs", "system/Patient.read")),
    )
    assert row.principal_id.startswith("cli_") and row.kind == Kind.PRINCIPAL_KIND_SMART_CLIENT
    assert row.organization_id == org.principal_id and row.roles == ()
    async with desk.db.connect() as conn:
        client = await storage.get_smart_client(conn, row.principal_id)
        assert await storage.get_secret_hash(conn, row.principal_id) is None  # no secret at all
    assert client is not None and client.allowed_scopes == "system/Observation.rs system/Patient.rs"
    assert [k["kid"] for k in json.loads(client.jwks_json)["keys"]] == ["k1"]
    assert "d" not in json.loads(client.jwks_json)["keys"][0]
    assert await desk.event_names() == ["PrincipalRegistered", "PrincipalRegistered"]
    async with desk.db.connect() as conn:
        raw = (await conn.execute(select(outbox.c.value).order_by(outbox.c.id.desc()))).first()
    assert raw is not None
    assert unpack(decode(raw[0]), ev.PrincipalRegistered) == ev.PrincipalRegistered(
        principal_id=row.principal_id, kind=Kind.PRINCIPAL_KIND_SMART_CLIENT, organization_id=org.principal_id
    )
    # No client secret: IssueToken never answers for a SMART client.
    with pytest.raises(Unauthenticated):
        await desk.tokens.issue(IssueToken(row.principal_id, "anything", "medledger.fhir"))

    # An org-admin of another organization may not; nor may a SMART client be made as a principal.
    other = (await register(desk, Kind.PRINCIPAL_KIND_ORGANIZATION)).principal
    with pytest.raises(PermissionDenied):
        await desk.principals.register_smart_client(
            org_admin, RegisterSmartClient(other.principal_id, public_jwks(key), ("system/*.rs",))
        )
    with pytest.raises(InvalidArgument):
        await desk.principals.register_principal(
            ADMIN, RegisterPrincipal(Kind.PRINCIPAL_KIND_SMART_CLIENT, org.principal_id, b"")
        )


def _rsa(bits: int) -> dict[str, Any]:
    # Made with cryptography and written out by hand: joserfc warns (rightly) about short keys.
    numbers = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key().public_numbers()

    def b64(value: int) -> str:
        return base64.urlsafe_b64encode(value.to_bytes((value.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()

    return {"kty": "RSA", "n": b64(numbers.n), "e": b64(numbers.e), "kid": f"rsa{bits}"}


@pytest.mark.parametrize(
    ("jwks", "allowed", "field"),
    [
        (json.dumps({"keys": [es384_key().as_dict(private=True)]}), ("system/*.rs",), "jwks_json.keys[0]"),
        (json.dumps({"keys": [{**es384_key().as_dict(private=False), "kid": ""}]}), ("system/*.rs",),
         "jwks_json.keys[0].kid"),
        (public_jwks(es384_key("a"), es384_key("a")), ("system/*.rs",), "jwks_json.keys[1].kid"),
        (json.dumps({"keys": [jwk.ECKey.generate_key("P-256", parameters={"kid": "p"}).as_dict(private=False)]}),
         ("system/*.rs",), "jwks_json.keys[0].crv"),
        (json.dumps({"keys": [_rsa(1024)]}), ("system/*.rs",), "jwks_json.keys[0].n"),
        (json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}]}), ("system/*.rs",), "jwks_json.keys[0]"),
        (json.dumps({"keys": [{**es384_key().as_dict(private=False), "alg": "ES256"}]}), ("system/*.rs",),
         "jwks_json.keys[0].alg"),
        (public_jwks(*(es384_key(str(i)) for i in range(6))), ("system/*.rs",), "jwks_json.keys"),
        ("not json", ("system/*.rs",), "jwks_json"),
        (public_jwks(es384_key()), ("user/*.rs",), "allowed_scopes"),
        (public_jwks(es384_key()), ("system/*.sr",), "allowed_scopes"),
        (public_jwks(es384_key()), (), "allowed_scopes"),
    ],
)  # fmt: skip
async def test_an_invalid_smart_client_is_refused_and_nothing_is_stored(
    desk: Desk, jwks: str, allowed: tuple[str, ...], field: str
) -> None:
    org = (await register(desk, Kind.PRINCIPAL_KIND_ORGANIZATION)).principal
    with pytest.raises(InvalidArgument) as raised:
        await desk.principals.register_smart_client(ADMIN, RegisterSmartClient(org.principal_id, jwks, allowed))
    assert raised.value.violations[0].field == field
    assert await desk.count(storage.smart_clients) == 0
    assert await desk.count(storage.principals) == 1


async def test_an_rsa_2048_client_is_accepted(desk: Desk) -> None:
    org = (await register(desk, Kind.PRINCIPAL_KIND_ORGANIZATION)).principal
    row = await desk.principals.register_smart_client(
        ADMIN, RegisterSmartClient(org.principal_id, json.dumps({"keys": [_rsa(2048)]}), ("system/*.rs",))
    )
    async with desk.db.connect() as conn:
        client = await storage.get_smart_client(conn, row.principal_id)
    assert client is not None and json.loads(client.jwks_json)["keys"][0]["alg"] == "RS384"


# -- the token endpoint, over HTTP -------------------------------------------------------------------


@dataclass
class Endpoint:
    url: str
    client_id: str
    key: jwk.ECKey
    desk: Desk

    def assertion(self, **overrides: Any) -> str:
        key = overrides.pop("_key", None) or self.key
        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": self.url, "exp": now + 240,
                  "jti": uuid.uuid4().hex, "iat": now}  # fmt: skip
        claims.update(overrides)
        claims = {k: val for k, val in claims.items() if val is not None}
        return jwt.encode({"alg": "ES384", "kid": key.kid}, claims, key, algorithms=["ES384"])

    async def post(self, form: dict[str, str] | list[tuple[str, str]]) -> tuple[int, dict[str, Any], str]:
        async with aiohttp.ClientSession() as session, session.post(self.url, data=form) as response:
            return response.status, await response.json(content_type=None), response.headers.get("Cache-Control", "")

    def form(self, assertion: str, scope: str = "system/Observation.rs") -> dict[str, str]:
        return {
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion,
        }


@pytest.fixture
async def endpoint(desk: Desk) -> AsyncIterator[Endpoint]:
    org = (await register(desk, Kind.PRINCIPAL_KIND_ORGANIZATION)).principal
    key = es384_key("client-key-1")
    client = await desk.principals.register_smart_client(
        ADMIN, RegisterSmartClient(org.principal_id, public_jwks(key), ("system/Observation.rs", "system/Patient.r"))
    )
    port: list[int] = []
    credentials = ClientCredentials(desk.db, desk.tokens, lambda: f"http://127.0.0.1:{port[0]}{PATH}")

    async def no_token(_: str | None) -> Caller:
        raise Unauthenticated("public route only")

    server = HttpServer(
        [token_route(credentials)],
        host="127.0.0.1",
        port=0,
        authenticate=no_token,
        max_body_bytes=64 * 1024,
        shutdown_grace_seconds=0,
    )
    port.append(await server.start())
    try:
        yield Endpoint(f"http://127.0.0.1:{port[0]}{PATH}", client.principal_id, key, desk)
    finally:
        await server.stop()


async def test_a_client_gets_a_narrowed_scoped_token_for_the_fhir_gateway(endpoint: Endpoint) -> None:
    status, body, cache = await endpoint.post(
        endpoint.form(endpoint.assertion(), "system/Observation.cruds system/Patient.rs system/Encounter.r")
    )
    assert status == 200, body
    assert cache == "no-store"
    assert (body["token_type"], body["expires_in"]) == ("bearer", 300)
    assert body["scope"] == "system/Observation.rs system/Patient.r"
    claims = claims_of(body["access_token"])
    assert claims["scope"] == body["scope"] and claims["sub"] == endpoint.client_id
    assert claims["kind"] == "smart-client" and claims["roles"] == [] and "patient" not in claims
    assert claims["exp"] - claims["iat"] == 300
    for audience in domain.FHIR_TOKEN_AUDIENCES:
        caller = await endpoint.desk.verifier(audience).verify(body["access_token"])
        assert caller.kind == "smart-client" and caller.patient_context == ""
        assert caller.scopes is not None and str(caller.scopes) == "system/Observation.rs system/Patient.r"


async def test_a_replayed_assertion_is_refused_even_by_a_new_endpoint(endpoint: Endpoint) -> None:
    assertion = endpoint.assertion()
    assert (await endpoint.post(endpoint.form(assertion)))[0] == 200
    status, body, cache = await endpoint.post(endpoint.form(assertion))
    assert (status, body["error"], cache) == (401, "invalid_client", "no-store")
    assert "used before" in body["error_description"]
    # Recorded in the database, not in memory: another endpoint (a restart, a replica) refuses it.
    again = ClientCredentials(endpoint.desk.db, endpoint.desk.tokens, lambda: endpoint.url)
    form = {k: [val] for k, val in endpoint.form(assertion).items()}
    with pytest.raises(Exception, match="used before"):
        await again.grant(form)
    assert await endpoint.desk.count(storage.client_assertion_jtis) == 1


async def test_assertions_that_do_not_authenticate_the_client_are_invalid_client(endpoint: Endpoint) -> None:
    now = int(time.time())
    stranger = es384_key("client-key-1")  # the registered kid, another key: a bad signature
    cases = [
        (endpoint.assertion(aud="https://elsewhere.example/token"), "aud must be this token endpoint"),
        (endpoint.assertion(exp=now + 10 * 60), "more than five minutes ahead"),
        (endpoint.assertion(exp=now - 120), "expired"),
        (endpoint.assertion(exp=None), "numeric exp"),
        (endpoint.assertion(jti=None), "jti"),
        (endpoint.assertion(_key=stranger), "signature does not verify"),
        (endpoint.assertion(iss="cli_nobody", sub="cli_nobody"), "unknown client"),
        (endpoint.assertion(sub="cli_other"), "iss and sub must be the client id"),
        (endpoint.assertion(_key=es384_key("other-kid")), "signature does not verify"),
        ("abc.def", "not a compact JWS"),
    ]
    for assertion, reason in cases:
        status, body, cache = await endpoint.post(endpoint.form(assertion))
        assert (status, body["error"], cache) == (401, "invalid_client", "no-store"), reason
        assert reason in body["error_description"]
        assert assertion not in json.dumps(body)
    # An unsigned assertion is refused by its algorithm.
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": "client-key-1"}).encode()).rstrip(b"=")
    payload = base64.urlsafe_b64encode(json.dumps({"iss": endpoint.client_id}).encode()).rstrip(b"=")
    status, body, _ = await endpoint.post(endpoint.form(f"{header.decode()}.{payload.decode()}."))
    assert (status, body["error"]) == (401, "invalid_client")
    assert await endpoint.desk.count(storage.client_assertion_jtis) == 0


async def test_malformed_requests_get_their_rfc_6749_error(endpoint: Endpoint) -> None:
    good = endpoint.form(endpoint.assertion())
    cases: list[tuple[dict[str, str] | list[tuple[str, str]], int, str]] = [
        ({**good, "grant_type": "authorization_code"}, 400, "unsupported_grant_type"),
        ({**good, "grant_type": ""}, 400, "invalid_request"),
        ({**good, "client_assertion_type": "urn:other"}, 400, "invalid_request"),
        ({k: val for k, val in good.items() if k != "client_assertion"}, 400, "invalid_request"),
        ([*good.items(), ("scope", "system/Patient.r")], 400, "invalid_request"),  # scope twice
        ({**good, "scope": "system/Observation.sr"}, 400, "invalid_scope"),
        ({**good, "scope": "patient/Observation.rs"}, 400, "invalid_scope"),
        ({**good, "scope": "system/Encounter.rs"}, 400, "invalid_scope"),  # none allowed
    ]
    for form, status, error in cases:
        got_status, body, cache = await endpoint.post(form)
        assert (got_status, body["error"], cache) == (status, error, "no-store"), (form, body)
    # JSON instead of a form.
    async with aiohttp.ClientSession() as session, session.post(endpoint.url, json=good) as response:
        assert response.status == 400 and (await response.json())["error"] == "invalid_request"


async def test_a_deactivated_client_gets_no_token(endpoint: Endpoint) -> None:
    await endpoint.desk.principals.deactivate(ADMIN, DeactivatePrincipal(endpoint.client_id))
    status, body, _ = await endpoint.post(endpoint.form(endpoint.assertion()))
    assert (status, body["error"]) == (401, "invalid_client")


# -- FindPrincipals ----------------------------------------------------------------------------------


async def test_principals_are_found_by_identifier_through_the_blind_index(desk: Desk) -> None:
    org = (await register(desk, Kind.PRINCIPAL_KIND_ORGANIZATION)).principal
    doctor = (
        await register(desk, Kind.PRINCIPAL_KIND_PRACTITIONER, org.principal_id, resource("Practitioner", NPI, "77"))
    ).principal
    patient = (await a_patient(desk, "999-00-1111")).principal
    practitioner_caller = Caller(doctor.principal_id, "practitioner", frozenset(), org.principal_id, "tok", 0.0)
    client = Caller("cli_x", "smart-client", frozenset(), org.principal_id, "tok", 0.0)

    for caller in (ADMIN, practitioner_caller, client):
        found = await desk.principals.find(caller, FindPrincipals(Kind.PRINCIPAL_KIND_PRACTITIONER, f"{NPI}|77"))
        assert [p.principal_id for p in found] == [doctor.principal_id]
    assert await desk.principals.find(ADMIN, FindPrincipals(Kind.PRINCIPAL_KIND_PRACTITIONER, f"{NPI}|78")) == ()
    # The kind must match too: the practitioner's identifier does not find a patient.
    assert await desk.principals.find(ADMIN, FindPrincipals(Kind.PRINCIPAL_KIND_PATIENT, f"{NPI}|77")) == ()
    found = await desk.principals.find(client, FindPrincipals(Kind.PRINCIPAL_KIND_PATIENT, f"{SSN}|999-00-1111"))
    assert [p.principal_id for p in found] == [patient.principal_id]

    # Patients are not for practitioners to probe; researchers carry no identifiers.
    with pytest.raises(PermissionDenied):
        await desk.principals.find(
            practitioner_caller, FindPrincipals(Kind.PRINCIPAL_KIND_PATIENT, f"{SSN}|999-00-1111")
        )
    with pytest.raises(InvalidArgument):
        await desk.principals.find(ADMIN, FindPrincipals(Kind.PRINCIPAL_KIND_RESEARCHER, "urn:x|1"))
    for identifier in ("no-bar", "|value", "system|"):
        with pytest.raises(InvalidArgument):
            await desk.principals.find(ADMIN, FindPrincipals(Kind.PRINCIPAL_KIND_PRACTITIONER, identifier))


# -- organizations' resources; SMART clients registering a directory ------------------------------

SYNTHEA = "https://github.com/synthetichealth/synthea"


def organization(value: str, name: str = "General Hospital") -> bytes:
    return json.dumps(
        {"resourceType": "Organization", "name": name, "identifier": [{"system": SYNTHEA, "value": value}]}
    ).encode()


async def test_an_organization_carries_its_fhir_resource_encrypted_and_is_found_by_identifier(desk: Desk) -> None:
    hospital = (await register(desk, Kind.PRINCIPAL_KIND_ORGANIZATION, fhir=organization("hospital-1"))).principal
    # Still optional: an organization known by its id alone.
    bare = (await register(desk, Kind.PRINCIPAL_KIND_ORGANIZATION)).principal
    assert bare.fhir_resource is None and hospital.fhir_resource is not None
    assert "General Hospital" not in hospital.fhir_resource  # stored as the key manager's ciphertext
    got = await desk.principals.get(ADMIN, GetPrincipal(hospital.principal_id, include_fhir_resource=True))
    assert json.loads(got.fhir_resource) == json.loads(organization("hospital-1"))
    async with desk.db.connect() as conn:
        stored = (await conn.execute(select(storage.principal_identifiers.c.blind_index))).scalars().all()
    assert stored == [await desk.principals.resources.blind_index(SYNTHEA, "hospital-1")]

    practitioner = Caller("prn_1", "practitioner", frozenset(), bare.principal_id, "tok", 0.0)
    org_admin = Caller("prn_2", "practitioner", frozenset({"org-admin"}), bare.principal_id, "tok", 0.0)
    client = Caller("cli_1", "smart-client", frozenset(), bare.principal_id, "tok", 0.0)
    for caller in (ADMIN, practitioner, org_admin, client):
        found = await desk.principals.find(
            caller, FindPrincipals(Kind.PRINCIPAL_KIND_ORGANIZATION, f"{SYNTHEA}|hospital-1")
        )
        assert [p.principal_id for p in found] == [hospital.principal_id]
    assert await desk.principals.find(ADMIN, FindPrincipals(Kind.PRINCIPAL_KIND_ORGANIZATION, f"{SYNTHEA}|x")) == ()
    patient = Caller("pat_1", "patient", frozenset(), "", "tok", 0.0)
    with pytest.raises(PermissionDenied):
        await desk.principals.find(patient, FindPrincipals(Kind.PRINCIPAL_KIND_ORGANIZATION, f"{SYNTHEA}|hospital-1"))

    # The same identifier twice is ALREADY_EXISTS; an invalid Organization names its FHIR path.
    with pytest.raises(AlreadyExists):
        await register(desk, Kind.PRINCIPAL_KIND_ORGANIZATION, fhir=organization("hospital-1", "Another"))
    with pytest.raises(InvalidArgument) as raised:
        await register(desk, Kind.PRINCIPAL_KIND_ORGANIZATION, fhir=resource("Practitioner", NPI, "1"))
    assert raised.value.violations[0].field == "fhir_resource.resourceType"
    with pytest.raises(InvalidArgument) as raised:
        await register(desk, Kind.PRINCIPAL_KIND_ORGANIZATION, fhir=b'{"resourceType": "Organization", "active": 3}')
    assert raised.value.violations[0].field.startswith("fhir_resource.")

    # The bare one gets a resource later, and is found by it; an empty one is refused.
    await desk.principals.update_resource(
        ADMIN, UpdatePrincipalResource(bare.principal_id, organization("clinic-2", "Clinic"))
    )
    found = await desk.principals.find(ADMIN, FindPrincipals(Kind.PRINCIPAL_KIND_ORGANIZATION, f"{SYNTHEA}|clinic-2"))
    assert [p.principal_id for p in found] == [bare.principal_id]
    with pytest.raises(InvalidArgument):
        await desk.principals.update_resource(ADMIN, UpdatePrincipalResource(bare.principal_id, b""))


async def test_a_smart_client_registers_patients_practitioners_and_organizations_without_secrets(
    desk: Desk,
) -> None:
    own = (await register(desk, Kind.PRINCIPAL_KIND_ORGANIZATION)).principal
    client = Caller("cli_engine", "smart-client", frozenset(), own.principal_id, "tok", 0.0)
    registered: Registered = await desk.principals.register_principal(
        client, RegisterPrincipal(Kind.PRINCIPAL_KIND_ORGANIZATION, "", organization("hospital-9"))
    )
    hospital = registered.principal
    assert registered.client_secret == "" and hospital.registered_by == "cli_engine"
    # Practitioners of its own organization and of the one it registered.
    for org_id, npi in ((own.principal_id, "1"), (hospital.principal_id, "2")):
        doctor: Registered = await desk.principals.register_principal(
            client, RegisterPrincipal(Kind.PRINCIPAL_KIND_PRACTITIONER, org_id, resource("Practitioner", NPI, npi))
        )
        assert doctor.client_secret == "" and doctor.principal.organization_id == org_id
    patient: Registered = await desk.principals.register_principal(
        client, RegisterPrincipal(Kind.PRINCIPAL_KIND_PATIENT, "", resource("Patient", SSN, "555-00-1234"))
    )
    assert patient.client_secret == ""
    async with desk.db.connect() as conn:
        for registered_id in (hospital.principal_id, doctor.principal.principal_id, patient.principal.principal_id):
            # No secret at all: the client cannot act as what it registered.
            assert await storage.get_secret_hash(conn, registered_id) is None
    with pytest.raises(Unauthenticated):
        await desk.tokens.issue(IssueToken(patient.principal.principal_id, "", "medledger.fhir"))
    # An admin's registration still makes a secret.
    assert (await register(desk, Kind.PRINCIPAL_KIND_ORGANIZATION)).client_secret


async def test_a_smart_client_may_not_staff_other_organizations_or_register_other_kinds(desk: Desk) -> None:
    own = (await register(desk, Kind.PRINCIPAL_KIND_ORGANIZATION)).principal
    others = (await register(desk, Kind.PRINCIPAL_KIND_ORGANIZATION, fhir=organization("elsewhere"))).principal
    client = Caller("cli_engine", "smart-client", frozenset(), own.principal_id, "tok", 0.0)
    before = await desk.count(storage.principals)
    with pytest.raises(PermissionDenied, match="practitioners of its own organization"):
        await desk.principals.register_principal(
            client,
            RegisterPrincipal(
                Kind.PRINCIPAL_KIND_PRACTITIONER, others.principal_id, resource("Practitioner", NPI, "3")
            ),
        )
    # A practitioner with an unknown organization is refused, naming the field.
    with pytest.raises(InvalidArgument) as raised:
        await desk.principals.register_principal(
            client, RegisterPrincipal(Kind.PRINCIPAL_KIND_PRACTITIONER, "org_nope", resource("Practitioner", NPI, "4"))
        )
    assert raised.value.violations[0].field == "organization_id"
    for kind in (Kind.PRINCIPAL_KIND_RESEARCHER, Kind.PRINCIPAL_KIND_SERVICE):
        with pytest.raises(PermissionDenied):
            await desk.principals.register_principal(client, RegisterPrincipal(kind, "", b""))
    # Nothing was stored, and the identifier is still free.
    assert await desk.count(storage.principals) == before
    assert await desk.principals.find(ADMIN, FindPrincipals(Kind.PRINCIPAL_KIND_PRACTITIONER, f"{NPI}|3")) == ()


# -- GetPrincipal: a patient's resource to a consented reader ----------------------------------------


@dataclass
class FakeConsent:
    """Consent's answers, as records' tests fake them: permit for the listed actors."""

    permitted: set[str]
    asked: list[tuple[str, str, int, int, int]]

    async def check(self, caller: Caller, patient_id: str, action: int, category: int, purpose: int) -> ConsentAnswer:
        self.asked.append((caller.principal_id, patient_id, action, category, purpose))
        permit = caller.principal_id in self.permitted
        return ConsentAnswer(permit, "dec_1", "" if permit else "NO_CONSENT", "" if permit else "no consent covers it")


async def test_a_patients_resource_goes_to_another_reader_only_as_consent_decides(desk: Desk) -> None:
    consent = FakeConsent({"prn_permitted"}, [])
    principals = Directory(desk.db, desk.keys, SecretHasher(), lambda: None, consent=consent)
    await principals.start()
    patient = (await a_patient(desk)).principal
    treat = v.PurposeOfUse.PURPOSE_OF_USE_TREAT
    permitted = Caller("prn_permitted", "practitioner", frozenset(), "org_1", "tok", 0.0)
    refused = Caller("prn_refused", "practitioner", frozenset(), "org_1", "tok", 0.0)

    found = await principals.get(
        permitted, GetPrincipal(patient.principal_id, include_fhir_resource=True, purpose=treat)
    )
    assert json.loads(found.fhir_resource)["identifier"] == [{"system": SSN, "value": "123-45-6789"}]
    assert consent.asked == [
        ("prn_permitted", patient.principal_id, v.Action.ACTION_READ, v.DataCategory.DATA_CATEGORY_DEMOGRAPHICS, treat)
    ]
    with pytest.raises(PermissionDenied, match="no consent covers it"):
        await principals.get(refused, GetPrincipal(patient.principal_id, include_fhir_resource=True, purpose=treat))
    # Without a purpose there is nothing consent could permit: refused without asking.
    with pytest.raises(PermissionDenied, match="give purpose"):
        await principals.get(permitted, GetPrincipal(patient.principal_id, include_fhir_resource=True))
    # The patient and admins are not asked about; nor is anyone who does not ask for the resource.
    await principals.get(as_patient(patient), GetPrincipal(patient.principal_id, include_fhir_resource=True))
    await principals.get(ADMIN, GetPrincipal(patient.principal_id, include_fhir_resource=True))
    await principals.get(refused, GetPrincipal(patient.principal_id))
    assert len(consent.asked) == 2

    # A practitioner's resource is not consent's to give.
    org = (await register(desk, Kind.PRINCIPAL_KIND_ORGANIZATION)).principal
    doctor = (
        await register(desk, Kind.PRINCIPAL_KIND_PRACTITIONER, org.principal_id, resource("Practitioner", NPI, "5"))
    ).principal
    with pytest.raises(PermissionDenied, match="only the principal"):
        await principals.get(permitted, GetPrincipal(doctor.principal_id, include_fhir_resource=True, purpose=treat))
    assert len(consent.asked) == 2


def as_patient(row: storage.PrincipalRow) -> Caller:
    return Caller(row.principal_id, "patient", frozenset(), "", "tok", 0.0)


async def test_identitys_own_principal_holds_pdp_client_and_signs_its_own_tokens(desk: Desk) -> None:
    pdp = v.Role.ROLE_PDP_CLIENT
    await desk.principals.ensure_own_principal("svc_identity", (pdp,))
    own = OwnTokens(desk.db, desk.tokens, "svc_identity")
    token = await own.token("medledger.consent")
    caller = await desk.verifier("medledger.consent").verify(token)
    assert (caller.principal_id, caller.kind, caller.roles) == ("svc_identity", "service", frozenset({"pdp-client"}))
    assert await own.token("medledger.consent") == token  # cached
    own.forget("medledger.consent")
    assert await own.token("medledger.consent") != token

    # Made earlier without the role (from a secret file, say): granted once, with its event.
    async with desk.db.transaction() as conn:
        await conn.execute(storage.principal_roles.delete())
    await desk.principals.ensure_own_principal("svc_identity", (pdp,))
    await desk.principals.ensure_own_principal("svc_identity", (pdp,))
    assert (await desk.principals.get(ADMIN, GetPrincipal("svc_identity"))).principal.roles == (pdp,)
    assert await desk.event_names() == ["PrincipalRegistered", "PrincipalRoleChanged"]
    # A secret file for identity later sets a secret on it rather than registering it again.
    await desk.principals.ensure_platform_principal("svc_identity", "mlsec_" + "x" * 40, (pdp,))
    assert (await desk.tokens.issue(IssueToken("svc_identity", "mlsec_" + "x" * 40, "medledger.audit"))).access_token
