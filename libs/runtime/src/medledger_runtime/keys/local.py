"""The local keyring: the embedded default key manager, one encrypted file per service.

Same semantics as Vault's transit engine (see :mod:`medledger_runtime.keys.base`), same
``vault:v<N>:<base64>`` strings: AES-256-GCM with a 96-bit random nonce, ``base64(nonce||ct||tag)``.

The file is a small JSON envelope whose ``ciphertext`` is the whole keyring, encrypted with
AES-256-GCM under a 32-byte master key read from a file that must live outside the keyring's
folder (see KEYS.md for the format). Writes are atomic: a temporary file in the same folder,
fsync, rename over the keyring, fsync of the folder. The keyring is kept in memory; writes are
serialized by an asyncio lock and done in a thread, crypto runs on the event loop (it is fast).

One process per keyring file: two processes writing the same file would lose each other's keys.

One module, though long: it is every operation of the ``KeyManager`` interface against one
backend, read side by side with its twin ``vault.py`` and checked by the same contract tests.
Key material is never logged and never appears in an error message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from hmac import digest as hmac_digest
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medledger_runtime.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from medledger_runtime.files import fsync_folder, write_atomically
from medledger_runtime.keys.base import (
    DATA_KEY_BYTES,
    HMAC_KEY_BYTES,
    DataKey,
    KeyInfo,
    KeyManager,
    KeyType,
    Marshaling,
    PublicKey,
    PublicKeySet,
    Signature,
    check_key_version,
    check_marshaling,
    coerce_key_type,
    coerce_marshaling,
)
from medledger_runtime.keys.names import (
    validate_key_name,
)
from medledger_runtime.keys.wire import (
    b64decode_strict,
    decode_ciphertext,
    der_to_raw_rs,
    format_versioned,
    parse_versioned,
    raw_rs_to_der,
)
from medledger_runtime.settings import ConfigError

__all__ = ["MASTER_KEY_BYTES", "LocalKeyring", "create_master_key_file", "load_master_key"]

log = logging.getLogger(__name__)

MASTER_KEY_BYTES = 32
FILE_FORMAT = "medledger-keyring"
FILE_VERSION = 1
FILE_CIPHER = "aes-256-gcm"
_FILE_AAD = f"{FILE_FORMAT}/v{FILE_VERSION}".encode("ascii")
_NONCE_BYTES = 12


# -- master key ------------------------------------------------------------------------------


def create_master_key_file(path: Path | str) -> Path:
    """Write a new random 32-byte master key to ``path`` (mode 0600); refuse to overwrite one.

    Keep it outside every keyring folder (and out of backups of them): whoever holds both the
    keyring and its master key holds every key.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"master key file {path} already exists: refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as out:
        out.write(os.urandom(MASTER_KEY_BYTES))
        out.flush()
        os.fsync(out.fileno())
    os.chmod(path, 0o600)
    fsync_folder(path.parent)
    return path


def load_master_key(master_key_file: Path | str, keyring_path: Path | str) -> bytes:
    """Read and check the master key; ConfigError naming the problem (never the key)."""
    master = Path(master_key_file).resolve()
    folder = Path(keyring_path).resolve().parent
    if master.is_relative_to(folder):
        raise ConfigError(
            f"master key file {master_key_file} is inside the keyring's folder {folder}: "
            "keep it outside the data folder (and its backups)"
        )
    try:
        info = master.stat()
        data = master.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read master key file {master_key_file}: {exc.strerror}") from None
    if len(data) != MASTER_KEY_BYTES:
        raise ConfigError(
            f"master key file {master_key_file} must hold exactly {MASTER_KEY_BYTES} bytes, it holds {len(data)}"
        )
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("master key file is readable by group or others", extra={"path": str(master_key_file)})
    return data


# -- in-memory model -------------------------------------------------------------------------


_HMAC_INFO = b"medledger keyring: hmac key"
"""HKDF ``info`` of the HMAC material derived from a (non-``hmac``) key version's secret."""


@dataclass(frozen=True)
class _Version:
    created: datetime
    secret: bytes = b""

    def __repr__(self) -> str:
        return f"_Version(created={self.created.isoformat()}, secret=<hidden>)"


