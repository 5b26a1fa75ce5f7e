"""The dashboards and rules against real data: the local stack (`medledger up`'s Stack, in this
process, on free ports, SQLite) under the load generator (bench/load.py), scraped every second by
a real Prometheus (the Debian package's `prometheus`) that also evaluates deploy/prometheus/rules.yml.

Then every query of every dashboard panel is asked of Prometheus's HTTP API as Grafana would ask
it (the `$namespace` variable resolved by its own `label_values` query, `$__rate_interval` as 1m):
each must parse, and each must return at least one series (ALLOWED_EMPTY lists the exceptions
with their reason: fault counters are created at zero, so faults show as 0, where their labels
can be known ahead). What 30 s of the load's mix
does not do is done after it (`beyond_the_mix`): a refusal by each service, a break-glass refused
by policy, calls to anchoring, a poison message on the topic every service consumes, and OpenBao
sealed while a patient registers. Every rule expression must parse and every rule group evaluate
without error; exactly the alerts the run causes on purpose fire (poison messages, break-glass),
and the key manager's alert is pending (its `for` is longer than the run).

About 70 s; fails (never skips) when prometheus is not installed.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from deploylib import CHART, COMPONENTS, DEPLOY, ROOT, SERVICES, tool
from medledger.anchoring.v1 import anchoring_service_pb2 as anchoring_pb
from medledger.audit.v1 import audit_service_pb2 as audit_pb
from medledger.consent.v1 import consent_service_pb2 as consent_pb
from medledger.identity.v1 import identity_service_pb2 as identity_pb
from medledger.identity.v1.identity_service_pb2_grpc import IdentityServiceStub
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_devstack import localstack
from medledger_devstack.cli.demo import free_ports
from medledger_devstack.cli.state import ADMIN_PRINCIPAL, StateDir
from medledger_devstack.demo.fhir import patient_resource, practitioner_resource
from medledger_devstack.stack.supervisor import Stack
from medledger_runtime.events import TOPICS
from medledger_sdk.calls import RpcError

sys.path.insert(0, str(ROOT / "bench"))
from load import Load, StackInfo  # bench/load.py, the load generator

Kind = vocab.PrincipalKind
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
# What a ServiceMonitor's targets carry besides `job`; the dashboards select on it.
NAMESPACE = "medledger"
RATE_INTERVAL = "1m"
LOAD_SECONDS = 30.0
LOAD_RATE = 8.0

# (dashboard, panel title, index of the query) -> why a short run of a healthy stack returns
# nothing there. None: fault panels show zeros on a healthy stack, since every fault code's counter, every
# refusal and every kind of chain error is created at zero.
ALLOWED_EMPTY: dict[tuple[str, str, int], str] = {
    ("overview", "Operations given up after their attempts (1h)", 0): (
        "nothing in the run fails every attempt of an operation: its faults are outages, waited out "
        "(OpenBao sealed), or malformed envelopes, dead-lettered at once without retries; the counter's "
        "labels (operation, error) cannot be created at zero ahead of time"
    ),
}
# Alerts the run causes on purpose, and why; no other alert may fire.
EXPECTED_FIRING = {
    "MedledgerDeadLetters": "the load's poison messages are dead-lettered",
    "MedledgerAuditUnprocessable": "the audit log keeps the poison messages as unprocessable entries",
    "MedledgerBreakGlassUsed": "the load breaks the glass",
}
# Alerts that must be pending (their `for` is longer than the run, so never firing), and why.
EXPECTED_PENDING = {
    "MedledgerKeyManagerErrors": "the run seals OpenBao and registers patients meanwhile (for: 5m)",
}
# Alerts that may be pending (never firing: their `for` is longer than the run), and why.
_SHARED_MACHINE = (
    "the stack, Prometheus and the load share a small test machine: the p99 of identity's and consent's "
    "writes comes near their 250 ms objective"
)
_SEALED = "identity answers UNAVAILABLE while the run keeps OpenBao sealed, and those answers are errors"
MAY_BE_PENDING = {
    "MedledgerAuditVerifyStale": "audit verifies itself first 5 min after it starts; until then the gauge is 0",
    "MedledgerAvailabilityBudgetBurn": _SEALED,
    "MedledgerAvailabilityBudgetBurnSlow": _SEALED,
    "MedledgerErrorRatioHigh": _SEALED,
    "MedledgerLatencyBudgetBurn": _SHARED_MACHINE,
    "MedledgerLatencyBudgetBurnSlow": _SHARED_MACHINE,
}


# --- Prometheus -----------------------------------------------------------------------------


class Prometheus:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> dict[str, Any]:
        """The API's answer, also for a 4xx (whose body says what was wrong)."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 (http, our own address)
                return dict(json.load(reply))
        except urllib.error.HTTPError as exc:
            if exc.code in (400, 422):
                return dict(json.load(exc))
            raise

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:  # noqa: S310
                return bool(reply.status == 200)
        except OSError:
            return False


