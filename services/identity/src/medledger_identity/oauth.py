"""identity's OAuth 2.0 token endpoint for SMART Backend Services: ``POST /oauth2/token``.

A registered SMART client (``RegisterSmartClient``) asks with ``grant_type=client_credentials``,
the ``scope`` it wants, and a JWT it signed with one of its registered keys
(``private_key_jwt``, RFC 7523 §2.2; SMART Backend Services): ES384 or RS384, ``iss`` = ``sub`` =
its client id, ``aud`` = this endpoint's URL, ``exp`` at most five minutes ahead, and a ``jti``
never used before. Seen ``jti``s are kept in the database until they expire, so a replay is
refused after a restart and on another replica too. The answer (RFC 6749 §5.1) is a five-minute
token for the FHIR gateway (and the services it calls) with the granted scopes: those asked for
narrowed to those the client may be granted. Errors are RFC 6749 §5.2 JSON.

Neither the assertion nor the token is ever logged.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from joserfc import jwk, jwt
from joserfc.errors import JoseError
from medledger.types.v1 import vocabulary_pb2

from medledger_identity import domain, scopes, storage
from medledger_identity.principals import ACTIVE
from medledger_identity.tokens import TokenDesk
from medledger_runtime.db import Database
from medledger_runtime.errors import InvalidArgument
from medledger_runtime.http_server import HttpRoute

log = logging.getLogger(__name__)

PATH = "/oauth2/token"
CLIENT_CREDENTIALS = "client_credentials"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART Backend Services: the assertion's exp is at most five minutes after now.
MAX_ASSERTION_SECONDS = 5 * 60
# Clock skew allowed either way, as for access tokens.
LEEWAY_SECONDS = 30
MAX_ASSERTION_CHARS = 8 * 1024
_SMART_CLIENT = vocabulary_pb2.PrincipalKind.PRINCIPAL_KIND_SMART_CLIENT
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class OAuthError(Exception):
    """An RFC 6749 §5.2 error: `error` is its code; 401 for invalid_client, 400 otherwise."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description

    @property
    def status(self) -> int:
        return 401 if self.error == "invalid_client" else 400


@dataclass(frozen=True)
class TokenGrant:
    access_token: str
    expires_in: int
    scope: str


def _unverified(segment: str) -> dict[str, Any]:
    """A JWT header or payload before verification: only to find the client and its keys."""
    try:
        value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except ValueError:
        raise OAuthError("invalid_client", "client_assertion is not a JWT") from None
    if not isinstance(value, dict):
        raise OAuthError("invalid_client", "client_assertion is not a JWT")
    return value


