"""`medledger audit ...`:

- `verify`: recompute the log from its database, check every lookup column and signed checkpoint,
  and compare the log with its witnesses: the last-checkpoint file and the chain (see
  medledger_audit.verify). Exit 0 when the log verifies, 1 when it diverges (or a witness given
  cannot be read), 2 on a usage error or a database that cannot be opened.
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

import grpc
from eth_utils.address import is_address
from medledger.audit.v1 import audit_service_pb2 as pb
from medledger.audit.v1 import audit_service_pb2_grpc as pb_grpc
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from medledger_audit.verify import NotAnAuditLog, VerifyReport, verify_log
from medledger_audit.witnesses import RememberedCheckpoint, read_chain
from medledger_runtime.db import Database
from medledger_runtime.errors import MedledgerError
from medledger_sdk.channels import make_channel
from medledger_sdk.cli.errors import CommandError
from medledger_verifier import notes
from medledger_verifier.errors import InvalidArgument
from medledger_verifier.proof_files import TrustPolicy

DEFAULT_DATABASE = "sqlite+aiosqlite:///.medledger/audit.db"
# Where `medledger up` keeps the checkpointer's file, beside DEFAULT_DATABASE.
DEFAULT_LAST_CHECKPOINT = Path(".medledger/audit/last-checkpoint")
USAGE = 2


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "audit", help="work with the audit log", description="Work with the audit transparency log."
    )
    commands = parser.add_subparsers(title="audit commands", metavar="COMMAND", required=True)
    verify = commands.add_parser(
        "verify",
        help="recompute the log from its database, check it against its checkpoints and the chain",
        description=(
            "Recompute the audit log's tree from the entries in its database, compare it with the stored "
            "tiles and every row's lookup columns with its entry's bytes, check every signed checkpoint, the "
            "newest checkpoint the log remembers signing (its last-checkpoint file) and the chain's latest "
            "anchored checkpoint; name every divergence. Exit 0 verified, 1 diverges, 2 usage error."
        ),
    )
    verify.add_argument(
        "--database-url",
        default=os.environ.get("MEDLEDGER_DATABASE_URL", DEFAULT_DATABASE),
        help="the audit database (default: $MEDLEDGER_DATABASE_URL, else the one `medledger up` keeps)",
    )
    verify.add_argument(
        "--trust",
        metavar="POLICY",
        help="a trust policy (as `medledger verify` takes): the log's origin and keys, the chain and its registry",
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
    verify.add_argument("--rpc", metavar="URL", help="a JSON-RPC URL of the chain: compare with what it anchored")
    verify.add_argument(
        "--anchor-registry", metavar="ADDRESS", help="the AnchorRegistry's address (or take it from --trust)"
    )
    verify.add_argument(
        "--last-checkpoint-file",
        metavar="PATH",
        type=Path,
        help=(
            "the audit service's last-checkpoint file (default: $MEDLEDGER_LAST_CHECKPOINT_FILE, else the one "
            "`medledger up` keeps when the database is its own)"
        ),
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
    # Every usage error before anything is read from the log or the chain.
    _check_database_url(args.database_url)
    pinned = _pinned_log_and_chain(args)
    last_file = _last_checkpoint_file(args)
    remembered = None
    if last_file is not None:
        try:
            remembered = RememberedCheckpoint.read(last_file)
        except OSError as exc:
            raise CommandError(f"cannot read the last-checkpoint file {last_file}: {exc}", USAGE) from None
    return asyncio.run(_verify(args, pinned, remembered))


async def _verify(args: argparse.Namespace, pinned: _Pinned, remembered: RememberedCheckpoint | None) -> int:
    origin, vkeys, registry, chain_id = pinned
    if origin is None:
        origin, vkeys = await _published_keys(args.audit_address)
    try:
        verifiers = [notes.NoteVerifier.parse(k) for k in vkeys]
    except Exception as exc:
        raise CommandError(f"a verifier key of the log is malformed: {exc}", USAGE) from None
    witness = None
    if args.rpc and registry:
        witness = await read_chain(args.rpc, registry, origin, chain_id=chain_id)
    db = Database(args.database_url)

    def progress(done: int, total: int) -> None:
        print(f"  checked {done:,} of {total:,} entries", flush=True)

    try:
        report = await verify_log(db, verifiers, origin, progress=progress, remembered=remembered, chain=witness)
    except NotAnAuditLog as exc:
        raise CommandError(f"{_shown(args.database_url)}: {exc}", USAGE) from None
    except (OSError, SQLAlchemyError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
        raise CommandError(f"cannot read the database {_shown(args.database_url)}: {problem}", USAGE) from None
    finally:
        await db.close()
    _print_report(report, origin)
    if remembered is None:
        print("  - last checkpoint: not checked: no last-checkpoint file given (--last-checkpoint-file)")
    if witness is None:
        print(
            "  - chain: not compared: no chain given (--rpc with --trust or --anchor-registry), so a log rolled "
            "back consistently to an earlier size cannot be told from this database alone"
        )
    if report.ok:
        print(
            f"the log {origin} verifies: {report.tree_size:,} entries recomputed, the stored tiles and lookup "
            f"columns match, and {report.checkpoints_checked} signed checkpoints match the recomputed tree"
        )
        return 0
    assert report.divergence is not None
    first = report.divergence
    where = f" (first diverging entry: {first.index})" if first.index is not None else ""
    print(f"the log {origin} does NOT verify{where}: {first.problem}")
    return 1


def _shown(url: str) -> str:
    """The database URL without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def _check_database_url(url: str) -> None:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise CommandError("--database-url is not a database URL", USAGE) from None
    if parsed.get_backend_name() not in ("postgresql", "sqlite"):
        raise CommandError(f"--database-url: unsupported database {parsed.get_backend_name()!r}", USAGE)
    # Opening a SQLite file that is not there would create an empty one: say so instead.
    file = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if file and file != ":memory:" and not Path(file).is_file():
        raise CommandError(f"there is no audit database at {parsed.database}", USAGE)


