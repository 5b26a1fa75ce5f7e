"""``medledger up``: the whole stack on this machine, in the foreground, until Ctrl-C.

It starts Kafka (Tansu), creates the topics and their dead-letter topics, starts Anvil with its
chain state in the state folder, then the five services, each its own process with its own log,
and waits until every one answers the gRPC health check with SERVING. On Ctrl-C or SIGTERM it
stops the services (SIGTERM, then SIGKILL if they hang), then Anvil (SIGTERM, so it dumps its
state), then Kafka: only processes it started itself.

Before starting anything it checks every port it needs and refuses, naming the port, if one is
taken; a failure while starting stops whatever was started already.

If a service dies while the stack runs, ``up`` says so, prints the end of its log and keeps the
other processes running: Kafka keeps its messages only in memory, so stopping everything would
throw away every event the other services have produced. The exit code is then 1 when the stack
is stopped. If Kafka or Anvil dies, every service depends on it, so ``up`` stops the stack.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from aiokafka.errors import KafkaError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medledger_common import localstack
from medledger_common.kafka import ensure_topics
from medledger_sdk.cli.errors import CommandError
from medledger_sdk.cli.reset import reset_state
from medledger_sdk.cli.state import DEFAULT_STATE_DIR, RecordedProcess, StateDir, describe_running

HOST = localstack.HOST
# In port order: identity gets the base port, audit base + 4.
SERVICES = ("identity", "consent", "records", "anchoring", "audit")

DEFAULT_KAFKA_PORT = 9092
DEFAULT_ANVIL_PORT = 8545
DEFAULT_GRPC_PORT_BASE = 50051
DEFAULT_METRICS_PORT_BASE = 9101

# Longer than a service's own shutdown grace (10 s by default) so a clean drain is not cut short.
SERVICE_STOP_SECONDS = 15.0
INFRA_STOP_SECONDS = 10.0
LOG_TAIL_LINES = 25
LOG_RUN_HEADER = "----- medledger up: "


@dataclass(frozen=True)
class Ports:
    kafka: int
    anvil: int
    grpc_base: int
    metrics_base: int

    def grpc(self, service: str) -> int:
        return self.grpc_base + SERVICES.index(service)

    def metrics(self, service: str) -> int:
        return self.metrics_base + SERVICES.index(service)

    @property
    def jwks(self) -> int:
        """identity's JWKS over HTTP: 9111 with the default metrics ports."""
        return self.metrics_base + 10

    @property
    def tiles(self) -> int:
        """audit's transparency-log tiles over HTTP: 9115 with the default metrics ports."""
        return self.metrics_base + 14

    def purposes(self) -> list[tuple[int, str]]:
        """Every port the stack needs, with what it is for."""
        needed = [(self.kafka, "Kafka (Tansu)"), (self.anvil, "Anvil JSON-RPC")]
        needed += [(self.grpc(s), f"{s} gRPC") for s in SERVICES]
        needed += [(self.metrics(s), f"{s} metrics") for s in SERVICES]
        needed.append((self.jwks, "identity JWKS over HTTP"))
        needed.append((self.tiles, "audit log tiles over HTTP"))
        return needed


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "up",
        help="run Kafka, Anvil and the five services locally until Ctrl-C",
        description="Run the whole medledger stack on this machine in the foreground; Ctrl-C stops it.",
    )
    parser.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        help=f"where databases, chain state and logs go (default: ./{DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--kafka-port", type=_port, default=DEFAULT_KAFKA_PORT, help="Kafka (Tansu) port (default: %(default)s)"
    )
    parser.add_argument(
        "--anvil-port", type=_port, default=DEFAULT_ANVIL_PORT, help="Anvil JSON-RPC port (default: %(default)s)"
    )
    parser.add_argument(
        "--grpc-port-base",
        type=_port,
        default=DEFAULT_GRPC_PORT_BASE,
        help="gRPC port of identity; consent, records, anchoring, audit get the next four (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-port-base",
        type=_port,
        default=DEFAULT_METRICS_PORT_BASE,
        help="metrics port of identity; the other services get the next four (default: %(default)s)",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for every service to report SERVING (default: %(default)s)",
    )
    parser.add_argument("--reset", action="store_true", help="delete the state folder first (like `medledger reset`)")
    parser.set_defaults(func=run)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535 - (len(SERVICES) - 1):
        raise argparse.ArgumentTypeError(f"{value} is not a usable port (1 to {65535 - (len(SERVICES) - 1)})")
    return value


