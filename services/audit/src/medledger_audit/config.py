"""Audit's settings: the common ones under MEDLEDGER_, with audit's default ports, and the log's."""

from pathlib import Path

from pydantic import Field, field_validator

from medledger_runtime.settings import ServiceSettings
from medledger_verifier.notes import valid_key_name


class AuditSettings(ServiceSettings):
    grpc_port: int = 50055
    metrics_port: int = 9105
    database_url: str = "sqlite+aiosqlite:///.medledger/audit.db"
    # How often the service checks its newest entries and latest checkpoint against storage.
    verify_interval_seconds: float = Field(default=300.0, gt=0)
    # The HTTP port: the log in the C2SP tlog-tiles layout (/checkpoint, /tile/...).
    http_port: int = Field(default=9115, ge=0, le=65535)

    # The log's name: the first line of its checkpoints and the name of its note keys. A log
    # whose database was rolled back continues under a new origin.
    log_origin: str = "medledger.local/audit"
    # A checkpoint is signed once the tree grew by this many entries, or ...
    checkpoint_every_entries: int = Field(default=1000, ge=1)
    # ... this long after the last one, whichever comes first (and only if the tree grew).
    checkpoint_interval_seconds: float = Field(default=5.0, gt=0, le=3600)
    # The last signed checkpoint, kept outside the database (on a volume of its own).
    last_checkpoint_file: Path = Path(".medledger/audit/last-checkpoint")
    # Most entries appended in one transaction.
    append_batch_max: int = Field(default=5000, ge=1, le=100_000)

    @field_validator("log_origin")
    @classmethod
    def _origin_is_a_note_key_name(cls, value: str) -> str:
        if not valid_key_name(value):
            raise ValueError("a log origin is non-empty, with no space or '+' (it names the note keys)")
        return value
