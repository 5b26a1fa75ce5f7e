"""(h) The audit log: entries committed per second from Kafka into the log, beside raw aiokafka
consumption of the same topic; inclusion-proof latency at 1,000,000 entries through the stored
tiles on PostgreSQL.

Usage:
  python bench_audit.py produce BOOTSTRAP TOPIC N
  python bench_audit.py raw BOOTSTRAP TOPIC N
  python bench_audit.py log BOOTSTRAP TOPIC N DATABASE_URL FOLDER
  python bench_audit.py proofs DATABASE_URL SIZE SAMPLES

`log` runs the pipeline as main wires it (LogConsumer on the service topic pattern, the Sequencer
on PostgreSQL through asyncpg, subjects from a local keyring), without the checkpointer, from the
start of the topic until all N entries are committed. `proofs` fills the tiles table of a SIZE-entry
tree (computed with tlog.append in memory, bulk-loaded by COPY; proofs need no entry rows), then
times tlog.inclusion_proof(DatabaseTiles(db), index, SIZE) for random indexes, one at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import statistics
import sys
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from medledger.events.v1 import consent_events_pb2, records_events_pb2
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_audit import storage, tile_store
from medledger_audit.entries import subject_key_name
from medledger_audit.handlers import LogConsumer
from medledger_audit.sequencer import Sequencer
from medledger_runtime import events
from medledger_runtime.db import Database
from medledger_runtime.kafka import ensure_topics, make_producer
from medledger_runtime.keys import KeyType, LocalKeyring, create_master_key_file
from medledger_runtime.outbox import COMMON_MIGRATIONS
from medledger_verifier import tlog

PATIENTS = 3000
PRACTITIONERS = 200


def envelope(i: int, rng: random.Random) -> events.Event:
    """A realistic event: a record stored, a record disclosed or a consent decision, in the
    proportions a busy platform has them (reads dominate, each read with its decision)."""
    patient = f"pat_{rng.randrange(PATIENTS):032x}"
    practitioner = f"prn_{rng.randrange(PRACTITIONERS):032x}"
    record = f"rec_{rng.randrange(PATIENTS * 20):032x}"
    kind = i % 5
    payload: object
    if kind == 0:
        source, topic_key = "medledger.records", record
        payload = records_events_pb2.RecordStored(
            record_id=record,
            version=rng.randrange(1, 9),
            patient_id=patient,
            category=vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS,
            commitment=hashlib.sha256(str(i).encode()).hexdigest(),
            written_by=practitioner,
        )
    elif kind in (1, 2):
        source, topic_key = "medledger.records", record
        payload = records_events_pb2.RecordDisclosed(
            record_id=record,
            version=rng.randrange(1, 9),
            patient_id=patient,
            actor_id=practitioner,
            purpose=vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT,
            decision_id=f"dec_{uuid.uuid4().hex}",
        )
    else:
        source, topic_key = "medledger.consent", patient
        payload = consent_events_pb2.ConsentDecisionRecorded(
            decision_id=f"dec_{uuid.uuid4().hex}",
            patient_id=patient,
            actor_id=practitioner,
            action=vocab.Action.ACTION_READ,
            category=vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS,
            purpose=vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT,
            decision="DECISION_PERMIT",
            reason_code="consent",
            deciding=[f"con_{rng.randrange(PATIENTS * 2):032x}@{rng.randrange(1, 4)}"],
            rule_version="2026-11",
        )
        payload.decided_at.GetCurrentTime()
    del topic_key
    return events.new_event(source=source, payload=payload, aggregate_id=patient, version=1)  # type: ignore[arg-type]


async def produce(bootstrap: str, topic: str, n: int) -> None:
    await ensure_topics(bootstrap, [topic])
    rng = random.Random(6)
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        for start in range(0, n, 5000):
            futures = []
            for i in range(start, min(n, start + 5000)):
                e = envelope(i, rng)
                futures.append(await producer.send(topic, e.SerializeToString(), key=e.id.encode()))
            await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def raw(bootstrap: str, topic: str, n: int) -> dict[str, float]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"raw-{uuid.uuid4().hex[:6]}", auto_offset_reset="earliest"
    )
    await consumer.start()
    seen = 0
    t0 = None
    try:
        while seen < n:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            if batch and t0 is None:
                t0 = time.perf_counter()
            seen += sum(len(r) for r in batch.values())
        elapsed = time.perf_counter() - (t0 or time.perf_counter())
    finally:
        await consumer.stop()
    return {"per_s": n / elapsed, "seconds": elapsed}


async def keyring_with_patients(folder: Path) -> LocalKeyring:
    """A local keyring already holding every patient's audit key: a platform in steady state.

    Made in ONE keyring write (the keyring's own key format, through its internals): created one
    by one, each new key rewrites the whole sealed file, and 3,000 of them take minutes. What a
    new patient's first entry costs is measured apart (`new_patient_key_ms`).
    """
    from medledger_runtime.keys import local

    master = create_master_key_file(folder / "master.key")
    keys = await LocalKeyring.open(folder / "keyrings" / "audit.keyring", master)
    ring = dict(keys._keys)
    for p in range(PATIENTS):
        ring[subject_key_name(f"pat_{p:032x}")] = local._Key(
            type=KeyType.HMAC,
            latest_version=1,
            min_decryption_version=1,
            deletion_allowed=False,
            versions={1: local._Version(created=local._now(), secret=local._new_secret(KeyType.HMAC))},
        )
    async with keys._lock:
        await keys._persist(ring)
    return keys


async def log_pipeline(bootstrap: str, topic: str, n: int, url: str, folder: Path) -> dict[str, float]:
    db = Database(url)
    await db.migrate("common", COMMON_MIGRATIONS)
    await db.migrate("audit", storage.MIGRATIONS)
    keys = await keyring_with_patients(folder)
    sequencer = Sequencer(db, keys)
    done = asyncio.Event()
    appends = 0

    def grew(size: int) -> None:
        nonlocal appends
        appends += 1
        if size >= n:
            done.set()

    sequencer.after_append = grew
    producer = make_producer(bootstrap)
    await producer.start()
    consumer = LogConsumer(
        bootstrap_servers=bootstrap, sequencer=sequencer, producer=producer, group_id=f"audit-bench-{uuid.uuid4().hex}"
    )
    # The service topic pattern, narrowed to this topic: other sections' services publish on the
    # platform's topics of the same broker.
    consumer.pattern = f"^{re.escape(topic)}$"
    await consumer.start()
    # Timed from the first poll that returns messages, as the raw loop is.
    t0: float | None = None
    getmany = consumer.consumer.getmany

    async def timed_getmany(*args: object, **kwargs: object) -> object:
        nonlocal t0
        polled = await getmany(*args, **kwargs)  # type: ignore[arg-type]
        if polled and t0 is None:
            t0 = time.perf_counter()
        return polled

    consumer.consumer.getmany = timed_getmany  # type: ignore[method-assign]
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(done.wait(), 600)
        elapsed = time.perf_counter() - (t0 or time.perf_counter())
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.stop()
        await producer.stop()
        await sequencer.close()
    # A new patient's first entry creates their key: one keyring write, timed on this keyring.
    t = time.perf_counter()
    for p in range(20):
        await keys.ensure_key(subject_key_name(f"pat_new_{p}"), KeyType.HMAC)
    new_patient_key_ms = (time.perf_counter() - t) / 20 * 1000
    size, _root = await sequencer.state()
    async with db.read() as conn:
        rows = await conn.exec_driver_sql("SELECT count(*) FROM entries")
        stored = rows.scalar_one()
    await keys.aclose()
    await db.close()
    if size != n or stored != n:
        raise RuntimeError(f"expected {n} entries, the log holds {size} (rows {stored})")
    return {"per_s": n / elapsed, "seconds": elapsed, "appends": appends, "new_patient_key_ms": new_patient_key_ms}


async def proofs(url: str, size: int, samples: int) -> dict[str, float]:
    db = Database(url)
    await db.migrate("common", COMMON_MIGRATIONS)
    await db.migrate("audit", storage.MIGRATIONS)
    started = time.perf_counter()
    memory = tlog.MemoryTiles()
    tree_size = 0
    root = tlog.EMPTY_ROOT
    batch = 100_000
    while tree_size < size:
        count = min(batch, size - tree_size)
        leaves = [tlog.leaf_hash(b"entry %d" % i) for i in range(tree_size, tree_size + count)]
        result = await tlog.append(memory, tree_size, leaves)
        memory.write(result.tiles)
        tree_size, root = result.tree_size, result.root
    computed = time.perf_counter() - started
    conn = await db.connect_driver()
    try:
        await conn.copy_records_to_table(
            "tiles",
            records=[(level, index, data) for (level, index), data in memory.tiles.items()],
            columns=["level", "tile_index", "hashes"],
        )
        await conn.execute("UPDATE log_state SET tree_size = $1, root = $2 WHERE id = 1", tree_size, root)
        await conn.execute("ANALYZE tiles")
    finally:
        await conn.close()
    loaded = time.perf_counter() - started - computed
    reader = tile_store.DatabaseTiles(db)
    if await tlog.tree_root(reader, size) != root:
        raise RuntimeError("the stored tiles do not give the computed root")
    rng = random.Random(9)
    # Correct proofs: a few verified against the root.
    for index in [0, size - 1, *(rng.randrange(size) for _ in range(20))]:
        proof = await tlog.inclusion_proof(reader, index, size)
        if not tlog.verify_inclusion(index, size, tlog.leaf_hash(b"entry %d" % index), proof, root):
            raise RuntimeError(f"the inclusion proof of {index} does not verify")
    for _ in range(50):  # warm the pool and the cache
        await tlog.inclusion_proof(reader, rng.randrange(size), size)
    timings = []
    for _ in range(samples):
        index = rng.randrange(size)
        t = time.perf_counter()
        await tlog.inclusion_proof(reader, index, size)
        timings.append(time.perf_counter() - t)
    await db.close()
    timings.sort()
    return {
        "tree_size": size,
        "tiles": len(memory.tiles),
        "compute_s": computed,
        "load_s": loaded,
        "samples": samples,
        "p50_ms": statistics.median(timings) * 1000,
        "p99_ms": timings[int(len(timings) * 0.99) - 1] * 1000,
    }


async def main() -> None:
    mode = sys.argv[1]
    if mode == "produce":
        await produce(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif mode == "raw":
        print(json.dumps(await raw(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    elif mode == "log":
        bootstrap, topic, n, url, folder = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], Path(sys.argv[6])
        print(json.dumps(await log_pipeline(bootstrap, topic, n, url, folder)))
    elif mode == "proofs":
        print(json.dumps(await proofs(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    asyncio.run(main())
