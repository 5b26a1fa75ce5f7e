"""The key-manager interface every medledger service uses, and the types it speaks.

Two implementations share these semantics (see ``KEYS.md`` next to ``pyproject.toml``):
:class:`~medledger_runtime.keys.local.LocalKeyring` (an encrypted file, the embedded default) and
:class:`~medledger_runtime.keys.vault.VaultKeyManager` (HashiCorp Vault's transit engine).

Private and symmetric key material never leaves a key manager: callers get ciphertexts, wrapped
data keys, signatures, HMACs and public keys. Ciphertexts, wrapped keys, signatures and HMACs are
strings in Vault's form ``vault:v<N>:<base64>``, whichever implementation made them.

Errors (all from :mod:`medledger_runtime.errors`, messages never hold key material or tokens):

- unknown key: ``NotFound``; malformed key name or argument: ``InvalidArgument``;
- ``ensure_key`` on an existing key of another type: ``AlreadyExists``;
- decrypting tampered data (or data of another key): ``DataLoss``;
- a ciphertext or signature older than the key's ``min_decryption_version`` (or an HMAC asked of
  such a version), deleting a key whose deletion was not allowed, an operation the key's type does
  not support: ``FailedPrecondition``;
- the key manager cannot be used (Vault sealed, unreachable, too slow; keyring file unwritable):
  ``Unavailable``; Vault refused the token or its policy: ``PermissionDenied``.
"""

from __future__ import annotations

import abc
import asyncio
import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, NamedTuple, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from medledger_runtime.errors import DataLoss, InvalidArgument, NotFound
from medledger_runtime.keys.wire import (
    P256_COORDINATE_BYTES,
    b64decode_strict,
    der_to_raw_rs,
    parse_versioned,
    raw_rs_to_der,
)

DATA_KEY_BYTES = 32
"""Length of a generated data key: AES-256."""

HMAC_KEY_BYTES = 32
"""Length of a key of type ``hmac`` (Vault's ``key_size``) and of every key's HMAC material."""


class KeyType(StrEnum):
    """The key types medledger uses, named as Vault's transit engine names them."""

    AES256_GCM96 = "aes256-gcm96"
    """Symmetric: encrypt/decrypt, data keys, rewrap. Per-patient keys are of this type."""
    ED25519 = "ed25519"
    """Signing (EdDSA over Curve25519; pure Ed25519, the message is not prehashed)."""
    ECDSA_P256 = "ecdsa-p256"
    """Signing (ECDSA over P-256 with SHA-256: ES256)."""
    HMAC = "hmac"
    """HMAC only (Vault's ``hmac`` type, 32 bytes): no encryption, no signing. For blind indexes."""

    @property
    def is_signing(self) -> bool:
        return self in (KeyType.ED25519, KeyType.ECDSA_P256)

    @property
    def is_encryption(self) -> bool:
        return self is KeyType.AES256_GCM96


Marshaling = Literal["asn1", "jws"]
"""How a signature is written, as Vault's ``marshaling_algorithm``: ``asn1`` (the default) puts
ECDSA signatures in DER and encodes with standard base64; ``jws`` puts them as raw ``r||s``
(64 bytes for P-256, the JWS/ES256 form) and encodes with unpadded URL-safe base64. Ed25519
signatures are the same 64 bytes either way; only the base64 alphabet changes."""


class DataKey(NamedTuple):
    """A fresh data key: use ``plaintext`` for one request, store ``wrapped``, drop ``plaintext``.

    Unpacks as ``plaintext, wrapped = await km.generate_data_key(name)``. Its repr never shows the
    plaintext.
    """

    plaintext: bytes
    wrapped: str

    def __repr__(self) -> str:
        return f"DataKey(plaintext=<{len(self.plaintext)} bytes hidden>, wrapped={self.wrapped!r})"


@dataclass(frozen=True)
class KeyInfo:
    """What a key manager tells about a key; never its material."""

    name: str
    type: KeyType
    latest_version: int
    min_decryption_version: int
    deletion_allowed: bool
    versions: tuple[int, ...] = ()
    """Versions still usable for decryption/verification (from ``min_decryption_version`` up)."""


