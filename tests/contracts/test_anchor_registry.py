"""AnchorRegistry on a real Anvil node (its default hardfork has EIP-7951's P256VERIFY; py-evm has
not, so these tests do not run there). Checkpoints, signed notes and consistency proofs come from
the audit log's own code (medledger_verifier.tlog and .notes) and a real P-256 key; the contract must
accept exactly what that code accepts."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from web3 import Web3
from web3.exceptions import ContractCustomError

from medledger_devstack.testing import Anvil
from medledger_runtime.keys import der_to_raw_rs, raw_rs_to_der
from medledger_verifier import notes, tlog

BUILD = Path(__file__).resolve().parents[2] / "contracts" / "build" / "AnchorRegistry.json"
P256VERIFY = "0x0000000000000000000000000000000000000100"


# --- the log side: trees, checkpoints, signatures (the audit service's code) ------------------


class Log:
    """A transparency log of ``size`` leaves held in memory tiles, signing as ``origin``."""

    def __init__(self, origin: str, key: ec.EllipticCurvePrivateKey, size: int, seed: bytes = b"") -> None:
        """``seed`` makes the leaves differ from another log's (a fork)."""
        self.origin, self.key, self.tiles = origin, key, tlog.MemoryTiles()
        leaves = [tlog.leaf_hash(seed + i.to_bytes(8, "big")) for i in range(size)]
        self.tiles.write(asyncio.run(tlog.append(self.tiles, 0, leaves)).tiles)

    def root(self, size: int) -> bytes:
        return asyncio.run(tlog.tree_root(self.tiles, size))

    def proof(self, old: int, new: int) -> list[bytes]:
        return asyncio.run(tlog.consistency_proof(self.tiles, old, new))

    def signed(self, size: int, key: ec.EllipticCurvePrivateKey | None = None) -> tuple[bytes, bytes]:
        """(root, r||s): the checkpoint at ``size`` as the log signs it (a C2SP signed note)."""
        return sign_checkpoint(self.origin, size, self.root(size), key or self.key)


