"""``medledger decision replay DECISION_ID``: whether a logged consent decision follows from the
transparency log, as a principal who may see it (the patient, the actor, a privacy officer, an
auditor).

It asks consent's GetDecision for the record (the patient and, for a long list, the versions
considered), lists the audit log's entries about the patient (ListEntries), finds the decision's
entry by its id, checks with a tlog-proof (GetTlogProof, verified offline against the trust
policy's log keys) that it and every consent-version and break-glass entry used are in a signed
checkpoint of the log, then replays it (``medledger_verifier.decision_replay``) and says in words
what holds and what does not.

What it cannot show: that audit listed every entry about the patient. A version left out of the
listing would go unnoticed here; ``medledger audit verify`` (and the auditors' entry bundles) see
the whole log.

Exit codes: 0 the logged outcome follows, 1 it does not (or cannot be checked), 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medledger.audit.v1 import audit_service_pb2 as au_pb
from medledger.consent.v1 import consent_service_pb2 as co_pb

from medledger_sdk.cli.errors import CommandError
from medledger_verifier import notes
from medledger_verifier.decision_replay import DEFAULT_WINDOW_SECONDS, ReplayReport, replay
from medledger_verifier.errors import InvalidArgument, MedledgerError
from medledger_verifier.proof_files import TrustPolicy
from medledger_verifier.tlog import leaf_hash

USAGE = 2
_DECISION_ID = re.compile(r"dec_[0-9a-f]{32}")
# The entries a replay reads besides the decision's own.
_USED = ("consent.version_recorded", "break_glass.started", "break_glass.reviewed")


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "decision", help="replay a logged consent decision against the transparency log"
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    replay_parser = commands.add_parser(
        "replay",
        help="check that a logged decision follows from the consent versions the log holds",
        description=(
            "Fetch a consent decision (GetDecision) and the log's entries about its patient, check that the "
            "decision's entry and every entry used are in a checkpoint signed by the log's keys of the trust "
            "policy, then check that the versions considered are the patient's versions the log holds up to "
            "the decision (within the propagation window) and re-run the rule of the decision's version. "
            "Exit 0 the logged outcome follows, 1 it does not, 2 bad input."
        ),
    )
    replay_parser.add_argument("decision_id", metavar="DECISION_ID", help="dec_… as a check answered it")
    replay_parser.add_argument("--trust", required=True, metavar="POLICY", help="the trust policy (JSON)")
    replay_parser.add_argument("--principal", required=True, metavar="ID", help="who asks")
    replay_parser.add_argument(
        "--secret-file", required=True, type=Path, help="that principal's client secret, in a file"
    )
    replay_parser.add_argument(
        "--window",
        type=float,
        default=DEFAULT_WINDOW_SECONDS,
        metavar="SECONDS",
        help=f"how recently before a decision a version may have been recorded and still be missing from it "
        f"(default {DEFAULT_WINDOW_SECONDS:g}: consent's propagation bound)",
    )
    replay_parser.add_argument(
        "--wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the log to take in and sign the entries (default 30)",
    )
    replay_parser.add_argument("--identity-address", default="127.0.0.1:50051", help="(default 127.0.0.1:50051)")
    replay_parser.add_argument("--consent-address", default="127.0.0.1:50052", help="(default 127.0.0.1:50052)")
    replay_parser.add_argument("--audit-address", default="127.0.0.1:50055", help="(default 127.0.0.1:50055)")
    replay_parser.set_defaults(func=run_replay)


def run_replay(args: argparse.Namespace) -> int:
    if not _DECISION_ID.fullmatch(args.decision_id):
        raise CommandError(f"{args.decision_id[:80]!r} is not a decision id (dec_ and 32 hex digits)", USAGE)
    if not 0 <= args.window <= 3600:
        raise CommandError("--window is 0 to 3600 seconds", USAGE)
    try:
        policy = TrustPolicy.parse(Path(args.trust).read_bytes())
        verifiers = [notes.NoteVerifier.parse(k) for k in policy.log_verifier_keys]
    except OSError as exc:
        raise CommandError(f"cannot read the trust policy {args.trust}: {exc.strerror or exc}", USAGE) from None
    except InvalidArgument as exc:
        raise CommandError(f"the trust policy {args.trust} is not usable: {exc.message}", USAGE) from None
    if not args.secret_file.is_file():
        raise CommandError(f"cannot read the secret file {args.secret_file}", USAGE)
    return asyncio.run(_replay(args, policy, verifiers))


async def _replay(args: argparse.Namespace, policy: TrustPolicy, verifiers: list[notes.NoteVerifier]) -> int:
    from medledger_sdk.calls import RpcError, pages
    from medledger_sdk.client import Endpoints, Medledger

    endpoints = Endpoints(identity=args.identity_address, consent=args.consent_address, audit=args.audit_address)
    print(f"replaying decision {args.decision_id}")
    print(f"trusting the log {policy.origin}")
    async with Medledger(endpoints, principal_id=args.principal, secret_file=args.secret_file) as ml:
        try:
            record = (await ml.consent.GetDecision(co_pb.GetDecisionRequest(decision_id=args.decision_id))).decision
            print(
                f"  consent's record: {co_pb.Decision.Name(record.decision).removeprefix('DECISION_')} "
                f"({record.reason_code}) under {record.rule_version}, {len(record.considered)} version(s) considered"
            )
            found = await _entries_until_signed(ml, pages, record, args.wait)
        except RpcError as exc:
            print(f"  ✗ cannot replay: {exc.code().name}: {exc.details()}")
            return 1
        except MedledgerError as exc:  # fetching a token: identity refused the credentials
            print(f"  ✗ cannot replay: {exc.message}")
            return 1
        if found is None:
            print(f"  ✗ NOT REPLAYED: the log holds no entry of decision {args.decision_id} (after {args.wait:g} s)")
            return 1
        decision_entry, used = found
        try:
            proved = await _prove(ml, policy, verifiers, [decision_entry, *used])
        except RpcError as exc:
            print(f"  ✗ cannot prove the entries: {exc.code().name}: {exc.details()}")
            return 1
        except InvalidArgument as exc:
            print(f"  ✗ NOT REPLAYED: an entry's tlog-proof does not verify: {exc.message}")
            return 1
    print(
        f"  ✓ the decision's entry {decision_entry.index} and {len(used)} consent and break-glass entr"
        f"{'y' if len(used) == 1 else 'ies'} of the patient are in the log's checkpoint of size {proved}, "
        "signed by the trusted keys"
    )
    logged = json.loads(decision_entry.entry)
    differences = _record_differences(record, logged)
    report = replay(
        logged,
        [json.loads(e.entry) for e in used],
        side_lists={str(logged.get("considered_sha256", "")): list(record.considered)},
        window_seconds=args.window,
    )
    print_report(report, differences)
    return 0 if report.valid and not differences else 1


async def _entries_until_signed(
    ml: Any, pages: Any, record: co_pb.ConsentDecision, wait: float
) -> tuple[au_pb.LogEntry, list[au_pb.LogEntry]] | None:
    """The decision's entry and the patient's entries the replay uses, once the log holds it."""
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        decision_entry = None
        used = []
        async for entry in pages(
            ml.audit.ListEntries, au_pb.ListEntriesRequest(patient_id=record.patient_id), "entries"
        ):
            if entry.redacted or not entry.entry:
                continue
            fields = json.loads(entry.entry)
            if fields.get("type") == "consent.decision" and fields.get("decision_id") == record.decision_id:
                decision_entry = entry
            elif fields.get("type") in _USED:
                used.append(entry)
        if decision_entry is not None or asyncio.get_running_loop().time() >= deadline:
            return (decision_entry, used) if decision_entry is not None else None
        await asyncio.sleep(0.5)


async def _prove(
    ml: Any, policy: TrustPolicy, verifiers: list[notes.NoteVerifier], entries: list[au_pb.LogEntry]
) -> int:
    """Every entry's inclusion in one signed checkpoint (the latest that covers them all); its size."""
    highest = max(e.index for e in entries)
    for _ in range(60):  # the log signs a checkpoint every second or so
        latest = await ml.audit.GetLatestCheckpoint(au_pb.GetLatestCheckpointRequest())
        checkpoint, _ = notes.open_checkpoint(latest.note, verifiers, origin=policy.origin)
        if checkpoint.tree_size > highest:
            break
        await asyncio.sleep(0.5)
    else:
        raise InvalidArgument.field("checkpoint", f"the log signed no checkpoint covering entry {highest} in 30 s")
    for entry in entries:
        reply = await ml.audit.GetTlogProof(
            au_pb.GetTlogProofRequest(index=entry.index, tree_size=checkpoint.tree_size)
        )
        proof = notes.TlogProof.parse(reply.tlog_proof)
        if proof.index != entry.index:
            raise InvalidArgument.field("tlog_proof", f"a proof of entry {proof.index}, not {entry.index}")
        notes.verify_tlog_proof(proof, leaf_hash(bytes(entry.entry)), verifiers, origin=policy.origin)
    return int(checkpoint.tree_size)


