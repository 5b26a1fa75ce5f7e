"""The key manager over HashiCorp Vault's transit secrets engine, through hvac.

One module, though long: it is every operation of the ``KeyManager`` interface against one
backend, read side by side with its twin ``local.py`` and checked by the same contract tests.

hvac is synchronous: every call runs in a bounded thread pool (one hvac client per worker thread,
so no ``requests.Session`` is shared between threads) under a per-call timeout. The token comes
from a value or from a file that is re-read whenever it changes (Vault Agent writes and renews it
there). Private keys never leave Vault: ``export`` is never used.

Vault's answers are mapped to :mod:`medledger_runtime.errors` (see :mod:`medledger_runtime.keys.base`);
messages name the operation, the key and the Vault address, never a token or key material.

Transit's encrypt endpoint creates a missing key when the token may ``create`` on it; this class
reads the key first so that an unknown key is NotFound, as in the local keyring. Give the
services' Vault policy ``update`` (not ``create``) on ``transit/encrypt/*`` to close the race
between that read and the encrypt (see KEYS.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from prometheus_client import Counter

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
    parse_versioned,
)

__all__ = ["VaultKeyManager"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MOUNT_POINT = "transit"
DEFAULT_TIMEOUT_SECONDS = 5.0
DEFAULT_MAX_WORKERS = 8
_MOUNT = re.compile(r"^[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*$")
# Operations whose 400s (other than not-found / too-old / wrong type) mean the ciphertext is bad.
_CIPHERTEXT_OPS = frozenset({"decrypt", "rewrap", "decrypt data key"})
# Failures of calls to Vault, by the status each maps to: UNAVAILABLE (Vault unreachable or too
# slow) is what an SRE alerts on; NOT_FOUND of an erased key is expected and counted too.
KEY_MANAGER_ERRORS = Counter(
    "medledger_key_manager_errors_total",
    "Key-manager calls that failed, by backend, operation and the gRPC status the failure maps to.",
    ["backend", "operation", "code"],
)
for _op in ("encrypt", "decrypt", "read", "create", "rotate", "verify", "delete"):
    KEY_MANAGER_ERRORS.labels("vault", _op, "UNAVAILABLE")

_MAX_DETAIL = 200


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise TypeError("expected a base64 string")
    return base64.b64decode(value, validate=True)


def _parse_time(value: Any) -> datetime | None:
    """Vault's times: RFC 3339 with up to nanoseconds (asymmetric keys), or Unix seconds (AES)."""
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return datetime.fromtimestamp(value).astimezone()
        if isinstance(value, str):
            text = re.sub(r"(\.\d{6})\d+", r"\1", value).replace("Z", "+00:00")
            return datetime.fromisoformat(text)
    except (ValueError, OverflowError, OSError):
        return None
    return None


def _data(response: Any) -> dict[str, Any]:
    """The ``data`` object of a 200 answer; {} for a 204 (hvac hands back the Response then)."""
    if isinstance(response, dict):
        data = response.get("data")
        if isinstance(data, dict):
            return data
        raise ValueError("Vault answer without a data object")
    return {}


class _TokenSource:
    """The Vault token: a fixed value, or a file re-read when its inode, mtime or size change."""

    def __init__(self, token: str | None, token_file: Path | None) -> None:
        self._value = token or ""
        self._file = token_file
        self._seen: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    def get(self) -> str:
        if self._file is None:
            return self._value
        try:
            st = os.stat(self._file)
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
            with self._lock:
                if seen != self._seen:
                    token = self._file.read_text(encoding="utf-8").strip()
                    if not token:
                        raise Unavailable(f"Vault token file {self._file} is empty")
                    self._value, self._seen = token, seen
                return self._value
        except OSError as exc:
            raise Unavailable(f"cannot read Vault token file {self._file}: {exc.strerror}") from None


