"""`medledger verify` on a real Anvil: a log signs checkpoints with an Ed25519 and a P-256 key (as
the audit log does), its checkpoints are anchored in a freshly deployed AnchorRegistry, and a
third party verifies an entry (and the record it commits to) trusting only the trust policy and
the chain. Each tamper fails with the check that catches it; the later checks are not run."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from medledger_devstack import contracts
from medledger_devstack.testing import Anvil
from medledger_runtime.keys import der_to_raw_rs
from medledger_verifier import chain, commitments, notes, tlog
from medledger_verifier.anchored_proofs import verify_anchored_proof
from medledger_verifier.proof_checks import Verification
from medledger_verifier.proof_files import Anchor, TrustPolicy

RECORD = json.dumps(
    {"resourceType": "Patient", "id": "p1", "name": [{"family": "Doe", "given": ["Jane"]}], "gender": "female"},
    indent=1,
).encode()
SALT = bytes(range(32))
RECORD_INDEX = 3
PROOF_SIZE = 5  # the proof's checkpoint: signed, never anchored itself
ANCHORED_SIZE = 7  # anchored first
LATER_SIZE = 10  # anchored next; covers PROOF_SIZE through a consistency proof


class Signers:
    """The log's two checkpoint keys, both naming the origin, as the audit log signs."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.p256 = ec.generate_private_key(ec.SECP256R1())
        self.ed_verifier = notes.NoteVerifier.from_public_key(origin, self.ed.public_key())
        self.p256_verifier = notes.NoteVerifier.from_public_key(origin, self.p256.public_key())

    def signers(self) -> list[notes.NoteSigner]:
        ed, p256 = self.ed, self.p256

        async def sign_ed(message: bytes) -> bytes:
            return ed.sign(message)

        async def sign_p256(message: bytes) -> bytes:
            return p256.sign(message, ec.ECDSA(hashes.SHA256()))

        return [notes.NoteSigner(self.ed_verifier, sign_ed), notes.NoteSigner(self.p256_verifier, sign_p256)]

    def keys(self) -> tuple[str, ...]:
        return (self.ed_verifier.text(), self.p256_verifier.text())

    async def sign(self, size: int, root: bytes) -> str:
        return await notes.sign_checkpoint(notes.Checkpoint(self.origin, size, root), self.signers())

    def raw_p256(self, signed: str) -> bytes:
        note = notes.parse_note(signed)
        (sig,) = [s for s in note.signatures if s.key_id == self.p256_verifier.key_id]
        return der_to_raw_rs(sig.signature)


def entry(i: int) -> bytes:
    """An entry as the audit log writes it (JCS); RECORD_INDEX is a record-stored entry holding the
    record's commitment."""
    value: dict[str, Any] = {
        "v": 1,
        "type": "principal.updated",
        "event_id": f"00000000-0000-4000-8000-{i:012d}",
        "event_time": "2026-01-01T00:00:00.000Z",
        "integrated_time": "2026-01-01T00:00:01.000Z",
        "subject": None,
        "principal_id": f"prn_{i}",
    }
    if i == RECORD_INDEX:
        value = {
            **{k: value[k] for k in ("v", "event_id", "event_time", "integrated_time")},
            "type": "record.stored",
            "subject": "ab" * 32,
            "record_id": "rec_1",
            "version": 1,
            "category": "DATA_CATEGORY_DEMOGRAPHICS",
            "commitment": commitments.record_commitment(RECORD, SALT),
            "written_by": "prn_9",
        }
    return commitments.canonical_json(value)


@dataclass
class World:
    rpc_url: str
    policy: TrustPolicy
    signers: Signers
    entries: list[bytes]
    tiles: tlog.MemoryTiles
    proof: str  # tlog-proof of RECORD_INDEX at ANCHORED_SIZE (anchored exactly)
    anchor: Anchor
    proof_small: str  # tlog-proof of RECORD_INDEX at PROOF_SIZE
    anchor_later: Anchor  # the anchor at LATER_SIZE with a consistency proof from PROOF_SIZE
    consent_registry: str
    other_tx: str  # a registry transaction that anchored nothing (setAnchorer)


