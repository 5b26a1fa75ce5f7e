"""EventConsumer on the real broker: the span per message and the offsets it commits."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError, MessageSizeTooLargeError, NotLeaderForPartitionError
from medledger.events.v1 import identity_events_pb2
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanContext, SpanKind

from medledger_devstack.testing import Kafka, consuming, span_exporter
from medledger_runtime import events
from medledger_runtime.kafka import ConsumedMessage, ensure_topics, make_producer
from medledger_runtime.kafka_consumer import EventConsumer
from medledger_runtime.retry import Backoff


def _event(n: int) -> events.Event:
    return events.new_event(
        source="medledger.test",
        payload=identity_events_pb2.PrincipalRegistered(principal_id=f"pat_{n}"),
        aggregate_id=f"pat_{n}",
        version=1,
    )


async def test_each_message_is_handled_in_a_consumer_span_that_continues_the_producers_trace(kafka: Kafka) -> None:
    exporter = span_exporter()
    topic = f"test.spans.{uuid.uuid4().hex[:8]}"
    group = f"g-{uuid.uuid4().hex[:6]}"
    await ensure_topics(kafka.bootstrap_servers, [topic], partitions=1)
    seen: dict[str, SpanContext] = {}
    done = asyncio.Event()

    async def handler(message: ConsumedMessage) -> None:
        assert message.event is not None
        # The handler runs inside the message's span: its logs and child spans belong to it.
        seen[message.event.id] = trace.get_current_span().get_span_context()
        if len(seen) == 3:
            done.set()

    producer = make_producer(kafka.bootstrap_servers)
    await producer.start()
    traced = [_event(1), _event(2)]
    untraced = _event(3)
    producer_spans = []
    for e in traced:
        with trace.get_tracer("test").start_as_current_span("publish", kind=SpanKind.PRODUCER) as span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            await producer.send_and_wait(
                topic, e.SerializeToString(), headers=[(k, v.encode()) for k, v in carrier.items()]
            )
        producer_spans.append(span.get_span_context())
    await producer.send_and_wait(topic, untraced.SerializeToString())
    consumer = EventConsumer(
        bootstrap_servers=kafka.bootstrap_servers, group_id=group, handler=handler, producer=producer, topics=[topic]
    )
    async with consuming(consumer, producer):
        await asyncio.wait_for(done.wait(), 30)

    spans = {s.context.span_id: s for s in exporter.get_finished_spans() if s.name == f"{topic} process"}
    for e, producer_span in zip(traced, producer_spans, strict=True):
        ctx = seen[e.id]
        assert ctx.trace_id == producer_span.trace_id
        span = spans[ctx.span_id]
        assert span.parent is not None and span.parent.span_id == producer_span.span_id
        assert span.kind == SpanKind.CONSUMER
        assert span.attributes is not None
        assert span.attributes["messaging.system"] == "kafka"
        assert span.attributes["messaging.destination.name"] == topic
        assert span.attributes["messaging.consumer.group.name"] == group
        assert span.attributes["messaging.message.id"] == e.id
    # Without a traceparent the message's span starts a trace of its own.
    own = seen[untraced.id]
    assert own.is_valid and own.trace_id not in {p.trace_id for p in producer_spans}
    assert spans[own.span_id].parent is None


async def test_a_cancelled_batch_commits_only_the_messages_whose_handler_returned(kafka: Kafka) -> None:
    topic = f"test.partial.{uuid.uuid4().hex[:8]}"
    group = f"g-{uuid.uuid4().hex[:6]}"
    await ensure_topics(kafka.bootstrap_servers, [topic], partitions=1)
    handled: list[str] = []
    stuck = asyncio.Event()

    async def handler(message: ConsumedMessage) -> None:
        assert message.event is not None
        if len(handled) == 2:
            stuck.set()
            await asyncio.Event().wait()  # the third message's effect never completes
        handled.append(message.event.id)

    producer = make_producer(kafka.bootstrap_servers)
    await producer.start()
    batch = [_event(i) for i in range(5)]
    for e in batch:
        await producer.send(topic, e.SerializeToString())
    await producer.flush()
    consumer = EventConsumer(
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=group,
        handler=handler,
        producer=producer,
        topics=[topic],
        commit_interval_seconds=3600,
    )
    async with consuming(consumer, producer) as task:
        await asyncio.wait_for(stuck.wait(), 30)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert handled == [batch[0].id, batch[1].id]
        assert await consumer.consumer.committed(TopicPartition(topic, 0)) == 2


async def test_offsets_of_revoked_partitions_are_dropped_not_fatal() -> None:
    """A rebalance can take the partitions away between handling a batch and committing it;
    aiokafka then raises IllegalStateError. That once stopped audit's consumer (and the service)
    on a loaded machine; the batch is redelivered to whoever gets the partitions instead."""

    class Revoked:
        async def commit(self, offsets: object) -> None:
            raise IllegalStateError("No partitions assigned")

    async def handler(event: object) -> None:
        return None

    consumer = EventConsumer(
        bootstrap_servers="127.0.0.1:1", group_id="g", handler=handler, producer=None, topics=["t"]
    )
    consumer.consumer = Revoked()
    consumer._handled = {TopicPartition("t", 0): 5}
    await consumer.commit_handled()  # no exception
    assert consumer._handled == {}


async def test_a_dead_letter_waits_out_a_partition_without_its_leader() -> None:
    """Sending to `<topic>.dlq` right after the broker made it can meet NotLeaderForPartition;
    that once ended anchoring's consumer (and the service) in CI. It is retried now; an error
    that retrying cannot fix still ends the attempt."""

    class Flaky:
        def __init__(self, failures: list[Exception]) -> None:
            self.failures, self.sent = failures, 0

        async def send_and_wait(self, topic: str, value: bytes, **kwargs: object) -> None:
            if self.failures:
                raise self.failures.pop(0)
            self.sent += 1

    async def handler(event: object) -> None:
        return None

    record = ConsumerRecord("t", 0, 7, 0, 0, None, b"junk", None, 4, 0, ())
    producer = Flaky([NotLeaderForPartitionError(), NotLeaderForPartitionError()])
    consumer = EventConsumer(bootstrap_servers="127.0.0.1:1", group_id="g", handler=handler, producer=producer,
                             topics=["t"], backoff=Backoff(first_seconds=0.01))  # fmt: skip
    await consumer._dead_letter(record, "malformed envelope", "MalformedEvent")
    assert producer.sent == 1 and producer.failures == []

    consumer.producer = Flaky([MessageSizeTooLargeError()])
    with pytest.raises(MessageSizeTooLargeError):
        await consumer._dead_letter(record, "malformed envelope", "MalformedEvent")