def prometheus_config(stack: Stack) -> dict[str, Any]:
    """One scrape job per service and for the FHIR gateway, named as it (what the rules expect of `job`)."""
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": service,
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{stack.ports.metrics(service)}"],
                        "labels": {"namespace": NAMESPACE},
                    }
                ],
            }
            for service in COMPONENTS
        ],
    }


# --- the dashboards' queries as Grafana sends them -----------------------------------------


def panel_queries() -> list[tuple[str, str, int, str]]:
    """(dashboard, panel title, index of the query in the panel, expr) of every query."""
    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for i, target in enumerate(panel.get("targets", [])):
                out.append((path.stem, panel["title"], i, target["expr"]))
    return out


def namespace_value(prom: Prometheus) -> str:
    """What Grafana puts for `$namespace` with "All" selected: its query's values as a regex.
    The variable's query is `label_values(<selector>, namespace)`, the same in every dashboard."""
    queries = {
        v["query"]["query"]
        for path in DASHBOARDS
        for v in json.loads(path.read_text())["templating"]["list"]
        if v["name"] == "namespace"
    }
    assert len(queries) == 1, queries
    match = re.fullmatch(r"label_values\((.*), *namespace\)", queries.pop())
    assert match, "the namespace variable is not a label_values query"
    answer = prom.get("/api/v1/label/namespace/values", **{"match[]": match.group(1)})
    values = answer["data"]
    assert values == [NAMESPACE], f"the namespace variable's query found {values}"
    return "(" + "|".join(re.escape(v) for v in values) + ")"


def concrete(expr: str, namespace: str) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("${namespace}", namespace)
    expr = expr.replace("$namespace", namespace)
    assert "$" not in expr, f"a template variable the test does not know: {expr}"
    return expr


# --- the run ---------------------------------------------------------------------------------


async def run_load(stack: Stack) -> dict[str, Any]:
    load = Load(StackInfo.read(stack.state.path), patients=4, seed=7)
    try:
        await load.setup()
        ledger = await load.run(LOAD_RATE, LOAD_SECONDS, progress=lambda line: print(line, flush=True))
        await beyond_the_mix(load)
        await through_the_fhir_gateway(stack, load)
        await with_the_key_manager_sealed(stack, load)
    finally:
        await load.close()
    return {"attempted": dict(ledger.attempted), "failed": dict(ledger.failed), "poison": ledger.poison_sent}


async def with_the_key_manager_sealed(stack: Stack, load: Load) -> None:
    """OpenBao sealed for a moment: registering a patient (identity encrypts the resource) is
    UNAVAILABLE, which identity counts in medledger_key_manager_errors_total; then unsealed."""
    assert stack.openbao is not None, "the stack keeps its keys in OpenBao"
    await asyncio.to_thread(stack.openbao.seal)
    try:
        anonymous = load.client()  # the SDK retries UNAVAILABLE a few times before it gives up
        request = identity_pb.RegisterPatientRequest(request_id=str(uuid.uuid4()), fhir_patient=patient_resource())
        await refused(lambda: anonymous.identity.RegisterPatient(request), grpc.StatusCode.UNAVAILABLE)
    finally:
        await asyncio.to_thread(stack.openbao.unseal)


async def refused(call: Callable[[], Awaitable[Any]], code: grpc.StatusCode, words: str = "") -> None:
    """`call()` is refused with `code` (and `words` in its details), retried for a few seconds
    while it is not: consent learns new principals from identity's events a moment later."""
    deadline = time.monotonic() + 15
    while True:
        try:
            await call()
        except RpcError as exc:
            if exc.code() == code and words in (exc.details() or ""):
                return
            if time.monotonic() > deadline:
                raise
        else:
            raise AssertionError(f"not refused: {call}")
        await asyncio.sleep(0.2)


