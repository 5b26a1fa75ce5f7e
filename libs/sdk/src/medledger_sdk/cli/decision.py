"""``medledger decision replay DECISION_ID``: whether a logged consent decision follows from the
transparency log, as a principal who may see it (the patient, the actor, a privacy officer, an
auditor).

It fetches consent's record of the decision, its log entry and the patient's consent-version and
break-glass entries, each proven in a signed checkpoint (``medledger_sdk.decisions``), replays it
(``medledger_verifier.decision_replay``) and says in words what holds and what does not.

Exit codes: 0 the logged outcome follows, 1 it does not (or cannot be checked), 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medledger.consent.v1 import consent_service_pb2 as co_pb

from medledger_sdk.cli.errors import CommandError
from medledger_verifier import notes
from medledger_verifier.decision_replay import DEFAULT_WINDOW_SECONDS, ReplayReport
from medledger_verifier.errors import InvalidArgument, MedledgerError, NotFound
from medledger_verifier.proof_files import TrustPolicy

USAGE = 2
_DECISION_ID = re.compile(r"dec_[0-9a-f]{32}")


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
        for key in policy.log_verifier_keys:
            notes.NoteVerifier.parse(key)
    except OSError as exc:
        raise CommandError(f"cannot read the trust policy {args.trust}: {exc.strerror or exc}", USAGE) from None
    except InvalidArgument as exc:
        raise CommandError(f"the trust policy {args.trust} is not usable: {exc.message}", USAGE) from None
    if not args.secret_file.is_file():
        raise CommandError(f"cannot read the secret file {args.secret_file}", USAGE)
    return asyncio.run(_replay(args, policy))


async def _replay(args: argparse.Namespace, policy: TrustPolicy) -> int:
    from medledger_sdk.calls import RpcError
    from medledger_sdk.client import Endpoints, Medledger
    from medledger_sdk.decisions import fetch_decision_evidence

    endpoints = Endpoints(identity=args.identity_address, consent=args.consent_address, audit=args.audit_address)
    print(f"replaying decision {args.decision_id}")
    print(f"trusting the log {policy.origin}")
    async with Medledger(endpoints, principal_id=args.principal, secret_file=args.secret_file) as ml:
        try:
            evidence = await fetch_decision_evidence(ml, args.decision_id, policy, wait_seconds=args.wait)
        except RpcError as exc:
            print(f"  ✗ cannot replay: {exc.code().name}: {exc.details()}")
            return 1
        except NotFound as exc:
            print(f"  ✗ NOT REPLAYED: {exc.message}")
            return 1
        except InvalidArgument as exc:
            print(f"  ✗ NOT REPLAYED: an entry is not proven in the log: {exc.message}")
            return 1
        except MedledgerError as exc:  # fetching a token: identity refused the credentials
            print(f"  ✗ cannot replay: {exc.message}")
            return 1
    record = evidence.record
    print(
        f"  consent's record: {co_pb.Decision.Name(record.decision).removeprefix('DECISION_')} "
        f"({record.reason_code}) under {record.rule_version}, {len(record.considered)} version(s) considered"
    )
    used = len(evidence.used)
    print(
        f"  ✓ the decision's entry {evidence.entry.index} and the patient's {used} consent-version and break-glass "
        f"entr{'y' if used == 1 else 'ies'} are in the log's checkpoint of size {evidence.tree_size}, signed by "
        "the trusted keys"
    )
    differences = evidence.record_differences()
    report = evidence.replay(window_seconds=args.window)
    print_report(report, differences)
    return 0 if report.valid and not differences else 1


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
