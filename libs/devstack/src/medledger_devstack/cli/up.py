"""``medledger up``: the whole stack on this machine, in the foreground, until Ctrl-C.

It starts Kafka (Tansu), creates the topics and their dead-letter topics, starts Anvil with its
chain state in the state folder, then the five services, each its own process with its own log,
and waits until every one answers the gRPC health check with SERVING; then the FHIR gateway in
front of them (FHIR R4 REST at ``http://127.0.0.1:8080/fhir/R4`` by default, ``--fhir-port``),
which keeps no state of its own.

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

This module is the command (its options, the checks before anything starts, the table of
endpoints); the stack itself is ``medledger_devstack.stack``.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import sys
from typing import Any

from medledger_devstack import localstack, openbao
from medledger_devstack.cli.reset import reset_state
from medledger_devstack.cli.state import ADMIN_PRINCIPAL, DEFAULT_STATE_DIR, StateDir, describe_running
from medledger_devstack.stack.layout import (
    DEFAULT_ANVIL_PORT,
    DEFAULT_FHIR_PORT,
    DEFAULT_GRPC_PORT_BASE,
    DEFAULT_KAFKA_PORT,
    DEFAULT_LOG_ORIGIN,
    DEFAULT_METRICS_PORT_BASE,
    DEFAULT_OPENBAO_PORT,
    GATEWAYS,
    HOST,
    KEY_MANAGERS,
    SERVICES,
    Ports,
)
from medledger_devstack.stack.supervisor import Interrupted, Stack
from medledger_runtime.settings import ConfigError
from medledger_sdk.cli.errors import CommandError
from medledger_verifier import notes


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "up",
        help="run Kafka, Anvil, the five services and the FHIR gateway locally until Ctrl-C",
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
        "--fhir-port",
        type=port_number,
        default=DEFAULT_FHIR_PORT,
        help="the FHIR gateway's HTTP port; FHIR R4 REST answers at /fhir/R4 (default: %(default)s)",
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
        help=(
            "gRPC port of identity; consent, records, anchoring, audit get the next four and the FHIR "
            "gateway (health only) the one after (default: %(default)s)"
        ),
    )
    parser.add_argument(
        "--metrics-port-base",
        type=port_number,
        default=DEFAULT_METRICS_PORT_BASE,
        help=(
            "metrics port of identity; the other services and the FHIR gateway get the next five (default: %(default)s)"
        ),
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
    # A base port leaves room for the block after it: the services' and the gateway's.
    highest = 65535 - (len(SERVICES) + len(GATEWAYS) - 1)
    if not 1 <= value <= highest:
        raise argparse.ArgumentTypeError(f"{value} is not a usable port (1 to {highest})")
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
    ports = Ports(
        args.kafka_port, args.anvil_port, args.grpc_port_base, args.metrics_port_base, args.openbao_port, args.fhir_port
    )
    preflight(state, ports, args.keys)
    if args.reset:
        reset_state(state)
    state.create()
    check_key_manager(state, args.keys)
    stack = Stack(state, ports, args.log_origin, database_url=args.database_url, keys=args.keys)
    with stack.handling_signals():
        try:
            stack.start(args.start_timeout)
            print_endpoints(stack)
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

    for module in (f"medledger_{s}" for s in (*SERVICES, *GATEWAYS)):
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


def print_endpoints(stack: Stack) -> None:
    """Where everything answers, for the person who ran ``up``."""
    rows = [("service", "pid", "gRPC", "metrics")]
    for name in (*SERVICES, *GATEWAYS):
        rows.append(
            (
                name,
                str(stack.services[name].pid),
                f"{HOST}:{stack.ports.grpc(name)}",
                f"http://{HOST}:{stack.ports.metrics(name)}/metrics",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print()
    assert stack.kafka is not None and stack.anvil is not None
    print(f"  Kafka bootstrap  {stack.bootstrap_servers}  (pid {stack.kafka.pid})")
    print(f"  Anvil RPC        {stack.rpc_url}  (pid {stack.anvil.pid})")
    if stack.openbao is not None and stack.openbao.process is not None:
        print(
            f"  OpenBao          {stack.openbao.address}  (pid {stack.openbao.process.pid}; unseal key and "
            f"root token in {stack.openbao.init_path})"
        )
    else:
        print(f"  keys             a local keyring per service in {stack.state.path / 'keyrings'}")
    if stack.deployment is not None:
        d = stack.deployment
        print(f"  AnchorRegistry   {d.anchor_registry}  (chain id {d.chain_id}, owner {d.owner})")
        print(f"  ConsentRegistry  {d.consent_registry}")
        print(f"  anchorer         {d.anchorer}  (key in {stack.state.anchorer_key_file()})")
        print(f"  chain            {stack.state.chain_file}")
        print(f"  trust policy     {stack.state.trust_policy_file}  (publish it for verifiers)")
    print(f"  FHIR R4 base     {stack.ports.fhir_base_url}  (CapabilityStatement at /metadata)")
    print(f"  JWKS             http://{HOST}:{stack.ports.jwks}/.well-known/jwks.json")
    print(f"  audit log tiles  http://{HOST}:{stack.ports.tiles}/checkpoint")
    print(f"  admin            principal {ADMIN_PRINCIPAL}, client secret in {stack.state.admin_secret_file()}")
    print(f"  state folder     {stack.state.path}")
    print(f"  logs             {stack.state.logs}")
    print()
