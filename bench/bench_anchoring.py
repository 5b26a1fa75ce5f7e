"""Anchoring benchmarks, on a real Anvil.

gas:      gas per covered entry of one AnchorRegistry.anchor at tree size 1,000,000 covering 100,
          1,000 and 10,000 new entries (a real P-256 signed checkpoint and RFC 9162 consistency
          proof from the audit log's own code), beside the early-EHR design measured on the same
          node: one transaction per record, each storing its commitment in a slot of its own
          (ConsentRegistry.grant, a commitment and a status per transaction).
server:   identity and the audit log in this process, anchoring in a process of its own as
          deployed (PostgreSQL; the audit log and anchoring with their default checkpoint and
          anchoring intervals), the registries deployed; record-stored events published at a steady rate straight to the
          records topic (what records' outbox relay sends once a put commits); measures, for each,
          the time from its publication until GetAnchoredProof returns its proof; then writes
          what a client needs to CONFIG and serves until SIGTERM.
client:   GetAnchoredProof calls per second (by commitment, 16 in flight) from its own process.

Usage: python bench_anchoring.py gas RPC_URL
       python bench_anchoring.py server BOOTSTRAP RPC_URL AUDIT_DATABASE_URL ANCHORING_DATABASE_URL FOLDER CONFIG
       python bench_anchoring.py client CONFIG SECONDS
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc
from closed_loop import measure
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from eth_account import Account
from medledger.anchoring.v1 import anchoring_service_pb2 as pb
from medledger.anchoring.v1 import anchoring_service_pb2_grpc as pb_grpc
from medledger.audit.v1 import audit_service_pb2 as audit_pb
from medledger.audit.v1 import audit_service_pb2_grpc as audit_grpc
from medledger.events.v1 import records_events_pb2
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_anchoring.config import AnchoringSettings
from medledger_audit import main as audit_main
from medledger_audit import storage as audit_storage
from medledger_audit.config import AuditSettings
from medledger_devstack import contracts, localstack
from medledger_devstack.testing import running_service
from medledger_identity import main as identity_main
from medledger_identity import storage as identity_storage
from medledger_identity.config import IdentitySettings
from medledger_runtime.events import TOPICS, new_event
from medledger_runtime.kafka import make_producer
from medledger_runtime.keys import create_master_key_file, der_to_raw_rs
from medledger_sdk.auth import TokenClient
from medledger_verifier import chain, notes, tlog
from medledger_verifier.proof_files import TrustPolicy

TREE_SIZE = 1_000_000
COVERED = (100, 1_000, 10_000)
# The latency run: records published at this rate for this long.
RATE_PER_S, LATENCY_SECONDS = 20, 60


# --- gas ---------------------------------------------------------------------------------------


async def _signed_checkpoint(origin: str, size: int, root: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """The raw r||s P-256 signature of the checkpoint's C2SP note, as the audit log signs it."""

    async def sign(message: bytes) -> bytes:
        return key.sign(message, ec.ECDSA(hashes.SHA256()))

    verifier = notes.NoteVerifier.from_public_key(origin, key.public_key())
    text = await notes.sign_checkpoint(notes.Checkpoint(origin, size, root), [notes.NoteSigner(verifier, sign)])
    return der_to_raw_rs(notes.parse_note(text).signatures[0].signature)


async def _send(w3: chain.Web3, call: Any, sender: str) -> int:
    receipt = await contracts.transact_and_wait(w3, call, sender)
    return int(receipt["gasUsed"])


def gas(rpc_url: str) -> dict[str, Any]:
    started = time.perf_counter()
    tiles = tlog.MemoryTiles()
    leaves = [tlog.leaf_hash(i.to_bytes(8, "big")) for i in range(TREE_SIZE)]
    tiles.write(asyncio.run(tlog.append(tiles, 0, leaves)).tiles)
    print(f"   (a tree of {TREE_SIZE:,} entries in {time.perf_counter() - started:.1f} s)", file=sys.stderr)
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    roots = {s: asyncio.run(tlog.tree_root(tiles, s)) for s in (TREE_SIZE, *(TREE_SIZE - c for c in COVERED))}
    proofs = {c: asyncio.run(tlog.consistency_proof(tiles, TREE_SIZE - c, TREE_SIZE)) for c in COVERED}

    async def measure() -> dict[str, Any]:
        w3 = chain.connect(rpc_url)
        owner, anchorer = (await w3.eth.accounts)[:2]
        deployment = await contracts.deploy_registries(w3, owner, anchorer, fund_wei=0)
        registry = chain.contract(w3, chain.ANCHOR_REGISTRY, deployment.anchor_registry)
        figures: dict[str, Any] = {}
        for covered in COVERED:
            origin = f"medledger.bench/gas-{covered}"
            await contracts.register_log(w3, deployment.anchor_registry, owner, origin, der)
            old = TREE_SIZE - covered
            sig_old = await _signed_checkpoint(origin, old, roots[old], key)
            await _send(w3, registry.functions.anchor(origin, old, roots[old], sig_old, []), anchorer)
            sig = await _signed_checkpoint(origin, TREE_SIZE, roots[TREE_SIZE], key)
            used = await _send(
                w3, registry.functions.anchor(origin, TREE_SIZE, roots[TREE_SIZE], sig, proofs[covered]), anchorer
            )
            figures[str(covered)] = {"gas": used, "per_entry": used / covered, "proof_hashes": len(proofs[covered])}
        consents = chain.contract(w3, chain.CONSENT_REGISTRY, deployment.consent_registry)
        per_record = [
            await _send(w3, consents.functions.grant(secrets.token_bytes(32), 0, 0), anchorer) for _ in range(20)
        ]
        figures["per_record_transaction_gas"] = sum(per_record) / len(per_record)
        await w3.provider.disconnect()
        return figures

    return asyncio.run(measure())