def _record_differences(record: co_pb.ConsentDecision, logged: Mapping[str, Any]) -> list[str]:
    """Where consent's record and the log's entry disagree (the log is what the replay trusts)."""
    out = []
    if co_pb.Decision.Name(record.decision) != logged.get("decision") or record.reason_code != logged.get(
        "reason_code"
    ):
        out.append("consent's record and the log's entry give different outcomes")
    if "considered" in logged and sorted(record.considered) != sorted(logged["considered"]):
        out.append("consent's record and the log's entry list different versions as considered")
    if record.rule_version != logged.get("rule_version"):
        out.append("consent's record and the log's entry name different rule versions")
    return out


def print_report(report: ReplayReport, differences: Sequence[str] = ()) -> None:
    print(
        f"  decided at {report.decided_at} under {report.rule_version}: {report.logged}; "
        f"{report.considered} version(s) considered, {report.logged_versions} logged for the patient"
    )
    for finding in report.failures:
        print(f"  ✗ {finding.code}: {finding.message}")
    for difference in differences:
        print(f"  ✗ record-differs: {difference}")
    for finding in report.notes:
        print(f"  - {finding.code}: {finding.message}")
    if report.valid and not differences:
        print(
            f"VALID: the versions considered are the patient's versions the log holds up to the decision, and "
            f"{report.rule_version} re-run over them gives {report.replayed}, as logged."
        )
    else:
        print("NOT VALID: the logged decision does not follow from the log (see the failures above).")
