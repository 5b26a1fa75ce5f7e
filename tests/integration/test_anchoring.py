"""The anchoring service on a real Anvil and the real broker, with identity and the audit log:
record-stored events written straight to the records topic become log entries, the log signs
checkpoints, and anchoring anchors the newest one on chain — one transaction for ten thousand
entries — so that each entry's proof verifies with `medledger verify` trusting only the trust
policy and the chain. Quiet periods send nothing, a duplicate changes nothing, a chain that stops
for a while or forgets blocks (a reorg) loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from medledger.anchoring.v1 import anchoring_service_pb2 as pb
from medledger.anchoring.v1 import anchoring_service_pb2_grpc as pb_grpc
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
from medledger.events.v1 import records_events_pb2
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_devstack import contracts, localstack
from medledger_devstack.testing import Anvil, eventually, status_of
from medledger_runtime.events import TOPICS, new_event
from medledger_runtime.kafka import make_producer
from medledger_sdk.channels import make_channel
from medledger_sdk.cli import main as medledger
from medledger_verifier import chain, commitments
from medledger_verifier.anchored_proofs import verify_anchored_proof
from medledger_verifier.proof_files import Anchor, TrustPolicy

CODE = grpc.StatusCode
PATIENTS = 20
# Anchor on entry count only: the interval is longer than any test.
COUNT_ONLY = {"anchor_interval_seconds": 3600.0, "anchor_every_entries": 10_000}


@dataclass(frozen=True)
class StoredRecord:
    record: bytes
    salt: bytes
    commitment: str
    event_bytes: bytes


def stored_records(n: int, seed: int) -> list[StoredRecord]:
    """``n`` records as a provider would store them, and their record-stored events (as records
    writes them: the commitment, no content)."""
    rng = random.Random(seed)
    made = []
    for i in range(n):
        record = json.dumps(
            {"resourceType": "Observation", "status": "final", "code": {"text": f"heart rate {i}"},
             "valueQuantity": {"value": rng.randrange(40, 180), "unit": "/min"}}
        ).encode()  # fmt: skip
        salt = rng.randbytes(32)
        commitment = commitments.record_commitment(record, salt)
        patient = f"pat_{rng.randrange(PATIENTS):032x}"
        event = new_event(
            source="medledger.records",
            payload=records_events_pb2.RecordStored(
                record_id=f"rec_{uuid.UUID(int=rng.getrandbits(128)).hex}",
                version=1,
                patient_id=patient,
                category=vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS,
                commitment=commitment,
                written_by=f"prn_{rng.randrange(50):032x}",
            ),
            aggregate_id=patient,
            version=1,
        )
        made.append(StoredRecord(record, salt, commitment, event.SerializeToString()))
    return made


async def produce(bootstrap: str, messages: list[bytes], *, topic: str = TOPICS["records"], pace: float = 0) -> None:
    """Write event envelopes straight to a topic; ``pace`` seconds between batches of 100."""
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        for start in range(0, len(messages), 100):
            sends = [await producer.send(topic, m) for m in messages[start : start + 100]]
            await asyncio.gather(*sends)
            if pace:
                await asyncio.sleep(pace)
    finally:
        await producer.stop()


class Chain:
    """What a test reads from the chain: the registry's anchors and the anchorer's transactions."""

    def __init__(self, rpc_url: str, deployment: contracts.Deployment) -> None:
        self.w3 = chain.connect(rpc_url, timeout=5)
        self.deployment = deployment
        self.registry = chain.contract(self.w3, chain.ANCHOR_REGISTRY, deployment.anchor_registry)

    async def latest_size(self, origin: str) -> int:
        try:
            size, _root, _block, _time = await self.registry.functions.latest(origin).call()
        except Exception:  # the origin not registered yet, or the chain down
            return 0
        return int(size)

    async def anchor_events(self) -> list[Any]:
        logs = await self.registry.events.CheckpointAnchored.get_logs(from_block=self.deployment.block_number)
        return list(logs)

    async def transactions_sent(self) -> int:
        return int(await self.w3.eth.get_transaction_count(self.deployment.anchorer))


def bootstrap_of(stack: Any) -> str:
    return str(stack.audit.settings.kafka_bootstrap_servers)


def anchoring_stub(stack: Any) -> pb_grpc.AnchoringServiceStub:
    channel = stack.admin().channel(f"127.0.0.1:{stack.anchoring.grpc_port}", "medledger.anchoring")
    return pb_grpc.AnchoringServiceStub(channel)


async def newest_signed(stack: Any) -> int:
    """The audit log's newest signed tree size, as anchoring knows it."""
    from medledger_anchoring import storage

    async with stack.anchoring.db.read() as conn:
        newest = await storage.newest_signed_checkpoint(conn, stack.anchoring.settings.log_origin)
    return newest.tree_size if newest else 0


