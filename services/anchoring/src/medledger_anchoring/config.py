"""Anchoring's settings: the common ones under MEDLEDGER_, with anchoring's default ports."""

from medledger_common.settings import ServiceSettings


class AnchoringSettings(ServiceSettings):
    grpc_port: int = 50054
    metrics_port: int = 9104
    database_url: str = "sqlite+aiosqlite:///.medledger/anchoring.db"
