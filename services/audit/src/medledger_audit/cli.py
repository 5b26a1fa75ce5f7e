"""`medledger audit verify`: recompute the log from its database and check every signed
checkpoint (see medledger_audit.verify). Exit 0 when the log verifies, 1 when it does not."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from medledger.audit.v1 import audit_service_pb2 as pb
from medledger.audit.v1 import audit_service_pb2_grpc as pb_grpc

from medledger_audit.verify import verify_log
from medledger_common import notes
from medledger_common.db import Database
from medledger_common.grpc_client import make_channel

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
