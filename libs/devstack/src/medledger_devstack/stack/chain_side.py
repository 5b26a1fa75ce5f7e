"""The chain side of the local stack: the anchorer's account, the two registries (deployed or
reused from ``chain.json``), and once audit serves, the log registered on AnchorRegistry and
``trust-policy.json`` written: the file an operator publishes for verifiers of anchored proofs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
from eth_account import Account
from eth_utils.address import to_checksum_address
from medledger.audit.v1 import audit_service_pb2, audit_service_pb2_grpc
from medledger.records.v1 import records_service_pb2, records_service_pb2_grpc
from web3.exceptions import ContractCustomError
from web3.types import Wei

from medledger_devstack import contracts
from medledger_devstack.cli.state import StateDir, read_chain_key
from medledger_runtime.files import write_atomically
from medledger_sdk.cli.errors import CommandError
from medledger_verifier import chain, notes
from medledger_verifier.proof_files import TrustPolicy

_T = TypeVar("_T")

ETHER = 10**18
ANCHORER_FUNDS_WEI = 10 * ETHER
# A reused anchorer with less than this is topped up with ANCHORER_FUNDS_WEI.
ANCHORER_LOW_WEI = 1 * ETHER
# What the local trust policy asks of an anchor: Anvil mines a block a second, one is enough.
MIN_CONFIRMATIONS = 1


def chain_step(what: str, step: Coroutine[Any, Any, _T]) -> _T:
    """Run one chain step to its end; a failure becomes a CommandError naming the step. Signals
    only set a flag (``handling_signals``), so a step is never cut in the middle of a transaction."""
    try:
        return asyncio.run(step)
    except CommandError:
        raise
    except Exception as exc:  # web3, HTTP and gRPC errors alike: say what failed and stop the stack
        raise CommandError(f"{what} failed: {type(exc).__name__}: {exc}") from None


def anchorer_address(state: StateDir) -> str:
    """The anchoring service's account, from its key file (made on first use)."""
    return str(Account.from_key(read_chain_key(state.anchorer_key_file())).address)