def run(args: argparse.Namespace) -> int:
    state = StateDir.at(args.state_dir)
    ports = Ports(args.kafka_port, args.anvil_port, args.grpc_port_base, args.metrics_port_base)
    preflight(state, ports)
    if args.reset:
        reset_state(state)
    state.create()
    stack = Stack(state, ports)
    with stack.handling_signals():
        try:
            stack.start(args.start_timeout)
            stack.print_endpoints()
            print("ready: medledger is up; press Ctrl-C to stop it")
            return stack.watch()
        except _Interrupted as exc:
            print(f"received {exc.signal_name} while starting; stopping what was started")
            return 128 + exc.signum
        finally:
            stack.stop_all()


def preflight(state: StateDir, ports: Ports) -> None:
    """Everything that can be checked before starting a process; raises CommandError."""
    by_port: dict[int, list[str]] = {}
    for port, what in ports.purposes():
        by_port.setdefault(port, []).append(what)
    clashes = [f"{port} ({' and '.join(whats)})" for port, whats in by_port.items() if len(whats) > 1]
    if clashes:
        raise CommandError("the port options overlap; one port cannot serve two things: " + ", ".join(clashes))

    running = state.running()
    if running:
        raise CommandError(
            f"medledger is already running from {state.path}: {describe_running(running)}. "
            "Stop it first, or use another --state-dir."
        )

    for module in (f"medledger_{s}" for s in SERVICES):
        if importlib.util.find_spec(module) is None:
            raise CommandError(f"the {module} package is not installed in {sys.executable}; run `uv sync`")
    try:
        localstack.tansu_bin()
        localstack.anvil_bin()
    except (FileNotFoundError, ImportError) as exc:
        raise CommandError(f"a tool the stack needs is missing: {exc}") from None

    taken = [f"port {port} ({what})" for port, what in ports.purposes() if port_taken(port)]
    if taken:
        raise CommandError(
            f"cannot start: {', '.join(taken)} {'is' if len(taken) == 1 else 'are'} already in use on {HOST}. "
            f"Stop whatever uses {'it' if len(taken) == 1 else 'them'}, or choose other ports "
            "(see `medledger up --help`). Nothing was started."
        )


def port_taken(port: int) -> bool:
    """Something listens on the port, or holds it so that our server could not bind it."""
    if localstack.port_in_use(port):
        return True
    with socket.socket() as s:
        # SO_REUSEADDR as servers use it, so connections lingering in TIME_WAIT do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name


