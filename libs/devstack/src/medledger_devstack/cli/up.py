"""``medledger up``: the whole stack on this machine, in the foreground, until Ctrl-C.

It starts Kafka (Tansu), creates the topics and their dead-letter topics, starts Anvil with its
chain state in the state folder, then the five services, each its own process with its own log,
and waits until every one answers the gRPC health check with SERVING.

The chain side: ``up`` makes the anchoring service's account (``secrets/anchorer.key``), deploys
AnchorRegistry and ConsentRegistry from Anvil's first development account (their owner), names
the anchorer on both and funds it, and records the addresses in ``chain.json``; a later ``up`` on
the same folder reuses them (Anvil keeps its chain in the folder). Once audit serves, ``up``
registers the log's origin and P-256 checkpoint key on AnchorRegistry and writes
``trust-policy.json``, the file an operator publishes for verifiers of anchored proofs. On Ctrl-C or SIGTERM it
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
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import grpc
from aiokafka.errors import KafkaError
from eth_account import Account
from eth_utils.address import to_checksum_address
from grpc_health.v1 import health_pb2, health_pb2_grpc
from medledger.audit.v1 import audit_service_pb2, audit_service_pb2_grpc
from medledger.records.v1 import records_service_pb2, records_service_pb2_grpc
from web3.exceptions import ContractCustomError
from web3.types import Wei

from medledger_devstack import contracts, localstack, openbao
from medledger_devstack.cli.reset import reset_state
from medledger_devstack.cli.state import (
    ADMIN_PRINCIPAL,
    DEFAULT_STATE_DIR,
    RecordedProcess,
    StateDir,
    describe_running,
    read_chain_key,
)
from medledger_runtime.files import write_atomically
from medledger_runtime.kafka import ensure_topics
from medledger_runtime.settings import ConfigError
from medledger_sdk.cli.errors import CommandError
from medledger_verifier import chain, notes
from medledger_verifier.anchored_proofs import TrustPolicy

_T = TypeVar("_T")

HOST = localstack.HOST
# In port order: identity gets the base port, audit base + 4.
SERVICES = ("identity", "consent", "records", "anchoring", "audit")

DEFAULT_KAFKA_PORT = 9092
DEFAULT_ANVIL_PORT = 8545
DEFAULT_GRPC_PORT_BASE = 50051
DEFAULT_METRICS_PORT_BASE = 9101
# OpenBao's API; its cluster port (raft) is the next one.
DEFAULT_OPENBAO_PORT = 8200
# Where the service keys live: a real OpenBao server (the default: the key manager a deployment
# uses, with policies that decide which service may do what), or each service's local keyring
# file (for a machine without the bao binary).
KEY_MANAGERS = ("openbao", "local")

# Longer than a service's own shutdown grace (10 s by default) so a clean drain is not cut short.
SERVICE_STOP_SECONDS = 15.0
INFRA_STOP_SECONDS = 10.0
LOG_TAIL_LINES = 25
LOG_RUN_HEADER = "----- medledger up: "

DEFAULT_LOG_ORIGIN = "medledger.local/audit"
ETHER = 10**18
ANCHORER_FUNDS_WEI = 10 * ETHER
# A reused anchorer with less than this is topped up with ANCHORER_FUNDS_WEI.
ANCHORER_LOW_WEI = 1 * ETHER
# What the local trust policy asks of an anchor: Anvil mines a block a second, one is enough.
MIN_CONFIRMATIONS = 1


@dataclass(frozen=True)
class Ports:
    kafka: int
    anvil: int
    grpc_base: int
    metrics_base: int
    openbao: int = DEFAULT_OPENBAO_PORT

    def grpc(self, service: str) -> int:
        return self.grpc_base + SERVICES.index(service)

    def metrics(self, service: str) -> int:
        return self.metrics_base + SERVICES.index(service)

    @property
    def jwks(self) -> int:
        """identity's HTTP port, where the JWKS is: 9111 with the default metrics ports."""
        return self.metrics_base + 10

    @property
    def tiles(self) -> int:
        """audit's HTTP port, where the log's tiles are: 9115 with the default metrics ports."""
        return self.metrics_base + 14

    @property
    def openbao_cluster(self) -> int:
        return self.openbao + 1

    def purposes(self, keys: str = "openbao") -> list[tuple[int, str]]:
        """Every port the stack needs, with what it is for."""
        needed = [(self.kafka, "Kafka (Tansu)"), (self.anvil, "Anvil JSON-RPC")]
        if keys == "openbao":
            needed += [(self.openbao, "OpenBao API"), (self.openbao_cluster, "OpenBao cluster")]
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
        "--kafka-port", type=port_number, default=DEFAULT_KAFKA_PORT, help="Kafka (Tansu) port (default: %(default)s)"
    )
    parser.add_argument(
        "--anvil-port", type=port_number, default=DEFAULT_ANVIL_PORT, help="Anvil JSON-RPC port (default: %(default)s)"
    )
    parser.add_argument(
        "--openbao-port",
        type=port_number,
        default=DEFAULT_OPENBAO_PORT,
        help="OpenBao's API port; its cluster port is the next one (default: %(default)s)",
    )
    parser.add_argument(
        "--keys",
        choices=KEY_MANAGERS,
        default="openbao",
        help=(
            "where the services keep their keys: a real OpenBao server with the policies of deploy/vault "
            "(default), or a local keyring file per service (no OpenBao needed)"
        ),
    )
    parser.add_argument(
        "--grpc-port-base",
        type=port_number,
        default=DEFAULT_GRPC_PORT_BASE,
        help="gRPC port of identity; consent, records, anchoring, audit get the next four (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-port-base",
        type=port_number,
        default=DEFAULT_METRICS_PORT_BASE,
        help="metrics port of identity; the other services get the next four (default: %(default)s)",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for every service to report SERVING (default: %(default)s)",
    )
    parser.add_argument(
        "--log-origin",
        type=_origin,
        default=DEFAULT_LOG_ORIGIN,
        help="the audit log's origin, registered on chain and named in the trust policy (default: %(default)s)",
    )
    parser.add_argument(
        "--database-url",
        type=_database_url,
        metavar="TEMPLATE",
        help=(
            "each service's SQLAlchemy database URL, with {service} for its name, e.g. "
            "postgresql+asyncpg://medledger@db.example:5432/medledger_{service} (the databases must exist; "
            "default: a SQLite file per service in the state folder)"
        ),
    )
    parser.add_argument("--reset", action="store_true", help="delete the state folder first (like `medledger reset`)")
    parser.set_defaults(func=run)


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535 - (len(SERVICES) - 1):
        raise argparse.ArgumentTypeError(f"{value} is not a usable port (1 to {65535 - (len(SERVICES) - 1)})")
    return value


