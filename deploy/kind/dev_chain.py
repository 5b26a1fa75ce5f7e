"""The development chain's set-up, for the Tiltfile (Anvil port-forwarded to 127.0.0.1:8545, audit
to 127.0.0.1:50055): deploy AnchorRegistry and ConsentRegistry from Anvil's first account (on a
fresh chain they land at the addresses values-dev.yaml names), make a well-known development
account the anchorer (funded by Anvil), store its key in the Secret the chart mounts, register
the log's P-256 key once audit answers, and write the trust policy to
.medledger/kind-trust-policy.json for `medledger verify`. Idempotent. Development only: the
anchorer key is Anvil's public test account #9.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
from eth_account import Account
from medledger.audit.v1 import audit_service_pb2 as audit_pb
from medledger.audit.v1.audit_service_pb2_grpc import AuditServiceStub

from medledger_devstack import contracts
from medledger_verifier import chain, notes

ROOT = Path(__file__).resolve().parents[2]
RPC = "http://127.0.0.1:8545"
AUDIT = "127.0.0.1:50055"
NAMESPACE = "medledger"
# Anvil's development account #9 (its mnemonic is public): never a key of a real chain.
ANCHORER_KEY = "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6"


def values_dev() -> dict[str, str]:
    import yaml

    values = yaml.safe_load((ROOT / "deploy" / "helm" / "values-dev.yaml").read_text())
    return values["chain"]  # type: ignore[no-any-return]


def store_anchorer_secret() -> None:
    manifest = subprocess.run(
        ["kubectl", "-n", NAMESPACE, "create", "secret", "generic", "medledger-anchorer",
         f"--from-literal=anchorer.key={ANCHORER_KEY}", "--dry-run=client", "-o", "yaml"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    subprocess.run(["kubectl", "apply", "-f", "-"], input=manifest, check=True, text=True)


async def verifier_keys() -> tuple[str, list[str]]:
    async with grpc.aio.insecure_channel(AUDIT) as channel:
        stub = AuditServiceStub(channel)
        for _ in range(120):
            try:
                reply = await stub.GetVerifierKeys(audit_pb.GetVerifierKeysRequest(), timeout=5)
                return reply.origin, list(reply.verifier_keys)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(5)
    raise SystemExit("audit did not answer on 127.0.0.1:50055")


async def main() -> int:
    wanted = values_dev()
    w3 = chain.connect(RPC)
    owner = (await w3.eth.accounts)[0]
    anchorer = Account.from_key(ANCHORER_KEY).address
    if await w3.eth.get_code(wanted["anchorRegistryAddress"]) in (b"", b"\x00"):
        deployment = await contracts.deploy_registries(w3, owner, anchorer)
        if deployment.anchor_registry.lower() != wanted["anchorRegistryAddress"].lower():
            print(f"AnchorRegistry landed at {deployment.anchor_registry}, not where values-dev.yaml says")
            return 1
    store_anchorer_secret()
    origin, keys = await verifier_keys()
    p256 = [k for k in keys if notes.NoteVerifier.parse(k).signature_type == notes.SIGNATURE_ECDSA]
    await contracts.register_log(
        w3, wanted["anchorRegistryAddress"], owner, origin, notes.NoteVerifier.parse(p256[0]).public_key
    )
    policy = {
        "version": 1,
        "origin": origin,
        "log_verifier_keys": keys,
        "chain_id": int(wanted["id"]),
        "anchor_registry": wanted["anchorRegistryAddress"],
        "min_confirmations": 1,
    }
    out = ROOT / ".medledger" / "kind-trust-policy.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(policy, indent=2) + "\n")
    print(f"chain: registries at {wanted['anchorRegistryAddress']}, log {origin} registered; trust policy {out}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
