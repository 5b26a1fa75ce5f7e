"""`make chaos`: faults under load against the multi-process stack, then the invariants. (One
script, though long: the fault schedule and the invariants it checks read best in one place.)

    uv run python tests/chaos/chaos.py [--duration 60] [--rate 15] [--seed N]

It makes a PostgreSQL cluster of its own (initdb in a temporary folder; the machine's server is
never touched), starts the stack of `medledger up` on it (Tansu, Anvil and the five services, each
its own process, on free ports, keys in OpenBao), and runs the load generator (`bench/load.py`)
for the duration. Meanwhile it kills each service once with SIGKILL at a random moment and starts
it again, stops PostgreSQL for 10 s, stops the EVM node for 30 s (SIGSTOP, then SIGCONT), stops
OpenBao for 10 s (then starts and unseals it, as `up` does) and seals it for 5 s. The broker is not
killed: Tansu keeps its data in memory only; in production, Kafka's durability is Kafka's.

Then, with the load stopped and the puts that never got an answer sent again with their request
ids, it waits for the pipeline to settle and checks:

- lost = 0: every acknowledged put reads back with its commitment; its `record.stored` event is in
  the audit log exactly once; every entry of the log is covered by an anchor on chain;
- duplicated = 0: no record and no version beyond what was acknowledged or attempted (a retried
  put carries its request id and gets the first result);
- the audit log verifies from its database against its published keys;
- the time each fault took to recover.

Exit 0 only if every invariant holds. Output is in words, with progress while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from medledger.anchoring.v1 import anchoring_service_pb2 as anchoring_pb
from medledger.audit.v1 import audit_service_pb2 as audit_pb
from medledger.identity.v1 import identity_service_pb2 as identity_pb
from medledger.records.v1 import records_service_pb2 as records_pb
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_devstack import localstack
from medledger_devstack.cli.state import ADMIN_PRINCIPAL, StateDir
from medledger_devstack.stack.layout import HOST, SERVICES
from medledger_devstack.stack.supervisor import Stack
from medledger_runtime.errors import Unavailable
from medledger_sdk.calls import RpcError, pages
from medledger_sdk.client import Medledger
from medledger_verifier import commitments
from medledger_verifier.proof_files import TrustPolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from leaks import scan  # tests/chaos/leaks.py, beside this file
from load import Ledger, Load, StackInfo  # bench/load.py, the load generator

TREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT
PG_STOP_SECONDS = 10.0
ANVIL_STOP_SECONDS = 30.0
OPENBAO_STOP_SECONDS = 10.0
OPENBAO_SEALED_SECONDS = 5.0
SETTLE_SECONDS = 120.0


def say(text: str) -> None:
    print(text, flush=True)


@dataclass
class Fault:
    what: str
    at: float  # seconds into the load
    lasted: float = 0.0
    recovered_after: float | None = None  # from the end of the fault until it was recovered


@dataclass
class Report:
    faults: list[Fault] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


class Chaos:
    def __init__(self, stack: Stack, pg: localstack.PostgresCluster, info: StackInfo, rng: random.Random) -> None:
        self.stack = stack
        self.pg = pg
        self.info = info
        self.rng = rng
        self.report = Report()
        self.started = 0.0

    def now(self) -> float:
        return time.monotonic() - self.started

    async def until(self, check: Callable[[], Awaitable[bool]], within: float, every: float = 0.2) -> float | None:
        """Seconds until `check()` holds, or None if it did not within `within`."""
        start = time.monotonic()
        while time.monotonic() - start < within:
            try:
                if await check():
                    return time.monotonic() - start
            except (grpc.RpcError, OSError, Unavailable):
                pass
            await asyncio.sleep(every)
        return None

    async def serving(self, service: str) -> bool:
        async with grpc.aio.insecure_channel(getattr(self.info.endpoints, service)) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    # --- faults -------------------------------------------------------------------------------

    async def kill(self, service: str, at: float) -> None:
        await asyncio.sleep(max(0.0, at - self.now()))
        fault = Fault(f"SIGKILL {service}", self.now())
        self.report.faults.append(fault)
        proc = self.stack.services[service]
        proc.signal(signal.SIGKILL)
        await asyncio.to_thread(proc.proc.wait)
        say(f"  {fault.at:5.1f} s: killed {service} (pid {proc.pid}) with SIGKILL; starting it again")
        restarted = self.stack.restart(service)
        fault.recovered_after = await self.until(lambda: self.serving(service), 60)
        say(f"  {self.now():5.1f} s: {service} (pid {restarted.pid}) serves again after {_secs(fault.recovered_after)}")

    async def stop_postgres(self, at: float, put_times: list[float]) -> None:
        await asyncio.sleep(max(0.0, at - self.now()))
        fault = Fault(f"PostgreSQL stopped {PG_STOP_SECONDS:.0f} s", self.now(), PG_STOP_SECONDS)
        self.report.faults.append(fault)
        say(f"  {fault.at:5.1f} s: stopping PostgreSQL for {PG_STOP_SECONDS:.0f} s")
        await asyncio.to_thread(self.pg.stop, "immediate")  # as a crash: no checkpoint, no goodbye
        await asyncio.sleep(PG_STOP_SECONDS)
        await asyncio.to_thread(self.pg.start)
        back = time.monotonic()
        say(f"  {self.now():5.1f} s: PostgreSQL started again")

        async def a_put_since() -> bool:
            return any(t > back for t in put_times)

        fault.recovered_after = await self.until(a_put_since, 60)
        say(f"  {self.now():5.1f} s: puts are acknowledged again {_secs(fault.recovered_after)} after PostgreSQL")

    async def a_token_issued(self) -> bool:
        """identity signs a new access token: a call that needs the key manager (the load's own
        clients keep their tokens, and records' cached data keys keep its puts going)."""
        fresh = Medledger(self.info.endpoints, principal_id=ADMIN_PRINCIPAL, client_secret=self.info.admin_secret)
        try:
            await fresh.token("records")
        finally:
            await fresh.aclose()
        return True

    async def stop_openbao(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - self.now()))
        bao = self.stack.openbao
        assert bao is not None, "the chaos stack keeps its keys in OpenBao"
        fault = Fault(f"OpenBao stopped {OPENBAO_STOP_SECONDS:.0f} s", self.now(), OPENBAO_STOP_SECONDS)
        self.report.faults.append(fault)
        say(f"  {fault.at:5.1f} s: stopping OpenBao for {OPENBAO_STOP_SECONDS:.0f} s")
        await asyncio.to_thread(bao.stop)
        await asyncio.sleep(OPENBAO_STOP_SECONDS)
        await asyncio.to_thread(bao.start)  # unseals it, as `up` does
        say(f"  {self.now():5.1f} s: OpenBao started again and unsealed")
        fault.recovered_after = await self.until(self.a_token_issued, 60)
        say(f"  {self.now():5.1f} s: identity signs tokens again {_secs(fault.recovered_after)} after OpenBao")

    async def seal_openbao(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - self.now()))
        bao = self.stack.openbao
        assert bao is not None, "the chaos stack keeps its keys in OpenBao"
        fault = Fault(f"OpenBao sealed {OPENBAO_SEALED_SECONDS:.0f} s", self.now(), OPENBAO_SEALED_SECONDS)
        self.report.faults.append(fault)
        say(f"  {fault.at:5.1f} s: sealing OpenBao for {OPENBAO_SEALED_SECONDS:.0f} s")
        await asyncio.to_thread(bao.seal)
        await asyncio.sleep(OPENBAO_SEALED_SECONDS)
        await asyncio.to_thread(bao.unseal)
        say(f"  {self.now():5.1f} s: OpenBao unsealed")
        fault.recovered_after = await self.until(self.a_token_issued, 60)
        say(f"  {self.now():5.1f} s: identity signs tokens again {_secs(fault.recovered_after)} after the unseal")

    async def stop_anvil(self, at: float, anchored: Callable[[], Awaitable[int | None]]) -> None:
        await asyncio.sleep(max(0.0, at - self.now()))
        assert self.stack.anvil is not None
        fault = Fault(f"EVM node stopped {ANVIL_STOP_SECONDS:.0f} s", self.now(), ANVIL_STOP_SECONDS)
        self.report.faults.append(fault)
        say(f"  {fault.at:5.1f} s: stopping Anvil (SIGSTOP) for {ANVIL_STOP_SECONDS:.0f} s")
        self.stack.anvil.signal(signal.SIGSTOP)
        await asyncio.sleep(ANVIL_STOP_SECONDS)
        self.stack.anvil.signal(signal.SIGCONT)
        resumed = time.monotonic()
        before = await anchored()
        while before is None and time.monotonic() - resumed < 60:
            await asyncio.sleep(0.5)
            before = await anchored()
        say(f"  {self.now():5.1f} s: Anvil continues (SIGCONT); anchored tree size {before or 0:,}")

        async def anchored_more() -> bool:
            now = await anchored()
            return now is not None and now > (before or 0)

        fault.recovered_after = await self.until(anchored_more, 90, every=0.5)
        say(f"  {self.now():5.1f} s: a new anchor on chain {_secs(fault.recovered_after)} after Anvil continued")


