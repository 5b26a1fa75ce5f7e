"""TokenVerifier and AuthInterceptor against tokens made here: every refusal the verifier owes,
and the acceptance that makes the refusals mean something."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import jwt
import pytest

from medledger_devstack.testing import TokenIssuer, b64u
from medledger_runtime.auth import Access, AuthInterceptor, DeactivationSet, TokenVerifier, tokens
from medledger_runtime.errors import PermissionDenied, Unauthenticated, Unavailable

NOW = 1_800_000_000
METHOD = "/medledger.consent.v1.ConsentService/CheckConsent"


class Issuer(TokenIssuer):
    """Signs tokens the way identity does, with keys of its own, issued at NOW."""

    def __init__(self) -> None:
        super().__init__(now=NOW)


@pytest.fixture
def issuer() -> Issuer:
    return Issuer()


def verifier(issuer: Issuer, now: float = NOW + 10) -> TokenVerifier:
    return TokenVerifier(
        issuer="medledger.identity", audience="medledger.consent", fetch_jwks=issuer.fetch, clock=lambda: now
    )


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
async def test_a_good_token_is_accepted_and_cached(issuer: Issuer, alg: str) -> None:
    v = verifier(issuer)
    token = issuer.token(alg)
    caller = await v.verify(token)
    assert (caller.principal_id, caller.kind, caller.roles) == ("rsr_1", "researcher", frozenset({"pdp-client"}))
    assert await v.verify(token) is caller
    # An audience list that names this service is fine too (RFC 7519 §4.1.3).
    assert await v.verify(issuer.token(alg, aud=["medledger.records", "medledger.consent"]))


async def test_leeway_is_thirty_seconds(issuer: Issuer) -> None:
    assert await verifier(issuer, now=NOW + 900 + 29).verify(issuer.token())
    assert await verifier(issuer, now=NOW - 29).verify(issuer.token())


def _tampered(issuer: Issuer) -> str:
    head, _, sig = issuer.token().split(".")
    return f"{head}.{b64u(json.dumps(issuer.claims(roles=['admin'])).encode())}.{sig}"


def _utf16_header(issuer: Issuer) -> str:
    """Correctly signed, but its header is UTF-16 JSON; RFC 7515 §7.1 says UTF-8."""
    head = b64u(json.dumps({"alg": "EdDSA", "kid": "ed-1"}).encode("utf-16"))
    signing_input = f"{head}.{b64u(json.dumps(issuer.claims()).encode())}"
    return f"{signing_input}.{b64u(issuer.ed.sign(signing_input.encode()))}"


REFUSED = {
    "expired": lambda i: i.token(exp=NOW - 60, iat=NOW - 1000, nbf=NOW - 1000),
    "not yet valid": lambda i: i.token(nbf=NOW + 300),
    "wrong issuer": lambda i: i.token(iss="https://evil.example"),
    "wrong audience": lambda i: i.token(aud="medledger.records"),
    "no exp": lambda i: i.token(exp=None),
    "no jti": lambda i: i.token(jti=None),
    "exp not a number": lambda i: i.token(exp="tomorrow"),
    "alg none": lambda i: (
        f"{b64u(json.dumps({'alg': 'none', 'kid': 'ed-1'}).encode())}.{b64u(json.dumps(i.claims()).encode())}."
    ),
    "HS256 keyed with the public key": lambda i: jwt.encode(
        i.claims(), i.ed.public_key().public_bytes_raw(), algorithm="HS256", headers={"kid": "ed-1"}
    ),
    "RS256": lambda i: i.token(header={"alg": "RS256", "kid": "ed-1"}),
    "alg not a string": lambda i: i.token(header={"alg": ["EdDSA"], "kid": "ed-1"}),
    "kid not a string": lambda i: i.token(header={"alg": "EdDSA", "kid": ["ed-1"]}),
    "header in UTF-16": lambda i: _utf16_header(i),
    "not ASCII": lambda i: i.token().replace(".", ".é", 1),
    "alg of another key": lambda i: i.token(header={"alg": "ES256", "kid": "ed-1"}),
    "forged signature": lambda i: i.token().rsplit(".", 1)[0] + "." + b64u(bytes(64)),
    "tampered claims": _tampered,
    "unknown kid": lambda i: i.token(kid="ed-9"),
    "no kid": lambda i: i.token(header={"alg": "EdDSA"}),
    "padded base64": lambda i: i.token().rsplit(".", 1)[0] + "." + i.token().rsplit(".", 1)[1] + "==",
    "not base64": lambda i: "e30!.e30.e30",
    "two segments": lambda i: "e30.e30",
    "too large": lambda i: i.token(org="x" * 9000),
}


@pytest.mark.parametrize("what", sorted(REFUSED))
async def test_bad_tokens_are_unauthenticated(issuer: Issuer, what: str) -> None:
    with pytest.raises(Unauthenticated):
        await verifier(issuer).verify(REFUSED[what](issuer))


async def test_a_known_header_still_gets_every_other_check(issuer: Issuer) -> None:
    v = verifier(issuer)
    await v.verify(issuer.token())
    head = issuer.token().split(".")[0]
    assert head in v._headers
    for bad in (REFUSED["forged signature"](issuer), REFUSED["tampered claims"](issuer), issuer.token(aud="x")):
        assert bad.startswith(head + ".")
        with pytest.raises(Unauthenticated):
            await v.verify(bad)
    for n in range(200):  # made-up header fields cannot grow the header cache without bound
        await v.verify(issuer.token(header={"alg": "EdDSA", "kid": "ed-1", "n": n}))
    assert len(v._headers) <= 64


async def test_unknown_kids_refetch_the_jwks_at_most_every_30_seconds(issuer: Issuer) -> None:
    v = verifier(issuer)
    await v.verify(issuer.token())
    assert issuer.fetches == 1
    for _ in range(5):
        with pytest.raises(Unauthenticated):
            await v.verify(issuer.token(kid="ed-9"))
    assert issuer.fetches == 1, "a flood of unknown kids must not flood identity"


async def test_tokens_of_a_new_key_arriving_together_wait_for_one_fetch(issuer: Issuer) -> None:
    slow = asyncio.Event()

    async def slow_fetch() -> dict[str, Any]:
        await slow.wait()
        return await issuer.fetch()

    v = TokenVerifier(
        issuer="medledger.identity", audience="medledger.consent", fetch_jwks=slow_fetch, clock=lambda: NOW + 10
    )
    pending = [asyncio.ensure_future(v.verify(issuer.token())) for _ in range(8)]
    await asyncio.sleep(0.01)
    slow.set()
    callers = await asyncio.gather(*pending)
    assert all(c.principal_id == "rsr_1" for c in callers) and issuer.fetches == 1


class FlakyIdentity:
    """Identity's JWKS answer fails while `down`, as when identity or its key manager is out."""

    def __init__(self, issuer: Issuer) -> None:
        self.issuer, self.down, self.fetches = issuer, True, 0

    async def fetch(self) -> dict[str, Any]:
        self.fetches += 1
        await asyncio.sleep(0.01)
        if self.down:
            raise Unavailable("identity could not be reached")
        return await self.issuer.fetch()


