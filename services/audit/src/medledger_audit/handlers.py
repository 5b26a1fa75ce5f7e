"""The log's Kafka consumer: every message on a service topic becomes one entry.

It consumes like every other consumer (``EventConsumer``: group ``audit.log``, the service topic
pattern, malformed messages accepted, offsets committed only after the effect), but handles a
whole poll at once instead of calling a handler per message: the effect here is an append, and
appending messages one transaction each would cap the log at a few hundred entries a second. So
each poll (thousands of messages from any partitions) is drafted, prepared (made into entries,
`Sequencer.prepare`), appended in one transaction, and its offsets become committable once that
transaction has committed. While one poll is being appended the next is fetched, drafted and
prepared, unless the one being appended holds an erasure: the next poll's subjects must then wait
for the patient's key to be deleted.

A message that carries a sampled trace context (the `traceparent` its producer's request stored
with the outbox row) is appended in a CONSUMER span `<topic> process` of that trace, as
EventConsumer handles each message, so the request's trace reaches the audit entry it produced.
Messages without one start no trace here.

An append that fails is retried, never skipped: the log must not silently drop an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiokafka import ConsumerRecord, TopicPartition
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from medledger_audit.entries import EntryDraft, draft_entry, unprocessable_entry
from medledger_audit.sequencer import YIELD_EVERY, PreparedBatch, Sequencer
from medledger_runtime.events import SERVICE_TOPIC_PATTERN, MalformedEvent, decode
from medledger_runtime.kafka import consumer_span_attributes, producer_trace_context
from medledger_runtime.kafka_consumer import EventConsumer
from medledger_runtime.retry import Attempts, Backoff, retry

log = logging.getLogger(__name__)

LOG_CONSUMER = "audit.log"
# Failures that are not a dependency's outage: after this many in a row the consumer ends
# (loudly) rather than skip an event or spin.
MAX_FAILED_APPENDS = 10

Records = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
# (message, its entry, the trace context it carries): the messages appended in a span.
Traced = list[tuple[ConsumerRecord[bytes, bytes], EntryDraft, Context]]
T = TypeVar("T")


def sampled_trace(record: ConsumerRecord[bytes, bytes]) -> Context | None:
    """The trace context in a message's headers when it is valid and sampled, else None."""
    context = producer_trace_context(dict(record.headers or ()))
    parent = trace.get_current_span(context).get_span_context()
    return context if parent.is_valid and parent.trace_flags.sampled else None


def draft_of(record: ConsumerRecord[bytes, bytes]) -> EntryDraft | None:
    """The entry a Kafka message becomes; None for the audit service's own checkpoint events."""
    raw = record.value or b""
    try:
        event = decode(raw)
    except MalformedEvent:
        return unprocessable_entry(raw, str(record.topic), record.partition, record.offset)
    try:
        return draft_entry(event)
    except Exception:  # a payload the entries module trips over is kept by hash, never dropped
        log.exception("event could not be drafted; appended as unprocessable", extra={"topic": record.topic})
        return unprocessable_entry(raw, str(record.topic), record.partition, record.offset)


class LogConsumer(EventConsumer):
    """The consumer that feeds the sequencer; see the module."""

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        sequencer: Sequencer,
        producer: Any,
        batch_max: int = 5000,
        retry_seconds: float = 0.2,
        max_retry_seconds: float = 5.0,
        fetch_max_wait_ms: int = 100,
        group_id: str = LOG_CONSUMER,
    ) -> None:
        super().__init__(
            bootstrap_servers=bootstrap_servers,
            group_id=group_id,
            handler=self._never_called,
            producer=producer,
            pattern=SERVICE_TOPIC_PATTERN,
            accept_malformed=True,
            batch_max=batch_max,
            fetch_max_wait_ms=fetch_max_wait_ms,
        )
        self.sequencer = sequencer
        self.backoff = Backoff(first_seconds=retry_seconds, max_seconds=max_retry_seconds)

    async def _never_called(self, _message: Any) -> None:  # the log appends whole polls instead
        raise AssertionError("LogConsumer handles polls, not messages")

    async def run_until_cancelled(self) -> None:
        """Start (retrying until Kafka is up), consume until cancelled, then stop: the body of
        the service's background task."""
        await retry(self.start, "start: audit log consumer")
        try:
            await self.run()
        finally:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(self.stop())

    async def run(self) -> None:
        """Fetch, draft, prepare and append polls, one append in flight while the next poll is
        drafted and prepared."""
        loop = asyncio.get_running_loop()
        next_commit = loop.time() + self.commit_interval_seconds
        in_flight: asyncio.Task[None] | None = None
        in_flight_erases = False
        try:
            while True:
                polled = await self.consumer.getmany(timeout_ms=500, max_records=self.batch_max)
                if polled:
                    drafts, traced = await self._draft(polled)
                    if in_flight is not None and in_flight_erases:
                        await in_flight
                        in_flight = None
                    batch = await self._retrying(functools.partial(self.sequencer.prepare, drafts), len(drafts))
                    if in_flight is not None:
                        await in_flight  # appends stay in poll order
                    in_flight = asyncio.create_task(self._append(polled, batch, traced))
                    in_flight_erases = batch.erases
                elif in_flight is not None and in_flight.done():
                    await in_flight
                    in_flight = None
                if loop.time() >= next_commit:
                    await self.commit_handled()
                    next_commit = loop.time() + self.commit_interval_seconds
        finally:
            if in_flight is not None and not in_flight.done():
                in_flight.cancel()
                with contextlib.suppress(BaseException):
                    await in_flight
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(self.commit_handled())

    async def _draft(self, polled: Records) -> tuple[list[EntryDraft], Traced]:
        """The drafts of a poll's messages, and those to be spanned with their trace context."""
        drafts: list[EntryDraft] = []
        traced: Traced = []
        for records in polled.values():
            for n, r in enumerate(records, 1):
                if (d := draft_of(r)) is not None:
                    drafts.append(d)
                    if r.headers and (context := sampled_trace(r)) is not None:
                        traced.append((r, d, context))
                if n % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
        return drafts, traced

    async def _append(self, polled: Records, batch: PreparedBatch, traced: Traced | None = None) -> None:
        """Append a poll's prepared batch, retrying until it commits; then its offsets may be
        committed. Each traced message's span lasts until its entry is durable (or the append
        gave up)."""
        spans = [self._span(r, d, context) for r, d, context in traced or ()]
        try:
            await self._retrying(functools.partial(self.sequencer.append_prepared, batch), len(batch))
        except Exception as exc:
            for span in spans:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            for span in spans:
                span.end()
        for tp, records in polled.items():
            self._handled[tp] = records[-1].offset + 1
            self._count(str(tp.topic), "handled", len(records))

    def _span(self, record: ConsumerRecord[bytes, bytes], draft: EntryDraft, context: Context) -> trace.Span:
        return trace.get_tracer(__name__).start_span(
            f"{record.topic} process",
            context,
            SpanKind.CONSUMER,
            consumer_span_attributes(str(record.topic), self.name, record.offset, draft.event_id),
        )

    async def _retrying(self, step: Callable[[], Awaitable[T]], entries: int) -> T:
        """Run a step of the append (prepare, append) until it succeeds: an event is never
        skipped. An outage is waited out; after MAX_FAILED_APPENDS other failures in a row the
        error ends the consumer, and its supervisor decides, rather than skip an event or spin."""
        tries = Attempts("audit log append", attempts=MAX_FAILED_APPENDS, backoff=self.backoff)
        while True:
            try:
                return await step()
            except Exception as exc:
                if not await tries.wait_after(exc):
                    raise
