"""SMART v2 scopes: parsing, what they permit, the verifier reading them from tokens, and the
interceptor and HTTP routes refusing scoped tokens what their scopes do not allow."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from aiohttp import ClientSession, web
from hypothesis import given
from hypothesis import strategies as st
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc

from medledger_devstack.testing import TokenIssuer
from medledger_runtime.auth import (
    Access,
    AuthInterceptor,
    Caller,
    DeactivationSet,
    InvalidScope,
    Scope,
    ScopeNeed,
    ScopeSet,
    TokenVerifier,
    current_caller,
    patient_id_field,
)
from medledger_runtime.errors import PermissionDenied, Unauthenticated
from medledger_runtime.grpc_server import GrpcServer
from medledger_runtime.http_server import HttpRoute, HttpServer
from medledger_sdk.channels import make_channel

NOW = 1_800_000_000
_SERVICE = "/medledger.records.v1.RecordsService/"
LIST = _SERVICE + "ListRecords"
EXPORT = _SERVICE + "ExportRecords"
UNDECLARED = _SERVICE + "RotatePatientKey"


# --- parsing -------------------------------------------------------------------------------


def test_a_v2_scope_parses_into_its_context_type_and_interactions() -> None:
    scope = Scope.parse("patient/Observation.rs")
    assert (scope.context, scope.resource_type, scope.interactions) == ("patient", "Observation", frozenset("rs"))
    assert str(scope) == "patient/Observation.rs"
    assert Scope.parse("system/*.cruds").interactions == frozenset("cruds")


@pytest.mark.parametrize(
    "text",
    [
        "patient/Observation.sr",  # letters out of order
        "patient/Observation.",  # no letter
        "patient/Observation.rr",
        "patient/Observation.x",
        "patient/Observation.read",  # SMART v1: identity issues v2 only
        "patient/Observation.*",
        "patient/observation.rs",  # not a FHIR resource type
        "practitioner/Observation.rs",  # no such context
        "patient/Observation.rs?category=laboratory",  # granular: would read wider than it is
        "Observation.rs",
        "patient/Observation",
        "",
    ],
)
def test_malformed_scopes_are_invalid(text: str) -> None:
    with pytest.raises(InvalidScope):
        Scope.parse(text)


def test_a_scope_set_drops_smarts_non_resource_scopes_and_refuses_unknown_ones() -> None:
    scopes = ScopeSet.parse("openid fhirUser launch/patient offline_access patient/Observation.rs  user/Consent.r")
    assert str(scopes) == "patient/Observation.rs user/Consent.r"
    assert ScopeSet.parse("").scopes == frozenset()
    with pytest.raises(InvalidScope):
        ScopeSet.parse("patient/Observation.rs superpowers")
    with pytest.raises(InvalidScope):
        ScopeSet.parse(" ".join(["user/Observation.r"] * 101))


def test_permits_by_type_and_interaction_and_star_only_for_star() -> None:
    scopes = ScopeSet.of("patient/Observation.rs", "user/Condition.c")
    assert scopes.permits("Observation", "r") and scopes.permits("Observation", "s")
    assert not scopes.permits("Observation", "c")
    assert not scopes.permits("Condition", "r") and scopes.permits("Condition", "c")
    # Asking for every type needs a `*` scope.
    assert not scopes.permits("*", "s")
    assert ScopeSet.of("system/*.rs").permits("*", "s")
    assert ScopeSet.of("system/*.rs").permits("MedicationRequest", "r")
    with pytest.raises(ValueError):
        scopes.permits("Observation", "x")


def test_patient_scopes_reach_only_the_patient_in_context() -> None:
    scopes = ScopeSet.of("patient/Observation.rs")
    assert scopes.permits_for_patient("Observation", "r", "pat_1", "pat_1")
    assert not scopes.permits_for_patient("Observation", "r", "pat_2", "pat_1")
    assert not scopes.permits_for_patient("Observation", "r", "pat_1", "")  # no patient in context
    assert not scopes.permits_for_patient("Observation", "r", "", "")
    # User and system scopes are bounded by the roles and consent, not by a compartment.
    assert ScopeSet.of("user/Observation.r").permits_for_patient("Observation", "r", "pat_2", "pat_1")


_CONTEXTS = st.sampled_from(["patient", "user", "system"])
_TYPES = st.sampled_from(["Observation", "Condition", "Consent", "*"])
_LETTERS = st.sets(st.sampled_from("cruds"), min_size=1)


@given(_CONTEXTS, _TYPES, _LETTERS)
def test_every_well_formed_scope_round_trips(context: str, resource_type: str, letters: set[str]) -> None:
    text = f"{context}/{resource_type}." + "".join(i for i in "cruds" if i in letters)
    scope = Scope.parse(text)
    assert str(scope) == text
    assert scope.interactions == frozenset(letters)


@given(st.lists(st.tuples(_CONTEXTS, _TYPES, _LETTERS), max_size=5), _TYPES, st.sampled_from("cruds"))
def test_a_set_permits_exactly_what_one_of_its_scopes_covers(
    parts: list[tuple[str, str, set[str]]], resource_type: str, interaction: str
) -> None:
    texts = [f"{c}/{t}." + "".join(i for i in "cruds" if i in ls) for c, t, ls in parts]
    scopes = ScopeSet.of(*texts)
    expected = any(interaction in ls and t in ("*", resource_type) for _, t, ls in parts)
    assert scopes.permits(resource_type, interaction) is expected
    # Scopes only narrow: adding one never takes a permission away.
    assert not expected or ScopeSet.of(*texts, "user/Patient.r").permits(resource_type, interaction)


@given(st.text(alphabet="cruds", min_size=1, max_size=6))
def test_interaction_letters_parse_only_in_cruds_order_without_repeats(letters: str) -> None:
    in_order = "".join(sorted(set(letters), key="cruds".index)) == letters
    try:
        Scope.parse(f"user/Observation.{letters}")
        parsed = True
    except InvalidScope:
        parsed = False
    assert parsed is in_order


# --- tokens --------------------------------------------------------------------------------


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer(now=NOW, audience="medledger.records")


def verifier(issuer: TokenIssuer) -> TokenVerifier:
    return TokenVerifier(
        issuer="medledger.identity", audience="medledger.records", fetch_jwks=issuer.fetch, clock=lambda: NOW + 10
    )


async def test_the_verifier_reads_scope_and_patient_claims(issuer: TokenIssuer) -> None:
    v = verifier(issuer)
    scoped = await v.verify(issuer.token(sub="pat_1", kind="patient", scope="patient/Observation.rs", patient="pat_1"))
    assert scoped.scopes == ScopeSet.of("patient/Observation.rs")
    assert scoped.patient_context == "pat_1"
    unscoped = await v.verify(issuer.token())
    assert (unscoped.scopes, unscoped.patient_context) == (None, "")
    # Present but empty: scoped to nothing, never read as unscoped.
    assert (await v.verify(issuer.token(scope=""))).scopes == ScopeSet(frozenset())


@pytest.mark.parametrize(
    "claims",
    [
        {"scope": ["patient/Observation.rs"]},
        {"scope": 1},
        {"scope": "patient/Observation.rs", "patient": 7},
        {"scope": "patient/Observation.rs nonsense"},
        {"scope": "patient/Observation.read"},
    ],
)
async def test_tokens_with_malformed_scope_claims_are_unauthenticated(
    issuer: TokenIssuer, claims: dict[str, Any]
) -> None:
    with pytest.raises(Unauthenticated):
        await verifier(issuer).verify(issuer.token(**claims))


# --- the interceptor -----------------------------------------------------------------------


def interceptor(issuer: TokenIssuer) -> AuthInterceptor:
    kinds = Access.of(kinds=["patient", "researcher"])
    return AuthInterceptor(
        verifier(issuer),
        DeactivationSet(),
        public_methods=(),
        access={LIST: kinds, EXPORT: kinds, UNDECLARED: kinds},
        scopes={
            LIST: ScopeNeed(lambda r: r.resource_type, "s", patient=patient_id_field),
            EXPORT: ScopeNeed("*", "r", patient=patient_id_field),
        },
    )


def md(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def test_a_scoped_token_is_refused_an_rpc_that_declares_no_scope_need(issuer: TokenIssuer) -> None:
    i = interceptor(issuer)
    token = issuer.token(scope="system/*.cruds")
    with pytest.raises(PermissionDenied, match="scopes do not allow this call"):
        await i.authenticate(md(token), UNDECLARED, SimpleNamespace(patient_id="pat_1"))
    # The same principal without scopes keeps today's behaviour.
    assert (await i.authenticate(md(issuer.token()), UNDECLARED)).scopes is None


async def test_the_interceptor_applies_the_declared_need_to_the_request(issuer: TokenIssuer) -> None:
    i = interceptor(issuer)
    token = issuer.token(sub="pat_1", kind="patient", scope="patient/Observation.rs", patient="pat_1")
    own_observations = SimpleNamespace(patient_id="pat_1", resource_type="Observation")
    assert (await i.authenticate(md(token), LIST, own_observations)).principal_id == "pat_1"
    for request in (
        SimpleNamespace(patient_id="pat_1", resource_type="Condition"),
        SimpleNamespace(patient_id="pat_1", resource_type=""),  # every type: needs `*`
        SimpleNamespace(patient_id="pat_2", resource_type="Observation"),  # another compartment
    ):
        with pytest.raises(PermissionDenied, match="this token's scopes do not allow search"):
            await i.authenticate(md(token), LIST, request)
    with pytest.raises(PermissionDenied):
        await i.authenticate(md(token), EXPORT, SimpleNamespace(patient_id="pat_1"))
    everything = issuer.token(sub="pat_1", kind="patient", scope="patient/*.rs", patient="pat_1")
    assert await i.authenticate(md(everything), EXPORT, SimpleNamespace(patient_id="pat_1"))
    # The roles still decide first: scopes never widen.
    practitioner = issuer.token(kind="practitioner", scope="system/*.cruds")
    with pytest.raises(PermissionDenied, match="roles"):
        await i.authenticate(md(practitioner), LIST, own_observations)


def test_a_refusal_says_whether_the_type_or_the_compartment_was_missing() -> None:
    caller = Caller("prn_1", "practitioner", frozenset(), "", "tok", 0.0, ScopeSet.of("patient/Observation.r"), "pat_1")
    caller.require_scope("Observation", "r", "pat_1")
    with pytest.raises(PermissionDenied, match="read of Observation outside the patient in context"):
        caller.require_scope("Observation", "r", "pat_2")
    with pytest.raises(PermissionDenied, match=r"read of Condition$"):
        caller.require_scope("Condition", "r", "pat_1")
    with pytest.raises(PermissionDenied, match=r"search of every resource type$"):
        caller.require_scope("*", "s")


def test_a_caller_built_without_scopes_is_unscoped() -> None:
    caller = Caller("pat_1", "patient", frozenset(), "", "tok", 0.0)
    assert caller.scopes is None and caller.patient_context == ""
    caller.require_scope("Observation", "c", "pat_9")  # unscoped: no refusal


def test_invalid_scope_needs_are_a_programming_error() -> None:
    with pytest.raises(ValueError):
        ScopeNeed("Observation", "w")
    with pytest.raises(ValueError):
        ScopeNeed("", "r")
    assert ScopeNeed.in_use_case().checked_in_use_case


# --- HTTP routes ---------------------------------------------------------------------------


async def test_http_routes_apply_the_same_rule(issuer: TokenIssuer) -> None:
    v = verifier(issuer)

    async def authenticate(header: str | None) -> Caller:
        return await v.verify((header or "").partition(" ")[2])

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=current_caller().principal_id)

    async def public(request: web.Request) -> web.Response:
        return web.Response(text="anyone")

    server = HttpServer(
        [
            HttpRoute.get("/events", handler, scope=ScopeNeed("AuditEvent", "r")),
            HttpRoute.get("/undeclared", handler),
            HttpRoute.get("/public", public, public=True),
        ],
        host="127.0.0.1",
        port=0,
        authenticate=authenticate,
        max_body_bytes=1024,
        shutdown_grace_seconds=0,
    )
    port = await server.start()
    tokens = {
        "unscoped": issuer.token(),
        "audit": issuer.token(scope="user/AuditEvent.r"),
        "observations": issuer.token(scope="user/Observation.r"),
    }
    expected = {
        ("unscoped", "/events"): 200,
        ("unscoped", "/undeclared"): 200,
        ("audit", "/events"): 200,
        ("audit", "/undeclared"): 403,
        ("observations", "/events"): 403,
        ("observations", "/undeclared"): 403,
        ("observations", "/public"): 200,
    }
    try:
        async with ClientSession() as http:
            for (who, path), status in expected.items():
                headers = {"Authorization": f"Bearer {tokens[who]}"}
                async with http.get(f"http://127.0.0.1:{port}{path}", headers=headers) as response:
                    assert (who, path, response.status) == (who, path, status)
    finally:
        await server.stop()


# --- over gRPC -----------------------------------------------------------------------------


class _Identity(id_grpc.IdentityServiceServicer):
    async def GetPrincipal(self, request: Any, context: Any) -> id_pb.GetPrincipalResponse:
        return id_pb.GetPrincipalResponse(principal=id_pb.Principal(principal_id=current_caller().principal_id))

    async def ListPrincipals(self, request: Any, context: Any) -> id_pb.ListPrincipalsResponse:
        return id_pb.ListPrincipalsResponse()


async def test_over_grpc_the_need_reads_the_request_before_the_servicer_runs() -> None:
    issuer = TokenIssuer(now=time.time(), audience="medledger.identity")
    service = "/medledger.identity.v1.IdentityService/"
    verifier = TokenVerifier(issuer="medledger.identity", audience="medledger.identity", fetch_jwks=issuer.fetch)
    auth = AuthInterceptor(
        verifier,
        DeactivationSet(),
        public_methods=(),
        access={service + "GetPrincipal": Access(), service + "ListPrincipals": Access()},
        scopes={service + "GetPrincipal": ScopeNeed("Patient", "r", patient=lambda r: r.principal_id)},
    )
    server = GrpcServer(
        host="127.0.0.1",
        port=0,
        max_message_bytes=64 * 1024,
        service_descriptors=[id_pb.DESCRIPTOR.services_by_name["IdentityService"]],
        register=lambda s: id_grpc.add_IdentityServiceServicer_to_server(_Identity(), s),
        interceptors=[auth],
    )
    await server.start()
    token = issuer.token(sub="pat_1", kind="patient", scope="patient/Patient.r", patient="pat_1")
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        async with make_channel(f"127.0.0.1:{server.port}") as channel:
            stub = id_grpc.IdentityServiceStub(channel)
            own = await stub.GetPrincipal(id_pb.GetPrincipalRequest(principal_id="pat_1"), metadata=metadata)
            assert own.principal.principal_id == "pat_1"
            for call in (
                stub.GetPrincipal(id_pb.GetPrincipalRequest(principal_id="pat_2"), metadata=metadata),
                stub.ListPrincipals(id_pb.ListPrincipalsRequest(), metadata=metadata),  # undeclared
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "this token's scopes do not allow" in (err.value.details() or "")
            unscoped = (("authorization", f"Bearer {issuer.token()}"),)
            assert await stub.ListPrincipals(id_pb.ListPrincipalsRequest(), metadata=unscoped) is not None
    finally:
        await server.stop(0)
