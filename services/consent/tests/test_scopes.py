"""SMART-scoped tokens against consent's API: the interceptor over consent's own tables (ACCESS,
SCOPES) with tokens signed as identity signs them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from medledger.consent.v1 import consent_service_pb2 as pb

from medledger_consent.api import ACCESS, PUBLIC_METHODS, SCOPES
from medledger_devstack.testing import TokenIssuer
from medledger_runtime.auth import AuthInterceptor, Caller, DeactivationSet, TokenVerifier
from medledger_runtime.errors import PermissionDenied

NOW = 1_800_000_000
_SERVICE = "/medledger.consent.v1.ConsentService/"
issuer = TokenIssuer(now=NOW, audience="medledger.consent")


async def call(method: str, request: Any, **claims: Any) -> Caller:
    """The caller consent's interceptor lets through to `method`; PermissionDenied as it refuses."""
    verifier = TokenVerifier(
        issuer="medledger.identity", audience="medledger.consent", fetch_jwks=issuer.fetch, clock=lambda: NOW
    )
    gate = AuthInterceptor(verifier, DeactivationSet(), public_methods=PUBLIC_METHODS, access=ACCESS, scopes=SCOPES)
    token = issuer.token(**claims)
    return await gate.authenticate([("authorization", f"Bearer {token}")], _SERVICE + method, request)


PATIENT = {"sub": "pat_1", "kind": "patient", "roles": []}
GRANT = pb.GrantConsentRequest(request_id="r1", patient_id="pat_1", grantee_id="prn_1")


async def test_a_consent_read_token_cannot_grant_consent() -> None:
    with pytest.raises(PermissionDenied, match="scopes do not allow create of Consent"):
        await call("GrantConsent", GRANT, **PATIENT, scope="user/Consent.r")
    assert await call("GetConsent", pb.GetConsentRequest(consent_id="con_1"), **PATIENT, scope="user/Consent.r")
    # Unscoped, the same patient grants as before.
    assert await call("GrantConsent", GRANT, **PATIENT)


async def test_patient_scopes_grant_and_list_only_for_the_patient_in_context() -> None:
    scoped = {**PATIENT, "scope": "patient/Consent.crus", "patient": "pat_1"}
    assert await call("GrantConsent", GRANT, **scoped)
    assert await call("RevokeConsent", pb.RevokeConsentRequest(request_id="r2", consent_id="con_1"), **scoped)
    assert await call("ListConsents", pb.ListConsentsRequest(patient_id="pat_1"), **scoped)
    for method, request in [
        ("GrantConsent", pb.GrantConsentRequest(request_id="r3", patient_id="pat_2", grantee_id="prn_1")),
        ("ListConsents", pb.ListConsentsRequest(grantee_id="prn_1")),  # no patient: not its compartment
    ]:
        with pytest.raises(PermissionDenied, match="scopes"):
            await call(method, request, **scoped)


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("CheckConsent", pb.CheckConsentRequest(patient_id="pat_1", actor_id="prn_1")),
        ("GetDecision", pb.GetDecisionRequest(decision_id="dec_1")),
        ("AppointGuardian", pb.AppointGuardianRequest(patient_id="pat_1")),
        ("BreakGlass", pb.BreakGlassRequest(patient_id="pat_1")),
    ],
)
async def test_the_decision_point_and_break_glass_refuse_scoped_tokens(method: str, request_: Any) -> None:
    claims: dict[str, Any] = {"kind": "practitioner", "roles": ["pdp-client", "guardian"]}
    with pytest.raises(PermissionDenied, match="scopes do not allow this call"):
        await call(method, request_, **claims, scope="system/*.cruds")
    assert await call(method, request_, **claims)


def readme_scope_rpcs() -> set[str]:
    """The RPCs the README's "SMART scopes" table lists."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("\n## SMART scopes\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("|")]
    return {r for r in rows if r != "RPC" and set(r) != {"-"}}


def test_the_readme_lists_exactly_the_rpcs_open_to_scoped_tokens() -> None:
    assert readme_scope_rpcs() == {m.rsplit("/", 1)[1] for m in SCOPES}
