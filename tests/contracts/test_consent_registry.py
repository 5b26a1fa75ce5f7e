"""ConsentRegistry on two EVMs: py-evm in process (fast) and Anvil over JSON-RPC (a real node).
Access control, events, edge cases, and a status check by someone who holds only the consent
document and its salt."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_tester.exceptions import TransactionFailed
from web3 import EthereumTesterProvider, Web3
from web3.exceptions import ContractCustomError

from medledger_consent import domain, fhir
from medledger_devstack.testing import Anvil

BUILD = Path(__file__).resolve().parents[2] / "contracts" / "build" / "ConsentRegistry.json"
ACTIVE, REVOKED, UNKNOWN = 1, 2, 0


@pytest.fixture(params=["py-evm", "anvil"])
def w3(request: pytest.FixtureRequest) -> Iterator[Web3]:
    if request.param == "py-evm":
        yield Web3(EthereumTesterProvider())
    else:
        anvil: Anvil = request.getfixturevalue("anvil")
        yield Web3(Web3.HTTPProvider(anvil.rpc_url, request_kwargs={"timeout": 30}))


def deploy(w3: Web3, owner: str) -> Any:
    artifact = json.loads(BUILD.read_text())
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    receipt = w3.eth.wait_for_transaction_receipt(factory.constructor().transact({"from": owner}), timeout=30)
    return w3.eth.contract(address=receipt.contractAddress, abi=artifact["abi"])


def send(w3: Web3, call: Any, sender: str) -> Any:
    return w3.eth.wait_for_transaction_receipt(call.transact({"from": sender}), timeout=30)


def selector(signature: str) -> str:
    return "0x" + Web3.keccak(text=signature)[:4].hex().removeprefix("0x")


def reverts_with(w3: Web3, call: Any, sender: str, signature: str) -> None:
    """The call reverts with the custom error `signature`. web3 reports it from a node as
    ContractCustomError (hex data); eth-tester as TransactionFailed (the raw bytes)."""
    with pytest.raises((ContractCustomError, TransactionFailed)) as err:
        call.transact({"from": sender})
    from_node = isinstance(err.value, ContractCustomError)
    data = str(err.value.data) if from_node else "0x" + _revert_bytes(err.value).hex()
    assert data.startswith(selector(signature)), data


def _revert_bytes(exc: BaseException | None) -> bytes:
    """The revert data somewhere down eth-tester's chain of exceptions."""
    while exc is not None:
        if exc.args and isinstance(exc.args[0], bytes):
            return exc.args[0]
        exc = exc.__cause__ or exc.__context__
    return b""


def commitment_of(seed: int) -> bytes:
    return Web3.keccak(text=f"consent {seed} {time.time_ns()}")


def test_only_writers_record_and_only_the_owner_names_writers(w3: Web3) -> None:
    owner, writer, stranger = w3.eth.accounts[:3]
    registry = deploy(w3, owner)
    c = commitment_of(1)
    reverts_with(w3, registry.functions.grant(c, 0, 0), writer, "NotWriter(address)")
    reverts_with(w3, registry.functions.setWriter(writer, True), stranger, "NotOwner(address)")
    receipt = send(w3, registry.functions.setWriter(writer, True), owner)
    assert registry.events.WriterSet().process_receipt(receipt)[0].args.writer == writer
    send(w3, registry.functions.grant(c, 0, 0), writer)
    reverts_with(w3, registry.functions.revoke(c, commitment_of(2)), stranger, "NotWriter(address)")
    # A writer taken back can write no more.
    send(w3, registry.functions.setWriter(writer, False), owner)
    reverts_with(w3, registry.functions.grant(commitment_of(3), 0, 0), writer, "NotWriter(address)")
    # Ownership moves, and the old owner loses it.
    reverts_with(w3, registry.functions.transferOwnership("0x" + "00" * 20), owner, "ZeroAddress()")
    send(w3, registry.functions.transferOwnership(stranger), owner)
    assert registry.functions.owner().call() == stranger
    reverts_with(w3, registry.functions.setWriter(writer, True), owner, "NotOwner(address)")