# --- the running services ------------------------------------------------------------------------


def _record_stored(rng: random.Random) -> tuple[str, bytes]:
    commitment = rng.randbytes(32).hex()
    patient = f"pat_{rng.randrange(200):032x}"
    event = new_event(
        source="medledger.records",
        payload=records_events_pb2.RecordStored(
            record_id=f"rec_{rng.randbytes(16).hex()}",
            version=1,
            patient_id=patient,
            category=vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS,
            commitment=commitment,
            written_by=f"prn_{rng.randrange(50):032x}",
        ),
        aggregate_id=patient,
        version=1,
    )
    return commitment, event.SerializeToString()


async def _latencies(bootstrap: str, stub: pb_grpc.AnchoringServiceStub, token: Any) -> tuple[list[float], list[str]]:
    """Publish RATE_PER_S records a second for LATENCY_SECONDS; the seconds from each one's
    publication to its anchored proof, in publication order."""
    rng = random.Random(5)
    producer = make_producer(bootstrap)
    await producer.start()
    published: list[tuple[str, float]] = []
    latencies: list[float] = []

    async def publish() -> None:
        start = time.monotonic()
        for i in range(RATE_PER_S * LATENCY_SECONDS):
            await asyncio.sleep(max(0.0, start + i / RATE_PER_S - time.monotonic()))
            commitment, data = _record_stored(rng)
            await (await producer.send(TOPICS["records"], data))
            published.append((commitment, time.monotonic()))

    async def watch() -> None:
        done = 0
        while done < RATE_PER_S * LATENCY_SECONDS:
            if done >= len(published):
                await asyncio.sleep(0.05)
                continue
            commitment, at = published[done]
            try:
                await stub.GetAnchoredProof(pb.GetAnchoredProofRequest(commitment=commitment), metadata=await token())
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                    raise
                await asyncio.sleep(0.05)
                continue
            latencies.append(time.monotonic() - at)
            done += 1
            if done % (RATE_PER_S * 10) == 0:
                print(f"   {done:,} proofs available", file=sys.stderr, flush=True)

    try:
        await asyncio.gather(publish(), watch())
    finally:
        await producer.stop()
    return latencies, [c for c, _ in published]


