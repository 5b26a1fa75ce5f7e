"""The chain side that anchoring and `medledger verify` share: the compiled contracts, a web3.py
connection to any EVM JSON-RPC endpoint (the verifier's ``chain`` extra), and the names of the
contracts' custom errors (a revert says *why*, e.g. ``AlreadyAnchored``). Deploying the contracts
is the dev stack's (``medledger_devstack.contracts``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from eth_abi.abi import decode as abi_decode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from web3 import AsyncHTTPProvider, AsyncWeb3

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


# The parts of AnchorRegistry's ABI a verifier reads, written out here so that checking a proof
# needs no compiled contracts (libs/verifier/tests checks them against the compiled ABI).
ANCHOR_REGISTRY_READS: list[dict[str, Any]] = [
    {
        "inputs": [
            {"internalType": "string", "name": "origin", "type": "string"},
            {"internalType": "uint64", "name": "size", "type": "uint64"},
        ],
        "name": "rootAt",
        "outputs": [{"internalType": "bytes32", "name": "", "type": "bytes32"}],
        "stateMutability": "view",
        "type": "function",
    },
    {
        "anonymous": False,
        "inputs": [
            {"indexed": True, "internalType": "bytes32", "name": "originHash", "type": "bytes32"},
            {"indexed": False, "internalType": "uint64", "name": "size", "type": "uint64"},
            {"indexed": False, "internalType": "bytes32", "name": "root", "type": "bytes32"},
            {"indexed": False, "internalType": "uint64", "name": "previousSize", "type": "uint64"},
        ],
        "name": "CheckpointAnchored",
        "type": "event",
    },
    {
        "inputs": [{"internalType": "string", "name": "origin", "type": "string"}],
        "name": "latest",
        "outputs": [
            {"internalType": "uint64", "name": "size", "type": "uint64"},
            {"internalType": "bytes32", "name": "root", "type": "bytes32"},
            {"internalType": "uint64", "name": "blockNumber", "type": "uint64"},
            {"internalType": "uint64", "name": "timestamp", "type": "uint64"},
        ],
        "stateMutability": "view",
        "type": "function",
    },
    {
        "inputs": [{"internalType": "bytes32", "name": "originHash", "type": "bytes32"}],
        "name": "UnknownOrigin",
        "type": "error",
    },
]


def anchor_registry_reader(w3: Web3, address: str) -> Any:
    """The anchor registry at ``address``, with only what a verifier reads (``rootAt``,
    ``latest`` and the ``CheckpointAnchored`` event)."""
    return w3.eth.contract(address=to_checksum_address(address), abi=ANCHOR_REGISTRY_READS)


_UNKNOWN_ORIGIN = keccak(text="UnknownOrigin(bytes32)")[:4]


@dataclass(frozen=True)
class LatestAnchor:
    """The registry's latest accepted checkpoint of an origin (tree size 0: none yet)."""

    tree_size: int
    root: bytes
    block_number: int
    timestamp: int


async def latest_anchor(w3: Web3, address: str, origin: str) -> LatestAnchor | None:
    """What the registry at ``address`` last accepted for ``origin``; None if it has no log of
    that origin registered. Other failures of the call (RPC, no contract there) propagate."""
    try:
        size, root, block, when = await anchor_registry_reader(w3, address).functions.latest(origin).call()
    except Exception as exc:
        data = getattr(exc, "data", None)
        if isinstance(data, str) and data.removeprefix("0x")[:8].lower() == _UNKNOWN_ORIGIN.hex():
            return None
        raise
    return LatestAnchor(int(size), bytes(root), int(block), int(when))


# The part of ConsentRegistry's ABI a verifier reads (`medledger verify consent`), written out for
# the same reason and checked the same way.
CONSENT_REGISTRY_READS: list[dict[str, Any]] = [
    {
        "inputs": [{"internalType": "bytes32", "name": "commitment", "type": "bytes32"}],
        "name": "statusOf",
        "outputs": [
            {
                "components": [
                    {"internalType": "enum ConsentRegistry.Status", "name": "status", "type": "uint8"},
                    {"internalType": "uint64", "name": "validFrom", "type": "uint64"},
                    {"internalType": "uint64", "name": "validUntil", "type": "uint64"},
                    {"internalType": "uint64", "name": "recordedAt", "type": "uint64"},
                    {"internalType": "uint64", "name": "revokedAt", "type": "uint64"},
                    {"internalType": "bytes32", "name": "revokedBy", "type": "bytes32"},
                ],
                "internalType": "struct ConsentRegistry.Entry",
                "name": "",
                "type": "tuple",
            }
        ],
        "stateMutability": "view",
        "type": "function",
    },
]


def consent_registry_reader(w3: Web3, address: str) -> Any:
    """The consent registry at ``address``, with only what a verifier reads (``statusOf``)."""
    return w3.eth.contract(address=to_checksum_address(address), abi=CONSENT_REGISTRY_READS)


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
