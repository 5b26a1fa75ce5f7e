"""Access tokens signed by a key-manager key, and the JWKS that verifies them.

The signing key (Ed25519, ``identity-token-signing``) never leaves the key manager: identity
builds the JWS signing input and asks the key manager to sign it. Each key version has its own
``kid``; rotation adds a version, and the JWKS keeps every usable version so that tokens signed
before a rotation stay verifiable until they expire.

:class:`TokenDesk` holds the use cases apart from any transport (the gRPC API in ``api.py`` is
one caller): issuing a token for a principal's client secret, the JWKS, rotating the key.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from medledger.events.v1 import identity_events_pb2
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_identity import domain, scopes, storage
from medledger_identity.credentials import SecretHasher
from medledger_identity.domain import jws_compact, jws_signing_input, signing_kid
from medledger_identity.principals import ACTIVE
from medledger_runtime.db import Database
from medledger_runtime.errors import Unauthenticated, Unavailable
from medledger_runtime.events import TOPICS, new_event
from medledger_runtime.keys import KeyManager, KeyType
from medledger_runtime.outbox import enqueue

SIGNING_KEY = "identity-token-signing"
# How long a replica trusts its idea of the latest key version; another replica may rotate.
_KEY_INFO_TTL_SECONDS = 5.0


class TokenSigner:
    def __init__(self, keys: KeyManager, key_name: str = SIGNING_KEY) -> None:
        self.keys = keys
        self.key_name = key_name
        self._version = 0
        self._version_read_at = -float("inf")
        self._jwks: dict[str, Any] | None = None

    async def start(self) -> None:
        await self.keys.ensure_key(self.key_name, KeyType.ED25519)
        await self._refresh()

    async def _refresh(self) -> None:
        info = await self.keys.key_info(self.key_name)
        if info.latest_version != self._version:
            self._jwks = None
        self._version = info.latest_version
        self._version_read_at = time.monotonic()

    @property
    def current_kid(self) -> str:
        return signing_kid(self.key_name, self._version)

    async def sign(self, claims: Mapping[str, Any]) -> str:
        """A compact JWS of `claims`, EdDSA, with the kid of the key version that signed it."""
        if time.monotonic() - self._version_read_at > _KEY_INFO_TTL_SECONDS:
            await self._refresh()
        for _ in range(2):
            header = {"alg": "EdDSA", "typ": "JWT", "kid": self.current_kid}
            signing_input = jws_signing_input(header, claims)
            signature = await self.keys.sign(self.key_name, signing_input, marshaling="jws")
            if signature.version == self._version:
                return jws_compact(signing_input, signature.jws())
            # Rotated by another replica between our read and the signature: sign again.
            await self._refresh()
        raise Unavailable("the token-signing key keeps changing; retry")

    async def rotate(self) -> str:
        await self.keys.rotate(self.key_name)
        await self._refresh()
        return self.current_kid

    async def jwks(self) -> dict[str, Any]:
        """RFC 7517 key set of every usable version of the signing key."""
        if time.monotonic() - self._version_read_at > _KEY_INFO_TTL_SECONDS:
            await self._refresh()
        if self._jwks is None:
            public = await self.keys.public_key(self.key_name)
            self._jwks = {
                "keys": [public.versions[v].jwk(kid=signing_kid(self.key_name, v)) for v in sorted(public.versions)]
            }
        return self._jwks

    async def jwks_json(self) -> str:
        return json.dumps(await self.jwks(), separators=(",", ":"))


@dataclass(frozen=True)
class IssueToken:
    """A principal's client secret exchanged for a token for one service (`audience`), limited
    to SMART v2 `scope` (space-separated) when one is given."""

    principal_id: str
    client_secret: str
    audience: str
    scope: str = ""


@dataclass(frozen=True)
class Issued:
    access_token: str
    expires_at: int  # seconds since the epoch
    scope: str = ""  # granted, space-separated; "" for an unscoped token
    patient: str = ""  # SMART's patient in context, for a patient's scoped token


Rotation = Callable[[AsyncConnection], Awaitable[str]]
# A well-formed hash of a random secret: unknown principals cost the same time as known ones.
_DUMMY_SECRET = domain.new_client_secret()


class TokenDesk:
    """Identity's token use cases; its dependencies come through the constructor."""

    def __init__(
        self,
        db: Database,
        signer: TokenSigner,
        hasher: SecretHasher,
        notify: Callable[[], None],
        *,
        source: str = "medledger.identity",
        keys_changed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.db = db
        self.signer = signer
        self.hasher = hasher
        # Wakes the outbox relay after a rotation's transaction commits.
        self.notify = notify
        self.source = source
        # Told of a rotation at once: this replica verifies the new key's tokens then.
        self.keys_changed = keys_changed
        self._dummy_hash = ""

    async def start(self) -> None:
        await self.signer.start()
        self._dummy_hash = await self.hasher.hash(_DUMMY_SECRET)

    async def issue(self, command: IssueToken) -> Issued:
        """Unauthenticated, the same for an unknown principal and a wrong secret; a deactivated
        principal gets none."""
        domain.check_audience(command.audience)
        requested = scopes.parse_scopes(command.scope)
        if not command.principal_id or not command.client_secret or len(command.client_secret) > 256:
            raise Unauthenticated("invalid credentials")
        async with self.db.connect() as conn:
            row = await storage.get_principal(conn, command.principal_id)
            stored = await storage.get_secret_hash(conn, command.principal_id) if row else None
        # The same work, and the same answer, for an unknown principal and a wrong secret.
        ok = await self.hasher.verify(stored or self._dummy_hash, command.client_secret)
        if row is None or stored is None or not ok:
            raise Unauthenticated("invalid credentials")
        if row.status != ACTIVE:
            raise Unauthenticated("the principal is deactivated")
        # After authentication: which context a principal may ask says what kind it is.
        scopes.check_context(requested, domain.scope_context(row.kind))
        if self.hasher.needs_rehash(stored):
            async with self.db.transaction() as conn:
                await storage.set_secret_hash(conn, row.principal_id, await self.hasher.hash(command.client_secret))
        return await self.sign_for(row, command.audience, scopes.scope_string(requested))

    async def sign_for(
        self,
        row: storage.PrincipalRow,
        audience: str,
        scope: str,
        ttl_seconds: int = domain.TOKEN_TTL_SECONDS,
    ) -> Issued:
        """A token for an authenticated, active principal."""
        claims = domain.token_claims(
            principal_id=row.principal_id,
            kind=row.kind,
            roles=row.roles,
            organization_id=row.organization_id,
            audience=audience,
            now=int(time.time()),
            scope=scope,
            ttl_seconds=ttl_seconds,
        )
        return Issued(await self.signer.sign(claims), claims["exp"], scope, claims.get("patient", ""))

    async def jwks_json(self) -> str:
        return await self.signer.jwks_json()

    async def rotate(self, transaction: Callable[[Rotation], Awaitable[Any]] | None = None) -> Any:
        """A new version of the signing key, and SigningKeyRotated; returns what the transaction
        returns (by default the new kid)."""

        async def write(conn: AsyncConnection) -> str:
            kid = await self.signer.rotate()
            event = new_event(
                source=self.source,
                payload=identity_events_pb2.SigningKeyRotated(kid=kid),
                aggregate_id=self.signer.key_name,
                version=int(kid.rsplit(".v", 1)[1]),
            )
            await enqueue(conn, TOPICS["identity"], event, key=self.signer.key_name.encode())
            return kid

        result = await (transaction or self._transaction)(write)
        # This replica verifies the new key's tokens at once; the others on the event.
        if self.keys_changed is not None:
            await self.keys_changed()
        return result

    async def _transaction(self, write: Rotation) -> str:
        async with self.db.transaction() as conn:
            kid = await write(conn)
        self.notify()
        return kid


# A cached own token is replaced this long before it expires.
_OWN_TOKEN_MARGIN_SECONDS = 60


class OwnTokens:
    """Tokens of identity's own service principal (``svc_identity``) for calling other services:
    signed here, as the issuer, from the principal's stored row (so its roles are the ones
    identity records for it); cached per audience until a minute before they expire."""

    def __init__(self, db: Database, desk: TokenDesk, principal_id: str) -> None:
        self.db = db
        self.desk = desk
        self.principal_id = principal_id
        self._cache: dict[str, Issued] = {}

    async def token(self, audience: str) -> str:
        cached = self._cache.get(audience)
        if cached is not None and cached.expires_at - _OWN_TOKEN_MARGIN_SECONDS > time.time():
            return cached.access_token
        async with self.db.connect() as conn:
            row = await storage.get_principal(conn, self.principal_id)
        if row is None or row.status != ACTIVE:
            raise Unavailable(f"identity's own principal {self.principal_id} is missing or deactivated")
        issued = await self.desk.sign_for(row, audience, "")
        self._cache[audience] = issued
        return issued.access_token

    def forget(self, audience: str) -> None:
        self._cache.pop(audience, None)
