"""The sequencer: the one writer that appends entries to the log.

An append has two steps. `prepare` makes drafts into entries: the subject of each (an HMAC under
the patient's key), its JCS bytes with the integration time, its leaf hash; it needs no lock, so
the log consumer prepares one poll while the previous one is being appended. `append_prepared`
is one transaction per chunk: take the sequencer lock, read the tree's size, drop entries whose
event id the log already holds (the log is its own inbox), extend the tree with ``tlog.append``
over the stored tiles, and write entries, tiles, side lists and the new size and root. Nothing
else writes entries or tiles, and the lock makes the appends of all replicas one sequence:
PostgreSQL's ``pg_advisory_xact_lock`` waits, so a second replica waits for the first's
transaction and then appends after it (and takes over when it is gone).

An erasure deletes the patient's audit key once its entry is durable, and every entry after it
must get its subject from the new key: so drafts after an erasure are prepared only once that
erasure's chunk has committed and the key is gone (``PreparedBatch.later``).

Built for throughput: thousands of drafts per transaction, each write one statement of arrays
on PostgreSQL (asyncpg, see ``tile_store.PgAppend``), and no CPU work inside the locked transaction
but the tree's hashes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from medledger_audit import columns, storage, tile_store
from medledger_audit.entries import UNPROCESSABLE, EntryDraft, encode_entry, subject_key_name
from medledger_runtime.db import Database, lock_key
from medledger_runtime.errors import NotFound
from medledger_runtime.keys import KeyManager, KeyShredder, KeyType
from medledger_verifier import tlog

log = logging.getLogger(__name__)

APPEND_LOCK = "audit-sequencer"
# Drafting and preparing a poll are thousands of messages of CPU work; they let the event loop
# run every this many, so the append in flight (a dozen round trips to the database) is not
# held up behind them.
YIELD_EVERY = 250
ERASURE_TYPE = "erasure.completed"
ENTRIES_APPENDED = Counter("medledger_audit_entries_appended_total", "Entries appended to the log.")
DUPLICATES_SKIPPED = Counter(
    "medledger_audit_duplicates_skipped_total", "Events not appended because the log already held their id."
)
UNPROCESSABLE_TOTAL = Counter(
    "medledger_audit_unprocessable_total",
    "Messages the log could not parse, appended as `unprocessable` entries (alert on any).",
)
TREE_SIZE = Gauge("medledger_audit_tree_size", "Entries in the log as of this replica's last append.")
APPEND_SECONDS = Histogram(
    "medledger_audit_append_seconds",
    "Time of one append transaction, lock wait included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


@dataclass(frozen=True)
class PreparedEntry:
    """A draft made into the entry the log will hold (its index is given at the append)."""

    draft: EntryDraft
    subject: str | None
    entry: bytes
    leaf_hash: bytes
    integrated_time: float
    # The record id, commitment and actor it is found by (`lookup_columns`).
    lookup: tuple[str | None, str | None, str | None]


@dataclass(frozen=True)
class PreparedBatch:
    """Drafts prepared for appending, in chunks of one transaction each; `later` holds the drafts
    after the first erasure, prepared only once it is done (see the module)."""

    chunks: list[list[PreparedEntry]]
    later: list[EntryDraft]

    def __len__(self) -> int:
        return sum(len(c) for c in self.chunks) + len(self.later)

    @property
    def erases(self) -> bool:
        """Whether appending this batch deletes a patient's key: a batch prepared after it must
        wait for it (its subjects would come from the key about to be deleted)."""
        return bool(self.chunks) and self.chunks[-1][-1].draft.type == ERASURE_TYPE


@dataclass(frozen=True)
class AppendOutcome:
    """The tree after an append, and what the append did with its drafts."""

    tree_size: int
    root: bytes
    appended: int
    duplicates: int
    unprocessable: int = 0


class Subjects:
    """An entry's `subject`: HMAC-SHA-256 of the patient id under the patient's own audit key.

    Only the fact that a key exists is cached, never an HMAC: after an erasure (possibly by
    another replica) no cached value can keep linking new entries to the erased patient.
    """

    def __init__(self, keys: KeyManager, shredder: KeyShredder | None = None) -> None:
        self.keys = keys
        # Erasure destroys the key through the erasure credential (the everyday one cannot).
        self.shredder = shredder or KeyShredder(keys)
        self._known: set[str] = set()

    async def of(self, patient_ids: Iterable[str]) -> dict[str, str]:
        ids = sorted(set(patient_ids))
        names = [subject_key_name(p) for p in ids]
        new = [name for name in names if name not in self._known]
        await asyncio.gather(*(self.keys.ensure_key(name, KeyType.HMAC) for name in new))
        self._known.update(new)
        try:
            values = await self.keys.hmac_many([(name, p.encode()) for name, p in zip(names, ids, strict=True)])
        except NotFound:  # a key erased by another replica since: one by one, making it anew
            values = await asyncio.gather(*(self._one(p) for p in ids))
        return dict(zip(ids, values, strict=True))

    async def _one(self, patient_id: str) -> str:
        name = subject_key_name(patient_id)
        if name not in self._known:
            await self.keys.ensure_key(name, KeyType.HMAC)
            self._known.add(name)
        try:
            return await self.keys.hmac(name, patient_id.encode())
        except NotFound:  # erased by another replica since: a new key, unlinkable to the old
            await self.keys.ensure_key(name, KeyType.HMAC)
            return await self.keys.hmac(name, patient_id.encode())

    async def erase(self, patient_id: str) -> None:
        """Delete the patient's audit key: their entries' subjects can no longer be linked to them."""
        name = subject_key_name(patient_id)
        self._known.discard(name)
        await self.shredder.shred(name)  # a redelivered erasure finds it gone: done


def lookup_columns(draft: EntryDraft) -> tuple[str | None, str | None, str | None]:
    """The record id, commitment and actor an entry is found by (`columns`, which verify uses too)."""
    return columns.lookup_columns(draft.type, draft.fields)


def chunks_of(drafts: Sequence[EntryDraft], max_batch: int) -> list[list[EntryDraft]]:
    """Batches of at most `max_batch` drafts, each ending at an erasure if it holds one: the
    patient's key is deleted once their erasure is durable, before any later entry is made."""
    out: list[list[EntryDraft]] = [[]]
    for draft in drafts:
        if len(out[-1]) >= max_batch:
            out.append([])
        out[-1].append(draft)
        if draft.type == ERASURE_TYPE:
            out.append([])
    return [c for c in out if c]


