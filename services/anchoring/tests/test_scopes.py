"""SMART-scoped tokens against anchoring: proofs are no FHIR resource, so a scoped token is
refused every RPC that needs a token, while the public ones stay open to anyone."""

from __future__ import annotations

from pathlib import Path

import pytest
from medledger.anchoring.v1 import anchoring_service_pb2 as pb

from medledger_anchoring.api import ACCESS, PUBLIC_METHODS, SCOPES
from medledger_devstack.testing import TokenIssuer
from medledger_runtime.auth import AuthInterceptor, DeactivationSet, TokenVerifier
from medledger_runtime.errors import PermissionDenied

NOW = 1_800_000_000
_SERVICE = "/medledger.anchoring.v1.AnchoringService/"


async def test_scoped_tokens_get_no_proof_and_unscoped_ones_do() -> None:
    issuer = TokenIssuer(now=NOW, audience="medledger.anchoring")
    verifier = TokenVerifier(
        issuer="medledger.identity", audience="medledger.anchoring", fetch_jwks=issuer.fetch, clock=lambda: NOW
    )
    gate = AuthInterceptor(verifier, DeactivationSet(), public_methods=PUBLIC_METHODS, access=ACCESS, scopes=SCOPES)
    request = pb.GetAnchoredProofRequest(commitment="00")
    method = _SERVICE + "GetAnchoredProof"
    scoped = issuer.token(scope="system/*.cruds")
    with pytest.raises(PermissionDenied, match="scopes do not allow this call"):
        await gate.authenticate([("authorization", f"Bearer {scoped}")], method, request)
    assert await gate.authenticate([("authorization", f"Bearer {issuer.token()}")], method, request)
    assert gate.is_public(_SERVICE + "VerifyProof")


def readme_scope_rpcs() -> set[str]:
    """The RPCs the README's "SMART scopes" table lists."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("\n## SMART scopes\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("|")]
    return {r for r in rows if r != "RPC" and set(r) != {"-"}}


def test_the_readme_lists_exactly_the_rpcs_open_to_scoped_tokens() -> None:
    assert readme_scope_rpcs() == {m.rsplit("/", 1)[1] for m in SCOPES}