class ClientCredentials:
    """The client_credentials grant with a JWT client assertion; its dependencies come through
    the constructor. `token_endpoint_url` is read per request: with port 0 it is known only
    once the HTTP server listens."""

    def __init__(
        self,
        db: Database,
        tokens: TokenDesk,
        token_endpoint_url: Callable[[], str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.tokens = tokens
        self.token_endpoint_url = token_endpoint_url
        self.clock = clock

    async def grant(self, form: Mapping[str, Sequence[str]]) -> TokenGrant:
        params = {}
        for name, values in form.items():
            if len(values) != 1:
                raise OAuthError("invalid_request", f"{name} given more than once")
            params[name] = values[0]
        grant_type = params.get("grant_type", "")
        if not grant_type:
            raise OAuthError("invalid_request", "grant_type is required")
        if grant_type != CLIENT_CREDENTIALS:
            raise OAuthError("unsupported_grant_type", "only client_credentials is supported")
        if params.get("client_assertion_type") != JWT_BEARER:
            raise OAuthError("invalid_request", f"client_assertion_type must be {JWT_BEARER}")
        assertion = params.get("client_assertion", "")
        if not assertion:
            raise OAuthError("invalid_request", "client_assertion is required")
        if "scope" not in params:
            raise OAuthError("invalid_request", "scope is required")
        try:
            requested = scopes.parse_scopes(params["scope"])
            scopes.check_context(requested, "system")
        except InvalidArgument as exc:
            raise OAuthError(
                "invalid_scope", exc.violations[0].description if exc.violations else "bad scope"
            ) from None
        if not requested:
            raise OAuthError("invalid_scope", "scope is required")

        row, client = await self._authenticate(assertion, params.get("client_id"))
        granted = scopes.narrow(requested, scopes.parse_scopes(client.allowed_scopes))
        if not granted:
            raise OAuthError("invalid_scope", "none of the requested scopes is allowed to this client")
        issued = await self.tokens.sign_for(
            row, domain.FHIR_AUDIENCE, scopes.scope_string(granted), ttl_seconds=domain.CLIENT_TOKEN_TTL_SECONDS
        )
        return TokenGrant(issued.access_token, domain.CLIENT_TOKEN_TTL_SECONDS, issued.scope)

    async def _authenticate(
        self, assertion: str, client_id: str | None
    ) -> tuple[storage.PrincipalRow, storage.SmartClientRow]:
        """The client the assertion authenticates (RFC 7523 §3, SMART Backend Services); its
        jti is recorded. invalid_client for anything wrong with it."""
        parts = assertion.split(".")
        if len(assertion) > MAX_ASSERTION_CHARS or len(parts) != 3:
            raise OAuthError("invalid_client", "client_assertion is not a compact JWS")
        header, unverified = _unverified(parts[0]), _unverified(parts[1])
        if header.get("alg") not in domain.CLIENT_ASSERTION_ALGORITHMS:
            raise OAuthError("invalid_client", "client_assertion must be signed with ES384 or RS384")
        if not isinstance(header.get("kid"), str):
            raise OAuthError("invalid_client", "client_assertion has no kid")
        issuer = unverified.get("iss")
        if not isinstance(issuer, str) or not issuer or (client_id is not None and client_id != issuer):
            raise OAuthError("invalid_client", "client_assertion's iss must be the client id")
        async with self.db.connect() as conn:
            row = await storage.get_principal(conn, issuer)
            client = await storage.get_smart_client(conn, issuer) if row is not None else None
        if row is None or client is None or row.kind != _SMART_CLIENT:
            raise OAuthError("invalid_client", "unknown client")
        if row.status != ACTIVE:
            raise OAuthError("invalid_client", "the client is deactivated")

        keys = jwk.KeySet.import_key_set(json.loads(client.jwks_json))
        try:
            claims = jwt.decode(assertion, keys, algorithms=list(domain.CLIENT_ASSERTION_ALGORITHMS)).claims
        except (JoseError, ValueError):
            raise OAuthError("invalid_client", "client_assertion's signature does not verify") from None
        now = self.clock()
        self._check_claims(claims, issuer, now)
        async with self.db.transaction() as conn:
            fresh = await storage.record_assertion_jti(
                conn, issuer, claims["jti"], float(claims["exp"]), forget_before=now - LEEWAY_SECONDS
            )
        if not fresh:
            raise OAuthError("invalid_client", "client_assertion was used before (jti)")
        return row, client

    def _check_claims(self, claims: Mapping[str, Any], client_id: str, now: float) -> None:
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            raise OAuthError("invalid_client", "client_assertion's iss and sub must be the client id")
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if self.token_endpoint_url() not in audiences:
            raise OAuthError("invalid_client", "client_assertion's aud must be this token endpoint's URL")
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise OAuthError("invalid_client", "client_assertion needs a numeric exp")
        if exp + LEEWAY_SECONDS < now:
            raise OAuthError("invalid_client", "client_assertion expired")
        if exp > now + MAX_ASSERTION_SECONDS + LEEWAY_SECONDS:
            raise OAuthError("invalid_client", "client_assertion's exp is more than five minutes ahead")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and not isinstance(nbf, bool) and nbf - LEEWAY_SECONDS > now:
            raise OAuthError("invalid_client", "client_assertion is not valid yet")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 0 < len(jti) <= 256:
            raise OAuthError("invalid_client", "client_assertion needs a jti of at most 256 characters")


def _json(status: int, body: Mapping[str, Any]) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=_NO_STORE)


def token_route(endpoint: ClientCredentials) -> HttpRoute:
    """POST /oauth2/token (public: the client authenticates with its assertion)."""

    async def token(request: web.Request) -> web.Response:
        try:
            if request.content_type != "application/x-www-form-urlencoded":
                raise OAuthError("invalid_request", "the body must be application/x-www-form-urlencoded")
            form = await request.post()
            grant = await endpoint.grant({name: [str(v) for v in form.getall(name)] for name in set(form.keys())})
        except OAuthError as exc:
            # The code and the reason only: never the assertion.
            log.info("token request refused: %s (%s)", exc.error, exc.description)
            return _json(exc.status, {"error": exc.error, "error_description": exc.description})
        return _json(
            200,
            {
                "access_token": grant.access_token,
                "token_type": "bearer",
                "expires_in": grant.expires_in,
                "scope": grant.scope,
            },
        )

    return HttpRoute("POST", PATH, token, public=True)
