"""Verifying medledger access tokens: JWTs signed by identity's key-manager keys (EdDSA or
ES256), checked against identity's JWKS with the algorithm pinned to each key's own."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from jwt.exceptions import PyJWKError

from medledger_runtime.auth.callers import Caller
from medledger_runtime.auth.scopes import InvalidScope, ScopeSet
from medledger_runtime.errors import Unauthenticated, Unavailable

LEEWAY_SECONDS = 30
JWKS_REFETCH_SECONDS = 30
# After a failed fetch (identity down, or its key manager), the next token of an unknown key may
# try again this soon: until a fetch succeeds such a token is UNAVAILABLE, not refused.
JWKS_RETRY_SECONDS = 1.0
MAX_TOKEN_BYTES = 8192
# The algorithms medledger signs with; anything else (none, HS*, RS*) is refused outright.
ALLOWED_ALGORITHMS = frozenset({"EdDSA", "ES256"})


def jwk_algorithm(jwk: Mapping[str, Any]) -> str | None:
    """The one algorithm a JWK may verify: its ``alg``, or the only one its key type allows."""
    if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519":
        alg = "EdDSA"
    elif jwk.get("kty") == "EC" and jwk.get("crv") == "P-256":
        alg = "ES256"
    else:
        return None
    declared = jwk.get("alg")
    if declared is not None and declared != alg:
        return None
    return alg


JwksFetcher = Callable[[], Awaitable[Mapping[str, Any]]]


class TokenVerifier:
    """Verifies medledger access tokens for one audience."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        fetch_jwks: JwksFetcher,
        clock: Callable[[], float] = time.time,
        max_cached: int = 100_000,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self._fetch_jwks = fetch_jwks
        self._clock = clock
        self._keys: dict[str, tuple[jwt.PyJWK, str]] = {}
        self._last_fetch = -float("inf")  # the last fetch that succeeded
        self._last_failure: float | None = None  # since then, the last that failed
        self._fetch_lock = asyncio.Lock()
        self._cache: dict[str, Caller] = {}
        self._max_cached = max_cached
        # Header segment -> (alg, kid), for headers that passed the checks below. Every token of
        # one signing key carries the same header, so this skips one base64 + JSON parse per token.
        self._headers: dict[str, tuple[str, str]] = {}

    async def refresh_keys(self) -> None:
        async with self._fetch_lock:
            try:
                jwks = await self._fetch_jwks()
            except BaseException:
                self._last_failure = time.monotonic()
                raise
            keys: dict[str, tuple[jwt.PyJWK, str]] = {}
            for jwk in jwks.get("keys", []):
                alg = jwk_algorithm(jwk)
                kid = jwk.get("kid")
                if alg is None or not kid:
                    continue
                try:
                    keys[kid] = (jwt.PyJWK(dict(jwk), algorithm=alg), alg)
                except PyJWKError:
                    continue
            self._keys = keys
            self._last_fetch = time.monotonic()
            self._last_failure = None

    async def _key(self, kid: str) -> tuple[jwt.PyJWK, str] | None:
        found = self._keys.get(kid)
        if found is not None:
            return found
        if self._fetch_lock.locked():
            # A fetch is on its way (started by a token of the same new key, most likely):
            # wait for it rather than refuse a good token that arrived a moment too early.
            async with self._fetch_lock:
                pass
        elif self._fetch_due():
            await self.refresh_keys()
        found = self._keys.get(kid)
        if found is None and self._last_failure is not None:
            # The keys could not be fetched: the token may well be good. Refusing it would make
            # clients give up on a call they should retry.
            raise Unavailable("the token-signing keys could not be fetched from identity; try again")
        return found

    def _fetch_due(self) -> bool:
        now = time.monotonic()
        if self._last_failure is not None:
            return now - self._last_failure >= JWKS_RETRY_SECONDS
        return now - self._last_fetch >= JWKS_REFETCH_SECONDS

    async def verify(self, token: str) -> Caller:
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at + LEEWAY_SECONDS >= now:
                return cached
            del self._cache[token]
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated("token too large")
        if not token.isascii():
            raise Unauthenticated("malformed token")
        # The JWS compact form (RFC 7515 §7.1) is checked here rather than with jwt.decode:
        # PyJWT 2.15 tests every base64 character in a Python loop, twice per token, which
        # made a first-seen token cost twice its signature check. PyJWT still parses the JWKS.
        parts = token.split(".")
        if len(parts) != 3:
            raise Unauthenticated("malformed token")
        alg, kid = self._header(parts[0])
        found = await self._key(kid)
        if found is None:
            raise Unauthenticated("token signed by an unknown key")
        key, key_alg = found
        if alg != key_alg:
            raise Unauthenticated("token algorithm does not match its key")
        signature = _b64url_segment(parts[2])
        if not _signature_valid(key.key, key_alg, f"{parts[0]}.{parts[1]}".encode("ascii"), signature):
            raise Unauthenticated("invalid token")
        claims = _json_segment(parts[1])
        self._check_claims(claims, now)
        caller = Caller(
            principal_id=str(claims["sub"]),
            kind=str(claims.get("kind", "")),
            roles=frozenset(str(r) for r in claims.get("roles", ()) or ()),
            organization_id=str(claims.get("org", "")),
            token_id=str(claims["jti"]),
            expires_at=float(claims["exp"]),
            scopes=_scopes(claims),
            patient_context=claims.get("patient", ""),
        )
        if len(self._cache) >= self._max_cached:
            self._evict_expired(now)
        self._cache[token] = caller
        return caller

    def _header(self, segment: str) -> tuple[str, str]:
        """The header's accepted ``alg`` and its ``kid``; Unauthenticated for anything else."""
        known = self._headers.get(segment)
        if known is not None:
            return known
        header = _json_segment(segment)
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            raise Unauthenticated(f"token algorithm {str(alg)[:16]!r} is not accepted")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("token has no key id")
        if len(self._headers) >= _MAX_HEADERS:
            self._headers.clear()  # headers with made-up extra fields cannot grow it without bound
        self._headers[segment] = (alg, kid)
        return alg, kid

    def _check_claims(self, claims: dict[str, Any], now: float) -> None:
        """RFC 7519 §4.1 checks, with LEEWAY_SECONDS of clock skew either way."""
        for name in _REQUIRED_CLAIMS:
            if name not in claims:
                raise Unauthenticated(f"token has no {name!r} claim")
        for name in ("exp", "iat", "nbf"):
            value = claims.get(name)
            if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise Unauthenticated(f"token claim {name!r} is not a number")
        if claims["exp"] + LEEWAY_SECONDS < now:
            raise Unauthenticated("token expired")
        if "nbf" in claims and claims["nbf"] - LEEWAY_SECONDS > now:
            raise Unauthenticated("token not yet valid")
        if claims["iss"] != self.issuer:
            raise Unauthenticated("token from an unknown issuer")
        audience = claims["aud"]
        audiences = audience if isinstance(audience, list) else [audience]
        if self.audience not in audiences:
            raise Unauthenticated("token is for another service")
        if not isinstance(claims["sub"], str) or not isinstance(claims["jti"], str):
            raise Unauthenticated("invalid token")
        roles = claims.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise Unauthenticated("invalid token")
        for name in ("scope", "patient"):
            if name in claims and not isinstance(claims[name], str):
                raise Unauthenticated(f"token claim {name!r} is not a string")

    def _evict_expired(self, now: float) -> None:
        for token, caller in list(self._cache.items()):
            if caller.expires_at + LEEWAY_SECONDS < now:
                del self._cache[token]
        if len(self._cache) >= self._max_cached:
            self._cache.clear()


