"""The story's accountability chapters: the patient lists who saw their data, and the record's and a
disclosure's proofs, once anchored, verify against the trust policy and the chain, as does the
log's latest checkpoint."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import grpc
from medledger.anchoring.v1 import anchoring_service_pb2 as anchoring_pb
from medledger.audit.v1 import audit_service_pb2 as audit_pb

from medledger_devstack.demo.waiting import LEARN_WAIT_SECONDS, eventually
from medledger_sdk.calls import RpcError, pages
from medledger_verifier import chain
from medledger_verifier.anchored_proofs import verify_anchored_proof
from medledger_verifier.proof_checks import Verification
from medledger_verifier.proof_files import TrustPolicy

if TYPE_CHECKING:
    from medledger_devstack.demo.story import Story


async def list_who_saw(story: Story) -> None:
    story.say.step("The patient asks the audit log who saw their data")

    # Two reads and three denials went out as events; the log has them a moment later.
    async def all_accesses() -> list[tuple[int, bytes, dict[str, Any]]] | None:
        listed = [
            (e.index, e.entry, json.loads(e.entry))
            async for e in pages(
                story.patient.audit.ListEntries, audit_pb.ListEntriesRequest(patient_id=story.patient_id), "entries"
            )
            if e.entry
        ]
        accesses = [(i, b, e) for i, b, e in listed if e["type"] in ("record.disclosed", "record.access_denied")]
        return accesses if len(accesses) >= 5 else None

    accesses = await eventually(all_accesses, "the audit log to hold every access", LEARN_WAIT_SECONDS, story.say)
    for _, _, entry in accesses:
        verb = "read" if entry["type"] == "record.disclosed" else "was DENIED"
        why = "" if entry["type"] == "record.disclosed" else f" ({entry.get('reason_code', '')})"
        story.say.say(
            f"{entry['event_time'][:19]}  {story.name(entry['actor_id'])} {verb} record for "
            f"{entry['purpose'].removeprefix('PURPOSE_OF_USE_')}{why}"
        )
    readers = {e["actor_id"] for _, _, e in accesses if e["type"] == "record.disclosed"}
    story.check(
        "who saw my data",
        readers == {story.doctor_id, story.emergency_id},
        "the log shows exactly who read the record: " + ", ".join(sorted(story.name(r) for r in readers)),
    )
    # The patient's first disclosure: its entry exactly as the log holds it, for its proof.
    story.access_index, story.access_bytes = next((i, b) for i, b, e in accesses if e["type"] == "record.disclosed")


async def anchored_proof(
    story: Story, request: anchoring_pb.GetAnchoredProofRequest, what: str
) -> anchoring_pb.GetAnchoredProofResponse:
    async def fetch() -> anchoring_pb.GetAnchoredProofResponse | None:
        try:
            reply: anchoring_pb.GetAnchoredProofResponse = await story.patient.anchoring.GetAnchoredProof(request)
            return reply
        except RpcError as exc:
            if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                return None  # not in the log yet, or not anchored yet
            raise

    return await eventually(fetch, what, story.config.anchor_wait_seconds, story.say, every=1.0)


async def verify(
    story: Story, proof: anchoring_pb.GetAnchoredProofResponse, entry: bytes, **record: Any
) -> Verification:
    w3 = chain.connect(story.config.rpc_url)
    try:
        return await verify_anchored_proof(
            story.config.trust_policy, proof.tlog_proof, entry, proof.anchor_json, w3, **record
        )
    finally:
        await w3.provider.disconnect()


def report(story: Story, name: str, verification: Verification) -> bool:
    for c in verification.checks:
        story.say.say(f"  {'✓' if c.passed else '✗'} {c.name}: {c.detail}")
    story.say.say(verification.verdict())
    v = verification
    if v.verified and v.anchored_at is not None:
        detail = (
            f"all {len(v.checks)} checks: entry {v.index} in the signed checkpoint of {v.checkpoint_size}, "
            f"anchored in block {v.block_number} at {v.anchored_at:%H:%M:%S} UTC"
        )
    else:
        detail = v.verdict()
    return story.check(name, v.verified, detail)


async def prove_the_record(story: Story) -> None:
    story.say.step("Fetching the record's proof once its checkpoint is anchored on chain")
    started = time.monotonic()
    proof = await anchored_proof(
        story, anchoring_pb.GetAnchoredProofRequest(commitment=story.receipt.commitment), "the record's anchored proof"
    )
    story.result.record_proof = proof
    a = proof.anchor
    story.say.say(
        f"after {time.monotonic() - started:.0f} s: entry {proof.entry_index} is in checkpoint {a.tree_size}, "
        f"anchored in block {a.block_number} (transaction {a.transaction_hash[:18]}…)"
    )
    story.say.say("verifying it against the trust policy and the chain, trusting nothing the services say:")
    report(
        story,
        "record proof verifies",
        await verify(story, proof, proof.entry, record=story.result.record, salt_hex=story.result.salt),
    )

    story.say.say(f"and the patient's first disclosure (entry {story.access_index}):")
    access = await anchored_proof(
        story, anchoring_pb.GetAnchoredProofRequest(entry_index=story.access_index), "the disclosure's anchored proof"
    )
    story.result.access_proof = access
    report(story, "disclosure proof verifies", await verify(story, access, story.access_bytes))


async def show_the_latest_anchor(story: Story) -> None:
    story.say.step("The log's latest signed checkpoint, anchored")
    latest = await story.patient.audit.GetLatestCheckpoint(audit_pb.GetLatestCheckpointRequest())
    story.say.say(f"the log has signed a checkpoint of {latest.tree_size} entries")

    async def covered() -> anchoring_pb.GetLatestAnchorResponse | None:
        reply = await story.patient.anchoring.GetLatestAnchor(anchoring_pb.GetLatestAnchorRequest())
        return reply if reply.anchor.tree_size >= latest.tree_size else None

    reply = await eventually(covered, "an anchor of that checkpoint", story.config.anchor_wait_seconds, story.say)
    a = reply.anchor
    on_chain = await registry_latest_size(story.config.rpc_url, story.config.trust_policy)
    story.check(
        "latest checkpoint anchored",
        on_chain >= latest.tree_size,
        f"AnchorRegistry {a.contract_address[:10]}… on chain {a.chain_id} holds tree size {on_chain} "
        f"(block {a.block_number}), covering the checkpoint of {latest.tree_size}",
    )


async def registry_latest_size(rpc_url: str, policy: TrustPolicy) -> int:
    """The tree size AnchorRegistry itself holds for the log: the chain's word, not the service's."""
    w3 = chain.connect(rpc_url)
    try:
        registry = chain.contract(w3, chain.ANCHOR_REGISTRY, policy.anchor_registry)
        latest = await registry.functions.latest(policy.origin).call()
        return int(latest[0])
    finally:
        await w3.provider.disconnect()
