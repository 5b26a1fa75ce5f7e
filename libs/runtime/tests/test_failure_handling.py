"""Failures classified once, on the real PostgreSQL and broker: a constraint violation is not an
outage (the event is dead-lettered after its attempts and its partition moves on), a
serialization failure is (retried until it passes, whatever the attempts), and consumers and the
outbox relay resume on their own after the broker was gone for 30 s or the database restarted."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import sqlalchemy
from medledger.events.v1 import identity_events_pb2
from prometheus_client import REGISTRY
from sqlalchemy import Column, MetaData, String, Table

from medledger_devstack import localstack
from medledger_devstack.testing import Kafka, Postgres, consuming, read_topic
from medledger_runtime import events
from medledger_runtime.db import Database
from medledger_runtime.errors import dependency_outage, outage_dependency
from medledger_runtime.kafka import ConsumedMessage, ensure_topics, make_producer
from medledger_runtime.kafka_consumer import EventConsumer
from medledger_runtime.outbox import COMMON_MIGRATIONS, enqueue
from medledger_runtime.outbox_relay import OutboxRelay
from medledger_runtime.retry import Backoff, supervised

QUICK = Backoff(first_seconds=0.01, max_seconds=0.2)
_meta = MetaData()
# A table with a unique column: what a handler's insert of an already-taken value violates.
names = Table("handled_names", _meta, Column("name", String, primary_key=True))


def _event(subject: str) -> events.Event:
    return events.new_event(
        source="medledger.test",
        payload=identity_events_pb2.PrincipalRegistered(principal_id=f"pat_{uuid.uuid4().hex[:6]}"),
        aggregate_id="a",
        version=1,
        subject=subject,
    )


async def _database(url: str) -> Database:
    db = Database(url)
    await db.migrate("common", COMMON_MIGRATIONS)
    async with db.transaction() as conn:
        await conn.run_sync(_meta.create_all)
    return db


async def _raise_sqlstate(db: Database, sqlstate: str) -> None:
    """Have PostgreSQL itself fail a statement with `sqlstate`, as it does for a serialization
    failure or a deadlock, wrapped by SQLAlchemy as every statement's error is."""
    async with db.transaction() as conn:
        await conn.execute(
            sqlalchemy.text(f"DO $$ BEGIN RAISE EXCEPTION 'for the test' USING ERRCODE = '{sqlstate}'; END $$")
        )