class Sequencer:
    """Appends drafts to the log; see the module. One per process; calls are serialized."""

    def __init__(
        self,
        db: Database,
        keys: KeyManager,
        *,
        max_batch: int = 5000,
        lock_name: str = APPEND_LOCK,
        use_driver: bool = True,
        shredder: KeyShredder | None = None,
    ) -> None:
        self.db = db
        self.subjects = Subjects(keys, shredder)
        self.max_batch = max_batch
        self.lock_name = lock_name
        # PostgreSQL through asyncpg (the fast path) unless told otherwise (tests compare both).
        self.use_driver = use_driver and db.is_postgres
        # Called with the new tree size after every append that grew the tree (the checkpointer).
        self.after_append: Callable[[int], None] | None = None
        self._driver: Any = None
        self._serial = asyncio.Lock()

    async def append(self, drafts: Sequence[EntryDraft]) -> AppendOutcome:
        """Append every draft whose event id the log does not hold yet; returns once they are
        durable. Drafts keep their order; a repeated event id within `drafts` counts once."""
        return await self.append_prepared(await self.prepare(drafts))

    async def prepare(self, drafts: Sequence[EntryDraft]) -> PreparedBatch:
        """Make drafts into entries, up to and including the first erasure (see the module)."""
        chunks: list[list[PreparedEntry]] = []
        pending = chunks_of(drafts, self.max_batch)
        while pending:
            chunk = pending.pop(0)
            subjects = await self.subjects.of(d.patient_id for d in chunk if d.patient_id)
            integrated_time = time.time()
            prepared = []
            for n, draft in enumerate(chunk, 1):
                if n % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                subject = subjects[draft.patient_id] if draft.patient_id else None
                entry = encode_entry(draft, subject, integrated_time)
                prepared.append(
                    PreparedEntry(draft, subject, entry, tlog.leaf_hash(entry), integrated_time, lookup_columns(draft))
                )
            chunks.append(prepared)
            if chunk[-1].type == ERASURE_TYPE:
                break
        return PreparedBatch(chunks, [d for c in pending for d in c])

    async def append_prepared(self, batch: PreparedBatch) -> AppendOutcome:
        """Append a prepared batch (and its `later` drafts, prepared as their turn comes)."""
        async with self._serial:
            outcome: AppendOutcome | None = None
            appended = duplicates = unprocessable = 0
            while True:
                for chunk in batch.chunks:
                    outcome = await self._append_chunk(chunk)
                    appended += outcome.appended
                    duplicates += outcome.duplicates
                    unprocessable += outcome.unprocessable
                    for prepared in chunk:
                        draft = prepared.draft
                        # Also for a duplicate: a crash between the erasure's commit and the
                        # key's deletion redelivers the event, and this is where it is deleted.
                        if draft.type == ERASURE_TYPE and draft.patient_id:
                            await self.subjects.erase(draft.patient_id)
                if not batch.later:
                    break
                batch = await self.prepare(batch.later)
            if outcome is None:
                size, root = await self.state()
                return AppendOutcome(size, root, 0, 0)
            return AppendOutcome(outcome.tree_size, outcome.root, appended, duplicates, unprocessable)

    async def state(self) -> tuple[int, bytes]:
        async with self.db.read() as conn:
            return await storage.read_state(conn)

    async def close(self) -> None:
        if self._driver is not None:
            driver, self._driver = self._driver, None
            await driver.close()

    async def _append_chunk(self, drafts: list[PreparedEntry]) -> AppendOutcome:
        started = time.perf_counter()
        if self.use_driver:
            outcome = await self._append_pg(drafts)
        else:
            outcome = await self._append_sql(drafts)
        APPEND_SECONDS.observe(time.perf_counter() - started)
        ENTRIES_APPENDED.inc(outcome.appended)
        DUPLICATES_SKIPPED.inc(outcome.duplicates)
        UNPROCESSABLE_TOTAL.inc(outcome.unprocessable)
        TREE_SIZE.set(outcome.tree_size)
        if outcome.appended and self.after_append is not None:
            self.after_append(outcome.tree_size)
        return outcome

    async def _append_pg(self, drafts: list[PreparedEntry]) -> AppendOutcome:
        if self._driver is None:
            self._driver = await self.db.connect_driver()
        conn = self._driver
        try:
            async with tile_store.pg_transaction(conn):
                # Waits for another replica's append to commit: appends form one sequence.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(self.lock_name))
                return await self._append_in(tile_store.PgAppend(conn), drafts)
        except BaseException:
            # The connection's state is unknown (e.g. cancelled mid-statement): a new one next time.
            self._driver = None
            conn.terminate()
            raise

    async def _append_sql(self, drafts: list[PreparedEntry]) -> AppendOutcome:
        while True:
            async with self.db.transaction() as conn:
                if self.db.is_postgres:
                    await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({lock_key(self.lock_name)})")
                    return await self._append_in(tile_store.SqlAppend(conn), drafts)
                # SQLite: one process on the host holds the sequencer's file lock; others wait.
                if await self.db.try_xact_lock(conn, self.lock_name):
                    return await self._append_in(tile_store.SqlAppend(conn), drafts)
            await asyncio.sleep(0.2)

    async def _append_in(
        self, store: tile_store.PgAppend | tile_store.SqlAppend, prepared: list[PreparedEntry]
    ) -> AppendOutcome:
        size, root = await store.state()
        unique: dict[str, PreparedEntry] = {}
        for p in prepared:
            unique.setdefault(p.draft.event_id, p)
        logged = await store.logged_event_ids(list(unique))
        new = [p for p in unique.values() if p.draft.event_id not in logged]
        duplicates = len(prepared) - len(new)
        if not new:
            return AppendOutcome(size, root, 0, duplicates)
        rows: list[storage.EntryRow] = []
        lists: dict[str, list[str]] = {}
        for offset, p in enumerate(new):
            draft = p.draft
            record_id, commitment, actor = p.lookup
            rows.append(
                storage.EntryRow(
                    size + offset,
                    draft.event_id,
                    p.entry,
                    draft.type,
                    p.subject,
                    record_id,
                    commitment,
                    actor,
                    draft.event_time,
                    p.integrated_time,
                )
            )
            lists.update(draft.side_lists)
        result = await tlog.append(store.tiles, size, [p.leaf_hash for p in new])
        await store.write(rows, result.tiles, lists, result.tree_size, result.root)
        unprocessable = sum(1 for p in new if p.draft.type == UNPROCESSABLE)
        return AppendOutcome(result.tree_size, result.root, len(new), duplicates, unprocessable)