def _database_url(text: str) -> str:
    if "{service}" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} has no {{service}}: the five services need a database each")
    return text


def _origin(text: str) -> str:
    if not notes.valid_key_name(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a log origin (non-empty, no space or '+')")
    return text


def run(args: argparse.Namespace) -> int:
    state = StateDir.at(args.state_dir)
    ports = Ports(args.kafka_port, args.anvil_port, args.grpc_port_base, args.metrics_port_base, args.openbao_port)
    preflight(state, ports, args.keys)
    if args.reset:
        reset_state(state)
    state.create()
    check_key_manager(state, args.keys)
    stack = Stack(state, ports, args.log_origin, database_url=args.database_url, keys=args.keys)
    with stack.handling_signals():
        try:
            stack.start(args.start_timeout)
            stack.print_endpoints()
            print("ready: medledger is up; press Ctrl-C to stop it")
            return stack.watch()
        except Interrupted as exc:
            print(f"received {exc.signal_name} while starting; stopping what was started")
            return 128 + exc.signum
        finally:
            stack.stop_all()


def preflight(state: StateDir, ports: Ports, keys: str = "openbao") -> None:
    """Everything that can be checked before starting a process; raises CommandError."""
    by_port: dict[int, list[str]] = {}
    for port, what in ports.purposes(keys):
        by_port.setdefault(port, []).append(what)
    clashes = [f"{port} ({' and '.join(whats)})" for port, whats in by_port.items() if len(whats) > 1]
    if clashes:
        raise CommandError("the port options overlap; one port cannot serve two things: " + ", ".join(clashes))

    running = state.running()
    if running:
        raise CommandError(
            f"medledger is already running from {state.path}: {describe_running(running)}. "
            f"Stop it first (`medledger down --state-dir {state.path}`), or use another --state-dir."
        )

    for module in (f"medledger_{s}" for s in SERVICES):
        if importlib.util.find_spec(module) is None:
            raise CommandError(f"the {module} package is not installed in {sys.executable}; run `uv sync`")
    try:
        localstack.tansu_bin()
        localstack.anvil_bin()
        if keys == "openbao":
            openbao.bao_bin()
    except (FileNotFoundError, ImportError, ConfigError) as exc:
        hint = " (or run with --keys local)" if keys == "openbao" else ""
        raise CommandError(f"a tool the stack needs is missing: {exc}{hint}") from None

    taken = [f"port {port} ({what})" for port, what in ports.purposes(keys) if port_taken(port)]
    if taken:
        raise CommandError(
            f"cannot start: {', '.join(taken)} {'is' if len(taken) == 1 else 'are'} already in use on {HOST}. "
            f"Stop whatever uses {'it' if len(taken) == 1 else 'them'}, or choose other ports "
            "(see `medledger up --help`). Nothing was started."
        )


def check_key_manager(state: StateDir, keys: str) -> None:
    """A state folder keeps its keys where it first kept them: data encrypted under one key
    manager cannot be read with the other's keys."""
    recorded = state.key_manager()
    if recorded is None:
        state.record_key_manager(keys)
    elif recorded != keys:
        raise CommandError(
            f"the state folder {state.path} keeps its keys in {_KEYS_IN[recorded]}, and its data is encrypted "
            f"under them; run `medledger up --keys {recorded}`, or start afresh with --reset (deletes the folder)"
        )


_KEYS_IN = {"openbao": "OpenBao", "local": "local keyring files"}


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
        self._children_before = set(_own_children())
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

        started = time.monotonic()
        # Anchoring starts last, once the trust policy is written: its settings require the file
        # to exist, and a provisional policy cannot be right on a first run, because the log's
        # verifier keys exist only once audit has made its signing keys. The other four start
        # now, and the contracts are deployed while they come up.
        for name in SERVICES:
            if name != "anchoring":
                self._start_service(name)

        print(f"setting up the chain side on {self.rpc_url} ...")
        self.deployment = _chain_step("deploying the contracts", set_up_contracts(self.state, self.rpc_url))
        self._check_interrupted()

        # records too: the trust policy names its erasure-certificate key.
        self._wait_until_serving(["audit", "records"], started, timeout)
        print(f"registering the audit log {self.origin!r} on AnchorRegistry ...")
        _chain_step(
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
        _write_log_header(server.log_path)
        self.openbao = server
        try:
            server.start()
        except ConfigError as exc:
            self._print_log_tail("openbao", server.log_path)
            raise CommandError(f"OpenBao did not start: {exc}") from None
        finally:
            self._record_pids()
        print(f"  transit mounted, {len(server.policies)} policies loaded, a token per policy in {server.secrets_dir}")

    def _key_manager_env(self, name: str) -> dict[str, str]:
        """How a service reaches its keys: OpenBao with its own policy's token(s), else its keyring."""
        if self.openbao is None:
            return {
                "MEDLEDGER_MASTER_KEY_FILE": str(self.state.master_key_file(name)),
                "MEDLEDGER_KEYRING_FILE": str(self.state.keyring_file(name)),
            }
        everyday = self.openbao.token_file(name)
        if not everyday.exists():
            return {}  # a service without keys (anchoring): no token, no key manager
        env = {
            "MEDLEDGER_KEY_MANAGER": "vault",
            "MEDLEDGER_VAULT_ADDR": self.openbao.address,
            "MEDLEDGER_VAULT_TOKEN_FILE": str(everyday),
        }
        erasure = self.openbao.token_file(f"{name}-erasure")
        if erasure.exists():
            env["MEDLEDGER_ERASURE_VAULT_TOKEN_FILE"] = str(erasure)
        return env

    def _write_endpoints(self) -> None:
        """``stack.json``: where everything answers, for `demo`, the load generator and chaos."""
        endpoints = {
            "kafka_bootstrap_servers": self.bootstrap_servers,
            "chain_rpc_url": self.rpc_url,
            "key_manager": {"kind": "openbao", "address": self.openbao.address} if self.openbao else {"kind": "local"},
            "grpc": {s: f"{HOST}:{self.ports.grpc(s)}" for s in SERVICES},
            "metrics": {s: f"http://{HOST}:{self.ports.metrics(s)}/metrics" for s in SERVICES},
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
            "MEDLEDGER_DATABASE_URL": (
                self.database_url.replace("{service}", name) if self.database_url else self.state.database_url(name)
            ),
            "MEDLEDGER_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "MEDLEDGER_IDENTITY_ADDRESS": f"{HOST}:{self.ports.grpc('identity')}",
            "MEDLEDGER_CONSENT_ADDRESS": f"{HOST}:{self.ports.grpc('consent')}",  # records asks it
            **self._key_manager_env(name),
            "PYTHONUNBUFFERED": "1",  # so `tail -f` on the log shows lines as they happen
        }
        if name == "identity":
            # Every service's secret file exists before identity reads the folder.
            for other in SERVICES[1:]:
                self.state.service_secret_file(other)
            env["MEDLEDGER_SERVICE_SECRETS_DIR"] = str(self.state.service_secrets_dir())
            env["MEDLEDGER_BOOTSTRAP_ADMIN_SECRET_FILE"] = str(self.state.admin_secret_file())
            env["MEDLEDGER_HTTP_PORT"] = str(self.ports.jwks)
        else:
            env["MEDLEDGER_CLIENT_SECRET_FILE"] = str(self.state.service_secret_file(name))
        if name == "audit":
            env["MEDLEDGER_HTTP_PORT"] = str(self.ports.tiles)
            env["MEDLEDGER_LAST_CHECKPOINT_FILE"] = str(self.state.path / "audit" / "last-checkpoint")
            env["MEDLEDGER_LOG_ORIGIN"] = self.origin
        if name == "anchoring":
            assert self.deployment is not None, "anchoring starts after the contracts are deployed"
            env["MEDLEDGER_AUDIT_ADDRESS"] = f"{HOST}:{self.ports.grpc('audit')}"
            env["MEDLEDGER_LOG_ORIGIN"] = self.origin
            env["MEDLEDGER_CHAIN_RPC_URL"] = self.rpc_url
            env["MEDLEDGER_CHAIN_ID"] = str(self.deployment.chain_id)
            env["MEDLEDGER_ANCHOR_REGISTRY_ADDRESS"] = self.deployment.anchor_registry
            env["MEDLEDGER_CONSENT_REGISTRY_ADDRESS"] = self.deployment.consent_registry
            env["MEDLEDGER_ANCHORER_KEY_FILE"] = str(self.state.anchorer_key_file())
            env["MEDLEDGER_TRUST_POLICY_FILE"] = str(self.state.trust_policy_file)
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
                        self._print_log_tail(name, proc.log_path)
                        raise CommandError(
                            f"{name} exited with {_describe_exit(proc.proc.returncode)} while starting; "
                            f"its log is {proc.log_path}"
                        )
                    if localstack.port_in_use(self.ports.grpc(name)) and _serving(channels[name]):
                        print(f"  {name} is serving ({time.monotonic() - started:.1f} s)")
                        pending.remove(name)
                        self._serving.add(name)
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

    @property
    def rpc_url(self) -> str:
        return f"http://{HOST}:{self.ports.anvil}"

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
        print(f"  Anvil RPC        {self.rpc_url}  (pid {self.anvil.pid})")
        if self.openbao is not None and self.openbao.process is not None:
            print(
                f"  OpenBao          {self.openbao.address}  (pid {self.openbao.process.pid}; unseal key and "
                f"root token in {self.openbao.init_path})"
            )
        else:
            print(f"  keys             a local keyring per service in {self.state.path / 'keyrings'}")
        if self.deployment is not None:
            d = self.deployment
            print(f"  AnchorRegistry   {d.anchor_registry}  (chain id {d.chain_id}, owner {d.owner})")
            print(f"  ConsentRegistry  {d.consent_registry}")
            print(f"  anchorer         {d.anchorer}  (key in {self.state.anchorer_key_file()})")
            print(f"  chain            {self.state.chain_file}")
            print(f"  trust policy     {self.state.trust_policy_file}  (publish it for verifiers)")
        print(f"  JWKS             http://{HOST}:{self.ports.jwks}/.well-known/jwks.json")
        print(f"  audit log tiles  http://{HOST}:{self.ports.tiles}/checkpoint")
        print(f"  admin            principal {ADMIN_PRINCIPAL}, client secret in {self.state.admin_secret_file()}")
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
            for infra in self._infra():
                if not infra.alive():
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
        for infra in reversed(self._infra()):
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
        without stopping the process they spawned. It is still our child, so find it that way —
        among the children that appeared after the stack began, never one that was there before."""
        for pid in set(_own_children()) - self._children_before:
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

    def _print_log_tail(self, name: str, log: Path) -> None:
        lines = _log_tail(log, LOG_TAIL_LINES)
        if not lines:
            print(f"  ({name} wrote nothing to {log})")
            return
        print(f"  last lines of {log}:")
        for line in lines:
            print(f"  | {line}")


# The chain side ---------------------------------------------------------------------------


def _chain_step(what: str, step: Coroutine[Any, Any, _T]) -> _T:
    """Run one chain step to its end; a failure becomes a CommandError naming the step. Signals
    only set a flag (``handling_signals``), so a step is never cut in the middle of a transaction."""
    try:
        return asyncio.run(step)
    except CommandError:
        raise
    except Exception as exc:  # web3, HTTP and gRPC errors alike: say what failed and stop the stack
        raise CommandError(f"{what} failed: {type(exc).__name__}: {exc}") from None


def anchorer_address(state: StateDir) -> str:
    """The anchoring service's account, from its key file (made on first use)."""
    return str(Account.from_key(read_chain_key(state.anchorer_key_file())).address)


def recorded_deployment(state: StateDir) -> contracts.Deployment | None:
    try:
        return contracts.Deployment.from_json(json.loads(state.chain_file.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"  ignoring {state.chain_file}: unreadable ({type(exc).__name__}: {exc})")
        return None


async def _still_deployed(w3: chain.Web3, recorded: contracts.Deployment, anchorer: str) -> str | None:
    """Why the recorded deployment cannot be reused on this chain, or None if it can."""
    if await w3.eth.chain_id != recorded.chain_id:
        return f"it is on chain {recorded.chain_id}"
    for name, address in (("AnchorRegistry", recorded.anchor_registry), ("ConsentRegistry", recorded.consent_registry)):
        if not await w3.eth.get_code(to_checksum_address(address)):
            return f"this chain has no {name} at {address} (a new chain state)"
    if recorded.anchorer != anchorer:
        return f"it names another anchorer ({recorded.anchorer})"
    return None


async def set_up_contracts(state: StateDir, rpc_url: str) -> contracts.Deployment:
    """Deploy both registries (or reuse those ``chain.json`` records if this chain still holds
    them), make the anchorer their anchorer and writer, fund it, and write ``chain.json``."""
    anchorer = anchorer_address(state)
    w3 = chain.connect(rpc_url)
    try:
        recorded = recorded_deployment(state)
        why_not = None if recorded is None else await _still_deployed(w3, recorded, anchorer)
        if recorded is not None and why_not is None:
            deployment = recorded
            print(
                f"  reusing the contracts deployed at block {deployment.block_number}: AnchorRegistry at "
                f"{deployment.anchor_registry}, ConsentRegistry at {deployment.consent_registry}"
            )
            balance = await w3.eth.get_balance(to_checksum_address(anchorer))
            if balance < ANCHORER_LOW_WEI:
                tx = await w3.eth.send_transaction(
                    {"from": to_checksum_address(deployment.owner), "to": anchorer, "value": Wei(ANCHORER_FUNDS_WEI)}
                )
                await w3.eth.wait_for_transaction_receipt(tx)
                print(f"  anchorer {anchorer} had {balance / ETHER:.4f} ETH; funded with {_eth(ANCHORER_FUNDS_WEI)}")
            else:
                print(f"  anchorer {anchorer} has {balance / ETHER:.4f} ETH")
        else:
            if recorded is not None:
                print(f"  not reusing the contracts in {state.chain_file}: {why_not}")
            owner = (await w3.eth.accounts)[0]  # Anvil's first development account
            deployment = await contracts.deploy_registries(
                w3, owner=owner, anchorer=anchorer, fund_wei=ANCHORER_FUNDS_WEI
            )
            print(
                f"  deployed AnchorRegistry at {deployment.anchor_registry}, ConsentRegistry at "
                f"{deployment.consent_registry} (owner {deployment.owner}); anchorer {anchorer} is their "
                f"anchorer and writer, funded with {_eth(ANCHORER_FUNDS_WEI)}"
            )
        record = {**deployment.as_json(), "rpc_url": rpc_url}
        write_atomically(state.chain_file, (json.dumps(record, indent=2) + "\n").encode())
        state.chain_file.chmod(0o644)  # addresses only, nothing secret
        print(f"  recorded in {state.chain_file}")
        return deployment
    finally:
        await w3.provider.disconnect()


async def audit_verifier_keys(address: str) -> tuple[str, list[str]]:
    """The log's origin and verifier keys, from audit's public ``GetVerifierKeys``."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = audit_service_pb2_grpc.AuditServiceStub(channel)
        reply = await stub.GetVerifierKeys(audit_service_pb2.GetVerifierKeysRequest(), timeout=10.0)
    return reply.origin, list(reply.verifier_keys)


async def erasure_certificate_key(address: str) -> str:
    """The verifier key of erasure certificates, from records' public ``GetErasureVerifierKey``."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = records_service_pb2_grpc.RecordsServiceStub(channel)
        reply = await stub.GetErasureVerifierKey(records_service_pb2.GetErasureVerifierKeyRequest(), timeout=10.0)
    return str(reply.verifier_key)


async def publish_log(
    state: StateDir,
    rpc_url: str,
    deployment: contracts.Deployment,
    origin: str,
    audit_address: str,
    records_address: str | None = None,
) -> TrustPolicy:
    """Register the log's origin and P-256 checkpoint key on AnchorRegistry (rotating the key if
    the registry holds another, as after a reset of audit alone) and write ``trust-policy.json``,
    with records' erasure-certificate key when records answers at ``records_address``."""
    served_origin, keys = await audit_verifier_keys(audit_address)
    certificate_keys = (await erasure_certificate_key(records_address),) if records_address else ()
    if served_origin != origin:
        raise CommandError(f"audit signs checkpoints as {served_origin!r}, not {origin!r}")
    p256 = [v for v in map(notes.NoteVerifier.parse, keys) if v.signature_type == notes.SIGNATURE_ECDSA]
    if len(p256) != 1:
        raise CommandError(f"audit serves {len(p256)} P-256 verifier keys, not one: {keys}")
    key_text = next(k for k in keys if notes.NoteVerifier.parse(k) == p256[0])

    w3 = chain.connect(rpc_url)
    try:
        registry = chain.contract(w3, chain.ANCHOR_REGISTRY, deployment.anchor_registry)
        x, y = contracts.p256_xy(p256[0].public_key)
        try:
            registered: tuple[bytes, bytes] | None = tuple(await registry.functions.logKey(origin).call())
        except ContractCustomError:  # UnknownOrigin
            registered = None
        if registered is None:
            await contracts.register_log(w3, deployment.anchor_registry, deployment.owner, origin, p256[0].public_key)
            print(f"  registered the log {origin!r} with its P-256 key {key_text}")
        elif registered == (x, y):
            print(f"  the log {origin!r} is registered with its P-256 key {key_text}")
        else:
            await contracts.transact_and_wait(w3, registry.functions.rotateLogKey(origin, x, y), deployment.owner)
            print(f"  the registry held another key for {origin!r}: rotated it to {key_text}")
    finally:
        await w3.provider.disconnect()

    policy = TrustPolicy(
        origin=origin,
        log_verifier_keys=tuple(keys),
        chain_id=deployment.chain_id,
        anchor_registry=deployment.anchor_registry,
        min_confirmations=MIN_CONFIRMATIONS,
        erasure_certificate_keys=certificate_keys,
    )
    write_atomically(state.trust_policy_file, policy.to_json().encode())
    state.trust_policy_file.chmod(0o644)  # public: meant to be published
    print(
        f"  wrote the trust policy to {state.trust_policy_file}: log {origin!r} with {len(keys)} verifier "
        f"key{'s' if len(keys) != 1 else ''}, AnchorRegistry {deployment.anchor_registry} on chain "
        f"{deployment.chain_id}, {MIN_CONFIRMATIONS} confirmation{'s' if MIN_CONFIRMATIONS != 1 else ''}"
        + (f", erasure certificates signed by {certificate_keys[0]}" if certificate_keys else "")
    )
    return policy


def _eth(wei: int) -> str:
    return f"{wei / ETHER:g} ETH"


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
