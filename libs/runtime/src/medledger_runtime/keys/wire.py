"""The wire forms both key managers write, whichever made them: Vault's ``vault:v<N>:<base64>``
for ciphertexts, wrapped keys, signatures and HMACs, and ECDSA signatures as DER or raw r||s."""

from __future__ import annotations

import base64
import binascii
import re

from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from medledger_runtime.errors import DataLoss, InvalidArgument

P256_COORDINATE_BYTES = 32
_VERSIONED = re.compile(r"^vault:v([1-9][0-9]{0,9}):(.*)$", re.DOTALL)


def format_versioned(version: int, payload: bytes, *, urlsafe: bool = False) -> str:
    """``vault:v<version>:<base64(payload)>``; ``urlsafe`` uses unpadded URL-safe base64 (JWS)."""
    if urlsafe:
        body = base64.urlsafe_b64encode(payload).rstrip(b"=").decode("ascii")
    else:
        body = base64.b64encode(payload).decode("ascii")
    return f"vault:v{version}:{body}"


def parse_versioned(value: str, *, what: str = "ciphertext") -> tuple[int, str]:
    """Split ``vault:v<N>:<body>`` into (N, body); InvalidArgument when it is not of that form."""
    if not isinstance(value, str):
        raise InvalidArgument.field(what, "must be a string of the form vault:v<N>:<base64>")
    match = _VERSIONED.fullmatch(value)
    if match is None:
        raise InvalidArgument.field(what, "must be of the form vault:v<N>:<base64>")
    return int(match.group(1)), match.group(2)


def b64decode_strict(body: str, *, urlsafe: bool = False) -> bytes:
    """Decode standard (padded) or, with ``urlsafe``, unpadded URL-safe base64; ValueError if bad."""
    try:
        if urlsafe:
            if "=" in body or not re.fullmatch(r"[A-Za-z0-9_-]*", body):
                raise ValueError("not unpadded URL-safe base64")
            return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("invalid base64") from exc


def decode_ciphertext(value: str) -> tuple[int, bytes]:
    """Parse a ciphertext or wrapped key: (version, nonce||ciphertext||tag).

    InvalidArgument when it is not of the form ``vault:v<N>:...``; DataLoss when the body cannot
    be an AES-GCM output (bad base64, too short): such data was damaged or tampered with.
    """
    version, body = parse_versioned(value)
    try:
        raw = b64decode_strict(body)
    except ValueError:
        raise DataLoss("ciphertext failed its integrity check: invalid base64 body") from None
    if len(raw) < 12 + 16:
        raise DataLoss("ciphertext failed its integrity check: too short")
    return version, raw


def der_to_raw_rs(der: bytes, coordinate_bytes: int = P256_COORDINATE_BYTES) -> bytes:
    """An ECDSA signature in DER to the raw ``r||s`` form of JWS (64 bytes for P-256)."""
    r, s = decode_dss_signature(der)
    return r.to_bytes(coordinate_bytes, "big") + s.to_bytes(coordinate_bytes, "big")


def raw_rs_to_der(raw: bytes, coordinate_bytes: int = P256_COORDINATE_BYTES) -> bytes:
    """The raw ``r||s`` form of JWS back to DER."""
    if len(raw) != 2 * coordinate_bytes:
        raise ValueError(f"a raw ECDSA signature must be {2 * coordinate_bytes} bytes")
    r = int.from_bytes(raw[:coordinate_bytes], "big")
    s = int.from_bytes(raw[coordinate_bytes:], "big")
    return encode_dss_signature(r, s)
