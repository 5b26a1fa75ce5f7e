"""The event consumer: one consumer group's loop over its topics.

It commits a message's offset only after its handler's effect is durable, retries failures with
backoff, and sends what it cannot handle to ``<topic>.dlq`` (the original bytes plus the error, no
payload fields copied into headers), then goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from prometheus_client import Counter, Gauge

from medledger_runtime.errors import Unavailable, describe
from medledger_runtime.events import Event, MalformedEvent, decode, dlq_topic
from medledger_runtime.kafka import (
    SPAN_KEY,
    TRACER_NAME,
    ConsumedMessage,
    Handler,
    PoisonMessage,
    consumer_span_attributes,
    ensure_topics,
    producer_trace_context,
)
from medledger_runtime.retry import Attempts, Backoff, retry
from medledger_runtime.telemetry import start_span

log = logging.getLogger(__name__)
tracer = trace.get_tracer(TRACER_NAME)
_CONSUMER = SpanKind.CONSUMER

CONSUMED = Counter("medledger_kafka_consumed_total", "Messages handled by a consumer.", ["group", "topic", "outcome"])
DEAD_LETTERS = Counter(
    "medledger_kafka_dead_letters_total",
    "Messages sent to a dead-letter topic, by the class of the error that sent them there.",
    ["group", "topic", "error"],
)
CONSUMER_LAG = Gauge(
    "medledger_kafka_consumer_lag", "Messages behind the partition end, per topic.", ["group", "topic"]
)


class EventConsumer:
    """Consumes envelopes, calls `handler` per message, commits after the effect."""

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        group_id: str | None,
        handler: Handler,
        producer: AIOKafkaProducer,
        topics: Sequence[str] = (),
        pattern: str | None = None,
        accept_malformed: bool = False,
        max_attempts: int = 5,
        backoff: Backoff = Backoff(first_seconds=0.05, max_seconds=5.0),  # noqa: B008 frozen
        batch_max: int = 2000,
        commit_interval_seconds: float = 0.2,
        auto_offset_reset: str = "earliest",
        name: str = "",
        fetch_max_wait_ms: int = 500,
    ) -> None:
        if not topics and not pattern:
            raise ValueError("a consumer needs topics or a pattern")
        if group_id is None and (pattern or not name):
            raise ValueError("a consumer without a group needs explicit topics and a name")
        # No group: the consumer reads every partition from the end as of start() and commits
        # nothing. For in-memory views that are loaded in full before the consumer runs.
        self.group_id = group_id
        self.name = name or str(group_id)
        self.bootstrap_servers = bootstrap_servers
        self.handler = handler
        self.producer = producer
        self.topics = list(topics)
        self.pattern = pattern
        self.accept_malformed = accept_malformed
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.batch_max = batch_max
        self.commit_interval_seconds = commit_interval_seconds
        self._consumer_options: dict[str, Any] = {
            "bootstrap_servers": bootstrap_servers,
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": auto_offset_reset,
            "metadata_max_age_ms": 5000,
            "max_poll_records": batch_max,
            # How long the broker may hold a fetch waiting for data: the latency of an idle topic.
            "fetch_max_wait_ms": fetch_max_wait_ms,
        }
        self.consumer = AIOKafkaConsumer(**self._consumer_options)
        self._stopped = False
        self._counters: dict[tuple[str, str], Any] = {}
        self._span_names: dict[str, str] = {}
        self._tracer: trace.Tracer = tracer
        # Offsets of handled messages not yet committed, per partition.
        self._handled: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        """Connect and take partitions. After a failure, start() may be called again: an
        aiokafka consumer starts once only, so a failed attempt leaves a fresh one behind."""
        if self._stopped:
            # aiokafka's consumer starts once only: after stop(), a supervisor's new start needs a new one.
            self.consumer, self._stopped = AIOKafkaConsumer(**self._consumer_options), False
        try:
            await self.consumer.start()
            if self.group_id is None:
                await self._assign_all_from_end()
                return
        except BaseException:
            failed, self.consumer = self.consumer, AIOKafkaConsumer(**self._consumer_options)
            # Its stop may end in its own tasks' CancelledError; the original error is what counts.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await failed.stop()
            raise
        listener = _CommitOnRevoke(self)
        if self.pattern:
            self.consumer.subscribe(pattern=self.pattern, listener=listener)
        else:
            self.consumer.subscribe(self.topics, listener=listener)

    async def stop(self) -> None:
        with contextlib.suppress(KafkaError):
            await self.commit_handled()
        self._stopped = True
        await self.consumer.stop()

    async def _assign_all_from_end(self) -> None:
        """Take every partition of the topics, positioned at their current end: what is
        published after start() returns is seen, what was published before is not."""
        missing = [t for t in self.topics if t not in await self.consumer.topics()]
        if missing:
            # This replica may be up before anyone published: the topic must exist to be read.
            await ensure_topics(self.bootstrap_servers, missing)
            await self.consumer._client.force_metadata_update()
        partitions = []
        for topic in self.topics:
            numbers = self.consumer.partitions_for_topic(topic)
            if not numbers:
                raise Unavailable(f"topic {topic} does not exist")
            partitions += [TopicPartition(topic, n) for n in sorted(numbers)]
        self.consumer.assign(partitions)
        await self.consumer.seek_to_end(*partitions)
        for tp in partitions:
            await self.consumer.position(tp)  # resolves the end offset now, not at the first fetch

    async def commit_handled(self) -> None:
        """Commit the offsets of every message handled so far."""
        if self.group_id is None:
            self._handled.clear()
            return
        if self._handled:
            offsets, self._handled = self._handled, {}
            try:
                await self.consumer.commit(offsets)
            except (IllegalStateError, CommitFailedError):
                # A rebalance took the partitions away between handling and committing: whoever
                # gets them next redelivers from the last commit, and the inbox drops what was
                # handled already. Not a reason to stop the consumer (it stopped audit's once).
                log.info("partitions revoked before their offsets were committed; they will be redelivered")
            except BaseException:
                # Not committed: keep them for the next attempt unless newer offsets arrived.
                for tp, offset in offsets.items():
                    self._handled.setdefault(tp, offset)
                raise

    async def run(self) -> None:
        """Consume until cancelled.

        A message's offset becomes committable once its handler has returned, that is once its
        effect is durable. Offsets are committed every `commit_interval_seconds`, when partitions
        are revoked and on stop, not after every batch: on Tansu a commit per batch stalls the
        next fetch and cut throughput by half. A crash redelivers at most one interval of handled
        messages, which the handlers' inboxes drop.
        """
        loop = asyncio.get_running_loop()
        next_commit = loop.time() + self.commit_interval_seconds
        # The provider's own tracer when one is installed by now (services configure tracing
        # before they start consumers), not the module's proxy, which looks it up per span.
        self._tracer = trace.get_tracer(TRACER_NAME)
        try:
            while True:
                batches = await self.consumer.getmany(timeout_ms=500, max_records=self.batch_max)
                for tp, records in batches.items():
                    await self._handle_batch(tp, records)
                if loop.time() >= next_commit:
                    await self.commit_handled()
                    next_commit = loop.time() + self.commit_interval_seconds
        finally:
            # Cancelled or failed: commit what was handled, shielded so cancellation cannot
            # interrupt a commit already sent.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(self.commit_handled())

    async def _handle_batch(self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        """Handle one partition's records in order, each in its own span, with its own retries.

        A record's offset becomes committable only once its handler has returned (or it went to
        the dead-letter topic); on cancellation or an error, up to the last such record. The
        per-message work is written out here, not in a coroutine of its own per message, and
        what is the same for the whole batch (span name, tracer, handler) is looked up once.
        """
        topic = str(tp.topic)
        span_name = self._span_names.get(topic) or self._span_name(topic)
        handler, accept_malformed, group, span_tracer = self.handler, self.accept_malformed, self.name, self._tracer
        dead_lettered = 0
        next_offset = -1
        try:
            for record in records:
                try:
                    event: Event | None = decode(record.value)
                    malformed = None
                except MalformedEvent as exc:
                    if not accept_malformed:
                        await self._dead_letter(record, f"malformed envelope: {exc}", type(exc).__name__)
                        dead_lettered += 1
                        next_offset = record.offset + 1
                        continue
                    event, malformed = None, str(exc)
                raw_headers = record.headers
                headers = dict(raw_headers) if raw_headers else {}
                message = ConsumedMessage(record, event, malformed, headers)
                span = start_span(span_tracer, span_name, producer_trace_context(headers), _CONSUMER)
                if span.is_recording():
                    # Attributes only for sampled spans: building them costs as much as the span.
                    span.set_attributes(
                        consumer_span_attributes(topic, group, record.offset, event.id if event else "")
                    )
                # attach/detach rather than trace.use_span: the context manager costs more than
                # the rest of the per-message work together.
                token = otel_context.attach(otel_context.Context({SPAN_KEY: span}))
                try:
                    try:
                        # Fast path: most messages are handled at the first attempt.
                        await handler(message)
                    except asyncio.CancelledError:
                        raise
                    except BaseException as exc:
                        if not await self._call_with_retries(message, exc):
                            dead_lettered += 1
                finally:
                    otel_context.detach(token)
                    span.end()
                next_offset = record.offset + 1
        finally:
            # Up to the last message whose handler returned, even when cancelled.
            if next_offset >= 0:
                self._handled[tp] = next_offset
        self._count(topic, "handled", len(records) - dead_lettered)
        if dead_lettered:
            self._count(topic, "dead_lettered", dead_lettered)
        CONSUMER_LAG.labels(group, topic).set(max(0, (self.consumer.highwater(tp) or 0) - (records[-1].offset + 1)))

    def _count(self, topic: str, outcome: str, n: int = 1) -> None:
        key = (topic, outcome)
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = CONSUMED.labels(self.name, topic, outcome)
        c.inc(n)

    def _span_name(self, topic: str) -> str:
        name = self._span_names[topic] = f"{topic} process"
        return name

    async def _call_with_retries(self, message: ConsumedMessage, first_error: BaseException) -> bool:
        """The handler failed once with `first_error`: try again (an outage for as long as it
        lasts, anything else up to `max_attempts` in all) or dead-letter the message with the
        reason, so that the partition moves on. False when it was dead-lettered."""
        tries = Attempts(f"consume {message.topic}", attempts=self.max_attempts, backoff=self.backoff)
        error: BaseException = first_error
        while True:
            if not isinstance(error, Exception):
                raise error
            if isinstance(error, PoisonMessage):
                await self._dead_letter(message.record, f"{type(error).__name__}: {error}", type(error).__name__)
                return False
            if not await tries.wait_after(error):
                await self._dead_letter(
                    message.record, f"{describe(error)} after {tries.faults} attempts", type(error).__name__
                )
                return False
            try:
                await self.handler(message)
                return True
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                error = exc

    async def _dead_letter(self, record: ConsumerRecord[bytes, bytes], error: str, error_class: str) -> None:
        """Send the original message to `<topic>.dlq` with the reason (`error`, no payload data);
        wait for the broker's ack."""
        topic = str(record.topic)
        headers = [(k, v) for k, v in (record.headers or ()) if k in ("traceparent", "tracestate", "content-type")]
        headers += [
            ("dlq.error", error.encode()[:1024]),
            ("dlq.source.topic", topic.encode()),
            ("dlq.source.partition", str(record.partition).encode()),
            ("dlq.source.offset", str(record.offset).encode()),
            ("dlq.consumer.group", self.name.encode()),
        ]
        # The message is neither handled nor dead-lettered until the broker takes it: a broker
        # that is away, or a dead-letter topic whose partition has no leader yet, is waited out
        # (it once ended the consumer, and so the service), never a reason to drop the message.
        await retry(
            lambda: self.producer.send_and_wait(dlq_topic(topic), record.value or b"", key=record.key, headers=headers),
            f"dead-letter to {dlq_topic(topic)}",
            backoff=self.backoff,
            only_outages=True,
        )
        DEAD_LETTERS.labels(self.name, topic, error_class).inc()
        log.warning(
            "message sent to the dead-letter topic", extra={"topic": topic, "offset": record.offset, "error": error}
        )


class _CommitOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Commits handled offsets before partitions move to another consumer, so that the new
    owner does not redo them."""

    def __init__(self, consumer: EventConsumer) -> None:
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        with contextlib.suppress(KafkaError):
            await self.consumer.commit_handled()
        # Offsets of partitions we no longer own cannot be committed by us any more.
        for tp in revoked:
            self.consumer._handled.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return None
