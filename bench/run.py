"""Runs the benchmarks, starting what they need (Tansu, a PostgreSQL cluster in a temporary
folder) and stopping it afterwards. Each figure is printed beside a baseline measured in the same
run, with the ratio and the target. Exit code 0 unless a benchmark errors: a missed target is
printed as MISS, never hidden.

One script, though long: one function per section, each starting its baseline and its subject and
printing them side by side; the sections share the runner's start-up and its verdicts.

Usage: python bench/run.py [relay] [consumer] [grpc] [auth] [consent] [records] [audit] [anchoring] [fhir]
                          [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import chart_defaults

from medledger_devstack import localstack

HERE = Path(__file__).resolve().parent
PY = sys.executable


def run_json(*args: str, in_flight: int | None = None) -> dict[str, float]:
    """Run a benchmark script; its last line is its figures. `in_flight` sets its callers at once
    (closed_loop.IN_FLIGHT; 1 measures a lone caller)."""
    env = None if in_flight is None else {**os.environ, "IN_FLIGHT": str(in_flight)}
    done = subprocess.run([PY, *args], capture_output=True, text=True, timeout=600, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise RuntimeError(f"{Path(args[0]).name} {args[1] if len(args) > 1 else ''} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio >= target else "MISS"


# Kafka throughput on this shared machine swings by up to 2x from one run to the next (both
# ours and the raw baseline), so those benchmarks run ROUNDS rounds, each measuring the
# baseline and ours back to back, and judge the median of the rounds' ratios.
ROUNDS = 3

# The Helm chart's default trace sampling: the consumer, the interceptors and the services the
# consent and records sections run are judged where the platform runs.
CHART_SAMPLING = chart_defaults.TRACE_SAMPLING


def bench_relay(bootstrap: str, pg: localstack.PostgresCluster, results: dict) -> None:
    n = 50_000
    print(f"-- (a) outbox relay vs raw aiokafka produce, {n:,} messages of ~300 bytes, acks=all", flush=True)
    rounds = []
    for _ in range(ROUNDS):
        r = run_json(
            str(HERE / "bench_outbox_relay.py"), bootstrap, pg.create_database(f"bench_{uuid.uuid4().hex[:6]}"), str(n)
        )
        rounds.append({**r, "ratio": r["relay_per_s"] / r["raw_per_s"]})
        print(
            f"   relay publishing: {r['relay_per_s']:,.0f} msg/s  |  "
            f"raw aiokafka produce: {r['raw_per_s']:,.0f} msg/s  |  {rounds[-1]['ratio']:.0%}",
            flush=True,
        )
    ratio = statistics.median(r["ratio"] for r in rounds)
    print(f"   median of {ROUNDS} rounds: {ratio:.0%} (target >= 70%)  {verdict(ratio, 0.70)}")
    results["outbox_relay"] = {"rounds": rounds, "ratio": ratio, "target": 0.70}


def bench_consumer(bootstrap: str, results: dict) -> None:
    # 200k: at 50k the raw loop ran ~70 ms and its figure swung by 2x between runs.
    n = 200_000
    topic = f"bench.consume.{uuid.uuid4().hex[:8]}"
    print(
        f"-- (b) EventConsumer (parse, span, commit after effect) vs raw consume, {n:,} envelopes, "
        f"at the chart's default trace sampling ({CHART_SAMPLING:.0%}) and at 100%",
        flush=True,
    )
    subprocess.run([PY, str(HERE / "bench_consumer.py"), bootstrap, topic, str(n), "produce"], check=True, timeout=600)
    results["consumer"] = {"rounds": []}
    ratios: dict[float, list[float]] = {CHART_SAMPLING: [], 1.0: []}
    for _ in range(ROUNDS):
        raw = run_json(str(HERE / "bench_consumer.py"), bootstrap, topic, str(n), "raw")["per_s"]
        line = [f"raw aiokafka consume: {raw:,.0f} msg/s"]
        one_round = {"raw_per_s": raw}
        for sampling in ratios:
            ours = run_json(str(HERE / "bench_consumer.py"), bootstrap, topic, str(n), "consumer", str(sampling))
            ratios[sampling].append(ours["per_s"] / raw)
            one_round[f"sampling_{sampling}"] = ours["per_s"]
            line.append(f"sampling {sampling:.0%}: {ours['per_s']:,.0f} msg/s ({ratios[sampling][-1]:.0%})")
        results["consumer"]["rounds"].append(one_round)
        print("   " + "  |  ".join(line), flush=True)
    # What 100% sampling cannot go beyond: the SDK's own span per message, beside raw consumption.
    span_us = run_json(str(HERE / "bench_consumer.py"), bootstrap, topic, "50000", "sdk-span")["us"]
    raw_us = 1e6 / statistics.median(r["raw_per_s"] for r in results["consumer"]["rounds"])
    ceiling = raw_us / (raw_us + span_us)
    results["consumer"]["sdk_span"] = {"us": span_us, "raw_us": raw_us, "ceiling_at_100": ceiling}
    print(
        f"   the OpenTelemetry SDK's own span (start with the messaging attributes, end): {span_us:.1f} µs; raw "
        f"consumption {raw_us:.2f} µs per message: at 100% sampling a consumer that did nothing else "
        f"would reach {ceiling:.0%} of raw (the SDK's span floor)"
    )
    at_chart = statistics.median(ratios[CHART_SAMPLING])
    results["consumer"][f"sampling_{CHART_SAMPLING}"] = {"ratio": at_chart, "target": 0.25}
    print(
        f"   sampling {CHART_SAMPLING:.0%} (the chart's default): median of {ROUNDS} rounds {at_chart:.0%} of raw "
        f"(target >= 25%)  {verdict(at_chart, 0.25)}"
    )
    at_100 = statistics.median(ratios[1.0])
    of_floor = at_100 / ceiling
    results["consumer"]["sampling_1.0"] = {"ratio": at_100, "of_sdk_floor": of_floor, "target_of_sdk_floor": 0.80}
    print(
        f"   sampling 100%: median of {ROUNDS} rounds {at_100:.0%} of raw, {of_floor:.0%} of the SDK's span floor "
        f"({ceiling:.0%}) (target >= 80% of it)  {verdict(of_floor, 0.80)}"
    )


def bench_grpc(results: dict, seconds: float = 5.0) -> None:
    print(
        f"-- (c) empty unary RPC, 16 in flight, {seconds:.0f} s each, server and client in their own processes, "
        f"{ROUNDS} rounds of bare, common, auth (all calls traced) and common-10 (10% traced) back to back",
        flush=True,
    )
    # Like the Kafka benchmarks: one run of each swung by 10-15% from one minute to the next on
    # this shared machine (the bare server's rate too), so the rounds' ratios are judged by
    # their median.
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "token"
        for _ in range(ROUNDS):
            figures = {}
            for kind in ("bare", "common", "auth", "common-10"):
                port = localstack.free_port()
                extra = [str(token_file)] if kind == "auth" else []
                server = subprocess.Popen([PY, str(HERE / "bench_grpc.py"), "server", kind, str(port), *extra])
                try:
                    localstack.wait_for_port(port, 30, server, f"{kind} gRPC server")
                    figures[kind] = run_json(str(HERE / "bench_grpc.py"), "client", str(port), str(seconds), *extra)
                finally:
                    server.terminate()
                    server.wait(10)
            bare = figures["bare"]["calls_per_s"]
            for kind in ("common", "auth", "common-10"):
                figures[kind]["ratio"] = figures[kind]["calls_per_s"] / bare
            rounds.append(figures)
            print(
                "   "
                + "  |  ".join(
                    f"{kind} {f['calls_per_s']:,.0f} calls/s p50 {f['p50_ms']:.2f} ms p99 {f['p99_ms']:.2f} ms"
                    + (f" ({f['ratio']:.0%})" if "ratio" in f else "")
                    for kind, f in figures.items()
                ),
                flush=True,
            )
    results["grpc"] = {"rounds": rounds, "target": 0.80}
    # The target is judged at the chart's default sampling (common-10, below); every call traced
    # is printed with what its verdict would be against the same 80%, for information.
    for kind, label in (("common", "all interceptors"), ("auth", "all interceptors and authentication")):
        ratio = statistics.median(r[kind]["ratio"] for r in rounds)
        results["grpc"][f"{kind}_ratio"] = ratio
        print(
            f"   common bootstrap with {label}, every call traced: median of {ROUNDS} rounds {ratio:.0%} of bare "
            f"(information; against 80%: {verdict(ratio, 0.80)})"
        )
    ratio = statistics.median(r["common-10"]["ratio"] for r in rounds)
    results["grpc"]["common-10_ratio"] = ratio
    print(
        f"   common bootstrap with all interceptors, 10% of calls traced (the chart's default): median of {ROUNDS} "
        f"rounds {ratio:.0%} of bare (target >= 80%)  {verdict(ratio, 0.80)}"
    )


def bench_auth(bootstrap: str, results: dict) -> None:
    n = 5000
    print(f"-- (d) access-token verification through the interceptor, {n:,} tokens per algorithm, one core")
    r = run_json(str(HERE / "bench_auth.py"), "verify", str(n))
    for alg, f in r.items():
        ratio = f["first_seen_per_s"] / f["raw_per_s"]
        print(
            f"   {alg:>5} repeated token: {f['repeated_per_s']:,.0f}/s (target >= 20,000/s)  "
            f"{verdict(f['repeated_per_s'], 20_000)}"
        )
        print(
            f"   {alg:>5} first-seen tokens: {f['first_seen_per_s']:,.0f}/s  |  raw signature verification: "
            f"{f['raw_per_s']:,.0f}/s  |  {ratio:.0%} (target >= 70%)  {verdict(ratio, 0.70)}"
        )
        f["ratio"] = ratio
    results["auth_verify"] = r
    print("-- (e) identity and consent running: token issues, deactivation reaching consent")
    with tempfile.TemporaryDirectory() as tmp:
        p = run_json(str(HERE / "bench_auth.py"), "platform", bootstrap, tmp)
    print(f"   token issues: {p['issue_per_s']:,.0f}/s (8 clients; Argon2id-bound, 2 hashes at a time)")
    print(
        f"   deactivation to refusal in consent, {p['deactivations']} principals: p50 {p['deactivation_p50_ms']:.0f} ms"
        f"  p99 {p['deactivation_p99_ms']:.0f} ms (target p99 <= 1000 ms)  "
        f"{verdict(1000 - p['deactivation_p99_ms'], 0)}"
    )
    results["auth_platform"] = p


def bench_consent(bootstrap: str, pg: localstack.PostgresCluster, results: dict, seconds: float = 5.0) -> None:
    n = 100_000
    print(f"-- (f) consent: in-process decisions on {n:,} consents; CheckConsent from a client process", flush=True)
    d = run_json(str(HERE / "bench_consent.py"), "decide", str(n))
    print(
        f"   in-process decisions: {d['decisions_per_s']:,.0f}/s on {d['consents']:,} consents "
        f"(target >= 50,000/s)  {verdict(d['decisions_per_s'], 50_000)}"
    )
    figures: dict = {}
    lone: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        port = localstack.free_port()
        server = subprocess.Popen([PY, str(HERE / "bench_grpc.py"), "server", "bare", str(port)])
        try:
            localstack.wait_for_port(port, 30, server, "bare gRPC server")
            figures["empty"] = run_json(str(HERE / "bench_grpc.py"), "client", str(port), str(seconds))
            lone["empty call"] = run_json(str(HERE / "bench_grpc.py"), "client", str(port), str(seconds), in_flight=1)
        finally:
            server.terminate()
            server.wait(10)
        # The floor of any call to a medledger service: an empty call through the platform's own
        # server (every interceptor, authentication, the chart's sampling), printed beside the
        # bare one; the target stays judged against the bare call.
        port, token_file = localstack.free_port(), Path(tmp) / "token"
        server = subprocess.Popen([PY, str(HERE / "bench_grpc.py"), "server", "auth-10", str(port), str(token_file)])
        try:
            localstack.wait_for_port(port, 30, server, "platform gRPC server")
            lone["empty call, platform server"] = run_json(
                str(HERE / "bench_grpc.py"), "client", str(port), str(seconds), str(token_file), in_flight=1
            )
        finally:
            server.terminate()
            server.wait(10)
        commits = pg.create_database(f"bench_commit_{uuid.uuid4().hex[:6]}")
        lone["durable commit"] = run_json(str(HERE / "bench_commit.py"), commits, str(seconds), in_flight=1)
        # The two composed in one bare server, with no logic of its own: the floor of any call
        # that commits before it answers (printed; the target stays the sum of the two above).
        port = localstack.free_port()
        server = subprocess.Popen([PY, str(HERE / "bench_grpc.py"), "server", "commit", str(port), commits])
        try:
            localstack.wait_for_port(port, 30, server, "committing gRPC server")
            lone["empty call that commits, bare server"] = run_json(
                str(HERE / "bench_grpc.py"), "client", str(port), str(seconds), in_flight=1
            )
        finally:
            server.terminate()
            server.wait(10)
        config = Path(tmp) / "consent.json"
        url = pg.create_database(f"bench_consent_{uuid.uuid4().hex[:6]}")
        stack_folder = Path(tmp) / "stack"
        server = subprocess.Popen(
            [PY, str(HERE / "bench_consent.py"), "server", bootstrap, url, str(stack_folder), str(config)]
        )
        try:
            deadline = time.monotonic() + 120
            while not config.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the consent benchmark server did not start")
                time.sleep(0.2)
            figures["check"] = run_json(str(HERE / "bench_consent.py"), "client", str(config), str(seconds))
            lone["CheckConsent"] = run_json(
                str(HERE / "bench_consent.py"), "client", str(config), str(seconds), in_flight=1
            )
        finally:
            server.terminate()
            server.wait(20)
        url = pg.create_database(f"bench_consent_{uuid.uuid4().hex[:6]}")
        p = run_json(str(HERE / "bench_consent.py"), "propagation", bootstrap, url, str(Path(tmp) / "replicas"))
    empty, check = figures["empty"], figures["check"]
    rate, p99 = check["calls_per_s"] / empty["calls_per_s"], check["p99_ms"] / empty["p99_ms"]
    for kind, f in figures.items():
        print(f"   {kind:>6}: {f['calls_per_s']:,.0f} calls/s  p50 {f['p50_ms']:.2f} ms  p99 {f['p99_ms']:.2f} ms")
    print(
        f"   CheckConsent (decision recorded durably in PostgreSQL): {rate:.0%} of the empty call's rate "
        f"(target >= 50%)  {verdict(rate, 0.5)}; p99 {p99:.1f}x the empty call's (target <= 3x)  "
        f"{verdict(3 - p99, 0)}"
    )
    print("   one caller, one call at a time (no load), on the same machine and database:")
    _print_lone(lone)
    bound = lone["empty call"]["p50_ms"] + lone["durable commit"]["p50_ms"]
    print(
        f"   a lone CheckConsent: p50 {lone['CheckConsent']['p50_ms']:.2f} ms against a lone empty call plus one "
        f"durable commit, {bound:.2f} ms (target: within)  {verdict(bound - lone['CheckConsent']['p50_ms'], 0)}"
    )
    print(
        f"   revocation reaching a second replica, {p['rounds']} consents: p50 {p['p50_ms']:.0f} ms  "
        f"p99 {p['p99_ms']:.0f} ms (target p99 <= 1000 ms)  {verdict(1000 - p['p99_ms'], 0)}"
    )
    results["consent"] = {
        "decide": d,
        **figures,
        "lone": lone,
        "rate_ratio": rate,
        "p99_ratio": p99,
        "propagation": p,
    }


def bench_records(bootstrap: str, pg: localstack.PostgresCluster, results: dict, seconds: float = 5.0) -> None:
    print("-- (g) records: puts and gets through gRPC, each with its consent check", flush=True)
    figures: dict = {}
    for size in (1024, 65536):
        st = run_json(str(HERE / "bench_records.py"), "stages", str(size), pg.create_database(f"bench_stages_{size}"))
        figures[f"stages_{size}"] = st
        print(
            f"   stages, {size // 1024} KiB (µs): "
            + ", ".join(f"{k.removesuffix('_us')} {v:,.0f}" for k, v in st.items())
        )
    # One caller, one call at a time: a put's and a get's latency beside the floors they sit on,
    # measured in this section on the same machine and PostgreSQL cluster.
    lone: dict = {
        "empty call": _empty_call(seconds, in_flight=1),
        "durable commit": run_json(
            str(HERE / "bench_commit.py"),
            pg.create_database(f"bench_commit_{uuid.uuid4().hex[:6]}"),
            str(seconds),
            in_flight=1,
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        empty = _empty_call(seconds)
        print(
            f"    empty: {empty['calls_per_s']:,.0f} calls/s  "
            f"p50 {empty['p50_ms']:.2f} ms  p99 {empty['p99_ms']:.2f} ms"
        )
        chained = _chained_call(seconds)
        figures["chained_call"] = {**chained, "ratio": chained["calls_per_s"] / empty["calls_per_s"]}
        print(
            f"    an empty call that makes one empty call before answering (the gRPC alone of a put or get, "
            f"which asks consent): {chained['calls_per_s']:,.0f} calls/s  p50 {chained['p50_ms']:.2f} ms  |  "
            f"{figures['chained_call']['ratio']:.0%} of the empty call"
        )
        # Targets: on OpenBao, at least 70% of the local keyring's rate, and at steady state at most
        # 0.1 key-manager calls per put or get (the data-key cache; KEYS.md). The local keyring's
        # former target, 25% of the empty call, is retired: section (j)'s FHIR targets replace it
        # (reads against GetRecord, bundles against their floor); the ratio is still printed.
        for keys in ("local", "vault"):
            print(f"   records with the {'local keyring' if keys == 'local' else 'Vault (OpenBao)'}:", flush=True)
            config = Path(tmp) / f"records-{keys}.json"
            urls = ",".join(
                pg.create_database(f"bench_{name}_{uuid.uuid4().hex[:6]}") for name in ("consent", "records")
            )
            folder = Path(tmp) / f"stack-{keys}"
            server = subprocess.Popen(
                [PY, str(HERE / "bench_records.py"), "server", bootstrap, urls, str(folder), str(config), keys]
            )
            try:
                deadline = time.monotonic() + 900  # 1,000 patients registered and written first
                while not config.exists():
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the records benchmark server did not start")
                    time.sleep(0.2)
                check_us = json.loads(config.read_text())["consent_check_us"]
                print(f"     stage consent (one CheckConsent as records makes it, median): {check_us:,.0f} µs")
                figures[f"{keys}_consent_check_us"] = check_us
                for op in ("put", "get"):
                    for size in (1024, 65536):
                        f = run_json(str(HERE / "bench_records.py"), "client", str(config), str(seconds), op, str(size))
                        ratio = f["calls_per_s"] / empty["calls_per_s"]
                        figures[f"{keys}_{op}_{size}"] = {**f, "ratio": ratio}
                        if keys == "local":
                            judged = "(no target: see (j))"
                        else:
                            local = figures[f"local_{op}_{size}"]["calls_per_s"]
                            figures[f"{keys}_{op}_{size}"]["of_local"] = f["calls_per_s"] / local
                            judged = (
                                f"|  {f['calls_per_s'] / local:.0%} of the local keyring's "
                                f"(target >= 70%)  {verdict(f['calls_per_s'] / local, 0.70)}"
                            )
                        print(
                            f"     {op} {size // 1024:>2} KiB: {f['calls_per_s']:,.0f} calls/s  "
                            f"p50 {f['p50_ms']:.2f} ms  p99 {f['p99_ms']:.2f} ms  |  "
                            f"{ratio:.0%} of the empty call {judged}"
                        )
                        calls = f["key_manager_calls_per_op"]
                        print(
                            f"       key-manager calls per {op}: {calls:.3f} (target <= 0.1)  "
                            f"{'PASS' if calls <= 0.1 else 'MISS'}  |  data-key cache hits "
                            f"{f['cache_hit_rate']:.1%} of lookups"
                        )
                for op in ("put", "get"):
                    f = run_json(
                        str(HERE / "bench_records.py"), "client", str(config), str(seconds), op, "1024", in_flight=1
                    )
                    lone[f"{op} 1 KiB, {keys}"] = f
                    print(
                        f"     lone {op} 1 KiB (one caller, one call at a time): p50 {f['p50_ms']:.2f} ms  "
                        f"p99 {f['p99_ms']:.2f} ms  ({f['calls_per_s']:,.0f} calls/s)"
                    )
            finally:
                server.terminate()
                server.wait(30)
    results["records"] = {"empty": empty, **figures, "lone": lone}
    print("   one caller, one call at a time (no load), on the same machine and database:")
    _print_lone(lone)


def _print_lone(lone: dict) -> None:
    for kind, f in lone.items():
        print(f"   {kind:>20}: p50 {f['p50_ms']:.2f} ms  p99 {f['p99_ms']:.2f} ms  ({f['calls_per_s']:,.0f} calls/s)")


def print_lone_summary(results: dict) -> None:
    """The lone figures of consent and records side by side (each section measured its own
    empty call and durable commit on the run's PostgreSQL cluster), beside consent's check rate
    under load."""
    print("-- lone calls (one caller, no load) in this run, and consent's check rate under load")
    for section in ("consent", "records"):
        if section in results:
            print(f"   measured in ({'f' if section == 'consent' else 'g'}) {section}:")
            _print_lone(results[section]["lone"])
    if "consent" in results:
        c = results["consent"]
        lone = c["lone"]
        bound = lone["empty call"]["p50_ms"] + lone["durable commit"]["p50_ms"]
        print(
            f"   a lone CheckConsent p50 {lone['CheckConsent']['p50_ms']:.2f} ms against a lone empty call plus one "
            f"durable commit, {bound:.2f} ms (target: within)  {verdict(bound - lone['CheckConsent']['p50_ms'], 0)}"
        )
        print(
            f"   CheckConsent under load (16 in flight): {c['check']['calls_per_s']:,.0f} calls/s, "
            f"{c['rate_ratio']:.0%} of the empty call's {c['empty']['calls_per_s']:,.0f} calls/s "
            f"(target >= 50%)  {verdict(c['rate_ratio'], 0.5)}"
        )


def bench_audit(bootstrap: str, pg: localstack.PostgresCluster, results: dict) -> None:
    # 100k: the raw loop then runs for about a second, the log for over ten; the whole section
    # stays near two minutes on this 2-CPU machine.
    n = 100_000
    topic = f"medledger.benchaudit.v{uuid.uuid4().int % 10**9}"
    print(
        f"-- (h) audit log: {n:,} events (record stored / disclosed, consent decisions; {3000:,} patients) "
        "committed into the log on PostgreSQL vs raw consume",
        flush=True,
    )
    subprocess.run([PY, str(HERE / "bench_audit.py"), "produce", bootstrap, topic, str(n)], check=True, timeout=600)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(ROUNDS):
            raw = run_json(str(HERE / "bench_audit.py"), "raw", bootstrap, topic, str(n))
            url = pg.create_database(f"bench_audit_{uuid.uuid4().hex[:6]}")
            folder = Path(tmp) / f"round{i}"
            folder.mkdir()
            ours = run_json(str(HERE / "bench_audit.py"), "log", bootstrap, topic, str(n), url, str(folder))
            rounds.append({"raw_per_s": raw["per_s"], **ours, "ratio": ours["per_s"] / raw["per_s"]})
            print(
                f"   log: {ours['per_s']:,.0f} entries/s committed ({ours['appends']:.0f} appends; a new patient's "
                f"key {ours['new_patient_key_ms']:.0f} ms)  |  "
                f"raw aiokafka consume: {raw['per_s']:,.0f} msg/s  |  {rounds[-1]['ratio']:.0%}",
                flush=True,
            )
    rate = statistics.median(r["per_s"] for r in rounds)
    ratio = statistics.median(r["ratio"] for r in rounds)
    print(
        f"   median of {ROUNDS} rounds: {rate:,.0f} entries/s (target >= 20,000/s)  {verdict(rate, 20_000)}; "
        f"{ratio:.0%} of raw consumption"
    )
    size, samples = 1_000_000, 2000
    url = pg.create_database(f"bench_proofs_{uuid.uuid4().hex[:6]}")
    p = run_json(str(HERE / "bench_audit.py"), "proofs", url, str(size), str(samples))
    print(
        f"   inclusion proofs at {size:,} entries through DatabaseTiles on PostgreSQL, {samples:,} random "
        f"indexes one at a time (tiles computed in {p['compute_s']:.1f} s, loaded in {p['load_s']:.1f} s): "
        f"p50 {p['p50_ms']:.2f} ms  p99 {p['p99_ms']:.2f} ms (target p99 <= 5 ms)  {verdict(5 - p['p99_ms'], 0)}"
    )
    results["audit"] = {"rounds": rounds, "per_s": rate, "ratio": ratio, "target_per_s": 20_000, "proofs": p}


def bench_anchoring(
    bootstrap: str, pg: localstack.PostgresCluster, tmp: Path, results: dict, seconds: float = 5.0
) -> None:
    print("-- (i) anchoring on Anvil: gas per covered entry, proofs served, time to an anchored proof", flush=True)
    port = localstack.free_port()
    anvil = localstack.start_anvil(port, tmp / "anvil" / "state.json", tmp / "anvil.log")
    rpc_url = f"http://127.0.0.1:{port}"
    try:
        g = run_json(str(HERE / "bench_anchoring.py"), "gas", rpc_url)
        per_record = g["per_record_transaction_gas"]
        print(f"   one transaction per record (a commitment in its own slot): {per_record:,.0f} gas per record")
        for covered, target in (("100", None), ("1000", 100), ("10000", 10)):
            f = g[covered]
            judged = f"(target <= {target})  {verdict(target - f['per_entry'], 0)}" if target else "(no target)"
            print(
                f"   one anchor covering {int(covered):>6,} entries at tree size 1,000,000 ({f['proof_hashes']}-hash "
                f"proof): {f['gas']:,} gas, {f['per_entry']:,.1f} gas per entry {judged}; "
                f"{per_record / f['per_entry']:,.0f}x less than a transaction per record"
            )
        empty = _empty_call(seconds)
        print(f"   empty gRPC call: {empty['calls_per_s']:,.0f} calls/s  p50 {empty['p50_ms']:.2f} ms")
        config = tmp / "anchoring.json"
        server = subprocess.Popen(
            [
                PY, str(HERE / "bench_anchoring.py"), "server", bootstrap, rpc_url,
                pg.create_database(f"bench_audit_{uuid.uuid4().hex[:6]}"),
                pg.create_database(f"bench_anchoring_{uuid.uuid4().hex[:6]}"),
                str(tmp / "anchoring-stack"), str(config),
            ]
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 600
            while not config.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the anchoring benchmark server did not finish its latency run")
                time.sleep(0.5)
            lat = json.loads(config.read_text())
            print(
                f"   record published -> anchored proof available, {lat['records']:,} records at steady rate "
                f"(audit checkpoints every {lat['checkpoint_interval_seconds']:g} s, anchoring every "
                f"{lat['anchor_interval_seconds']:g} s, {lat['anchor_transactions']} anchor transactions): "
                f"p50 {lat['latency_p50_s']:.1f} s  p99 {lat['latency_p99_s']:.1f} s  max {lat['latency_max_s']:.1f} s"
            )
            proofs = run_json(str(HERE / "bench_anchoring.py"), "client", str(config), str(seconds))
            ratio = proofs["calls_per_s"] / empty["calls_per_s"]
            print(
                f"   GetAnchoredProof (by commitment; audit's FindCommitment and tlog-proof behind it): "
                f"{proofs['calls_per_s']:,.0f} proofs/s  p50 {proofs['p50_ms']:.2f} ms  p99 {proofs['p99_ms']:.2f} ms"
                f"  |  {ratio:.0%} of the empty call (no target)"
            )
        finally:
            server.terminate()
            server.wait(30)
    finally:
        anvil.stop()
    results["anchoring"] = {
        "gas": g,
        "empty": empty,
        "latency": {k: v for k, v in lat.items() if k not in ("token", "commitments")},
        "proofs": proofs,
    }


def bench_fhir(bootstrap: str, pg: localstack.PostgresCluster, results: dict, seconds: float = 9.0) -> None:
    """(j) The FHIR gateway beside the gRPC path: bundles loaded (against the floor of their
    validation, commitment and audit entry), reads against GetRecord, a patient's Observation
    search, and a mixed load of 16 clients."""
    print("-- (j) FHIR gateway: bundles, reads beside GetRecord, search, a mixed load", flush=True)
    figures: dict = {"floor": run_json(str(HERE / "bench_fhir.py"), "floor")}
    fl = figures["floor"]
    print(
        f"   floor, per resource over {fl['resources']:,.0f} synthetic resources: validation "
        f"{fl['validation_us']:,.0f} µs, canonical JSON and commitment {fl['canonical_commitment_us']:,.0f} µs, "
        f"audit entry {fl['audit_entry_us']:,.0f} µs: at most {fl['floor_resources_per_s']:,.0f} resources/s "
        "on one core",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "fhir.json"
        urls = ",".join(
            pg.create_database(f"bench_{n}_{uuid.uuid4().hex[:6]}") for n in ("consent", "records", "audit")
        )
        server = subprocess.Popen(
            [PY, str(HERE / "bench_fhir.py"), "server", bootstrap, urls, str(Path(tmp) / "stack"), str(config)]
        )
        try:
            deadline = time.monotonic() + 600
            while not config.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the FHIR benchmark server did not start")
                time.sleep(0.2)

            def client(mode: str) -> dict:
                return run_json(str(HERE / "bench_fhir.py"), "client", str(config), str(seconds), mode)

            b = figures["bundle"] = client("bundle")
            ratio = b["resources_per_s"] / fl["floor_resources_per_s"]
            print(
                f"   transaction bundles: {b['bundles']} bundles, {b['resources']:,} resources "
                f"in {b['seconds']:.1f} s: "
                f"{b['resources_per_s']:,.0f} resources/s ({ratio:.0%} of the one-core floor; "
                f"target >= 1,000/s)  {verdict(b['resources_per_s'], 1000)}",
                flush=True,
            )
            r = figures["read"] = client("read")
            print(
                f"   reads: FHIR GET {r['fhir']['calls_per_s']:,.0f}/s p50 {r['fhir']['p50_ms']:.1f} ms "
                f"p99 {r['fhir']['p99_ms']:.1f} ms  |  gRPC GetRecord {r['grpc']['calls_per_s']:,.0f}/s "
                f"p50 {r['grpc']['p50_ms']:.1f} ms  |  {r['ratio']:.0%}, the median of "
                + ", ".join(f"{x['ratio']:.0%}" for x in r["rounds"])
                + f" (target >= 75%)  {verdict(r['ratio'], 0.75)}",
                flush=True,
            )
            q = figures["search"] = client("search")
            print(
                f"   a patient's Observation search by code: {q['calls_per_s']:,.0f}/s "
                f"p50 {q['p50_ms']:.1f} ms p99 {q['p99_ms']:.1f} ms",
                flush=True,
            )
            m = figures["mixed"] = client("mixed")
            ops = "; ".join(f"{op} p50 {f['p50_ms']:.1f} / p99 {f['p99_ms']:.1f} ms" for op, f in m["per_op"].items())
            print(
                f"   mixed (70% read, 20% search, 10% create), 16 clients: {m['calls_per_s']:,.0f} calls/s "
                f"p50 {m['p50_ms']:.1f} ms p99 {m['p99_ms']:.1f} ms ({ops})",
                flush=True,
            )
        finally:
            server.terminate()
            server.wait(60)
    results["fhir"] = figures


def _empty_call(seconds: float, in_flight: int | None = None) -> dict:
    """The baseline: an empty unary call to a bare grpc.aio server, from another process."""
    port = localstack.free_port()
    server = subprocess.Popen([PY, str(HERE / "bench_grpc.py"), "server", "bare", str(port)])
    try:
        localstack.wait_for_port(port, 30, server, "bare gRPC server")
        return run_json(str(HERE / "bench_grpc.py"), "client", str(port), str(seconds), in_flight=in_flight)
    finally:
        server.terminate()
        server.wait(10)


def _chained_call(seconds: float) -> dict:
    """A bare server whose method calls another bare server, each in its own process, from a
    client in a third: what gRPC alone costs a request that asks another service."""
    ports = localstack.free_port(), localstack.free_port()
    servers = [subprocess.Popen([PY, str(HERE / "bench_grpc.py"), "server", "bare", str(ports[0])])]
    try:
        servers.append(
            subprocess.Popen([PY, str(HERE / "bench_grpc.py"), "server", "chain", str(ports[1]), str(ports[0])])
        )
        for port, server in zip(ports, servers, strict=True):
            localstack.wait_for_port(port, 30, server, "bare gRPC server")
        return run_json(str(HERE / "bench_grpc.py"), "client", str(ports[1]), str(seconds))
    finally:
        for server in servers:
            server.terminate()
            server.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "only",
        nargs="*",
        choices=["relay", "consumer", "grpc", "auth", "consent", "records", "audit", "anchoring", "fhir", []],
        default=[],
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    wanted = set(args.only) or {"relay", "consumer", "grpc", "auth", "consent", "records", "audit", "anchoring", "fhir"}
    results: dict = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="medledger-bench-") as tmp:
        broker = pg = None
        try:
            if wanted & {"relay", "consumer", "auth", "consent", "records", "audit", "anchoring", "fhir"}:
                print("starting Tansu", flush=True)
                port = localstack.free_port()
                broker = localstack.start_tansu(port, Path(tmp) / "tansu.log")
                bootstrap = f"127.0.0.1:{port}"
            if wanted & {"relay", "consent", "records", "audit", "anchoring", "fhir"}:
                print("starting a PostgreSQL cluster of our own", flush=True)
                pg = localstack.PostgresCluster(Path(tmp) / "pg", localstack.free_port())
                pg.init()
                pg.start()
            if "relay" in wanted:
                bench_relay(bootstrap, pg, results)
            if "consumer" in wanted:
                bench_consumer(bootstrap, results)
            if "grpc" in wanted:
                bench_grpc(results)
            if "auth" in wanted:
                bench_auth(bootstrap, results)
            if "consent" in wanted:
                bench_consent(bootstrap, pg, results)
            if "records" in wanted:
                bench_records(bootstrap, pg, results)
            if "audit" in wanted:
                bench_audit(bootstrap, pg, results)
            if "anchoring" in wanted:
                bench_anchoring(bootstrap, pg, Path(tmp), results)
            if "fhir" in wanted:
                bench_fhir(bootstrap, pg, results)
        finally:
            if pg is not None:
                pg.stop("immediate")
            if broker is not None:
                broker.stop()
    if "consent" in results or "records" in results:
        print_lone_summary(results)
    print(f"benchmarks took {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