def test_grant_and_revoke_emit_events_and_set_the_status(w3: Web3) -> None:
    owner, writer = w3.eth.accounts[:2]
    registry = deploy(w3, owner)
    send(w3, registry.functions.setWriter(writer, True), owner)
    c, revocation = commitment_of(10), commitment_of(11)
    # A window after the grant's block: isInForce also asks that the chain held the grant.
    start = w3.eth.get_block("latest").timestamp + 1_000
    receipt = send(w3, registry.functions.grant(c, start, start + 1_000), writer)
    granted = registry.events.ConsentGranted().process_receipt(receipt)[0].args
    assert (granted.commitment, granted.validFrom, granted.validUntil) == (c, start, start + 1_000)
    entry = registry.functions.statusOf(c).call()
    assert entry[0] == ACTIVE and tuple(entry[1:3]) == (start, start + 1_000)
    block_time = w3.eth.get_block(receipt.blockNumber).timestamp
    assert entry[3] == block_time
    assert registry.functions.isInForce(c, start).call()
    assert registry.functions.isInForce(c, start + 999).call()
    assert not registry.functions.isInForce(c, start - 1).call()
    assert not registry.functions.isInForce(c, start + 1_000).call()  # the end is exclusive

    receipt = send(w3, registry.functions.revoke(c, revocation), writer)
    revoked = registry.events.ConsentRevoked().process_receipt(receipt)[0].args
    assert (revoked.commitment, revoked.revokedBy) == (c, revocation)
    entry = registry.functions.statusOf(c).call()
    assert entry[0] == REVOKED and entry[5] == revocation
    assert entry[4] == w3.eth.get_block(receipt.blockNumber).timestamp
    assert not registry.functions.isInForce(c, start + 500).call()


def test_edge_cases_revert_with_their_own_errors(w3: Web3) -> None:
    owner, writer = w3.eth.accounts[:2]
    registry = deploy(w3, owner)
    send(w3, registry.functions.setWriter(writer, True), owner)
    c = commitment_of(20)
    reverts_with(w3, registry.functions.grant(b"\0" * 32, 0, 0), writer, "ZeroCommitment()")
    reverts_with(w3, registry.functions.grant(c, 5, 5), writer, "EmptyWindow(uint64,uint64)")
    reverts_with(w3, registry.functions.revoke(c, commitment_of(21)), writer, "NotActive(bytes32,uint8)")
    send(w3, registry.functions.grant(c, 0, 0), writer)
    reverts_with(w3, registry.functions.grant(c, 0, 0), writer, "AlreadyRecorded(bytes32)")
    reverts_with(w3, registry.functions.revoke(c, b"\0" * 32), writer, "ZeroCommitment()")
    send(w3, registry.functions.revoke(c, commitment_of(22)), writer)
    reverts_with(w3, registry.functions.revoke(c, commitment_of(23)), writer, "NotActive(bytes32,uint8)")
    # A revoked commitment cannot come back.
    reverts_with(w3, registry.functions.grant(c, 0, 0), writer, "AlreadyRecorded(bytes32)")
    # Open-ended windows are in force at any later time; unknown commitments never are.
    open_ended = commitment_of(24)
    send(w3, registry.functions.grant(open_ended, 100, 0), writer)
    assert registry.functions.isInForce(open_ended, 2**63).call()
    assert registry.functions.statusOf(commitment_of(25)).call()[0] == UNKNOWN


