"""SMART-scoped tokens against audit: the interceptor over audit's own tables (ACCESS, SCOPES),
and the entry-bundle tiles, with tokens signed as identity signs them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from medledger.audit.v1 import audit_service_pb2 as pb

from medledger_audit.api import ACCESS, PUBLIC_METHODS, SCOPES
from medledger_audit.http import TilesHttp
from medledger_devstack.testing import TokenIssuer
from medledger_runtime.auth import AuthInterceptor, Caller, DeactivationSet, TokenVerifier
from medledger_runtime.errors import PermissionDenied
from medledger_runtime.http_server import _AUTHENTICATOR

NOW = 1_800_000_000
_SERVICE = "/medledger.audit.v1.AuditService/"
issuer = TokenIssuer(now=NOW, audience="medledger.audit")
verifier = TokenVerifier(
    issuer="medledger.identity", audience="medledger.audit", fetch_jwks=issuer.fetch, clock=lambda: NOW
)


async def call(method: str, request: Any, **claims: Any) -> Caller:
    """The caller audit's interceptor lets through to `method`; PermissionDenied as it refuses."""
    gate = AuthInterceptor(verifier, DeactivationSet(), public_methods=PUBLIC_METHODS, access=ACCESS, scopes=SCOPES)
    token = issuer.token(**claims)
    return await gate.authenticate([("authorization", f"Bearer {token}")], _SERVICE + method, request)


PATIENT: dict[str, Any] = {"sub": "pat_1", "kind": "patient", "roles": [], "patient": "pat_1"}


async def test_a_patient_audit_token_lists_and_exports_its_own_trail() -> None:
    mine = pb.ListEntriesRequest(patient_id="pat_1")
    assert await call("ListEntries", mine, **PATIENT, scope="patient/AuditEvent.s")
    with pytest.raises(PermissionDenied, match="search of AuditEvent"):
        await call("ListEntries", pb.ListEntriesRequest(patient_id="pat_2"), **PATIENT, scope="patient/AuditEvent.s")
    export = pb.ExportAuditEventsRequest(patient_id="pat_1")
    with pytest.raises(PermissionDenied, match="read of AuditEvent"):
        await call("ExportAuditEvents", export, **PATIENT, scope="patient/AuditEvent.s")
    assert await call("ExportAuditEvents", export, **PATIENT, scope="patient/AuditEvent.rs")
    # Commitments are the log's, not FHIR: refused to a scoped token, whatever it holds.
    with pytest.raises(PermissionDenied, match="scopes do not allow this call"):
        await call("FindCommitment", pb.FindCommitmentRequest(commitment="00"), **PATIENT, scope="patient/*.cruds")
    assert await call("FindCommitment", pb.FindCommitmentRequest(commitment="00"), **PATIENT)


async def test_entry_bundles_refuse_scoped_auditor_tokens() -> None:
    app = web.Application()

    async def authenticate(header: str | None) -> Caller:
        return await verifier.verify((header or "").partition(" ")[2])

    app[_AUTHENTICATOR] = authenticate

    def request(**claims: Any) -> web.Request:
        headers = {"Authorization": f"Bearer {issuer.token(kind='service', roles=['auditor'], **claims)}"}
        return make_mocked_request("GET", "/tile/entries/000", headers=headers, app=app)

    # The check reads nothing of the log: no database is needed to ask it.
    assert await TilesHttp._auditor_only(None, request()) is None  # type: ignore[arg-type]
    refused = await TilesHttp._auditor_only(None, request(scope="system/AuditEvent.rs"))  # type: ignore[arg-type]
    assert refused is not None and refused.status == 403


def readme_scope_rpcs() -> set[str]:
    """The RPCs the README's "SMART scopes" table lists."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("\n## SMART scopes\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("|")]
    return {r for r in rows if r != "RPC" and set(r) != {"-"}}


def test_the_readme_lists_exactly_the_rpcs_open_to_scoped_tokens() -> None:
    assert readme_scope_rpcs() == {m.rsplit("/", 1)[1] for m in SCOPES}