class Stack:
    """The processes of one ``up``, started in order and stopped in reverse."""

    def __init__(self, state: StateDir, ports: Ports) -> None:
        self.state = state
        self.ports = ports
        self.kafka: localstack.ManagedProcess | None = None
        self.anvil: localstack.ManagedProcess | None = None
        self.services: dict[str, localstack.ManagedProcess] = {}
        self._signal: int | None = None
        self._dead: set[str] = set()

    # Signals -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM only set a flag the loops check, so a signal can never land between
        starting a process and recording it (and leak the process)."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if self._signal is None:
                self._signal = signum

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _check_interrupted(self) -> None:
        if self._signal is not None:
            raise _Interrupted(self._signal)

    # Start -------------------------------------------------------------------------------

    def start(self, timeout: float) -> None:
        self._record_pids()  # from here on `reset` sees this folder as in use
        print(f"state folder: {self.state.path}")

        print(f"starting Kafka (Tansu) on {HOST}:{self.ports.kafka} ...")
        self.kafka = self._start_infra("kafka", lambda log: localstack.start_tansu(self.ports.kafka, log))
        self._record_pids()
        self._check_interrupted()

        print("creating the topics and their dead-letter topics ...")
        created = asyncio.run(_create_topics(self.bootstrap_servers))
        print(f"  {len(created)} topics created" if created else "  topics already exist")
        self._check_interrupted()

        print(f"starting Anvil on {HOST}:{self.ports.anvil} (chain state in {self.state.anvil_state.name}) ...")
        self.anvil = self._start_infra(
            "anvil",
            lambda log: localstack.start_anvil(self.ports.anvil, self.state.anvil_state, log, block_time=1),
        )
        self._record_pids()
        self._check_interrupted()

        for name in SERVICES:
            proc = self._spawn_service(name)
            print(f"starting {name} (pid {proc.pid}) on {HOST}:{self.ports.grpc(name)} ...")
        self._wait_until_serving(timeout)

    def _start_infra(self, name: str, start: Callable[[Path], localstack.ManagedProcess]) -> localstack.ManagedProcess:
        log = self.state.log(name)
        _write_log_header(log)
        try:
            proc = start(log)
        except (RuntimeError, TimeoutError, OSError) as exc:
            self._print_log_tail(name, log)
            raise CommandError(f"{name} did not start: {exc}") from None
        return proc

    def _spawn_service(self, name: str) -> localstack.ManagedProcess:
        log = self.state.log(name)
        _write_log_header(log)
        env = {
            **os.environ,
            "MEDLEDGER_GRPC_PORT": str(self.ports.grpc(name)),
            "MEDLEDGER_METRICS_PORT": str(self.ports.metrics(name)),
            "MEDLEDGER_DATABASE_URL": self.state.database_url(name),
            "MEDLEDGER_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "MEDLEDGER_IDENTITY_ADDRESS": f"{HOST}:{self.ports.grpc('identity')}",
            "MEDLEDGER_CONSENT_ADDRESS": f"{HOST}:{self.ports.grpc('consent')}",  # records asks it
            "MEDLEDGER_MASTER_KEY_FILE": str(self.state.master_key_file(name)),
            "MEDLEDGER_KEYRING_FILE": str(self.state.keyring_file(name)),
            "PYTHONUNBUFFERED": "1",  # so `tail -f` on the log shows lines as they happen
        }
        if name == "identity":
            # Every service's secret file exists before identity reads the folder.
            for other in SERVICES[1:]:
                self.state.service_secret_file(other)
            env["MEDLEDGER_SERVICE_SECRETS_DIR"] = str(self.state.service_secrets_dir())
            env["MEDLEDGER_BOOTSTRAP_ADMIN_SECRET_FILE"] = str(self.state.admin_secret_file())
            env["MEDLEDGER_JWKS_HTTP_PORT"] = str(self.ports.jwks)
        else:
            env["MEDLEDGER_CLIENT_SECRET_FILE"] = str(self.state.service_secret_file(name))
        if name == "audit":
            env["MEDLEDGER_TILES_HTTP_PORT"] = str(self.ports.tiles)
            env["MEDLEDGER_LAST_CHECKPOINT_FILE"] = str(self.state.path / "audit" / "last-checkpoint")
        proc = localstack.ManagedProcess.spawn(name, [sys.executable, "-m", f"medledger_{name}"], log, env=env)
        self.services[name] = proc
        self._record_pids()
        return proc

    def _wait_until_serving(self, timeout: float) -> None:
        print("waiting for the services to report SERVING ...")
        started = time.monotonic()
        last_note = started
        pending = list(SERVICES)
        # Short reconnect backoff: the default grows to minutes while a server is still starting.
        options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
        channels = {s: grpc.insecure_channel(f"{HOST}:{self.ports.grpc(s)}", options=options) for s in SERVICES}
        try:
            while pending:
                self._check_interrupted()
                for name in list(pending):
                    proc = self.services[name]
                    if not proc.alive():
                        self._print_log_tail(name, proc.log_path)
                        raise CommandError(
                            f"{name} exited with {_describe_exit(proc.proc.returncode)} while starting; "
                            f"its log is {proc.log_path}"
                        )
                    if localstack.port_in_use(self.ports.grpc(name)) and _serving(channels[name]):
                        print(f"  {name} is serving ({time.monotonic() - started:.1f} s)")
                        pending.remove(name)
                now = time.monotonic()
                if pending and now - started > timeout:
                    for name in pending:
                        self._print_log_tail(name, self.services[name].log_path)
                    raise CommandError(
                        f"{', '.join(pending)} did not report SERVING within {timeout:.0f} s; "
                        f"logs are in {self.state.logs}"
                    )
                if pending and now - last_note >= 10:
                    print(f"  still waiting for {', '.join(pending)} ({now - started:.0f} s)")
                    last_note = now
                if pending:
                    time.sleep(0.2)
        finally:
            for channel in channels.values():
                channel.close()

    # Running -----------------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        return f"{HOST}:{self.ports.kafka}"

    def print_endpoints(self) -> None:
        rows = [("service", "pid", "gRPC", "metrics")]
        for name in SERVICES:
            rows.append(
                (
                    name,
                    str(self.services[name].pid),
                    f"{HOST}:{self.ports.grpc(name)}",
                    f"http://{HOST}:{self.ports.metrics(name)}/metrics",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        print()
        for row in rows:
            print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        print()
        assert self.kafka is not None and self.anvil is not None
        print(f"  Kafka bootstrap  {self.bootstrap_servers}  (pid {self.kafka.pid})")
        print(f"  Anvil RPC        http://{HOST}:{self.ports.anvil}  (pid {self.anvil.pid})")
        print(f"  JWKS             http://{HOST}:{self.ports.jwks}/.well-known/jwks.json")
        print(f"  audit log tiles  http://{HOST}:{self.ports.tiles}/checkpoint")
        print(f"  admin            principal svc_admin, client secret in {self.state.admin_secret_file()}")
        print(f"  state folder     {self.state.path}")
        print(f"  logs             {self.state.logs}")
        print()

    def watch(self) -> int:
        """Wait for Ctrl-C or SIGTERM; report processes that die meanwhile. Returns the exit code."""
        while self._signal is None:
            for name, proc in self.services.items():
                if name not in self._dead and not proc.alive():
                    self._dead.add(name)
                    print(
                        f"{name} (pid {proc.pid}) exited unexpectedly with "
                        f"{_describe_exit(proc.proc.returncode)}; the other processes keep running."
                    )
                    self._print_log_tail(name, proc.log_path)
            for infra in (self.kafka, self.anvil):
                if infra is not None and not infra.alive():
                    self._print_log_tail(infra.name, infra.log_path)
                    print(
                        f"{infra.name} (pid {infra.pid}) exited unexpectedly with "
                        f"{_describe_exit(infra.proc.returncode)}; every service depends on it, so stopping the stack."
                    )
                    return 1
            time.sleep(0.5)
        print(f"received {signal.Signals(self._signal).name}; stopping")
        return 1 if self._dead else 0

    # Stop --------------------------------------------------------------------------------

    def stop_all(self) -> None:
        """Services first (they drain calls and flush to Kafka), then Anvil (SIGTERM makes it
        dump its chain state), then Kafka. Only what this ``up`` started."""
        alive = {name for name, proc in self.services.items() if proc.alive()}
        for proc in self.services.values():
            proc.signal(signal.SIGTERM)  # all at once, so their grace periods overlap
        deadline = time.monotonic() + SERVICE_STOP_SECONDS
        for name, proc in self.services.items():
            self._stop(proc, max(0.1, deadline - time.monotonic()), was_alive=name in alive)
        for infra in (self.anvil, self.kafka):
            if infra is not None:
                self._stop(infra, INFRA_STOP_SECONDS, was_alive=infra.alive())
        self._stop_stray_children()
        self.state.clear_pids()

    def _stop(self, proc: localstack.ManagedProcess, timeout: float, was_alive: bool) -> None:
        try:
            code = proc.stop(timeout)
        except subprocess.TimeoutExpired:
            print(f"could not stop {proc.name} (pid {proc.pid}); it is still running")
            return
        if not was_alive:
            print(f"{proc.name} (pid {proc.pid}) had already exited ({_describe_exit(code)})")
        elif code == -signal.SIGKILL:
            print(f"killed {proc.name} (pid {proc.pid}): it did not stop within {timeout:.0f} s of SIGTERM")
        else:
            print(f"stopped {proc.name} (pid {proc.pid})")

    def _stop_stray_children(self) -> None:
        """A child we lost track of: localstack's start_* functions raise on a start timeout
        without stopping the process they spawned. It is still our child, so find it that way."""
        for pid in _own_children():
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                command = "?"
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and _reap(pid) is None:
                time.sleep(0.1)
            if _reap(pid) is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            print(f"stopped a leftover child process: {command} (pid {pid})")

    # Helpers -----------------------------------------------------------------------------

    def _record_pids(self) -> None:
        started = [p for p in (self.kafka, self.anvil, *self.services.values()) if p is not None]
        self.state.write_pids(
            RecordedProcess.of("medledger up", os.getpid()),
            [RecordedProcess.of(p.name, p.pid) for p in started],
        )

    def _print_log_tail(self, name: str, log: Path) -> None:
        lines = _log_tail(log, LOG_TAIL_LINES)
        if not lines:
            print(f"  ({name} wrote nothing to {log})")
            return
        print(f"  last lines of {log}:")
        for line in lines:
            print(f"  | {line}")


async def _create_topics(bootstrap_servers: str, within: float = 30.0) -> list[str]:
    # The broker accepts connections a moment before it answers admin requests.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            return await asyncio.wait_for(ensure_topics(bootstrap_servers), 10)
        except (KafkaError, OSError, TimeoutError) as exc:
            if loop.time() > deadline:
                raise CommandError(f"could not create the Kafka topics: {type(exc).__name__}: {exc}") from None
            await asyncio.sleep(0.5)


def _serving(channel: grpc.Channel) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code yet"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"


def _write_log_header(log: Path) -> None:
    # Logs are appended to across runs; the header lets the tail show only this run's lines.
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"{LOG_RUN_HEADER}{datetime.now().isoformat(timespec='seconds')} -----\n")


def _log_tail(log: Path, count: int) -> list[str]:
    try:
        with log.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    header = text.rfind(LOG_RUN_HEADER)
    if header >= 0:
        text = text[header:].split("\n", 1)[1] if "\n" in text[header:] else ""
    return text.splitlines()[-count:]


def _own_children() -> list[int]:
    """Live (not zombie) processes whose parent is this process, from /proc (Linux)."""
    me = os.getpid()
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me and fields[0] != "Z":
            children.append(int(entry.name))
    return children


def _reap(pid: int) -> int | None:
    """The exit status if `pid` has exited (reaping it), else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return 0  # already reaped or not ours
    return status if done else None
