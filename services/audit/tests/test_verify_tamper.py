"""`medledger audit verify` against tampered copies of a real PostgreSQL and a SQLite audit
database, with the log's checkpoints anchored in an AnchorRegistry on a real Anvil.

One sound log is built per database (640 entries of several types, one of them redacted as the
API redacts; checkpoints signed at 300 and 600, both anchored; the last 40 entries covered by no
checkpoint yet). Each test tampers with a fresh copy of it and its last-checkpoint file, and
checks that verify names what was done: lookup columns changed while the entry bytes were not,
every checkpoint row deleted, the log rolled back consistently or rewritten and re-signed with
the log's own keys (which only the chain then shows), truncated tables and rows, a payload
removed without a redaction, a checkpoint row swapped; and that the untampered copy verifies.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from medledger.events.v1 import records_events_pb2
from sqlalchemy import delete, select, update

from medledger_audit import storage, tile_store
from medledger_audit.checkpoints import Checkpointer
from medledger_audit.entries import EntryDraft, draft_entry, redaction_entry, unprocessable_entry
from medledger_audit.sequencer import Sequencer
from medledger_audit.verify import VerifyReport, verify_log, verify_recent
from medledger_audit.witnesses import RememberedCheckpoint, read_chain
from medledger_devstack import contracts, localstack
from medledger_devstack.testing import Anvil, Postgres
from medledger_runtime.db import Database
from medledger_runtime.events import new_event
from medledger_runtime.keys import LocalKeyring, create_master_key_file, der_to_raw_rs
from medledger_runtime.outbox import COMMON_MIGRATIONS
from medledger_sdk.cli import main as medledger
from medledger_verifier import chain, notes, tlog
from medledger_verifier.proof_files import TrustPolicy

ORIGIN = "tamper.medledger.test/audit"
FIRST, SECOND, SIZE = 300, 600, 640  # checkpoints at FIRST and SECOND, both anchored
REDACTED = 42  # redacted as the API does: an entry.redacted entry first, then the payload goes
STORED, DISCLOSED = 416, 417  # a record.stored and a record.disclosed entry


@dataclass
class Pristine:
    """A sound log on one kind of database; tests tamper only with copies of it."""

    backend: str
    url: str
    folder: Path
    verifier_keys: list[str]
    last_note: str
    rpc_url: str
    registry: str
    chain_id: int
    admin_dsn: str = ""  # PostgreSQL: where to CREATE DATABASE ... TEMPLATE


@dataclass
class Copy:
    db: Database
    url: str
    last_file: Path
    trust: Path
    pristine: Pristine

    @property
    def verifiers(self) -> list[notes.NoteVerifier]:
        return [notes.NoteVerifier.parse(k) for k in self.pristine.verifier_keys]

    async def verify(self, *, remembered: bool = True, chain_: bool = True) -> VerifyReport:
        witness = None
        if chain_:
            witness = await read_chain(self.pristine.rpc_url, self.pristine.registry, ORIGIN)
        file = RememberedCheckpoint.read(self.last_file) if remembered else None
        return await verify_log(self.db, self.verifiers, ORIGIN, remembered=file, chain=witness)

    async def command(self, *extra: str, witnesses: bool = True) -> tuple[int, str]:
        """`medledger audit verify` as a person runs it: exit code and output."""
        argv = ["audit", "verify", "--database-url", self.url]
        if witnesses:
            argv += ["--trust", str(self.trust), "--rpc", self.pristine.rpc_url]
            argv += ["--last-checkpoint-file", str(self.last_file)]
        return await asyncio.to_thread(run_command, [*argv, *extra])


def run_command(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = medledger(argv)
    return code, out.getvalue()


def drafts(start: int, end: int) -> list[EntryDraft]:
    """Entries of several kinds: with a subject, record, commitment and actor, and without."""
    made = []
    for n in range(start, end):
        if n % 4 == 3:
            made.append(unprocessable_entry(f"junk {n}".encode(), "medledger.records.v1", 0, n))
            continue
        if n % 4 == 0:
            payload: Any = records_events_pb2.RecordStored(
                record_id=f"rec_{n}", version=1, patient_id=f"pat_{n % 7}", commitment=f"{n:064x}", written_by="prn_w"
            )
        else:
            payload = records_events_pb2.RecordDisclosed(
                record_id=f"rec_{n - n % 4}", version=1, patient_id=f"pat_{n % 7}", actor_id=f"prn_doc{n % 3}"
            )
        draft = draft_entry(new_event(source="medledger.records", payload=payload, aggregate_id=f"rec_{n}", version=1))
        assert draft is not None
        made.append(draft)
    return made


async def open_keys(folder: Path) -> LocalKeyring:
    master = folder / "master.key"
    if not master.exists():
        create_master_key_file(master)
    return await LocalKeyring.open(folder / "keyrings" / "audit.keyring", master)


async def build(backend: str, postgres: Postgres, anvil: Anvil, folder: Path) -> Pristine:
    url = f"sqlite+aiosqlite:///{folder / 'audit.db'}" if backend == "sqlite" else postgres.new_database("pristine")
    db = Database(url)
    await db.migrate("common", COMMON_MIGRATIONS)
    await db.migrate("audit", storage.MIGRATIONS)
    keys = await open_keys(folder)
    sequencer = Sequencer(db, keys, max_batch=250)
    checkpointer = Checkpointer(db, keys, origin=ORIGIN, last_checkpoint_file=folder / "last-checkpoint")
    await checkpointer.start()
    tiles = tile_store.DatabaseTiles(db)
    try:
        await sequencer.append(drafts(0, FIRST))
        first = await checkpointer.sign(FIRST, await tlog.tree_root(tiles, FIRST))
        (leaf,) = await tlog.leaf_hashes(tiles, REDACTED, REDACTED + 1, FIRST)
        redaction = redaction_entry(REDACTED, leaf.hex(), "retention", "prn_auditor", "req-redact")
        await sequencer.append([redaction, *drafts(FIRST + 1, SECOND)])
        async with db.transaction() as conn:
            await storage.redact_entry(conn, REDACTED)
        second = await checkpointer.sign(SECOND, await tlog.tree_root(tiles, SECOND))
        await sequencer.append(drafts(SECOND, SIZE))
        assert first is not None and second is not None
        verifier_keys = checkpointer.verifier_keys()
        rpc, registry, chain_id = await anchor(anvil, verifier_keys, db, checkpointer, [first.note, second.note])
    finally:
        await sequencer.close()
        await keys.aclose()
        await db.close()
    admin = f"postgresql://postgres@{localstack.HOST}:{postgres.cluster.port}/postgres"
    return Pristine(
        backend, url, folder, verifier_keys, second.note, rpc, registry, chain_id, admin if backend != "sqlite" else ""
    )


async def anchor(
    anvil: Anvil, verifier_keys: list[str], db: Database, checkpointer: Checkpointer, signed: list[str]
) -> tuple[str, str, int]:
    """A registry of the log's own on the chain, holding `signed` as anchoring would send them."""
    w3 = chain.connect(anvil.rpc_url)
    try:
        accounts = list(await w3.eth.accounts)
        deployment = await contracts.deploy_for_log(w3, accounts[0], accounts[1], ORIGIN, verifier_keys)
        registry = chain.contract(w3, chain.ANCHOR_REGISTRY, deployment.anchor_registry)
        tiles = tile_store.DatabaseTiles(db)
        previous = 0
        for note in signed:
            checkpoint, opened = notes.open_checkpoint(note, checkpointer.verifiers, origin=ORIGIN)
            p256 = [s for s in opened.signatures if s.key_id == checkpointer.verifiers[1].key_id]
            proof = await tlog.consistency_proof(tiles, previous, checkpoint.tree_size) if previous else []
            call = registry.functions.anchor(
                ORIGIN, checkpoint.tree_size, checkpoint.root, der_to_raw_rs(p256[0].signature), proof
            )
            await contracts.transact_and_wait(w3, call, deployment.anchorer)
            previous = checkpoint.tree_size
        return anvil.rpc_url, deployment.anchor_registry, deployment.chain_id
    finally:
        await w3.provider.disconnect()


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
async def pristine(
    request: pytest.FixtureRequest, postgres: Postgres, anvil: Anvil, tmp_path_factory: pytest.TempPathFactory
) -> Pristine:
    folder = tmp_path_factory.mktemp(f"pristine-{request.param}")
    return await build(str(request.param), postgres, anvil, folder)


