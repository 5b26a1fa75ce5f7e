"""Records's settings: the common ones under MEDLEDGER_, with records's default ports."""

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from medledger_runtime.erasure import PARTICIPANTS
from medledger_runtime.settings import ServiceSettings

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
    # The data-key cache (data_keys.py, KEYS.md "Data-key cache"): how long a data key is kept
    # (0: no cache), how many versions and plaintext bytes one data key may seal. A certificate's
    # `unrecoverable_after` is the erasure time plus the longer of the age and the backup retention.
    data_key_cache_max_age_seconds: float = Field(default=300.0, ge=0)
    data_key_cache_max_uses: int = Field(default=10_000, ge=1)
    data_key_cache_max_bytes: int = Field(default=1 << 30, ge=1)
    # The services of this deployment that hold patient material, comma-separated: each one
    # destroys its keys in an erasure and the certificate waits for its confirmation (audit's
    # key goes when it appends the certificate). The others are named absent in certificates.
    erasure_participants: str = ",".join(PARTICIPANTS)

    @field_validator("erasure_participants")
    @classmethod
    def _known_participants(cls, value: str) -> str:
        names = [p.strip() for p in value.split(",") if p.strip()]
        unknown = sorted(set(names) - set(PARTICIPANTS))
        if unknown:
            raise ValueError(f"unknown participant(s) {', '.join(unknown)}; known: {', '.join(PARTICIPANTS)}")
        if "records" not in names:
            raise ValueError("records coordinates erasures: it is always a participant")
        return ",".join(p for p in PARTICIPANTS if p in names)

    @property
    def participants(self) -> tuple[str, ...]:
        return tuple(self.erasure_participants.split(","))
