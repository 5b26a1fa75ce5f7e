"""Anchoring's queries (witness.Witness) without gRPC: on SQLite with anchoring's migrations, the
anchors and signed checkpoints written through storage as the anchorer and the checkpoint
handler write them. The audit log is a test double of the audit SERVICE's proofs (the real one
answers in tests/integration/test_anchoring.py); no chain is reached: the verification cases
here stop before the chain check."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from medledger_anchoring import storage
from medledger_anchoring.witness import (
    MAX_ENTRY_INDEX,
    MAX_PROOF_BYTES,
    GetAnchoredProof,
    ListAnchoredCheckpoints,
    VerifyProof,
    Witness,
)
from medledger_runtime.db import Database
from medledger_runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from medledger_runtime.outbox import COMMON_MIGRATIONS
from medledger_verifier import proof_files

ORIGIN = "medledger.test/audit"
COMMITMENT = "ab" * 32
POLICY = proof_files.TrustPolicy(
    origin=ORIGIN,
    log_verifier_keys=("medledger.test/audit+00000000+AAAA",),
    chain_id=31337,
    anchor_registry="0x" + "11" * 20,
)


@dataclass
class AuditProofsDouble:
    """A test double of the audit SERVICE's proofs: one entry at `index` holding COMMITMENT;
    keeps the questions asked."""

    index: int = 4
    asked: list[tuple[object, ...]] = field(default_factory=list)

    async def find_commitment(self, commitment: str) -> tuple[int, bytes]:
        self.asked.append(("find", commitment))
        if commitment != COMMITMENT:
            raise NotFound("no log entry holds this commitment")
        return self.index, b'{"commitment":"' + commitment.encode() + b'"}'

    async def tlog_proof(self, index: int, tree_size: int) -> str:
        self.asked.append(("proof", index, tree_size))
        return f"c2sp.org/tlog-proof@v1\nindex {index}\nsize {tree_size}\n"


@dataclass
class Desk:
    witness: Witness
    audit: AuditProofsDouble
    db: Database

    async def anchor(self, tree_size: int) -> storage.AnchorRow:
        row = storage.AnchorRow(
            origin=ORIGIN,
            tree_size=tree_size,
            root=bytes([tree_size]) * 32,
            previous_size=0,
            chain_id=31337,
            contract_address="0x" + "11" * 20,
            transaction_hash="0x" + f"{tree_size:02x}" * 32,
            block_number=100 + tree_size,
            block_time=1_700_000_000.0 + tree_size,
            gas_used=90_000,
        )
        async with self.db.transaction() as conn:
            assert await storage.save_anchor(conn, row, recorded_at=1.0)
        return row

    async def signed(self, tree_size: int) -> None:
        async with self.db.transaction() as conn:
            checkpoint = storage.SignedCheckpoint(ORIGIN, tree_size, bytes(32), "note", 1.0)
            assert await storage.save_signed_checkpoint(conn, checkpoint)


@pytest.fixture
async def desk(tmp_path: Path) -> AsyncIterator[Desk]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/anchoring.db")
    await db.migrate("common", COMMON_MIGRATIONS)
    await db.migrate("anchoring", storage.MIGRATIONS)
    audit = AuditProofsDouble()
    # No chain: nothing here gets as far as the chain check (a call on None would fail the test).
    witness = Witness(db, ORIGIN, audit, cast(Any, None), POLICY)
    try:
        yield Desk(witness, audit, db)
    finally:
        await db.close()


async def test_anchored_checkpoints_page_from_the_largest_down(desk: Desk) -> None:
    for size in (3, 10, 25):
        await desk.anchor(size)
    first = await desk.witness.anchored_checkpoints(ListAnchoredCheckpoints(page_size=2))
    assert [a.tree_size for a in first.anchors] == [25, 10]
    assert first.next_page_token == "10"
    rest = await desk.witness.anchored_checkpoints(ListAnchoredCheckpoints(page_size=2, page_token="10"))
    assert [a.tree_size for a in rest.anchors] == [3]
    assert rest.next_page_token == ""
    every = await desk.witness.anchored_checkpoints(ListAnchoredCheckpoints())
    assert [a.tree_size for a in every.anchors] == [25, 10, 3]


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (ListAnchoredCheckpoints(page_size=-1), "page_size"),
        (ListAnchoredCheckpoints(page_token="²"), "page_token"),  # a digit to str.isdigit, not to int()
        (ListAnchoredCheckpoints(page_token="1" * 19), "page_token"),  # beyond BIGINT
    ],
)
async def test_a_bad_page_is_invalid_argument_naming_the_field(
    desk: Desk, command: ListAnchoredCheckpoints, field: str
) -> None:
    await desk.anchor(3)
    with pytest.raises(InvalidArgument) as raised:
        await desk.witness.anchored_checkpoints(command)
    assert raised.value.violations[0].field == field


async def test_the_latest_anchor_and_the_newest_signed_size(desk: Desk) -> None:
    with pytest.raises(NotFound, match="nothing is anchored yet"):
        await desk.witness.latest()
    await desk.anchor(3)
    await desk.anchor(10)
    latest = await desk.witness.latest()
    assert (latest.anchor.tree_size, latest.latest_signed_tree_size) == (10, 0)
    await desk.signed(12)
    assert (await desk.witness.latest()).latest_signed_tree_size == 12


async def test_a_commitments_proof_is_at_the_smallest_anchor_holding_its_entry(desk: Desk) -> None:
    for size in (3, 10, 25):
        await desk.anchor(size)
    proof = await desk.witness.anchored_proof(GetAnchoredProof(commitment=COMMITMENT))
    assert (proof.entry_index, proof.anchor.tree_size) == (4, 10)
    assert proof.entry == b'{"commitment":"' + COMMITMENT.encode() + b'"}'
    assert proof.tlog_proof == "c2sp.org/tlog-proof@v1\nindex 4\nsize 10\n"
    assert desk.audit.asked == [("find", COMMITMENT), ("proof", 4, 10)]
    anchor = proof_files.Anchor.parse(proof.anchor_json)
    assert (anchor.tree_size, anchor.tx_hash, anchor.origin) == (10, "0x" + "0a" * 32, ORIGIN)


async def test_an_index_proof_carries_no_entry_bytes(desk: Desk) -> None:
    await desk.anchor(10)
    proof = await desk.witness.anchored_proof(GetAnchoredProof(entry_index=9))
    assert (proof.entry_index, proof.anchor.tree_size, proof.entry) == (9, 10, b"")
    assert desk.audit.asked == [("proof", 9, 10)]


async def test_an_entry_no_anchor_covers_yet_is_failed_precondition(desk: Desk) -> None:
    await desk.anchor(3)
    with pytest.raises(FailedPrecondition, match=r"entry 4 is not covered by an anchor yet \(anchored tree size 3\)"):
        await desk.witness.anchored_proof(GetAnchoredProof(commitment=COMMITMENT))
    # Asked where the entry is, never for a proof.
    assert desk.audit.asked == [("find", COMMITMENT)]


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (GetAnchoredProof(commitment="AB" * 32), "commitment"),  # lowercase hex only
        (GetAnchoredProof(commitment="ab" * 31), "commitment"),
        (GetAnchoredProof(entry_index=MAX_ENTRY_INDEX + 1), "entry_index"),
        (GetAnchoredProof(), "target"),
    ],
)
async def test_a_bad_proof_request_is_refused_before_the_log_is_asked(
    desk: Desk, command: GetAnchoredProof, field: str
) -> None:
    await desk.anchor(10)
    with pytest.raises(InvalidArgument) as raised:
        await desk.witness.anchored_proof(command)
    assert raised.value.violations[0].field == field
    assert desk.audit.asked == []


async def test_a_commitment_the_log_does_not_hold_is_not_found(desk: Desk) -> None:
    await desk.anchor(10)
    with pytest.raises(NotFound):
        await desk.witness.anchored_proof(GetAnchoredProof(commitment="cd" * 32))


async def test_without_a_trust_policy_nothing_is_verified(desk: Desk) -> None:
    desk.witness.policy = None
    with pytest.raises(FailedPrecondition, match="no trust policy"):
        await desk.witness.verify(VerifyProof(tlog_proof="x", entry=b"{}", anchor_json=b"{}"))


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (VerifyProof(tlog_proof="x" * (MAX_PROOF_BYTES + 1)), "tlog_proof"),
        (VerifyProof(anchor_json=b"x" * (MAX_PROOF_BYTES + 1)), "anchor_json"),
        (VerifyProof(record=b"x" * (16 * MAX_PROOF_BYTES + 1), salt="00"), "record"),
        (VerifyProof(record=b"{}"), "salt"),
        (VerifyProof(salt="00"), "salt"),
        (VerifyProof(media_type="application/pdf"), "media_type"),
    ],
)
async def test_a_bad_verification_request_is_invalid_argument_naming_the_field(
    desk: Desk, command: VerifyProof, field: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await desk.witness.verify(command)
    assert raised.value.violations[0].field == field


async def test_a_malformed_proof_is_a_failed_check_not_an_error(desk: Desk) -> None:
    result = await desk.witness.verify(VerifyProof(tlog_proof="not a proof", entry=b"{}", anchor_json=b"{}"))
    assert not result.verified
    assert (result.checks[0].name, result.checks[0].passed) == ("proof-format", False)
