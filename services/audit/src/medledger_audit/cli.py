"""`medledger audit ...`:

- `verify`: recompute the log from its database and check every signed checkpoint (see
  medledger_audit.verify). Exit 0 when the log verifies, 1 when it does not.
- `entries`: the log's entries about a patient, by an actor, of a record or in a time range,
  through audit's ListEntries as a principal (a patient their own, an auditor all).
- `checkpoint`: the latest signed checkpoint, checked against the log's published keys."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medledger.audit.v1 import audit_service_pb2 as pb
from medledger.audit.v1 import audit_service_pb2_grpc as pb_grpc

from medledger_audit.verify import verify_log
from medledger_runtime.db import Database
from medledger_runtime.errors import MedledgerError
from medledger_sdk.channels import make_channel
from medledger_verifier import notes

DEFAULT_DATABASE = "sqlite+aiosqlite:///.medledger/audit.db"


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "audit", help="work with the audit log", description="Work with the audit transparency log."
    )
    commands = parser.add_subparsers(title="audit commands", metavar="COMMAND", required=True)
    verify = commands.add_parser(
        "verify",
        help="recompute the log from its database and check every signed checkpoint",
        description=(
            "Recompute the audit log's tree from the entries in its database, compare it with the stored "
            "tiles, and check every signed checkpoint; name the first entry that diverges."
        ),
    )
    verify.add_argument(
        "--database-url",
        default=os.environ.get("MEDLEDGER_DATABASE_URL", DEFAULT_DATABASE),
        help="the audit database (default: $MEDLEDGER_DATABASE_URL, else the one `medledger up` keeps)",
    )
    verify.add_argument(
        "--verifier-key",
        action="append",
        default=[],
        help="a C2SP verifier key of the log (repeat for both); pin these rather than ask the log",
    )
    verify.add_argument("--origin", help="the log's origin (with --verifier-key)")
    verify.add_argument(
        "--audit-address",
        default="127.0.0.1:50055",
        help="where to ask the log for its keys when none are given (default 127.0.0.1:50055)",
    )
    verify.set_defaults(func=run_verify)

    entries = commands.add_parser(
        "entries",
        help="list the log's entries about a patient, by an actor, of a record or in a time range",
        description=(
            "List log entries through audit's ListEntries, as a principal: a patient sees the entries about "
            "themselves, an auditor every entry. Each line: index, time, type, who acted, what on."
        ),
    )
    chosen = entries.add_mutually_exclusive_group()
    chosen.add_argument("--patient", metavar="ID", help="entries about this patient")
    chosen.add_argument("--actor", metavar="ID", help="entries of what this principal did")
    chosen.add_argument("--record", metavar="ID", help="entries about this record")
    entries.add_argument("--since", metavar="TIME", type=_time, help="integrated at or after (ISO 8601, UTC)")
    entries.add_argument("--until", metavar="TIME", type=_time, help="integrated before (ISO 8601, UTC)")
    entries.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    entries.add_argument("--json", action="store_true", help="print each entry's JSON as the log holds it")
    _credentials(entries)
    entries.set_defaults(func=run_entries)

    checkpoint = commands.add_parser(
        "checkpoint", help="print the log's latest signed checkpoint (C2SP), verified against its published keys"
    )
    checkpoint.add_argument("--audit-address", default="127.0.0.1:50055", help="(default 127.0.0.1:50055)")
    checkpoint.set_defaults(func=run_checkpoint)


def _credentials(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--principal", required=True, metavar="ID", help="who asks (a patient, or an auditor)")
    parser.add_argument("--secret-file", required=True, type=Path, help="that principal's client secret, in a file")
    parser.add_argument("--identity-address", default="127.0.0.1:50051", help="(default 127.0.0.1:50051)")
    parser.add_argument("--audit-address", default="127.0.0.1:50055", help="(default 127.0.0.1:50055)")


def _time(text: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def run_entries(args: argparse.Namespace) -> int:
    return asyncio.run(_entries(args))


async def _entries(args: argparse.Namespace) -> int:
    from medledger_sdk.calls import RpcError, pages  # the SDK: tokens, deadlines, retries, pages
    from medledger_sdk.client import Endpoints, Medledger

    request = pb.ListEntriesRequest(
        patient_id=args.patient or "", actor_id=args.actor or "", record_id=args.record or ""
    )
    if args.since:
        request.time_from.FromDatetime(args.since)
    if args.until:
        request.time_before.FromDatetime(args.until)
    endpoints = Endpoints(identity=args.identity_address, audit=args.audit_address)
    shown = 0
    async with Medledger(endpoints, principal_id=args.principal, secret_file=args.secret_file) as ml:
        try:
            async for entry in pages(ml.audit.ListEntries, request, "entries"):
                print(entry.entry.decode() if args.json else _describe(entry))
                shown += 1
                if shown >= args.limit:
                    break
        except RpcError as exc:
            print(f"medledger: the log refused: {exc}", file=sys.stderr)
            return 1
        except MedledgerError as exc:  # from fetching a token: identity refused the credentials
            print(f"medledger: {exc.message}", file=sys.stderr)
            return 1
    if not args.json:
        print(f"{shown} entr{'y' if shown == 1 else 'ies'}{' (the limit)' if shown >= args.limit else ''}")
    return 0


# The fields that say who acted, in the order they are looked for.
_ACTORS = ("actor_id", "written_by", "recorded_by", "requested_by", "practitioner_id", "reviewed_by", "changed_by")
_OBJECTS = ("record_id", "consent_id", "access_id", "erasure_id", "decision_id", "principal_id")


def _describe(entry: pb.LogEntry) -> str:
    if entry.redacted or not entry.entry:
        return f"{entry.index:>8}  (redacted; leaf hash {entry.leaf_hash.hex()[:16]}…)"
    fields = json.loads(entry.entry)
    actor = next((f"{k}={fields[k]}" for k in _ACTORS if fields.get(k)), "")
    target = next((f"{k}={fields[k]}" for k in _OBJECTS if fields.get(k)), "")
    extra = " ".join(f"{k}={fields[k]}" for k in ("purpose", "decision", "reason_code") if fields.get(k))
    when = str(fields.get("integrated_time", ""))[:19]
    return f"{entry.index:>8}  {when}  {fields.get('type', '?'):<26} {actor} {target} {extra}".rstrip()


def run_checkpoint(args: argparse.Namespace) -> int:
    return asyncio.run(_checkpoint(args))


async def _checkpoint(args: argparse.Namespace) -> int:
    channel = make_channel(args.audit_address)
    try:
        stub = pb_grpc.AuditServiceStub(channel)
        keys = await stub.GetVerifierKeys(pb.GetVerifierKeysRequest(), timeout=10)
        latest = await stub.GetLatestCheckpoint(pb.GetLatestCheckpointRequest(), timeout=10)
    finally:
        await channel.close()
    verifiers = [notes.NoteVerifier.parse(k) for k in keys.verifier_keys]
    checkpoint, _ = notes.open_checkpoint(latest.note, verifiers, origin=keys.origin, require_all=True)
    print(latest.note.decode(), end="")
    print(
        f"\nthe log {keys.origin} has {checkpoint.tree_size:,} entries; root {checkpoint.root.hex()}; "
        f"signed by all {len(verifiers)} of its published keys"
    )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    return asyncio.run(_verify(args))


async def _verify(args: argparse.Namespace) -> int:
    if args.verifier_key:
        if not args.origin:
            print("--origin is needed with --verifier-key", file=sys.stderr)
            return 2
        origin, vkeys = args.origin, list(args.verifier_key)
    else:
        channel = make_channel(args.audit_address)
        try:
            reply = await pb_grpc.AuditServiceStub(channel).GetVerifierKeys(pb.GetVerifierKeysRequest(), timeout=10)
        finally:
            await channel.close()
        origin, vkeys = reply.origin, list(reply.verifier_keys)
        print(f"using the keys the log at {args.audit_address} publishes (pin them with --verifier-key)")
    verifiers = [notes.NoteVerifier.parse(k) for k in vkeys]
    db = Database(args.database_url)

    def progress(done: int, total: int) -> None:
        print(f"  checked {done:,} of {total:,} entries", flush=True)

    try:
        report = await verify_log(db, verifiers, origin, progress=progress)
    finally:
        await db.close()
    if report.ok:
        print(
            f"the log {origin} verifies: {report.tree_size:,} entries recomputed, the stored tiles match, "
            f"and {report.checkpoints_checked} signed checkpoints match the recomputed tree"
        )
        return 0
    assert report.divergence is not None
    where = f" (first diverging entry: {report.divergence.index})" if report.divergence.index is not None else ""
    print(f"the log {origin} does NOT verify{where}: {report.divergence.problem}")
    return 1
