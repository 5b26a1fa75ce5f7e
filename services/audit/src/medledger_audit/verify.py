"""Verifying the log against its storage: does what the database holds still produce what the
log signed?

`verify_log` (the `medledger audit verify` command) recomputes the whole tree from the entry rows:

1. every entry row from 0 to the tree size exists, and its RFC 6962 leaf hash is the one in the
   stored level-0 tiles — an edited, deleted or swapped row is named by its index;
2. the tiles recomputed from the entries equal the stored tiles at every level — a tile altered
   on its own is named by the first entry it covers;
3. every signed checkpoint's signatures verify with the log's keys, and its root is the root of
   the recomputed tree at its size — a log rewritten consistently (entries and tiles) cannot
   match a checkpoint signed before.

`verify_recent` is the service's incremental check (every few minutes): the entries appended
since the last check against the stored tiles, and the latest checkpoint against the stored tree.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from medledger_audit import storage, tile_store
from medledger_audit.checkpoints import Checkpointer
from medledger_runtime.db import Database
from medledger_verifier import notes, tlog

log = logging.getLogger(__name__)

CHUNK = 10_000


@dataclass(frozen=True)
class Divergence:
    """Where storage stops matching the log: the first entry index concerned (None when no
    single entry can be named), and what is wrong."""

    index: int | None
    problem: str


@dataclass(frozen=True)
class VerifyReport:
    tree_size: int
    entries_checked: int
    checkpoints_checked: int
    divergence: Divergence | None

    @property
    def ok(self) -> bool:
        return self.divergence is None


async def _check_entries(
    db: Database, stored: tlog.TileReader, start: int, end: int, tree_size: int
) -> tuple[list[bytes], Divergence | None]:
    """Leaf hashes of entries [start, end) recomputed from their rows, and the first divergence
    from the stored level-0 tiles."""
    async with db.read() as conn:
        rows = await storage.read_entries(conn, start, end)
    stored_leaves = await tlog.leaf_hashes(stored, start, end, tree_size)
    leaves: list[bytes] = []
    by_index = {int(r.entry_index): r for r in rows}
    for offset, stored_leaf in enumerate(stored_leaves):
        index = start + offset
        row = by_index.get(index)
        if row is None:
            return leaves, Divergence(index, f"entry {index} is missing from storage")
        if row.entry is None:
            leaves.append(stored_leaf)  # redacted: only its leaf hash remains, in the tiles
            continue
        leaf = tlog.leaf_hash(bytes(row.entry))
        if leaf != stored_leaf:
            return leaves, Divergence(
                index, f"entry {index} does not match its leaf hash in the tree (altered or moved)"
            )
        leaves.append(leaf)
    return leaves, None


async def verify_log(
    db: Database,
    verifiers: Sequence[notes.NoteVerifier],
    origin: str,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """The full check of the module's doc. `progress(done, total)` is called after each chunk."""
    async with db.read() as conn:
        tree_size, _ = await storage.read_state(conn)
    stored = tile_store.DatabaseTiles(db)
    recomputed = tlog.MemoryTiles()
    size = 0
    while size < tree_size:
        end = min(tree_size, size + CHUNK)
        leaves, divergence = await _check_entries(db, stored, size, end, tree_size)
        if divergence is not None:
            return VerifyReport(tree_size, divergence.index or 0, 0, divergence)
        result = await tlog.append(recomputed, size, leaves)
        recomputed.write(result.tiles)
        size = result.tree_size
        if progress is not None:
            progress(size, tree_size)
    divergence = await _compare_tiles(stored, recomputed, tree_size)
    if divergence is not None:
        return VerifyReport(tree_size, tree_size, 0, divergence)
    async with db.read() as conn:
        signed = await storage.checkpoints_of(conn, origin)
    for tree, note in signed:
        try:
            checkpoint, _ = notes.open_checkpoint(note, verifiers, origin=origin, require_all=True)
        except Exception as exc:
            return VerifyReport(tree_size, tree_size, 0, Divergence(None, f"checkpoint {tree} does not verify: {exc}"))
        if checkpoint.tree_size != tree or checkpoint.tree_size > tree_size:
            return VerifyReport(
                tree_size, tree_size, 0, Divergence(None, f"checkpoint {tree} is for a tree the log does not have")
            )
        if await tlog.tree_root(recomputed, checkpoint.tree_size) != checkpoint.root:
            return VerifyReport(
                tree_size,
                tree_size,
                0,
                Divergence(
                    None,
                    f"the entries up to {checkpoint.tree_size} do not produce the root signed in the checkpoint of "
                    "that size: the log was rewritten",
                ),
            )
    return VerifyReport(tree_size, tree_size, len(signed), None)


