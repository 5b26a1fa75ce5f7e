"""Authentication benchmarks.

verify:   tokens verified per second through AuthInterceptor.authenticate, for a repeated token
          (the cache) and for first-seen tokens (every one checked cryptographically), beside raw
          signature verification with `cryptography` of the same signing inputs, EdDSA and ES256.
platform: identity and consent running in this process (Tansu from BOOTSTRAP, SQLite, a local
          keyring): access tokens issued per second, and how long a deactivation takes to reach
          consent (p50/p99 over several principals).

Usage: python bench_auth.py verify N                  -> one JSON line
       python bench_auth.py platform BOOTSTRAP FOLDER  -> one JSON line
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from medledger_devstack.testing import status_of
from medledger_runtime.auth import Access, AuthInterceptor, DeactivationSet, TokenVerifier

METHOD = "/medledger.consent.v1.ConsentService/CheckConsent"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signing_keys() -> dict[str, tuple[Any, dict[str, str]]]:
    """A fresh key per algorithm, with its JWK."""
    ed = ed25519.Ed25519PrivateKey.generate()
    ed_jwk = {
        "kty": "OKP",
        "crv": "Ed25519",
        "alg": "EdDSA",
        "kid": "bench-ed",
        "x": b64u(ed.public_key().public_bytes_raw()),
    }
    p256 = ec.generate_private_key(ec.SECP256R1())
    numbers = p256.public_key().public_numbers()
    p256_jwk = {
        "kty": "EC",
        "crv": "P-256",
        "alg": "ES256",
        "kid": "bench-es",
        "x": b64u(numbers.x.to_bytes(32, "big")),
        "y": b64u(numbers.y.to_bytes(32, "big")),
    }
    return {"EdDSA": (ed, ed_jwk), "ES256": (p256, p256_jwk)}


def make_token(alg: str, key: Any, kid: str, now: int) -> tuple[str, bytes, bytes]:
    """A medledger access token; also its signing input and raw signature for the baseline."""
    header = {"alg": alg, "typ": "JWT", "kid": kid}
    claims = {
        "iss": "medledger.identity",
        "aud": "medledger.consent",
        "sub": "rsr_" + uuid.uuid4().hex,
        "jti": uuid.uuid4().hex,
        "iat": now,
        "nbf": now,
        "exp": now + 900,
        "kind": "researcher",
        "roles": ["pdp-client"],
        "org": "",
    }
    signing_input = (b64u(json.dumps(header).encode()) + "." + b64u(json.dumps(claims).encode())).encode()
    if alg == "EdDSA":
        signature = key.sign(signing_input)
    else:
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return signing_input.decode() + "." + b64u(signature), signing_input, signature


async def bench_verify(n: int) -> dict[str, Any]:
    keys = signing_keys()
    jwks = {"keys": [jwk for _, jwk in keys.values()]}

    async def fetch() -> dict[str, Any]:
        return jwks

    now = int(time.time())
    out: dict[str, Any] = {}
    for alg, (key, jwk) in keys.items():
        tokens = [make_token(alg, key, jwk["kid"], now) for _ in range(n)]
        interceptor = AuthInterceptor(
            TokenVerifier(issuer="medledger.identity", audience="medledger.consent", fetch_jwks=fetch),
            DeactivationSet(),
            public_methods=(),
            access={METHOD: Access.of(roles=["pdp-client"])},
        )
        await interceptor.authenticate([("authorization", f"Bearer {tokens[0][0]}")], METHOD)  # loads the JWKS

        # Raw: the same signatures over the same signing inputs, with cryptography alone.
        public = key.public_key()
        t0 = time.perf_counter()
        for _, signing_input, signature in tokens:
            if alg == "EdDSA":
                public.verify(signature, signing_input)
            else:
                der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
                public.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
        raw = n / (time.perf_counter() - t0)

        metadata = [[("authorization", f"Bearer {token}")] for token, _, _ in tokens]
        t0 = time.perf_counter()
        for md in metadata:
            await interceptor.authenticate(md, METHOD)
        first_seen = n / (time.perf_counter() - t0)

        repeated_md = metadata[0]
        t0 = time.perf_counter()
        for _ in range(n * 10):
            await interceptor.authenticate(repeated_md, METHOD)
        repeated = n * 10 / (time.perf_counter() - t0)
        out[alg] = {"raw_per_s": raw, "first_seen_per_s": first_seen, "repeated_per_s": repeated}
    return out


async def bench_platform(bootstrap: str, folder: Path) -> dict[str, Any]:
    from medledger.consent.v1 import consent_service_pb2 as co_pb
    from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
    from medledger.identity.v1 import identity_service_pb2 as pb
    from medledger.identity.v1 import identity_service_pb2_grpc as pb_grpc
    from running_stack import identity_and_consent

    from medledger_sdk.channels import make_channel

    async with identity_and_consent(bootstrap, folder) as platform:
        principals = [await platform.researcher_with_pdp_role() for _ in range(20)]
        identity_address = platform.identity_address

        # Token issues per second: 8 clients at once, for 3 s.
        async with make_channel(identity_address) as channel:
            public = pb_grpc.IdentityServiceStub(channel)
            issued = 0
            deadline = time.perf_counter() + 3.0

            async def issue(pid: str, secret: str) -> None:
                nonlocal issued
                while time.perf_counter() < deadline:
                    await public.IssueToken(
                        pb.IssueTokenRequest(principal_id=pid, client_secret=secret, audience="medledger.consent")
                    )
                    issued += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(issue(*principals[i]) for i in range(8)))
            issue_rate = issued / (time.perf_counter() - t0)

            # Deactivation propagation: deactivate, then call consent until it refuses the token.
            latencies = []
            async with make_channel(f"127.0.0.1:{platform.consents[0].grpc_port}") as consent_channel:
                consent_stub = co_grpc.ConsentServiceStub(consent_channel)
                for pid, secret in principals:
                    reply = await public.IssueToken(
                        pb.IssueTokenRequest(principal_id=pid, client_secret=secret, audience="medledger.consent")
                    )
                    md = (("authorization", f"Bearer {reply.access_token}"),)
                    await status_of(consent_stub.CheckConsent(co_pb.CheckConsentRequest(), metadata=md))
                    t0 = time.perf_counter()
                    await platform.admin_identity.DeactivatePrincipal(
                        pb.DeactivatePrincipalRequest(request_id=str(uuid.uuid4()), principal_id=pid)
                    )
                    while (
                        await status_of(consent_stub.CheckConsent(co_pb.CheckConsentRequest(), metadata=md))
                        != UNAUTHENTICATED
                    ):
                        if time.perf_counter() - t0 > 10:
                            raise RuntimeError("a deactivation did not reach consent within 10 s")
                        await asyncio.sleep(0.002)
                    latencies.append(time.perf_counter() - t0)
    latencies.sort()
    return {
        "issue_per_s": issue_rate,
        "deactivation_p50_ms": latencies[len(latencies) // 2] * 1000,
        "deactivation_p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "deactivation_max_ms": latencies[-1] * 1000,
        "deactivations": len(latencies),
    }


if __name__ == "__main__":
    if sys.argv[1] == "verify":
        print(json.dumps(asyncio.run(bench_verify(int(sys.argv[2])))))
    else:
        print(json.dumps(asyncio.run(bench_platform(sys.argv[2], Path(sys.argv[3])))))
