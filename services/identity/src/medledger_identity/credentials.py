"""Client secrets, kept as Argon2id hashes.

Parameters: RFC 9106's second recommended option scaled to a service's memory budget and
OWASP's minimum for Argon2id: 19 MiB of memory, 2 passes, 1 lane, 16-byte salt, 32-byte hash.
Hashing runs in threads (argon2-cffi releases the GIL) and at most `max_concurrent` at once,
so that a burst of token requests cannot take every core and all memory.
"""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

TIME_COST = 2
MEMORY_COST_KIB = 19 * 1024
PARALLELISM = 1


class SecretHasher:
    def __init__(self, max_concurrent: int = 2) -> None:
        self._hasher = PasswordHasher(
            time_cost=TIME_COST,
            memory_cost=MEMORY_COST_KIB,
            parallelism=PARALLELISM,
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )
        self._slots = asyncio.Semaphore(max_concurrent)

    async def hash(self, secret: str) -> str:
        async with self._slots:
            return await asyncio.to_thread(self._hasher.hash, secret)

    async def verify(self, stored_hash: str, secret: str) -> bool:
        """True when `secret` matches; False for a mismatch or an unreadable hash."""
        async with self._slots:
            try:
                return await asyncio.to_thread(self._hasher.verify, stored_hash, secret)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

    def needs_rehash(self, stored_hash: str) -> bool:
        """After the parameters above change, hashes are upgraded at the next good login."""
        return self._hasher.check_needs_rehash(stored_hash)
