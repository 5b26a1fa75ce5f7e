"""The supervisor of one ``medledger up``: it starts the stack's processes in order (Kafka, OpenBao,
Anvil, the services, then the FHIR gateway in front of them), sets up the chain side between them,
watches them while the stack runs, and stops them in reverse: only processes it started itself.

A service that dies while the stack runs is reported and the others keep running: Kafka keeps its
messages only in memory, so stopping everything would throw away every event the other services
have produced. If Kafka or Anvil dies, every service depends on it, so the stack stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import grpc
from aiokafka.errors import KafkaError

from medledger_devstack import contracts, localstack, openbao
from medledger_devstack.cli.state import RecordedProcess, StateDir
from medledger_devstack.stack.chain_side import chain_step, publish_log, set_up_contracts
from medledger_devstack.stack.layout import DEFAULT_LOG_ORIGIN, GATEWAYS, HOST, SERVICES, Ports
from medledger_devstack.stack.processes import (
    LOG_TAIL_LINES,
    describe_exit,
    log_tail,
    own_children,
    serving,
    stop_children_since,
    write_log_header,
)
from medledger_devstack.stack.service_env import gateway_environment, service_environment
from medledger_runtime.files import write_atomically
from medledger_runtime.kafka import ensure_topics
from medledger_runtime.settings import ConfigError
from medledger_sdk.cli.errors import CommandError

# Longer than a service's own shutdown grace (10 s by default) so a clean drain is not cut short.
SERVICE_STOP_SECONDS = 15.0
INFRA_STOP_SECONDS = 10.0


class Interrupted(Exception):
    """A signal (Ctrl-C, SIGTERM) asked a command that runs a stack to stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name


