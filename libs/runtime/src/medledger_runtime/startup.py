"""What a service opens before it builds its parts: its database's migrations (applied, checked,
or applied alone as a deployment's Job) and its key managers (the everyday one, and the erasure
and legacy credentials' side ones)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from medledger_runtime.db import Database, Migration
from medledger_runtime.keys import KeyManager, LocalKeyring, VaultKeyManager
from medledger_runtime.outbox import COMMON_MIGRATIONS
from medledger_runtime.settings import ConfigError, ServiceSettings

log = logging.getLogger(__name__)


async def apply_migrations(db: Database, name: str, migrations: Sequence[Migration]) -> None:
    """Apply the common migrations, then the service's (each step once, under a lock)."""
    for step in await db.migrate("common", COMMON_MIGRATIONS):
        log.info("migration applied", extra={"migration": step})
    for step in await db.migrate(name, migrations):
        log.info("migration applied", extra={"migration": step})


async def check_migrated(db: Database, name: str, migrations: Sequence[Migration]) -> None:
    """For MEDLEDGER_MIGRATIONS=check: refuse to start while a migration is missing."""
    missing = await db.pending("common", COMMON_MIGRATIONS) + await db.pending(name, migrations)
    if missing:
        raise ConfigError(
            f"MEDLEDGER_MIGRATIONS=check: the database lacks migrations {', '.join(missing)}; "
            f"apply them first (MEDLEDGER_MIGRATIONS=only python -m medledger_{name})"
        )


async def migrate_only(name: str, settings: ServiceSettings, migrations: Sequence[Migration]) -> None:
    """For MEDLEDGER_MIGRATIONS=only: apply the migrations, then stop (a deployment's Job)."""
    db = Database(settings.database_url)
    try:
        await apply_migrations(db, name, migrations)
    finally:
        await db.close()
    log.info("migrations applied, exiting (MEDLEDGER_MIGRATIONS=only)")


async def open_key_manager(settings: ServiceSettings, service: str) -> KeyManager | None:
    """The key manager the settings name; None for a local keyring without a master key."""
    if settings.key_manager == "vault":
        if not settings.vault_addr or settings.vault_token_file is None:
            raise ConfigError("MEDLEDGER_KEY_MANAGER=vault needs MEDLEDGER_VAULT_ADDR and MEDLEDGER_VAULT_TOKEN_FILE")
        return VaultKeyManager(
            settings.vault_addr, token_file=settings.vault_token_file, mount_point=settings.vault_transit_mount
        )
    if settings.master_key_file is None:
        return None
    path = settings.keyring_file or Path(".medledger") / "keyrings" / f"{service}.keyring"
    return await LocalKeyring.open(path, settings.master_key_file)


def open_side_key_manager(
    settings: ServiceSettings, keys: KeyManager, credential: Literal["erasure", "legacy"]
) -> KeyManager:
    """A second key manager with another Vault token: ``erasure`` (MEDLEDGER_ERASURE_VAULT_TOKEN_FILE,
    the only one that may destroy keys) or ``legacy`` (MEDLEDGER_LEGACY_VAULT_TOKEN_FILE, reads
    the old shared patient keys). The local keyring has no per-credential access control, so
    there it is ``keys`` itself."""
    if settings.key_manager != "vault":
        return keys
    token_file = settings.erasure_vault_token_file if credential == "erasure" else settings.legacy_vault_token_file
    if token_file is None:
        variable = f"MEDLEDGER_{credential.upper()}_VAULT_TOKEN_FILE"
        raise ConfigError(f"MEDLEDGER_KEY_MANAGER=vault needs {variable} for the {credential} credential")
    return VaultKeyManager(settings.vault_addr, token_file=token_file, mount_point=settings.vault_transit_mount)
