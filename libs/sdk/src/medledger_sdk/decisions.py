"""What replaying a consent decision needs, fetched and proven: consent's record of it
(GetDecision), its entry in the audit log and the log's consent-version and break-glass entries
about the patient (ListEntries), each proven included in one checkpoint signed by the trust
policy's log keys (GetTlogProof, verified offline). ``medledger decision replay`` and the demo
feed it to ``medledger_verifier.decision_replay.replay``.

What it cannot show: that audit listed every entry about the patient. A version left out of the
listing would go unnoticed here; ``medledger audit verify`` (and the auditors' entry bundles) see
the whole log.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medledger.audit.v1 import audit_service_pb2 as au_pb
from medledger.consent.v1 import consent_service_pb2 as co_pb

from medledger_sdk.calls import pages
from medledger_sdk.client import Medledger
from medledger_verifier import notes
from medledger_verifier.decision_replay import ReplayReport, replay
from medledger_verifier.errors import InvalidArgument, NotFound
from medledger_verifier.proof_files import TrustPolicy
from medledger_verifier.tlog import leaf_hash

# The entries a replay reads besides the decision's own.
USED_TYPES = ("consent.version_recorded", "break_glass.started", "break_glass.reviewed")


@dataclass(frozen=True)
class DecisionEvidence:
    record: co_pb.ConsentDecision
    entry: au_pb.LogEntry
    used: tuple[au_pb.LogEntry, ...]
    # The signed checkpoint every entry is proven in.
    tree_size: int
    # Each entry's C2SP tlog-proof text, by index.
    proofs: Mapping[int, str]

    @property
    def logged(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.entry.entry)
        return parsed

    def replay(self, *, window_seconds: float) -> ReplayReport:
        logged = self.logged
        return replay(
            logged,
            [json.loads(e.entry) for e in self.used],
            side_lists={str(logged.get("considered_sha256", "")): list(self.record.considered)},
            window_seconds=window_seconds,
        )

    def to_json(self) -> str:
        """The evidence as a file a third party checks offline: the decision's entry and the
        entries used, each as its exact bytes (UTF-8 JSON text) with its tlog-proof."""

        def item(e: au_pb.LogEntry) -> dict[str, str]:
            return {"entry": bytes(e.entry).decode(), "tlog_proof": self.proofs[e.index]}

        return json.dumps({"decision": item(self.entry), "entries": [item(e) for e in self.used]}, indent=2) + "\n"

    def record_differences(self) -> list[str]:
        """Where consent's record and the log's entry disagree (the replay trusts the log)."""
        return record_differences(self.record, self.logged)


async def fetch_decision_evidence(
    ml: Medledger, decision_id: str, policy: TrustPolicy, *, wait_seconds: float = 30.0
) -> DecisionEvidence:
    """RpcError when a service refuses; NotFound when the log holds no entry of the decision
    within `wait_seconds`; InvalidArgument when a checkpoint or proof does not verify."""
    verifiers = [notes.NoteVerifier.parse(k) for k in policy.log_verifier_keys]
    record = (await ml.consent.GetDecision(co_pb.GetDecisionRequest(decision_id=decision_id))).decision
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    while True:
        entry, used = await _entries(ml, record)
        if entry is not None:
            break
        if loop.time() >= deadline:
            raise NotFound(f"the log holds no entry of decision {decision_id} (after {wait_seconds:g} s)")
        await asyncio.sleep(0.5)
    tree_size, proofs = await _prove(ml, policy, verifiers, [entry, *used], deadline=deadline)
    return DecisionEvidence(record, entry, tuple(used), tree_size, proofs)


async def _entries(ml: Medledger, record: co_pb.ConsentDecision) -> tuple[au_pb.LogEntry | None, list[au_pb.LogEntry]]:
    decision_entry = None
    used = []
    request = au_pb.ListEntriesRequest(patient_id=record.patient_id)
    async for entry in pages(ml.audit.ListEntries, request, "entries"):
        if entry.redacted or not entry.entry:
            continue
        fields = json.loads(entry.entry)
        if fields.get("type") == "consent.decision" and fields.get("decision_id") == record.decision_id:
            decision_entry = entry
        elif fields.get("type") in USED_TYPES:
            used.append(entry)
    return decision_entry, used


async def _prove(
    ml: Medledger,
    policy: TrustPolicy,
    verifiers: Sequence[notes.NoteVerifier],
    entries: Sequence[au_pb.LogEntry],
    *,
    deadline: float,
) -> tuple[int, dict[int, str]]:
    """Every entry's inclusion in the latest signed checkpoint, once one covers them all; its size
    and the proofs."""
    highest = max(e.index for e in entries)
    loop = asyncio.get_running_loop()
    while True:
        latest = await ml.audit.GetLatestCheckpoint(au_pb.GetLatestCheckpointRequest())
        checkpoint, _ = notes.open_checkpoint(latest.note, verifiers, origin=policy.origin)
        if checkpoint.tree_size > highest:
            break
        if loop.time() >= deadline:
            raise NotFound(f"the log signed no checkpoint covering entry {highest} in time")
        await asyncio.sleep(0.5)
    proofs = {}
    for entry in entries:
        request = au_pb.GetTlogProofRequest(index=entry.index, tree_size=checkpoint.tree_size)
        text = (await ml.audit.GetTlogProof(request)).tlog_proof
        proof = notes.TlogProof.parse(text)
        if proof.index != entry.index:
            raise InvalidArgument.field("tlog_proof", f"a proof of entry {proof.index}, not of entry {entry.index}")
        notes.verify_tlog_proof(proof, leaf_hash(bytes(entry.entry)), verifiers, origin=policy.origin)
        proofs[entry.index] = text
    return int(checkpoint.tree_size), proofs


def record_differences(record: co_pb.ConsentDecision, logged: Mapping[str, Any]) -> list[str]:
    out = []
    outcome = (co_pb.Decision.Name(record.decision), record.reason_code)
    if outcome != (logged.get("decision"), logged.get("reason_code")):
        out.append("consent's record and the log's entry give different outcomes")
    if "considered" in logged and sorted(record.considered) != sorted(logged["considered"]):
        out.append("consent's record and the log's entry list different versions as considered")
    if record.rule_version != logged.get("rule_version"):
        out.append("consent's record and the log's entry name different rule versions")
    return out
