"""MEDLEDGER_MIGRATIONS: a migration Job applies the schema ("only"); replicas then check it
("check") instead of each applying it."""

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, text

from medledger_runtime.db import Database, Migration, create_tables
from medledger_runtime.outbox import COMMON_MIGRATIONS
from medledger_runtime.settings import ConfigError, ServiceSettings, load_settings
from medledger_runtime.startup import apply_migrations, check_migrated

_meta = MetaData()
Table("widgets", _meta, Column("id", Integer, primary_key=True))
MIGRATIONS = [Migration(1, "widgets", create_tables(_meta))]


def test_the_mode_is_a_validated_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(ServiceSettings).migrations == "start"
    monkeypatch.setenv("MEDLEDGER_MIGRATIONS", "only")
    assert load_settings(ServiceSettings).migrations == "only"
    monkeypatch.setenv("MEDLEDGER_MIGRATIONS", "sometimes")
    with pytest.raises(ConfigError, match="MEDLEDGER_MIGRATIONS"):
        load_settings(ServiceSettings)


async def test_check_refuses_an_unmigrated_database_and_accepts_a_migrated_one(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/svc.db")
    try:
        assert await db.pending("widgets-svc", MIGRATIONS) == ["widgets-svc 1 widgets"]
        with pytest.raises(ConfigError) as err:
            await check_migrated(db, "widgets-svc", MIGRATIONS)
        assert "MEDLEDGER_MIGRATIONS=check" in str(err.value)
        assert "widgets-svc 1 widgets" in str(err.value)
        # Checking changed nothing: still no table.
        async with db.connect() as conn:
            tables = {r[0] for r in await conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'"))}
        assert "widgets" not in tables

        await apply_migrations(db, "widgets-svc", MIGRATIONS)
        assert await db.pending("common", COMMON_MIGRATIONS) == []
        assert await db.pending("widgets-svc", MIGRATIONS) == []
        await check_migrated(db, "widgets-svc", MIGRATIONS)
    finally:
        await db.close()


def test_only_applies_the_migrations_and_exits_without_kafka(tmp_path: Path) -> None:
    """The service's own entry point, as a Kubernetes Job runs it: no broker, no identity."""
    url = f"sqlite+aiosqlite:///{tmp_path}/consent.db"
    env = {
        "PATH": "/usr/bin:/bin",
        "MEDLEDGER_MIGRATIONS": "only",
        "MEDLEDGER_DATABASE_URL": url,
        "MEDLEDGER_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "medledger_consent"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "migrations applied, exiting" in proc.stdout + proc.stderr
    with sqlite3.connect(tmp_path / "consent.db") as conn:
        components = {row[0] for row in conn.execute("SELECT component FROM schema_migrations")}
    assert components == {"common", "consent"}