async def mine(w3: chain.Web3) -> None:
    await w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]


async def build(rpc_url: str) -> World:
    w3 = chain.connect(rpc_url)
    try:
        accounts = await w3.eth.accounts
        deployment = await contracts.deploy_registries(w3, accounts[0], accounts[1])
        origin = f"medledger.test/verify-{uuid.uuid4().hex[:8]}"
        signers = Signers(origin)
        spki = signers.p256_verifier.public_key
        await contracts.register_log(w3, deployment.anchor_registry, deployment.owner, origin, spki)
        registry = chain.contract(w3, chain.ANCHOR_REGISTRY, deployment.anchor_registry)

        entries = [entry(i) for i in range(LATER_SIZE)]
        tiles = tlog.MemoryTiles()
        tiles.write((await tlog.append(tiles, 0, [tlog.leaf_hash(e) for e in entries])).tiles)

        async def anchor_at(size: int, old: int | None) -> tuple[str, Anchor]:
            root = await tlog.tree_root(tiles, size)
            signed = await signers.sign(size, root)
            proof = await tlog.consistency_proof(tiles, old, size) if old else []
            call = registry.functions.anchor(origin, size, root, signers.raw_p256(signed), proof)
            tx = await call.transact({"from": deployment.anchorer})
            await mine(w3)
            receipt = await w3.eth.wait_for_transaction_receipt(tx, timeout=30)
            assert receipt["status"] == 1
            return signed, Anchor(
                chain_id=deployment.chain_id,
                contract_address=deployment.anchor_registry,
                tx_hash="0x" + bytes(tx).hex(),
                block_number=receipt["blockNumber"],
                origin=origin,
                tree_size=size,
                root=root,
            )

        async def tlog_proof(size: int, signed: str) -> str:
            hashes_ = await tlog.inclusion_proof(tiles, RECORD_INDEX, size)
            return notes.TlogProof(RECORD_INDEX, tuple(hashes_), signed).format()

        signed7, anchor7 = await anchor_at(ANCHORED_SIZE, None)
        _, anchor10 = await anchor_at(LATER_SIZE, ANCHORED_SIZE)
        signed5 = await signers.sign(PROOF_SIZE, await tlog.tree_root(tiles, PROOF_SIZE))
        anchor_later = replace(
            anchor10, consistency_proof=tuple(await tlog.consistency_proof(tiles, PROOF_SIZE, LATER_SIZE))
        )
        other = await registry.functions.setAnchorer(accounts[2], True).transact({"from": deployment.owner})
        await mine(w3)
        await w3.eth.wait_for_transaction_receipt(other, timeout=30)
        await mine(w3)  # a second confirmation for every anchor
        policy = TrustPolicy(
            origin=origin,
            log_verifier_keys=signers.keys(),
            chain_id=deployment.chain_id,
            anchor_registry=deployment.anchor_registry,
            min_confirmations=2,
        )
        return World(
            rpc_url=rpc_url,
            policy=policy,
            signers=signers,
            entries=entries,
            tiles=tiles,
            proof=await tlog_proof(ANCHORED_SIZE, signed7),
            anchor=anchor7,
            proof_small=await tlog_proof(PROOF_SIZE, signed5),
            anchor_later=anchor_later,
            consent_registry=deployment.consent_registry,
            other_tx="0x" + bytes(other).hex(),
        )
    finally:
        await w3.provider.disconnect()


@pytest.fixture(scope="module")
def world(anvil: Anvil) -> Iterator[World]:
    yield asyncio.run(build(anvil.rpc_url))


