"""Access tokens signed by a key-manager key, and the JWKS that verifies them.

The signing key (Ed25519, ``identity-token-signing``) never leaves the key manager: identity
builds the JWS signing input and asks the key manager to sign it. Each key version has its own
``kid``; rotation adds a version, and the JWKS keeps every usable version so that tokens signed
before a rotation stay verifiable until they expire.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from medledger_identity.domain import jws_compact, jws_signing_input, signing_kid
from medledger_runtime.errors import Unavailable
from medledger_runtime.keys import KeyManager, KeyType

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
