"""Deploying medledger's contracts on a development chain (Anvil): what `medledger up`, the tests
and the benchmarks set up. A production chain's contracts are deployed by their owner's own
process; the services only read and anchor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from eth_utils.address import to_checksum_address
from web3.exceptions import ContractCustomError

from medledger_verifier import notes
from medledger_verifier.chain import ANCHOR_REGISTRY, CONSENT_REGISTRY, Web3, abi, artifact, contract


async def deploy(w3: Web3, name: str, sender: str, *args: Any, wait_seconds: float = 60.0) -> str:
    """Deploy ``name`` from ``sender``, an account the node holds (Anvil's development accounts);
    returns the contract's checksummed address once the deployment is mined."""
    factory = w3.eth.contract(abi=abi(name), bytecode=artifact(name)["bytecode"])
    tx = await factory.constructor(*args).transact({"from": to_checksum_address(sender)})
    receipt = await w3.eth.wait_for_transaction_receipt(tx, timeout=wait_seconds)
    if receipt["status"] != 1:
        raise RuntimeError(f"deploying {name} reverted (transaction {tx.hex()})")
    return str(receipt["contractAddress"])


async def transact_and_wait(w3: Web3, call: Any, sender: str, *, wait_seconds: float = 60.0) -> Any:
    """Send a contract call from an account the node holds and wait until it is mined."""
    tx = await call.transact({"from": to_checksum_address(sender)})
    receipt = await w3.eth.wait_for_transaction_receipt(tx, timeout=wait_seconds)
    if receipt["status"] != 1:
        raise RuntimeError(f"transaction {tx.hex()} reverted")
    return receipt


@dataclass(frozen=True)
class Deployment:
    """Both registries on one chain, their owner, and the anchoring service's account."""

    chain_id: int
    anchor_registry: str
    consent_registry: str
    owner: str
    anchorer: str
    block_number: int

    def as_json(self) -> dict[str, Any]:
        return {
            "chain_id": self.chain_id,
            "anchor_registry": self.anchor_registry,
            "consent_registry": self.consent_registry,
            "owner": self.owner,
            "anchorer": self.anchorer,
            "block_number": self.block_number,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Deployment:
        return cls(
            chain_id=int(data["chain_id"]),
            anchor_registry=to_checksum_address(data["anchor_registry"]),
            consent_registry=to_checksum_address(data["consent_registry"]),
            owner=to_checksum_address(data["owner"]),
            anchorer=to_checksum_address(data["anchorer"]),
            block_number=int(data["block_number"]),
        )


async def deploy_registries(w3: Web3, owner: str, anchorer: str, *, fund_wei: int = 10**19) -> Deployment:
    """Deploy AnchorRegistry and ConsentRegistry from ``owner`` (an account the node holds), make
    ``anchorer`` their only anchorer and writer, and fund it with ``fund_wei``."""
    anchorer = to_checksum_address(anchorer)
    anchors = await deploy(w3, ANCHOR_REGISTRY, owner)
    consents = await deploy(w3, CONSENT_REGISTRY, owner)
    await transact_and_wait(w3, contract(w3, ANCHOR_REGISTRY, anchors).functions.setAnchorer(anchorer, True), owner)
    await transact_and_wait(w3, contract(w3, CONSENT_REGISTRY, consents).functions.setWriter(anchorer, True), owner)
    if fund_wei:
        tx = await w3.eth.send_transaction(
            {"from": to_checksum_address(owner), "to": anchorer, "value": w3.to_wei(fund_wei, "wei")}
        )
        await w3.eth.wait_for_transaction_receipt(tx)
    return Deployment(
        chain_id=await w3.eth.chain_id,
        anchor_registry=anchors,
        consent_registry=consents,
        owner=to_checksum_address(owner),
        anchorer=anchorer,
        block_number=await w3.eth.block_number,
    )


async def deploy_for_log(
    w3: Web3, owner: str, anchorer: str, origin: str, verifier_keys: Sequence[str], *, fund_wei: int = 10**19
) -> Deployment:
    """Both registries on a fresh chain, ``anchorer`` funded, and the log ``origin`` registered
    with the P-256 key among its C2SP ``verifier_keys``: what the tests and benchmarks set up
    (`medledger up` does the same in steps, reusing what a previous run deployed)."""
    p256 = [v for v in map(notes.NoteVerifier.parse, verifier_keys) if v.signature_type == notes.SIGNATURE_ECDSA]
    if len(p256) != 1:
        raise ValueError(f"the log has {len(p256)} P-256 verifier keys, not one")
    deployment = await deploy_registries(w3, owner, anchorer, fund_wei=fund_wei)
    await register_log(w3, deployment.anchor_registry, owner, origin, p256[0].public_key)
    return deployment


def p256_xy(spki_der: bytes) -> tuple[bytes, bytes]:
    """The 32-byte x and y of a P-256 public key (DER SubjectPublicKeyInfo), as the registry
    takes them."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_der_public_key(spki_der)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not a P-256 public key")
    numbers = key.public_numbers()
    return numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big")


async def register_log(w3: Web3, anchor_registry: str, owner: str, origin: str, p256_spki_der: bytes) -> None:
    """Register the log ``origin`` with its P-256 checkpoint key; a no-op when it already is with
    that key (a rerun of `medledger up`)."""
    registry = contract(w3, ANCHOR_REGISTRY, anchor_registry)
    x, y = p256_xy(p256_spki_der)
    try:
        if tuple(await registry.functions.logKey(origin).call()) == (x, y):
            return
    except ContractCustomError:  # UnknownOrigin: not registered yet
        pass
    await transact_and_wait(w3, registry.functions.registerLog(origin, x, y), owner)