async def log_size(stack: Any) -> int:
    from medledger_audit import storage

    async with stack.audit.db.read() as conn:
        size, _root = await storage.read_state(conn)
    return size


async def recorded_anchor(stub: pb_grpc.AnchoringServiceStub, tree_size: int) -> pb.GetLatestAnchorResponse:
    """The service's latest anchor once it has recorded the one of ``tree_size``: the chain holds
    an anchor a moment before the service has its confirmation and records it."""

    async def latest() -> pb.GetLatestAnchorResponse | None:
        try:
            reply = await stub.GetLatestAnchor(pb.GetLatestAnchorRequest())
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return reply if reply.anchor.tree_size == tree_size else None

    result: pb.GetLatestAnchorResponse = await eventually(
        latest, f"the anchor of size {tree_size} recorded", within=120, every=0.5
    )
    return result


def verify_cli(*argv: str) -> tuple[int, str]:
    """`medledger verify ...` as a person runs it; its exit code and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = medledger(["verify", *argv])
    return code, out.getvalue()


def write_proof(folder: Path, stem: str, reply: pb.GetAnchoredProofResponse) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.entry").write_bytes(reply.entry)
    (folder / f"{stem}-anchor.json").write_bytes(reply.anchor_json)
    path = folder / f"{stem}.tlog-proof"
    path.write_text(reply.tlog_proof)
    return path


async def test_ten_thousand_entries_take_one_anchor_and_their_proofs_verify(
    start_stack: Any, anvil: Anvil, tmp_path: Path
) -> None:
    records = stored_records(10_000, seed=7)
    async with start_stack(
        consent=False, audit=True, anchoring=True, chain_rpc_url=anvil.rpc_url, anchoring_settings=COUNT_ONLY
    ) as stack:
        on_chain = Chain(anvil.rpc_url, stack.deployment)
        origin = stack.anchoring.settings.log_origin
        before = await log_size(stack)
        # The same event twice (at least once delivery): one entry, and still one anchor.
        await produce(bootstrap_of(stack), [r.event_bytes for r in records] + [records[0].event_bytes])
        await eventually(lambda: on_chain.latest_size(origin), "the first anchor", within=180)
        anchored = await on_chain.latest_size(origin)
        assert anchored == before + 10_000, "one anchor covering every entry, the duplicate appended once"
        assert len(await on_chain.anchor_events()) == 1
        assert await on_chain.transactions_sent() == 1, "the anchorer sent one transaction in all"

        stub = anchoring_stub(stack)
        latest = await recorded_anchor(stub, anchored)
        assert latest.anchor.tree_size == anchored and latest.anchor.transaction_hash.startswith("0x")
        assert latest.latest_signed_tree_size == anchored
        listed = await stub.ListAnchoredCheckpoints(pb.ListAnchoredCheckpointsRequest())
        assert [c.tree_size for c in listed.checkpoints] == [anchored]

        # A random sample of 200 proofs, each verified by `medledger verify` with the record and salt.
        policy = stack.anchoring.settings.trust_policy_file
        sample = random.Random(11).sample(records, 200)
        for i, r in enumerate(sample):
            reply = await stub.GetAnchoredProof(pb.GetAnchoredProofRequest(commitment=r.commitment))
            assert json.loads(reply.entry)["commitment"] == r.commitment
            assert reply.anchor.tree_size == anchored
            proof = write_proof(tmp_path / "proofs", f"r{i}", reply)
            (tmp_path / "proofs" / f"r{i}.json").write_bytes(r.record)
            code, said = await asyncio.to_thread(
                verify_cli,
                str(proof), "--trust", str(policy), "--rpc", anvil.rpc_url,
                "--record", str(tmp_path / "proofs" / f"r{i}.json"), "--salt", r.salt.hex(),
            )  # fmt: skip
            assert code == 0, said
            assert "VERIFIED" in said and "upper bound" in said

        # Tampering with any part fails with the check that catches it.
        r, reply = sample[0], await stub.GetAnchoredProof(pb.GetAnchoredProofRequest(commitment=sample[0].commitment))
        await asyncio.to_thread(expect_tampers_to_fail, tmp_path / "tampered", reply, r, Path(policy), anvil.rpc_url)

        # Bad requests: the right status, nothing changes.
        bad = pb.GetAnchoredProofRequest(commitment="XYZ")
        assert await status_of(stub.GetAnchoredProof(bad)) == CODE.INVALID_ARGUMENT
        unknown = pb.GetAnchoredProofRequest(commitment="00" * 32)
        assert await status_of(stub.GetAnchoredProof(unknown)) == CODE.NOT_FOUND
        assert await status_of(stub.GetAnchoredProof(pb.GetAnchoredProofRequest())) == CODE.INVALID_ARGUMENT
        unanchored = pb.GetAnchoredProofRequest(entry_index=anchored + 5)
        assert await status_of(stub.GetAnchoredProof(unanchored)) == CODE.FAILED_PRECONDITION
        assert await on_chain.transactions_sent() == 1


def expect_tampers_to_fail(
    folder: Path, reply: pb.GetAnchoredProofResponse, r: StoredRecord, policy_file: Path, rpc_url: str
) -> None:
    record_file = folder / "record.json"
    folder.mkdir(parents=True)
    record_file.write_bytes(r.record)
    proof_lines = reply.tlog_proof.split("\n")
    index_line = next(i for i, line in enumerate(proof_lines) if line.startswith("index "))
    hash_line = index_line + 1
    anchor = json.loads(reply.anchor_json)
    policy = TrustPolicy.read(policy_file)

    def with_changes(**changed: Any) -> pb.GetAnchoredProofResponse:
        copy = pb.GetAnchoredProofResponse()
        copy.CopyFrom(reply)
        for name, value in changed.items():
            setattr(copy, name, value)
        return copy

    def changed_line(lines: list[str], at: int, new: str) -> str:
        return "\n".join([*lines[:at], new, *lines[at + 1 :]])

    entry = bytearray(reply.entry)
    at = entry.index(b'"commitment":"') + 20  # a hex digit of the commitment
    entry[at] = ord("0") if entry[at] != ord("0") else ord("1")
    # Another valid SHA-256 in canonical base64 (the last digit before '=' holds 4 bits).
    ending = "AAA=" if not proof_lines[hash_line].endswith("AAA=") else "AAE="
    flipped_hash = proof_lines[hash_line][:-4] + ending
    index = int(proof_lines[index_line].split()[1])
    checkpoint_at = next(i for i, line in enumerate(proof_lines) if line == "") + 2  # the checkpoint's size line
    other_policy = folder / "other-policy.json"
    other_policy.write_text(dataclasses.replace(policy, chain_id=policy.chain_id + 1).to_json())
    cases: list[tuple[str, pb.GetAnchoredProofResponse, list[str], str]] = [
        ("entry byte", with_changes(entry=bytes(entry)), [], "entry-inclusion"),
        ("proof hash", with_changes(tlog_proof=changed_line(proof_lines, hash_line, flipped_hash)), [],
         "entry-inclusion"),
        ("index", with_changes(tlog_proof=changed_line(proof_lines, index_line, f"index {index + 1}")), [],
         "entry-inclusion"),
        ("checkpoint", with_changes(tlog_proof=changed_line(
            proof_lines, checkpoint_at, str(int(proof_lines[checkpoint_at]) + 1))), [], "checkpoint-signature"),
        ("contract address", with_changes(anchor_json=json.dumps(
            {**anchor, "contract_address": "0x" + "11" * 20}).encode()), [], "chain"),
        ("chain id", with_changes(anchor_json=json.dumps({**anchor, "chain_id": 1}).encode()), [], "chain"),
        ("trusted chain id", reply, ["--trust", str(other_policy)], "chain"),
        ("record", reply, ["--record", str(folder / "other.json"), "--salt", r.salt.hex()], "record-commitment"),
        ("salt", reply, ["--record", str(record_file), "--salt", "00" * 32], "record-commitment"),
    ]  # fmt: skip
    (folder / "other.json").write_bytes(r.record.replace(b"heart rate", b"heart-rate"))
    for what, tampered, extra, failing_check in cases:
        proof = write_proof(folder, what.replace(" ", "-"), tampered)
        argv = [str(proof), "--rpc", rpc_url, *extra]
        if "--trust" not in extra:
            argv += ["--trust", str(policy_file)]
        code, said = verify_cli(*argv)
        assert code == 1, f"{what}: {said}"
        assert f"NOT VERIFIED: {failing_check}:" in said, f"{what} should fail at {failing_check}: {said}"


async def test_quiet_periods_and_redelivered_events_send_no_transaction(start_stack: Any, anvil: Anvil) -> None:
    """With a 2 s interval: a few entries are anchored once, then 60 s without traffic, and the
    same checkpoint and record events delivered again, send nothing more."""
    records = stored_records(50, seed=8)
    async with start_stack(
        consent=False, audit=True, anchoring=True, chain_rpc_url=anvil.rpc_url,
        anchoring_settings={"anchor_interval_seconds": 2.0, "anchor_every_entries": 10_000},
    ) as stack:  # fmt: skip
        on_chain = Chain(anvil.rpc_url, stack.deployment)
        origin = stack.anchoring.settings.log_origin
        await produce(bootstrap_of(stack), [r.event_bytes for r in records])
        size = await eventually(lambda: log_size(stack), "the entries", within=60)

        async def all_anchored() -> bool:
            return await on_chain.latest_size(origin) >= await log_size(stack) >= size

        await eventually(all_anchored, "the entries anchored", within=60)
        sent = await on_chain.transactions_sent()
        anchored = await on_chain.latest_size(origin)

        # Redelivered: every record event again, and every checkpoint event the log announced.
        await produce(bootstrap_of(stack), [r.event_bytes for r in records])
        checkpoint_events = await read_topic(bootstrap_of(stack), TOPICS["audit"])
        assert checkpoint_events, "the log announced its checkpoints"
        await produce(bootstrap_of(stack), checkpoint_events, topic=TOPICS["audit"])

        quiet_until = time.monotonic() + 60
        while time.monotonic() < quiet_until:
            await asyncio.sleep(5)
            assert await on_chain.transactions_sent() == sent, "no transaction without new entries"
        assert await on_chain.latest_size(origin) == anchored == await log_size(stack)


async def read_topic(bootstrap: str, topic: str) -> list[bytes]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"test-{uuid.uuid4().hex}", auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=5000)
        return [m.value for messages in batches.values() for m in messages if m.value is not None]
    finally:
        await consumer.stop()


@contextlib.asynccontextmanager
async def own_anvil(folder: Path) -> AsyncIterator[tuple[int, list[localstack.ManagedProcess]]]:
    """An Anvil of the test's own, on a fixed port, that the test may stop and start again."""
    port = localstack.free_port()
    processes = [localstack.start_anvil(port, folder / "state.json", folder / "anvil-0.log")]
    try:
        yield port, processes
    finally:
        for p in processes:
            if p.alive():
                p.stop()


