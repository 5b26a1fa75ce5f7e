"""SMART-scoped tokens against anchoring: proofs are no FHIR resource, so a scoped token is
refused every RPC that needs a token, while the public ones stay open to anyone."""

from __future__ import annotations

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
