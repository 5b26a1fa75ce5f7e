"""Consent's use cases without gRPC, wired as main wires them: on SQLite with consent's
migrations, the outbox, the decision log's group commit (running) and a real local keyring."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.protobuf import message as pb_message
from medledger.events.v1 import consent_events_pb2 as ev
from medledger.events.v1 import notification_events_pb2 as notes
from medledger.types.v1 import vocabulary_pb2 as v
from sqlalchemy import func, select

from medledger_consent import storage
from medledger_consent.break_glass import BreakGlassDesk
from medledger_consent.checks import ConsentChecks
from medledger_consent.consents import ConsentDesk
from medledger_consent.domain import ConsentIndex
from medledger_runtime.db import Database
from medledger_runtime.events import TOPICS, decode, unpack
from medledger_runtime.keys import LocalKeyring, create_master_key_file
from medledger_runtime.outbox import COMMON_MIGRATIONS, idempotency_keys, outbox

Kind = v.PrincipalKind
_EVENTS: tuple[type[pb_message.Message], ...] = (
    ev.ConsentVersionRecorded,
    ev.ConsentDecisionRecorded,
    ev.GuardianshipChanged,
    ev.BreakGlassPolicyChanged,
    ev.BreakGlassAccessStarted,
    ev.BreakGlassAccessReviewed,
    notes.NotificationRequested,
)


@dataclass
class World:
    db: Database
    index: ConsentIndex
    consents: ConsentDesk
    checks: ConsentChecks
    break_glass: BreakGlassDesk
    notified: list[int] = field(default_factory=list)

    async def register(self, principal_id: str, kind: int, organization_id: str = "") -> None:
        """As the identity events would: the principal joins consent's directory."""
        active = v.PrincipalStatus.PRINCIPAL_STATUS_ACTIVE
        async with self.db.transaction() as conn:
            await storage.upsert_principal(
                conn, storage.KnownPrincipal(principal_id, kind, active, organization_id, version=1)
            )

    async def events(self) -> list[tuple[str, str, pb_message.Message]]:
        """(topic, type name, payload) of every event in the outbox, in order."""
        async with self.db.connect() as conn:
            rows = (await conn.execute(select(outbox.c.topic, outbox.c.value).order_by(outbox.c.id))).all()
        out = []
        for topic, raw in rows:
            event = decode(raw)
            cls = next(c for c in _EVENTS if event.type == c.DESCRIPTOR.full_name)
            out.append((topic, cls.DESCRIPTOR.name, unpack(event, cls)))
        return out

    async def count(self, table: object) -> int:
        async with self.db.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())  # type: ignore[arg-type]

    async def state(self) -> tuple[int, ...]:
        """How many rows each of consent's tables and the outbox hold: what a write changes."""
        tables = (
            storage.consent_versions,
            storage.consent_decisions,
            storage.guardianships,
            storage.break_glass_policies,
            storage.break_glass_accesses,
            outbox,
            idempotency_keys,
        )
        return tuple([await self.count(t) for t in tables])


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/consent.db")
    await db.migrate("common", COMMON_MIGRATIONS)
    await db.migrate("consent", storage.MIGRATIONS)
    master = create_master_key_file(tmp_path / "secrets" / "master.key")
    keys = await LocalKeyring.open(tmp_path / "keys" / "consent.keyring", master)
    index = ConsentIndex()
    decisions = storage.DecisionLog(db, TOPICS["consent.decisions"])
    writer = asyncio.create_task(decisions.run())
    notified: list[int] = []

    def notify() -> None:
        notified.append(1)

    world = World(
        db,
        index,
        ConsentDesk(db, index, notify),
        ConsentChecks(db, index, decisions),
        BreakGlassDesk(db, keys, index, notify, legacy_keys=lambda: keys),
        notified,
    )
    try:
        yield world
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await decisions.close()
        await keys.aclose()
        await db.close()