async def test_a_chain_stopped_for_ten_seconds_mid_stream_loses_nothing(start_stack: Any, tmp_path: Path) -> None:
    records = stored_records(3000, seed=9)
    async with own_anvil(tmp_path / "anvil") as (port, processes):
        rpc_url = f"http://{localstack.HOST}:{port}"
        async with start_stack(
            consent=False, audit=True, anchoring=True, chain_rpc_url=rpc_url,
            anchoring_settings={"anchor_interval_seconds": 1.0, "anchor_every_entries": 500},
        ) as stack:  # fmt: skip
            on_chain = Chain(rpc_url, stack.deployment)
            origin = stack.anchoring.settings.log_origin
            before = await log_size(stack)
            # About 30 s of traffic; the chain goes away for 10 s in the middle of it.
            stream = asyncio.create_task(produce(bootstrap_of(stack), [r.event_bytes for r in records], pace=1.0))
            await eventually(lambda: on_chain.latest_size(origin), "a first anchor", within=60, every=0.2)
            # SIGTERM: Anvil dumps its state and exits; it comes back from that state 10 s later.
            assert await asyncio.to_thread(processes[0].stop) == 0
            stopped_at = await log_size(stack)
            await asyncio.sleep(10)
            processes.append(
                await asyncio.to_thread(
                    localstack.start_anvil, port, tmp_path / "anvil" / "state.json", tmp_path / "anvil-1.log"
                )
            )
            restarted_at = await log_size(stack)
            assert not stream.done(), "the chain came back mid-stream"
            await stream
            assert restarted_at > stopped_at, "the stream went on while the chain was down"
            stub = anchoring_stub(stack)

            async def everything_anchored() -> bool:
                size = await log_size(stack)
                if not size == await newest_signed(stack) == await on_chain.latest_size(origin):
                    return False
                await recorded_anchor(stub, size)
                return True

            await eventually(everything_anchored, "every entry anchored after the restart", within=120)
            assert await log_size(stack) == before + len(records), "every event is an entry, every entry anchored"
            # Every anchor the service recorded is on the restarted chain, each in one transaction.
            listed = await stub.ListAnchoredCheckpoints(pb.ListAnchoredCheckpointsRequest(page_size=100))
            on_chain_sizes = sorted(int(e["args"]["size"]) for e in await on_chain.anchor_events())
            assert sorted(c.tree_size for c in listed.checkpoints) == on_chain_sizes
            assert len(on_chain_sizes) >= 2, "anchoring resumed after the restart"
            # And a proof from before the stop and one from after still verify.
            policy = TrustPolicy.read(stack.anchoring.settings.trust_policy_file)
            for r in (records[0], records[-1]):
                reply = await stub.GetAnchoredProof(pb.GetAnchoredProofRequest(commitment=r.commitment))
                result = await verify_anchored_proof(
                    policy, reply.tlog_proof, reply.entry, reply.anchor_json, on_chain.w3,
                    record=r.record, salt_hex=r.salt.hex(),
                )  # fmt: skip
                assert result.verified, result.verdict()


