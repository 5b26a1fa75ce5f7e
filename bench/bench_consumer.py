"""(b) EventConsumer (envelope parsing, a span per message, commit after the effect) around a
no-op handler vs a raw aiokafka consume loop, on the same topic.

Usage: python bench_consumer.py BOOTSTRAP TOPIC N MODE [SAMPLING]   MODE: produce | raw | consumer | sdk-span

`sdk-span` needs no broker: the OpenTelemetry SDK's own cost of one sampled consumer span (start
with the messaging attributes, end), N times, in microseconds. At 100% sampling every message
pays it, whatever the consumer around it does.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

from aiokafka import AIOKafkaConsumer
from medledger.events.v1 import identity_events_pb2

from medledger_runtime import events
from medledger_runtime.kafka import ConsumedMessage, make_producer
from medledger_runtime.kafka_consumer import EventConsumer
from medledger_runtime.telemetry import configure_tracing


async def produce(bootstrap: str, topic: str, n: int) -> None:
    producer = make_producer(bootstrap)
    await producer.start()
    for start in range(0, n, 5000):
        futures = []
        for i in range(start, min(n, start + 5000)):
            e = events.new_event(
                source="medledger.bench",
                payload=identity_events_pb2.PrincipalRegistered(principal_id=f"pat_{i}"),
                aggregate_id=f"pat_{i}",
                version=1,
            )
            futures.append(await producer.send(topic, e.SerializeToString(), key=str(i).encode()))
        await asyncio.gather(*futures)
    await producer.stop()


async def raw(bootstrap: str, topic: str, n: int) -> float:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"raw-{uuid.uuid4().hex[:6]}", auto_offset_reset="earliest"
    )
    await consumer.start()
    seen = 0
    t0 = None
    while seen < n:
        batch = await consumer.getmany(timeout_ms=500, max_records=2000)
        if batch and t0 is None:
            t0 = time.perf_counter()
        seen += sum(len(r) for r in batch.values())
    elapsed = time.perf_counter() - (t0 or time.perf_counter())
    await consumer.stop()
    return n / elapsed


async def medledger_consumer(bootstrap: str, topic: str, n: int, sampling: float) -> float:
    configure_tracing("bench", sampling)
    done = asyncio.Event()
    seen = 0
    t0: float | None = None

    async def handler(message: ConsumedMessage) -> None:
        nonlocal seen, t0
        if t0 is None:
            t0 = time.perf_counter()
        seen += 1
        if seen >= n:
            done.set()

    producer = make_producer(bootstrap)
    await producer.start()
    consumer = EventConsumer(
        bootstrap_servers=bootstrap,
        group_id=f"ml-{uuid.uuid4().hex[:6]}",
        handler=handler,
        producer=producer,
        topics=[topic],
    )
    await consumer.start()
    task = asyncio.create_task(consumer.run())
    await done.wait()
    elapsed = time.perf_counter() - (t0 or time.perf_counter())
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await consumer.stop()
    await producer.stop()
    return n / elapsed


def sdk_span_us(n: int) -> float:
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.trace import SpanKind

    from medledger_runtime.kafka import consumer_span_attributes

    configure_tracing("bench", 1.0)
    tracer, empty = trace.get_tracer("bench"), Context()
    t0 = time.perf_counter()
    for i in range(n):
        attributes = consumer_span_attributes("medledger.bench.v1", "bench", i, "id")
        tracer.start_span("medledger.bench.v1 process", empty, SpanKind.CONSUMER, attributes).end()
    return (time.perf_counter() - t0) / n * 1e6


async def main() -> None:
    bootstrap, topic, n, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if mode == "produce":
        await produce(bootstrap, topic, n)
    elif mode == "sdk-span":
        print(json.dumps({"us": sdk_span_us(n)}))
    elif mode == "raw":
        print(json.dumps({"per_s": await raw(bootstrap, topic, n)}))
    else:
        print(json.dumps({"per_s": await medledger_consumer(bootstrap, topic, n, float(sys.argv[5]))}))


if __name__ == "__main__":
    asyncio.run(main())
