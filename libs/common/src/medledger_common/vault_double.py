"""TEST DOUBLE of HashiCorp Vault's transit secrets engine: a real HTTP server, NOT Vault.

For tests only. No Vault server can be had on the machines this project is built and tested on,
so medledger's Vault key manager (``medledger_common.keys.vault``, hvac over HTTP) is exercised
against this double, and the same contract tests run against a real Vault when ``VAULT_ADDR`` and
``VAULT_TOKEN`` are set (see ``libs/common/KEYS.md``).

It follows the HTTP API of the transit secrets engine as documented for **Vault 1.15**
(developer.hashicorp.com/vault/api-docs/v1.15.x/secret/transit, and ``/v1/sys/health``,
``/v1/sys/seal-status``), for exactly the endpoints the key manager calls:

- ``POST /v1/<mount>/keys/:name`` (``type``: aes256-gcm96, ed25519, ecdsa-p256, or hmac with
  ``key_size`` 32-512), ``GET`` it (``keys`` map of versions: creation time in Unix seconds for
  AES, ``{name, public_key, creation_time, certificate_chain}`` for asymmetric keys, no ``keys``
  but ``key_size`` for hmac keys; versions below ``min_decryption_version`` are not listed, as
  Vault archives them), ``DELETE`` it (400 ``deletion is not allowed for this key`` unless
  allowed);
- ``POST /v1/<mount>/keys/:name/rotate`` and ``/config`` (``min_decryption_version``,
  ``deletion_allowed``); like Vault >= 1.14, key writes answer 200 with the key's information;
- ``POST /v1/<mount>/encrypt/:name`` (upserts a missing key, as Vault does for a token with
  ``create``), ``decrypt``, ``rewrap``, ``datakey/plaintext|wrapped``, with ``associated_data``
  (AEAD AD, Vault >= 1.13) on encrypt and decrypt;
- ``POST /v1/<mount>/hmac/:name(/:algorithm)`` (``input``, ``key_version``, ``algorithm``;
  every key type: an hmac key's own material, any other key's separate per-version HMAC key;
  archived versions below ``min_decryption_version`` are ``no such key version``);
- ``POST /v1/<mount>/sign/:name(/:hash_algorithm)`` and ``verify`` (``marshaling_algorithm``
  asn1 or jws, ``hash_algorithm``, ``prehashed``; ed25519 signs the input itself).

Answers are ``{"data": {...}}`` with Vault's envelope fields; errors are ``{"errors": [...]}`` with
Vault's statuses and messages (400 for bad requests, 403 ``permission denied``, 404 ``{"errors":
[]}`` for a missing key, 503 ``Vault is sealed``). Ciphertexts are ``vault:v<N>:<base64(nonce||ct
||tag)>`` with AES-256-GCM and a 96-bit random nonce, as Vault writes them.

Switches for error tests: :attr:`VaultTransitDouble.sealed`, :meth:`VaultTransitDouble.deny`
(403 on a path prefix), :attr:`VaultTransitDouble.latency` (seconds before each answer), and
:attr:`VaultTransitDouble.token` (change it to revoke the old one).

Independent of the production key-manager code on purpose (it imports nothing from
``medledger_common.keys``): both follow Vault's documentation, neither follows the other.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["VAULT_API_VERSION", "VaultTransitDouble"]

VAULT_API_VERSION = "1.15.0"
"""The Vault version whose documented transit API this double follows (reported by sys/health)."""

_NAME = re.compile(r"^\w(?:[\w.@-]*\w)?$", re.ASCII)
_TOO_OLD = "ciphertext or signature version is disallowed by policy (too old)"
_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha2-224": hashes.SHA224,
    "sha2-256": hashes.SHA256,
    "sha2-384": hashes.SHA384,
    "sha2-512": hashes.SHA512,
}
_VAULT_TYPES = {
    "aes128-gcm96",
    "aes256-gcm96",
    "chacha20-poly1305",
    "ed25519",
    "ecdsa-p256",
    "ecdsa-p384",
    "ecdsa-p521",
    "rsa-2048",
    "rsa-3072",
    "rsa-4096",
    "hmac",
}
_IMPLEMENTED_TYPES = {"aes256-gcm96", "ed25519", "ecdsa-p256", "hmac"}
_SIGNING_TYPES = {"ed25519", "ecdsa-p256"}
_HMAC_MIN_KEY_SIZE, _HMAC_MAX_KEY_SIZE = 32, 512  # bytes, Vault's keysutil.HmacMin/MaxKeySize


class _Reply(Exception):
    """An HTTP answer raised from deep inside a handler."""

    def __init__(self, status: int, body: dict[str, Any] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _error(status: int, *messages: str) -> _Reply:
    return _Reply(status, {"errors": list(messages)})


def _bad(message: str) -> _Reply:
    return _error(HTTPStatus.BAD_REQUEST, message)


@dataclass
class _Version:
    created: datetime
    secret: Any  # bytes (AES, hmac) or a cryptography private key
    # Vault gives every version of every key a random 32-byte HMAC key of its own (KeyEntry.HMACKey);
    # keys of type hmac use their ``secret`` instead (Policy.HMACKey).
    hmac_key: bytes = field(default_factory=lambda: os.urandom(32))


@dataclass
class _Key:
    name: str
    type: str
    versions: dict[int, _Version] = field(default_factory=dict)
    latest_version: int = 0
    min_decryption_version: int = 1
    min_encryption_version: int = 0
    deletion_allowed: bool = False
    key_size: int = 0  # hmac keys only

    def add_version(self) -> None:
        if self.type == "aes256-gcm96":
            secret: Any = os.urandom(32)
        elif self.type == "hmac":
            secret = os.urandom(self.key_size or _HMAC_MIN_KEY_SIZE)
        elif self.type == "ed25519":
            secret = ed25519.Ed25519PrivateKey.generate()
        else:
            secret = ec.generate_private_key(ec.SECP256R1())
        self.latest_version += 1
        self.versions[self.latest_version] = _Version(created=datetime.now(UTC), secret=secret)

    @property
    def is_aes(self) -> bool:
        return self.type == "aes256-gcm96"

    @property
    def is_signing(self) -> bool:
        return self.type in _SIGNING_TYPES

    def hmac_key(self, version: int) -> bytes:
        """Policy.HMACKey: an hmac key's own bytes, any other key's separate HMAC key."""
        entry = self.versions[version]
        return entry.secret if self.type == "hmac" else entry.hmac_key

    def policy(self) -> dict[str, Any]:
        """The ``data`` of a read (Vault's formatKeyPolicy)."""
        keys: dict[str, Any] = {}
        for n, v in sorted(self.versions.items()):
            if n < self.min_decryption_version or self.type == "hmac":
                continue  # archived; and formatKeyPolicy lists no versions for hmac keys
            if self.is_aes:
                keys[str(n)] = int(v.created.timestamp())
                continue
            public = v.secret.public_key()
            if self.type == "ed25519":
                name = "ed25519"
                text = base64.b64encode(
                    public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
                ).decode("ascii")
            else:
                name = "P-256"
                text = public.public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                ).decode("ascii")
            keys[str(n)] = {
                "name": name,
                "public_key": text,
                "certificate_chain": "",
                "creation_time": v.created.isoformat().replace("+00:00", "Z"),
            }
        policy: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "derived": False,
            "deletion_allowed": self.deletion_allowed,
            "min_available_version": 0,
            "min_decryption_version": self.min_decryption_version,
            "min_encryption_version": self.min_encryption_version,
            "latest_version": self.latest_version,
            "exportable": False,
            "allow_plaintext_backup": False,
            "supports_encryption": self.is_aes,
            "supports_decryption": self.is_aes,
            "supports_signing": self.is_signing,
            "supports_derivation": self.type in ("aes256-gcm96", "ed25519"),
            "auto_rotate_period": 0,
            "imported_key": False,
        }
        if self.key_size:
            policy["key_size"] = self.key_size
        if self.type != "hmac":
            policy["keys"] = keys
        return policy


