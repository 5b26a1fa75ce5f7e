"""(a) Outbox relay publishing vs raw aiokafka produce, same broker, same message sizes.

Usage: python bench_outbox_relay.py BOOTSTRAP DATABASE_URL N  -> prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

from medledger.events.v1 import identity_events_pb2
from sqlalchemy import insert

from medledger_runtime import events
from medledger_runtime.db import Database
from medledger_runtime.kafka import make_producer
from medledger_runtime.outbox import COMMON_MIGRATIONS, outbox
from medledger_runtime.outbox_relay import OutboxRelay


def envelope(n: int) -> bytes:
    # About 300 bytes, like a real event with a few ids in it.
    payload = identity_events_pb2.PrincipalRegistered(principal_id=f"pat_{n:032d}", organization_id="o" * 120)
    return events.new_event(
        source="medledger.bench", payload=payload, aggregate_id=f"pat_{n}", version=1
    ).SerializeToString()


async def raw_produce(bootstrap: str, n: int) -> float:
    producer = make_producer(bootstrap)
    await producer.start()
    topic = f"bench.raw.{uuid.uuid4().hex[:8]}"
    values = [envelope(i) for i in range(n)]
    await producer.send_and_wait(topic, values[0])  # topic creation and metadata outside the timing
    t0 = time.perf_counter()
    for start in range(0, n, 2000):
        futures = [
            await producer.send(topic, v, key=str(i).encode()) for i, v in enumerate(values[start : start + 2000])
        ]
        await asyncio.gather(*futures)
    elapsed = time.perf_counter() - t0
    await producer.stop()
    return n / elapsed


async def relay_publish(bootstrap: str, url: str, n: int) -> float:
    db = Database(url)
    await db.migrate("common", COMMON_MIGRATIONS)
    topic = f"bench.outbox.{uuid.uuid4().hex[:8]}"
    now = time.time()
    rows = [
        {"event_id": str(uuid.uuid4()), "topic": topic, "key": str(i).encode(), "value": envelope(i), "created_at": now}
        for i in range(n)
    ]
    async with db.transaction() as conn:
        for start in range(0, n, 5000):
            await conn.execute(insert(outbox), rows[start : start + 5000])
    producer = make_producer(bootstrap)
    await producer.start()
    await producer.send_and_wait(topic, envelope(0))
    relay = OutboxRelay(db, producer, service="bench")
    t0 = time.perf_counter()
    sent = 0
    while sent < n:
        sent += await relay.publish_once()
    elapsed = time.perf_counter() - t0
    await producer.stop()
    await db.close()
    return n / elapsed


async def main(bootstrap: str, url: str, n: int) -> None:
    raw = await raw_produce(bootstrap, n)
    relay = await relay_publish(bootstrap, url, n)
    print(json.dumps({"raw_per_s": raw, "relay_per_s": relay}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
