"""Audit's settings: the common ones under MEDLEDGER_, with audit's default ports."""

from medledger_common.settings import ServiceSettings


class AuditSettings(ServiceSettings):
    grpc_port: int = 50055
    metrics_port: int = 9105
    database_url: str = "sqlite+aiosqlite:///.medledger/audit.db"
