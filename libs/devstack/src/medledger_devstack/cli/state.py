"""The state folder of ``medledger up`` (``.medledger/`` by default) and who is running from it.

Layout::

    .medledger/
      MEDLEDGER_STATE     marker: this folder is ours, ``medledger reset`` may delete it
      up.pid              JSON: the running ``up`` and the pids of the processes it started
      <service>.db        one SQLite database per service
      anvil-state.json    the chain state Anvil dumps every second and on SIGTERM
      logs/<name>.log     one log per process (kafka, openbao, anvil, each service, fhir)
      key-manager         where the keys are: "openbao" (the default) or "local" (keyrings/)
      openbao/            OpenBao's raft storage and config; openbao-init.json holds the unseal
                          key and root token (0600), used only by ``up``
      secrets/            client secrets (services/<name>.secret, the gateway's fhir.secret
                          too), openbao/<policy>.token (one token per service and role),
                          keyring master keys (--keys local), and anchorer.key: the
                          anchoring service's chain account (hex private key, mode 0600)
      chain.json          the deployed registries, their owner, the anchorer and the RPC URL
      trust-policy.json   what a verifier of anchored proofs trusts: publish this file
      stack.json          where the running stack answers: Kafka, the chain, each service's gRPC
                          and metrics, and the FHIR gateway's base URL (``fhir.base_url``);
                          written once every service and the gateway serve

Later commands keep their own files here too (keyrings/, with --keys local).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from medledger_runtime.keys import create_master_key_file

DEFAULT_STATE_DIR = ".medledger"
# The bootstrap admin that identity makes from `secrets/admin.secret`.
ADMIN_PRINCIPAL = "svc_admin"
MARKER = "MEDLEDGER_STATE"
PID_FILE = "up.pid"
KEY_MANAGER_FILE = "key-manager"


@dataclass(frozen=True)
class RecordedProcess:
    """A process as written to ``up.pid``. The start time (from /proc) tells a live process
    from an unrelated one that was given the same pid after ours exited."""

    name: str
    pid: int
    start_ticks: int | None

    @classmethod
    def of(cls, name: str, pid: int) -> RecordedProcess:
        return cls(name, pid, process_start_ticks(pid))

    def alive(self) -> bool:
        if not pid_exists(self.pid) or is_zombie(self.pid):
            return False  # a zombie has exited; only its parent's wait is missing
        if self.start_ticks is None:
            return True
        return process_start_ticks(self.pid) == self.start_ticks


@dataclass(frozen=True)
class StateDir:
    path: Path

    @classmethod
    def at(cls, path: str | Path) -> StateDir:
        # Absolute, because the services get SQLite URLs built from it and may run elsewhere.
        return cls(Path(path).expanduser().resolve())

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def database_url(self, service: str) -> str:
        return f"sqlite+aiosqlite:///{self.path / f'{service}.db'}"

    # Credentials and key material, made on first use and kept with the rest of the state. The
    # master keys sit in secrets/, outside keyrings/, as the local keyring requires.
    def _secret(self, path: Path, make: Callable[[Path], object]) -> Path:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            make(path)
        return path

    def master_key_file(self, service: str) -> Path:
        return self._secret(self.path / "secrets" / f"master-{service}.key", create_master_key_file)

    def keyring_file(self, service: str) -> Path:
        return self.path / "keyrings" / f"{service}.keyring"

    def service_secrets_dir(self) -> Path:
        return self.path / "secrets" / "services"

    def service_secret_file(self, service: str) -> Path:
        return self._secret(self.service_secrets_dir() / f"{service}.secret", _write_new_secret)

    def admin_secret_file(self) -> Path:
        return self._secret(self.path / "secrets" / "admin.secret", _write_new_secret)

    def anchorer_key_file(self) -> Path:
        """The anchoring service's chain account: made once, reused by every later ``up``."""
        return self._secret(self.path / "secrets" / "anchorer.key", _write_new_chain_key)

    @property
    def openbao_dir(self) -> Path:
        """OpenBao's raft storage, config and init file (unseal key and root token, 0600)."""
        return self.path / "openbao"

    @property
    def openbao_secrets_dir(self) -> Path:
        """One token file per policy (0600): the services' credentials for OpenBao."""
        return self.path / "secrets" / "openbao"

    def key_manager(self) -> str | None:
        """Where this folder's keys are: "openbao" or "local"; None for a new folder. Folders
        from before the choice existed have keyring files."""
        try:
            return (self.path / KEY_MANAGER_FILE).read_text().strip()
        except FileNotFoundError:
            return "local" if any((self.path / "keyrings").glob("*.keyring")) else None

    def record_key_manager(self, kind: str) -> None:
        (self.path / KEY_MANAGER_FILE).write_text(kind + "\n")

    @property
    def chain_file(self) -> Path:
        return self.path / "chain.json"

    @property
    def endpoints_file(self) -> Path:
        return self.path / "stack.json"

    @property
    def trust_policy_file(self) -> Path:
        return self.path / "trust-policy.json"

    @property
    def anvil_state(self) -> Path:
        return self.path / "anvil-state.json"

    @property
    def pid_file(self) -> Path:
        return self.path / PID_FILE

    def create(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        marker = self.path / MARKER
        if not marker.exists():
            marker.write_text("This folder holds the local state of `medledger up`; `medledger reset` deletes it.\n")

    def write_pids(self, supervisor: RecordedProcess, processes: list[RecordedProcess]) -> None:
        data = {"supervisor": asdict(supervisor), "processes": [asdict(p) for p in processes]}
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.pid_file)  # never a half-written file for `reset` to misread

    def clear_pids(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    def running(self) -> list[RecordedProcess]:
        """Processes recorded in ``up.pid`` that are still alive: the ``up`` itself and any
        child it left behind (if it was killed with SIGKILL, say)."""
        try:
            data = json.loads(self.pid_file.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError):
            return []  # unreadable: nothing we can identify as running
        recorded = [data.get("supervisor"), *data.get("processes", [])]
        alive = []
        for entry in recorded:
            if not isinstance(entry, dict):
                continue
            try:
                proc = RecordedProcess(str(entry["name"]), int(entry["pid"]), entry.get("start_ticks"))
            except (KeyError, TypeError, ValueError):
                continue
            if proc.alive():
                alive.append(proc)
        return alive

    def looks_like_ours(self) -> bool:
        # The services' own default is `.medledger/<name>.db`, so a folder by that name is ours
        # even if `up` never wrote the marker; any other folder needs the marker.
        return (self.path / MARKER).exists() or self.path.name == DEFAULT_STATE_DIR

    def remove(self) -> list[str]:
        """Delete the folder; returns a line per top-level entry removed."""
        removed = []
        for entry in sorted(self.path.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                files = sum(1 for p in entry.rglob("*") if p.is_file())
                removed.append(f"{entry.name}/ ({files} file{'s' if files != 1 else ''})")
            else:
                removed.append(f"{entry.name} ({_size(entry)})")
        shutil.rmtree(self.path)
        return removed


def _write_new_secret(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("mlsec_" + secrets.token_urlsafe(32) + "\n")


def _write_new_chain_key(path: Path) -> None:
    from eth_account import Account  # web3's; imported here so `reset` and `--help` stay quick

    key = bytes(Account.create().key)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("0x" + key.hex() + "\n")


def read_chain_key(path: Path) -> str:
    """The hex private key in ``path`` (0x-prefixed, as ``_write_new_chain_key`` writes it)."""
    return path.read_text().strip()


def describe_running(processes: list[RecordedProcess]) -> str:
    return ", ".join(f"{p.name} (pid {p.pid})" for p in processes)


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def is_zombie(pid: int) -> bool:
    """The process has exited and waits for its parent to reap it (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def process_start_ticks(pid: int) -> int | None:
    """The process start time in clock ticks since boot (Linux /proc), or None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 overall


def _size(path: Path) -> str:
    try:
        size = float(path.lstat().st_size)
    except OSError:
        return "?"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