@pytest.fixture
async def copy(pristine: Pristine, postgres: Postgres, tmp_path: Path) -> AsyncIterator[Copy]:
    if pristine.backend == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            source = pristine.folder / f"audit.db{suffix}"
            if source.exists():
                shutil.copy(source, tmp_path / f"audit.db{suffix}")
        url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    else:
        name = f"tampered_{uuid.uuid4().hex[:10]}"
        template = pristine.url.rsplit("/", 1)[1]
        admin = await asyncpg.connect(pristine.admin_dsn)
        try:
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        finally:
            await admin.close()
        url = postgres.cluster.url(name)
    last_file = tmp_path / "last-checkpoint"
    last_file.write_text(pristine.last_note)
    trust = tmp_path / "trust.json"
    policy = TrustPolicy(ORIGIN, tuple(pristine.verifier_keys), pristine.chain_id, pristine.registry)
    trust.write_text(policy.to_json())
    db = Database(url)
    try:
        yield Copy(db, url, last_file, trust, pristine)
    finally:
        await db.close()


def named(report: VerifyReport, kind: str, *words: str) -> str:
    """The problem of the report's divergence of `kind`, which must hold every one of `words`."""
    assert not report.ok
    found = [d for d in report.divergences if d.kind == kind]
    assert found, [(d.kind, d.problem) for d in report.divergences]
    for word in words:
        assert word in found[0].problem, found[0].problem
    return found[0].problem


