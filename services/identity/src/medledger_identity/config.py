"""Identity's settings: the common ones under MEDLEDGER_, with identity's default ports."""

from medledger_common.settings import ServiceSettings


class IdentitySettings(ServiceSettings):
    grpc_port: int = 50051
    metrics_port: int = 9101
    database_url: str = "sqlite+aiosqlite:///.medledger/identity.db"
