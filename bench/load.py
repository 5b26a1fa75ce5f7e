"""Load generator: a steady mix of what the platform does, through the SDK, against a running
stack (`medledger up`), at a given rate for a given time. (One script, though long: the mix is one
list of operations, each a short coroutine, and the ledger that chaos reads back.)

    uv run python bench/load.py --rate 20 --duration 60 [--state-dir .medledger] [--ledger FILE]

The mix, so that dashboards have something to show on every panel: puts (new records and new
versions), gets that consent permits, gets that it denies (a researcher), consent grants and
revocations, break-glass reads with their review, anchored proofs of earlier records, and now and
then a poison message on the records topic (identity's consumer sends it to the dead-letter topic,
the audit log keeps it as an `unprocessable` entry). Anchoring runs by itself on the log's growth.

Every acknowledged write goes into a ledger (request id, record id, version, commitment) that the
chaos suite checks against the stack afterwards. A put that fails with UNAVAILABLE or
DEADLINE_EXCEEDED after the SDK's own retries is not dropped: it is queued and sent again later
with the same request id, so a write the server made before the failure is answered with its
first result and never made twice.

Progress every 5 seconds; a summary per operation at the end. Exit 1 if an operation failed in a
way the mix does not expect (an expected denial is not a failure).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiokafka import AIOKafkaProducer
from medledger.anchoring.v1 import anchoring_service_pb2 as anchoring_pb
from medledger.consent.v1 import consent_service_pb2 as consent_pb
from medledger.identity.v1 import identity_service_pb2 as identity_pb
from medledger.records.v1 import records_service_pb2 as records_pb
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_devstack.cli.state import ADMIN_PRINCIPAL, StateDir
from medledger_devstack.demo.fhir import blood_pressure, patient_resource, practitioner_resource
from medledger_devstack.demo.waiting import until_known
from medledger_runtime.events import TOPICS
from medledger_sdk.calls import RpcError
from medledger_sdk.client import Endpoints, Medledger

Kind = vocab.PrincipalKind
OBSERVATIONS = vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS
TREAT, ETREAT, HRESCH = (
    vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT,
    vocab.PurposeOfUse.PURPOSE_OF_USE_ETREAT,
    vocab.PurposeOfUse.PURPOSE_OF_USE_HRESCH,
)
READ, WRITE = vocab.Action.ACTION_READ, vocab.Action.ACTION_WRITE
TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

JUSTIFICATION = "Load test: an emergency read of the patient's vital signs."

# Relative weights of the operations in the mix.
MIX = {
    "put": 40,
    "get": 28,
    "denied get": 10,
    "consent change": 8,
    "anchored proof": 8,
    "break-glass": 4,
    "poison message": 2,
}


@dataclass(frozen=True)
class StackInfo:
    """Where a running `medledger up` answers, and its admin credential."""

    endpoints: Endpoints
    kafka: str
    admin_secret: str

    @classmethod
    def read(cls, state_dir: str | Path) -> StackInfo:
        state = StateDir.at(state_dir)
        try:
            stack = json.loads(state.endpoints_file.read_text())
            secret = (state.path / "secrets" / "admin.secret").read_text().strip()
        except FileNotFoundError as exc:
            raise SystemExit(f"no running `medledger up` in {state.path}: {exc.filename} is missing") from None
        return cls(Endpoints(**stack["grpc"]), stack["kafka_bootstrap_servers"], secret)


@dataclass
class AcknowledgedPut:
    request_id: str
    patient_id: str
    record_id: str
    version: int
    commitment: str
    # The first attempt's time, and how many times it was sent before it was acknowledged.
    first_sent: float
    sends: int


@dataclass
class Ledger:
    """What was attempted and what the platform acknowledged."""

    attempted: Counter[str] = field(default_factory=Counter)
    acknowledged: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)  # "<op>: <status>"
    puts: list[AcknowledgedPut] = field(default_factory=list)
    # Puts that ended without an acknowledgement (refused, or still unanswered at the end): the
    # platform may or may not have made them, so a check of duplicates allows for them.
    unacknowledged: list[dict[str, str]] = field(default_factory=list)
    pending_puts: int = 0
    poison_sent: int = 0
    latencies: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "attempted": dict(self.attempted),
            "acknowledged": dict(self.acknowledged),
            "failed": dict(self.failed),
            "puts": [asdict(p) for p in self.puts],
            "unacknowledged": self.unacknowledged,
            "pending_puts": self.pending_puts,
            "poison_sent": self.poison_sent,
        }


@dataclass
class _Put:
    request: records_pb.PutRecordRequest
    first_sent: float
    sends: int = 0


class Load:
    def __init__(self, info: StackInfo, *, patients: int = 8, seed: int | None = None) -> None:
        self.info = info
        self.patients_wanted = patients
        self.rng = random.Random(seed)
        self.ledger = Ledger()
        self._clients: list[Medledger] = []
        self._retry: list[_Put] = []
        self._records: list[tuple[str, str]] = []  # (patient id, record id) acknowledged
        self._second_grants: dict[str, str] = {}  # patient id -> active consent id for doctor B
        self._producer: AIOKafkaProducer | None = None
        # What must never leave the encrypted stores, for the leak scan: name -> text.
        self.secrets: dict[str, str] = {"break-glass justification": JUSTIFICATION}

    def client(self, principal_id: str | None = None, secret: str | None = None) -> Medledger:
        ml = Medledger(self.info.endpoints, principal_id=principal_id, client_secret=secret)
        self._clients.append(ml)
        return ml

    async def close(self) -> None:
        for ml in self._clients:
            await ml.aclose()
        if self._producer is not None:
            await self._producer.stop()

    # --- set-up -------------------------------------------------------------------------------

    async def setup(self) -> None:
        """A hospital with two doctors, an emergency team, a privacy officer, a researcher, and
        patients who each grant the first doctor read and write of Observations for TREAT."""
        admin = self.client(ADMIN_PRINCIPAL, self.info.admin_secret)

        async def register(kind: vocab.PrincipalKind.ValueType, **fields: Any) -> tuple[str, Medledger]:
            reply = await admin.identity.RegisterPrincipal(
                identity_pb.RegisterPrincipalRequest(request_id=str(uuid.uuid4()), kind=kind, **fields)
            )
            self.secrets[f"client secret of {reply.principal.principal_id}"] = reply.client_secret
            return reply.principal.principal_id, self.client(reply.principal.principal_id, reply.client_secret)

        self.hospital_id, _ = await register(Kind.PRINCIPAL_KIND_ORGANIZATION)

        async def practitioner(name: str) -> tuple[str, Medledger]:
            return await register(
                Kind.PRINCIPAL_KIND_PRACTITIONER,
                organization_id=self.hospital_id,
                fhir_resource=practitioner_resource(name, "Load"),
            )

        self.doctor_a_id, self.doctor_a = await practitioner("A")
        self.doctor_b_id, self.doctor_b = await practitioner("B")
        self.emergency = [await practitioner(f"E{i}") for i in range(3)]
        self.officer_id, self.officer = await practitioner("Officer")
        await admin.identity.AssignRole(
            identity_pb.AssignRoleRequest(
                request_id=str(uuid.uuid4()), principal_id=self.officer_id, role=vocab.Role.ROLE_PRIVACY_OFFICER
            )
        )
        self.researcher_id, self.researcher = await register(Kind.PRINCIPAL_KIND_RESEARCHER)
        await until_known(
            lambda: admin.consent.SetBreakGlassPolicy(
                consent_pb.SetBreakGlassPolicyRequest(
                    request_id=str(uuid.uuid4()),
                    policy=consent_pb.BreakGlassPolicy(organization_id=self.hospital_id, enabled=True, max_uses=10_000),
                )
            )
        )
        anonymous = self.client()
        self.patients: list[tuple[str, Medledger]] = []
        for _ in range(self.patients_wanted):
            resource = patient_resource()
            reply = await anonymous.identity.RegisterPatient(
                identity_pb.RegisterPatientRequest(request_id=str(uuid.uuid4()), fhir_patient=resource)
            )
            pid = reply.principal.principal_id
            fhir = json.loads(resource)
            self.secrets[f"identifier of {pid}"] = fhir["identifier"][0]["value"]
            self.secrets[f"client secret of {pid}"] = reply.client_secret
            patient = self.client(pid, reply.client_secret)
            self.patients.append((pid, patient))
            grant = self._grant(pid, self.doctor_a_id)
            await until_known(functools.partial(patient.consent.GrantConsent, grant))

    def _grant(self, patient_id: str, grantee_id: str) -> consent_pb.GrantConsentRequest:
        return consent_pb.GrantConsentRequest(
            request_id=str(uuid.uuid4()),
            patient_id=patient_id,
            grantee_id=grantee_id,
            provision=consent_pb.ProvisionType.PROVISION_TYPE_PERMIT,
            actions=[READ, WRITE],
            categories=[OBSERVATIONS],
            purposes=[TREAT],
        )

    # --- operations ---------------------------------------------------------------------------

    async def op_put(self) -> None:
        patient_id, _ = self.rng.choice(self.patients)
        mine = [r for p, r in self._records if p == patient_id]
        update = mine and self.rng.random() < 0.3
        request = records_pb.PutRecordRequest(
            request_id=str(uuid.uuid4()),
            patient_id=patient_id,
            category=OBSERVATIONS,
            content=blood_pressure(patient_id),
            media_type="application/fhir+json",
            record_id=self.rng.choice(mine) if update else "",
        )
        await self._send_put(_Put(request, time.time()))

    async def _send_put(self, put: _Put) -> None:
        put.sends += 1
        try:
            reply = await self.doctor_a.records.PutRecord(put.request)
        except RpcError as exc:
            if exc.code() in TRANSIENT:
                self._retry.append(put)  # the same request, so the same request_id, later
            else:
                self._unacknowledged(put)
            raise
        except Exception:
            self._unacknowledged(put)
            raise
        r = reply.receipt
        if len(self.ledger.puts) < 20:
            self.secrets[f"salt of {r.record_id} v{r.version}"] = r.salt
        self.ledger.puts.append(
            AcknowledgedPut(put.request.request_id, put.request.patient_id, r.record_id, r.version, r.commitment,
                            put.first_sent, put.sends)
        )  # fmt: skip
        if not put.request.record_id:
            self._records.append((put.request.patient_id, r.record_id))

    def _unacknowledged(self, put: _Put) -> None:
        r = put.request
        self.ledger.unacknowledged.append(
            {"request_id": r.request_id, "patient_id": r.patient_id, "record_id": r.record_id}
        )

    async def op_get(self) -> None:
        if not self._records:
            return await self.op_put()
        _, record_id = self.rng.choice(self._records)
        await self.doctor_a.records.GetRecord(records_pb.GetRecordRequest(record_id=record_id, purpose=TREAT))

    async def op_denied_get(self) -> None:
        if not self._records:
            return await self.op_put()
        _, record_id = self.rng.choice(self._records)
        try:
            await self.researcher.records.GetRecord(records_pb.GetRecordRequest(record_id=record_id, purpose=HRESCH))
        except RpcError as exc:
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                return  # what the mix expects
            raise
        raise AssertionError("the researcher was allowed to read")

    async def op_consent_change(self) -> None:
        """Grant doctor B, or revoke that grant: doctor A's consents stay as they are."""
        patient_id, patient = self.rng.choice(self.patients)
        consent_id = self._second_grants.pop(patient_id, None)
        if consent_id is None:
            granted = await patient.consent.GrantConsent(self._grant(patient_id, self.doctor_b_id))
            self._second_grants[patient_id] = granted.consent.consent_id
        else:
            await patient.consent.RevokeConsent(
                consent_pb.RevokeConsentRequest(request_id=str(uuid.uuid4()), consent_id=consent_id)
            )

    async def op_break_glass(self) -> None:
        if not self._records:
            return await self.op_put()
        patient_id, record_id = self.rng.choice(self._records)
        _, emergency = self.rng.choice(self.emergency)
        access = await emergency.consent.BreakGlass(
            consent_pb.BreakGlassRequest(
                request_id=str(uuid.uuid4()),
                patient_id=patient_id,
                reason=consent_pb.BreakGlassReason.BREAK_GLASS_REASON_LIFE_THREATENING,
                justification=JUSTIFICATION,
            )
        )
        await emergency.records.GetRecord(records_pb.GetRecordRequest(record_id=record_id, purpose=ETREAT))
        await self.officer.consent.ReviewBreakGlassAccess(
            consent_pb.ReviewBreakGlassAccessRequest(
                request_id=str(uuid.uuid4()),
                access_id=access.access.access_id,
                review=consent_pb.BreakGlassReview.BREAK_GLASS_REVIEW_JUSTIFIED,
            )
        )

    async def op_anchored_proof(self) -> None:
        """The proof of a record stored a while ago: anchored by now, or FAILED_PRECONDITION."""
        old = [p for p in self.ledger.puts if time.time() - p.first_sent > 30]
        if not old:
            return await self.op_get()
        put = self.rng.choice(old)
        try:
            await self.doctor_a.anchoring.GetAnchoredProof(
                anchoring_pb.GetAnchoredProofRequest(commitment=put.commitment)
            )
        except RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:  # not anchored yet
                raise

    async def op_poison_message(self) -> None:
        """Bytes that are no event envelope, on the records topic."""
        if self._producer is None:
            self._producer = AIOKafkaProducer(bootstrap_servers=self.info.kafka, acks="all")
            await self._producer.start()
        await self._producer.send_and_wait(TOPICS["records"], b"\xff load-generator poison \x00" + uuid.uuid4().bytes)
        self.ledger.poison_sent += 1

    # --- running ------------------------------------------------------------------------------

    async def _do(self, name: str, op: Callable[[], Awaitable[None]]) -> None:
        self.ledger.attempted[name] += 1
        started = time.monotonic()
        try:
            await op()
        except RpcError as exc:
            self.ledger.failed[f"{name}: {exc.code().name}"] += 1
            return
        except Exception as exc:  # a bug of the mix or an unexpected answer: counted, shown, not hidden
            self.ledger.failed[f"{name}: {type(exc).__name__}: {exc}"] += 1
            return
        self.ledger.acknowledged[name] += 1
        self.ledger.latencies.setdefault(name, []).append(time.monotonic() - started)

    async def run(
        self, rate: float, duration: float, *, in_flight: int = 32, progress: Callable[[str], None] = print
    ) -> Ledger:
        ops: dict[str, Callable[[], Awaitable[None]]] = {
            "put": self.op_put,
            "get": self.op_get,
            "denied get": self.op_denied_get,
            "consent change": self.op_consent_change,
            "anchored proof": self.op_anchored_proof,
            "break-glass": self.op_break_glass,
            "poison message": self.op_poison_message,
        }
        names, weights = list(MIX), list(MIX.values())
        slots = asyncio.Semaphore(in_flight)
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        next_report = start + 5
        sent = 0

        async def one(name: str, op: Callable[[], Awaitable[None]]) -> None:
            try:
                await self._do(name, op)
            finally:
                slots.release()

        while (now := time.monotonic()) < start + duration:
            due = int((now - start) * rate) + 1
            while sent < due:
                await slots.acquire()  # at most `in_flight` at once: under overload the rate drops
                if self._retry and self.rng.random() < 0.5:
                    put = self._retry.pop(0)
                    task = asyncio.create_task(one("put (resent)", functools.partial(self._send_put, put)))
                else:
                    name = self.rng.choices(names, weights)[0]
                    task = asyncio.create_task(one(name, ops[name]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            if now >= next_report:
                progress(self._progress(now - start))
                next_report += 5
            await asyncio.sleep(min(0.05, 1 / rate))
        await asyncio.gather(*tasks)
        return self.ledger

    async def drain(self, within: float = 60.0) -> None:
        """Send the puts that never got an answer again (same request ids) until acknowledged."""
        deadline = time.monotonic() + within
        while self._retry and time.monotonic() < deadline:
            put = self._retry.pop(0)
            await self._do("put (resent)", functools.partial(self._send_put, put))
            if self._retry:
                await asyncio.sleep(0.5)
        self.ledger.pending_puts = len(self._retry)
        for put in self._retry:
            self._unacknowledged(put)

    def _progress(self, elapsed: float) -> str:
        attempted = sum(self.ledger.attempted.values())
        ok = sum(self.ledger.acknowledged.values())
        failed = sum(self.ledger.failed.values())
        return (
            f"  {elapsed:5.0f} s: {attempted:,} operations, {ok:,} acknowledged, {failed:,} failed, "
            f"{len(self.ledger.puts):,} records written, {len(self._retry)} puts waiting to be resent"
        )


def summary(ledger: Ledger, seconds: float) -> str:
    lines = [f"{'operation':<16}{'attempted':>10}{'acknowledged':>14}{'p50 ms':>9}{'p99 ms':>9}"]
    for name in sorted(ledger.attempted, key=lambda n: -ledger.attempted[n]):
        lat = sorted(ledger.latencies.get(name, []))
        p50 = f"{lat[len(lat) // 2] * 1000:.0f}" if lat else "-"
        p99 = f"{lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000:.0f}" if lat else "-"
        lines.append(f"{name:<16}{ledger.attempted[name]:>10,}{ledger.acknowledged[name]:>14,}{p50:>9}{p99:>9}")
    total = sum(ledger.attempted.values())
    lines.append(f"{total:,} operations in {seconds:.0f} s ({total / max(seconds, 1e-9):.1f}/s); "
                 f"{len(ledger.puts):,} acknowledged puts, {ledger.poison_sent} poison messages")  # fmt: skip
    if ledger.failed:
        lines.append("failures:")
        lines += [f"  {count:>6,}  {what}" for what, count in ledger.failed.most_common()]
    if ledger.pending_puts:
        lines.append(f"{ledger.pending_puts} puts were never acknowledged (not lost: never acknowledged)")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    info = StackInfo.read(args.state_dir)
    load = Load(info, patients=args.patients, seed=args.seed)
    print(f"setting up a hospital, its staff and {args.patients} patients on {info.endpoints.identity} ...")
    try:
        await load.setup()
        print(f"running {args.rate:g} operations/s for {args.duration:g} s ...")
        started = time.monotonic()
        ledger = await load.run(args.rate, args.duration, in_flight=args.in_flight)
        await load.drain()
        elapsed = time.monotonic() - started
    finally:
        await load.close()
    print(summary(ledger, elapsed))
    if args.ledger:
        await asyncio.to_thread(Path(args.ledger).write_text, json.dumps(ledger.to_json(), indent=1))
        print(f"ledger written to {args.ledger}")
    return 1 if ledger.failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="operations per second (default 20)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--patients", type=int, default=8, help="patients to spread the load over (default 8)")
    parser.add_argument("--in-flight", type=int, default=32, help="most operations at once (default 32)")
    parser.add_argument("--state-dir", default=".medledger", help="the running `medledger up`'s state folder")
    parser.add_argument("--ledger", help="write the acknowledged writes here (JSON)")
    parser.add_argument("--seed", type=int, help="random seed, for a repeatable mix")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