def verify(
    world: World,
    *,
    policy: TrustPolicy | None = None,
    proof: str | bytes | None = None,
    entry_bytes: bytes | None = None,
    anchor: Anchor | str | None = None,
    rpc_url: str | None = None,
    **record: Any,
) -> Verification:
    async def run() -> Verification:
        w3 = chain.connect(rpc_url or world.rpc_url, timeout=5)
        try:
            return await verify_anchored_proof(
                policy or world.policy,
                proof if proof is not None else world.proof,
                entry_bytes if entry_bytes is not None else world.entries[RECORD_INDEX],
                anchor if isinstance(anchor, str) else (anchor or world.anchor).to_json(),
                w3,
                **record,
            )
        finally:
            await w3.provider.disconnect()

    return asyncio.run(run())


def fails_at(result: Verification, name: str, *words: str) -> None:
    assert not result.verified, result.verdict()
    failed = result.failed
    assert failed is not None and failed.name == name, [(c.name, c.passed, c.detail) for c in result.checks]
    after = [c for c in result.checks[[c.name for c in result.checks].index(name) + 1 :]]
    assert all(c.passed is None for c in after)
    assert result.verdict().startswith(f"NOT VERIFIED: {name}: ")
    assert result.anchored_at is None
    for word in words:
        assert word in failed.detail, failed.detail


def record_args(record: bytes = RECORD, salt: bytes = SALT, media_type: str | None = None) -> dict[str, Any]:
    return {"record": record, "salt_hex": salt.hex(), "media_type": media_type}


# --- what verifies ---------------------------------------------------------------------------


def test_a_genuine_anchored_proof_verifies_with_its_record(world: World) -> None:
    result = verify(world, **record_args())
    assert result.verified, result.verdict()
    assert [c.name for c in result.checks] == [
        "proof-format",
        "origin",
        "checkpoint-signature",
        "entry-inclusion",
        "chain",
        "anchored",
        "anchor-transaction",
        "record-commitment",
    ]
    assert result.anchored_at is not None and result.anchored_at.tzinfo is not None
    verdict = result.verdict()
    assert verdict.startswith("VERIFIED: ") and "upper bound" in verdict and "record" in verdict
    # Without the record, the entry alone verifies; record-commitment is not a check then.
    alone = verify(world)
    assert alone.verified and "record-commitment" not in [c.name for c in alone.checks]


def test_a_proof_at_a_smaller_checkpoint_verifies_against_a_later_anchor(world: World) -> None:
    result = verify(world, proof=world.proof_small, anchor=world.anchor_later, **record_args())
    assert result.verified, result.verdict()
    assert "extends" in next(c for c in result.checks if c.name == "anchored").detail
    # Without the consistency proof, or with one from another size, it does not.
    fails_at(verify(world, proof=world.proof_small, anchor=replace(world.anchor_later, consistency_proof=())),
             "anchored", "consistency")  # fmt: skip
    bad = (bytes(32), *world.anchor_later.consistency_proof[1:])
    fails_at(verify(world, proof=world.proof_small, anchor=replace(world.anchor_later, consistency_proof=bad)),
             "anchored")  # fmt: skip
    # An anchor older than the proof's checkpoint does not cover it.
    fails_at(verify(world, proof=world.proof_small.replace("index 3", "index 3"), anchor=world.anchor), "anchored")


# --- each tamper fails at the check that catches it -----------------------------------------


def test_a_changed_entry_byte_fails_inclusion(world: World) -> None:
    changed = world.entries[RECORD_INDEX].replace(b'"version":1', b'"version":2')
    assert changed != world.entries[RECORD_INDEX]
    fails_at(verify(world, entry_bytes=changed), "entry-inclusion")
    fails_at(verify(world, entry_bytes=world.entries[RECORD_INDEX + 1]), "entry-inclusion")


def test_a_changed_proof_hash_or_index_fails_inclusion(world: World) -> None:
    proof = notes.TlogProof.parse(world.proof)
    first = bytes([proof.hashes[0][0] ^ 1]) + proof.hashes[0][1:]
    fails_at(verify(world, proof=replace(proof, hashes=(first, *proof.hashes[1:])).format()), "entry-inclusion")
    fails_at(verify(world, proof=replace(proof, index=proof.index + 1).format()), "entry-inclusion")
    fails_at(verify(world, proof=replace(proof, hashes=proof.hashes[:-1]).format()), "entry-inclusion")


