"""The relay that publishes the transactional outbox (``medledger_runtime.outbox``) to Kafka.

It publishes unpublished rows in id order with ``acks=all`` and marks them published afterwards, so
a crash between the two republishes: delivery is at least once, and consumers deduplicate by
event id through the inbox.

The relay never keeps a "last id sent" mark: ids are allocated at insert but committed in any
order, so a mark would skip a row that commits late. It always selects every unpublished row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Gauge
from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_runtime.db import Database
from medledger_runtime.events import CONTENT_TYPE
from medledger_runtime.outbox import outbox, outbox_watermarks
from medledger_runtime.retry import Attempts

log = logging.getLogger(__name__)

OUTBOX_PUBLISHED = Counter("medledger_outbox_published_total", "Outbox rows published to Kafka.", ["service"])
OUTBOX_BACKLOG = Gauge(
    "medledger_outbox_backlog", "Outbox rows not yet published, as last seen by the relay.", ["service"]
)
OUTBOX_REPUBLISHED = Counter(
    "medledger_outbox_republished_total",
    "Retained outbox rows queued again because the broker lost data.",
    ["service"],
)
OUTBOX_ERRORS = Counter("medledger_outbox_relay_errors_total", "Relay batches that failed.", ["service"])


class _HeaderCache:
    """Kafka headers per (traceparent, tracestate): rows of one request share them."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str | None, str | None], list[tuple[str, bytes]]] = {}

    def __call__(self, traceparent: str | None, tracestate: str | None) -> list[tuple[str, bytes]]:
        headers = self._seen.get((traceparent, tracestate))
        if headers is None:
            headers = [("content-type", CONTENT_TYPE.encode())]
            if traceparent:
                headers.append(("traceparent", traceparent.encode()))
            if tracestate:
                headers.append(("tracestate", tracestate.encode()))
            self._seen[(traceparent, tracestate)] = headers
        return headers


_PG_UNPUBLISHED = (
    "SELECT id, topic, key, value, traceparent, tracestate FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT $1"
)
_PG_MARK_PUBLISHED = "UPDATE outbox SET published_at = $1 WHERE id = ANY($2::bigint[])"
_PG_RAISE_WATERMARKS = (
    "INSERT INTO outbox_watermarks (topic, partition, acked_offset) "
    "SELECT * FROM unnest($1::varchar[], $2::int[], $3::bigint[]) "
    "ON CONFLICT (topic, partition) DO UPDATE "
    "SET acked_offset = GREATEST(outbox_watermarks.acked_offset, EXCLUDED.acked_offset)"
)


