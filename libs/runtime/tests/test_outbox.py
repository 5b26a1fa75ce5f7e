"""The outbox relay and the consumer on the real broker and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

from medledger.events.v1 import identity_events_pb2
from sqlalchemy import select

from medledger_devstack import localstack
from medledger_devstack.testing import Kafka, Postgres, consuming, read_topic
from medledger_runtime import events
from medledger_runtime.db import Database
from medledger_runtime.kafka import ConsumedMessage, PoisonMessage, ensure_topics, make_producer
from medledger_runtime.kafka_consumer import EventConsumer
from medledger_runtime.outbox import COMMON_MIGRATIONS, enqueue, outbox
from medledger_runtime.outbox_relay import OutboxRelay


def _event(n: int = 0) -> events.Event:
    return events.new_event(
        source="medledger.test",
        payload=identity_events_pb2.PrincipalRegistered(principal_id=f"pat_{n}"),
        aggregate_id=f"pat_{n}",
        version=1,
    )


async def _migrated(url: str) -> Database:
    db = Database(url)
    await db.migrate("common", COMMON_MIGRATIONS)
    return db


async def test_rows_committed_out_of_id_order_are_all_published(kafka: Kafka, postgres: Postgres) -> None:
    topic = f"test.outbox.{uuid.uuid4().hex[:8]}"
    db = await _migrated(postgres.new_database())
    producer = make_producer(kafka.bootstrap_servers)
    await producer.start()
    relay = OutboxRelay(db, producer, service="test")
    try:
        early, late = _event(1), _event(2)
        # T1 takes the lower id but commits after T2, which the relay publishes first.
        async with db.engine.connect() as t1:
            await t1.begin()
            # One key, one partition: the topic's order is the order of publishing.
            await enqueue(t1, topic, early, key=b"pat_1")
            async with db.transaction() as t2:
                await enqueue(t2, topic, late, key=b"pat_1")
            assert await relay.publish_once() == 1
            await t1.commit()
        assert await relay.publish_once() == 1
        assert await relay.publish_once() == 0
        async with db.connect() as conn:
            rows = (await conn.execute(select(outbox.c.id, outbox.c.event_id, outbox.c.published_at))).all()
        assert {r.event_id for r in rows} == {early.id, late.id}
        assert all(r.published_at is not None for r in rows)
        early_id = next(r.id for r in rows if r.event_id == early.id)
        assert early_id < next(r.id for r in rows if r.event_id == late.id)
        got = await read_topic(kafka.bootstrap_servers, topic, 2)
        assert [events.decode(r.value).id for r in got] == [late.id, early.id]
    finally:
        await producer.stop()
        await db.close()


async def test_only_one_relay_publishes_at_a_time(kafka: Kafka, postgres: Postgres) -> None:
    db = await _migrated(postgres.new_database())
    producer = make_producer(kafka.bootstrap_servers)
    await producer.start()
    try:
        async with db.transaction() as conn:
            await enqueue(conn, "test.lock", _event())
        async with db.transaction() as holder:
            assert await db.try_xact_lock(holder, "outbox-relay:test")
            # While another replica's relay holds the lock, this one publishes nothing.
            assert await OutboxRelay(db, producer, service="test").publish_once() == 0
        assert await OutboxRelay(db, producer, service="test").publish_once() == 1
    finally:
        await producer.stop()
        await db.close()


async def test_retained_rows_are_republished_when_the_broker_lost_them(postgres: Postgres, tmp_path) -> None:
    """Tansu keeps messages in memory: restarted, it has lost every acknowledged message, and
    the relay publishes the retained rows again."""
    port = localstack.free_port()
    bootstrap = f"127.0.0.1:{port}"
    broker = localstack.start_tansu(port, tmp_path / "tansu.log")
    topic = f"test.lost.{uuid.uuid4().hex[:8]}"
    db = await _migrated(postgres.new_database())
    producer = make_producer(bootstrap)
    await producer.start()
    relay = OutboxRelay(db, producer, service="test", bootstrap_servers=bootstrap)
    try:
        async with db.transaction() as conn:
            for n in range(3):
                await enqueue(conn, topic, _event(n), key=f"pat_{n}".encode())
        assert await relay.publish_once() == 3
        assert await relay.republish_if_broker_lost_data() == 0

        broker.stop()
        broker = localstack.start_tansu(port, tmp_path / "tansu.log")
        # The new broker knows nothing of the topic until the relay publishes to it again.
        await ensure_topics(bootstrap, [topic])
        assert await relay.republish_if_broker_lost_data() == 3
        assert await relay.publish_once() == 3
        assert len(await read_topic(bootstrap, topic, 3)) == 3
        assert await relay.republish_if_broker_lost_data() == 0
    finally:
        await producer.stop()
        await db.close()
        broker.stop()


async def test_poison_message_goes_to_the_dead_letter_topic_and_the_consumer_goes_on(kafka: Kafka) -> None:
    topic = f"test.poison.{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka.bootstrap_servers, [topic], partitions=1)
    handled: list[str] = []

    async def handler(message: ConsumedMessage) -> None:
        assert message.event is not None
        if message.event.subject == "refuse":
            raise PoisonMessage("handler refused the payload")
        handled.append(message.event.id)

    producer = make_producer(kafka.bootstrap_servers)
    await producer.start()
    consumer = EventConsumer(
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=f"g-{uuid.uuid4().hex[:6]}",
        handler=handler,
        producer=producer,
        topics=[topic],
    )
    async with consuming(consumer, producer):
        good = _event(1)
        refused = events.new_event(
            source="t", payload=identity_events_pb2.PrincipalRegistered(), aggregate_id="a", version=1, subject="refuse"
        )
        await producer.send_and_wait(topic, b"\x00not a protobuf envelope\xff")
        await producer.send_and_wait(topic, refused.SerializeToString())
        await producer.send_and_wait(topic, good.SerializeToString())
        dead = await read_topic(kafka.bootstrap_servers, events.dlq_topic(topic), 2, within=20)
        assert len(dead) == 2
        errors = [dict(r.headers)["dlq.error"].decode() for r in dead]
        assert errors[0].startswith("malformed envelope")
        assert "PoisonMessage" in errors[1]
        assert dead[0].value == b"\x00not a protobuf envelope\xff"
        for _ in range(100):
            if handled:
                break
            await asyncio.sleep(0.1)
        assert handled == [good.id]


async def test_consumer_commits_what_it_handled_when_stopped_between_commit_intervals(kafka: Kafka) -> None:
    """Offsets are committed on an interval; stopping in between must not leave handled
    messages uncommitted, or the next consumer in the group would redo them."""
    topic = f"test.commit.{uuid.uuid4().hex[:8]}"
    group = f"g-{uuid.uuid4().hex[:6]}"
    await ensure_topics(kafka.bootstrap_servers, [topic], partitions=1)
    producer = make_producer(kafka.bootstrap_servers)
    await producer.start()

    async def consume(want: int) -> list[str]:
        seen: list[str] = []
        enough = asyncio.Event()

        async def handler(message: ConsumedMessage) -> None:
            assert message.event is not None
            seen.append(message.event.id)
            if len(seen) >= want:
                enough.set()

        consumer = EventConsumer(
            bootstrap_servers=kafka.bootstrap_servers,
            group_id=group,
            handler=handler,
            producer=producer,
            topics=[topic],
            commit_interval_seconds=3600,
        )
        async with consuming(consumer):
            await asyncio.wait_for(enough.wait(), 30)
        return seen

    try:
        first = [_event(i) for i in range(5)]
        for e in first:
            await producer.send_and_wait(topic, e.SerializeToString())
        assert await consume(5) == [e.id for e in first]
        later = _event(99)
        await producer.send_and_wait(topic, later.SerializeToString())
        assert await consume(1) == [later.id]
    finally:
        await producer.stop()


async def test_a_consumer_whose_start_failed_starts_on_the_next_attempt(kafka: Kafka) -> None:
    # The runtime retries start() while the broker is not ready; an aiokafka consumer refuses a
    # second start() ("Did you call start twice?"), which once kept a service retrying forever.
    topic = f"t.retry.{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka.bootstrap_servers, [topic], partitions=1)
    seen: list[str] = []

    async def handler(message: ConsumedMessage) -> None:
        assert message.event is not None
        seen.append(message.event.id)

    producer = make_producer(kafka.bootstrap_servers)
    await producer.start()
    consumer = EventConsumer(
        bootstrap_servers=kafka.bootstrap_servers, group_id=None, name="retry", handler=handler,
        producer=producer, topics=[topic], fetch_max_wait_ms=50,
    )  # fmt: skip
    real_assign = consumer._assign_all_from_end
    failures = iter([True])

    async def assign_failing_once() -> None:
        if next(failures, False):
            raise ConnectionError("the broker is not ready")
        await real_assign()

    consumer._assign_all_from_end = assign_failing_once  # type: ignore[method-assign]
    try:
        try:
            await consumer.start()
        except ConnectionError:
            pass
        else:
            raise AssertionError("the first start should have failed")
        await consumer.start()
        task = asyncio.create_task(consumer.run())
        event = _event(7)
        await producer.send_and_wait(topic, event.SerializeToString())
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.05)
        assert seen == [event.id]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await consumer.stop()
        await producer.stop()