def test_a_checkpoint_changed_or_signed_by_other_keys_fails_the_signature(world: World) -> None:
    proof = notes.TlogProof.parse(world.proof)
    origin = world.policy.origin
    # The right tree, signed by another pair of keys with the log's name.
    root = asyncio.run(tlog.tree_root(world.tiles, ANCHORED_SIZE))
    forged = asyncio.run(Signers(origin).sign(ANCHORED_SIZE, root))
    fails_at(verify(world, proof=replace(proof, checkpoint=forged).format()), "checkpoint-signature")
    # The genuine signatures under a changed checkpoint text.
    note = notes.parse_note(proof.checkpoint)
    other_root = asyncio.run(tlog.tree_root(world.tiles, ANCHORED_SIZE - 1))
    text = notes.Checkpoint(origin, ANCHORED_SIZE, other_root).body()
    changed = notes.SignedNote(text, note.signatures).format()
    fails_at(verify(world, proof=replace(proof, checkpoint=changed).format()), "checkpoint-signature")
    # Only one of the two keys of the policy signed.
    one = notes.SignedNote(note.text, note.signatures[:1]).format()
    fails_at(verify(world, proof=replace(proof, checkpoint=one).format()), "checkpoint-signature", "every")


def test_another_origin_fails_the_origin_check(world: World) -> None:
    fails_at(verify(world, policy=replace(world.policy, origin="medledger.test/another")), "origin")
    fails_at(verify(world, anchor=replace(world.anchor, origin="medledger.test/another")), "origin")


def test_another_contract_or_chain_fails_the_chain_check(world: World) -> None:
    fails_at(verify(world, anchor=replace(world.anchor, contract_address=world.consent_registry)), "chain")
    fails_at(verify(world, policy=replace(world.policy, chain_id=world.policy.chain_id + 1)), "chain")
    # Anchor and policy agree on a chain the RPC endpoint is not.
    other = world.policy.chain_id + 1
    fails_at(verify(world, policy=replace(world.policy, chain_id=other), anchor=replace(world.anchor, chain_id=other)),
             "chain", "serves chain")  # fmt: skip
    # Anchor and policy agree on an address where no contract is.
    nowhere = "0x" + "12" * 20
    fails_at(
        verify(world, policy=replace(world.policy, anchor_registry=nowhere),
               anchor=replace(world.anchor, contract_address=nowhere)),
        "chain", "no contract",
    )  # fmt: skip
    # The address compares without regard to case.
    assert verify(world, anchor=replace(world.anchor, contract_address=world.anchor.contract_address.lower())).verified


def test_an_unreachable_chain_is_a_failed_chain_check(world: World) -> None:
    from medledger_devstack import localstack

    fails_at(verify(world, rpc_url=f"http://127.0.0.1:{localstack.closed_port()}"), "chain", "could not ask the chain")


def test_an_anchor_root_or_size_not_on_chain_fails_anchored(world: World) -> None:
    fails_at(verify(world, anchor=replace(world.anchor, root=bytes(31) + b"\x01")), "anchored")
    fails_at(verify(world, anchor=replace(world.anchor, tree_size=ANCHORED_SIZE + 1)), "anchored", "no checkpoint")
    # The later anchor's root and size, but claimed equal to the proof's checkpoint: no proof given.
    fails_at(verify(world, anchor=replace(world.anchor_later, consistency_proof=())), "anchored")


def test_a_wrong_transaction_fails_the_anchor_transaction_check(world: World) -> None:
    fails_at(verify(world, anchor=replace(world.anchor, tx_hash="0x" + "ab" * 32)), "anchor-transaction", "no mined")
    fails_at(verify(world, anchor=replace(world.anchor, tx_hash=world.other_tx)), "anchor-transaction")
    # The later anchor's transaction anchored another size.
    fails_at(verify(world, anchor=replace(world.anchor, tx_hash=world.anchor_later.tx_hash)), "anchor-transaction")
    fails_at(verify(world, anchor=replace(world.anchor, block_number=world.anchor.block_number + 1)),
             "anchor-transaction", "block")  # fmt: skip
    fails_at(verify(world, anchor=replace(world.anchor, tx_hash="0x1234")), "anchor-transaction")


