"""The key manager's contract: one suite, run against every implementation.

- ``local``: the local keyring (an encrypted file in a temporary folder);
- ``openbao``: the Vault implementation (hvac, real HTTP) against a real OpenBao server, the
  session's ``openbao`` fixture (raft storage, transit mounted; the root token). Never skipped;
- ``vault-real``: the Vault implementation against an external Vault, when ``VAULT_ADDR`` and
  ``VAULT_TOKEN`` are set (transit enabled at ``VAULT_TRANSIT_MOUNT``, default ``transit``;
  ``VAULT_CACERT`` for a private CA). Skipped otherwise. Keys are named ``t-<random>-...`` and
  deleted afterwards.

Then the Vault implementation's error handling against OpenBao itself: sealed and stopped (a
server of this module's own, so the shared one is never disturbed), a token whose policy lacks
the path, a revoked token, no transit mount, slow answers (a delaying proxy in front of the
server), the token file; and the local keyring's file handling.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import stat
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import hvac
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from prometheus_client import REGISTRY

from medledger_devstack.localstack import HOST, closed_port
from medledger_devstack.openbao import OpenBao
from medledger_devstack.testing import OpenBaoServer
from medledger_runtime.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    MedledgerError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from medledger_runtime.keys import (
    KeyManager,
    KeyType,
    LocalKeyring,
    Signature,
    VaultKeyManager,
    create_master_key_file,
    legacy_patient_key_name,
    patient_key_name,
)
from medledger_runtime.keys import local as local_module
from medledger_runtime.settings import ConfigError

BACKENDS = ["local", "openbao", "vault-real"]
SIGNING = [KeyType.ED25519, KeyType.ECDSA_P256]
VERSIONED = re.compile(r"^vault:v(\d+):([A-Za-z0-9+/]*={0,2})$")
REAL_VAULT = bool(os.environ.get("VAULT_ADDR") and os.environ.get("VAULT_TOKEN"))


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """An OpenBao server of this module's own, for sealing and stopping it (tests that do must
    leave it running and unsealed)."""
    folder = tmp_path_factory.mktemp("own-bao")
    server = OpenBao(folder / "state", folder / "secrets")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _master_and_keyring(tmp_path: Path) -> tuple[Path, Path]:
    master = create_master_key_file(tmp_path / "secrets" / "keyring-master.key")
    return master, tmp_path / "data" / "keys" / "identity.keyring"


@pytest.fixture(params=BACKENDS)
async def km(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KeyManager]:
    manager: KeyManager
    if request.param == "local":
        master, path = _master_and_keyring(tmp_path)
        manager = await LocalKeyring.open(path, master)
    elif request.param == "openbao":
        bao: OpenBaoServer = request.getfixturevalue("openbao")
        manager = VaultKeyManager(bao.address, token=bao.root_token, timeout=10)
    else:
        if not REAL_VAULT:
            pytest.skip("VAULT_ADDR and VAULT_TOKEN are not set: no real Vault to run the contract against")
        manager = VaultKeyManager(
            os.environ["VAULT_ADDR"],
            token=os.environ["VAULT_TOKEN"],
            mount_point=os.environ.get("VAULT_TRANSIT_MOUNT", "transit"),
            verify=os.environ.get("VAULT_CACERT") or True,
            namespace=os.environ.get("VAULT_NAMESPACE") or None,
            timeout=10,
        )
    try:
        yield manager
    finally:
        await manager.aclose()


@pytest.fixture
async def new_name(km: KeyManager) -> AsyncIterator[Callable[[str], str]]:
    """Fresh key names; the keys are deleted afterwards (they may live in a real Vault)."""
    run = uuid.uuid4().hex[:10]
    created: list[str] = []

    def make(purpose: str = "k") -> str:
        name = f"t-{run}-{purpose}-{uuid.uuid4().hex[:6]}"
        created.append(name)
        return name

    yield make
    for name in created:
        try:
            await km.allow_deletion(name)
            await km.delete_key(name)
        except NotFound:
            pass


def _tamper(ciphertext: str) -> str:
    version, body = VERSIONED.fullmatch(ciphertext).groups()  # type: ignore[union-attr]
    raw = bytearray(base64.b64decode(body))
    raw[len(raw) // 2] ^= 0x01
    return f"vault:v{version}:" + base64.b64encode(bytes(raw)).decode()


def _load(pem: str) -> ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    assert isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey)
    return key


def _verify_with_cryptography(pem: str, data: bytes, signature: Signature) -> None:
    """Raises InvalidSignature unless valid: the published public key and plain cryptography only."""
    key = _load(pem)
    _, body = signature.value.split(":", 2)[1:]
    if isinstance(key, ed25519.Ed25519PublicKey):
        alphabet = base64.urlsafe_b64decode if signature.marshaling == "jws" else base64.b64decode
        key.verify(alphabet(body + "=" * (-len(body) % 4)), data)
        return
    if signature.marshaling == "jws":
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        assert len(raw) == 64
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    else:
        der = base64.b64decode(body)
    key.verify(der, data, ec.ECDSA(hashes.SHA256()))


# -- the contract ---------------------------------------------------------------------------


async def test_ensure_key_is_idempotent(km: KeyManager, new_name: Callable[[str], str]) -> None:
    for key_type in KeyType:
        name = new_name(key_type.value)
        first = await km.ensure_key(name, key_type)
        again = await km.ensure_key(name, key_type.value)
        assert first == again
        assert first.type is key_type
        assert (first.latest_version, first.min_decryption_version, first.deletion_allowed) == (1, 1, False)
        assert first.versions == (1,)
        assert await km.key_info(name) == first
        other = KeyType.ED25519 if key_type is KeyType.AES256_GCM96 else KeyType.AES256_GCM96
        with pytest.raises(AlreadyExists, match="exists with type"):
            await km.ensure_key(name, other)
    with pytest.raises(InvalidArgument, match="key_type"):
        await km.ensure_key(new_name("bad"), "rsa-2048")


async def test_concurrent_ensure_and_use(km: KeyManager, new_name: Callable[[str], str]) -> None:
    name = new_name("conc")
    infos = await asyncio.gather(*(km.ensure_key(name, KeyType.AES256_GCM96) for _ in range(8)))
    assert {i.latest_version for i in infos} == {1}
    texts = [f"record {i}".encode() for i in range(16)]
    cts = await asyncio.gather(*(km.encrypt(name, t) for t in texts))
    assert await asyncio.gather(*(km.decrypt(name, c) for c in cts)) == texts


async def test_unknown_key_is_not_found(km: KeyManager, new_name: Callable[[str], str]) -> None:
    name = new_name("missing")
    ciphertext = "vault:v1:" + base64.b64encode(bytes(40)).decode()
    signature = "vault:v1:" + base64.b64encode(bytes(64)).decode()
    calls = {
        "key_info": km.key_info(name),
        "public_key": km.public_key(name),
        "rotate": km.rotate(name),
        "set_min_decryption_version": km.set_min_decryption_version(name, 1),
        "allow_deletion": km.allow_deletion(name),
        "delete_key": km.delete_key(name),
        "encrypt": km.encrypt(name, b"x"),
        "decrypt": km.decrypt(name, ciphertext),
        "rewrap": km.rewrap(name, ciphertext),
        "generate_data_key": km.generate_data_key(name),
        "decrypt_data_key": km.decrypt_data_key(name, ciphertext),
        "sign": km.sign(name, b"x"),
        "verify": km.verify(name, b"x", signature),
        "hmac": km.hmac(name, b"x"),
        "hmac at a version": km.hmac(name, b"x", key_version=1),
    }
    for op, call in calls.items():
        with pytest.raises(NotFound, match="not found") as err:
            await call
        assert name in err.value.message, op
    # Transit's encrypt upserts: the implementation must not have created the key on the way.
    with pytest.raises(NotFound):
        await km.key_info(name)


async def test_bad_key_name_is_invalid_argument(km: KeyManager) -> None:
    for bad in ["", "Upper", "has space", "-leading", "trailing-", "a/b", "x" * 129]:
        with pytest.raises(InvalidArgument, match="key_name"):
            await km.ensure_key(bad, KeyType.AES256_GCM96)
    assert patient_key_name("records", "3F2A9c") == "records-patient-3f2a9c"
    assert legacy_patient_key_name("3F2A9c") == "patient-3f2a9c"


async def test_data_key_round_trip(km: KeyManager, new_name: Callable[[str], str]) -> None:
    name = new_name("patient")
    await km.ensure_key(name, KeyType.AES256_GCM96)
    data_key = await km.generate_data_key(name)
    plaintext, wrapped = data_key
    assert len(plaintext) == 32
    match = VERSIONED.fullmatch(wrapped)
    assert match and match.group(1) == "1"
    assert len(base64.b64decode(match.group(2))) == 12 + 32 + 16  # Vault's nonce || ct || tag
    assert plaintext not in repr(data_key).encode() and base64.b64encode(plaintext).decode() not in repr(data_key)
    assert await km.decrypt_data_key(name, wrapped) == plaintext
    other = await km.generate_data_key(name)
    assert other.plaintext != plaintext and other.wrapped != wrapped
    with pytest.raises(DataLoss):
        await km.decrypt_data_key(name, _tamper(wrapped))
    # A ciphertext that is not a 32-byte key is not a data key.
    with pytest.raises(DataLoss, match="32-byte"):
        await km.decrypt_data_key(name, await km.encrypt(name, b"short"))


async def test_encrypt_decrypt(km: KeyManager, new_name: Callable[[str], str]) -> None:
    name = new_name("enc")
    await km.ensure_key(name, KeyType.AES256_GCM96)
    for plaintext in [b"", b"x", os.urandom(1000), "Ünïcödé record".encode()]:
        ciphertext = await km.encrypt(name, plaintext)
        match = VERSIONED.fullmatch(ciphertext)
        assert match and match.group(1) == "1", ciphertext
        assert len(base64.b64decode(match.group(2))) == 12 + len(plaintext) + 16
        assert await km.decrypt(name, ciphertext) == plaintext
    # Same plaintext, fresh nonce each time.
    assert await km.encrypt(name, b"same") != await km.encrypt(name, b"same")
    bound = await km.encrypt(name, b"bound", associated_data=b"record-42")
    assert await km.decrypt(name, bound, associated_data=b"record-42") == b"bound"
    for wrong in (None, b"record-43"):
        with pytest.raises(DataLoss):
            await km.decrypt(name, bound, associated_data=wrong)


async def test_tampered_ciphertext_is_data_loss(km: KeyManager, new_name: Callable[[str], str]) -> None:
    name, other = new_name("enc"), new_name("other")
    await km.ensure_key(name, KeyType.AES256_GCM96)
    await km.ensure_key(other, KeyType.AES256_GCM96)
    ciphertext = await km.encrypt(name, b"lab result: normal")
    version, body = VERSIONED.fullmatch(ciphertext).groups()  # type: ignore[union-attr]
    damaged = [
        _tamper(ciphertext),
        f"vault:v{version}:" + base64.b64encode(base64.b64decode(body)[:-1]).decode(),  # truncated tag
        f"vault:v{version}:" + base64.b64encode(b"short").decode(),
        f"vault:v{version}:!!not-base64!!",
        f"vault:v9:{body}",  # a version the key does not have
        await km.encrypt(other, b"lab result: normal"),  # another key's ciphertext
    ]
    for bad in damaged:
        with pytest.raises(DataLoss) as err:
            await km.decrypt(name, bad)
        assert "lab result" not in err.value.message
        with pytest.raises(DataLoss):
            await km.rewrap(name, bad)
    for malformed in ["", "plain text", "vault:1:abc", "vault:vX:abc", "vault:v0:abc"]:
        with pytest.raises(InvalidArgument, match="vault:v<N>"):
            await km.decrypt(name, malformed)


async def test_rotate_keeps_old_ciphertexts_readable(km: KeyManager, new_name: Callable[[str], str]) -> None:
    name = new_name("rot")
    await km.ensure_key(name, KeyType.AES256_GCM96)
    old = await km.encrypt(name, b"v1 data")
    old_key = await km.generate_data_key(name)
    info = await km.rotate(name)
    assert (info.latest_version, info.min_decryption_version, info.versions) == (2, 1, (1, 2))
    assert await km.decrypt(name, old) == b"v1 data"
    assert await km.decrypt_data_key(name, old_key.wrapped) == old_key.plaintext
    new = await km.encrypt(name, b"v2 data")
    assert new.startswith("vault:v2:")
    assert (await km.generate_data_key(name)).wrapped.startswith("vault:v2:")
    assert await km.decrypt(name, new) == b"v2 data"
    assert (await km.key_info(name)).latest_version == 2


HMAC = re.compile(r"^vault:v(\d+):([A-Za-z0-9+/]{43}=)$")  # HMAC-SHA256: 32 bytes, standard base64
INDEX_INPUT = b"urn:oid:2.16.840.1.113883.4.1|123-45-6789"  # a blind index's "system|value"


@pytest.mark.parametrize("key_type", list(KeyType), ids=lambda t: t.value)
async def test_hmac_is_deterministic_per_key_and_version(
    km: KeyManager, new_name: Callable[[str], str], key_type: KeyType
) -> None:
    name, other = new_name("mac"), new_name("mac2")
    await km.ensure_key(name, key_type)
    await km.ensure_key(other, key_type)
    first = await km.hmac(name, INDEX_INPUT)
    match = HMAC.fullmatch(first)
    assert match and match.group(1) == "1", first
    assert len(base64.b64decode(match.group(2))) == 32
    assert await km.hmac(name, INDEX_INPUT) == first
    assert await km.hmac(name, INDEX_INPUT, key_version=1) == first
    assert await km.hmac(name, INDEX_INPUT + b"0") != first
    assert await km.hmac(other, INDEX_INPUT) != first  # another key, another HMAC key
    empty = await km.hmac(name, b"")
    assert HMAC.fullmatch(empty) and await km.hmac(name, b"") == empty
    # HMAC material is not the key's other material: data keys and signatures still work.
    if key_type.is_encryption:
        assert await km.decrypt(name, await km.encrypt(name, INDEX_INPUT)) == INDEX_INPUT
    if key_type.is_signing:
        assert await km.verify(name, INDEX_INPUT, await km.sign(name, INDEX_INPUT))


@pytest.mark.parametrize("key_type", [KeyType.AES256_GCM96, KeyType.HMAC], ids=lambda t: t.value)
async def test_hmac_after_rotation_and_pinned_versions(
    km: KeyManager, new_name: Callable[[str], str], key_type: KeyType
) -> None:
    name = new_name("index")
    await km.ensure_key(name, key_type)
    v1 = await km.hmac(name, INDEX_INPUT)
    info = await km.rotate(name)
    assert (info.latest_version, info.versions) == (2, (1, 2))
    v2 = await km.hmac(name, INDEX_INPUT)
    assert v2.startswith("vault:v2:") and v2.split(":", 2)[2] != v1.split(":", 2)[2]
    assert await km.hmac(name, INDEX_INPUT, key_version=2) == v2
    # A blind index pins its version: rotation does not change it.
    assert await km.hmac(name, INDEX_INPUT, key_version=1) == v1
    for bad in (3, 99):
        with pytest.raises(InvalidArgument, match="key_version"):
            await km.hmac(name, INDEX_INPUT, key_version=bad)
    for bad in (0, -1):
        with pytest.raises(InvalidArgument, match="key_version"):
            await km.hmac(name, INDEX_INPUT, key_version=bad)
    # Versions below min_decryption_version cannot HMAC (Vault archives them); the floor is
    # reversible, and lowering it gives back the very same index.
    await km.set_min_decryption_version(name, 2)
    with pytest.raises(FailedPrecondition):
        await km.hmac(name, INDEX_INPUT, key_version=1)
    assert await km.hmac(name, INDEX_INPUT) == v2
    await km.set_min_decryption_version(name, 1)
    assert await km.hmac(name, INDEX_INPUT, key_version=1) == v1


async def test_hmac_many_is_hmac_of_each_in_order(km: KeyManager, new_name: Callable[[str], str]) -> None:
    names = [new_name(f"many{n}") for n in range(3)]
    for name in names:
        await km.ensure_key(name, KeyType.HMAC)
    await km.rotate(names[1])  # the latest version of each key
    requests = [(names[0], b"a"), (names[1], b"a"), (names[2], b"b"), (names[0], b"b")]
    assert await km.hmac_many(requests) == [await km.hmac(name, data) for name, data in requests]
    assert (await km.hmac_many(requests))[1].startswith("vault:v2:")
    assert await km.hmac_many([]) == []
    with pytest.raises(NotFound):
        await km.hmac_many([(names[0], b"a"), (new_name("missing"), b"a")])


async def test_hmac_key_type_only_hmacs(km: KeyManager, new_name: Callable[[str], str]) -> None:
    name = new_name("blind")
    info = await km.ensure_key(name, "hmac")
    assert (info.type, info.latest_version, info.versions) == (KeyType.HMAC, 1, (1,))
    assert await km.ensure_key(name, KeyType.HMAC) == info
    with pytest.raises(AlreadyExists, match="exists with type hmac"):
        await km.ensure_key(name, KeyType.AES256_GCM96)
    ciphertext = "vault:v1:" + base64.b64encode(bytes(40)).decode()
    for call in (
        km.encrypt(name, b"x"),
        km.decrypt(name, ciphertext),
        km.rewrap(name, ciphertext),
        km.generate_data_key(name),
        km.sign(name, b"x"),
        km.verify(name, b"x", "vault:v1:AAAA"),
        km.public_key(name),
    ):
        with pytest.raises(FailedPrecondition, match="does not support"):
            await call
    assert HMAC.fullmatch(await km.hmac(name, INDEX_INPUT))


async def test_rewrap_moves_to_latest_version(km: KeyManager, new_name: Callable[[str], str]) -> None:
    name = new_name("rewrap")
    await km.ensure_key(name, KeyType.AES256_GCM96)
    old = await km.encrypt(name, b"rewrap me")
    data_key = await km.generate_data_key(name)
    await km.rotate(name)
    await km.rotate(name)
    rewrapped = await km.rewrap(name, old)
    assert rewrapped.startswith("vault:v3:")
    assert await km.decrypt(name, rewrapped) == b"rewrap me"
    wrapped3 = await km.rewrap(name, data_key.wrapped)
    assert wrapped3.startswith("vault:v3:")
    assert await km.decrypt_data_key(name, wrapped3) == data_key.plaintext
    # Already at the latest version: stays there (with a fresh nonce).
    again = await km.rewrap(name, rewrapped)
    assert again.startswith("vault:v3:") and again != rewrapped


async def test_min_decryption_version_refuses_older(km: KeyManager, new_name: Callable[[str], str]) -> None:
    name = new_name("mindec")
    await km.ensure_key(name, KeyType.AES256_GCM96)
    v1 = await km.encrypt(name, b"old")
    v1_key = await km.generate_data_key(name)
    await km.rotate(name)
    v2 = await km.encrypt(name, b"new")
    info = await km.set_min_decryption_version(name, 2)
    assert (info.min_decryption_version, info.latest_version, info.versions) == (2, 2, (2,))
    assert await km.key_info(name) == info
    for call in (km.decrypt(name, v1), km.rewrap(name, v1), km.decrypt_data_key(name, v1_key.wrapped)):
        with pytest.raises(FailedPrecondition, match="minimum decryption version"):
            await call
    assert await km.decrypt(name, v2) == b"new"
    with pytest.raises(FailedPrecondition, match="latest"):
        await km.set_min_decryption_version(name, 3)
    with pytest.raises(InvalidArgument, match="min_decryption_version"):
        await km.set_min_decryption_version(name, 0)
    # A policy floor, not destruction: lowering it makes v1 readable again.
    await km.set_min_decryption_version(name, 1)
    assert await km.decrypt(name, v1) == b"old"


@pytest.mark.parametrize("key_type", SIGNING, ids=lambda t: t.value)
async def test_sign_and_verify(km: KeyManager, new_name: Callable[[str], str], key_type: KeyType) -> None:
    name = new_name("sig")
    await km.ensure_key(name, key_type)
    data = b"checkpoint: origin\n42\nroot-hash\n"
    signature = await km.sign(name, data)
    assert VERSIONED.fullmatch(signature.value) and signature.version == 1
    assert signature.type is key_type and signature.marshaling == "asn1"
    if key_type is KeyType.ED25519:
        assert len(signature.raw) == 64
    assert await km.verify(name, data, signature)
    assert await km.verify(name, data, signature.value)
    assert not await km.verify(name, data + b"x", signature)
    assert not await km.verify(name, data, _tamper(signature.value))
    for malformed in ["", "not a signature", "vault:v1:%%%", "vault:v7:" + signature.value.split(":", 2)[2]]:
        assert not await km.verify(name, data, malformed)
    keys = await km.public_key(name)
    assert keys.type is key_type and keys.current.version == 1 and set(keys.versions) == {1}
    _verify_with_cryptography(keys.current.pem, data, signature)
    with pytest.raises(InvalidSignature):
        _verify_with_cryptography(keys.current.pem, data + b"x", signature)
    assert keys.current.verify(data, signature)
    jwk = keys.current.jwk(kid="k1")
    assert jwk["kid"] == "k1" and jwk["kty"] == ("OKP" if key_type is KeyType.ED25519 else "EC")


@pytest.mark.parametrize("key_type", SIGNING, ids=lambda t: t.value)
async def test_older_signatures_verify_after_rotation(
    km: KeyManager, new_name: Callable[[str], str], key_type: KeyType
) -> None:
    name = new_name("sigrot")
    await km.ensure_key(name, key_type)
    sig1 = await km.sign(name, b"before")
    await km.rotate(name)
    sig2 = await km.sign(name, b"after")
    assert (sig1.version, sig2.version) == (1, 2)
    assert await km.verify(name, b"before", sig1)
    assert await km.verify(name, b"after", sig2)
    keys = await km.public_key(name)
    assert keys.current.version == 2 and sorted(keys.versions) == [1, 2]
    assert keys.versions[1].pem != keys.versions[2].pem
    _verify_with_cryptography(keys.versions[1].pem, b"before", sig1)
    _verify_with_cryptography(keys.versions[2].pem, b"after", sig2)
    with pytest.raises(InvalidSignature):
        _verify_with_cryptography(keys.versions[2].pem, b"before", sig1)
    await km.set_min_decryption_version(name, 2)
    with pytest.raises(FailedPrecondition, match="minimum decryption version"):
        await km.verify(name, b"before", sig1)
    assert sorted((await km.public_key(name)).versions) == [2]
    assert await km.verify(name, b"after", sig2)


async def test_es256_in_jws_and_der_form(km: KeyManager, new_name: Callable[[str], str]) -> None:
    name = new_name("es256")
    await km.ensure_key(name, KeyType.ECDSA_P256)
    header_payload = b"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJwcmFjdGl0aW9uZXItMSJ9"
    der_sig = await km.sign(name, header_payload)
    jws_sig = await km.sign(name, header_payload, marshaling="jws")
    assert jws_sig.marshaling == "jws" and len(jws_sig.raw) == 64
    assert re.fullmatch(r"vault:v1:[A-Za-z0-9_-]{86}", jws_sig.value)  # unpadded URL-safe base64
    assert der_sig.raw[0] == 0x30 and len(der_sig.jws()) == 64  # DER converts to r||s
    assert jws_sig.der()[0] == 0x30
    assert await km.verify(name, header_payload, jws_sig)
    assert await km.verify(name, header_payload, jws_sig.value, marshaling="jws")
    assert not await km.verify(name, header_payload, jws_sig.value, marshaling="asn1")
    assert await km.verify(name, header_payload, der_sig.value)
    public = _load((await km.public_key(name)).current.pem)
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    # What a JOSE library does with a compact JWS: r||s -> verify with the published P-256 key.
    raw = base64.urlsafe_b64decode(base64.urlsafe_b64encode(jws_sig.jws()))
    public.verify(
        encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")),
        header_payload,
        ec.ECDSA(hashes.SHA256()),
    )
    public.verify(der_sig.der(), header_payload, ec.ECDSA(hashes.SHA256()))


async def test_operations_the_key_type_does_not_support(km: KeyManager, new_name: Callable[[str], str]) -> None:
    aes, signer, mac = new_name("aes"), new_name("signer"), new_name("mac")
    await km.ensure_key(aes, KeyType.AES256_GCM96)
    await km.ensure_key(signer, KeyType.ED25519)
    await km.ensure_key(mac, KeyType.HMAC)
    for call in (
        km.sign(aes, b"x"),
        km.verify(aes, b"x", "vault:v1:AAAA"),
        km.public_key(aes),
        km.encrypt(signer, b"x"),
        km.generate_data_key(signer),
        km.encrypt(mac, b"x"),
        km.sign(mac, b"x"),
    ):
        with pytest.raises(FailedPrecondition, match="does not support"):
            await call


async def test_erase_key_shreds_in_one_call_and_a_repeat_is_done(
    km: KeyManager, new_name: Callable[[str], str]
) -> None:
    name = new_name("erase")
    await km.ensure_key(name, KeyType.AES256_GCM96)
    data_key = await km.generate_data_key(name)
    await km.erase_key(name)
    with pytest.raises(NotFound):
        await km.decrypt_data_key(name, data_key.wrapped)
    await km.erase_key(name)  # erased before: nothing to do
    await km.erase_key(new_name("never-made"))


async def test_delete_only_after_deletion_allowed(km: KeyManager, new_name: Callable[[str], str]) -> None:
    name = new_name("shred")
    await km.ensure_key(name, KeyType.AES256_GCM96)
    ciphertext = await km.encrypt(name, b"to be shredded")
    with pytest.raises(FailedPrecondition, match="deletion is not allowed"):
        await km.delete_key(name)
    assert await km.decrypt(name, ciphertext) == b"to be shredded"
    info = await km.allow_deletion(name)
    assert info.deletion_allowed and (await km.key_info(name)).deletion_allowed
    await km.delete_key(name)
    with pytest.raises(NotFound):
        await km.key_info(name)
    with pytest.raises(NotFound):
        await km.decrypt(name, ciphertext)
    with pytest.raises(NotFound):
        await km.encrypt(name, b"after erasure")
    with pytest.raises(NotFound):
        await km.delete_key(name)
    # A new key of the same name is new material: the old ciphertext stays unreadable.
    recreated = await km.ensure_key(name, KeyType.AES256_GCM96)
    assert (recreated.latest_version, recreated.deletion_allowed) == (1, False)
    with pytest.raises(DataLoss):
        await km.decrypt(name, ciphertext)


async def test_check(km: KeyManager) -> None:
    await km.check()


# -- the Vault implementation against OpenBao itself: errors ---------------------------------


def _root(bao: OpenBaoServer | OpenBao) -> hvac.Client:
    return hvac.Client(url=bao.address, token=bao.root_token, timeout=10)


def _clean(err: MedledgerError, *secrets: str) -> str:
    for secret in secrets:
        assert secret not in err.message
        assert secret not in str(err)
    return err.message


def _unique(purpose: str) -> str:
    return f"t-{uuid.uuid4().hex[:10]}-{purpose}"


def _token_with_policy(root: hvac.Client, policy: str, rules: str) -> str:
    """A token carrying only `policy` (written with `rules`), as the stack mints per service."""
    root.sys.create_or_update_policy(policy, rules)
    answer = root.auth.token.create_orphan(policies=[policy], no_default_policy=True, ttl="1h")
    return str(answer["auth"]["client_token"])


class DelayingProxy:
    """A TCP proxy in front of OpenBao that holds every chunk from the client for ``latency``
    seconds, and notes the HTTP requests that pass (method, path)."""

    _REQUEST = re.compile(rb"(GET|POST|PUT|DELETE|LIST) (/v1/[^ ?]*)[^\r\n]* HTTP/1\.[01]\r\n")

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.latency = 0.0
        self.requests: list[tuple[str, str]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"http://{HOST}:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> DelayingProxy:
        self._server = await asyncio.start_server(self._connection, HOST, 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            server_r, server_w = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            client_w.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(self._pipe(client_r, server_w, note=True), self._pipe(server_r, client_w, note=False))
        finally:
            self._tasks.discard(task)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, note: bool) -> None:
        seen = b""
        try:
            while data := await src.read(65536):
                if note:
                    seen += data
                    end = 0
                    for match in self._REQUEST.finditer(seen):
                        self.requests.append((match.group(1).decode(), match.group(2).decode()))
                        end = match.end()
                    seen = seen[end:][-4096:]
                    if self.latency:
                        await asyncio.sleep(self.latency)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()


@pytest.fixture
async def proxy(openbao: OpenBaoServer) -> AsyncIterator[DelayingProxy]:
    port = int(openbao.address.rsplit(":", 1)[1])
    server = await DelayingProxy(port).start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
def fresh_mount(openbao: OpenBaoServer) -> Iterator[str]:
    """A transit mount of the test's own, with transit's defaults (encrypt may upsert)."""
    mount = _unique("kms")
    root = _root(openbao)
    root.sys.enable_secrets_engine("transit", path=mount)
    try:
        yield mount
    finally:
        root.sys.disable_secrets_engine(mount)


async def test_vault_sealed_is_unavailable(own_bao: OpenBao) -> None:
    aes, sig = _unique("sealed"), _unique("sealed-sig")
    async with VaultKeyManager(own_bao.address, token=own_bao.root_token, timeout=10) as km:
        await km.ensure_key(aes, KeyType.AES256_GCM96)
        await km.ensure_key(sig, KeyType.ED25519)
        ciphertext = await km.encrypt(aes, b"x")
        own_bao.seal()
        try:
            for call in (
                km.ensure_key(aes, KeyType.AES256_GCM96),
                km.encrypt(aes, b"x"),
                km.decrypt(aes, ciphertext),
                km.generate_data_key(aes),
                km.sign(sig, b"x"),
                km.hmac(aes, b"x"),
                km.check(),
            ):
                with pytest.raises(Unavailable, match="sealed") as err:
                    await call
                _clean(err.value, own_bao.root_token)
        finally:
            own_bao.unseal()
        await km.check()
        assert await km.decrypt(aes, ciphertext) == b"x"


async def test_vault_stopped_is_unavailable_and_recovers(own_bao: OpenBao) -> None:
    name = _unique("stopped")
    async with VaultKeyManager(own_bao.address, token=own_bao.root_token, timeout=5) as km:
        await km.ensure_key(name, KeyType.AES256_GCM96)
        ciphertext = await km.encrypt(name, b"kept while stopped")
        own_bao.stop()
        try:
            for call in (km.decrypt(name, ciphertext), km.encrypt(name, b"x"), km.check()):
                with pytest.raises(Unavailable, match="cannot reach Vault") as err:
                    await call
                assert own_bao.address.removeprefix("http://") in _clean(err.value, own_bao.root_token)
        finally:
            own_bao.start()
        # The same manager, once the server is back (unsealed by its start): the same key.
        await km.check()
        assert await km.decrypt(name, ciphertext) == b"kept while stopped"


async def test_vault_forbidden_is_permission_denied(openbao: OpenBaoServer) -> None:
    root = _root(openbao)
    signer, policy = _unique("signer"), _unique("policy")
    may_manage = f'path "transit/keys/{signer}" {{ capabilities = ["create", "read", "update"] }}\n'
    may_sign = f'path "transit/sign/{signer}" {{ capabilities = ["update"] }}\n'
    may_verify = f'path "transit/verify/{signer}" {{ capabilities = ["update"] }}\n'
    may_hmac = f'path "transit/hmac/{signer}" {{ capabilities = ["update"] }}\n'
    token = _token_with_policy(root, policy, may_manage + may_verify)
    try:
        async with VaultKeyManager(openbao.address, token=token, timeout=10) as km:
            await km.ensure_key(signer, KeyType.ECDSA_P256)
            with pytest.raises(PermissionDenied, match="permission denied") as err:
                await km.sign(signer, b"x")
            message = _clean(err.value, token, openbao.root_token)
            assert "sign" in message and signer in message
            assert (await km.key_info(signer)).latest_version == 1  # other paths still allowed
            with pytest.raises(PermissionDenied, match="permission denied") as err:
                await km.hmac(signer, b"x", key_version=1)
            assert "hmac" in _clean(err.value, token)
            # The policy grows; the same token may now sign and HMAC.
            root.sys.create_or_update_policy(policy, may_manage + may_verify + may_sign + may_hmac)
            assert await km.verify(signer, b"x", await km.sign(signer, b"x"))
            assert (await km.hmac(signer, b"x")).startswith("vault:v1:")
        async with VaultKeyManager(openbao.address, token="hvs.not-the-token", timeout=10) as km:
            with pytest.raises(PermissionDenied, match="permission denied") as err:
                await km.key_info(signer)
            _clean(err.value, "hvs.not-the-token", token)
    finally:
        root.auth.token.revoke(token)
        root.sys.delete_policy(policy)


async def test_vault_revoked_token_is_permission_denied(openbao: OpenBaoServer) -> None:
    root = _root(openbao)
    name, policy = _unique("revoked"), _unique("policy")
    token = _token_with_policy(
        root, policy, f'path "transit/keys/{name}" {{ capabilities = ["create", "read", "update"] }}\n'
    )
    try:
        async with VaultKeyManager(openbao.address, token=token, timeout=10) as km:
            await km.ensure_key(name, KeyType.AES256_GCM96)
            root.auth.token.revoke(token)
            with pytest.raises(PermissionDenied, match="permission denied") as err:
                await km.key_info(name)
            _clean(err.value, token)
    finally:
        root.sys.delete_policy(policy)


async def test_vault_unreachable_is_unavailable() -> None:
    port = closed_port()

    def errors(op: str) -> float:
        labels = {"backend": "vault", "operation": op, "code": "UNAVAILABLE"}
        return REGISTRY.get_sample_value("medledger_key_manager_errors_total", labels) or 0.0

    before = errors("decrypt")
    async with VaultKeyManager(f"http://127.0.0.1:{port}", token="hvs.secret-token", timeout=2) as km:
        for call in (km.ensure_key("k", KeyType.AES256_GCM96), km.decrypt("k", "vault:v1:AAAA"), km.check()):
            with pytest.raises(Unavailable, match="cannot reach Vault") as err:
                await call
            assert f"127.0.0.1:{port}" in _clean(err.value, "hvs.secret-token")
    # What the key-manager alert watches: each failed call counted by the status it maps to.
    assert errors("decrypt") == before + 1


async def test_vault_too_slow_is_unavailable(openbao: OpenBaoServer, proxy: DelayingProxy) -> None:
    name = _unique("slow")
    async with VaultKeyManager(proxy.address, token=openbao.root_token, timeout=10) as patient:
        await patient.ensure_key(name, KeyType.AES256_GCM96)  # through the proxy, no delay yet
        async with VaultKeyManager(proxy.address, token=openbao.root_token, timeout=0.3) as km:
            proxy.latency = 1.0
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(Unavailable, match=r"did not answer .* within 0.3s"):
                await km.key_info(name)
            assert loop.time() - started < 0.9
        proxy.latency = 0.0
        assert (await patient.key_info(name)).latest_version == 1
    assert ("GET", f"/v1/transit/keys/{name}") in proxy.requests


async def test_vault_missing_mount_is_unavailable(openbao: OpenBaoServer) -> None:
    async with VaultKeyManager(openbao.address, token=openbao.root_token, mount_point="no-such-transit") as km:
        with pytest.raises(Unavailable, match="no transit engine mounted at 'no-such-transit'"):
            await km.key_info("k")


async def test_vault_token_file_is_reread_when_it_changes(openbao: OpenBaoServer, tmp_path: Path) -> None:
    root = _root(openbao)
    name, policy = _unique("tok"), _unique("policy")
    rules = f'path "transit/keys/{name}" {{ capabilities = ["create", "read", "update"] }}\n'
    old, renewed = _token_with_policy(root, policy, rules), _token_with_policy(root, policy, rules)
    token_file = tmp_path / "agent" / "token"
    token_file.parent.mkdir()

    def agent_writes(token: str) -> None:  # as Vault Agent does: a new file renamed into place
        tmp = token_file.with_suffix(".new")
        tmp.write_text(token + "\n")
        os.replace(tmp, token_file)

    agent_writes(old)
    try:
        async with VaultKeyManager(openbao.address, token_file=token_file) as km:
            await km.ensure_key(name, KeyType.AES256_GCM96)
            root.auth.token.revoke(old)  # the old token expires; the agent has not written yet
            with pytest.raises(PermissionDenied) as err:
                await km.key_info(name)
            _clean(err.value, old, renewed)
            agent_writes(renewed)
            assert (await km.key_info(name)).latest_version == 1
            token_file.unlink()
            km._tokens._seen = None  # force the re-read of a vanished file
            with pytest.raises(Unavailable, match="cannot read Vault token file"):
                await km.key_info(name)
    finally:
        root.auth.token.revoke(renewed)
        root.sys.delete_policy(policy)


async def test_vault_never_exports_and_never_upserts(
    openbao: OpenBaoServer, proxy: DelayingProxy, fresh_mount: str
) -> None:
    # A mount with transit's defaults, where encrypt would create a missing key.
    async with VaultKeyManager(proxy.address, token=openbao.root_token, mount_point=fresh_mount) as km:
        for key_type in KeyType:
            await km.ensure_key(f"k-{key_type.value}", key_type)
        await km.sign("k-ed25519", b"x")
        await km.public_key("k-ecdsa-p256")
        await km.generate_data_key("k-aes256-gcm96")
        with pytest.raises(NotFound):
            await km.encrypt("never-created", b"x")
    names = _root(openbao).secrets.transit.list_keys(mount_point=fresh_mount)["data"]["keys"]
    assert sorted(names) == sorted(f"k-{key_type.value}" for key_type in KeyType)
    assert proxy.requests and all(path.startswith(f"/v1/{fresh_mount}/") for _, path in proxy.requests)
    assert not [path for _, path in proxy.requests if "/export/" in path or "/backup/" in path]


async def test_vault_hmac_and_hmac_keys_use_the_mount_point(
    openbao: OpenBaoServer, proxy: DelayingProxy, fresh_mount: str
) -> None:
    async with VaultKeyManager(proxy.address, token=openbao.root_token, mount_point=fresh_mount) as km:
        await km.ensure_key("mac", KeyType.HMAC)
        assert HMAC.fullmatch(await km.hmac("mac", INDEX_INPUT, key_version=1))
    assert ("POST", f"/v1/{fresh_mount}/keys/mac") in proxy.requests
    assert ("POST", f"/v1/{fresh_mount}/hmac/mac") in proxy.requests
    assert _root(openbao).secrets.transit.read_key("mac", mount_point=fresh_mount)["data"]["type"] == "hmac"


def test_vault_manager_refuses_bad_configuration() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        VaultKeyManager("http://127.0.0.1:8200")
    with pytest.raises(ValueError, match="exactly one"):
        VaultKeyManager("http://127.0.0.1:8200", token="a", token_file="/x")
    with pytest.raises(ValueError, match="URL"):
        VaultKeyManager("127.0.0.1:8200", token="a")


# -- the local keyring's file ---------------------------------------------------------------


async def test_keyring_file_holds_no_key_material(tmp_path: Path) -> None:
    master, path = _master_and_keyring(tmp_path)
    async with await LocalKeyring.open(path, master) as km:
        names = [patient_key_name("records", "a1b2c3d4"), "identity-jwt", "audit-checkpoint", "identity-blind-index"]
        for name, key_type in zip(names, KeyType, strict=True):
            await km.ensure_key(name, key_type)
            await km.rotate(name)
        data_key = await km.generate_data_key(names[0])
        macs = [await km.hmac(name, b"x", key_version=v) for name in names for v in (1, 2)]
    content = path.read_bytes()
    keys = local_module._unseal(master.read_bytes(), path, content)
    secrets = [v.secret for key in keys.values() for v in key.versions.values()]
    hmac_keys = [LocalKeyring._hmac_key(key, n) for key in keys.values() for n in key.versions]
    assert len(secrets) == 8 and len(set(hmac_keys)) == 8 and len(set(macs)) == 8
    # Only an hmac key's HMAC key is its secret; every other key's HMAC key is material of its own.
    assert {k for k in hmac_keys if k in secrets} == {v.secret for v in keys["identity-blind-index"].versions.values()}
    for secret in [*secrets, *hmac_keys, data_key.plaintext, master.read_bytes()]:
        for form in (secret, base64.b64encode(secret), secret.hex().encode()):
            assert form not in content
    for name in names:
        assert name.encode() not in content
    assert b'"format": "medledger-keyring"' in content
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_keyring_survives_reopen(tmp_path: Path) -> None:
    master, path = _master_and_keyring(tmp_path)
    async with await LocalKeyring.open(path, master) as km:
        await km.ensure_key("patient-1", KeyType.AES256_GCM96)
        await km.ensure_key("signer", KeyType.ECDSA_P256)
        await km.rotate("signer")
        await km.allow_deletion("signer")
        await km.ensure_key("blind-index", KeyType.HMAC)
        ciphertext = await km.encrypt("patient-1", b"persisted")
        signature = await km.sign("signer", b"persisted")
        macs = [await km.hmac(name, INDEX_INPUT) for name in ("patient-1", "signer", "blind-index")]
        before = (await km.key_info("patient-1"), await km.key_info("signer"), await km.public_key("signer"))
    async with await LocalKeyring.open(path, master) as km:
        assert await km.decrypt("patient-1", ciphertext) == b"persisted"
        assert await km.verify("signer", b"persisted", signature)
        # Blind indexes stay valid across restarts.
        assert [await km.hmac(name, INDEX_INPUT) for name in ("patient-1", "signer", "blind-index")] == macs
        after = (await km.key_info("patient-1"), await km.key_info("signer"), await km.public_key("signer"))
        assert after == before
        assert after[1].deletion_allowed


async def test_master_key_inside_the_data_folder_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for inside in (data / "master.key", data / "sub" / "master.key"):
        create_master_key_file(inside)
        with pytest.raises(ConfigError, match="inside the keyring's folder"):
            await LocalKeyring.open(data / "keys.keyring", inside)
    assert not (data / "keys.keyring").exists()


async def test_master_key_of_wrong_length_is_refused(tmp_path: Path) -> None:
    master = tmp_path / "secrets" / "master.key"
    master.parent.mkdir()
    for content in (b"", b"too short", os.urandom(32) + b"\n", os.urandom(64)):
        master.write_bytes(content)
        with pytest.raises(ConfigError, match=f"must hold exactly 32 bytes, it holds {len(content)}"):
            await LocalKeyring.open(tmp_path / "data" / "keys.keyring", master)
    with pytest.raises(ConfigError, match="cannot read master key file"):
        await LocalKeyring.open(tmp_path / "data" / "keys.keyring", tmp_path / "secrets" / "absent.key")


async def test_wrong_master_key_or_altered_file_is_a_clear_error(tmp_path: Path) -> None:
    master, path = _master_and_keyring(tmp_path)
    async with await LocalKeyring.open(path, master) as km:
        await km.ensure_key("k", KeyType.AES256_GCM96)
    other = create_master_key_file(tmp_path / "secrets" / "other.key")
    with pytest.raises(ConfigError, match="master key does not match it, or the file was altered") as err:
        await LocalKeyring.open(path, other)
    assert other.read_bytes().hex() not in str(err.value)
    content = bytearray(path.read_bytes())
    at = content.index(b'"ciphertext": "') + len(b'"ciphertext": "') + 10
    content[at] = ord("A") if content[at] != ord("A") else ord("B")
    path.write_bytes(bytes(content))
    with pytest.raises(ConfigError, match="master key does not match it, or the file was altered"):
        await LocalKeyring.open(path, master)
    path.write_text("not a keyring")
    with pytest.raises(ConfigError, match="is not a medledger keyring"):
        await LocalKeyring.open(path, master)


async def test_create_master_key_file(tmp_path: Path) -> None:
    master = create_master_key_file(tmp_path / "s" / "master.key")
    assert len(master.read_bytes()) == 32
    assert stat.S_IMODE(master.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="already exists"):
        create_master_key_file(master)


async def test_keyring_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    master, path = _master_and_keyring(tmp_path)
    async with await LocalKeyring.open(path, master) as km:
        await asyncio.gather(*(km.ensure_key(f"k-{i}", KeyType.AES256_GCM96) for i in range(20)))
        await asyncio.gather(*(km.rotate(f"k-{i}") for i in range(20)))
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left
        before = path.read_bytes()

        def failing_replace(src: str, dst: str) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "replace", failing_replace)
        with pytest.raises(Unavailable, match=r"cannot write keyring file .*No space left on device"):
            await km.ensure_key("not-written", KeyType.AES256_GCM96)
        with pytest.raises(Unavailable):
            await km.rotate("k-0")
        monkeypatch.undo()
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
        assert path.read_bytes() == before
        # Memory agrees with the file: nothing of the failed writes happened.
        with pytest.raises(NotFound):
            await km.key_info("not-written")
        assert (await km.key_info("k-0")).latest_version == 2
    async with await LocalKeyring.open(path, master) as km:
        assert len([i for i in range(20) if (await km.key_info(f"k-{i}")).latest_version == 2]) == 20