# --- the sound log -------------------------------------------------------------------------------


async def test_the_untampered_copy_verifies_against_every_witness(copy: Copy) -> None:
    report = await copy.verify()
    assert report.ok, report.divergences
    assert (report.tree_size, report.checkpoints_checked, report.newest_checkpoint) == (SIZE, 2, SECOND)
    assert report.uncovered == SIZE - SECOND and report.redacted == 1
    assert [f.passed for f in report.findings] == [True, True, True]
    code, out = await copy.command()
    assert code == 0, out
    assert f"the log {ORIGIN} verifies: {SIZE} entries" in out
    assert f"40 of {SIZE} entries (indexes {SECOND} to {SIZE - 1}) are covered by no signed checkpoint" in out
    assert f"✓ last checkpoint: the checkpoint of size {SECOND}" in out
    assert f"anchored size {SECOND} at block" in out and "✓ entries" in out and "1 redacted" in out
    # Without witnesses it still verifies, and says what it could not compare.
    code, out = await copy.command("--origin", ORIGIN, *_keys(copy), witnesses=False)
    assert code == 0 and "- chain: not compared" in out and "- last checkpoint: not checked" in out, out


def _keys(copy: Copy) -> list[str]:
    return [a for k in copy.pristine.verifier_keys for a in ("--verifier-key", k)]


# --- lookup columns changed, entry bytes not ------------------------------------------------------

COLUMN_TAMPERS = {
    "actor_id": (DISCLOSED, "prn_someone_else"),
    "subject": (STORED, "ab" * 32),
    "record_id": (DISCLOSED, "rec_other"),
    "commitment": (STORED, "0" * 64),
    "type": (DISCLOSED, "record.stored"),
    "event_time": (STORED, 1.0),
    "integrated_time": (STORED, 2.0),
    "event_id": (STORED, "forged-event-id"),
}