async def _reported(fault: Awaitable[None], report: Report) -> None:
    """A fault that could not be carried out or watched is a problem of the run, not a crash."""
    try:
        await fault
    except Exception as exc:
        report.problems.append(f"a fault could not run to its end: {type(exc).__name__}: {exc}")


def stack_secrets(state: StateDir) -> dict[str, str | bytes]:
    """The stack's own secrets: client secrets, OpenBao's tokens, unseal key and root token,
    keyring master keys, the anchorer's key; and the personal data and record content every
    patient of the load shares."""
    found: dict[str, str | bytes] = {"a patient's name": "Rivera", "a patient's birth date": "1984-03-02"}
    init = state.openbao_dir / "openbao-init.json"
    if init.exists():
        secrets = json.loads(init.read_text())
        found |= {f"OpenBao's {k}": str(secrets[k]) for k in ("unseal_key", "root_token")}
    found["record content"] = "Systolic blood pressure"
    for path in sorted((state.path / "secrets").rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            try:
                found[f"secret file {path.name}"] = data.decode().strip()
            except UnicodeDecodeError:
                found[f"secret file {path.name}"] = data  # a keyring's master key: raw bytes
    return found


def _secs(value: float | None) -> str:
    return "never (within the wait)" if value is None else f"{value:.1f} s"


async def run_chaos(stack: Stack, pg: localstack.PostgresCluster, args: argparse.Namespace) -> Report:
    info = StackInfo.read(stack.state.path)
    rng = random.Random(args.seed)
    chaos = Chaos(stack, pg, info, rng)
    load = Load(info, patients=8, seed=args.seed)
    admin = Medledger(info.endpoints, principal_id=ADMIN_PRINCIPAL, client_secret=info.admin_secret)
    try:
        say("setting up the load's hospital, staff and patients ...")
        await load.setup()
        auditor = await _auditor(admin, info)
        report = chaos.report

        async def anchored() -> int | None:
            """The anchored tree size; None while anchoring itself is down (it is killed too)."""
            try:
                reply = await admin.anchoring.GetLatestAnchor(anchoring_pb.GetLatestAnchorRequest())
            except RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return 0  # nothing anchored yet
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return None
                raise
            except Unavailable:
                return None  # identity is down (it is killed too), so no token for the call
            return int(reply.anchor.tree_size)

        put_times: list[float] = []
        put_count = 0

        async def watch_puts() -> None:
            nonlocal put_count
            while True:
                if len(load.ledger.puts) > put_count:
                    put_times.append(time.monotonic())
                    put_count = len(load.ledger.puts)
                await asyncio.sleep(0.1)

        d = args.duration
        # Each service killed once at a random moment; PostgreSQL and the chain stopped once each.
        kill_at = sorted(rng.uniform(0.08 * d, 0.85 * d) for _ in SERVICES)
        order = list(SERVICES)
        rng.shuffle(order)
        pg_at = rng.uniform(0.2 * d, 0.5 * d)
        anvil_at = rng.uniform(0.15 * d, max(0.16 * d, d - ANVIL_STOP_SECONDS - 5))
        # OpenBao stopped early and sealed late, never both at once (a stopped server cannot be sealed).
        openbao_stop_at = rng.uniform(0.1 * d, 0.4 * d)
        openbao_seal_at = rng.uniform(max(0.6 * d, openbao_stop_at + OPENBAO_STOP_SECONDS + 5), 0.85 * d)
        say(f"running the load at {args.rate:g} operations/s for {d:g} s, with the faults:")
        chaos.started = time.monotonic()
        watcher = asyncio.create_task(watch_puts())
        faults = [chaos.kill(s, t) for s, t in zip(order, kill_at, strict=True)]
        faults += [chaos.stop_postgres(pg_at, put_times), chaos.stop_anvil(anvil_at, anchored)]
        faults += [chaos.stop_openbao(openbao_stop_at), chaos.seal_openbao(openbao_seal_at)]
        faults = [_reported(f, report) for f in faults]
        ledger, *_ = await asyncio.gather(load.run(args.rate, d, progress=say), *faults)
        say("load stopped; sending the puts that got no answer again, with their request ids ...")
        await load.drain(within=60)
        watcher.cancel()
        report.figures["attempted"] = sum(ledger.attempted.values())
        report.figures["acknowledged"] = sum(ledger.acknowledged.values())
        report.figures["puts acknowledged"] = len(ledger.puts)
        report.figures["puts never acknowledged"] = len(ledger.unacknowledged)
        report.figures["failed operations"] = sum(ledger.failed.values())
        report.figures["failures"] = dict(ledger.failed.most_common(8))
        for service in SERVICES:
            if await chaos.until(lambda service=service: chaos.serving(service), 60) is None:
                report.problems.append(f"{service} does not serve after the faults")
        try:
            await check_invariants(load, ledger, admin, auditor, info, stack, report)
        except RpcError as exc:
            report.problems.append(f"the checks could not finish: {exc}")
        say("scanning logs, every Kafka topic, the chain's calldata and the metrics for leaks ...")
        policy = TrustPolicy.read(stack.state.trust_policy_file)
        secrets: dict[str, str | bytes] = {
            "the control: a principal id": load.doctor_a_id,
            "the control: a log message": "service started",
            "the control: the log's origin": policy.origin,
            "the control: a metric name": "grpc_server_handled_total",
            **load.secrets,
            **stack_secrets(stack.state),
            "an access token": await load.doctor_a.token("records"),
        }
        try:
            leaks = await scan(
                secrets,
                logs=stack.state.logs,
                bootstrap=info.kafka,
                rpc_url=stack.rpc_url,
                metrics_urls=[f"http://{HOST}:{stack.ports.metrics(s)}/metrics" for s in SERVICES],
            )
        except Exception as exc:
            leaks = [f"the scan could not finish: {type(exc).__name__}: {exc}"]
        # Controls: texts each kind of place is meant to hold. A scan that cannot see them
        # could not see a leak either.
        controls = {
            "Kafka topic": "the control: a principal id",
            " in log ": "the control: a log message",
            "chain calldata": "the control: the log's origin",
            "metrics": "the control: a metric name",
        }
        for where, control in controls.items():
            if not any(leak.startswith(control) and where in leak for leak in leaks):
                problems_of_scan = f"the scan did not find {control[13:]} in any {where.strip()}: it sees nothing there"
                report.problems.append(problems_of_scan)
        leaks = [leak for leak in leaks if not leak.startswith("the control: ")]
        report.figures["leak scan"] = f"{len(secrets) - len(controls)} secrets looked for, {len(leaks)} found"
        report.problems += [f"leak: {leak}" for leak in leaks]
        return report
    finally:
        await admin.aclose()
        await load.close()


async def _auditor(admin: Medledger, info: StackInfo) -> Medledger:
    reply = await admin.identity.RegisterPrincipal(
        identity_pb.RegisterPrincipalRequest(
            request_id=str(uuid.uuid4()), kind=vocab.PrincipalKind.PRINCIPAL_KIND_RESEARCHER
        )
    )
    await admin.identity.AssignRole(
        identity_pb.AssignRoleRequest(
            request_id=str(uuid.uuid4()), principal_id=reply.principal.principal_id, role=vocab.Role.ROLE_AUDITOR
        )
    )
    return Medledger(info.endpoints, principal_id=reply.principal.principal_id, client_secret=reply.client_secret)


async def check_invariants(
    load: Load, ledger: Ledger, admin: Medledger, auditor: Medledger, info: StackInfo, stack: Stack, report: Report
) -> None:
    problems = report.problems
    say(
        "waiting for the log to hold every acknowledged put and for anchors to cover it "
        f"(at most {SETTLE_SECONDS:.0f} s)"
    )

    # Settled: every acknowledged put's event is in the log, a signed checkpoint covers those
    # entries, and an anchor on chain covers that checkpoint. (The checks below read records, and
    # each read is a new entry: so coverage is judged here, on the entries the load made.)
    waiting = {p.commitment for p in ledger.puts}
    highest = -1
    covered = 0

    async def settled() -> bool:
        nonlocal highest, covered
        for commitment in list(waiting):
            try:
                found = await auditor.audit.FindCommitment(audit_pb.FindCommitmentRequest(commitment=commitment))
            except RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return False
                raise
            highest = max(highest, int(found.entry.index))
            waiting.discard(commitment)
        latest = await admin.audit.GetLatestCheckpoint(audit_pb.GetLatestCheckpointRequest())
        if latest.tree_size <= highest:
            return False
        anchor = await admin.anchoring.GetLatestAnchor(anchoring_pb.GetLatestAnchorRequest())
        covered = int(anchor.anchor.tree_size)
        report.figures["log entries"] = int(latest.tree_size)
        report.figures["anchored tree size"] = covered
        return covered >= latest.tree_size

    start = time.monotonic()
    while not await _safely(settled):
        if time.monotonic() - start > SETTLE_SECONDS:
            problems.append(f"the pipeline did not settle within {SETTLE_SECONDS:.0f} s")
            break
        await asyncio.sleep(1)
    report.figures["settled after"] = f"{time.monotonic() - start:.0f} s"
    unanchored = max(0, report.figures.get("log entries", 0) - covered)
    missing_in_log = len(waiting)

    # Lost: every acknowledged put reads back, with the commitment of its receipt.
    say(f"reading back {len(ledger.puts):,} acknowledged puts ...")
    lost_reads = 0
    for put in ledger.puts:
        try:
            got = await load.doctor_a.records.GetRecord(
                records_pb.GetRecordRequest(record_id=put.record_id, version=put.version, purpose=TREAT)
            )
            if commitments.record_commitment(got.content, bytes.fromhex(got.receipt.salt)) != put.commitment:
                lost_reads += 1
        except RpcError as exc:
            lost_reads += 1
            problems.append(f"put {put.request_id} ({put.record_id} v{put.version}) unreadable: {exc}")
    # Each put's record.stored entry in the log exactly once.
    say("counting each record's entries in the audit log ...")
    stored: Counter[tuple[str, int]] = Counter()
    for record_id in sorted({p.record_id for p in ledger.puts}):
        async for e in pages(auditor.audit.ListEntries, audit_pb.ListEntriesRequest(record_id=record_id), "entries"):
            entry = json.loads(e.entry)
            if entry["type"] == "record.stored":
                stored[(entry["record_id"], int(entry["version"]))] += 1
    missing_events = [p for p in ledger.puts if stored[(p.record_id, p.version)] == 0]
    doubled_events = [k for k, n in stored.items() if n > 1]
    # Duplicated: no record or version beyond what was acknowledged or attempted.
    say("looking for duplicates: records per patient and versions per record ...")
    acked_versions: dict[str, set[int]] = defaultdict(set)
    for p in ledger.puts:
        acked_versions[p.record_id].add(p.version)
    tried_updates = Counter(u["record_id"] for u in ledger.unacknowledged if u["record_id"])
    tried_new = Counter(u["patient_id"] for u in ledger.unacknowledged if not u["record_id"])
    duplicated = 0
    request_versions: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for p in ledger.puts:
        request_versions[p.request_id].add((p.record_id, p.version))
    duplicated += sum(len(v) - 1 for v in request_versions.values())  # one request, two results
    versions_of = Counter((p.record_id, p.version) for p in ledger.puts)
    duplicated += sum(n - 1 for n in versions_of.values())  # two requests, one version
    for record_id, versions in acked_versions.items():
        got = await load.doctor_a.records.GetRecord(records_pb.GetRecordRequest(record_id=record_id, purpose=TREAT))
        extra = int(got.version) - len(versions) - tried_updates[record_id]
        duplicated += max(0, extra)
    for patient_id, patient in load.patients:
        listed = [r async for r in pages(patient.records.ListRecords,
                                         records_pb.ListRecordsRequest(patient_id=patient_id), "records")]  # fmt: skip
        new_acked = {p.record_id for p in ledger.puts if p.patient_id == patient_id}
        duplicated += max(0, len(listed) - len(new_acked) - tried_new[patient_id])

    lost = lost_reads + max(len(missing_events), missing_in_log) + unanchored
    report.figures["lost"] = lost
    report.figures["duplicated"] = duplicated + len(doubled_events)
    if missing_events:
        problems.append(f"{len(missing_events)} acknowledged puts have no record.stored entry in the log")
    if doubled_events:
        problems.append(f"{len(doubled_events)} record versions are in the log more than once")
    if unanchored:
        problems.append(f"{unanchored} log entries are not covered by an anchor")
    if duplicated:
        problems.append(f"{duplicated} records or versions beyond what was acknowledged or attempted")

    # The audit log verifies from its database, against the keys of the trust policy.
    policy = TrustPolicy.read(stack.state.trust_policy_file)
    keys = [a for k in policy.log_verifier_keys for a in ("--verifier-key", k)]
    database = stack.database_url.replace("{service}", "audit") if stack.database_url else ""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "medledger_sdk.cli", "audit", "verify", "--database-url", database,
         "--origin", policy.origin, *keys],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    said = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr.strip()
    report.figures["audit verify"] = said
    if done.returncode != 0:
        problems.append(f"audit verify failed: {said}")