@dataclass(frozen=True)
class PublicKey:
    """One version of a signing key's public key."""

    version: int
    type: KeyType
    pem: str
    """SubjectPublicKeyInfo PEM, the form ``cryptography``, OpenSSL and JOSE libraries load."""
    created_at: datetime | None = None

    def load(self) -> ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey:
        key = serialization.load_pem_public_key(self.pem.encode("ascii"))
        if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
            raise ValueError("unexpected public key type")
        return key

    def raw(self) -> bytes:
        """Ed25519: the 32-byte key; P-256: the uncompressed point (65 bytes, 0x04||x||y)."""
        key = self.load()
        if isinstance(key, ed25519.Ed25519PublicKey):
            return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)

    def jwk(self, kid: str | None = None) -> dict[str, str]:
        """This public key as a JWK (RFC 8037 OKP/Ed25519 or RFC 7518 EC/P-256), for JWKS."""

        def b64u(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

        raw = self.raw()
        out: dict[str, str]
        if self.type is KeyType.ED25519:
            out = {"kty": "OKP", "crv": "Ed25519", "x": b64u(raw), "alg": "EdDSA", "use": "sig"}
        else:
            n = P256_COORDINATE_BYTES
            out = {"kty": "EC", "crv": "P-256", "x": b64u(raw[1 : 1 + n]), "y": b64u(raw[1 + n :])}
            out.update({"alg": "ES256", "use": "sig"})
        if kid is not None:
            out["kid"] = kid
        return out

    def verify(self, data: bytes, signature: Signature) -> bool:
        """Check a signature of this version locally, with ``cryptography`` only."""
        if signature.version != self.version:
            return False
        key = self.load()
        try:
            if isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature.raw, data)
            else:
                key.verify(signature.der(), data, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class PublicKeySet:
    """The public keys of a signing key: the current (latest) version and every usable version."""

    name: str
    type: KeyType
    current: PublicKey
    versions: Mapping[int, PublicKey] = field(default_factory=dict)


@dataclass(frozen=True)
class Signature:
    """A signature as Vault writes it: ``value`` is ``vault:v<N>:<base64>``.

    ``raw`` is the decoded signature (Ed25519: 64 bytes; ECDSA: DER for ``asn1``, ``r||s`` for
    ``jws``); :meth:`der` and :meth:`jws` give the ECDSA signature in either form.
    """

    value: str
    version: int
    type: KeyType
    marshaling: Marshaling = "asn1"

    @classmethod
    def parse(cls, value: str, key_type: KeyType, marshaling: Marshaling = "asn1") -> Signature:
        version, _ = parse_versioned(value, what="signature")
        return cls(value=value, version=version, type=key_type, marshaling=marshaling)

    @property
    def raw(self) -> bytes:
        _, body = parse_versioned(self.value, what="signature")
        return b64decode_strict(body, urlsafe=self.marshaling == "jws")

    def der(self) -> bytes:
        """ECDSA: the DER form (what OpenSSL and X.509 use)."""
        if self.type is not KeyType.ECDSA_P256:
            raise ValueError("only ECDSA signatures have a DER form")
        return self.raw if self.marshaling == "asn1" else raw_rs_to_der(self.raw)

    def jws(self) -> bytes:
        """The bytes a JWS carries: ``r||s`` (64 bytes) for ES256, the signature itself for EdDSA."""
        if self.type is KeyType.ECDSA_P256 and self.marshaling == "asn1":
            return der_to_raw_rs(self.raw)
        return self.raw

    def __str__(self) -> str:
        return self.value


class KeyManager(abc.ABC):
    """Async key manager: named, versioned keys; operations by name, material never leaves.

    Key names follow :func:`validate_key_name` (``patient-<pseudonym>`` for per-patient keys,
    ``<service>-<purpose>`` for service keys, see KEYS.md). Every method may raise the errors
    listed in this module's docstring.
    """

    # -- key lifecycle -------------------------------------------------------------------------

    @abc.abstractmethod
    async def ensure_key(self, name: str, key_type: KeyType | str) -> KeyInfo:
        """Create the key if it does not exist (idempotent); return its info.

        AlreadyExists when a key of that name exists with another type.
        """

    @abc.abstractmethod
    async def key_info(self, name: str) -> KeyInfo:
        """Latest version, min decryption version, deletion_allowed, type and usable versions."""

    @abc.abstractmethod
    async def public_key(self, name: str) -> PublicKeySet:
        """The current version's public key and every usable version's, for a signing key."""

    @abc.abstractmethod
    async def rotate(self, name: str) -> KeyInfo:
        """Add a new version; it becomes the one used to encrypt and sign."""

    @abc.abstractmethod
    async def set_min_decryption_version(self, name: str, version: int) -> KeyInfo:
        """Refuse ciphertexts and signatures of versions below ``version`` (reversible).

        InvalidArgument when ``version`` < 1; FailedPrecondition when above the latest version.
        """

    @abc.abstractmethod
    async def allow_deletion(self, name: str) -> KeyInfo:
        """Mark the key deletable (Vault's ``deletion_allowed=true``)."""

    @abc.abstractmethod
    async def delete_key(self, name: str) -> None:
        """Delete the key and every version (crypto-shredding).

        FailedPrecondition unless :meth:`allow_deletion` was called first; NotFound if unknown.
        """

    async def erase_key(self, name: str) -> None:
        """Crypto-shredding in one call: allow deletion, then delete every version. A key that
        is already gone (erased before, never created) is done, not an error, so a repeated
        erasure (a redelivered event, a resumed run) just finishes."""
        try:
            await self.allow_deletion(name)
            await self.delete_key(name)
        except NotFound:
            pass

    # -- encryption ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def encrypt(self, name: str, plaintext: bytes, *, associated_data: bytes | None = None) -> str:
        """Encrypt under the latest version; returns ``vault:v<N>:...``.

        ``associated_data`` is authenticated, not encrypted (AEAD AD; Vault's ``associated_data``):
        the same bytes must be given to :meth:`decrypt`. Ciphertexts made with it cannot be
        rewrapped (Vault's rewrap takes no associated data).
        """

    @abc.abstractmethod
    async def decrypt(self, name: str, ciphertext: str, *, associated_data: bytes | None = None) -> bytes:
        """Decrypt a ciphertext of any usable version. DataLoss if it was altered."""

    @abc.abstractmethod
    async def rewrap(self, name: str, ciphertext: str) -> str:
        """Re-encrypt under the latest version without the plaintext leaving the key manager."""

    @abc.abstractmethod
    async def generate_data_key(self, name: str) -> DataKey:
        """A fresh 32-byte data key and the same key wrapped (encrypted) under ``name``."""

    async def decrypt_data_key(self, name: str, wrapped: str) -> bytes:
        """Unwrap a data key made by :meth:`generate_data_key` (or rewrapped since)."""
        plaintext = await self.decrypt(name, wrapped)
        if len(plaintext) != DATA_KEY_BYTES:
            raise DataLoss(f"wrapped data key under {name!r} does not hold a {DATA_KEY_BYTES}-byte key")
        return plaintext

    # -- keyed hashes --------------------------------------------------------------------------

    @abc.abstractmethod
    async def hmac(self, name: str, data: bytes, *, key_version: int | None = None) -> str:
        """HMAC-SHA256 of ``data`` under key ``name``, as ``vault:v<N>:<base64>`` (Vault transit's
        ``hmac/:name``, ``algorithm=sha2-256``).

        Works on keys of every type, as in Vault: a key of type ``hmac`` uses its own material, any
        other key has separate HMAC material per version (never its encryption or signing key).

        ``key_version`` pins a version; the default is the latest. The output is deterministic for
        a key, a version and ``data``, which is what a blind index (a keyed hash of, e.g., an
        identifier's ``system|value``) needs: pin the version, or a rotation changes every index.

        NotFound for an unknown key; InvalidArgument (field ``key_version``) for a version below 1
        or above the latest; FailedPrecondition for a version below the key's
        ``min_decryption_version`` (Vault archives those versions). Lowering the floor again gives
        the same HMACs as before.
        """

    async def hmac_many(self, requests: Sequence[tuple[str, bytes]]) -> list[str]:
        """:meth:`hmac` of each (key name, data) with the keys' latest versions, in order: many
        keys at once (the audit log's subjects, one key per patient). Concurrent calls here; a key
        manager that computes them in process does them in one go. NotFound for an unknown key."""
        return list(await asyncio.gather(*(self.hmac(name, data) for name, data in requests)))

    # -- signing -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def sign(self, name: str, data: bytes, *, marshaling: Marshaling = "asn1") -> Signature:
        """Sign ``data`` with the latest version (Ed25519, or ECDSA P-256 with SHA-256)."""

    @abc.abstractmethod
    async def verify(
        self, name: str, data: bytes, signature: Signature | str, *, marshaling: Marshaling | None = None
    ) -> bool:
        """True when ``signature`` (of any usable version) is valid for ``data``.

        ``marshaling`` is taken from a :class:`Signature`, else defaults to ``asn1``. A malformed
        or forged signature is ``False``; one older than ``min_decryption_version`` is
        FailedPrecondition.
        """

    # -- operations ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def check(self) -> None:
        """Raise Unavailable (or PermissionDenied) when the key manager cannot be used now."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Release threads, sockets and files."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


def check_key_version(key_version: int | None) -> None:
    """InvalidArgument (field ``key_version``) unless ``key_version`` is None or an int >= 1."""
    if key_version is None:
        return
    if isinstance(key_version, bool) or not isinstance(key_version, int) or key_version < 1:
        raise InvalidArgument.field("key_version", "must be an integer of at least 1")


def coerce_key_type(key_type: KeyType | str) -> KeyType:
    try:
        return KeyType(key_type)
    except ValueError:
        allowed = ", ".join(t.value for t in KeyType)
        raise InvalidArgument.field("key_type", f"must be one of {allowed}") from None


def coerce_marshaling(signature: Signature | str, marshaling: Marshaling | None) -> tuple[str, Marshaling]:
    if isinstance(signature, Signature):
        return signature.value, marshaling or signature.marshaling
    if marshaling not in (None, "asn1", "jws"):
        raise InvalidArgument.field("marshaling", "must be asn1 or jws")
    return signature, marshaling or "asn1"


def check_marshaling(marshaling: str) -> Marshaling:
    if marshaling == "asn1":
        return "asn1"
    if marshaling == "jws":
        return "jws"
    raise InvalidArgument.field("marshaling", "must be asn1 or jws")