@pytest.mark.parametrize("column", sorted(COLUMN_TAMPERS))
async def test_a_lookup_column_changed_alone_is_named(copy: Copy, column: str) -> None:
    index, value = COLUMN_TAMPERS[column]
    c = storage.entries.c
    async with copy.db.transaction() as conn:
        await conn.execute(update(storage.entries).where(c.entry_index == index).values({column: value}))
    report = await copy.verify()
    problem = named(report, "column", f"entry {index}'s", column)
    assert report.divergence is not None and report.divergence.index == index, problem
    # The service's incremental check finds it too.
    _, recent = await verify_recent(copy.db, copy.verifiers, ORIGIN, since=400)
    assert recent is not None and recent.index == index and recent.kind == "column"
    code, out = await copy.command()
    assert code == 1 and f"first diverging entry: {index}" in out and column in out, out


async def test_a_subject_removed_from_its_row_is_named(copy: Copy) -> None:
    """A patient's entry hidden from their "who saw my data" by clearing its subject column."""
    c = storage.entries.c
    async with copy.db.transaction() as conn:
        await conn.execute(update(storage.entries).where(c.entry_index == DISCLOSED).values(subject=None))
    named(await copy.verify(), "column", f"entry {DISCLOSED}'s", "subject")


# --- checkpoints deleted, the log rolled back or rewritten ------------------------------------------


async def test_every_checkpoint_row_deleted_is_named(copy: Copy) -> None:
    async with copy.db.transaction() as conn:
        await conn.execute(delete(storage.checkpoints))
    named(await copy.verify(chain_=False), "checkpoint-missing", f"size {SECOND}", "deleted")
    named(await copy.verify(remembered=False), "anchored-checkpoint-missing", f"size {SECOND}", "deleted")
    report = await copy.verify(remembered=False, chain_=False)
    assert report.ok and report.uncovered == SIZE  # alone, the database cannot tell: the witnesses can
    code, out = await copy.command()
    assert code == 1 and f"{SIZE} of {SIZE} entries" in out and "[checkpoint-missing]" in out, out


async def roll_back(db: Database, size: int) -> None:
    """Roll the log back to `size` entries consistently: entries, tiles, checkpoints, state."""
    tiles = tile_store.DatabaseTiles(db)
    async with db.read() as conn:
        tree_size, _ = await storage.read_state(conn)
    leaves = await tlog.leaf_hashes(tiles, 0, size, tree_size)
    await rewrite_tree(db, leaves)
    async with db.transaction() as conn:
        await conn.execute(delete(storage.entries).where(storage.entries.c.entry_index >= size))
        await conn.execute(delete(storage.checkpoints).where(storage.checkpoints.c.tree_size > size))


async def rewrite_tree(db: Database, leaves: list[bytes]) -> None:
    """Replace every tile and the state with the tree of `leaves`."""
    memory = tlog.MemoryTiles()
    result = await tlog.append(memory, 0, leaves)
    async with db.transaction() as conn:
        await conn.execute(delete(storage.tiles))
        rows = [{"level": t.level, "tile_index": t.index, "hashes": d} for t, d in result.tiles.items()]
        await conn.execute(storage.tiles.insert(), rows)
        await conn.execute(update(storage.log_state).values(tree_size=result.tree_size, root=result.root))


async def test_a_consistent_rollback_is_caught_by_the_chain_and_by_the_file(copy: Copy) -> None:
    await roll_back(copy.db, 450)
    named(await copy.verify(remembered=False), "behind-chain", "450 entries", f"the {SECOND} the chain witnessed")
    named(await copy.verify(chain_=False), "behind-remembered", f"size {SECOND}", "only 450 entries")
    assert (await copy.verify(remembered=False, chain_=False)).ok  # consistent: the database alone cannot tell
    code, out = await copy.command()
    assert code == 1 and "[behind-chain]" in out and "[behind-remembered]" in out, out
    assert "450 entries" in out and f"the {SECOND} the chain witnessed" in out, out


