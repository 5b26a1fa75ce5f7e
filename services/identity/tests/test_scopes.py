"""SMART-scoped tokens against identity's API: the interceptor over identity's own tables
(ACCESS, SCOPES) with tokens signed as identity signs them. A principal is the FHIR resource of
its kind (Patient, Practitioner, Organization)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from medledger.identity.v1 import identity_service_pb2 as pb
from medledger.types.v1.vocabulary_pb2 import PrincipalKind

from medledger_devstack.testing import TokenIssuer
from medledger_identity.api import ACCESS, PUBLIC_METHODS, SCOPES
from medledger_runtime.auth import ANY_CALLER, AuthInterceptor, Caller, DeactivationSet, TokenVerifier
from medledger_runtime.errors import PermissionDenied

NOW = 1_800_000_000
_SERVICE = "/medledger.identity.v1.IdentityService/"
issuer = TokenIssuer(now=NOW, audience="medledger.identity")
PRACTITIONER = PrincipalKind.PRINCIPAL_KIND_PRACTITIONER
ORGANIZATION = PrincipalKind.PRINCIPAL_KIND_ORGANIZATION


async def call(method: str, request: Any, **claims: Any) -> Caller:
    """The caller identity's interceptor lets through to `method`; PermissionDenied as it refuses."""
    verifier = TokenVerifier(
        issuer="medledger.identity", audience="medledger.identity", fetch_jwks=issuer.fetch, clock=lambda: NOW
    )
    # FindPrincipals' access row comes with its servicer: any caller here, to test the scopes.
    access = {method: ACCESS.get(method, ANY_CALLER) for method in {*ACCESS, *SCOPES}}
    gate = AuthInterceptor(verifier, DeactivationSet(), public_methods=PUBLIC_METHODS, access=access, scopes=SCOPES)
    token = issuer.token(**claims)
    return await gate.authenticate([("authorization", f"Bearer {token}")], _SERVICE + method, request)


async def test_a_patient_token_reads_its_own_patient_principal_only() -> None:
    patient = {"sub": "pat_1", "kind": "patient", "roles": [], "scope": "patient/Patient.r", "patient": "pat_1"}
    own = pb.GetPrincipalRequest(principal_id="pat_1", include_fhir_resource=True)
    assert await call("GetPrincipal", own, **patient)
    for request in (pb.GetPrincipalRequest(principal_id="pat_2"), pb.GetPrincipalRequest(principal_id="prn_1")):
        with pytest.raises(PermissionDenied, match="scopes do not allow read"):
            await call("GetPrincipal", request, **patient)
    with pytest.raises(PermissionDenied, match="update of Patient"):
        await call("UpdatePrincipalResource", pb.UpdatePrincipalResourceRequest(principal_id="pat_1"), **patient)
    assert await call("GetPrincipal", pb.GetPrincipalRequest(principal_id="prn_1"), scope="user/Practitioner.r")


async def test_an_integration_engine_finds_and_registers_by_kind() -> None:
    engine = {"kind": "service", "roles": ["org-admin"], "scope": "system/Organization.cs system/Practitioner.s"}
    assert await call("FindPrincipals", pb.FindPrincipalsRequest(kind=ORGANIZATION), **engine)
    assert await call("FindPrincipals", pb.FindPrincipalsRequest(kind=PRACTITIONER), **engine)
    assert await call("RegisterPrincipal", pb.RegisterPrincipalRequest(kind=ORGANIZATION), **engine)
    with pytest.raises(PermissionDenied, match="create of Practitioner"):
        await call("RegisterPrincipal", pb.RegisterPrincipalRequest(kind=PRACTITIONER), **engine)
    # Administration is no FHIR interaction: refused to every scoped token, allowed unscoped.
    with pytest.raises(PermissionDenied, match="scopes do not allow this call"):
        await call("AssignRole", pb.AssignRoleRequest(principal_id="prn_1"), **engine)
    assert await call("AssignRole", pb.AssignRoleRequest(principal_id="prn_1"), kind="service", roles=["org-admin"])


async def test_a_smart_client_registers_principals_of_the_kinds_its_scopes_create() -> None:
    """Through identity's own access table (a smart-client may call RegisterPrincipal) and scopes."""
    client = {"sub": "cli_1", "kind": "smart-client", "roles": [], "org": "org_1"}
    loader = {**client, "scope": "system/Organization.c system/Practitioner.cr system/Patient.c"}
    for kind in (ORGANIZATION, PRACTITIONER, PrincipalKind.PRINCIPAL_KIND_PATIENT):
        assert await call("RegisterPrincipal", pb.RegisterPrincipalRequest(kind=kind), **loader)
    reader = {**client, "scope": "system/*.rs system/Organization.c system/Patient.c"}
    with pytest.raises(PermissionDenied, match="create of Practitioner"):
        await call("RegisterPrincipal", pb.RegisterPrincipalRequest(kind=PRACTITIONER), **reader)
    # Researchers are no FHIR type a client's scopes name: only a `*` scope would reach them
    # (and the use case refuses the kind to a client then).
    with pytest.raises(PermissionDenied):
        await call(
            "RegisterPrincipal", pb.RegisterPrincipalRequest(kind=PrincipalKind.PRINCIPAL_KIND_RESEARCHER), **loader
        )


def readme_scope_rpcs() -> set[str]:
    """The RPCs the README's "SMART scopes" table lists."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("\n## SMART scopes\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("|")]
    return {r for r in rows if r != "RPC" and set(r) != {"-"}}


def test_the_readme_lists_exactly_the_rpcs_open_to_scoped_tokens() -> None:
    assert readme_scope_rpcs() == {m.rsplit("/", 1)[1] for m in SCOPES}
