"""Records's settings: the common ones under MEDLEDGER_, with records's default ports."""

from medledger_common.settings import ServiceSettings


class RecordsSettings(ServiceSettings):
    grpc_port: int = 50053
    metrics_port: int = 9103
    database_url: str = "sqlite+aiosqlite:///.medledger/records.db"
    # Where consent answers (records asks it before every read and write).
    consent_address: str = "127.0.0.1:50052"
