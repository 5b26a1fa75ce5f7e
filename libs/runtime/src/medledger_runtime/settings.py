"""Typed service settings from environment variables, all under one prefix.

Every service reads ``MEDLEDGER_<NAME>`` variables (see the README's configuration table).
A bad value stops the service at start with a message naming the variable, never later.
Secrets are never values in the environment: a variable names a file and the secret is read from it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from medledger_sdk.config import ConfigError as ConfigError
from medledger_sdk.config import read_secret_file as read_secret_file

ENV_PREFIX = "MEDLEDGER_"


class ServiceSettings(BaseSettings):
    """Settings every service shares. Services subclass it to add their own."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    metrics_port: int = Field(default=9101, ge=0, le=65535)
    # The service's HTTP routes (identity's JWKS, audit's tiles), all on this port; 0 picks a
    # free one. A service that declares no route listens on none.
    http_port: int = Field(default=9111, ge=0, le=65535)
    # Largest HTTP request body read, in bytes; a larger one is refused with 413.
    http_max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    # Upper bound for one gRPC message in either direction, in bytes.
    grpc_max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    # Seconds a SIGTERM waits for in-flight calls before cancelling them.
    shutdown_grace_seconds: float = Field(default=10.0, ge=0, le=300)
    # TLS: server certificate and key; a CA file as well turns on mTLS (clients must present one).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None

    database_url: str = "sqlite+aiosqlite:///.medledger/service.db"
    # PostgreSQL connections a replica keeps open, plus half that many more under bursts. Fewer
    # than a replica's concurrent transactions makes it open and close connections per request.
    database_pool_size: int = Field(default=20, ge=1, le=200)
    # Schema migrations: "start" applies them as the service starts (the embedded default);
    # "only" applies them and exits (a deployment's migration Job); "check" applies none and
    # refuses to start while one is missing (replicas, once that Job has run).
    migrations: Literal["start", "only", "check"] = "start"
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    # How long published outbox rows are kept for republishing after broker data loss.
    outbox_retention_seconds: float = Field(default=7 * 24 * 3600.0, ge=0)
    outbox_poll_seconds: float = Field(default=0.5, gt=0, le=60)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Fraction of root traces sampled; child spans follow their parent's decision.
    trace_sampling_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    # OTLP/gRPC collector endpoint, e.g. http://otel-collector:4317; empty: no export.
    otlp_endpoint: str = ""

    # Key manager: "local" (an encrypted keyring file) or "vault" (HashiCorp Vault transit).
    key_manager: Literal["local", "vault"] = "local"
    # Local keyring file; default .medledger/keyrings/<service>.keyring.
    keyring_file: Path | None = None
    # The local keyring's master key: a file outside the keyring's folder (a mounted secret).
    master_key_file: Path | None = None
    vault_addr: str = ""
    vault_token_file: Path | None = None
    vault_transit_mount: str = "transit"
    # Vault only: the token the service's erasure path destroys its own keys with (policy
    # `<service>-erasure`); the everyday token cannot delete keys. Required with Vault for a
    # service that keeps per-patient keys.
    erasure_vault_token_file: Path | None = None
    # Vault only, while the key-owner migration runs: a token that may decrypt under the old
    # shared `patient-<id>` keys (policy `legacy-patient-keys`). Revoke it once every service
    # reports the migration done.
    legacy_vault_token_file: Path | None = None

    # Authentication: where identity is (JWKS, deactivated principals), and this service's own
    # client secret (a mounted file; its principal is svc_<service>).
    identity_address: str = "127.0.0.1:50051"
    client_secret_file: Path | None = None

    @field_validator(
        "tls_cert_file",
        "tls_key_file",
        "tls_ca_file",
        "master_key_file",
        "vault_token_file",
        "erasure_vault_token_file",
        "legacy_vault_token_file",
        "client_secret_file",
    )
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {value} does not exist")
        return value


S = TypeVar("S", bound=ServiceSettings)

# Variables that were renamed: refused by name rather than ignored, so a deployment that set
# one does not quietly move to the default.
RENAMED = {
    "MEDLEDGER_JWKS_HTTP_PORT": "MEDLEDGER_HTTP_PORT",
    "MEDLEDGER_TILES_HTTP_PORT": "MEDLEDGER_HTTP_PORT",
}


def load_settings(cls: type[S]) -> S:
    """Read settings from the environment, or raise ConfigError naming each bad variable."""
    renamed = [f"{old} is now {new}" for old, new in RENAMED.items() if old in os.environ]
    if renamed:
        raise ConfigError("invalid configuration: " + "; ".join(renamed))
    try:
        return cls()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            problems.append(f"{ENV_PREFIX}{field.upper()}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def load_settings_or_exit(cls: type[S]) -> S:
    """For a service's main: a bad setting stops the process with a readable message."""
    try:
        return load_settings(cls)
    except ConfigError as exc:
        print(f"medledger: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
