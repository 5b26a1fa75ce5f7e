"""Records's settings: the common ones under MEDLEDGER_, with records's default ports."""

from pathlib import Path
from typing import Literal

from pydantic import Field

from medledger_common.settings import ServiceSettings

DAY = 24 * 3600.0


class RecordsSettings(ServiceSettings):
    grpc_port: int = 50053
    metrics_port: int = 9103
    database_url: str = "sqlite+aiosqlite:///.medledger/records.db"
    # Where consent answers (records asks it before every read and write).
    consent_address: str = "127.0.0.1:50052"
    # Where ciphertexts are kept: in the database row, or one file per version under blob_dir.
    blob_store: Literal["database", "filesystem"] = "database"
    blob_dir: Path = Path(".medledger/records-blobs")
    # An erasure runs this long after it was requested unless a privacy officer approves it
    # sooner (or it is cancelled, or held).
    erasure_grace_seconds: float = Field(default=30 * DAY, ge=0)
    # How often due erasures are looked for.
    erasure_check_interval_seconds: float = Field(default=60.0, gt=0)
    # How long the key manager's backups are kept: a deleted key is gone from every backup this
    # long after its erasure (the certificate's `unrecoverable_after`).
    key_backup_retention_seconds: float = Field(default=30 * DAY, ge=0)
