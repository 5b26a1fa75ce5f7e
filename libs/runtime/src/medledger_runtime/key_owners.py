"""The key-owner migration: ciphertexts made under the old shared ``patient-<id>`` keys move to
their owner's key (``identity-patient-<id>``, ``consent-patient-<id>``, ``records-patient-<id>``).

Transit cannot move them in place: rewrap stays within one key and takes no associated data. So
each is decrypted under the old name (with the legacy credential, ``ServiceRuntime.legacy_keys``)
and encrypted again under the owner's key, with the same associated data, in the transaction
that stores it. Each service runs it at start as a background job (:class:`KeyOwnerMigration`),
page by page, each page one transaction: a crash loses at most the page in flight, which the
next start does again (the old key is never touched, so doing a row twice is harmless). What is
left to move is in the service's own tables, so progress survives restarts; several replicas
share the work (rows are locked with SKIP LOCKED on PostgreSQL).

Until a row has moved, reads find it with :func:`decrypt_owned`: the owner's key first, then the
old one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_runtime.db import Database
from medledger_runtime.errors import DataLoss, NotFound, PermissionDenied
from medledger_runtime.keys import KeyManager, KeyType, PatientKeyOwner, legacy_patient_key_name, patient_key_name
from medledger_runtime.retry import retry
from medledger_runtime.settings import ConfigError

log = logging.getLogger(__name__)
PAGE = 50


def _legacy_or_none(legacy: Callable[[], KeyManager]) -> KeyManager | None:
    try:
        return legacy()
    except ConfigError:  # Vault without MEDLEDGER_LEGACY_VAULT_TOKEN_FILE
        return None


async def decrypt_owned(
    keys: KeyManager,
    legacy: Callable[[], KeyManager],
    owner: PatientKeyOwner,
    pseudonym: str,
    ciphertext: str,
    *,
    associated_data: bytes | None = None,
) -> bytes:
    """Decrypt a ciphertext of ``owner``'s about a patient: under the owner's key, or, for one
    the migration has not moved yet, under the old shared key. Errors are the owner's key's
    (a tampered ciphertext stays DataLoss, an erased patient's NotFound)."""
    try:
        return await keys.decrypt(patient_key_name(owner, pseudonym), ciphertext, associated_data=associated_data)
    except (NotFound, DataLoss) as first:
        old = _legacy_or_none(legacy)
        if old is None:
            raise
        try:
            return await old.decrypt(legacy_patient_key_name(pseudonym), ciphertext, associated_data=associated_data)
        except (NotFound, DataLoss, PermissionDenied):
            raise first from None


async def reencrypt(
    keys: KeyManager,
    old: KeyManager,
    owner: PatientKeyOwner,
    pseudonym: str,
    ciphertext: str,
    *,
    associated_data: bytes | None = None,
) -> str:
    """The same plaintext, from the old shared key to the owner's (NotFound when the old key is
    gone: the patient was erased, and the ciphertext is unreadable already)."""
    plaintext = await old.decrypt(legacy_patient_key_name(pseudonym), ciphertext, associated_data=associated_data)
    name = patient_key_name(owner, pseudonym)
    await keys.ensure_key(name, KeyType.AES256_GCM96)
    return await keys.encrypt(name, plaintext, associated_data=associated_data)


@dataclass
class KeyOwnerMigration:
    """One service's move. ``next_page(conn, after, limit)`` gives the ids of rows still under
    the old keys after ``after``, in order, locked for this transaction; ``move(conn, old, id)``
    moves one in that transaction and says whether it did (False: left as it was, e.g. it was
    erased meanwhile). Ids are strings ordered as the database orders them."""

    service: str
    db: Database
    legacy: Callable[[], KeyManager]
    next_page: Callable[[AsyncConnection, str, int], Awaitable[Sequence[str]]]
    move: Callable[[AsyncConnection, KeyManager, str], Awaitable[bool]]
    page_size: int = PAGE

    async def run(self) -> None:
        """Move everything left, then end. Unavailable (database, key manager) propagates, so the
        runtime starts the job again after a backoff."""
        after, moved, left = "", 0, 0
        old: KeyManager | None = None
        while True:
            async with self.db.transaction() as conn:
                ids = await self.next_page(conn, after, self.page_size)
                if ids and old is None:
                    old = _legacy_or_none(self.legacy)
                    if old is None:
                        log.error(
                            "key-owner migration waits: ciphertexts under the old shared patient keys "
                            "need MEDLEDGER_LEGACY_VAULT_TOKEN_FILE",
                            extra={"service": self.service},
                        )
                        return
                for row_id in ids:
                    try:
                        done = await self.move(conn, old, row_id)  # type: ignore[arg-type]
                    except DataLoss:
                        done = False  # altered, or not what the list says: left as it is, counted
                    except PermissionDenied:
                        log.error(
                            "key-owner migration stopped: the legacy token may not decrypt the old keys",
                            extra={"service": self.service},
                        )
                        return
                    moved, left = (moved + 1, left) if done else (moved, left + 1)
            if not ids:
                break
            after = ids[-1]
        if moved or left:
            log.info("key-owner migration done", extra={"service": self.service, "moved": moved, "left": left})

    async def keep_running(self, every: float = 3600.0) -> None:
        """The background job: :meth:`run` at start and then every ``every`` seconds (a replica of
        the previous version, during a rolling update, may still write under the old keys), never
        ending, as the runtime expects of a background job. An outage (a key manager sealed, the
        database restarting) is waited out."""
        while True:
            await retry(self.run, f"key-owner migration ({self.service})", only_outages=True)
            await asyncio.sleep(every)