async def beyond_the_mix(load: Load) -> None:
    """What a 30 s run of the mix does not do, so that those panels show real data too: a
    refusal by each service, a break-glass request refused by policy, calls to anchoring (the
    mix's anchored proofs wait for records 30 s old), and a poison message on identity's topic,
    which every service consumes (the mix's go to the records topic, read by identity and audit
    only)."""
    info = load.info
    admin = load.client(ADMIN_PRINCIPAL, info.admin_secret)
    # identity: a token asked with a wrong secret.
    async with grpc.aio.insecure_channel(info.endpoints.identity) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as wrong_secret:
            await IdentityServiceStub(channel).IssueToken(
                identity_pb.IssueTokenRequest(
                    principal_id=load.doctor_a_id, client_secret="mlsec_wrong", audience="medledger.records"
                )
            )
        assert wrong_secret.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # consent: a practitioner of an organization that has not enabled break-glass.
    org = await admin.identity.RegisterPrincipal(
        identity_pb.RegisterPrincipalRequest(request_id=str(uuid.uuid4()), kind=Kind.PRINCIPAL_KIND_ORGANIZATION)
    )
    nurse = await admin.identity.RegisterPrincipal(
        identity_pb.RegisterPrincipalRequest(
            request_id=str(uuid.uuid4()),
            kind=Kind.PRINCIPAL_KIND_PRACTITIONER,
            organization_id=org.principal.principal_id,
            fhir_resource=practitioner_resource("Nurse", "Live"),
        )
    )
    outsider = load.client(nurse.principal.principal_id, nurse.client_secret)
    patient_id = load.patients[0][0]
    await refused(
        lambda: outsider.consent.BreakGlass(
            consent_pb.BreakGlassRequest(
                request_id=str(uuid.uuid4()),
                patient_id=patient_id,
                reason=consent_pb.BreakGlassReason.BREAK_GLASS_REASON_LIFE_THREATENING,
                justification="Live observability test: refused, the organization has no policy.",
            )
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "not enabled break-glass",
    )
    # audit: a practitioner without the auditor role lists the log.
    denied = grpc.StatusCode.PERMISSION_DENIED
    await refused(lambda: load.doctor_a.audit.ListEntries(audit_pb.ListEntriesRequest()), denied)
    # anchoring: the latest anchor, and the proof of a commitment no record has.
    try:
        await load.doctor_a.anchoring.GetLatestAnchor(anchoring_pb.GetLatestAnchorRequest())
    except RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:  # nothing anchored yet: the panels will say so
            raise
    await refused(
        lambda: load.doctor_a.anchoring.GetAnchoredProof(anchoring_pb.GetAnchoredProofRequest(commitment="ab" * 32)),
        grpc.StatusCode.NOT_FOUND,
    )
    producer = AIOKafkaProducer(bootstrap_servers=info.kafka, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(TOPICS["identity"], b"\xff live observability poison \x00" + uuid.uuid4().bytes)
    finally:
        await producer.stop()


async def through_the_fhir_gateway(stack: Stack, load: Load) -> None:
    """FHIR requests, so that the gateway's panels show real data: its CapabilityStatement (a
    GET answered 200), and a type it does not serve (refused 404, an OperationOutcome). Its
    fault counters (500, 503) are created at zero for every route."""
    base = stack.ports.fhir_base_url
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(f"{base}/metadata") as reply:
                assert reply.status == 200, await reply.text()
        async with session.get(f"{base}/NoSuchType/{load.patients[0][0]}") as reply:
            assert reply.status == 404, await reply.text()
            assert (await reply.json(content_type=None))["resourceType"] == "OperationOutcome"


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Prometheus, dict[str, Any]]]:
    prometheus_bin = tool("prometheus", "Debian package prometheus (apt-get install prometheus)")
    folder = tmp_path_factory.mktemp("live")
    state = StateDir.at(folder / "state")
    state.create()
    stack = Stack(state, free_ports())
    proc: subprocess.Popen[bytes] | None = None
    log = (folder / "prometheus.log").open("wb")
    try:
        with stack.handling_signals():
            stack.start(120)
        config = folder / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(stack)))
        port = localstack.free_port()
        proc = subprocess.Popen(
            [
                prometheus_bin,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        prom = Prometheus(port)
        deadline = time.monotonic() + 30
        while not prom.ready():
            assert proc.poll() is None, f"prometheus exited: {(folder / 'prometheus.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "prometheus did not become ready in 30 s"
            time.sleep(0.2)
        summary = asyncio.run(run_load(stack))
        time.sleep(3)  # the last scrapes and a rule evaluation after the load
        yield prom, summary
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        stack.stop_all()


def test_every_target_is_scraped(observed: tuple[Prometheus, dict[str, Any]]) -> None:
    prom, _ = observed
    targets = prom.get("/api/v1/targets")["data"]["activeTargets"]
    health = {t["labels"]["job"]: (t["health"], t["lastError"]) for t in targets}
    assert health == {s: ("up", "") for s in COMPONENTS}


def test_every_dashboard_query_parses_and_returns_data(observed: tuple[Prometheus, dict[str, Any]]) -> None:
    prom, summary = observed
    assert not summary["failed"], f"the load failed: {summary}"
    namespace = namespace_value(prom)
    errors, empty, wrongly_allowed = [], [], []
    for board, title, index, expr in panel_queries():
        answer = prom.query(concrete(expr, namespace))
        where = f"{board} / {title} [{index}]"
        if answer["status"] != "success":
            errors.append(f"{where}: {answer.get('errorType')}: {answer.get('error')}")
        elif answer["data"]["result"] and (board, title, index) in ALLOWED_EMPTY:
            wrongly_allowed.append(f"{where}: has data, allowed empty because {ALLOWED_EMPTY[board, title, index]}")
        elif not answer["data"]["result"] and (board, title, index) not in ALLOWED_EMPTY:
            empty.append(f"{where}: {expr}")
    assert not errors, "queries Prometheus refused:\n" + "\n".join(errors)
    assert not empty, f"{len(empty)} queries returned no series:\n" + "\n".join(empty)
    assert not wrongly_allowed, "\n".join(wrongly_allowed)
    known = {(board, title, index) for board, title, index, _ in panel_queries()}
    assert set(ALLOWED_EMPTY) <= known, f"allowances for queries no dashboard has: {set(ALLOWED_EMPTY) - known}"


def test_every_rule_parses_and_evaluates(observed: tuple[Prometheus, dict[str, Any]]) -> None:
    prom, _ = observed
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            answer = prom.query(rule["expr"])
            name = rule.get("alert") or rule.get("record")
            assert answer["status"] == "success", f"{name}: {answer.get('errorType')}: {answer.get('error')}"
    loaded = prom.get("/api/v1/rules")["data"]["groups"]
    assert sorted(g["name"] for g in loaded) == sorted(g["name"] for g in groups)
    for group in loaded:
        assert len(group["rules"]) == len(next(g for g in groups if g["name"] == group["name"])["rules"])
        for rule in group["rules"]:
            assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
    # The recording rules Prometheus evaluated have a series per service that answered RPCs
    # (the gateway's gRPC port answers health checks only: it may have none).
    for record in ("job:grpc_server_error_ratio:rate5m", "job:grpc_server_slow_ratio:rate5m"):
        jobs = {r["metric"]["job"] for r in prom.query(record)["data"]["result"]}
        assert set(SERVICES) <= jobs <= set(COMPONENTS), f"{record}: {sorted(jobs)}"
    # The HTTP SLI: the gateway's, beside identity's JWKS and audit's tiles when they were asked.
    jobs = {r["metric"]["job"] for r in prom.query("job:http_server_error_ratio:rate5m")["data"]["result"]}
    assert "fhir" in jobs and jobs <= set(COMPONENTS), sorted(jobs)


def test_only_the_alerts_the_run_causes_fire(observed: tuple[Prometheus, dict[str, Any]]) -> None:
    prom, _ = observed
    alerts = prom.get("/api/v1/alerts")["data"]["alerts"]
    firing = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
    pending = {a["labels"]["alertname"] for a in alerts if a["state"] == "pending"}
    assert firing == set(EXPECTED_FIRING), f"firing: {sorted(firing)}"
    assert set(EXPECTED_PENDING) <= pending <= set(MAY_BE_PENDING) | set(EXPECTED_PENDING), (
        f"pending: {sorted(pending)}"
    )