def recorded_deployment(state: StateDir) -> contracts.Deployment | None:
    try:
        return contracts.Deployment.from_json(json.loads(state.chain_file.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"  ignoring {state.chain_file}: unreadable ({type(exc).__name__}: {exc})")
        return None


async def _still_deployed(w3: chain.Web3, recorded: contracts.Deployment, anchorer: str) -> str | None:
    """Why the recorded deployment cannot be reused on this chain, or None if it can."""
    if await w3.eth.chain_id != recorded.chain_id:
        return f"it is on chain {recorded.chain_id}"
    for name, address in (("AnchorRegistry", recorded.anchor_registry), ("ConsentRegistry", recorded.consent_registry)):
        if not await w3.eth.get_code(to_checksum_address(address)):
            return f"this chain has no {name} at {address} (a new chain state)"
    if recorded.anchorer != anchorer:
        return f"it names another anchorer ({recorded.anchorer})"
    return None


async def set_up_contracts(state: StateDir, rpc_url: str) -> contracts.Deployment:
    """Deploy both registries (or reuse those ``chain.json`` records if this chain still holds
    them), make the anchorer their anchorer and writer, fund it, and write ``chain.json``."""
    anchorer = anchorer_address(state)
    w3 = chain.connect(rpc_url)
    try:
        recorded = recorded_deployment(state)
        why_not = None if recorded is None else await _still_deployed(w3, recorded, anchorer)
        if recorded is not None and why_not is None:
            deployment = recorded
            print(
                f"  reusing the contracts deployed at block {deployment.block_number}: AnchorRegistry at "
                f"{deployment.anchor_registry}, ConsentRegistry at {deployment.consent_registry}"
            )
            balance = await w3.eth.get_balance(to_checksum_address(anchorer))
            if balance < ANCHORER_LOW_WEI:
                tx = await w3.eth.send_transaction(
                    {"from": to_checksum_address(deployment.owner), "to": anchorer, "value": Wei(ANCHORER_FUNDS_WEI)}
                )
                await w3.eth.wait_for_transaction_receipt(tx)
                print(f"  anchorer {anchorer} had {balance / ETHER:.4f} ETH; funded with {_eth(ANCHORER_FUNDS_WEI)}")
            else:
                print(f"  anchorer {anchorer} has {balance / ETHER:.4f} ETH")
        else:
            if recorded is not None:
                print(f"  not reusing the contracts in {state.chain_file}: {why_not}")
            owner = (await w3.eth.accounts)[0]  # Anvil's first development account
            deployment = await contracts.deploy_registries(
                w3, owner=owner, anchorer=anchorer, fund_wei=ANCHORER_FUNDS_WEI
            )
            print(
                f"  deployed AnchorRegistry at {deployment.anchor_registry}, ConsentRegistry at "
                f"{deployment.consent_registry} (owner {deployment.owner}); anchorer {anchorer} is their "
                f"anchorer and writer, funded with {_eth(ANCHORER_FUNDS_WEI)}"
            )
        record = {**deployment.as_json(), "rpc_url": rpc_url}
        write_atomically(state.chain_file, (json.dumps(record, indent=2) + "\n").encode())
        state.chain_file.chmod(0o644)  # addresses only, nothing secret
        print(f"  recorded in {state.chain_file}")
        return deployment
    finally:
        await w3.provider.disconnect()


async def audit_verifier_keys(address: str) -> tuple[str, list[str]]:
    """The log's origin and verifier keys, from audit's public ``GetVerifierKeys``."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = audit_service_pb2_grpc.AuditServiceStub(channel)
        reply = await stub.GetVerifierKeys(audit_service_pb2.GetVerifierKeysRequest(), timeout=10.0)
    return reply.origin, list(reply.verifier_keys)


async def erasure_certificate_key(address: str) -> str:
    """The verifier key of erasure certificates, from records' public ``GetErasureVerifierKey``."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = records_service_pb2_grpc.RecordsServiceStub(channel)
        reply = await stub.GetErasureVerifierKey(records_service_pb2.GetErasureVerifierKeyRequest(), timeout=10.0)
    return str(reply.verifier_key)


async def publish_log(
    state: StateDir,
    rpc_url: str,
    deployment: contracts.Deployment,
    origin: str,
    audit_address: str,
    records_address: str | None = None,
) -> TrustPolicy:
    """Register the log's origin and P-256 checkpoint key on AnchorRegistry (rotating the key if
    the registry holds another, as after a reset of audit alone) and write ``trust-policy.json``,
    with records' erasure-certificate key when records answers at ``records_address``."""
    served_origin, keys = await audit_verifier_keys(audit_address)
    certificate_keys = (await erasure_certificate_key(records_address),) if records_address else ()
    if served_origin != origin:
        raise CommandError(f"audit signs checkpoints as {served_origin!r}, not {origin!r}")
    p256 = [v for v in map(notes.NoteVerifier.parse, keys) if v.signature_type == notes.SIGNATURE_ECDSA]
    if len(p256) != 1:
        raise CommandError(f"audit serves {len(p256)} P-256 verifier keys, not one: {keys}")
    key_text = next(k for k in keys if notes.NoteVerifier.parse(k) == p256[0])

    w3 = chain.connect(rpc_url)
    try:
        registry = chain.contract(w3, chain.ANCHOR_REGISTRY, deployment.anchor_registry)
        x, y = contracts.p256_xy(p256[0].public_key)
        try:
            registered: tuple[bytes, bytes] | None = tuple(await registry.functions.logKey(origin).call())
        except ContractCustomError:  # UnknownOrigin
            registered = None
        if registered is None:
            await contracts.register_log(w3, deployment.anchor_registry, deployment.owner, origin, p256[0].public_key)
            print(f"  registered the log {origin!r} with its P-256 key {key_text}")
        elif registered == (x, y):
            print(f"  the log {origin!r} is registered with its P-256 key {key_text}")
        else:
            await contracts.transact_and_wait(w3, registry.functions.rotateLogKey(origin, x, y), deployment.owner)
            print(f"  the registry held another key for {origin!r}: rotated it to {key_text}")
    finally:
        await w3.provider.disconnect()

    policy = TrustPolicy(
        origin=origin,
        log_verifier_keys=tuple(keys),
        chain_id=deployment.chain_id,
        anchor_registry=deployment.anchor_registry,
        min_confirmations=MIN_CONFIRMATIONS,
        erasure_certificate_keys=certificate_keys,
        consent_registry=deployment.consent_registry,
    )
    write_atomically(state.trust_policy_file, policy.to_json().encode())
    state.trust_policy_file.chmod(0o644)  # public: meant to be published
    print(
        f"  wrote the trust policy to {state.trust_policy_file}: log {origin!r} with {len(keys)} verifier "
        f"key{'s' if len(keys) != 1 else ''}, AnchorRegistry {deployment.anchor_registry} and ConsentRegistry "
        f"{deployment.consent_registry} on chain "
        f"{deployment.chain_id}, {MIN_CONFIRMATIONS} confirmation{'s' if MIN_CONFIRMATIONS != 1 else ''}"
        + (f", erasure certificates signed by {certificate_keys[0]}" if certificate_keys else "")
    )
    return policy


def _eth(wei: int) -> str:
    return f"{wei / ETHER:g} ETH"