async def test_a_log_rewritten_and_resigned_with_its_own_keys_is_caught_by_the_chain(
    copy: Copy, tmp_path: Path
) -> None:
    """An insider with the signing keys rewrites entry 10 and signs the same sizes again: the
    checkpoints and the file agree with the database; the chain does not."""
    c = storage.entries.c
    tiles = tile_store.DatabaseTiles(copy.db)
    leaves = await tlog.leaf_hashes(tiles, 0, SIZE, SIZE)
    async with copy.db.transaction() as conn:
        entry = bytes((await conn.execute(select(c.entry).where(c.entry_index == 10))).scalar_one())
        forged = entry.replace(b'"version":1', b'"version":9')
        assert forged != entry
        await conn.execute(update(storage.entries).where(c.entry_index == 10).values(entry=forged))
        await conn.execute(delete(storage.checkpoints))
    leaves[10] = tlog.leaf_hash(forged)
    await rewrite_tree(copy.db, leaves)
    keys = await open_keys(copy.pristine.folder)
    try:
        resigner = Checkpointer(copy.db, keys, origin=ORIGIN, last_checkpoint_file=copy.last_file)
        copy.last_file.unlink()
        await resigner.start()
        for size in (FIRST, SECOND):
            assert await resigner.sign(size, await tlog.tree_root(tiles, size)) is not None
    finally:
        await keys.aclose()
    assert (await copy.verify(chain_=False)).ok  # the re-signed file and checkpoints agree
    named(await copy.verify(), "inconsistent-with-chain", f"{SIZE} entries", f"at size {SECOND}", "rewritten")
    code, out = await copy.command()
    assert code == 1 and "[inconsistent-with-chain]" in out, out


# --- truncations and other tampering: each named, none a traceback -----------------------------------


async def _run_sql(db: Database, *statements: Any) -> None:
    async with db.transaction() as conn:
        for statement in statements:
            await conn.execute(statement)


t, e, s = storage.tiles.c, storage.entries.c, storage.log_state


async def test_a_deleted_tile_is_named(copy: Copy) -> None:
    await _run_sql(copy.db, delete(storage.tiles).where(t.level == 0, t.tile_index == 1))
    named(await copy.verify(), "missing-tile", "tile/0/001")
    _, recent = await verify_recent(copy.db, copy.verifiers, ORIGIN, since=0)
    assert recent is not None and recent.kind == "missing-tile"


async def test_a_truncated_tile_is_named(copy: Copy) -> None:
    async with copy.db.transaction() as conn:
        data = bytes((await conn.execute(select(t.hashes).where(t.level == 0, t.tile_index == 2))).scalar_one())
        await conn.execute(update(storage.tiles).where(t.level == 0, t.tile_index == 2).values(hashes=data[:100]))
    named(await copy.verify(), "missing-tile", "tile/0/002")
    code, out = await copy.command()
    assert code == 1 and "Traceback" not in out and "[missing-tile]" in out, out


async def test_emptied_tables_are_named(copy: Copy) -> None:
    await _run_sql(copy.db, delete(storage.entries))
    report = await copy.verify()
    named(report, "missing-entry", "entry 0")
    await _run_sql(copy.db, delete(storage.tiles))
    named(await copy.verify(), "missing-tile", "tile/0/000")


async def test_the_newest_entries_deleted_are_named(copy: Copy) -> None:
    await _run_sql(copy.db, delete(storage.entries).where(e.entry_index >= 630))
    report = await copy.verify()
    named(report, "missing-entry", "entry 630")
    assert report.divergence is not None and report.divergence.index == 630


async def test_a_deleted_state_row_is_named(copy: Copy) -> None:
    await _run_sql(copy.db, delete(s))
    named(await copy.verify(), "state", "log_state")
    _, recent = await verify_recent(copy.db, copy.verifiers, ORIGIN, since=0)
    assert recent is not None and recent.kind == "state"
    code, out = await copy.command()
    assert code == 1 and "log_state" in out and "Traceback" not in out and "✓ entries" not in out, out


async def test_a_state_claiming_more_entries_than_stored_is_named(copy: Copy) -> None:
    await _run_sql(copy.db, update(s).values(tree_size=700))
    named(await copy.verify(), "missing-tile", "tile/0/002")


async def test_a_state_rolled_back_alone_is_named(copy: Copy) -> None:
    async with copy.db.read() as conn:
        root = await tlog.tree_root(tile_store.ConnectionTiles(conn), 500)
    await _run_sql(copy.db, update(s).values(tree_size=500, root=root))
    report = await copy.verify(remembered=False, chain_=False)
    named(report, "state", "index 639", "tree size 500")
    named(report, "checkpoint-beyond", f"checkpoint {SECOND}", "500 entries")