async def _safely(check: Callable[[], Awaitable[bool]]) -> bool:
    try:
        return await check()
    except RpcError:
        return False


def print_report(report: Report, seconds: float) -> None:
    f = report.figures
    say("\n== chaos: what happened ==")
    say(f"operations attempted      {f.get('attempted', 0):,}")
    say(f"operations acknowledged   {f.get('acknowledged', 0):,}  (failed while a fault lasted: "
        f"{f.get('failed operations', 0):,})")  # fmt: skip
    say(f"puts acknowledged         {f.get('puts acknowledged', 0):,}  (never acknowledged: "
        f"{f.get('puts never acknowledged', 0):,})")  # fmt: skip
    say(f"lost                      {f.get('lost', '?')}")
    say(f"duplicated                {f.get('duplicated', '?')}")
    say(f"audit log                 {f.get('log entries', 0):,} entries, anchored up to "
        f"{f.get('anchored tree size', 0):,}; settled {f.get('settled after', '?')} after the load")  # fmt: skip
    say(f"audit verify              {f.get('audit verify', '?')}")
    say(f"leak scan                 {f.get('leak scan', '?')}")
    say("time to recover:")
    for fault in report.faults:
        say(f"  {fault.what:<32} at {fault.at:5.1f} s  recovered {_secs(fault.recovered_after)} after it ended")
    if f.get("failures"):
        say("operations that failed during faults (expected; none of them was acknowledged):")
        for what, n in f["failures"].items():
            say(f"  {n:>5}  {what}")
    say(f"took {seconds:.0f} s")
    if report.problems:
        say("\nFAILED:")
        for p in report.problems:
            say(f"  - {p}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (at least 60; default 60)")
    parser.add_argument("--rate", type=float, default=12.0, help="operations per second (default 12)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for the fault times and the mix")
    args = parser.parse_args()
    if args.duration < ANVIL_STOP_SECONDS + 10:
        parser.error(f"--duration must leave room for the {ANVIL_STOP_SECONDS:.0f} s chain stop")
    args.seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    started = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="medledger-chaos-"))
    say(f"chaos: seed {args.seed}; everything in {folder}")
    pg = localstack.PostgresCluster(folder / "pg", localstack.free_port())
    pg.init()
    pg.start()
    say(f"PostgreSQL cluster of its own on port {pg.port}")
    prefix = f"chaos_{uuid.uuid4().hex[:6]}_"
    for service in SERVICES:
        pg.create_database(prefix + service)
    from medledger_devstack.cli.demo import free_ports

    state = StateDir.at(folder / "state")
    state.create()
    stack = Stack(state, free_ports(), database_url=pg.url(prefix + "{service}"))
    report: Report | None = None
    try:
        with stack.handling_signals():
            stack.start(120)
        report = asyncio.run(run_chaos(stack, pg, args))
    finally:
        say("stopping the stack and PostgreSQL ...")
        if stack.anvil is not None and stack.anvil.alive():
            stack.anvil.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        stack.stop_all()
        pg.stop()
    if report is None:
        say(f"the logs are kept in {stack.state.logs}")
        return 1
    print_report(report, time.monotonic() - started)
    if report.problems:
        say(f"the logs are kept in {stack.state.logs}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    invariants = {
        "nothing lost": report.figures.get("lost") == 0,
        "nothing duplicated": report.figures.get("duplicated") == 0,
        "no other problem": not report.problems,
    }
    ok = all(invariants.values())
    say("chaos: every invariant holds" if ok else "chaos: invariants FAILED: " + ", ".join(
        name for name, held in invariants.items() if not held))  # fmt: skip
    passed = sum(invariants.values())
    say(f"chaos: {passed} passed, {len(invariants) - passed} failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