def test_anyone_with_the_document_and_its_salt_can_check_the_status(w3: Web3) -> None:
    owner, writer, patient = w3.eth.accounts[:3]
    registry = deploy(w3, owner)
    send(w3, registry.functions.setWriter(writer, True), owner)
    now = time.time()
    version = domain.ConsentVersion(
        consent_id="cns_chain",
        version=1,
        patient_id="pat_chain",
        grantee_id="prn_chain",
        provision=domain.PERMIT,
        actions=frozenset(),
        categories=frozenset(),
        purposes=frozenset(),
        period_start=now,
        period_end=now + 3600,
        status=domain.ACTIVE,
        recorded_by="pat_chain",
        recorded_at=now,
    )
    document, salt = fhir.fhir_consent(version), domain.new_salt()
    commitment = bytes.fromhex(fhir.commitment(document, salt))
    send(w3, registry.functions.grant(commitment, int(now), int(now) + 3600), writer)
    # The patient recomputes the commitment from what they hold; the chain knows nothing else.
    recomputed = bytes.fromhex(fhir.commitment(json.loads(json.dumps(document)), salt))
    assert registry.functions.isInForce(recomputed, int(now) + 60).call({"from": patient})
    # A guess without the salt finds nothing.
    guess = bytes.fromhex(fhir.commitment(document, bytes(32)))
    assert registry.functions.statusOf(guess).call()[0] == UNKNOWN


def latest_time(w3: Web3) -> int:
    return int(w3.eth.get_block("latest").timestamp)


def test_is_in_force_answers_for_the_past(w3: Web3) -> None:
    """In force at `when` iff recorded on chain by then, validFrom <= when < validUntil, and not
    revoked at or before `when`: a revocation ends a version from its block on, never before."""
    owner, writer = w3.eth.accounts[:2]
    registry = deploy(w3, owner)
    send(w3, registry.functions.setWriter(writer, True), owner)
    in_force = registry.functions.isInForce
    c, successor = commitment_of(30), commitment_of(31)
    # The window reaches back before the grant is recorded, and ends well after it.
    now = latest_time(w3)
    valid_from, valid_until = now - 100, now + 10_000
    send(w3, registry.functions.grant(c, valid_from, valid_until), writer)
    recorded_at = registry.functions.statusOf(c).call()[3]
    assert valid_from < recorded_at < valid_until
    # Before the grant: in the window, but the chain did not hold it yet.
    assert not in_force(c, valid_from - 1).call()
    assert not in_force(c, valid_from).call()
    assert not in_force(c, recorded_at - 1).call()
    # In the window once recorded.
    assert in_force(c, recorded_at).call()
    assert in_force(c, valid_until - 1).call()

    send(w3, registry.functions.revoke(c, successor), writer)
    revoked_at = registry.functions.statusOf(c).call()[4]
    assert revoked_at > recorded_at  # a later block
    # Before the revocation it still was in force: the past stays as it was.
    assert in_force(c, recorded_at).call()
    assert in_force(c, revoked_at - 1).call()
    # From the revocation's block on, it is not.
    assert not in_force(c, revoked_at).call()
    assert not in_force(c, valid_until - 1).call()
    assert not in_force(c, valid_until).call()


def test_is_in_force_ends_at_valid_until_and_starts_at_valid_from(w3: Web3) -> None:
    owner, writer = w3.eth.accounts[:2]
    registry = deploy(w3, owner)
    send(w3, registry.functions.setWriter(writer, True), owner)
    in_force = registry.functions.isInForce
    ending, later, open_ended = commitment_of(40), commitment_of(41), commitment_of(42)
    now = latest_time(w3)
    send(w3, registry.functions.grant(ending, now - 50, now + 5_000), writer)
    send(w3, registry.functions.grant(later, now + 2_000, now + 3_000), writer)
    send(w3, registry.functions.grant(open_ended, now - 50, 0), writer)
    recorded_at = registry.functions.statusOf(open_ended).call()[3]
    # After validUntil (exclusive), never revoked: not in force.
    assert in_force(ending, now + 4_999).call()
    assert not in_force(ending, now + 5_000).call()
    assert not in_force(ending, 2**64 - 1).call()
    # Before validFrom, although recorded: not in force.
    assert not in_force(later, now + 1_999).call()
    assert in_force(later, now + 2_000).call()
    assert not in_force(later, now + 3_000).call()
    # No end: in force from its recording on, at any later time.
    assert not in_force(open_ended, recorded_at - 1).call()
    assert in_force(open_ended, recorded_at).call()
    assert in_force(open_ended, 2**64 - 1).call()
    # Unknown commitments never are.
    assert not in_force(commitment_of(43), now).call()