async def server(bootstrap: str, rpc_url: str, audit_url: str, anchoring_url: str, folder: Path, config: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - set-up, before anything runs
    secrets_dir = folder / "secrets"
    secrets_dir.mkdir()
    admin_secret = "mlsec_" + secrets.token_urlsafe(24)
    (folder / "admin.secret").write_text(admin_secret)
    for name in ("audit", "anchoring"):
        (secrets_dir / f"{name}.secret").write_text("mlsec_" + secrets.token_urlsafe(24))
    common: dict[str, Any] = {
        "grpc_port": 0,
        "metrics_port": 0,
        "kafka_bootstrap_servers": bootstrap,
        "log_level": "WARNING",
    }
    async with AsyncExitStack() as exits:
        identity = await exits.enter_async_context(
            running_service(
                "identity",
                IdentitySettings(
                    **common,
                    database_url=f"sqlite+aiosqlite:///{folder / 'identity.db'}",
                    http_port=0,
                    master_key_file=create_master_key_file(folder / "master.key"),
                    keyring_file=folder / "keyrings" / "identity.keyring",
                    bootstrap_admin_secret_file=folder / "admin.secret",
                    service_secrets_dir=secrets_dir,
                ),
                identity_storage.MIGRATIONS,
                identity_main.build,
            )
        )
        identity_address = f"127.0.0.1:{identity.grpc_port}"
        audit = await exits.enter_async_context(
            running_service(
                "audit",
                AuditSettings(
                    **common,
                    database_url=audit_url,
                    identity_address=identity_address,
                    client_secret_file=secrets_dir / "audit.secret",
                    master_key_file=create_master_key_file(folder / "master-audit.key"),
                    keyring_file=folder / "keyrings" / "audit.keyring",
                    last_checkpoint_file=folder / "audit" / "last-checkpoint",
                    http_port=0,
                ),
                audit_storage.MIGRATIONS,
                audit_main.build,
            )
        )
        audit_address = f"127.0.0.1:{audit.grpc_port}"
        async with grpc.aio.insecure_channel(audit_address) as channel:
            keys = await audit_grpc.AuditServiceStub(channel).GetVerifierKeys(audit_pb.GetVerifierKeysRequest())
        account = Account.create()
        key_file = folder / "anchorer.key"
        key_file.write_text(account.key.hex())
        w3 = chain.connect(rpc_url)
        deployment = await contracts.deploy_for_log(
            w3, (await w3.eth.accounts)[0], account.address, keys.origin, list(keys.verifier_keys)
        )
        policy_file = folder / "trust-policy.json"
        policy_file.write_text(
            TrustPolicy(
                keys.origin, tuple(keys.verifier_keys), deployment.chain_id, deployment.anchor_registry
            ).to_json()
        )
        # Anchoring as it is deployed: a process of its own (`python -m medledger_anchoring`),
        # configured by its environment; its defaults for T and N.
        port = localstack.free_port()
        settings = {
            "grpc_port": port,
            "metrics_port": localstack.free_port(),
            "database_url": anchoring_url,
            "kafka_bootstrap_servers": bootstrap,
            "identity_address": identity_address,
            "client_secret_file": secrets_dir / "anchoring.secret",
            "audit_address": audit_address,
            "chain_rpc_url": rpc_url,
            "chain_id": deployment.chain_id,
            "anchor_registry_address": deployment.anchor_registry,
            "anchorer_key_file": key_file,
            "trust_policy_file": policy_file,
            "log_level": "WARNING",
        }
        anchoring_settings = AnchoringSettings(**settings)  # checked here, as the process will
        env = {**os.environ, **{f"MEDLEDGER_{k.upper()}": str(v) for k, v in settings.items()}}
        process = subprocess.Popen([sys.executable, "-m", "medledger_anchoring"], env=env)  # noqa: ASYNC220 - set-up
        exits.callback(_stop, process)
        await asyncio.to_thread(localstack.wait_for_port, port, 60, process, "anchoring")
        admin = TokenClient(identity_address, identity_main.BOOTSTRAP_ADMIN, client_secret=admin_secret)
        exits.push_async_callback(admin.aclose)
        anchoring_address = f"127.0.0.1:{port}"
        channel = grpc.aio.insecure_channel(anchoring_address)
        exits.push_async_callback(channel.close)
        stub = pb_grpc.AnchoringServiceStub(channel)

        async def token() -> tuple[tuple[str, str]]:
            return (("authorization", f"Bearer {await admin.token('medledger.anchoring')}"),)

        latencies, commitments = await _latencies(bootstrap, stub, token)
        latencies.sort()
        transactions = int(await w3.eth.get_transaction_count(account.address))
        config.write_text(  # noqa: ASYNC240 - once, after measuring
            json.dumps(
                {
                    "address": anchoring_address,
                    "token": await admin.token("medledger.anchoring"),
                    "commitments": commitments,
                    "latency_p50_s": latencies[len(latencies) // 2],
                    "latency_p99_s": latencies[int(len(latencies) * 0.99)],
                    "latency_max_s": latencies[-1],
                    "records": len(latencies),
                    "anchor_transactions": transactions,
                    "anchor_interval_seconds": anchoring_settings.anchor_interval_seconds,
                    "checkpoint_interval_seconds": audit.settings.checkpoint_interval_seconds,
                }
            )
        )
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


async def client(config_path: Path, seconds: float) -> dict[str, Any]:
    config = json.loads(config_path.read_text())  # noqa: ASYNC240 - once, before measuring
    metadata = (("authorization", f"Bearer {config['token']}"),)
    commitments = config["commitments"]
    rng = random.Random(3)
    async with grpc.aio.insecure_channel(config["address"]) as channel:
        stub = pb_grpc.AnchoringServiceStub(channel)

        async def call() -> None:
            request = pb.GetAnchoredProofRequest(commitment=rng.choice(commitments))
            await stub.GetAnchoredProof(request, metadata=metadata)

        return await measure(call, seconds)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "gas":
        print(json.dumps(gas(sys.argv[2])))
    elif mode == "server":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(server(*sys.argv[2:6], Path(sys.argv[6]), Path(sys.argv[7])))
    elif mode == "client":
        print(json.dumps(asyncio.run(client(Path(sys.argv[2]), float(sys.argv[3])))))
    else:
        raise SystemExit(__doc__)