def sign_checkpoint(origin: str, size: int, root: bytes, key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    """Sign through medledger_verifier.notes (type 0x02: DER ECDSA over SHA-256 of the note text),
    check the note opens with the verifier key, and hand back the signature as raw r||s."""

    async def sign(message: bytes) -> bytes:
        return key.sign(message, ec.ECDSA(hashes.SHA256()))

    verifier = notes.NoteVerifier.from_public_key(origin, key.public_key())
    checkpoint = notes.Checkpoint(origin, size, root)
    text = asyncio.run(notes.sign_checkpoint(checkpoint, [notes.NoteSigner(verifier, sign)]))
    opened, note = notes.open_checkpoint(text, [verifier], origin=origin)
    assert opened == checkpoint
    return root, der_to_raw_rs(note.signatures[0].signature)


def public_xy(key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    numbers = key.public_key().public_numbers()
    return numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big")


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# --- the chain side -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def w3(anvil: Anvil) -> Iterator[Web3]:
    yield Web3(Web3.HTTPProvider(anvil.rpc_url, request_kwargs={"timeout": 60}))


class Registry:
    """A freshly deployed AnchorRegistry with an owner and one anchorer (distinct accounts)."""

    def __init__(self, w3: Web3) -> None:
        self.w3 = w3
        self.owner, self.anchorer, self.stranger = w3.eth.accounts[:3]
        artifact = json.loads(BUILD.read_text())
        factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        receipt = self.send(factory.constructor(), self.owner)
        self.contract = w3.eth.contract(address=receipt.contractAddress, abi=artifact["abi"])
        self.send(self.contract.functions.setAnchorer(self.anchorer, True), self.owner)

    def send(self, call: Any, sender: str) -> Any:
        """Send and mine at once (Anvil mines every second anyway; this keeps tests quick)."""
        tx = call.transact({"from": sender})
        self.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        receipt = self.w3.eth.wait_for_transaction_receipt(tx, timeout=30)
        assert receipt.status == 1
        return receipt

    def send_all(self, calls: list[Any], sender: str) -> list[Any]:
        """Several transactions in one block."""
        txs = [call.transact({"from": sender}) for call in calls]
        self.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        receipts = [self.w3.eth.wait_for_transaction_receipt(tx, timeout=30) for tx in txs]
        assert all(r.status == 1 for r in receipts)
        return receipts

    def register(self, log: Log) -> Any:
        return self.send(self.contract.functions.registerLog(log.origin, *public_xy(log.key)), self.owner)

    def anchor_call(
        self, log: Log, size: int, old: int | None, *, key: ec.EllipticCurvePrivateKey | None = None
    ) -> Any:
        root, signature = log.signed(size, key)
        proof = log.proof(old, size) if old else []
        return self.contract.functions.anchor(log.origin, size, root, signature, proof)

    def anchor(self, log: Log, size: int, old: int | None) -> Any:
        return self.send(self.anchor_call(log, size, old), self.anchorer)


def selector(signature: str) -> str:
    return "0x" + Web3.keccak(text=signature)[:4].hex().removeprefix("0x")


def reverts_with(call: Any, sender: str, signature: str) -> str:
    """The call (simulated by the node, as a sender's gas estimate does) reverts with the custom
    error ``signature``; returns the revert data."""
    with pytest.raises(ContractCustomError) as err:
        call.call({"from": sender})
    data = str(err.value.data)
    assert data.startswith(selector(signature)), (signature, data)
    return data


def accepts(call: Any, sender: str) -> None:
    """The node runs the call to the end without reverting."""
    call.call({"from": sender})


def origin_hash(origin: str) -> bytes:
    return Web3.keccak(text=origin)


# --- tests ------------------------------------------------------------------------------------


def test_anvil_has_the_p256verify_precompile(w3: Web3) -> None:
    """EIP-7951: hash || r || s || x || y in, 32 bytes holding 1 out on success, nothing on failure."""
    key = new_key()
    message = b"medledger\n"
    r_s = der_to_raw_rs(key.sign(message, ec.ECDSA(hashes.SHA256())))
    good = hashlib.sha256(message).digest() + r_s + b"".join(public_xy(key))
    assert w3.eth.call({"to": P256VERIFY, "data": good}) == (1).to_bytes(32, "big")
    bad = hashlib.sha256(b"other").digest() + good[32:]
    assert w3.eth.call({"to": P256VERIFY, "data": bad}) == b""


def test_the_note_text_is_the_c2sp_checkpoint_body(w3: Web3) -> None:
    """checkpointNote (decimal size, base64 root on chain) equals Checkpoint.body() byte for byte."""
    registry = Registry(w3)
    roots = [b"\0" * 32, b"\xff" * 32, bytes(range(32)), bytes(range(224, 256)), os.urandom(32), os.urandom(32)]
    roots += [bytes([(i * 4) % 256] * 32) for i in range(64)]  # every base64 digit in every position
    sizes = [0, 1, 9, 10, 99, 100, 255, 256, 1_000_000, 2**32, 2**63 - 1, 2**64 - 1]
    for i, root in enumerate(roots):
        size = sizes[i % len(sizes)]
        body = f"medledger.test/log\n{size}\n{base64.b64encode(root).decode()}\n"
        if size < tlog.MAX_TREE_SIZE:
            assert body == notes.Checkpoint("medledger.test/log", size, root).body()
        assert registry.contract.functions.checkpointNote("medledger.test/log", size, root).call() == body.encode()


def test_administration_owner_and_anchorers_are_distinct(w3: Web3) -> None:
    registry = Registry(w3)
    c = registry.contract.functions
    owner, anchorer, stranger = registry.owner, registry.anchorer, registry.stranger
    log = Log("medledger.test/admin", new_key(), 4)
    x, y = public_xy(log.key)
    reverts_with(c.registerLog(log.origin, x, y), stranger, "NotOwner(address)")
    reverts_with(c.registerLog(log.origin, x, y), anchorer, "NotOwner(address)")
    reverts_with(c.setAnchorer(stranger, True), anchorer, "NotOwner(address)")
    reverts_with(c.setAnchorer(owner, True), owner, "OwnerIsAnchorer(address)")
    reverts_with(c.transferOwnership(anchorer), owner, "OwnerIsAnchorer(address)")
    reverts_with(c.setAnchorer("0x" + "00" * 20, True), owner, "ZeroAddress()")
    # Keys must be points of P-256; origins one non-empty line.
    reverts_with(c.registerLog(log.origin, x, (int.from_bytes(y, "big") ^ 1).to_bytes(32, "big")), owner,
                 "InvalidPublicKey()")  # fmt: skip
    reverts_with(c.registerLog(log.origin, b"\0" * 32, y), owner, "InvalidPublicKey()")
    reverts_with(c.registerLog("", x, y), owner, "InvalidOrigin()")
    reverts_with(c.registerLog("a\n1", x, y), owner, "InvalidOrigin()")
    receipt = registry.register(log)
    reverts_with(c.registerLog(log.origin, x, y), owner, "OriginAlreadyRegistered(bytes32)")
    registered = registry.contract.events.LogRegistered().process_receipt(receipt)[0].args
    assert (registered.originHash, registered.origin, registered.x, registered.y) == (
        origin_hash(log.origin),
        log.origin,
        x,
        y,
    )
    assert c.logKey(log.origin).call() == [x, y]
    # The owner cannot anchor; an anchorer can until removed.
    reverts_with(registry.anchor_call(log, 2, None), owner, "NotAnchorer(address)")
    reverts_with(registry.anchor_call(log, 2, None), stranger, "NotAnchorer(address)")
    accepts(registry.anchor_call(log, 2, None), anchorer)
    registry.send(c.setAnchorer(anchorer, False), owner)
    reverts_with(registry.anchor_call(log, 2, None), anchorer, "NotAnchorer(address)")
    registry.send(c.setAnchorer(stranger, True), owner)
    registry.send(registry.anchor_call(log, 2, None), stranger)
    assert c.latest(log.origin).call()[0] == 2


def test_consistency_proofs_accepted_for_every_pair_up_to_20_leaves(w3: Web3) -> None:
    """For each old size m < 20 an origin holds the checkpoint m; every checkpoint n in (m, 20]
    with the proof from m is accepted (simulated), then (m, 20) is sent for real."""
    registry = Registry(w3)
    key = new_key()
    logs = {m: Log(f"medledger.test/pairs-{m}", key, 20) for m in range(1, 20)}
    x, y = public_xy(key)
    c = registry.contract.functions
    registry.send_all([c.registerLog(log.origin, x, y) for log in logs.values()], registry.owner)
    registry.send_all([registry.anchor_call(log, m, None) for m, log in logs.items()], registry.anchorer)
    pairs = 0
    for m, log in logs.items():
        for n in range(m + 1, 21):
            accepts(registry.anchor_call(log, n, m), registry.anchorer)
            pairs += 1
    assert pairs == 190
    receipts = registry.send_all([registry.anchor_call(log, 20, m) for m, log in logs.items()], registry.anchorer)
    for (m, log), receipt in zip(logs.items(), receipts, strict=True):
        assert c.latest(log.origin).call()[:2] == [20, log.root(20)]
        assert c.rootAt(log.origin, m).call() == log.root(m)
        event = registry.contract.events.CheckpointAnchored().process_receipt(receipt)[0].args
        assert (event.size, event.previousSize, event.root) == (20, m, log.root(20))


def test_one_origin_grows_through_many_sizes_and_the_views_return_what_was_anchored(w3: Web3) -> None:
    registry = Registry(w3)
    log = Log("medledger.test/growing", new_key(), 5000)
    verifier = notes.NoteVerifier.from_public_key(log.origin, log.key.public_key())
    registry.register(log)
    c = registry.contract.functions
    sizes = [1, 2, 3, 4, 7, 8, 9, 16, 17, 31, 32, 33, 100, 255, 256, 257, 1000, 1023, 1024, 1025, 4095, 4096, 5000]
    previous = 0
    for size in sizes:
        receipt = registry.anchor(log, size, previous or None)
        block = w3.eth.get_block(receipt.blockNumber)
        assert c.latest(log.origin).call() == [size, log.root(size), receipt.blockNumber, block.timestamp]
        event = registry.contract.events.CheckpointAnchored().process_receipt(receipt)[0].args
        assert event.originHash == origin_hash(log.origin)
        assert (event.size, event.root, event.previousSize) == (size, log.root(size), previous)
        # The transaction's calldata holds what rebuilds the signed note: the origin and r||s.
        _, args = registry.contract.decode_function_input(w3.eth.get_transaction(receipt.transactionHash).input)
        note = notes.SignedNote(
            notes.Checkpoint(args["origin"], args["size"], args["root"]).body(),
            (notes.NoteSignature(log.origin, verifier.key_id, raw_rs_to_der(args["signature"])),),
        )
        notes.open_checkpoint(note.format(), [verifier], origin=log.origin)
        previous = size
    for size in sizes:
        assert c.rootAt(log.origin, size).call() == log.root(size)
    assert c.rootAt(log.origin, 5).call() == b"\0" * 32  # never anchored
    reverts_with(c.latest("medledger.test/nobody"), registry.anchorer, "UnknownOrigin(bytes32)")


def test_bad_checkpoints_revert_with_named_errors(w3: Web3) -> None:
    registry = Registry(w3)
    c = registry.contract.functions
    anchorer = registry.anchorer
    log = Log("medledger.test/attacks", new_key(), 64)
    fork = Log(log.origin, log.key, 64, seed=b"fork")  # the same key signing another history
    registry.register(log)
    registry.anchor(log, 13, None)

    def call(size: int, root: bytes, signature: bytes, proof: list[bytes], origin: str = log.origin) -> Any:
        return c.anchor(origin, size, root, signature, proof)

    root, signature = log.signed(40)
    good_proof = log.proof(13, 40)
    accepts(call(40, root, signature, good_proof), anchorer)

    # A fork: the log's key signed another root at an anchored size, or another history beyond it.
    fork_root, fork_sig = fork.signed(13)
    data = reverts_with(call(13, fork_root, fork_sig, []), anchorer, "Fork(uint64,bytes32,bytes32)")
    assert log.root(13).hex() in data and fork_root.hex() in data
    fork_root, fork_sig = fork.signed(40)
    reverts_with(call(40, fork_root, fork_sig, fork.proof(13, 40)), anchorer, "BadConsistencyProof(uint64,uint64)")
    reverts_with(call(40, fork_root, fork_sig, good_proof), anchorer, "BadConsistencyProof(uint64,uint64)")
    # A proof from a wrong old size (the contract always proves from its latest, 13).
    for old in (1, 8, 12, 14, 16, 39):
        reverts_with(call(40, root, signature, log.proof(old, 40)), anchorer, "BadConsistencyProof(uint64,uint64)")
    # Truncated, extended, reordered, tampered proofs; the proof for another new size.
    assert len(good_proof) >= 3
    variants = [[], good_proof[:-1], good_proof[1:], [*good_proof, good_proof[-1]], good_proof[::-1]]
    for i in range(len(good_proof)):
        for at in (0, 31):  # one bit flipped in the first or the last byte of each hash
            tampered = [bytearray(h) for h in good_proof]
            tampered[i][at] ^= 1
            variants.append([bytes(h) for h in tampered])
    variants.append(log.proof(13, 41))
    for proof in variants:
        assert not tlog.verify_consistency(13, 40, log.root(13), root, proof)  # the Python verifier agrees
        reverts_with(call(40, root, signature, proof), anchorer, "BadConsistencyProof(uint64,uint64)")
    # Bad signatures: another key, another checkpoint's signature, a tampered or short signature.
    _, other_key_sig = log.signed(40, new_key())
    _, sig_41 = log.signed(41)
    flipped = signature[:63] + bytes([signature[63] ^ 1])
    for bad in (other_key_sig, sig_41, flipped, signature[:63], signature + b"\0", b"\0" * 64):
        reverts_with(call(40, root, bad, good_proof), anchorer, "BadSignature()")
    # The right signature over a wrong root or size.
    reverts_with(call(41, root, signature, log.proof(13, 41)), anchorer, "BadSignature()")
    reverts_with(call(40, log.root(41), signature, good_proof), anchorer, "BadSignature()")
    # An unknown origin; a key registered for one origin does not sign for another.
    other = Log("medledger.test/unregistered", log.key, 40)
    o_root, o_sig = other.signed(40)
    reverts_with(call(40, o_root, o_sig, [], origin=other.origin), anchorer, "UnknownOrigin(bytes32)")
    # A smaller size, signed and never anchored; the empty tree; a zero root.
    root_9, sig_9 = log.signed(9)
    reverts_with(call(9, root_9, sig_9, []), anchorer, "SizeBelowLatest(uint64,uint64)")
    root_0, sig_0 = sign_checkpoint(log.origin, 0, tlog.EMPTY_ROOT, log.key)
    reverts_with(call(0, root_0, sig_0, []), anchorer, "EmptyTree()")
    reverts_with(call(40, b"\0" * 32, signature, good_proof), anchorer, "ZeroRoot()")
    # Nothing above changed the state; the good checkpoint goes through, once.
    assert c.latest(log.origin).call()[:2] == [13, log.root(13)]
    registry.send(call(40, root, signature, good_proof), anchorer)
    reverts_with(call(40, root, signature, good_proof), anchorer, "AlreadyAnchored(bytes32,uint64,bytes32)")
    # An older accepted checkpoint sent again is recognised too, and a signed fork of it is named.
    root_13, sig_13 = log.signed(13)
    reverts_with(call(13, root_13, sig_13, []), anchorer, "AlreadyAnchored(bytes32,uint64,bytes32)")
    fork_root, fork_sig = fork.signed(13)
    reverts_with(call(13, fork_root, fork_sig, []), anchorer, "Fork(uint64,bytes32,bytes32)")
    # The first checkpoint of an origin carries no proof.
    registry.register(Log("medledger.test/first", log.key, 1))
    first = Log("medledger.test/first", log.key, 8)
    f_root, f_sig = first.signed(8)
    reverts_with(call(8, f_root, f_sig, [first.root(4)], origin=first.origin), anchorer,
                 "BadConsistencyProof(uint64,uint64)")  # fmt: skip
    assert c.latest(log.origin).call()[:2] == [40, log.root(40)]


def test_a_rotated_key_signs_from_then_on_and_history_still_holds(w3: Web3) -> None:
    registry = Registry(w3)
    c = registry.contract.functions
    log = Log("medledger.test/rotation", new_key(), 30)
    registry.register(log)
    registry.anchor(log, 10, None)
    new = new_key()
    reverts_with(c.rotateLogKey(log.origin, *public_xy(new)), registry.anchorer, "NotOwner(address)")
    reverts_with(c.rotateLogKey("medledger.test/nobody", *public_xy(new)), registry.owner, "UnknownOrigin(bytes32)")
    registry.send(c.rotateLogKey(log.origin, *public_xy(new)), registry.owner)
    reverts_with(registry.anchor_call(log, 20, 10), registry.anchorer, "BadSignature()")
    fork = Log(log.origin, new, 30, seed=b"fork")
    reverts_with(registry.anchor_call(fork, 20, 10, key=new), registry.anchorer, "BadConsistencyProof(uint64,uint64)")
    registry.send(registry.anchor_call(log, 20, 10, key=new), registry.anchorer)
    assert c.latest(log.origin).call()[:2] == [20, log.root(20)]


def test_gas_per_anchor_at_tree_size_one_million(w3: Web3, capsys: pytest.CaptureFixture[str]) -> None:
    """Gas of one anchor covering 100, 1,000 and 10,000 new entries at tree size 1,000,000 (and of
    an origin's first anchor), printed; no bound is asserted."""
    registry = Registry(w3)
    key = new_key()
    size = 1_000_000
    tree = Log("medledger.test/million", key, size)
    rows = []
    for covered in (100, 1_000, 10_000):
        log = Log(f"medledger.test/million-{covered}", key, 0)
        log.tiles = tree.tiles  # the same tree under another origin
        registry.register(log)
        first = registry.anchor(log, size - covered, None)
        receipt = registry.anchor(log, size, size - covered)
        proof_hashes = len(log.proof(size - covered, size))
        rows.append((covered, proof_hashes, receipt.gasUsed, first.gasUsed))
        assert registry.contract.functions.latest(log.origin).call()[:2] == [size, tree.root(size)]
    with capsys.disabled():
        print("\nAnchorRegistry gas per anchor at tree size 1,000,000 (Anvil):")
        for covered, proof_hashes, gas, first_gas in rows:
            print(
                f"  {covered:>6} new entries, {proof_hashes:>2}-hash proof: {gas:,} gas "
                f"({gas / covered:.1f} per entry); first anchor of the origin {first_gas:,} gas"
            )
