"""Authentication and coarse authorization for every service's gRPC server.

Callers send ``authorization: Bearer <JWT>`` metadata. Tokens are issued by identity, signed by
a key-manager key (EdDSA or ES256) named by ``kid``, and published as a JWKS. The interceptor:

- pins the algorithm to the JWK's own (so ``none``, HS* and algorithm confusion are refused);
- checks ``iss``, ``aud`` (this service), ``exp`` and ``nbf`` with 30 s of leeway;
- fetches the JWKS again on an unknown ``kid``, at most once per 30 s;
- caches verified tokens until they expire, so a repeated token costs a dict lookup;
- refuses tokens of deactivated principals on every call;
- lets the service's public RPCs through, answers UNAUTHENTICATED without a valid token and
  PERMISSION_DENIED when the caller's roles and kind are not in the RPC's access rule;
- for a token with SMART v2 scopes (its ``scope`` claim), answers PERMISSION_DENIED unless the
  RPC declares what it needs (``ScopeNeed``: a FHIR resource type and interaction) and the
  scopes allow it. A scoped token can do no more over gRPC than over FHIR; tokens without the
  claim keep the roles-only rules.

Finer rules (a patient about themselves, an org-admin within their organization) belong to the
service's API layer, which reads the caller from ``current_caller()``.

The package: ``callers`` (who the caller is and the coarse access rules), ``scopes`` (SMART v2
scopes and what an RPC needs of them, pure), ``tokens`` (verifying
an access token against the JWKS) and ``interceptor`` (the gRPC interceptor and the HTTP bearer
check, with the set of deactivated principals). Services import these names from here.
"""

from medledger_runtime.auth.callers import ANY_CALLER, Access, Caller, acting_as, current_caller
from medledger_runtime.auth.interceptor import (
    AuthInterceptor,
    DeactivationSet,
    authenticate_bearer,
    bearer_token,
    check_scopes,
)
from medledger_runtime.auth.scopes import InvalidScope, Scope, ScopeNeed, ScopeSet, patient_id_field
from medledger_runtime.auth.tokens import JwksFetcher, TokenVerifier, jwk_algorithm, jwks_json

__all__ = [
    "ANY_CALLER",
    "Access",
    "AuthInterceptor",
    "Caller",
    "DeactivationSet",
    "InvalidScope",
    "JwksFetcher",
    "Scope",
    "ScopeNeed",
    "ScopeSet",
    "TokenVerifier",
    "acting_as",
    "authenticate_bearer",
    "bearer_token",
    "check_scopes",
    "current_caller",
    "jwk_algorithm",
    "jwks_json",
    "patient_id_field",
]
