"""Kafka on aiokafka: the producer settings every service uses, the topics, what a handler
receives, and the trace context a message carries.

The consumer itself is ``medledger_runtime.kafka_consumer``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from medledger_runtime.events import TOPICS, Event, dlq_topic

TRACER_NAME = "medledger.kafka"
_EMPTY_CONTEXT = otel_context.Context()
_TRACE_HEADERS = ("traceparent", "tracestate")
# The context key under which OpenTelemetry keeps the current span, found through its public API
# once: a context holding only the span is then built directly, not by copying an empty one.
SPAN_KEY = next(iter(trace.set_span_in_context(trace.INVALID_SPAN, _EMPTY_CONTEXT)))


def producer_trace_context(headers: Mapping[str, bytes]) -> otel_context.Context:
    """The trace context a message's producer sent (W3C ``traceparent`` in its headers); an empty
    context when it sent none, so that a span started in it begins a trace of its own."""
    if "traceparent" not in headers:
        return _EMPTY_CONTEXT
    carrier = {k: v.decode("latin-1") for k, v in headers.items() if k in _TRACE_HEADERS}
    return propagate.extract(carrier, context=_EMPTY_CONTEXT)


def consumer_span_attributes(topic: str, group: str, offset: int, message_id: str) -> dict[str, Any]:
    """The OpenTelemetry messaging attributes of the span that processes one message."""
    return {
        "messaging.system": "kafka",
        "messaging.destination.name": topic,
        "messaging.operation.type": "process",
        "messaging.consumer.group.name": group,
        "messaging.kafka.offset": offset,
        "messaging.message.id": message_id,
    }


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


@dataclass(slots=True)
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


if TYPE_CHECKING:
    from medledger_runtime.kafka_consumer import EventConsumer as EventConsumer
