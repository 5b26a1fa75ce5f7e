"""Consent's settings: the common ones under MEDLEDGER_, with consent's default ports."""

from pydantic import Field

from medledger_runtime.settings import ServiceSettings


class ConsentSettings(ServiceSettings):
    grpc_port: int = 50052
    metrics_port: int = 9102
    database_url: str = "sqlite+aiosqlite:///.medledger/consent.db"
    # Group commit of decision records: commits start at most this often under load.
    decision_commit_interval_seconds: float = Field(default=0.008, ge=0.0, le=0.1)