def _scopes(claims: dict[str, Any]) -> ScopeSet | None:
    """The token's SMART scopes; None when it has no ``scope`` claim (unscoped). A claim that is
    there but empty is a token scoped to nothing, not an unscoped one: never widen."""
    if "scope" not in claims:
        return None
    try:
        return ScopeSet.parse(claims["scope"])
    except InvalidScope as exc:
        # Identity writes this claim: a scope not understood is a bug or a forgery.
        raise Unauthenticated(f"token has a scope this service does not understand ({exc})") from None


_REQUIRED_CLAIMS = ("exp", "iat", "sub", "jti", "iss", "aud")
_MAX_HEADERS = 64
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _b64url_segment(segment: str) -> bytes:
    """Strict unpadded base64url: the alphabet only, and the canonical encoding of its bytes."""
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise Unauthenticated("malformed token")
    decoded = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if base64.urlsafe_b64encode(decoded).rstrip(b"=").decode("ascii") != segment:
        raise Unauthenticated("malformed token")
    return decoded


def _json_segment(segment: str) -> dict[str, Any]:
    try:
        # UTF-8 only (RFC 7515 §7.1); json.loads on bytes would also take UTF-16 and UTF-32.
        value = json.loads(_b64url_segment(segment).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise Unauthenticated("malformed token") from None
    if not isinstance(value, dict):
        raise Unauthenticated("malformed token")
    return value


_ES256 = ec.ECDSA(hashes.SHA256())  # immutable: made once, not per token


def _signature_valid(key: Any, alg: str, signing_input: bytes, signature: bytes) -> bool:
    try:
        if alg == "EdDSA":
            if not isinstance(key, ed25519.Ed25519PublicKey):
                return False
            key.verify(signature, signing_input)
            return True
        # ES256 (RFC 7518 §3.4): r||s, 32 bytes each.
        if not isinstance(key, ec.EllipticCurvePublicKey) or len(signature) != 64:
            return False
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        key.verify(encode_dss_signature(r, s), signing_input, _ES256)
        return True
    except InvalidSignature:
        return False


def jwks_json(keys: Iterable[Mapping[str, Any]]) -> bytes:
    return json.dumps({"keys": list(keys)}, separators=(",", ":")).encode()