def _b64decode(value: Any, what: str = "input") -> bytes:
    if not isinstance(value, str):
        raise _bad(f"{what}: expected a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("illegal base64 data at input byte 0") from None


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise _bad(f"{what}: expected an integer")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _bad(f"error converting input {value!r} for field {what!r}") from None


def _as_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise _bad(f"error converting input {value!r} for field {what!r}")


class VaultTransitDouble:
    """A test double of Vault's transit engine on ``127.0.0.1:<free port>``. See the module doc.

    Use as a context manager, or :meth:`start` / :meth:`stop`. :attr:`url` and :attr:`token` are
    what a client needs.
    """

    def __init__(self, *, token: str | None = None, mount: str = "transit", host: str = "127.0.0.1") -> None:
        self.token = token or f"hvs.double-{secrets.token_hex(12)}"
        self.mount = mount.strip("/")
        self.host = host
        self.latency = 0.0
        self.calls: list[tuple[str, str]] = []
        self._sealed = False
        self._denied: set[str] = set()
        self._keys: dict[str, _Key] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the Vault double is not running")
        return f"http://{self.host}:{self._server.server_address[1]}"

    @property
    def sealed(self) -> bool:
        return self._sealed

    @sealed.setter
    def sealed(self, value: bool) -> None:
        self._sealed = bool(value)

    def deny(self, path_prefix: str) -> None:
        """Answer 403 ``permission denied`` for paths under ``path_prefix`` (e.g. ``transit/sign/``)."""
        with self._lock:
            self._denied.add(path_prefix.lstrip("/").removeprefix("v1/"))

    def allow_all(self) -> None:
        with self._lock:
            self._denied.clear()

    def key_names(self) -> list[str]:
        with self._lock:
            return sorted(self._keys)

    def start(self) -> VaultTransitDouble:
        if self._server is not None:
            return self
        double = self

        class Handler(_Handler):
            owner = double

        server = _Server((self.host, 0), Handler)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="vault-double", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> VaultTransitDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling (called from the server's threads) -------------------------------

    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, dict[str, Any] | None]:
        if self.latency > 0:
            time.sleep(self.latency)
        path = urlsplit(raw_path).path
        with self._lock:
            self.calls.append((method, path))
        if not path.startswith("/v1/"):
            return HTTPStatus.NOT_FOUND, {"errors": []}
        rest = path[len("/v1/") :]
        try:
            if rest in ("sys/health", "sys/seal-status"):
                return self._sys(method, rest)
            if self._sealed:
                raise _error(HTTPStatus.SERVICE_UNAVAILABLE, "Vault is sealed")
            if headers.get("X-Vault-Token") != self.token:
                raise _error(HTTPStatus.FORBIDDEN, "permission denied")
            with self._lock:
                denied = any(rest.startswith(prefix) for prefix in self._denied)
            if denied:
                raise _error(HTTPStatus.FORBIDDEN, "permission denied")
            if not rest.startswith(self.mount + "/"):
                raise _error(HTTPStatus.NOT_FOUND, f'no handler for route "{rest}". route entry not found.')
            try:
                params = json.loads(body) if body.strip() else {}
            except ValueError:
                raise _bad("failed to parse JSON input: invalid JSON") from None
            if not isinstance(params, dict):
                raise _bad("failed to parse JSON input: expected an object")
            with self._lock:
                status, data, warnings = self._transit(method, rest[len(self.mount) + 1 :].split("/"), params)
        except _Reply as reply:
            return reply.status, reply.body
        except Exception as exc:  # a bug in the double: answer as Vault does on an internal error
            return HTTPStatus.INTERNAL_SERVER_ERROR, {
                "errors": [f"internal error in the test double: {type(exc).__name__}"]
            }
        if status == HTTPStatus.NO_CONTENT:
            return status, None
        return status, {
            "request_id": str(uuid.uuid4()),
            "lease_id": "",
            "renewable": False,
            "lease_duration": 0,
            "data": data,
            "wrap_info": None,
            "warnings": warnings or None,
            "auth": None,
            "mount_type": "transit",
        }

    def _sys(self, method: str, rest: str) -> tuple[int, dict[str, Any]]:
        if method not in ("GET", "HEAD"):
            raise _error(HTTPStatus.METHOD_NOT_ALLOWED, "unsupported operation")
        if rest == "sys/seal-status":
            return HTTPStatus.OK, {
                "type": "shamir",
                "initialized": True,
                "sealed": self._sealed,
                "t": 1,
                "n": 1,
                "progress": 0,
                "nonce": "",
                "version": VAULT_API_VERSION,
                "build_date": "2023-09-22T20:53:58Z",
                "migration": False,
                "recovery_seal": False,
                "storage_type": "inmem",
            }
        body = {
            "initialized": True,
            "sealed": self._sealed,
            "standby": False,
            "performance_standby": False,
            "replication_performance_mode": "disabled",
            "replication_dr_mode": "disabled",
            "server_time_utc": int(time.time()),
            "version": VAULT_API_VERSION,
        }
        return (HTTPStatus.SERVICE_UNAVAILABLE if self._sealed else HTTPStatus.OK), body

    def _transit(self, method: str, parts: list[str], params: dict[str, Any]) -> tuple[int, Any, list[str]]:
        write = method in ("POST", "PUT")
        name_at = 2 if parts[0] == "datakey" else 1
        if len(parts) <= name_at or not _NAME.fullmatch(parts[name_at]):
            raise _error(HTTPStatus.NOT_FOUND, "unsupported path")
        match parts:
            case ["keys", name] if method == "GET":
                key = self._keys.get(name)
                if key is None:
                    raise _error(HTTPStatus.NOT_FOUND)
                return HTTPStatus.OK, key.policy(), []
            case ["keys", name] if write:
                return self._create(name, params)
            case ["keys", name] if method == "DELETE":
                return self._delete(name)
            case ["keys", name, "rotate"] if write:
                key = self._keys.get(name)
                if key is None:
                    raise _bad("key not found")
                key.add_version()
                return HTTPStatus.OK, key.policy(), []
            case ["keys", name, "config"] if write:
                return self._config(name, params)
            case ["encrypt", name] if write:
                return self._encrypt(name, params)
            case ["decrypt", name] if write:
                key = self._aes_key(name, "decryption")
                return HTTPStatus.OK, {"plaintext": self._decrypt(key, params)}, []
            case ["rewrap", name] if write:
                key = self._aes_key(name, "decryption")
                plaintext = base64.b64decode(self._decrypt(key, {**params, "associated_data": ""}))
                return HTTPStatus.OK, self._seal(key, plaintext, b""), []
            case ["datakey", kind, name] if write and kind in ("plaintext", "wrapped"):
                return self._datakey(kind, name, params)
            case ["sign", name] | ["sign", name, _] if write:
                return self._sign(name, parts[2] if len(parts) == 3 else None, params)
            case ["verify", name] | ["verify", name, _] if write:
                return self._verify(name, parts[2] if len(parts) == 3 else None, params)
            case ["hmac", name] | ["hmac", name, _] if write:
                return self._hmac(name, parts[2] if len(parts) == 3 else None, params)
            case ["keys", _] | ["keys", _, "rotate" | "config"] | ["encrypt" | "decrypt" | "rewrap", _]:
                raise _error(HTTPStatus.METHOD_NOT_ALLOWED, "unsupported operation")
            case _:
                raise _error(HTTPStatus.NOT_FOUND, "unsupported path")

    # -- transit operations (under the lock) -----------------------------------------------

    def _create(self, name: str, params: dict[str, Any]) -> tuple[int, Any, list[str]]:
        key_type = str(params.get("type") or "aes256-gcm96")
        if key_type not in _VAULT_TYPES:
            raise _bad(f"unknown key type {key_type}")
        if key_type not in _IMPLEMENTED_TYPES:
            raise _bad(f"key type {key_type} is not implemented by this test double")
        key_size = _as_int(params.get("key_size") or 0, "key_size")
        if key_size != 0:
            if key_type != "hmac":
                raise _bad(f"key_size is not valid for algorithm {key_type}")
            if not _HMAC_MIN_KEY_SIZE <= key_size <= _HMAC_MAX_KEY_SIZE:
                raise _bad(f"invalid key_size {key_size}")
        if _as_bool(params.get("derived", False), "derived") or _as_bool(params.get("exportable", False), "exportable"):
            raise _bad("derived and exportable keys are not implemented by this test double")
        key = self._keys.get(name)
        if key is not None:
            return HTTPStatus.OK, key.policy(), [f"key {name} already existed"]
        key = _Key(name=name, type=key_type, key_size=key_size)
        key.add_version()
        self._keys[name] = key
        return HTTPStatus.OK, key.policy(), []

    def _delete(self, name: str) -> tuple[int, Any, list[str]]:
        key = self._keys.get(name)
        if key is None:
            raise _bad(f"error deleting policy {name}: could not delete key; not found")
        if not key.deletion_allowed:
            raise _bad(f"error deleting policy {name}: deletion is not allowed for this key")
        del self._keys[name]
        return HTTPStatus.NO_CONTENT, None, []

    def _config(self, name: str, params: dict[str, Any]) -> tuple[int, Any, list[str]]:
        key = self._keys.get(name)
        if key is None:
            raise _bad(f"no existing key named {name} could be found")
        warnings: list[str] = []
        min_dec = key.min_decryption_version
        if "min_decryption_version" in params:
            min_dec = _as_int(params["min_decryption_version"], "min_decryption_version")
            if min_dec < 0:
                raise _bad("min decryption version cannot be negative")
            if min_dec == 0:
                min_dec = 1
                warnings.append("since Vault 0.3, transit key numbering starts at 1; forcing minimum to 1")
            if min_dec > key.latest_version:
                raise _bad(
                    f"cannot set min decryption version of {min_dec}, latest key version is {key.latest_version}"
                )
        min_enc = key.min_encryption_version
        if "min_encryption_version" in params:
            min_enc = _as_int(params["min_encryption_version"], "min_encryption_version")
            if min_enc < 0 or min_enc > key.latest_version:
                raise _bad(
                    f"cannot set min encryption version of {min_enc}, latest key version is {key.latest_version}"
                )
        if 0 < min_enc < min_dec:
            raise _bad(
                "cannot set min encryption/decryption values; min encryption version of "
                f"{min_enc} must be greater than or equal to min decryption version of {min_dec}"
            )
        key.min_decryption_version, key.min_encryption_version = min_dec, min_enc
        if "deletion_allowed" in params:
            key.deletion_allowed = _as_bool(params["deletion_allowed"], "deletion_allowed")
        return HTTPStatus.OK, key.policy(), warnings

    def _aes_key(self, name: str, operation: str) -> _Key:
        key = self._keys.get(name)
        if key is None:
            raise _bad("encryption key not found")
        if not key.is_aes:
            raise _bad(f"message {operation} not supported for key type {key.type}")
        return key

    def _encryption_version(self, key: _Key, params: dict[str, Any]) -> int:
        version = _as_int(params.get("key_version") or 0, "key_version")
        if version == 0:
            return key.latest_version
        if version > key.latest_version or version < max(key.min_encryption_version, key.min_decryption_version):
            raise _bad("requested version for encryption is not valid")
        return version

    def _seal(self, key: _Key, plaintext: bytes, associated_data: bytes, version: int | None = None) -> dict[str, Any]:
        version = version or key.latest_version
        nonce = os.urandom(12)
        sealed = AESGCM(key.versions[version].secret).encrypt(nonce, plaintext, associated_data or None)
        return {
            "ciphertext": f"vault:v{version}:" + base64.b64encode(nonce + sealed).decode("ascii"),
            "key_version": version,
        }

    def _encrypt(self, name: str, params: dict[str, Any]) -> tuple[int, Any, list[str]]:
        if "plaintext" not in params:
            raise _bad("missing plaintext to encrypt")
        plaintext = _b64decode(params["plaintext"], "plaintext")
        associated = _b64decode(params.get("associated_data") or "", "associated_data")
        key = self._keys.get(name)
        if key is None:
            # Upsert, as Vault does when the token may create on this path.
            key_type = str(params.get("type") or "aes256-gcm96")
            if key_type != "aes256-gcm96":
                raise _bad(f"key type {key_type} not supported for this operation")
            key = _Key(name=name, type=key_type)
            key.add_version()
            self._keys[name] = key
        if not key.is_aes:
            raise _bad(f"message encryption not supported for key type {key.type}")
        return HTTPStatus.OK, self._seal(key, plaintext, associated, self._encryption_version(key, params)), []

    def _decrypt(self, key: _Key, params: dict[str, Any]) -> str:
        ciphertext = params.get("ciphertext")
        if not isinstance(ciphertext, str) or not ciphertext:
            raise _bad("missing ciphertext to decrypt")
        associated = _b64decode(params.get("associated_data") or "", "associated_data")
        if not ciphertext.startswith("vault:v"):
            raise _bad("invalid ciphertext: no prefix")
        fields = ciphertext[len("vault:v") :].split(":", 1)
        if len(fields) != 2:
            raise _bad("invalid ciphertext: wrong number of fields")
        try:
            version = int(fields[0])
        except ValueError:
            raise _bad("invalid ciphertext: version number could not be decoded") from None
        version = max(version, 1)
        if version > key.latest_version:
            raise _bad("invalid ciphertext: version is too new")
        if version < key.min_decryption_version:
            raise _bad(_TOO_OLD)
        try:
            raw = base64.b64decode(fields[1], validate=True)
        except (binascii.Error, ValueError):
            raise _bad("invalid ciphertext: could not decode base64") from None
        if len(raw) < 12:
            raise _bad("invalid ciphertext length")
        try:
            plaintext = AESGCM(key.versions[version].secret).decrypt(raw[:12], raw[12:], associated or None)
        except InvalidTag:
            raise _bad("cipher: message authentication failed") from None
        return base64.b64encode(plaintext).decode("ascii")

    def _datakey(self, kind: str, name: str, params: dict[str, Any]) -> tuple[int, Any, list[str]]:
        key = self._aes_key(name, "encryption")
        bits = _as_int(params.get("bits") or 256, "bits")
        if bits not in (128, 256, 512):
            raise _bad("invalid bit length")
        data_key = os.urandom(bits // 8)
        out = self._seal(key, data_key, b"")
        if kind == "plaintext":
            out["plaintext"] = base64.b64encode(data_key).decode("ascii")
        return HTTPStatus.OK, out, []

    def _signing_key(self, name: str, missing: str, verb: str) -> _Key:
        key = self._keys.get(name)
        if key is None:
            raise _bad(missing)
        if not key.is_signing:
            raise _bad(f"key type {key.type} does not support {verb}")
        return key

    @staticmethod
    def _hash(url_algorithm: str | None, params: dict[str, Any]) -> hashes.HashAlgorithm:
        name = url_algorithm or str(params.get("hash_algorithm") or params.get("algorithm") or "sha2-256")
        factory = _HASHES.get(name)
        if factory is None:
            raise _bad(f"invalid hash algorithm {name!r}")
        return factory()

    @staticmethod
    def _marshaling(params: dict[str, Any]) -> str:
        marshaling = str(params.get("marshaling_algorithm") or "asn1")
        if marshaling not in ("asn1", "jws"):
            raise _bad(f"invalid marshaling type {marshaling!r}")
        return marshaling

    def _sign(self, name: str, url_algorithm: str | None, params: dict[str, Any]) -> tuple[int, Any, list[str]]:
        algorithm = self._hash(url_algorithm, params)
        marshaling = self._marshaling(params)
        prehashed = _as_bool(params.get("prehashed", False), "prehashed")
        key = self._signing_key(name, "signing key not found", "signing")
        data = _b64decode(params.get("input") or "", "input")
        version = self._encryption_version(key, params)
        private = key.versions[version].secret
        if key.type == "ed25519":
            signature = private.sign(data)
        else:
            chosen: Any = Prehashed(algorithm) if prehashed else algorithm
            der = private.sign(data, ec.ECDSA(chosen))
            if marshaling == "jws":
                r, s = decode_dss_signature(der)
                signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
            else:
                signature = der
        if marshaling == "jws":
            encoded = base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")
        else:
            encoded = base64.b64encode(signature).decode("ascii")
        return HTTPStatus.OK, {"signature": f"vault:v{version}:{encoded}", "key_version": version}, []

    def _hmac(self, name: str, url_algorithm: str | None, params: dict[str, Any]) -> tuple[int, Any, list[str]]:
        """POST /transit/hmac/:name(/:algorithm), in the order of Vault's pathHMACWrite."""
        version = _as_int(params.get("key_version") or 0, "key_version")
        algorithm = url_algorithm or str(params.get("algorithm") or "sha2-256")
        key = self._keys.get(name)
        if key is None:
            raise _bad("encryption key not found")
        if version == 0:
            version = key.latest_version
        elif version != key.latest_version and key.min_encryption_version > 0 and version < key.min_encryption_version:
            raise _bad("cannot generate HMAC: version is too old (disallowed by policy)")
        # Policy.HMACKey, then safeGetKeyEntry: versions below min_decryption_version are archived.
        if version < 0:
            raise _bad("key version does not exist (cannot be negative)")
        if version > key.latest_version:
            raise _bad(f"key version does not exist; latest key version is {key.latest_version}")
        if version < key.min_decryption_version or version not in key.versions:
            raise _bad("no such key version")
        factory = _HASHES.get(algorithm)
        if factory is None:
            raise _bad(f"unsupported algorithm {algorithm!r}")
        if "input" not in params:
            raise _bad("missing input for HMAC")
        raw = params["input"]
        try:
            data = base64.b64decode(raw, validate=True) if isinstance(raw, str) else None
        except (binascii.Error, ValueError):
            data = None
        if data is None:
            raise _bad("unable to decode input as base64: illegal base64 data at input byte 0")
        mac = crypto_hmac.HMAC(key.hmac_key(version), factory())
        mac.update(data)
        encoded = base64.b64encode(mac.finalize()).decode("ascii")
        return HTTPStatus.OK, {"hmac": f"vault:v{version}:{encoded}"}, []

    def _verify(self, name: str, url_algorithm: str | None, params: dict[str, Any]) -> tuple[int, Any, list[str]]:
        signature = params.get("signature")
        if not isinstance(signature, str):
            raise _bad("neither a 'signature' nor an 'hmac' were given to verify")
        algorithm = self._hash(url_algorithm, params)
        marshaling = self._marshaling(params)
        prehashed = _as_bool(params.get("prehashed", False), "prehashed")
        key = self._signing_key(name, "encryption key not found", "verification")
        data = _b64decode(params.get("input") or "", "input")
        if not signature.startswith("vault:v"):
            raise _bad("invalid signature: no prefix")
        fields = signature[len("vault:v") :].split(":", 1)
        if len(fields) != 2:
            raise _bad("invalid signature: wrong number of fields")
        try:
            version = int(fields[0])
        except ValueError:
            raise _bad("invalid signature: version number could not be decoded") from None
        if version > key.latest_version:
            raise _bad("invalid signature: version is too new")
        if version < key.min_decryption_version:
            raise _bad(_TOO_OLD)
        try:
            if marshaling == "jws":
                body = fields[1]
                if "=" in body:
                    raise ValueError("padded")
                raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            else:
                raw = base64.b64decode(fields[1], validate=True)
        except (binascii.Error, ValueError):
            raise _bad("invalid base64 signature value") from None
        public = key.versions[version].secret.public_key()
        try:
            if key.type == "ed25519":
                public.verify(raw, data)
            else:
                if marshaling == "jws":
                    if len(raw) != 64:
                        raise _bad("supplied signature is invalid")
                    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
                else:
                    try:
                        decode_dss_signature(raw)
                    except ValueError:
                        raise _bad("supplied signature is invalid") from None
                    der = raw
                chosen: Any = Prehashed(algorithm) if prehashed else algorithm
                public.verify(der, data, ec.ECDSA(chosen))
        except InvalidSignature:
            return HTTPStatus.OK, {"valid": False}, []
        return HTTPStatus.OK, {"valid": True}, []


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (a timeout test) is not an error worth a traceback."""


class _Handler(BaseHTTPRequestHandler):
    owner: VaultTransitDouble
    protocol_version = "HTTP/1.1"
    server_version = "VaultTransitDouble"
    disable_nagle_algorithm = True  # headers and body go in separate writes: no 40 ms stalls

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read answers, not access logs."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        status, payload = self.owner.handle(self.command, self.path, self.headers, body)
        data = b"" if payload is None else json.dumps(payload).encode("utf-8")
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data and self.command != "HEAD":
            self.wfile.write(data)

    do_GET = _answer
    do_POST = _answer
    do_PUT = _answer
    do_DELETE = _answer
    do_HEAD = _answer


def main(argv: list[str] | None = None) -> None:
    """``python -m medledger_common.vault_double TOKEN_FILE``: run the double in a process of its
    own (benchmarks, local experiments), write its token to TOKEN_FILE, print its URL on one
    line, and serve until SIGTERM or Ctrl-C. Still a TEST DOUBLE, not Vault."""
    import signal
    import sys
    from pathlib import Path

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m medledger_common.vault_double TOKEN_FILE")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with VaultTransitDouble() as double:
        token_file = Path(args[0])
        token_file.write_text(double.token)
        token_file.chmod(0o600)
        print(double.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()


if __name__ == "__main__":
    main()
