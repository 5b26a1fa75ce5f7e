"""Consent's settings: the common ones under MEDLEDGER_, with consent's default ports."""

from medledger_common.settings import ServiceSettings


class ConsentSettings(ServiceSettings):
    grpc_port: int = 50052
    metrics_port: int = 9102
    database_url: str = "sqlite+aiosqlite:///.medledger/consent.db"
