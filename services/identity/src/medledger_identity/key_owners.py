"""Identity's part of the key-owner migration (medledger_runtime.key_owners): each patient's FHIR
resource moves from the old shared key `patient-<id>` to identity's own `identity-patient-<id>`,
with the same associated data (the principal id)."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_identity import storage
from medledger_runtime.db import Database
from medledger_runtime.errors import NotFound
from medledger_runtime.key_owners import KeyOwnerMigration, reencrypt
from medledger_runtime.keys import KeyManager


def resource_migration(db: Database, keys: KeyManager, legacy: Callable[[], KeyManager]) -> KeyOwnerMigration:
    """``legacy`` gives the key manager that reads the old shared keys (``ServiceRuntime.legacy_keys``)."""

    async def move(conn: AsyncConnection, old: KeyManager, principal_id: str) -> bool:
        ciphertext = await storage.resource_for_update(conn, principal_id)
        moved: str | None = None
        if ciphertext:
            try:
                moved = await reencrypt(
                    keys, old, "identity", principal_id, ciphertext, associated_data=principal_id.encode()
                )
            except NotFound:
                # The old key is gone: the patient was erased and the resource is unreadable
                # already; what is left of it goes too.
                moved = None
        await storage.move_resource(conn, principal_id, moved)
        return moved is not None

    return KeyOwnerMigration("identity", db, legacy, storage.resources_under_old_keys_after, move)