async def _eventually(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {within:.0f} s: {what}")
        await asyncio.sleep(0.1)


async def test_postgresql_errors_are_outages_by_sqlstate_not_by_class(postgres: Postgres) -> None:
    db = await _database(postgres.new_database())
    try:
        async with db.transaction() as conn:
            await conn.execute(names.insert().values(name="taken"))
        with pytest.raises(sqlalchemy.exc.IntegrityError) as unique:
            async with db.transaction() as conn:
                await conn.execute(names.insert().values(name="taken"))
        assert outage_dependency(unique.value) is None
        for sqlstate, outage in (("40001", True), ("40P01", True), ("57P01", True), ("23505", False), ("42P01", False)):
            with pytest.raises(sqlalchemy.exc.DBAPIError) as raised:
                await _raise_sqlstate(db, sqlstate)
            assert (outage_dependency(raised.value) == "database") is outage, sqlstate
        assert dependency_outage(raised.value) is None
    finally:
        await db.close()


async def test_an_event_whose_handler_violates_a_constraint_is_dead_lettered_and_its_partition_moves_on(
    kafka: Kafka, postgres: Postgres
) -> None:
    topic = f"test.unique.{uuid.uuid4().hex[:8]}"
    group = f"g-{uuid.uuid4().hex[:6]}"
    await ensure_topics(kafka.bootstrap_servers, [topic], partitions=1)
    db = await _database(postgres.new_database())
    attempts: dict[str, int] = {}

    async def handler(message: ConsumedMessage) -> None:
        assert message.event is not None
        attempts[message.event.id] = attempts.get(message.event.id, 0) + 1
        async with db.transaction() as conn:
            await conn.execute(names.insert().values(name=message.event.subject))

    producer = make_producer(kafka.bootstrap_servers)
    await producer.start()
    consumer = EventConsumer(
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=group,
        handler=handler,
        producer=producer,
        topics=[topic],
        max_attempts=4,
        backoff=QUICK,
    )
    first, clash, after = _event("alice"), _event("alice"), _event("bob")
    before = REGISTRY.get_sample_value(
        "medledger_kafka_dead_letters_total", {"group": group, "topic": topic, "error": "IntegrityError"}
    )
    async with consuming(consumer, producer):
        for e in (first, clash, after):
            await producer.send_and_wait(topic, e.SerializeToString())
        dead = await read_topic(kafka.bootstrap_servers, events.dlq_topic(topic), 1, within=20)
        await _eventually(lambda: after.id in attempts, 20, "the message after the dead letter handled")
    try:
        assert [events.decode(r.value).id for r in dead] == [clash.id]
        reason = dict(dead[0].headers)["dlq.error"].decode()
        assert reason == "IntegrityError (SQLSTATE 23505) after 4 attempts"
        assert "alice" not in reason  # the violation's detail names the value: never copied
        assert attempts == {first.id: 1, clash.id: 4, after.id: 1}
        async with db.connect() as conn:
            stored = {row.name for row in (await conn.execute(sqlalchemy.select(names))).all()}
        assert stored == {"alice", "bob"}
        after_count = REGISTRY.get_sample_value(
            "medledger_kafka_dead_letters_total", {"group": group, "topic": topic, "error": "IntegrityError"}
        )
        assert (after_count or 0) - (before or 0) == 1
    finally:
        await db.close()


async def test_a_serialization_failure_is_retried_until_it_passes_whatever_the_attempts(
    kafka: Kafka, postgres: Postgres
) -> None:
    topic = f"test.serial.{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka.bootstrap_servers, [topic], partitions=1)
    db = await _database(postgres.new_database())
    calls = 0
    handled = asyncio.Event()

    async def handler(message: ConsumedMessage) -> None:
        nonlocal calls
        calls += 1
        if calls <= 5:  # more failures than max_attempts allows for errors that are not outages
            await _raise_sqlstate(db, "40001")
        handled.set()

    producer = make_producer(kafka.bootstrap_servers)
    await producer.start()
    consumer = EventConsumer(
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=f"g-{uuid.uuid4().hex[:6]}",
        handler=handler,
        producer=producer,
        topics=[topic],
        max_attempts=2,
        backoff=QUICK,
    )
    try:
        async with consuming(consumer, producer):
            await producer.send_and_wait(topic, _event("x").SerializeToString())
            await asyncio.wait_for(handled.wait(), 20)
            assert calls == 6
            assert await read_topic(kafka.bootstrap_servers, events.dlq_topic(topic), 1, within=2) == []
    finally:
        await db.close()


async def _relay_and_consumer(
    bootstrap: str, db: Database, topic: str, handler: Callable[[ConsumedMessage], Awaitable[None]]
) -> tuple[list[asyncio.Task[None]], Callable[[], Awaitable[None]]]:
    """An outbox relay and a consumer of `topic`, each run as the service runtime runs them
    (supervised tasks); returns the tasks and what stops them."""
    producer = make_producer(bootstrap)
    await producer.start()
    relay = OutboxRelay(db, producer, service="failures", poll_seconds=0.2)
    consumer = EventConsumer(
        bootstrap_servers=bootstrap,
        group_id=f"g-{uuid.uuid4().hex[:6]}",
        handler=handler,
        producer=producer,
        topics=[topic],
        backoff=QUICK,
    )
    await consumer.start()
    tasks = [
        asyncio.create_task(supervised("outbox-relay", relay.run)),
        asyncio.create_task(supervised("consumer", consumer.run)),
    ]

    async def stop() -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await consumer.stop()
        await producer.stop()

    return tasks, stop


async def _enqueue(db: Database, topic: str, batch: list[events.Event]) -> None:
    async with db.transaction() as conn:
        for e in batch:
            await enqueue(conn, topic, e)


async def test_the_relay_and_consumers_resume_after_the_broker_was_gone_for_30_seconds(
    postgres: Postgres, tmp_path: Path
) -> None:
    """The broker frozen (SIGSTOP: its connections hang, nothing answers, nothing is lost) for
    30 s while writes go on; afterwards every event reaches the consumer, with no restart."""
    port = localstack.free_port()
    broker = localstack.start_tansu(port, tmp_path / "tansu.log")
    bootstrap = f"{localstack.HOST}:{port}"
    topic = f"test.gone.{uuid.uuid4().hex[:8]}"
    db = await _database(postgres.new_database())
    seen: set[str] = set()

    async def handler(message: ConsumedMessage) -> None:
        assert message.event is not None
        seen.add(message.event.id)

    stop = None
    try:
        await ensure_topics(bootstrap, [topic], partitions=1)
        tasks, stop = await _relay_and_consumer(bootstrap, db, topic, handler)
        before = [_event("before") for _ in range(5)]
        await _enqueue(db, topic, before)
        await _eventually(lambda: {e.id for e in before} <= seen, 30, "events before the outage consumed")
        broker.signal(signal.SIGSTOP)
        during = [_event("during") for _ in range(5)]
        try:
            for e in during:  # accepted writes, while the broker is away
                await _enqueue(db, topic, [e])
                await asyncio.sleep(1)
            await asyncio.sleep(25)
        finally:
            broker.signal(signal.SIGCONT)
        await _eventually(lambda: {e.id for e in during} <= seen, 120, "events written during the outage consumed")
        assert not any(t.done() for t in tasks), "a task ended: it should have waited the outage out"
    finally:
        if stop is not None:
            await stop()
        await db.close()
        broker.stop()


async def test_the_relay_and_consumers_resume_after_the_database_restarted(kafka: Kafka, tmp_path: Path) -> None:
    """PostgreSQL stopped while events arrive whose handlers write to it, and while the relay
    has rows to publish; once it is back every event is handled once and none dead-lettered."""
    cluster = localstack.PostgresCluster(tmp_path / "pg", localstack.free_port())
    cluster.init()
    cluster.start()
    topic = f"test.restart.{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka.bootstrap_servers, [topic], partitions=1)
    db = await _database(cluster.create_database("restart"))

    async def handler(message: ConsumedMessage) -> None:
        assert message.event is not None
        async with db.transaction() as conn:
            await conn.execute(names.insert().values(name=message.event.id))

    stop = None
    try:
        tasks, stop = await _relay_and_consumer(kafka.bootstrap_servers, db, topic, handler)
        before = [_event("before") for _ in range(3)]
        await _enqueue(db, topic, before)

        async def stored() -> set[str]:
            async with db.connect() as conn:
                return {row.name for row in (await conn.execute(sqlalchemy.select(names))).all()}

        deadline = asyncio.get_running_loop().time() + 30
        while not {e.id for e in before} <= await stored():
            assert asyncio.get_running_loop().time() < deadline, "events before the restart not handled"
            await asyncio.sleep(0.1)
        await asyncio.to_thread(cluster.stop, "fast")
        producer = make_producer(kafka.bootstrap_servers)
        await producer.start()
        during = [_event("during") for _ in range(3)]
        try:
            for e in during:  # events whose handlers meet the database away
                await producer.send_and_wait(topic, e.SerializeToString())
        finally:
            await producer.stop()
        await asyncio.sleep(5)
        await asyncio.to_thread(cluster.start)
        after = [_event("after") for _ in range(3)]
        await _enqueue(db, topic, after)  # the relay publishes again too
        wanted = {e.id for e in (*before, *during, *after)}
        deadline = asyncio.get_running_loop().time() + 60
        while (got := await stored()) != wanted:
            assert got <= wanted
            assert asyncio.get_running_loop().time() < deadline, f"missing {len(wanted - got)} after the restart"
            await asyncio.sleep(0.2)
        assert not any(t.done() for t in tasks), "a task ended: it should have waited the restart out"
        assert await read_topic(kafka.bootstrap_servers, events.dlq_topic(topic), 1, within=2) == []
    finally:
        if stop is not None:
            await stop()
        await db.close()
        cluster.stop("immediate")
