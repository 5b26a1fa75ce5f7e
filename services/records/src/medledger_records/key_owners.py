"""Records' part of the key-owner migration (medledger_runtime.key_owners): each version's data
key moves from the old shared key `patient-<id>` to records' own `records-patient-<id>`. Rewrap
cannot cross keys, so the data key is unwrapped under the old name (legacy credential) and
wrapped again by encrypting it under the new one; the version's ciphertext does not change.
Progress is each version's `key_name`, so a crash loses at most the page in flight."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_records import key_storage
from medledger_runtime.db import Database
from medledger_runtime.errors import NotFound
from medledger_runtime.key_owners import KeyOwnerMigration
from medledger_runtime.keys import LEGACY_PATIENT_KEY_PREFIX, KeyManager, KeyType, patient_key_name


def _position(row_id: str) -> tuple[str, int]:
    record_id, _, version = row_id.rpartition("/")
    return record_id, int(version) if version else 0


def data_key_migration(db: Database, keys: KeyManager, legacy: Callable[[], KeyManager]) -> KeyOwnerMigration:
    """``legacy`` gives the key manager that reads the old shared keys (``ServiceRuntime.legacy_keys``)."""

    async def next_page(conn: AsyncConnection, after: str, limit: int) -> list[str]:
        record_id, version = _position(after)
        page = await key_storage.versions_under_old_keys_after(conn, record_id, version, limit)
        return [f"{r}/{v}" for r, v in page]

    async def move(conn: AsyncConnection, old: KeyManager, row_id: str) -> bool:
        record_id, version = _position(row_id)
        found = await key_storage.wrapped_key_for_update(conn, record_id, version)
        if found is None:
            return False
        patient_id, key_name, wrapped = found
        if not key_name.startswith(LEGACY_PATIENT_KEY_PREFIX) or not wrapped:
            return False  # moved or erased meanwhile
        try:
            data_key = await old.decrypt_data_key(key_name, wrapped)
        except NotFound:
            return False  # the old key is gone: an erasure, which also empties the row
        name = patient_key_name("records", patient_id)
        await keys.ensure_key(name, KeyType.AES256_GCM96)
        await key_storage.rewrap_under(conn, record_id, version, name, await keys.encrypt(name, data_key))
        return True

    return KeyOwnerMigration("records", db, legacy, next_page, move)