def test_too_few_confirmations_fail_the_anchor_transaction_check(world: World) -> None:
    fails_at(verify(world, policy=replace(world.policy, min_confirmations=10**6)), "anchor-transaction", "confirmation")


def test_a_changed_record_or_wrong_salt_fails_the_commitment(world: World) -> None:
    changed = RECORD.replace(b"Jane", b"Jana")
    fails_at(verify(world, **record_args(record=changed)), "record-commitment")
    fails_at(verify(world, **record_args(salt=bytes(32))), "record-commitment")
    fails_at(verify(world, **record_args(media_type="application/pdf")), "record-commitment")
    # Reformatting the JSON keeps the commitment (it is over the JCS form).
    assert verify(world, **record_args(record=json.dumps(json.loads(RECORD)).encode())).verified
    # An entry without a commitment.
    other = notes.TlogProof(
        RECORD_INDEX + 1,
        tuple(asyncio.run(tlog.inclusion_proof(world.tiles, RECORD_INDEX + 1, ANCHORED_SIZE))),
        notes.TlogProof.parse(world.proof).checkpoint,
    ).format()
    fails_at(verify(world, proof=other, entry_bytes=world.entries[RECORD_INDEX + 1], **record_args()),
             "record-commitment", "no commitment")  # fmt: skip


def test_malformed_files_fail_the_format_check(world: World) -> None:
    fails_at(verify(world, proof="not a proof"), "proof-format")
    fails_at(verify(world, anchor="{}"), "proof-format", "anchor")


# --- the command ---------------------------------------------------------------------------


def medledger(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "-m", "medledger_sdk.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def write_files(world: World, folder: Path, entry_bytes: bytes | None = None) -> tuple[Path, Path]:
    (folder / "p.tlog-proof").write_text(world.proof)
    (folder / "p.entry").write_bytes(entry_bytes if entry_bytes is not None else world.entries[RECORD_INDEX])
    (folder / "p-anchor.json").write_text(world.anchor.to_json())
    (folder / "trust.json").write_text(world.policy.to_json())
    (folder / "record.json").write_bytes(RECORD)
    return folder / "p.tlog-proof", folder / "trust.json"


def test_the_command_verifies_and_says_why_not(world: World, tmp_path: Path) -> None:
    proof, trust = write_files(world, tmp_path)
    done = medledger("verify", proof, "--trust", trust, "--rpc", world.rpc_url,
                     "--record", tmp_path / "record.json", "--salt", SALT.hex())  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "✓ record-commitment" in done.stdout and "✗" not in done.stdout
    assert "VERIFIED: " in done.stdout and "upper bound" in done.stdout

    (tmp_path / "p.entry").write_bytes(world.entries[RECORD_INDEX + 1])
    done = medledger("verify", proof, "--trust", trust, "--rpc", world.rpc_url)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "✗ entry-inclusion" in done.stdout and "(not run)" in done.stdout
    assert "NOT VERIFIED: entry-inclusion: " in done.stdout

    # Usage errors and unreadable files: exit 2.
    done = medledger("verify", tmp_path / "missing.tlog-proof", "--trust", trust, "--rpc", world.rpc_url)
    assert done.returncode == 2 and "cannot read" in done.stderr
    done = medledger("verify", proof, "--trust", trust, "--rpc", world.rpc_url, "--record", tmp_path / "record.json")
    assert done.returncode == 2 and "--salt" in done.stderr
    (tmp_path / "bad-trust.json").write_text("{}")
    done = medledger("verify", proof, "--trust", tmp_path / "bad-trust.json", "--rpc", world.rpc_url)
    assert done.returncode == 2 and "trust policy" in done.stderr


def test_verification_dataclasses_are_frozen(world: World) -> None:
    result = verify(world)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.checks[0].passed = False  # type: ignore[misc]