class VaultKeyManager(KeyManager):
    """Key manager over Vault transit at ``url`` (``mount_point`` defaults to ``transit``).

    Give exactly one of ``token`` and ``token_file``. ``timeout`` bounds every call (seconds);
    ``max_workers`` bounds the threads (and so the concurrent requests to Vault). ``verify`` is
    passed to requests: True, False, or the path of a CA bundle.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_file: Path | str | None = None,
        mount_point: str = DEFAULT_MOUNT_POINT,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        max_workers: int = DEFAULT_MAX_WORKERS,
        verify: bool | str = True,
        namespace: str | None = None,
    ) -> None:
        if (token is None) == (token_file is None):
            raise ValueError("give exactly one of token and token_file")
        if not url.startswith(("http://", "https://")):
            raise ValueError("the Vault address must be an http:// or https:// URL")
        mount = mount_point.strip("/")
        if not _MOUNT.fullmatch(mount):
            raise ValueError(f"invalid transit mount point {mount_point!r}")
        if timeout <= 0 or max_workers < 1:
            raise ValueError("timeout must be positive and max_workers at least 1")
        self.url = url.rstrip("/")
        self.mount_point = mount
        self.timeout = float(timeout)
        self._verify = verify
        self._namespace = namespace
        self._tokens = _TokenSource(token, Path(token_file) if token_file is not None else None)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="vault-keys")
        self._local = threading.local()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()
        self._types: dict[str, KeyType] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"VaultKeyManager(url={self.url!r}, mount_point={self.mount_point!r})"

    # -- plumbing --------------------------------------------------------------------------

    def _client(self) -> Any:
        """This worker thread's hvac client, with the current token."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = hvac.Client(url=self.url, timeout=self.timeout, verify=self._verify, namespace=self._namespace)
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        client.token = self._tokens.get()
        return client

    @property
    def _transit(self) -> Any:
        return self._client().secrets.transit

    async def _call(self, op: str, name: str | None, fn: Callable[[Any], T]) -> T:
        """Run ``fn(transit_api)`` in the pool under the timeout; map every failure, and count
        it in ``medledger_key_manager_errors_total`` by the status it maps to."""
        try:
            return await self._call_mapped(op, name, fn)
        except MedledgerError as exc:
            KEY_MANAGER_ERRORS.labels("vault", op, exc.status).inc()
            raise

    async def _call_mapped(self, op: str, name: str | None, fn: Callable[[Any], T]) -> T:
        if self._closed:
            raise Unavailable("the Vault key manager is closed")
        what = f"{op} on key {name!r}" if name else op

        def run() -> T:
            return fn(self._transit)

        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._pool, run), self.timeout)
        except MedledgerError:
            raise
        except TimeoutError:
            raise Unavailable(f"Vault at {self.url} did not answer {what} within {self.timeout:g}s") from None
        except hvac.exceptions.VaultError as exc:
            raise self._map_error(op, name, what, exc) from None
        except requests.exceptions.Timeout:
            raise Unavailable(f"Vault at {self.url} did not answer {what} within {self.timeout:g}s") from None
        except requests.exceptions.ConnectionError:
            raise Unavailable(f"cannot reach Vault at {self.url} for {what}") from None
        except requests.exceptions.RequestException as exc:
            raise Unavailable(f"request to Vault at {self.url} for {what} failed: {type(exc).__name__}") from None
        except (ValueError, KeyError, TypeError):
            raise Unavailable(f"unexpected answer from Vault at {self.url} to {what}") from None
        except RuntimeError:
            # The pool was shut down under us.
            raise Unavailable("the Vault key manager is closed") from None

    def _map_error(self, op: str, name: str | None, what: str, exc: hvac.exceptions.VaultError) -> MedledgerError:
        errors = [str(e) for e in (exc.errors or []) if e] if isinstance(exc.errors, list) else []
        detail = " ".join(" ".join(errors).split())[:_MAX_DETAIL]
        low = detail.lower()
        if isinstance(exc, hvac.exceptions.VaultDown):
            if "sealed" in low:
                return Unavailable(f"Vault at {self.url} is sealed: cannot {what}")
            return Unavailable(f"Vault at {self.url} is unavailable (503): cannot {what}")
        if isinstance(exc, hvac.exceptions.Forbidden | hvac.exceptions.Unauthorized):
            return PermissionDenied(
                f"Vault at {self.url} denied {what}: permission denied (check the token and its policy "
                f"on the {self.mount_point!r} mount)"
            )
        if isinstance(exc, hvac.exceptions.InvalidPath):
            if "no handler for route" in low:
                return Unavailable(f"Vault at {self.url} has no transit engine mounted at {self.mount_point!r}")
            return NotFound(f"key {name!r} not found")
        if isinstance(exc, hvac.exceptions.InternalServerError):
            # Vault's own failure, never the caller's: while a node restarts it answers 500 "local
            # node not active but active cluster node not found", which is no missing key.
            return Unavailable(f"Vault at {self.url} failed {what} (500)")
        if isinstance(exc, hvac.exceptions.InvalidRequest):
            if op == "hmac" and "no such key version" in low:
                # Vault archives versions below min_decryption_version: hmac cannot find them.
                return FailedPrecondition(
                    f"{what}: the requested key version is below the key's minimum decryption version"
                )
            if op == "hmac" and "key version does not exist" in low:
                return InvalidArgument.field("key_version", f"{what}: {detail}")
            if op == "hmac" and ("too old" in low or "disallowed by policy" in low):
                return FailedPrecondition(f"{what}: the key's policy refuses that key version ({detail})")
            if "too old" in low or "disallowed by policy" in low:
                return FailedPrecondition(
                    f"{what}: the {'signature' if op == 'verify' else 'ciphertext'} is of a key version below "
                    "the key's minimum decryption version"
                )
            if "not found" in low or "no existing key named" in low:
                return NotFound(f"key {name!r} not found")
            if "deletion is not allowed" in low:
                return FailedPrecondition(f"deletion is not allowed for key {name!r}: call allow_deletion first")
            if "cannot set min decryption version" in low:
                return FailedPrecondition(f"{what}: {detail}")
            if "not supported for key type" in low or "does not support" in low:
                return FailedPrecondition(f"{what}: the key's type does not support it ({detail})")
            if op in _CIPHERTEXT_OPS:
                return DataLoss(f"ciphertext under key {name!r} failed its integrity check")
            return InvalidArgument(f"Vault refused {what}: {detail or 'bad request'}")
        if isinstance(exc, hvac.exceptions.RateLimitExceeded):
            return Unavailable(f"Vault at {self.url} is rate limiting: cannot {what} now")
        if isinstance(exc, hvac.exceptions.VaultNotInitialized):
            return Unavailable(f"Vault at {self.url} is not initialized")
        return Unavailable(f"unexpected answer from Vault at {self.url} to {what} ({type(exc).__name__})")

    def _info(self, name: str, data: dict[str, Any]) -> KeyInfo:
        try:
            key_type = KeyType(data["type"])
        except ValueError:
            raise FailedPrecondition(f"key {name!r} has type {data['type']!r}, which medledger does not use") from None
        self._types[name] = key_type
        latest, floor = int(data["latest_version"]), int(data["min_decryption_version"])
        if key_type is KeyType.HMAC:
            versions = tuple(range(floor, latest + 1))  # Vault lists no "keys" for hmac keys
        else:
            versions = tuple(sorted(int(v) for v in data.get("keys") or {}))
        return KeyInfo(
            name=name,
            type=key_type,
            latest_version=latest,
            min_decryption_version=floor,
            deletion_allowed=bool(data["deletion_allowed"]),
            versions=versions,
        )

    async def _read(self, name: str, op: str = "read") -> dict[str, Any]:
        return await self._call(op, name, lambda t: _data(t.read_key(name=name, mount_point=self.mount_point)))

    async def _type_of(self, name: str) -> KeyType:
        key_type = self._types.get(name)
        if key_type is None:
            key_type = self._info(name, await self._read(name)).type
        return key_type

    async def _after_write(self, name: str, op: str, fn: Callable[[Any], Any]) -> KeyInfo:
        """Vault >= 1.14 answers key writes with the key (200); older ones with 204: read then."""
        data = await self._call(op, name, lambda t: _data(fn(t)))
        if not data.get("type"):
            data = await self._read(name, op)
        return self._info(name, data)

    # -- lifecycle -------------------------------------------------------------------------

    async def ensure_key(self, name: str, key_type: KeyType | str) -> KeyInfo:
        validate_key_name(name)
        wanted = coerce_key_type(key_type)

        def create(t: Any) -> Any:
            if wanted is KeyType.HMAC:
                # hvac's create_key knows neither the "hmac" type nor key_size: the same POST by hand.
                return self._client().adapter.post(
                    url=f"/v1/{self.mount_point}/keys/{name}", json={"type": wanted.value, "key_size": HMAC_KEY_BYTES}
                )
            return t.create_key(name=name, key_type=wanted.value, mount_point=self.mount_point)

        info = await self._after_write(name, "create", create)
        if info.type is not wanted:
            raise AlreadyExists(f"key {name!r} exists with type {info.type.value}, not {wanted.value}")
        return info

    async def key_info(self, name: str) -> KeyInfo:
        validate_key_name(name)
        return self._info(name, await self._read(name))

    async def public_key(self, name: str) -> PublicKeySet:
        validate_key_name(name)
        data = await self._read(name, "read public key")
        info = self._info(name, data)
        if not info.type.is_signing:
            raise FailedPrecondition(f"key {name!r} is of type {info.type.value}, which does not support signing")
        versions: dict[int, PublicKey] = {}
        try:
            for version, entry in (data.get("keys") or {}).items():
                n = int(version)
                if n < info.min_decryption_version:
                    continue
                text = entry["public_key"]
                if info.type is KeyType.ED25519:
                    loaded: Any = ed25519.Ed25519PublicKey.from_public_bytes(_unb64(text))
                else:
                    loaded = serialization.load_pem_public_key(str(text).encode("ascii"))
                pem = loaded.public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                ).decode("ascii")
                versions[n] = PublicKey(
                    version=n, type=info.type, pem=pem, created_at=_parse_time(entry.get("creation_time"))
                )
            current = versions[info.latest_version]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise Unavailable(f"unexpected public key in Vault's answer for key {name!r}") from None
        return PublicKeySet(name=name, type=info.type, current=current, versions=dict(sorted(versions.items())))

    async def rotate(self, name: str) -> KeyInfo:
        validate_key_name(name)
        return await self._after_write(name, "rotate", lambda t: t.rotate_key(name=name, mount_point=self.mount_point))

    async def set_min_decryption_version(self, name: str, version: int) -> KeyInfo:
        validate_key_name(name)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidArgument.field("min_decryption_version", "must be an integer of at least 1")
        return await self._after_write(
            name,
            "set min decryption version",
            lambda t: t.update_key_configuration(
                name=name, min_decryption_version=version, mount_point=self.mount_point
            ),
        )

    async def allow_deletion(self, name: str) -> KeyInfo:
        validate_key_name(name)
        return await self._after_write(
            name,
            "allow deletion",
            lambda t: t.update_key_configuration(name=name, deletion_allowed=True, mount_point=self.mount_point),
        )

    async def delete_key(self, name: str) -> None:
        validate_key_name(name)
        await self._call("delete", name, lambda t: t.delete_key(name=name, mount_point=self.mount_point))
        self._types.pop(name, None)

    # -- encryption ------------------------------------------------------------------------

    async def encrypt(self, name: str, plaintext: bytes, *, associated_data: bytes | None = None) -> str:
        validate_key_name(name)
        ad = _b64(associated_data) if associated_data else None

        def run(t: Any) -> str:
            # Read first: transit's encrypt would create a missing key (upsert).
            info = self._info(name, _data(t.read_key(name=name, mount_point=self.mount_point)))
            if not info.type.is_encryption:
                raise FailedPrecondition(
                    f"key {name!r} is of type {info.type.value}, which does not support encryption"
                )
            data = _data(
                t.encrypt_data(
                    name=name, plaintext=_b64(bytes(plaintext)), associated_data=ad, mount_point=self.mount_point
                )
            )
            return str(data["ciphertext"])

        return await self._call("encrypt", name, run)

    async def decrypt(self, name: str, ciphertext: str, *, associated_data: bytes | None = None) -> bytes:
        return await self._decrypt("decrypt", name, ciphertext, associated_data)

    async def _decrypt(self, op: str, name: str, ciphertext: str, associated_data: bytes | None) -> bytes:
        validate_key_name(name)
        parse_versioned(ciphertext)
        ad = _b64(associated_data) if associated_data else None
        data = await self._call(
            op,
            name,
            lambda t: _data(
                t.decrypt_data(name=name, ciphertext=ciphertext, associated_data=ad, mount_point=self.mount_point)
            ),
        )
        try:
            return _unb64(data.get("plaintext") or "")
        except (ValueError, TypeError):
            raise Unavailable(f"unexpected answer from Vault at {self.url} to {op} on key {name!r}") from None

    async def decrypt_data_key(self, name: str, wrapped: str) -> bytes:
        plaintext = await self._decrypt("decrypt data key", name, wrapped, None)
        if len(plaintext) != DATA_KEY_BYTES:
            raise DataLoss(f"wrapped data key under {name!r} does not hold a {DATA_KEY_BYTES}-byte key")
        return plaintext

    async def rewrap(self, name: str, ciphertext: str) -> str:
        validate_key_name(name)
        parse_versioned(ciphertext)
        data = await self._call(
            "rewrap",
            name,
            lambda t: _data(t.rewrap_data(name=name, ciphertext=ciphertext, mount_point=self.mount_point)),
        )
        return str(data["ciphertext"])

    async def generate_data_key(self, name: str) -> DataKey:
        validate_key_name(name)
        cached = self._types.get(name)
        if cached is not None and not cached.is_encryption:
            raise FailedPrecondition(f"key {name!r} is of type {cached.value}, which does not support encryption")
        try:
            data = await self._call(
                "generate data key",
                name,
                lambda t: _data(
                    t.generate_data_key(name=name, key_type="plaintext", bits=256, mount_point=self.mount_point)
                ),
            )
        except InvalidArgument:
            # Whatever Vault's wording, a data key under a signing key is the caller's precondition.
            key_type = await self._type_of(name)
            if not key_type.is_encryption:
                raise FailedPrecondition(
                    f"key {name!r} is of type {key_type.value}, which does not support encryption"
                ) from None
            raise
        try:
            plaintext = _unb64(data["plaintext"])
            wrapped = str(data["ciphertext"])
        except (ValueError, KeyError, TypeError):
            raise Unavailable(f"unexpected answer from Vault at {self.url} to generate data key") from None
        if len(plaintext) != DATA_KEY_BYTES:
            raise Unavailable(f"Vault returned a data key of the wrong length for key {name!r}")
        return DataKey(plaintext=plaintext, wrapped=wrapped)

    # -- keyed hashes ----------------------------------------------------------------------

    async def hmac(self, name: str, data: bytes, *, key_version: int | None = None) -> str:
        validate_key_name(name)
        check_key_version(key_version)
        # No read first: transit's hmac never creates a key, and answers 400 "encryption key not
        # found" for a missing one (NotFound). Other refusals are mapped in _map_error.
        return await self._call(
            "hmac",
            name,
            lambda t: str(
                _data(
                    t.generate_hmac(
                        name=name,
                        hash_input=_b64(bytes(data)),
                        key_version=key_version,
                        algorithm="sha2-256",
                        mount_point=self.mount_point,
                    )
                )["hmac"]
            ),
        )

    # -- signing ---------------------------------------------------------------------------

    def _sign_params(self, key_type: KeyType, marshaling: Marshaling) -> dict[str, Any]:
        params: dict[str, Any] = {"marshaling_algorithm": marshaling, "mount_point": self.mount_point}
        if key_type is KeyType.ECDSA_P256:
            params.update(hash_algorithm="sha2-256", prehashed=False)
        return params

    async def sign(self, name: str, data: bytes, *, marshaling: Marshaling = "asn1") -> Signature:
        validate_key_name(name)
        marshaling = check_marshaling(marshaling)
        key_type = await self._type_of(name)
        if not key_type.is_signing:
            raise FailedPrecondition(f"key {name!r} is of type {key_type.value}, which does not support signing")
        params = self._sign_params(key_type, marshaling)
        answer = await self._call(
            "sign", name, lambda t: _data(t.sign_data(name=name, hash_input=_b64(bytes(data)), **params))
        )
        value = str(answer["signature"])
        return Signature.parse(value, key_type, marshaling)

    async def verify(
        self, name: str, data: bytes, signature: Signature | str, *, marshaling: Marshaling | None = None
    ) -> bool:
        validate_key_name(name)
        value, marshal = coerce_marshaling(signature, marshaling)
        key_type = await self._type_of(name)
        if not key_type.is_signing:
            raise FailedPrecondition(f"key {name!r} is of type {key_type.value}, which does not support signing")
        params = self._sign_params(key_type, marshal)

        def run(t: Any) -> bool:
            try:
                answer = _data(t.verify_signed_data(name=name, hash_input=_b64(bytes(data)), signature=value, **params))
            except hvac.exceptions.InvalidRequest as exc:
                low = " ".join(str(e) for e in (exc.errors or [])).lower()
                if any(
                    m in low
                    for m in ("not found", "no existing key", "too old", "disallowed by policy", "does not support")
                ):
                    raise
                return False  # a malformed signature (no prefix, bad base64, not DER...) is not valid
            return answer.get("valid") is True

        return await self._call("verify", name, run)

    # -- operations ------------------------------------------------------------------------

    async def check(self) -> None:
        """Unavailable when Vault cannot be reached or is sealed."""
        status = await self._call("read seal status", None, lambda t: self._client().sys.read_seal_status())
        if not isinstance(status, dict) or status.get("sealed") is not False:
            raise Unavailable(f"Vault at {self.url} is sealed")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            with contextlib.suppress(Exception):  # best effort on shutdown
                client.adapter.close()