async def _compare_tiles(stored: tlog.TileReader, recomputed: tlog.MemoryTiles, tree_size: int) -> Divergence | None:
    for level in range(tlog.tile_levels(tree_size)):
        wanted = list(tlog.tiles_at(tree_size, level))
        for start in range(0, len(wanted), 1000):
            batch = wanted[start : start + 1000]
            ours = await recomputed.read_tiles(batch)
            theirs = await stored.read_tiles(batch)
            for tile, mine, kept in zip(batch, ours, theirs, strict=True):
                if mine != kept:
                    first = tile.index * tlog.TILE_WIDTH * (tlog.TILE_WIDTH**level)
                    return Divergence(first, f"stored tile {tile.path()} does not match the entries it covers")
    return None


async def verify_recent(
    db: Database, verifiers: Sequence[notes.NoteVerifier], origin: str, since: int
) -> tuple[int, Divergence | None]:
    """The incremental check from entry `since` on; returns the size checked up to."""
    async with db.read() as conn:
        tree_size, _ = await storage.read_state(conn)
        latest = await storage.latest_checkpoint(conn, origin)
    stored = tile_store.DatabaseTiles(db)
    start = since
    while start < tree_size:
        end = min(tree_size, start + CHUNK)
        _, divergence = await _check_entries(db, stored, start, end, tree_size)
        if divergence is not None:
            return start, divergence
        start = end
    if latest is not None:
        note, size = latest
        checkpoint, _ = notes.open_checkpoint(note, verifiers, origin=origin, require_all=True)
        if size > tree_size or await tlog.tree_root(stored, size) != checkpoint.root:
            return tree_size, Divergence(None, f"the stored tree does not produce the latest checkpoint ({size})")
    return tree_size, None


LAST_VERIFIED = Gauge(
    "medledger_audit_last_verified_timestamp_seconds",
    "When the service last verified its recent entries and latest checkpoint against storage (Unix time).",
)
VERIFY_FAILURES = Counter(
    "medledger_audit_verify_failures_total", "Incremental verifications that found storage diverging from the log."
)


class IncrementalVerifier:
    """The service's own check, every `interval` seconds: `verify_recent` from where the last
    successful check ended. A failure is logged with the entry it names and counted; the
    last-success time stops moving, which is what an alert watches."""

    def __init__(self, db: Database, checkpointer: Checkpointer, *, interval: float, origin: str) -> None:
        self.db = db
        self.checkpointer = checkpointer
        self.interval = interval
        self.origin = origin
        self.verified_up_to = 0

    async def check_once(self) -> Divergence | None:
        size, divergence = await verify_recent(self.db, self.checkpointer.verifiers, self.origin, self.verified_up_to)
        if divergence is None:
            self.verified_up_to = size
            LAST_VERIFIED.set(time.time())
            return None
        VERIFY_FAILURES.inc()
        log.error(
            "the audit log's storage diverges from the log",
            extra={"entry_index": divergence.index, "problem": divergence.problem},
        )
        return divergence

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_once()
            except Exception:
                log.exception("the incremental verification could not run")