# The log's origin and verifier keys (None, []: ask the log), the chain's registry and id (None: not given).
_Pinned = tuple[str | None, list[str], str | None, int | None]


def _pinned_log_and_chain(args: argparse.Namespace) -> _Pinned:
    registry: str | None = args.anchor_registry
    chain_id: int | None = None
    if args.trust:
        if args.verifier_key or args.origin:
            raise CommandError("--trust names the log's origin and keys: not with --origin or --verifier-key", USAGE)
        try:
            policy = TrustPolicy.parse(Path(args.trust).read_bytes())
        except OSError as exc:
            raise CommandError(f"cannot read the trust policy {args.trust}: {exc.strerror or exc}", USAGE) from None
        except InvalidArgument as exc:
            raise CommandError(f"the trust policy {args.trust} is not usable: {exc.message}", USAGE) from None
        if registry and registry.lower() != policy.anchor_registry.lower():
            raise CommandError("--anchor-registry differs from the trust policy's registry", USAGE)
        origin, vkeys = policy.origin, list(policy.log_verifier_keys)
        registry, chain_id = policy.anchor_registry, policy.chain_id
    elif args.verifier_key or args.origin:
        if not args.origin or not args.verifier_key:
            raise CommandError("--origin and --verifier-key go together", USAGE)
        origin, vkeys = args.origin, list(args.verifier_key)
    else:
        origin, vkeys = None, []
    if registry and not args.rpc:
        raise CommandError("a registry to compare with needs the chain: give --rpc URL", USAGE)
    if args.rpc and not registry:
        raise CommandError("--rpc needs the registry: give --anchor-registry ADDRESS or --trust POLICY", USAGE)
    if registry and not is_address(registry):
        raise CommandError(f"--anchor-registry {registry!r} is not an address", USAGE)
    return origin, vkeys, registry, chain_id


async def _published_keys(address: str) -> tuple[str, list[str]]:
    channel = make_channel(address)
    try:
        reply = await pb_grpc.AuditServiceStub(channel).GetVerifierKeys(pb.GetVerifierKeysRequest(), timeout=10)
    except grpc.aio.AioRpcError as exc:
        raise CommandError(
            f"could not ask the log at {address} for its keys ({exc.code().name}): pin them with --trust, or "
            "--origin and --verifier-key",
            USAGE,
        ) from None
    finally:
        await channel.close()
    print(f"using the keys the log at {address} publishes (pin them with --trust or --verifier-key)")
    return reply.origin, list(reply.verifier_keys)


def _last_checkpoint_file(args: argparse.Namespace) -> Path | None:
    """The file given, else $MEDLEDGER_LAST_CHECKPOINT_FILE, else `medledger up`'s beside its own
    database (a file beside another database would belong to another log)."""
    if args.last_checkpoint_file is not None:
        return Path(args.last_checkpoint_file)
    configured = os.environ.get("MEDLEDGER_LAST_CHECKPOINT_FILE")
    if configured:
        return Path(configured)
    return DEFAULT_LAST_CHECKPOINT if args.database_url == DEFAULT_DATABASE else None


def _print_report(report: VerifyReport, origin: str) -> None:
    if report.state_found:
        print(f"the log {origin}: {report.tree_size:,} entries in its database")
    if report.entries_sound:
        extra = f", {report.redacted} redacted (each recorded by an entry.redacted entry)" if report.redacted else ""
        if report.unchecked_lookups:
            extra += (
                f"; {report.unchecked_lookups} oversize entries hold only a hash of their fields, so their record, "
                "commitment and actor columns cannot be checked"
            )
        print(f"  ✓ entries: every row matches its leaf hash and its lookup columns match its bytes{extra}")
    for finding in report.findings:
        if finding.passed is not False:  # a failed one is among the divergences below
            print(f"  {'✓' if finding.passed else '-'} {finding.check}: {finding.detail}")
    for divergence in report.divergences:
        where = f"entry {divergence.index}: " if divergence.index is not None else ""
        print(f"  ✗ DIVERGES [{divergence.kind}] {where}{divergence.problem}")
