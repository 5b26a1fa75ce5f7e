"""Verifying the log against its storage and its witnesses: does what the database holds still
produce what the log signed, and what the chain witnessed?

`verify_log` (the `medledger audit verify` command) recomputes the whole tree from the entry rows:

1. the log's state row and tables exist, and no entry row lies beyond the state's tree size;
2. every entry row from 0 to the tree size exists, and its RFC 6962 leaf hash is the one in the
   stored level-0 tiles — an edited, deleted or swapped row is named by its index;
3. every lookup column of a row (event id, type, subject, record, commitment, actor, times) is
   what its entry's bytes say (`columns`) — what queries find entries by cannot be changed alone;
4. a row without bytes (redacted) is named, with its leaf hash, by an `entry.redacted` entry;
5. the tiles recomputed from the entries equal the stored tiles at every level — a tile altered
   on its own is named by the first entry it covers — and the state's root is theirs;
6. every signed checkpoint's signatures verify with the log's keys, and its root is the root of
   the recomputed tree at its size — a log rewritten consistently (entries and tiles) cannot
   match a checkpoint signed before;
7. given them, the witnesses outside the database (`witnesses`): the newest checkpoint the log
   remembers signing (its last-checkpoint file) is stored and matches, and the chain's latest
   anchored checkpoint is covered by, and consistent with, the stored tree.

It reports how many entries no signed checkpoint covers yet (the newest ones, normally fewer
than a checkpoint interval's worth). Every divergence is named, with a kind (`findings`); checks
that cannot run say why. Read against a live log, an append or redaction between two reads may
show as a divergence: verify a copy, or run it again.

`verify_recent` is the service's incremental check (every few minutes): the entries appended
since the last check, their lookup columns included, against the stored tiles, and the latest
checkpoint against the stored tree.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge
from sqlalchemy import inspect

from medledger_audit import columns, storage, tile_store
from medledger_audit.checkpoints import Checkpointer
from medledger_audit.entries import REDACTION
from medledger_audit.findings import Divergence, Finding
from medledger_audit.witnesses import ChainWitness, RememberedCheckpoint, check_chain, check_remembered
from medledger_runtime.db import Database
from medledger_runtime.errors import DataLoss
from medledger_verifier import notes, tlog

__all__ = ["Divergence", "Finding", "NotAnAuditLog", "VerifyReport", "verify_log", "verify_recent"]

log = logging.getLogger(__name__)

CHUNK = 10_000
# Rows whose lookup columns diverge are named one by one up to this many, then counted.
MAX_NAMED_ROWS = 20
TABLES = ("entries", "tiles", "checkpoints", "log_state")


class NotAnAuditLog(Exception):
    """The database holds none of the log's tables: a wrong URL, not a divergence."""


@dataclass
class VerifyReport:
    tree_size: int
    entries_checked: int = 0
    checkpoints_checked: int = 0
    divergences: list[Divergence] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    # The size of the newest signed checkpoint that verifies (0: none).
    newest_checkpoint: int = 0
    redacted: int = 0
    # Oversize entries, whose record, commitment and actor columns their bytes cannot confirm.
    unchecked_lookups: int = 0
    # Whether every row was read and matched its leaf hash and its lookup columns.
    entries_sound: bool = False
    # False when the log's state or tables are gone: there was no tree to check.
    state_found: bool = True

    @property
    def ok(self) -> bool:
        return not self.divergences

    @property
    def divergence(self) -> Divergence | None:
        """The first divergence found."""
        return self.divergences[0] if self.divergences else None

    @property
    def uncovered(self) -> int:
        """Entries that no signed checkpoint covers."""
        return max(0, self.tree_size - self.newest_checkpoint)


@dataclass
class _Scan:
    """What a pass over entry rows collects besides their leaf hashes."""

    rows: list[Divergence] = field(default_factory=list)  # column and unreadable-entry divergences
    diverging_rows: int = 0
    redacted: dict[int, bytes] = field(default_factory=dict)  # rows without bytes: their stored leaf
    redactions: dict[int, str] = field(default_factory=dict)  # entry.redacted: index -> leaf hash (hex)
    unchecked: int = 0

    def row_diverges(self, divergence: Divergence) -> None:
        self.diverging_rows += 1
        if len(self.rows) < MAX_NAMED_ROWS:
            self.rows.append(divergence)


async def _check_entries(
    db: Database, stored: tlog.TileReader, start: int, end: int, tree_size: int, scan: _Scan
) -> tuple[list[bytes], Divergence | None]:
    """Leaf hashes of entries [start, end) recomputed from their rows, and the first divergence
    from the stored level-0 tiles; lookup columns and redactions go into `scan`."""
    async with db.read() as conn:
        rows = await storage.read_entries(conn, start, end)
    try:
        stored_leaves = await tlog.leaf_hashes(stored, start, end, tree_size)
    except DataLoss as exc:
        problem = f"{exc.message}: the leaf hashes of entries {start} to {end - 1} cannot be read"
        return [], Divergence(None, problem, "missing-tile")
    leaves: list[bytes] = []
    by_index = {int(r.entry_index): r for r in rows}
    for offset, stored_leaf in enumerate(stored_leaves):
        index = start + offset
        row = by_index.get(index)
        if row is None:
            return leaves, Divergence(index, f"entry {index} is missing from storage", "missing-entry")
        if row.entry is None:
            scan.redacted[index] = stored_leaf  # only its leaf hash remains, in the tiles
            leaves.append(stored_leaf)
            continue
        data = bytes(row.entry)
        leaf = tlog.leaf_hash(data)
        if leaf != stored_leaf:
            return leaves, Divergence(
                index, f"entry {index} does not match its leaf hash in the tree (altered or moved)", "altered-entry"
            )
        leaves.append(leaf)
        _check_row(index, row, data, scan)
    return leaves, None


