"""The chain side that anchoring, `medledger up` and `medledger verify` share: the compiled
contracts, a web3.py connection to any EVM JSON-RPC endpoint, deployment, and the names of the
contracts' custom errors (a revert says *why*, e.g. ``AlreadyAnchored``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from eth_abi.abi import decode as abi_decode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.exceptions import ContractCustomError

from medledger_common import notes

# web3's AsyncWeb3 is generic in its provider.
Web3 = AsyncWeb3[AsyncHTTPProvider]

# Where `make setup` compiles the contracts (tools/compile_contracts.js); an image sets this.
BUILD_DIR_VARIABLE = "MEDLEDGER_CONTRACTS_BUILD_DIR"
ANCHOR_REGISTRY = "AnchorRegistry"
CONSENT_REGISTRY = "ConsentRegistry"


def build_dir() -> Path:
    configured = os.environ.get(BUILD_DIR_VARIABLE)
    if configured:
        return Path(configured)
    # The workspace is installed editable: walk up from this file to the repository's contracts.
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "contracts" / "build"
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no contracts/build folder found: run `make setup`, or set {BUILD_DIR_VARIABLE}")


@cache
def artifact(name: str) -> dict[str, Any]:
    """The solc artifact of contract ``name``: ``abi``, ``bytecode``, ``deployedBytecode``."""
    path = build_dir() / f"{name}.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def abi(name: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = artifact(name)["abi"]
    return result


def connect(rpc_url: str, *, timeout: float = 30.0) -> Web3:
    """An async web3 for ``rpc_url`` (HTTP JSON-RPC)."""
    return AsyncWeb3(AsyncHTTPProvider(rpc_url, request_kwargs={"timeout": timeout}))


def contract(w3: Web3, name: str, address: str) -> Any:
    return w3.eth.contract(address=to_checksum_address(address), abi=abi(name))


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
class CustomError:
    """A decoded Solidity custom error: its name and arguments."""

    name: str
    args: tuple[Any, ...]

    def __str__(self) -> str:
        return f"{self.name}({', '.join(_show(a) for a in self.args)})"


def _show(value: Any) -> str:
    return "0x" + value.hex() if isinstance(value, bytes) else str(value)


@cache
def _errors(name: str) -> dict[bytes, tuple[str, tuple[str, ...]]]:
    found: dict[bytes, tuple[str, tuple[str, ...]]] = {}
    for item in abi(name):
        if item.get("type") == "error":
            types = tuple(str(i["type"]) for i in item["inputs"])
            selector = keccak(text=f"{item['name']}({','.join(types)})")[:4]
            found[selector] = (str(item["name"]), types)
    return found


def decode_error(name: str, data: bytes | str | None) -> CustomError | None:
    """The custom error of contract ``name`` that revert ``data`` encodes, or None."""
    if data is None:
        return None
    raw = bytes.fromhex(data.removeprefix("0x")) if isinstance(data, str) else data
    known = _errors(name).get(raw[:4])
    if known is None:
        return None
    error_name, types = known
    return CustomError(error_name, tuple(abi_decode(list(types), raw[4:])))


# --- deployment: what `medledger up`, the tests and the benchmarks set up ----------------------


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
