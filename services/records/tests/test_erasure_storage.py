"""Records' erasure tables on PostgreSQL and SQLite: migration 3 upgrades a database that an
earlier release left at migration 2 (its erasures keep their state and read as not yet asked),
and a participant's first confirmation is the one kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import insert

from medledger_devstack.testing import Postgres
from medledger_records import erasure_storage, storage
from medledger_runtime.db import Database

RUNNING = 2


@pytest.fixture(params=["postgresql", "sqlite"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/records.db"
    postgres: Postgres = request.getfixturevalue("postgres")
    return postgres.new_database("records")


async def test_migration_3_upgrades_erasures_of_an_earlier_release(database_url: str) -> None:
    db = Database(database_url)
    try:
        assert await db.migrate("records", storage.MIGRATIONS[:2])
        async with db.transaction() as conn:
            # A running erasure as the earlier release wrote it (no participants column yet).
            await conn.execute(
                insert(storage._erasures_v2).values(
                    erasure_id="era_old",
                    patient_id="pat_1",
                    state=RUNNING,
                    requested_by="pat_1",
                    requested_at=1.0,
                    reason="",
                    runs_after=2.0,
                    approved_by="prn_po",
                    key_versions="1,2",
                )
            )
        # Up to migration 3, the step under test (later steps add tables of their own).
        assert await db.migrate("records", storage.MIGRATIONS[:3]) == [
            "records 3 erasure participants, their confirmations and signed certificates"
        ]
        async with db.transaction() as conn:
            old = await erasure_storage.get_erasure(conn, "era_old")
            assert old is not None
            assert (old.state, old.key_versions, old.approved_by) == (RUNNING, (1, 2), "prn_po")
            # Not asked yet: the runner asks the participants of the deployment when it takes it up.
            assert (old.participants, old.records_erased, old.signed_certificate) == ((), None, None)
            assert await erasure_storage.set_erasure_state(
                conn, "era_old", RUNNING, participants=("identity", "records")
            )
            assert await erasure_storage.add_confirmation(conn, "era_old", "identity", b"first", 3.0)
            assert not await erasure_storage.add_confirmation(conn, "era_old", "identity", b"second", 4.0)
        async with db.connect() as conn:
            row = await erasure_storage.get_erasure(conn, "era_old")
            assert row is not None and row.participants == ("identity", "records")
            assert await erasure_storage.confirmations_of(conn, "era_old") == {"identity": (b"first", 3.0)}
    finally:
        await db.close()