def _check_row(index: int, row: object, data: bytes, scan: _Scan) -> None:
    try:
        entry = columns.parse_entry(data)
    except columns.UnreadableEntry as exc:
        scan.row_diverges(Divergence(index, f"entry {index} is unreadable: {exc}", "unreadable-entry"))
        return
    wrong, checkable = columns.mismatched_columns(row, entry)
    if not checkable:
        scan.unchecked += 1
    if wrong:
        scan.row_diverges(
            Divergence(
                index,
                f"entry {index}'s indexed column(s) {', '.join(wrong)} differ from its bytes: queries by them "
                "would find the wrong entries",
                "column",
            )
        )
    if entry["type"] == REDACTION:
        redacted, leaf_hex = entry.get("redacted_index"), entry.get("redacted_leaf_hash")
        if isinstance(redacted, int) and isinstance(leaf_hex, str):
            scan.redactions[redacted] = leaf_hex


def _unrecorded_redactions(scan: _Scan) -> list[Divergence]:
    found = []
    for index, leaf in sorted(scan.redacted.items()):
        recorded = scan.redactions.get(index)
        if recorded is None:
            problem = f"entry {index} has no bytes, and no entry.redacted entry records its redaction (deleted)"
        elif recorded != leaf.hex():
            problem = f"entry {index} has no bytes, and the entry.redacted naming it records another leaf hash"
        else:
            continue
        found.append(Divergence(index, problem, "unrecorded-redaction"))
    return found


async def verify_log(
    db: Database,
    verifiers: Sequence[notes.NoteVerifier],
    origin: str,
    *,
    progress: Callable[[int, int], None] | None = None,
    remembered: RememberedCheckpoint | None = None,
    chain: ChainWitness | None = None,
) -> VerifyReport:
    """The full check of the module's doc. `progress(done, total)` is called after each chunk.
    Raises NotAnAuditLog when the database holds none of the log's tables."""
    async with db.read() as conn:
        present = set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
    missing = [t for t in TABLES if t not in present]
    if len(missing) == len(TABLES):
        raise NotAnAuditLog("the database holds none of the audit log's tables")
    if missing:
        gone = Divergence(None, f"the log's table(s) {', '.join(missing)} are gone", "state")
        return VerifyReport(0, divergences=[gone], state_found=False)
    async with db.read() as conn:
        highest = await storage.highest_entry_index(conn)  # before the state: appends only raise it
        state = await storage.find_state(conn)
    if state is None:
        gone = Divergence(None, "the log's state row (log_state) is gone", "state")
        return VerifyReport(0, divergences=[gone], state_found=False)
    tree_size, state_root = state
    report = VerifyReport(tree_size)
    if highest is not None and highest >= tree_size:
        report.divergences.append(
            Divergence(
                tree_size,
                f"entry rows run to index {highest}, beyond the log's tree size {tree_size} in its state row: "
                "the state was rolled back, or rows were added",
                "state",
            )
        )
    stored = tile_store.DatabaseTiles(db)
    recomputed = tlog.MemoryTiles()
    scan = _Scan()
    size = 0
    while size < tree_size:
        end = min(tree_size, size + CHUNK)
        leaves, divergence = await _check_entries(db, stored, size, end, tree_size, scan)
        if divergence is not None:
            report.entries_checked = size if divergence.index is None else divergence.index
            report.divergences += [divergence, *scan.rows]
            return report
        result = await tlog.append(recomputed, size, leaves)
        recomputed.write(result.tiles)
        size = result.tree_size
        if progress is not None:
            progress(size, tree_size)
    report.entries_checked, report.redacted, report.unchecked_lookups = tree_size, len(scan.redacted), scan.unchecked
    report.entries_sound = not scan.rows
    report.divergences += scan.rows
    if scan.diverging_rows > len(scan.rows):
        more = scan.diverging_rows - len(scan.rows)
        report.divergences.append(Divergence(None, f"and {more} more rows whose columns diverge", "column"))
    divergence = await _compare_tiles(stored, recomputed, tree_size)
    if divergence is not None:
        report.divergences.append(divergence)
        return report
    if await tlog.tree_root(recomputed, tree_size) != state_root:
        report.divergences.append(
            Divergence(None, f"the state row's root is not the root of the {tree_size} stored entries", "state")
        )
    report.divergences += _unrecorded_redactions(scan)
    async with db.read() as conn:
        signed = dict(await storage.checkpoints_of(conn, origin))
    await _check_checkpoints(db, report, signed, verifiers, origin, recomputed)
    if remembered is not None:
        finding, found = await check_remembered(remembered, verifiers, origin, signed, tree_size, recomputed)
        report.findings.append(finding)
        report.divergences += found
    if chain is not None:
        finding, found = await check_chain(chain, origin, signed, tree_size, recomputed)
        report.findings.append(finding)
        report.divergences += found
    return report


