"""A principal's link to identity: access tokens for it, and the data every service needs to
authenticate its own callers (the JWKS and the deactivated principals).

Tokens are fetched with the principal's client secret, kept until a minute before they expire
and shared by concurrent callers (one fetch at a time per audience). The secret is read from its
file at each fetch, so a rotated secret file is picked up without a restart, and never logged.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from medledger.identity.v1 import identity_service_pb2 as pb
from medledger.identity.v1 import identity_service_pb2_grpc as pb_grpc

from medledger_sdk.channels import make_channel, with_metadata
from medledger_sdk.config import read_secret_file
from medledger_verifier.errors import Unauthenticated, Unavailable

# The `iss` of every medledger access token.
TOKEN_ISSUER = "medledger.identity"  # noqa: S105 - an issuer name, not a secret
# Fetch a new token this long before the current one expires, so none expires in flight.
REFRESH_BEFORE_EXPIRY_SECONDS = 60.0


class IdentityLink:
    def __init__(
        self,
        identity_address: str,
        principal_id: str,
        *,
        secret: str | None = None,
        secret_file: Path | None = None,
        channel: grpc.aio.Channel | None = None,
        clock: Callable[[], float] = time.time,
        tls: Mapping[str, Path | None] | None = None,
    ) -> None:
        """``tls``: ``ca_file``, ``cert_file``, ``key_file`` for the channel to identity, as
        ``make_channel`` takes them (a service passes ``grpc_client.client_tls_files``)."""
        tls = dict(tls or {})
        if (secret is None) == (secret_file is None):
            raise ValueError("give the client secret or the file that holds it, not both")
        self.principal_id = principal_id
        self._secret = secret
        self._secret_file = secret_file
        self._own_channel = channel is None
        self.channel = channel or make_channel(
            identity_address, ca_file=tls.get("ca_file"), cert_file=tls.get("cert_file"), key_file=tls.get("key_file")
        )
        self.stub = pb_grpc.IdentityServiceStub(self.channel)
        self._clock = clock
        self._tokens: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _client_secret(self) -> str:
        if self._secret is not None:
            return self._secret
        assert self._secret_file is not None
        return read_secret_file(self._secret_file).decode()

    async def token(self, audience: str) -> str:
        """An access token for `audience` (e.g. ``medledger.records``), fetched when needed."""
        cached = self._tokens.get(audience)
        if cached is not None and cached[1] - REFRESH_BEFORE_EXPIRY_SECONDS > self._clock():
            return cached[0]
        lock = self._locks.setdefault(audience, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(audience)
            if cached is not None and cached[1] - REFRESH_BEFORE_EXPIRY_SECONDS > self._clock():
                return cached[0]
            try:
                reply = await self.stub.IssueToken(
                    pb.IssueTokenRequest(
                        principal_id=self.principal_id, client_secret=self._client_secret(), audience=audience
                    ),
                    timeout=10,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise Unauthenticated(f"identity refused the credentials of {self.principal_id}") from None
                raise Unavailable(f"identity could not issue a token: {exc.code().name}") from None
            token = str(reply.access_token)
            self._tokens[audience] = (token, reply.expires_at.ToSeconds())
            return token

    def forget(self, audience: str) -> None:
        """Drop a cached token (after a service refused it)."""
        self._tokens.pop(audience, None)

    async def fetch_jwks(self) -> Mapping[str, Any]:
        reply = await self.stub.GetJwks(pb.GetJwksRequest(), timeout=10)
        jwks = json.loads(reply.jwks_json)
        if not isinstance(jwks, dict):
            raise Unavailable("identity returned a malformed JWKS")
        return jwks

    async def deactivated_principals(self) -> list[str]:
        token = await self.token("medledger.identity")
        reply = await self.stub.ListDeactivatedPrincipals(
            pb.ListDeactivatedPrincipalsRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10
        )
        return list(reply.principal_ids)

    async def aclose(self) -> None:
        if self._own_channel:
            await self.channel.close()


class BearerTokenInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Attaches ``authorization: Bearer <token>`` for one audience to every call on a channel;
    after an UNAUTHENTICATED answer it drops the cached token so the next call gets a new one."""

    def __init__(self, link: IdentityLink, audience: str) -> None:
        self.link = link
        self.audience = audience

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        token = await self.link.token(self.audience)
        details = with_metadata(client_call_details, [("authorization", f"Bearer {token}")])
        call = await continuation(details, request)
        code = await call.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            self.link.forget(self.audience)
        return call