class OutboxRelay:
    """Publishes the outbox; one relay at a time per service (a database lock)."""

    def __init__(
        self,
        db: Database,
        producer: AIOKafkaProducer,
        *,
        service: str,
        bootstrap_servers: str = "",
        batch_size: int = 2000,
        poll_seconds: float = 0.5,
        retention_seconds: float = 7 * 24 * 3600.0,
        watermark_check_seconds: float = 10.0,
        min_interval_seconds: float = 0.02,
    ) -> None:
        self.db = db
        self.producer = producer
        self.service = service
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.retention_seconds = retention_seconds
        self.watermark_check_seconds = watermark_check_seconds
        self.min_interval_seconds = min_interval_seconds
        self._bootstrap = bootstrap_servers
        self._wake = asyncio.Event()
        self._partition_lists: dict[str, tuple[float, tuple[list[int], list[int]]]] = {}
        self._partition_cache: dict[tuple[str, bytes, int], int] = {}
        self._published = OUTBOX_PUBLISHED.labels(service)
        self._backlog = OUTBOX_BACKLOG.labels(service)
        OUTBOX_REPUBLISHED.labels(service)
        OUTBOX_ERRORS.labels(service)

    def notify(self) -> None:
        """Wake the relay now (a write just committed) instead of at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Publish until cancelled. A failed cycle is tried again (see medledger_runtime.retry):
        an outage of the database or the broker for as long as it lasts, anything else a few
        times in a row before the error ends the relay for its supervisor to judge."""
        tries = Attempts(f"outbox relay ({self.service})")
        next_check = time.monotonic() + self.watermark_check_seconds
        next_purge = time.monotonic()
        last_cycle = 0.0
        while True:
            # At most one cycle per `min_interval_seconds` unless a full batch is waiting: a
            # relay cycle costs several statements, and a busy service notifies on every write.
            pause = last_cycle + self.min_interval_seconds - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            last_cycle = time.monotonic()
            # Cleared before the cycle, so that a write committed during it wakes the next one.
            self._wake.clear()
            try:
                sent = await self.publish_once()
                if time.monotonic() >= next_check:
                    await self.republish_if_broker_lost_data()
                    next_check = time.monotonic() + self.watermark_check_seconds
                if time.monotonic() >= next_purge:
                    await self.purge_expired()
                    next_purge = time.monotonic() + 60
                tries.succeeded()
            except Exception as exc:
                OUTBOX_ERRORS.labels(self.service).inc()
                if not await tries.wait_after(exc):
                    raise
                continue
            if sent >= self.batch_size:
                last_cycle = 0.0  # a backlog: go on at once
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_seconds)

    async def publish_once(self) -> int:
        """Publish one batch of unpublished rows in id order; returns how many were sent."""
        async with self.db.transaction() as conn:
            if not await self.db.try_xact_lock(conn, f"outbox-relay:{self.service}"):
                return 0
            rows = await self._unpublished(conn)
            if not rows:
                self._backlog.set(0)
                return 0
            # Mark the rows while the broker acknowledges them: the mark commits only after every
            # acknowledgement, and a failed send rolls it back, so the two may overlap.
            sending = asyncio.ensure_future(self._send(rows))
            try:
                await self._mark_published(conn, [row[0] for row in rows])
                metas = await sending
            finally:
                if not sending.done():
                    sending.cancel()
            await self._raise_watermarks(conn, metas)
        self._published.inc(len(rows))
        if len(rows) == self.batch_size:
            self._backlog.set(len(rows))
        else:
            self._backlog.set(0)
        return len(rows)

    async def _send(self, rows: Sequence[Any]) -> list[Any]:
        """Send rows in id order and wait for the broker's acknowledgements; returns the record
        metadata of every batch sent (topic, partition, base offset).

        Rows go into one record batch per partition, built here, rather than through `send()`
        per message: `send()` costs a partition lookup, a future and an accumulator visit per
        message, which made the relay half as fast as a bare producer. The partition is what
        `send()` would pick (the producer's partitioner: murmur2 of the key), so keyed events
        keep their partition, and per partition the rows keep their id order.
        """
        headers_of = _HeaderCache()
        batches: dict[tuple[str, int], Any] = {}
        futures = []
        partitions: dict[str, tuple[list[int], list[int]]] = {}  # per topic, looked up once a batch
        for _id, topic, key, value, traceparent, tracestate in rows:
            of_topic = partitions.get(topic)
            if of_topic is None:
                of_topic = partitions[topic] = await self._partitions(topic)
            partition = self._partition_of(topic, key, of_topic)
            place = (topic, partition)
            batch = batches.get(place)
            if batch is None:
                batch = batches[place] = self.producer.create_batch()
            headers = headers_of(traceparent, tracestate)
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                # Full: send it and start the next one for this partition.
                futures.append(await self.producer.send_batch(batch, topic, partition=partition))
                batch = batches[place] = self.producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    raise ValueError(f"an outbox row of {len(value)} bytes exceeds the producer's batch size")
        for (topic, partition), batch in batches.items():
            futures.append(await self.producer.send_batch(batch, topic, partition=partition))
        return list(await asyncio.gather(*futures))

    async def _partitions(self, topic: str) -> tuple[list[int], list[int]]:
        """A topic's partitions (all, available), from the producer's metadata."""
        known = self._partition_lists.get(topic)
        if known is None or time.monotonic() - known[0] > 30:
            await self.producer.partitions_for(topic)  # waits for metadata, creating the topic if allowed
            metadata = self.producer.client.cluster
            all_partitions = sorted(metadata.partitions_for_topic(topic) or ())
            available = sorted(metadata.available_partitions_for_topic(topic) or ())
            known = self._partition_lists[topic] = (time.monotonic(), (all_partitions, available))
        return known[1]

    def _partition_of(self, topic: str, key: bytes | None, partitions: tuple[list[int], list[int]]) -> int:
        all_partitions, available = partitions
        if key is None:
            return int(self.producer._partitioner(key, all_partitions, available))  # the producer's own choice
        # Keys repeat (a patient's events) and murmur2 is pure Python: remember recent answers.
        # A key's partition depends only on the partition count while every partition is up.
        cached = (topic, key, len(all_partitions))
        partition = self._partition_cache.get(cached) if len(available) == len(all_partitions) else None
        if partition is None:
            partition = int(self.producer._partitioner(key, all_partitions, available))
            if len(self._partition_cache) >= 10_000:
                self._partition_cache.clear()
            self._partition_cache[cached] = partition
        return partition

    async def _unpublished(self, conn: AsyncConnection) -> Sequence[Sequence[Any]]:
        """The first `batch_size` unpublished rows in id order, as (id, topic, key, value,
        traceparent, tracestate)."""
        if conn.dialect.name == "postgresql":
            # Through asyncpg itself, in the same transaction: SQLAlchemy's result rows cost more
            # per row than the broker does per message (the relay ran at half a bare producer).
            driver = (await conn.get_raw_connection()).driver_connection
            return list(await driver.fetch(_PG_UNPUBLISHED, self.batch_size))  # type: ignore[union-attr]
        query = (
            select(outbox.c.id, outbox.c.topic, outbox.c.key, outbox.c.value, outbox.c.traceparent, outbox.c.tracestate)
            .where(outbox.c.published_at.is_(None))
            .order_by(outbox.c.id)
            .limit(self.batch_size)
        )
        return (await conn.execute(query)).all()

    async def _mark_published(self, conn: AsyncConnection, ids: Sequence[int]) -> None:
        now = time.time()
        if conn.dialect.name == "postgresql":
            # One array parameter instead of one bind parameter per id, straight to asyncpg.
            driver = (await conn.get_raw_connection()).driver_connection
            await driver.execute(_PG_MARK_PUBLISHED, now, list(ids))  # type: ignore[union-attr]
        else:
            await conn.execute(update(outbox).where(outbox.c.id.in_(ids)).values(published_at=now))

    async def _raise_watermarks(self, conn: AsyncConnection, metas: Sequence[Any]) -> None:
        """Remember the first offset acknowledged per partition (see republish_if_broker_lost_data)."""
        first_in_batch: dict[tuple[str, int], int] = {}
        for m in metas:
            k = (m.topic, m.partition)
            if k not in first_in_batch or m.offset < first_in_batch[k]:
                first_in_batch[k] = m.offset
        if conn.dialect.name == "postgresql":
            # Every partition in one statement, prepared once (built per call, the upsert cost
            # more CPU than the rest of the cycle's statements).
            driver = (await conn.get_raw_connection()).driver_connection
            places = list(first_in_batch)
            await driver.execute(  # type: ignore[union-attr]
                _PG_RAISE_WATERMARKS, [t for t, _ in places], [p for _, p in places], list(first_in_batch.values())
            )
            return
        # SQLite (tests, a laptop): one upsert per partition.
        for (topic, partition), offset in first_in_batch.items():
            values = {"topic": topic, "partition": partition, "acked_offset": offset}
            await conn.execute(
                sqlite.insert(outbox_watermarks)
                .values(**values)
                .on_conflict_do_update(
                    index_elements=["topic", "partition"],
                    set_={"acked_offset": func.max(outbox_watermarks.c.acked_offset, offset)},
                )
            )

    async def republish_if_broker_lost_data(self) -> int:
        """Queue retained rows again for topics whose partitions lost acknowledged messages."""
        async with self.db.connect() as conn:
            marks = (await conn.execute(select(outbox_watermarks))).all()
        if not marks or not self._bootstrap:
            return 0
        lost_topics = await self._topics_behind(marks)
        if lost_topics:
            # A broker may report its high watermark a moment late: confirm before republishing.
            await asyncio.sleep(1.0)
            lost_topics &= await self._topics_behind(marks)
        if not lost_topics:
            return 0
        async with self.db.transaction() as conn:
            result = await conn.execute(
                update(outbox)
                .where(and_(outbox.c.topic.in_(lost_topics), outbox.c.published_at.is_not(None)))
                .values(published_at=None)
            )
            await conn.execute(delete(outbox_watermarks).where(outbox_watermarks.c.topic.in_(lost_topics)))
        count = int(result.rowcount or 0)
        OUTBOX_REPUBLISHED.labels(self.service).inc(count)
        log.warning(
            "broker lost acknowledged messages; republishing retained outbox rows",
            extra={"topics": sorted(lost_topics), "rows": count},
        )
        self.notify()
        return count

    async def _topics_behind(self, marks: Sequence[Any]) -> set[str]:
        """Topics with a partition whose end offset is not past the newest acknowledged batch."""
        from aiokafka import AIOKafkaConsumer

        probe = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, enable_auto_commit=False)
        await probe.start()
        try:
            ends = await probe.end_offsets([TopicPartition(m.topic, m.partition) for m in marks])
        except KafkaError:
            return set()
        finally:
            await probe.stop()
        return {m.topic for m in marks if ends.get(TopicPartition(m.topic, m.partition), 0) <= m.acked_offset}

    async def purge_expired(self) -> int:
        cutoff = time.time() - self.retention_seconds
        async with self.db.transaction() as conn:
            result = await conn.execute(delete(outbox).where(outbox.c.published_at < cutoff))
        return int(result.rowcount or 0)
