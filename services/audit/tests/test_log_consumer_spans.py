"""The log consumer appends a message that carries a sampled trace context in a CONSUMER span of
that trace, as EventConsumer handles messages: the producing request's trace reaches the audit
entry. It overrides EventConsumer's loop (it appends whole polls), and had lost the spans."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from medledger.events.v1 import identity_events_pb2
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from medledger_audit.entries import EntryDraft
from medledger_audit.handlers import LogConsumer
from medledger_audit.sequencer import PreparedBatch
from medledger_devstack.testing import span_exporter
from medledger_runtime.events import new_event

TOPIC = "medledger.identity.v1"


class FakeSequencer:
    def __init__(self) -> None:
        self.appended: list[EntryDraft] = []

    async def prepare(self, drafts: Sequence[EntryDraft]) -> PreparedBatch:
        return PreparedBatch([], list(drafts))

    async def append_prepared(self, batch: PreparedBatch) -> None:
        self.appended.extend(batch.later)


class FakeKafkaConsumer:
    """One poll, then nothing; notes the first commit (after the append has returned)."""

    def __init__(self, polled: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        self.polls = [polled]
        self.committed = asyncio.Event()

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        if self.polls:
            return self.polls.pop()
        await asyncio.sleep(timeout_ms / 1000)
        return {}

    async def commit(self, offsets: Any = None) -> None:
        self.committed.set()


def record(offset: int, value: bytes, headers: list[tuple[str, bytes]]) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(TOPIC, 0, offset, 0, 0, None, value, None, 0, len(value), headers)


async def test_a_traced_message_is_appended_in_a_span_of_its_trace() -> None:
    exporter = span_exporter()
    events = [
        new_event(
            source="medledger.identity",
            payload=identity_events_pb2.PrincipalRegistered(principal_id=f"pat_{n}"),
            aggregate_id=f"pat_{n}",
            version=1,
        )
        for n in range(3)
    ]
    with trace.get_tracer("test").start_as_current_span("PutRecord", kind=SpanKind.SERVER) as request:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    sampled = [(k, v.encode()) for k, v in carrier.items()]
    ctx = request.get_span_context()
    unsampled = [("traceparent", f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-00".encode())]
    tp = TopicPartition(TOPIC, 0)
    polled = {
        tp: [
            record(0, events[0].SerializeToString(), sampled),
            record(1, events[1].SerializeToString(), unsampled),
            record(2, events[2].SerializeToString(), []),
        ]
    }
    sequencer = FakeSequencer()
    consumer = LogConsumer(bootstrap_servers="127.0.0.1:1", sequencer=sequencer, producer=None)  # type: ignore[arg-type]
    kafka = FakeKafkaConsumer(polled)
    consumer.consumer = kafka
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(kafka.committed.wait(), 10)  # the spans end before the offsets are handed on
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    assert [d.event_id for d in sequencer.appended] == [e.id for e in events]
    spans = [s for s in exporter.get_finished_spans() if s.name == f"{TOPIC} process" and s.kind == SpanKind.CONSUMER]
    mine = [s for s in spans if s.attributes and s.attributes.get("messaging.message.id") in {e.id for e in events}]
    assert len(mine) == 1, "only the message with a sampled trace context is spanned"
    span = mine[0]
    assert span.context.trace_id == ctx.trace_id
    assert span.parent is not None and span.parent.span_id == ctx.span_id
    assert span.attributes is not None
    assert span.attributes["messaging.message.id"] == events[0].id
    assert span.attributes["messaging.consumer.group.name"] == "audit.log"
    assert span.attributes["messaging.destination.name"] == TOPIC
    assert span.attributes["messaging.kafka.offset"] == 0