async def test_a_checkpoint_a_reorg_dropped_is_anchored_again(start_stack: Any, tmp_path: Path) -> None:
    records = stored_records(200, seed=10)
    async with own_anvil(tmp_path / "anvil") as (port, _processes):
        rpc_url = f"http://{localstack.HOST}:{port}"
        async with start_stack(
            consent=False, audit=True, anchoring=True, chain_rpc_url=rpc_url,
            anchoring_settings={"anchor_interval_seconds": 1.0, "anchor_every_entries": 10_000},
        ) as stack:  # fmt: skip
            on_chain = Chain(rpc_url, stack.deployment)
            origin = stack.anchoring.settings.log_origin
            snapshot = await on_chain.w3.provider.make_request("evm_snapshot", [])  # type: ignore[arg-type]
            await produce(bootstrap_of(stack), [r.event_bytes for r in records])

            async def anchored_all() -> int:
                size = await on_chain.latest_size(origin)
                return size if size and size == await log_size(stack) else 0

            size = await eventually(anchored_all, "the entries anchored", within=60)
            first = await on_chain.anchor_events()
            assert first
            # The chain forgets the blocks since the snapshot: the anchor is gone.
            await on_chain.w3.provider.make_request("evm_revert", [snapshot["result"]])  # type: ignore[arg-type]
            assert await on_chain.latest_size(origin) == 0
            again = await eventually(anchored_all, "the checkpoint anchored again", within=60)
            assert again == size
            (second,) = await on_chain.anchor_events()  # the newest checkpoint: one anchor covers all
            assert int(second["args"]["size"]) == size
            assert second["transactionHash"] not in {e["transactionHash"] for e in first}
            stub = anchoring_stub(stack)

            async def re_recorded() -> pb.GetLatestAnchorResponse | None:
                reply = await recorded_anchor(stub, size)
                return reply if reply.anchor.transaction_hash == "0x" + bytes(second["transactionHash"]).hex() else None

            latest = await eventually(re_recorded, "the new anchor recorded", within=120, every=0.5)
            assert latest.anchor.transaction_hash == "0x" + bytes(second["transactionHash"]).hex()
            reply = await stub.GetAnchoredProof(pb.GetAnchoredProofRequest(commitment=records[5].commitment))
            assert Anchor.parse(reply.anchor_json).tx_hash == latest.anchor.transaction_hash
            policy = TrustPolicy.read(stack.anchoring.settings.trust_policy_file)
            result = await verify_anchored_proof(policy, reply.tlog_proof, reply.entry, reply.anchor_json, on_chain.w3)
            assert result.verified, result.verdict()