class Stack:
    """The processes of one ``up``, started in order and stopped in reverse."""

    def __init__(
        self,
        state: StateDir,
        ports: Ports,
        origin: str = DEFAULT_LOG_ORIGIN,
        database_url: str | None = None,
        keys: str = "openbao",
    ) -> None:
        self.state = state
        self.ports = ports
        self.origin = origin
        self.keys = keys
        # A template with {service}; None: the SQLite files of the state folder.
        self.database_url = database_url
        self.deployment: contracts.Deployment | None = None
        self._serving: set[str] = set()
        self.kafka: localstack.ManagedProcess | None = None
        self.anvil: localstack.ManagedProcess | None = None
        self.openbao: openbao.OpenBao | None = None
        # The services and the gateways, by name: the medledger processes of this stack.
        self.services: dict[str, localstack.ManagedProcess] = {}
        self._signal: int | None = None
        self._dead: set[str] = set()
        self._children_before: set[int] = set()

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
            raise Interrupted(self._signal)

    # Start -------------------------------------------------------------------------------

    def start(self, timeout: float) -> None:
        # Children of this process from before the stack (a test session's own broker or chain,
        # when the stack runs inside pytest) are not the stack's to stop.
        self._children_before = set(own_children())
        self._record_pids()  # from here on `reset` sees this folder as in use
        print(f"state folder: {self.state.path}")

        print(f"starting Kafka (Tansu) on {HOST}:{self.ports.kafka} ...")
        self.kafka = self._start_infra("kafka", lambda log: localstack.start_tansu(self.ports.kafka, log))
        self._record_pids()
        self._check_interrupted()

        if self.keys == "openbao":
            self._start_openbao()
            self._check_interrupted()

        print("creating the topics and their dead-letter topics ...")
        created = asyncio.run(create_topics(self.bootstrap_servers))
        print(f"  {len(created)} topics created" if created else "  topics already exist")
        self._check_interrupted()

        print(f"starting Anvil on {HOST}:{self.ports.anvil} (chain state in {self.state.anvil_state.name}) ...")
        self.anvil = self._start_infra(
            "anvil",
            lambda log: localstack.start_anvil(self.ports.anvil, self.state.anvil_state, log, block_time=1),
        )
        self._record_pids()
        self._check_interrupted()

        started = time.monotonic()
        # Anchoring starts last, once the trust policy is written: its settings require the file
        # to exist, and a provisional policy cannot be right on a first run, because the log's
        # verifier keys exist only once audit has made its signing keys. The other four start
        # now, and the contracts are deployed while they come up.
        for name in SERVICES:
            if name != "anchoring":
                self._start_service(name)

        print(f"setting up the chain side on {self.rpc_url} ...")
        self.deployment = chain_step("deploying the contracts", set_up_contracts(self.state, self.rpc_url))
        self._check_interrupted()

        # records too: the trust policy names its erasure-certificate key.
        self._wait_until_serving(["audit", "records"], started, timeout)
        print(f"registering the audit log {self.origin!r} on AnchorRegistry ...")
        chain_step(
            "registering the audit log",
            publish_log(
                self.state,
                self.rpc_url,
                self.deployment,
                self.origin,
                f"{HOST}:{self.ports.grpc('audit')}",
                f"{HOST}:{self.ports.grpc('records')}",
            ),
        )
        self._check_interrupted()

        self._start_service("anchoring")
        self._wait_until_serving(list(SERVICES), started, timeout)
        # The gateway last: it only forwards to the services, so it is ready when they are.
        for name in GATEWAYS:
            self._start_service(name)
        self._wait_until_serving(list(GATEWAYS), started, timeout)
        self._write_endpoints()

    def _start_openbao(self) -> None:
        server = openbao.OpenBao(
            self.state.openbao_dir,
            self.state.openbao_secrets_dir,
            localstack.repo_root() / "deploy" / "vault",
            api_port=self.ports.openbao,
            cluster_port=self.ports.openbao_cluster,
            log_path=self.state.log("openbao"),
        )
        first = not server.init_path.exists()
        print(
            f"starting OpenBao on {HOST}:{self.ports.openbao} "
            f"({'initializing it' if first else 'unsealing it'}; raft storage in {self.state.openbao_dir}) ..."
        )
        write_log_header(server.log_path)
        self.openbao = server
        try:
            server.start()
        except ConfigError as exc:
            self._printlog_tail("openbao", server.log_path)
            raise CommandError(f"OpenBao did not start: {exc}") from None
        finally:
            self._record_pids()
        print(f"  transit mounted, {len(server.policies)} policies loaded, a token per policy in {server.secrets_dir}")

    def _write_endpoints(self) -> None:
        """``stack.json``: where everything answers, for `demo`, the load generator and chaos."""
        endpoints = {
            "kafka_bootstrap_servers": self.bootstrap_servers,
            "chain_rpc_url": self.rpc_url,
            "key_manager": {"kind": "openbao", "address": self.openbao.address} if self.openbao else {"kind": "local"},
            "grpc": {s: f"{HOST}:{self.ports.grpc(s)}" for s in SERVICES},
            "metrics": {s: f"http://{HOST}:{self.ports.metrics(s)}/metrics" for s in SERVICES},
            "fhir": {
                "base_url": self.ports.fhir_base_url,
                "grpc": f"{HOST}:{self.ports.grpc('fhir')}",
                "metrics": f"http://{HOST}:{self.ports.metrics('fhir')}/metrics",
            },
        }
        write_atomically(self.state.endpoints_file, (json.dumps(endpoints, indent=2) + "\n").encode())

    def restart(self, name: str) -> localstack.ManagedProcess:
        """Start a service again after it died (the chaos suite kills them); same settings."""
        self._dead.discard(name)
        return self._spawn_service(name)

    def _start_service(self, name: str) -> None:
        proc = self._spawn_service(name)
        print(f"starting {name} (pid {proc.pid}) on {HOST}:{self.ports.grpc(name)} ...")

    def _start_infra(self, name: str, start: Callable[[Path], localstack.ManagedProcess]) -> localstack.ManagedProcess:
        log = self.state.log(name)
        write_log_header(log)
        try:
            proc = start(log)
        except (RuntimeError, TimeoutError, OSError) as exc:
            self._printlog_tail(name, log)
            raise CommandError(f"{name} did not start: {exc}") from None
        return proc

    def _spawn_service(self, name: str) -> localstack.ManagedProcess:
        log = self.state.log(name)
        write_log_header(log)
        if name in GATEWAYS:
            own = gateway_environment(name, state=self.state, ports=self.ports)
        else:
            own = service_environment(
                name,
                state=self.state,
                ports=self.ports,
                origin=self.origin,
                database_url=self.database_url,
                key_server=self.openbao,
                deployment=self.deployment,
            )
        env = {**os.environ, **own}
        proc = localstack.ManagedProcess.spawn(name, [sys.executable, "-m", f"medledger_{name}"], log, env=env)
        self.services[name] = proc
        self._record_pids()
        return proc

    def _wait_until_serving(self, names: list[str], started: float, timeout: float) -> None:
        """Wait until each of `names` reports SERVING, `timeout` seconds from `started` at most."""
        pending = [name for name in names if name not in self._serving]
        if not pending:
            return
        print(f"waiting for {', '.join(pending)} to report SERVING ...")
        last_note = time.monotonic()
        # Short reconnect backoff: the default grows to minutes while a server is still starting.
        options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
        channels = {s: grpc.insecure_channel(f"{HOST}:{self.ports.grpc(s)}", options=options) for s in pending}
        try:
            while pending:
                self._check_interrupted()
                for name in list(pending):
                    proc = self.services[name]
                    if not proc.alive():
                        self._printlog_tail(name, proc.log_path)
                        raise CommandError(
                            f"{name} exited with {describe_exit(proc.proc.returncode)} while starting; "
                            f"its log is {proc.log_path}"
                        )
                    if localstack.port_in_use(self.ports.grpc(name)) and serving(channels[name]):
                        print(f"  {name} is serving ({time.monotonic() - started:.1f} s)")
                        pending.remove(name)
                        self._serving.add(name)
                now = time.monotonic()
                if pending and now - started > timeout:
                    for name in pending:
                        self._printlog_tail(name, self.services[name].log_path)
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

    @property
    def rpc_url(self) -> str:
        return f"http://{HOST}:{self.ports.anvil}"

    def watch(self) -> int:
        """Wait for Ctrl-C or SIGTERM; report processes that die meanwhile. Returns the exit code."""
        while self._signal is None:
            for name, proc in self.services.items():
                if name not in self._dead and not proc.alive():
                    self._dead.add(name)
                    print(
                        f"{name} (pid {proc.pid}) exited unexpectedly with "
                        f"{describe_exit(proc.proc.returncode)}; the other processes keep running."
                    )
                    self._printlog_tail(name, proc.log_path)
            for infra in self._infra():
                if not infra.alive():
                    self._printlog_tail(infra.name, infra.log_path)
                    print(
                        f"{infra.name} (pid {infra.pid}) exited unexpectedly with "
                        f"{describe_exit(infra.proc.returncode)}; every service depends on it, so stopping the stack."
                    )
                    return 1
            time.sleep(0.5)
        print(f"received {signal.Signals(self._signal).name}; stopping")
        return 1 if self._dead else 0

    # Stop --------------------------------------------------------------------------------

    def stop_all(self) -> None:
        """The gateway first (its calls in flight need the services to finish), then the services
        (they drain calls and flush to Kafka), then Anvil (SIGTERM makes it dump its chain
        state), then Kafka. Only what this ``up`` started."""
        alive = {name for name, proc in self.services.items() if proc.alive()}
        for tier in (GATEWAYS, SERVICES):
            procs = {name: proc for name, proc in self.services.items() if name in tier}
            for proc in procs.values():
                proc.signal(signal.SIGTERM)  # all at once, so their grace periods overlap
            deadline = time.monotonic() + SERVICE_STOP_SECONDS
            for name, proc in procs.items():
                self._stop(proc, max(0.1, deadline - time.monotonic()), was_alive=name in alive)
        for infra in reversed(self._infra()):
            self._stop(infra, INFRA_STOP_SECONDS, was_alive=infra.alive())
        stop_children_since(self._children_before)
        self.state.clear_pids()

    def _stop(self, proc: localstack.ManagedProcess, timeout: float, was_alive: bool) -> None:
        try:
            code = proc.stop(timeout)
        except subprocess.TimeoutExpired:
            print(f"could not stop {proc.name} (pid {proc.pid}); it is still running")
            return
        if not was_alive:
            print(f"{proc.name} (pid {proc.pid}) had already exited ({describe_exit(code)})")
        elif code == -signal.SIGKILL:
            print(f"killed {proc.name} (pid {proc.pid}): it did not stop within {timeout:.0f} s of SIGTERM")
        else:
            print(f"stopped {proc.name} (pid {proc.pid})")

    # Helpers -----------------------------------------------------------------------------

    def _infra(self) -> list[localstack.ManagedProcess]:
        """What every service depends on, in the order started: Kafka, OpenBao, Anvil."""
        bao = self.openbao.process if self.openbao is not None else None
        return [p for p in (self.kafka, bao, self.anvil) if p is not None]

    def _record_pids(self) -> None:
        started = [*self._infra(), *self.services.values()]
        self.state.write_pids(
            RecordedProcess.of("medledger up", os.getpid()),
            [RecordedProcess.of(p.name, p.pid) for p in started],
        )

    def _printlog_tail(self, name: str, log: Path) -> None:
        lines = log_tail(log, LOG_TAIL_LINES)
        if not lines:
            print(f"  ({name} wrote nothing to {log})")
            return
        print(f"  last lines of {log}:")
        for line in lines:
            print(f"  | {line}")


async def create_topics(bootstrap_servers: str, within: float = 30.0) -> list[str]:
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
