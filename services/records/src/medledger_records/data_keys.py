"""Data keys for sealing and opening record versions, kept for a while so that a put or a get
does not ask the key manager every time.

Without it, every put asks the key manager twice (the patient key exists; a new data key) and
every get once (unwrap), one network round trip each under Vault. With it, a patient's puts share
one data key until it is `max_age_seconds` old, has sealed `max_uses` versions or `max_bytes` of
plaintext (the limits of the AWS Encryption SDK's data-key caching, for the same reason: bound
what one key protects and how long it lives outside the key manager), and gets reuse what was
unwrapped before, under the same age bound. Each version still has its own nonce and its own
associated data (record id, version, patient), so sharing a data key changes nothing about what
a ciphertext can be opened as. Why this is safe, and what it means for erasure and a sealed
Vault, is in libs/runtime/KEYS.md ("Data-key cache").

The cache forgets a patient's keys on rotation and on erasure (`purge`). Other processes'
caches cannot be told; the erasure certificate's `unrecoverable_after` covers `max_age_seconds`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import Counter

from medledger_runtime.keys import DataKey, KeyInfo, KeyManager, KeyType

_K = TypeVar("_K")
_V = TypeVar("_V")

LOOKUPS = Counter(
    "medledger_records_data_key_cache_lookups_total",
    "Data-key cache lookups, by use (seal: a put; open: a get; hmac: a write's or a search's index key) "
    "and result (hit, miss).",
    ["use", "result"],
)
KEY_MANAGER_CALLS = Counter(
    "medledger_records_key_manager_calls_total",
    "Calls records made to its key manager for record data, by operation.",
    ["operation"],
)


@dataclass(frozen=True)
class CacheLimits:
    """How long and how much one cached data key may be used. `max_age_seconds` 0 turns the
    cache off: every put gets a fresh data key and every get unwraps."""

    max_age_seconds: float = 300.0
    max_uses: int = 10_000
    max_bytes: int = 1 << 30
    max_entries: int = 20_000

    @property
    def enabled(self) -> bool:
        return self.max_age_seconds > 0


@dataclass
class _SealingKey:
    key: DataKey
    created: float
    uses: int = 0
    sealed_bytes: int = 0


class DataKeyCache:
    """What records does with its everyday key-manager credential, with data keys kept within
    `limits`. Every other operation goes straight to the key manager."""

    def __init__(
        self, keys: KeyManager, limits: CacheLimits = CacheLimits(), clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._keys = keys
        self.limits = limits
        self._clock = clock
        self._known: OrderedDict[str, KeyInfo] = OrderedDict()  # patient keys known to exist
        self._sealing: OrderedDict[str, _SealingKey] = OrderedDict()
        self._opened: OrderedDict[tuple[str, str], tuple[bytes, float]] = OrderedDict()
        # The search index's keyed hashes: (key, input, version) → (HMAC, when made).
        self._macs: OrderedDict[tuple[str, bytes, int | None], tuple[str, float]] = OrderedDict()

    # -- cached ---------------------------------------------------------------------------------

    async def ensure_key(self, name: str, key_type: KeyType | str) -> KeyInfo:
        info = self._known.get(name) if self.limits.enabled else None
        if info is not None:
            self._known.move_to_end(name)
            return info
        KEY_MANAGER_CALLS.labels("ensure_key").inc()
        info = await self._keys.ensure_key(name, key_type)
        if self.limits.enabled:
            self._remember(self._known, name, info)
        return info

    async def data_key_for(self, name: str, plaintext_bytes: int) -> DataKey:
        """A data key to seal `plaintext_bytes` under patient key `name`: the cached one while
        within the limits, else a fresh one from the key manager."""
        now = self._clock()
        entry = self._sealing.get(name)
        if entry is not None and self._usable(entry, now, plaintext_bytes):
            entry.uses += 1
            entry.sealed_bytes += plaintext_bytes
            LOOKUPS.labels("seal", "hit").inc()
            return entry.key
        LOOKUPS.labels("seal", "miss").inc()
        KEY_MANAGER_CALLS.labels("generate_data_key").inc()
        key = await self._keys.generate_data_key(name)
        if self.limits.enabled:
            self._remember(self._sealing, name, _SealingKey(key, now, 1, plaintext_bytes))
            self._remember(self._opened, (name, key.wrapped), (key.plaintext, now))
        return key

    async def decrypt_data_key(self, name: str, wrapped: str) -> bytes:
        now = self._clock()
        found = self._opened.get((name, wrapped))
        if found is not None and now - found[1] < self.limits.max_age_seconds:
            self._opened.move_to_end((name, wrapped))
            LOOKUPS.labels("open", "hit").inc()
            return found[0]
        LOOKUPS.labels("open", "miss").inc()
        KEY_MANAGER_CALLS.labels("decrypt_data_key").inc()
        plaintext = await self._keys.decrypt_data_key(name, wrapped)
        if self.limits.enabled:
            self._remember(self._opened, (name, wrapped), (plaintext, now))
        return plaintext

    def purge(self, name: str) -> None:
        """Forget every data key under patient key `name` (rotation, erasure)."""
        self._known.pop(name, None)
        self._sealing.pop(name, None)
        for cached in [k for k in self._opened if k[0] == name]:
            del self._opened[cached]
        for mac in [k for k in self._macs if k[0] == name]:
            del self._macs[mac]

    # -- straight through, forgetting what they make stale ----------------------------------------

    async def rotate(self, name: str) -> KeyInfo:
        self.purge(name)
        KEY_MANAGER_CALLS.labels("rotate").inc()
        info = await self._keys.rotate(name)
        self.purge(name)  # a put between the two may have cached a key of the old version
        return info

    async def hmac(self, name: str, data: bytes, *, key_version: int | None = None) -> str:
        """The search index's keyed hash (search.py: the patient's index key, one per write or
        search), kept as a data key is: within the age limit, a patient whose keys are cached
        writes and searches without a key-manager call. Deterministic for a pinned version, so a
        cached value is the value the key manager would give."""
        now = self._clock()
        cached = self._macs.get((name, data, key_version))
        if cached is not None and now - cached[1] < self.limits.max_age_seconds:
            self._macs.move_to_end((name, data, key_version))
            LOOKUPS.labels("hmac", "hit").inc()
            return cached[0]
        LOOKUPS.labels("hmac", "miss").inc()
        KEY_MANAGER_CALLS.labels("hmac").inc()
        mac = await self._keys.hmac(name, data, key_version=key_version)
        if self.limits.enabled and key_version is not None:
            self._remember(self._macs, (name, data, key_version), (mac, now))
        return mac

    async def rewrap(self, name: str, ciphertext: str) -> str:
        KEY_MANAGER_CALLS.labels("rewrap").inc()
        return await self._keys.rewrap(name, ciphertext)

    async def set_min_decryption_version(self, name: str, version: int) -> KeyInfo:
        KEY_MANAGER_CALLS.labels("set_min_decryption_version").inc()
        info = await self._keys.set_min_decryption_version(name, version)
        self.purge(name)  # keys unwrapped from older versions must not outlive the floor
        return info

    # -- helpers --------------------------------------------------------------------------------

    def _usable(self, entry: _SealingKey, now: float, plaintext_bytes: int) -> bool:
        limits = self.limits
        return (
            now - entry.created < limits.max_age_seconds
            and entry.uses < limits.max_uses
            and entry.sealed_bytes + plaintext_bytes <= limits.max_bytes
        )

    def _remember(self, table: OrderedDict[_K, _V], key: _K, value: _V) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.limits.max_entries:
            table.popitem(last=False)