async def test_a_payload_removed_without_a_redaction_is_named(copy: Copy) -> None:
    await _run_sql(copy.db, update(storage.entries).where(e.entry_index == 77).values(entry=None))
    report = await copy.verify()
    named(report, "unrecorded-redaction", "entry 77", "no entry.redacted")
    assert report.divergence is not None and report.divergence.index == 77


async def test_a_checkpoint_row_holding_another_checkpoint_is_named(copy: Copy) -> None:
    c = storage.checkpoints.c
    await _run_sql(
        copy.db, update(storage.checkpoints).where(c.tree_size == FIRST).values(note=copy.pristine.last_note)
    )
    named(await copy.verify(), "checkpoint", f"stored as size {FIRST}", f"signed for size {SECOND}")


# --- the chain's side, and usage -------------------------------------------------------------------


async def test_a_chain_that_cannot_be_read_or_knows_no_such_log_fails_by_name(copy: Copy, anvil: Anvil) -> None:
    closed = f"http://{localstack.HOST}:{localstack.closed_port()}"
    code, out = await copy.command("--rpc", closed)
    assert code == 1 and "[chain-unreadable]" in out and "could not read the chain" in out, out
    w3 = chain.connect(anvil.rpc_url)
    try:
        owner = (await w3.eth.accounts)[0]
        empty = await contracts.deploy(w3, chain.ANCHOR_REGISTRY, owner)  # no log registered in it
    finally:
        await w3.provider.disconnect()
    code, out = await copy.command(*_pinned(copy, anvil), "--anchor-registry", empty, witnesses=False)
    assert code == 1 and "[chain-unknown-origin]" in out and ORIGIN in out, out
    wrong = TrustPolicy(ORIGIN, tuple(copy.pristine.verifier_keys), 1, copy.pristine.registry)
    copy.trust.write_text(wrong.to_json())
    code, out = await copy.command()
    assert code == 1 and "serves chain" in out and "[chain-unreadable]" in out, out


def _pinned(copy: Copy, anvil: Anvil) -> list[str]:
    return ["--origin", ORIGIN, *_keys(copy), "--rpc", anvil.rpc_url]


async def test_usage_errors_exit_2_and_change_nothing(copy: Copy, anvil: Anvil, tmp_path: Path) -> None:
    url = ["audit", "verify", "--database-url", copy.url]
    pinned = ["--origin", ORIGIN, *_keys(copy)]
    cases = {
        "needs the registry": [*url, *pinned, "--rpc", anvil.rpc_url],
        "needs the chain": [*url, *pinned, "--anchor-registry", copy.pristine.registry],
        "not with --origin": [*url, "--trust", str(copy.trust), "--origin", ORIGIN],
        "go together": [*url, "--origin", ORIGIN],
        "is not an address": [*url, *pinned, "--rpc", anvil.rpc_url, "--anchor-registry", "0x12"],
        "no audit database at": [
            "audit",
            "verify",
            "--database-url",
            f"sqlite+aiosqlite:///{tmp_path}/none.db",
            *pinned,
        ],
        "cannot read the trust policy": [*url, "--trust", str(tmp_path / "none.json")],
    }
    for words, argv in cases.items():
        code, out = await asyncio.to_thread(run_command, argv)
        assert code == 2 and words in out, (words, out)
    assert not (tmp_path / "none.db").exists()
    empty = Database(f"sqlite+aiosqlite:///{tmp_path}/empty.db")
    async with empty.transaction() as conn:
        await conn.exec_driver_sql("CREATE TABLE unrelated (id INTEGER)")
    await empty.close()
    code, out = await asyncio.to_thread(
        run_command, ["audit", "verify", "--database-url", f"sqlite+aiosqlite:///{tmp_path}/empty.db", *pinned]
    )
    assert code == 2 and "none of the audit log's tables" in out, out
    assert (await copy.verify()).ok  # the copy itself untouched by any of it