@dataclass(frozen=True)
class _Key:
    type: KeyType
    latest_version: int
    min_decryption_version: int
    deletion_allowed: bool
    versions: Mapping[int, _Version]


def _new_secret(key_type: KeyType) -> bytes:
    if key_type is KeyType.AES256_GCM96:
        return os.urandom(32)
    if key_type is KeyType.HMAC:
        return os.urandom(HMAC_KEY_BYTES)
    if key_type is KeyType.ED25519:
        return ed25519.Ed25519PrivateKey.generate().private_bytes_raw()
    scalar = ec.generate_private_key(ec.SECP256R1()).private_numbers().private_value
    return scalar.to_bytes(32, "big")


def _now() -> datetime:
    return datetime.now(UTC)


def _info(name: str, key: _Key) -> KeyInfo:
    return KeyInfo(
        name=name,
        type=key.type,
        latest_version=key.latest_version,
        min_decryption_version=key.min_decryption_version,
        deletion_allowed=key.deletion_allowed,
        versions=tuple(v for v in sorted(key.versions) if v >= key.min_decryption_version),
    )


def _to_document(keys: Mapping[str, _Key]) -> dict[str, Any]:
    return {
        "keys": {
            name: {
                "type": key.type.value,
                "latest_version": key.latest_version,
                "min_decryption_version": key.min_decryption_version,
                "deletion_allowed": key.deletion_allowed,
                "versions": {
                    str(n): {"created": v.created.isoformat(), "secret": base64.b64encode(v.secret).decode("ascii")}
                    for n, v in sorted(key.versions.items())
                },
            }
            for name, key in sorted(keys.items())
        }
    }


def _from_document(doc: Any) -> dict[str, _Key]:
    keys: dict[str, _Key] = {}
    for name, raw in doc["keys"].items():
        versions = {
            int(n): _Version(created=datetime.fromisoformat(v["created"]), secret=base64.b64decode(v["secret"]))
            for n, v in raw["versions"].items()
        }
        keys[str(name)] = _Key(
            type=KeyType(raw["type"]),
            latest_version=int(raw["latest_version"]),
            min_decryption_version=int(raw["min_decryption_version"]),
            deletion_allowed=bool(raw["deletion_allowed"]),
            versions=versions,
        )
    return keys


def _seal(master: bytes, keys: Mapping[str, _Key]) -> bytes:
    plaintext = json.dumps(_to_document(keys), separators=(",", ":")).encode("utf-8")
    nonce = os.urandom(_NONCE_BYTES)
    sealed = AESGCM(master).encrypt(nonce, plaintext, _FILE_AAD)
    envelope = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "cipher": FILE_CIPHER,
        "nonce": base64.b64encode(nonce).decode("ascii"),
        "ciphertext": base64.b64encode(sealed).decode("ascii"),
    }
    return (json.dumps(envelope, indent=1) + "\n").encode("ascii")


def _unseal(master: bytes, path: Path, data: bytes) -> dict[str, _Key]:
    try:
        envelope = json.loads(data)
        ok = (
            isinstance(envelope, dict)
            and envelope.get("format") == FILE_FORMAT
            and envelope.get("cipher") == FILE_CIPHER
        )
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"keyring file {path} is not a medledger keyring")
    if envelope.get("version") != FILE_VERSION:
        raise ConfigError(
            f"keyring file {path} has format version {envelope.get('version')!r}, expected {FILE_VERSION}"
        )
    try:
        nonce = base64.b64decode(envelope["nonce"], validate=True)
        sealed = base64.b64decode(envelope["ciphertext"], validate=True)
        plaintext = AESGCM(master).decrypt(nonce, sealed, _FILE_AAD)
    except (InvalidTag, ValueError, KeyError, TypeError):
        raise ConfigError(
            f"cannot open keyring file {path}: the master key does not match it, or the file was altered"
        ) from None
    try:
        return _from_document(json.loads(plaintext))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"keyring file {path} opened but its content is malformed") from None