async def _check_checkpoints(
    db: Database,
    report: VerifyReport,
    signed: dict[int, str],
    verifiers: Sequence[notes.NoteVerifier],
    origin: str,
    recomputed: tlog.TileReader,
) -> None:
    tree_size = report.tree_size
    for tree, note in sorted(signed.items()):
        try:
            checkpoint, _ = notes.open_checkpoint(note, verifiers, origin=origin, require_all=True)
        except Exception as exc:
            report.divergences.append(Divergence(None, f"checkpoint {tree} does not verify: {exc}", "checkpoint"))
            continue
        if checkpoint.tree_size != tree:
            problem = f"the checkpoint stored as size {tree} is signed for size {checkpoint.tree_size}"
            report.divergences.append(Divergence(None, problem, "checkpoint"))
        elif tree > tree_size and await _grew_since(db, tree):
            continue  # signed after this verification read the state: a later one checks it
        elif tree > tree_size:
            problem = (
                f"checkpoint {tree} is for a tree larger than the stored log ({tree_size} entries): the log was "
                "rolled back or truncated"
            )
            report.divergences.append(Divergence(tree_size, problem, "checkpoint-beyond"))
        elif await tlog.tree_root(recomputed, tree) != checkpoint.root:
            problem = (
                f"the entries up to {tree} do not produce the root signed in the checkpoint of that size: "
                "the log was rewritten"
            )
            report.divergences.append(Divergence(None, problem, "rewritten"))
        else:
            report.checkpoints_checked += 1
            report.newest_checkpoint = max(report.newest_checkpoint, tree)
    if tree_size == 0:
        detail = "the log is empty"
    elif report.uncovered:
        covered = report.newest_checkpoint
        detail = (
            f"{report.uncovered} of {tree_size} entries (indexes {covered} to {tree_size - 1}) are covered by no "
            "signed checkpoint"
        )
    else:
        detail = f"every one of the {tree_size} entries is covered by a signed checkpoint"
    report.findings.append(Finding("coverage", True, detail))


async def _grew_since(db: Database, size: int) -> bool:
    """Whether the log (read live) now holds `size` entries: a live log keeps appending."""
    async with db.read() as conn:
        state = await storage.find_state(conn)
    return state is not None and state[0] >= size


async def _compare_tiles(stored: tlog.TileReader, recomputed: tlog.MemoryTiles, tree_size: int) -> Divergence | None:
    for level in range(tlog.tile_levels(tree_size)):
        wanted = list(tlog.tiles_at(tree_size, level))
        for start in range(0, len(wanted), 1000):
            batch = wanted[start : start + 1000]
            ours = await recomputed.read_tiles(batch)
            try:
                theirs = await stored.read_tiles(batch)
            except DataLoss as exc:
                first = batch[0].index * tlog.TILE_WIDTH * (tlog.TILE_WIDTH**level)
                return Divergence(first, exc.message, "missing-tile")
            for tile, mine, kept in zip(batch, ours, theirs, strict=True):
                if mine != kept:
                    first = tile.index * tlog.TILE_WIDTH * (tlog.TILE_WIDTH**level)
                    return Divergence(first, f"stored tile {tile.path()} does not match the entries it covers", "tile")
    return None


async def verify_recent(
    db: Database, verifiers: Sequence[notes.NoteVerifier], origin: str, since: int
) -> tuple[int, Divergence | None]:
    """The incremental check from entry `since` on; returns the size checked up to. (Redactions
    are left to `verify_log`: an entry's redaction may land after the range checked.)"""
    async with db.read() as conn:
        state = await storage.find_state(conn)
        latest = await storage.latest_checkpoint(conn, origin)
    if state is None:
        return since, Divergence(None, "the log's state row (log_state) is gone", "state")
    tree_size, _ = state
    stored = tile_store.DatabaseTiles(db)
    start = since
    while start < tree_size:
        end = min(tree_size, start + CHUNK)
        scan = _Scan()
        _, divergence = await _check_entries(db, stored, start, end, tree_size, scan)
        if divergence is not None or scan.rows:
            return start, divergence or scan.rows[0]
        start = end
    if latest is not None:
        note, size = latest
        try:
            checkpoint, _ = notes.open_checkpoint(note, verifiers, origin=origin, require_all=True)
            sound = size <= tree_size and await tlog.tree_root(stored, size) == checkpoint.root
        except Exception:  # a note that does not verify, or tiles gone: either way it diverges
            sound = False
        if not sound:
            return tree_size, Divergence(
                None, f"the stored tree does not produce the latest checkpoint ({size})", "checkpoint"
            )
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