async def test_a_failed_fetch_makes_good_tokens_unavailable_not_refused(
    issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens, "JWKS_RETRY_SECONDS", 0.2)
    identity = FlakyIdentity(issuer)
    v = TokenVerifier(
        issuer="medledger.identity", audience="medledger.consent", fetch_jwks=identity.fetch, clock=lambda: NOW + 10
    )
    # Tokens arriving together wait for one fetch; when it fails, each is UNAVAILABLE.
    pending = [asyncio.ensure_future(v.verify(issuer.token())) for _ in range(4)]
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results), results
    # Right after the failure: not fetched again yet, and still UNAVAILABLE (it was UNAUTHENTICATED
    # for 30 s: "signed by an unknown key", so clients gave up on good tokens).
    with pytest.raises(Unavailable):
        await v.verify(issuer.token())
    assert identity.fetches == 1
    identity.down = False
    await asyncio.sleep(0.25)
    assert (await v.verify(issuer.token())).principal_id == "rsr_1"
    assert identity.fetches == 2
    # Once the keys are known, a token of a key identity does not have is refused.
    with pytest.raises(Unauthenticated):
        await v.verify(issuer.token(kid="ed-2"))


async def test_interceptor_refuses_deactivated_principals_and_applies_the_rule(issuer: Issuer) -> None:
    deactivated = DeactivationSet()
    interceptor = AuthInterceptor(
        verifier(issuer), deactivated, public_methods=(), access={METHOD: Access.of(roles=["pdp-client"])}
    )
    token = issuer.token()
    md = [("authorization", f"Bearer {token}")]
    assert (await interceptor.authenticate(md, METHOD)).principal_id == "rsr_1"
    with pytest.raises(PermissionDenied):
        await interceptor.authenticate([("authorization", f"Bearer {issuer.token(roles=[])}")], METHOD)
    with pytest.raises(PermissionDenied):
        await interceptor.authenticate(md, "/medledger.consent.v1.ConsentService/NotInTheTable")
    with pytest.raises(Unauthenticated):
        await interceptor.authenticate([], METHOD)
    with pytest.raises(Unauthenticated):
        await interceptor.authenticate([("authorization", f"Basic {token}")], METHOD)
    deactivated.add("rsr_1")
    with pytest.raises(Unauthenticated):
        await interceptor.authenticate(md, METHOD)  # even though the token is cached


def test_verifier_clock_default_is_wall_time(issuer: Issuer) -> None:
    v = TokenVerifier(issuer="medledger.identity", audience="medledger.consent", fetch_jwks=issuer.fetch)
    assert abs(v._clock() - time.time()) < 5