async def test_consent_versions_reach_the_consent_registry(start_stack: Any, anvil: Anvil) -> None:
    """A grant is on ConsentRegistry with its period; its revocation revokes it there, naming the
    revoking version's commitment. Only commitments and times reach the chain."""
    async with start_stack(
        consent=True, audit=True, anchoring=True, chain_rpc_url=anvil.rpc_url, anchoring_settings=COUNT_ONLY
    ) as stack:
        public = id_grpc.IdentityServiceStub(make_channel(stack.identity_address))
        fhir = {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": uuid.uuid4().hex}]}
        patient = await public.RegisterPatient(
            id_pb.RegisterPatientRequest(request_id=str(uuid.uuid4()), fhir_patient=json.dumps(fhir).encode())
        )
        admin = id_grpc.IdentityServiceStub(stack.admin().channel(stack.identity_address, "medledger.identity"))
        org = await admin.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(
                request_id=str(uuid.uuid4()), kind=vocab.PrincipalKind.PRINCIPAL_KIND_ORGANIZATION
            )
        )
        patient_id, org_id = patient.principal.principal_id, org.principal.principal_id
        await stack.known_to_consent(patient_id, org_id)
        consent = co_grpc.ConsentServiceStub(
            stack.client(patient_id, patient.client_secret).channel(stack.consent_address, "medledger.consent")
        )
        registry = chain.contract(Chain(anvil.rpc_url, stack.deployment).w3, chain.CONSENT_REGISTRY,
                                  stack.deployment.consent_registry)  # fmt: skip

        async def status_of_commitment(commitment: str) -> Any:
            return await registry.functions.statusOf(bytes.fromhex(commitment)).call()

        start = int(time.time()) + 3600

        def grant(category: int) -> co_pb.GrantConsentRequest:
            return co_pb.GrantConsentRequest(
                request_id=str(uuid.uuid4()),
                patient_id=patient_id,
                grantee_id=org_id,
                provision=co_pb.ProvisionType.PROVISION_TYPE_PERMIT,
                actions=[vocab.Action.ACTION_READ],
                categories=[category],
                purposes=[vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT],
                period_start=Timestamp(seconds=start),
            )

        # Three consents at once: written side by side, each on chain with its period.
        granted, *others = [
            await consent.GrantConsent(grant(c))
            for c in (
                vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS,
                vocab.DataCategory.DATA_CATEGORY_MEDICATIONS,
                vocab.DataCategory.DATA_CATEGORY_DEMOGRAPHICS,
            )
        ]
        c1 = granted.consent.commitment

        async def all_active() -> Any:
            entries = [await status_of_commitment(g.consent.commitment) for g in (granted, *others)]
            return entries if all(e[0] == 1 for e in entries) else None

        for entry in await eventually(all_active, "the grants on ConsentRegistry", within=60):
            assert (entry[1], entry[2]) == (start, 0), "valid from the period's start, no end"
        assert await registry.functions.isInForce(bytes.fromhex(c1), start + 1).call()
        assert not await registry.functions.isInForce(bytes.fromhex(c1), start - 1).call()

        revoked = await consent.RevokeConsent(
            co_pb.RevokeConsentRequest(request_id=str(uuid.uuid4()), consent_id=granted.consent.consent_id)
        )
        c2 = revoked.consent.commitment

        async def revoked_on_chain() -> Any:
            entry = await status_of_commitment(c1)
            return entry if entry[0] == 2 else None

        entry = await eventually(revoked_on_chain, "the revocation on ConsentRegistry", within=60)
        assert bytes(entry[5]) == bytes.fromhex(c2), "revoked by the revoking version"
        assert not await registry.functions.isInForce(bytes.fromhex(c1), start + 1).call()
        assert (await status_of_commitment(c2))[0] == 0, "a revocation is not itself a grant"
