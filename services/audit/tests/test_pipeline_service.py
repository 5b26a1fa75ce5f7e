"""The audit service as its main wires it, on a real Tansu broker and PostgreSQL: events from the
service topics become entries, a redelivered event adds nothing, a malformed message becomes an
`unprocessable` entry and raises the alert metric, and checkpoints are signed after growth only
(never for the log's own checkpoint events)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from medledger.events.v1 import audit_events_pb2, consent_events_pb2, identity_events_pb2, records_events_pb2
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from medledger_audit import main as audit_main
from medledger_audit import storage, tile_store
from medledger_audit.config import AuditSettings
from medledger_devstack import localstack
from medledger_devstack.testing import Kafka, Postgres, running_service
from medledger_runtime.events import TOPICS, Event, new_event
from medledger_runtime.kafka import make_producer
from medledger_runtime.keys import create_master_key_file
from medledger_runtime.parts import AuthSources, ServiceParts
from medledger_runtime.service import ServiceRuntime
from medledger_verifier import notes, tlog

ORIGIN = "service-test.medledger.local/audit"


@pytest.fixture
def own_kafka(tmp_path: Path) -> Iterator[Kafka]:
    """A broker of this test's own: the log subscribes to every service topic by pattern, and its
    consumer group has a fixed name."""
    port = localstack.free_port()
    broker = localstack.start_tansu(port, tmp_path / "tansu.log")
    try:
        yield Kafka(f"{localstack.HOST}:{port}", broker)
    finally:
        broker.stop()


def build_without_identity(runtime: ServiceRuntime[audit_main.AuditParts]) -> ServiceParts[audit_main.AuditParts]:
    """main.build, authenticating against nobody: these tests call no RPC."""

    async def no_keys() -> Mapping[str, Any]:
        return {"keys": []}

    async def nobody() -> list[str]:
        return []

    return dataclasses.replace(audit_main.build(runtime), auth=AuthSources(fetch_jwks=no_keys, load_deactivated=nobody))


@pytest.fixture
async def audit(
    own_kafka: Kafka, postgres: Postgres, tmp_path: Path
) -> AsyncIterator[ServiceRuntime[audit_main.AuditParts]]:
    settings = AuditSettings(
        grpc_port=0,
        metrics_port=0,
        database_url=postgres.new_database("audit"),
        kafka_bootstrap_servers=own_kafka.bootstrap_servers,
        outbox_poll_seconds=0.1,
        master_key_file=create_master_key_file(tmp_path / "master.key"),
        keyring_file=tmp_path / "keyrings" / "audit.keyring",
        log_origin=ORIGIN,
        last_checkpoint_file=tmp_path / "audit" / "last-checkpoint",
        checkpoint_interval_seconds=0.3,
        http_port=0,
    )
    async with running_service("audit", settings, storage.MIGRATIONS, build_without_identity) as runtime:
        yield runtime


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.05)


async def entry_count(runtime: ServiceRuntime) -> int:
    async with runtime.db.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(storage.entries)) or 0)


async def checkpoint_count(runtime: ServiceRuntime) -> int:
    async with runtime.db.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(storage.checkpoints)) or 0)


def events() -> list[tuple[str, Event]]:
    out: list[tuple[str, Event]] = []
    for i in range(4):
        out.append(
            (
                TOPICS["identity"],
                new_event(
                    source="medledger.identity",
                    payload=identity_events_pb2.PrincipalRegistered(principal_id=f"prc_{i}"),
                    aggregate_id=f"prc_{i}",
                    version=1,
                ),
            )
        )
        out.append(
            (
                TOPICS["records"],
                new_event(
                    source="medledger.records",
                    payload=records_events_pb2.RecordStored(
                        record_id=f"rec_{i}", version=1, patient_id="pat_1", commitment=f"{i:064x}"
                    ),
                    aggregate_id=f"rec_{i}",
                    version=1,
                ),
            )
        )
        out.append(
            (
                TOPICS["consent.decisions"],
                new_event(
                    source="medledger.consent",
                    payload=consent_events_pb2.ConsentDecisionRecorded(
                        decision_id=f"dec_{i}", patient_id="pat_1", actor_id="prc_1", decision="permit"
                    ),
                    aggregate_id=f"dec_{i}",
                    version=1,
                ),
            )
        )
    return out


async def test_service_topics_become_entries_and_checkpoints(
    audit: ServiceRuntime[audit_main.AuditParts], own_kafka: Kafka
) -> None:
    checkpointer = audit.handle.checkpointer
    consumer = audit.handle.consumer
    # Nothing happens: nothing is signed, over several checkpoint intervals.
    await asyncio.sleep(1.0)
    assert await checkpointer.latest() is None

    unprocessable_before = REGISTRY.get_sample_value("medledger_audit_unprocessable_total") or 0.0
    sent = events()
    producer = make_producer(own_kafka.bootstrap_servers)
    await producer.start()
    try:
        for topic, event in sent:
            await producer.send_and_wait(topic, event.SerializeToString(), key=b"pat_1")
        # At least once: the same event again (a producer's retry), and a message that is no event.
        await producer.send_and_wait(sent[1][0], sent[1][1].SerializeToString(), key=b"pat_1")
        await producer.send_and_wait(TOPICS["records"], b"\x00\x01 not an envelope", key=b"x")
    finally:
        await producer.stop()

    expected = len(sent) + 1  # the duplicate adds nothing; the malformed message is one entry

    async def all_appended() -> bool:
        return await entry_count(audit) >= expected

    await eventually(all_appended, "every event appended")
    async with audit.db.connect() as conn:
        rows = await storage.read_entries(conn, 0, 1000)
    assert len(rows) == expected
    assert {r.event_id for r in rows} >= {e.id for _, e in sent}
    assert sorted(r.type for r in rows) == sorted(
        ["principal.registered"] * 4 + ["record.stored"] * 4 + ["consent.decision"] * 4 + ["unprocessable"]
    )
    assert REGISTRY.get_sample_value("medledger_audit_unprocessable_total") == unprocessable_before + 1
    # The stored tiles give tlog's tree of the same entries.
    memory = tlog.MemoryTiles()
    reference = await tlog.append(memory, 0, [tlog.leaf_hash(bytes(r.entry)) for r in rows])
    assert await tlog.tree_root(tile_store.DatabaseTiles(audit.db), expected) == reference.root

    # A checkpoint of the grown tree, signed with both keys.
    async def signed() -> bool:
        latest = await checkpointer.latest()
        return latest is not None and latest[1] == expected

    await eventually(signed, "a checkpoint of the grown tree")
    note, _ = await checkpointer.latest() or ("", 0)
    verifiers = [notes.NoteVerifier.parse(k) for k in checkpointer.verifier_keys()]
    checkpoint, _ = notes.open_checkpoint(note, verifiers, origin=ORIGIN, require_all=True)
    assert (checkpoint.tree_size, checkpoint.root) == (expected, reference.root)

    # The checkpoint is published on the audit topic for anchoring ...
    reader = AIOKafkaConsumer(
        TOPICS["audit"], bootstrap_servers=own_kafka.bootstrap_servers, auto_offset_reset="earliest"
    )
    await reader.start()
    try:
        record = await asyncio.wait_for(reader.getone(), 60)
    finally:
        await reader.stop()
    payload = audit_events_pb2.CheckpointSigned()
    assert Event.FromString(record.value).data.Unpack(payload)
    assert (payload.tree_size, payload.note) == (expected, note)

    # ... and the log reads it too, without appending it or signing again.
    published = TopicPartition(TOPICS["audit"], record.partition)

    async def consumed_by_the_log() -> bool:
        return published in consumer.consumer.assignment() and await consumer.consumer.position(published) > (
            record.offset
        )

    await eventually(consumed_by_the_log, "the log consumed its own checkpoint event")
    await asyncio.sleep(1.0)  # several checkpoint intervals without growth
    assert await entry_count(audit) == expected
    assert await checkpoint_count(audit) == 1
