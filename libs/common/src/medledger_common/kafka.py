"""Kafka on aiokafka: the producer settings every service uses and the event consumer.

The consumer commits a message's offset only after its handler's effect is durable, retries
failures with backoff, and sends what it cannot handle to ``<topic>.dlq`` (the original bytes
plus the error, no payload fields copied into headers), then goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind
from prometheus_client import Counter, Gauge
from sqlalchemy.exc import DBAPIError, OperationalError

from medledger_common.errors import Unavailable
from medledger_common.events import TOPICS, Event, MalformedEvent, decode, dlq_topic

log = logging.getLogger(__name__)
tracer = trace.get_tracer("medledger.kafka")
_EMPTY_CONTEXT = otel_context.Context()
_CONSUMER = SpanKind.CONSUMER

CONSUMED = Counter("medledger_kafka_consumed_total", "Messages handled by a consumer.", ["group", "topic", "outcome"])
DEAD_LETTERS = Counter(
    "medledger_kafka_dead_letters_total", "Messages sent to a dead-letter topic.", ["group", "topic"]
)
CONSUMER_LAG = Gauge(
    "medledger_kafka_consumer_lag", "Messages behind the partition end, per topic.", ["group", "topic"]
)

# Failures that say nothing about the message: retry until they pass, never dead-letter.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    OperationalError,
    DBAPIError,
    KafkaError,
    Unavailable,
)


def make_producer(bootstrap_servers: str, **overrides: Any) -> AIOKafkaProducer:
    """A producer with acks=all. The brokers we target have no idempotent producer, so
    duplicates are possible and consumers deduplicate by event id."""
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers,
        "acks": "all",
        "enable_idempotence": False,
        "linger_ms": 2,
        "max_batch_size": 256 * 1024,
        "request_timeout_ms": 30000,
        "client_id": f"medledger-{socket.gethostname()}-{os.getpid()}",
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


async def ensure_topics(bootstrap_servers: str, topics: Sequence[str] | None = None, partitions: int = 3) -> list[str]:
    """Create the service topics and their dead-letter topics; returns those it created."""
    names = list(topics) if topics is not None else list(TOPICS.values())
    wanted = [*names, *(dlq_topic(t) for t in names)]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [NewTopic(name=t, num_partitions=partitions, replication_factor=1) for t in missing]
                )
        return missing
    finally:
        await admin.close()


def replica_group_id(base: str) -> str:
    """A group id of its own for each replica, for consumers that keep a per-replica cache."""
    return f"{base}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


@dataclass
class ConsumedMessage:
    record: ConsumerRecord[bytes, bytes]
    # The parsed envelope; None only for a consumer that accepts malformed messages.
    event: Event | None
    # Why the envelope could not be parsed, when it could not.
    malformed: str | None = None
    headers: dict[str, bytes] = field(default_factory=dict)

    @property
    def topic(self) -> str:
        return str(self.record.topic)


Handler = Callable[[ConsumedMessage], Awaitable[None]]


class PoisonMessage(Exception):
    """Raised by a handler for a message it can never handle: straight to the dead-letter topic."""


class EventConsumer:
    """Consumes envelopes, calls `handler` per message, commits after the effect."""

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        group_id: str,
        handler: Handler,
        producer: AIOKafkaProducer,
        topics: Sequence[str] = (),
        pattern: str | None = None,
        accept_malformed: bool = False,
        max_attempts: int = 5,
        backoff_seconds: float = 0.05,
        max_backoff_seconds: float = 5.0,
        batch_max: int = 2000,
        auto_offset_reset: str = "earliest",
    ) -> None:
        if not topics and not pattern:
            raise ValueError("a consumer needs topics or a pattern")
        self.group_id = group_id
        self.handler = handler
        self.producer = producer
        self.topics = list(topics)
        self.pattern = pattern
        self.accept_malformed = accept_malformed
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.batch_max = batch_max
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=auto_offset_reset,
            metadata_max_age_ms=5000,
            max_poll_records=batch_max,
        )
        self._counters: dict[tuple[str, str], Any] = {}
        self._span_names: dict[str, str] = {}
        self._pending_commit: asyncio.Future[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        if self.pattern:
            self.consumer.subscribe(pattern=self.pattern)
        else:
            self.consumer.subscribe(self.topics)

    async def stop(self) -> None:
        if self._pending_commit is not None and not self._pending_commit.done():
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._pending_commit
        await self.consumer.stop()

    async def run(self) -> None:
        """Consume until cancelled.

        A batch's offsets are committed once every message in it has been handled. The commit
        (a broker round trip) runs while the next batch is handled; it is awaited before the
        next commit, so commits stay in order and never run ahead of the effects they cover.
        """
        try:
            while True:
                batches = await self.consumer.getmany(timeout_ms=500, max_records=self.batch_max)
                if not batches:
                    continue
                offsets: dict[TopicPartition, int] = {}
                for tp, records in batches.items():
                    for record in records:
                        await self._handle(record)
                        offsets[tp] = record.offset + 1
                if self._pending_commit is not None:
                    # Shielded: cancelling this loop must not cancel a commit already sent.
                    await asyncio.shield(self._pending_commit)
                self._pending_commit = asyncio.ensure_future(self.consumer.commit(offsets))
                for tp, records in batches.items():
                    CONSUMER_LAG.labels(self.group_id, tp.topic).set(
                        max(0, (self.consumer.highwater(tp) or 0) - (records[-1].offset + 1))
                    )
        finally:
            if self._pending_commit is not None and not self._pending_commit.done():
                # Cancelled mid-stream: let the last commit of handled messages finish.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._pending_commit)

    def _count(self, topic: str, outcome: str) -> None:
        key = (topic, outcome)
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = CONSUMED.labels(self.group_id, topic, outcome)
        c.inc()

    async def _handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        headers = {k: v for k, v in (record.headers or ())}
        try:
            event: Event | None = decode(record.value)
            malformed = None
        except MalformedEvent as exc:
            if not self.accept_malformed:
                await self._dead_letter(record, f"malformed envelope: {exc}")
                return
            event, malformed = None, str(exc)
        message = ConsumedMessage(record=record, event=event, malformed=malformed, headers=headers)
        # The producer's trace context, when the message has one; else the span starts a trace.
        parent = _EMPTY_CONTEXT
        if "traceparent" in headers:
            carrier = {k: v.decode("latin-1") for k, v in headers.items() if k in ("traceparent", "tracestate")}
            parent = propagate.extract(carrier, context=_EMPTY_CONTEXT)
        span = tracer.start_span(self._span_names.get(record.topic) or self._span_name(record.topic), parent, _CONSUMER)
        if span.is_recording():
            # Attributes only for sampled spans: building them costs as much as the span.
            span.set_attributes(
                {
                    "messaging.system": "kafka",
                    "messaging.destination.name": str(record.topic),
                    "messaging.operation.type": "process",
                    "messaging.consumer.group.name": self.group_id,
                    "messaging.kafka.offset": record.offset,
                    "messaging.message.id": event.id if event else "",
                }
            )
        with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
            await self._call_with_retries(message)

    def _span_name(self, topic: str) -> str:
        name = self._span_names[topic] = f"{topic} process"
        return name

    async def _call_with_retries(self, message: ConsumedMessage) -> None:
        attempt = 0
        delay = self.backoff_seconds
        while True:
            attempt += 1
            try:
                await self.handler(message)
                self._count(message.topic, "handled")
                return
            except asyncio.CancelledError:
                raise
            except PoisonMessage as exc:
                await self._dead_letter(message.record, f"{type(exc).__name__}: {exc}")
                return
            except TRANSIENT_ERRORS as exc:
                # The message is fine; a dependency is not. Keep it until the dependency is back.
                log.warning(
                    "handler hit a transient error, retrying",
                    extra={"group": self.group_id, "topic": message.topic, "error": type(exc).__name__},
                )
            except Exception as exc:
                if attempt >= self.max_attempts:
                    await self._dead_letter(message.record, f"{type(exc).__name__} after {attempt} attempts")
                    return
                log.warning(
                    "handler failed, retrying",
                    extra={
                        "group": self.group_id,
                        "topic": message.topic,
                        "attempt": attempt,
                        "error": type(exc).__name__,
                    },
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff_seconds)

    async def _dead_letter(self, record: ConsumerRecord[bytes, bytes], error: str) -> None:
        """Send the original message to `<topic>.dlq` with the error; wait for the broker's ack."""
        topic = str(record.topic)
        headers = [(k, v) for k, v in (record.headers or ()) if k in ("traceparent", "tracestate", "content-type")]
        headers += [
            ("dlq.error", error.encode()[:1024]),
            ("dlq.source.topic", topic.encode()),
            ("dlq.source.partition", str(record.partition).encode()),
            ("dlq.source.offset", str(record.offset).encode()),
            ("dlq.consumer.group", self.group_id.encode()),
        ]
        await self.producer.send_and_wait(dlq_topic(topic), record.value or b"", key=record.key, headers=headers)
        DEAD_LETTERS.labels(self.group_id, topic).inc()
        self._count(topic, "dead_lettered")
        log.warning(
            "message sent to the dead-letter topic", extra={"topic": topic, "offset": record.offset, "error": error}
        )