def _read_if_exists(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


# -- the keyring -----------------------------------------------------------------------------


class LocalKeyring(KeyManager):
    """Key manager over one encrypted keyring file. Create with :meth:`open`."""

    def __init__(self, path: Path, master_key: bytes, keys: dict[str, _Key]) -> None:
        if len(master_key) != MASTER_KEY_BYTES:
            raise ConfigError(f"the master key must be {MASTER_KEY_BYTES} bytes")
        self.path = path
        self._master = master_key
        self._keys = keys
        self._lock = asyncio.Lock()
        self._objects: dict[tuple[str, int], Any] = {}

    def __repr__(self) -> str:
        return f"LocalKeyring(path={str(self.path)!r}, keys={len(self._keys)})"

    @classmethod
    async def open(cls, path: Path | str, master_key_file: Path | str) -> LocalKeyring:
        """Open (or start) the keyring at ``path``; ConfigError if the master key is unusable.

        Refuses a master key file inside the keyring's folder, one of the wrong length, and a
        keyring file the master key does not open.
        """
        path = Path(path)
        master = await asyncio.to_thread(load_master_key, master_key_file, path)

        def prepare() -> bytes | None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            return _read_if_exists(path)

        data = await asyncio.to_thread(prepare)
        keys = _unseal(master, path, data) if data is not None else {}
        return cls(path, master, keys)

    # -- helpers ---------------------------------------------------------------------------

    def _get(self, name: str) -> _Key:
        validate_key_name(name)
        key = self._keys.get(name)
        if key is None:
            raise NotFound(f"key {name!r} not found")
        return key

    async def _persist(self, keys: dict[str, _Key]) -> None:
        """Write ``keys`` to the file, then make them the in-memory state. Caller holds the lock."""
        data = _seal(self._master, keys)
        task = asyncio.ensure_future(asyncio.to_thread(write_atomically, self.path, data))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # The write goes on in its thread: wait for it so memory and file agree.
            with contextlib.suppress(Exception):
                await task
            if task.done() and not task.cancelled() and task.exception() is None:
                self._keys = keys
            raise
        except OSError as exc:
            raise Unavailable(f"cannot write keyring file {self.path}: {exc.strerror}") from None
        self._keys = keys

    async def _update(self, name: str, change: Callable[[_Key], _Key]) -> KeyInfo:
        async with self._lock:
            key = self._get(name)
            new = change(key)
            if new != key:
                keys = dict(self._keys)
                keys[name] = new
                await self._persist(keys)
            return _info(name, new)

    def _aead(self, name: str, version: int, key: _Key) -> AESGCM:
        cached = self._objects.get((name, version))
        if cached is None:
            cached = AESGCM(key.versions[version].secret)
            self._objects[(name, version)] = cached
        assert isinstance(cached, AESGCM)
        return cached

    def _private(self, name: str, version: int, key: _Key) -> ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey:
        cached = self._objects.get((name, version))
        if cached is None:
            secret = key.versions[version].secret
            if key.type is KeyType.ED25519:
                cached = ed25519.Ed25519PrivateKey.from_private_bytes(secret)
            else:
                cached = ec.derive_private_key(int.from_bytes(secret, "big"), ec.SECP256R1())
            self._objects[(name, version)] = cached
        assert isinstance(cached, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey)
        return cached

    @staticmethod
    def _hmac_key(key: _Key, version: int) -> bytes:
        """A version's HMAC material, never the bytes it encrypts or signs with.

        An ``hmac`` key's secret is its HMAC key (as in Vault). Any other key's HMAC key is derived
        from the version's secret with HKDF-SHA256 (no salt, ``info`` :data:`_HMAC_INFO`), so it
        lives in the keyring file under the same master key and atomic writes as the secret.
        """
        secret = key.versions[version].secret
        if key.type is KeyType.HMAC:
            return secret
        return HKDF(algorithm=hashes.SHA256(), length=HMAC_KEY_BYTES, salt=None, info=_HMAC_INFO).derive(secret)

    def _forget(self, name: str) -> None:
        for cached in [k for k in self._objects if k[0] == name]:
            del self._objects[cached]

    @staticmethod
    def _require_encryption(name: str, key: _Key) -> None:
        if not key.type.is_encryption:
            raise FailedPrecondition(f"key {name!r} is of type {key.type.value}, which does not support encryption")

    @staticmethod
    def _require_signing(name: str, key: _Key) -> None:
        if not key.type.is_signing:
            raise FailedPrecondition(f"key {name!r} is of type {key.type.value}, which does not support signing")

    def _usable_version(self, name: str, key: _Key, version: int, what: str) -> None:
        if version > key.latest_version or version not in key.versions:
            raise DataLoss(f"{what} under key {name!r} claims version {version}, which the key does not have")
        if version < key.min_decryption_version:
            raise FailedPrecondition(
                f"{what} under key {name!r} is of version {version}, below the key's minimum decryption "
                f"version {key.min_decryption_version}"
            )

    # -- lifecycle -------------------------------------------------------------------------

    async def ensure_key(self, name: str, key_type: KeyType | str) -> KeyInfo:
        validate_key_name(name)
        wanted = coerce_key_type(key_type)
        async with self._lock:
            key = self._keys.get(name)
            if key is None:
                key = _Key(
                    type=wanted,
                    latest_version=1,
                    min_decryption_version=1,
                    deletion_allowed=False,
                    versions={1: _Version(created=_now(), secret=_new_secret(wanted))},
                )
                keys = dict(self._keys)
                keys[name] = key
                self._forget(name)
                await self._persist(keys)
            elif key.type is not wanted:
                raise AlreadyExists(f"key {name!r} exists with type {key.type.value}, not {wanted.value}")
            return _info(name, key)

    async def key_info(self, name: str) -> KeyInfo:
        return _info(name, self._get(name))

    async def public_key(self, name: str) -> PublicKeySet:
        key = self._get(name)
        self._require_signing(name, key)
        versions: dict[int, PublicKey] = {}
        for n in sorted(key.versions):
            if n < key.min_decryption_version:
                continue
            pem = (
                self._private(name, n, key)
                .public_key()
                .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
                .decode("ascii")
            )
            versions[n] = PublicKey(version=n, type=key.type, pem=pem, created_at=key.versions[n].created)
        return PublicKeySet(name=name, type=key.type, current=versions[key.latest_version], versions=versions)

    async def rotate(self, name: str) -> KeyInfo:
        def change(key: _Key) -> _Key:
            latest = key.latest_version + 1
            versions = dict(key.versions)
            versions[latest] = _Version(created=_now(), secret=_new_secret(key.type))
            return replace(key, latest_version=latest, versions=versions)

        return await self._update(name, change)

    async def set_min_decryption_version(self, name: str, version: int) -> KeyInfo:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidArgument.field("min_decryption_version", "must be an integer of at least 1")

        def change(key: _Key) -> _Key:
            if version > key.latest_version:
                raise FailedPrecondition(
                    f"cannot set the minimum decryption version of key {name!r} to {version}: "
                    f"its latest version is {key.latest_version}"
                )
            return replace(key, min_decryption_version=version)

        return await self._update(name, change)

    async def allow_deletion(self, name: str) -> KeyInfo:
        return await self._update(name, lambda key: replace(key, deletion_allowed=True))

    async def delete_key(self, name: str) -> None:
        async with self._lock:
            key = self._get(name)
            if not key.deletion_allowed:
                raise FailedPrecondition(f"deletion is not allowed for key {name!r}: call allow_deletion first")
            keys = dict(self._keys)
            del keys[name]
            await self._persist(keys)
            self._forget(name)

    # -- encryption ------------------------------------------------------------------------

    def _encrypt(self, name: str, key: _Key, plaintext: bytes, associated_data: bytes | None) -> str:
        version = key.latest_version
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead(name, version, key).encrypt(nonce, plaintext, associated_data or None)
        return format_versioned(version, nonce + sealed)

    def _decrypt(self, name: str, key: _Key, ciphertext: str, associated_data: bytes | None) -> bytes:
        self._require_encryption(name, key)
        version, _ = parse_versioned(ciphertext)
        self._usable_version(name, key, version, "ciphertext")
        _, raw = decode_ciphertext(ciphertext)
        try:
            return self._aead(name, version, key).decrypt(
                raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], associated_data or None
            )
        except InvalidTag:
            raise DataLoss(f"ciphertext under key {name!r} failed its integrity check") from None

    async def encrypt(self, name: str, plaintext: bytes, *, associated_data: bytes | None = None) -> str:
        key = self._get(name)
        self._require_encryption(name, key)
        return self._encrypt(name, key, bytes(plaintext), associated_data)

    async def decrypt(self, name: str, ciphertext: str, *, associated_data: bytes | None = None) -> bytes:
        parse_versioned(ciphertext)
        return self._decrypt(name, self._get(name), ciphertext, associated_data)

    async def rewrap(self, name: str, ciphertext: str) -> str:
        parse_versioned(ciphertext)
        key = self._get(name)
        plaintext = self._decrypt(name, key, ciphertext, None)
        return self._encrypt(name, key, plaintext, None)

    async def generate_data_key(self, name: str) -> DataKey:
        key = self._get(name)
        self._require_encryption(name, key)
        plaintext = os.urandom(DATA_KEY_BYTES)
        return DataKey(plaintext=plaintext, wrapped=self._encrypt(name, key, plaintext, None))

    # -- keyed hashes ----------------------------------------------------------------------

    async def hmac(self, name: str, data: bytes, *, key_version: int | None = None) -> str:
        return self._hmac(name, data, key_version)

    async def hmac_many(self, requests: Sequence[tuple[str, bytes]]) -> list[str]:
        # In process: one loop, not a task per HMAC (the base class's gather).
        return [self._hmac(name, data, None) for name, data in requests]

    def _hmac(self, name: str, data: bytes, key_version: int | None) -> str:
        validate_key_name(name)
        check_key_version(key_version)
        key = self._get(name)
        version = key.latest_version if key_version is None else key_version
        if version > key.latest_version or version not in key.versions:
            raise InvalidArgument.field(
                "key_version", f"key {name!r} has no version {version}; its latest version is {key.latest_version}"
            )
        if version < key.min_decryption_version:
            raise FailedPrecondition(
                f"cannot compute an HMAC with version {version} of key {name!r}: it is below the key's "
                f"minimum decryption version {key.min_decryption_version}"
            )
        return format_versioned(version, hmac_digest(self._hmac_key(key, version), bytes(data), "sha256"))

    # -- signing ---------------------------------------------------------------------------

    async def sign(self, name: str, data: bytes, *, marshaling: Marshaling = "asn1") -> Signature:
        marshaling = check_marshaling(marshaling)
        key = self._get(name)
        self._require_signing(name, key)
        version = key.latest_version
        private = self._private(name, version, key)
        if isinstance(private, ed25519.Ed25519PrivateKey):
            raw = private.sign(bytes(data))
        else:
            raw = private.sign(bytes(data), ec.ECDSA(hashes.SHA256()))
            if marshaling == "jws":
                raw = der_to_raw_rs(raw)
        value = format_versioned(version, raw, urlsafe=marshaling == "jws")
        return Signature(value=value, version=version, type=key.type, marshaling=marshaling)

    async def verify(
        self, name: str, data: bytes, signature: Signature | str, *, marshaling: Marshaling | None = None
    ) -> bool:
        value, marshal = coerce_marshaling(signature, marshaling)
        key = self._get(name)
        self._require_signing(name, key)
        try:
            version, body = parse_versioned(value, what="signature")
        except InvalidArgument:
            return False
        if version > key.latest_version or version not in key.versions:
            return False
        if version < key.min_decryption_version:
            raise FailedPrecondition(
                f"signature under key {name!r} is of version {version}, below the key's minimum decryption "
                f"version {key.min_decryption_version}"
            )
        try:
            raw = b64decode_strict(body, urlsafe=marshal == "jws")
            public = self._private(name, version, key).public_key()
            if isinstance(public, ed25519.Ed25519PublicKey):
                public.verify(raw, bytes(data))
            else:
                der = raw_rs_to_der(raw) if marshal == "jws" else raw
                public.verify(der, bytes(data), ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True

    # -- operations ------------------------------------------------------------------------

    async def check(self) -> None:
        folder = self.path.parent
        if not await asyncio.to_thread(os.access, folder, os.W_OK):
            raise Unavailable(f"keyring folder {folder} is not writable")

    async def aclose(self) -> None:
        self._objects.clear()
