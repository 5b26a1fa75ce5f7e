"""The record use cases' commands and results (plain values, apart from any transport), and
the ports they ask through: the key manager and consent. The use cases are ``records.RecordDesk``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_records import storage
from medledger_runtime.consent_checks import ConsentAnswer as ConsentAnswer
from medledger_runtime.consent_checks import ConsentService as ConsentService
from medledger_runtime.keys import DataKey, KeyInfo, KeyType


class RecordKeys(Protocol):
    """What records does with its everyday key-manager credential (through data_keys.DataKeyCache):
    no deleting keys (only approved erasures do that, through their own credential:
    erasure.KeyShredder)."""

    async def ensure_key(self, name: str, key_type: KeyType | str) -> KeyInfo: ...
    async def data_key_for(self, name: str, plaintext_bytes: int) -> DataKey: ...
    async def decrypt_data_key(self, name: str, wrapped: str) -> bytes: ...
    async def rotate(self, name: str) -> KeyInfo: ...
    async def rewrap(self, name: str, ciphertext: str) -> str: ...
    async def set_min_decryption_version(self, name: str, version: int) -> KeyInfo: ...


class SearchIndexer(Protocol):
    """Indexes a FHIR version's search terms in the write's transaction (search.SearchIndex)."""

    async def index(
        self, conn: AsyncConnection, patient_id: str, record_id: str, resource_type: str, content: bytes
    ) -> None: ...

    async def hashes(self, patient_id: str, content: bytes) -> list[bytes]: ...


# Commands.


@dataclass(frozen=True)
class PutRecord:
    """A new record (no record_id) or a new version of the patient's record `record_id`."""

    patient_id: str
    category: int
    media_type: str
    content: bytes
    record_id: str = ""
    # With record_id: store only if the record's latest version is this one (0: any).
    expected_version: int = 0
    # FHIR resources: stamp `id`, `meta.versionId`, `meta.lastUpdated` before committing.
    assign_fhir_identity: bool = False


@dataclass(frozen=True)
class RecordWrite:
    """One record of a PutRecords: as a PutRecord's, and the entry's `urn:uuid:` fullUrl that
    references in the request's resources may name it by."""

    category: int
    media_type: str
    content: bytes
    record_id: str = ""
    expected_version: int = 0
    full_url: str = ""


@dataclass(frozen=True)
class PutRecords:
    """Several records of one patient, all or nothing (a FHIR transaction). `references` maps
    references resolved outside the request to their targets."""

    patient_id: str
    records: tuple[RecordWrite, ...]
    references: Mapping[str, str] = field(default_factory=dict)
    assign_fhir_identity: bool = False


@dataclass(frozen=True)
class GetRecord:
    """One version of a record (0: the latest), read for `purpose` (required unless one's own)."""

    record_id: str
    version: int = 0
    purpose: int = 0


@dataclass(frozen=True)
class ListRecordVersions:
    """A record's versions, newest first (FHIR instance history), read for `purpose`."""

    record_id: str
    purpose: int = 0
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class ListRecords:
    patient_id: str
    purpose: int = 0
    categories: tuple[int, ...] = ()  # none: every category
    resource_type: str = ""
    updated_from: float | None = None
    updated_before: float | None = None
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class ExportRecords:
    patient_id: str


# Results.


@dataclass(frozen=True)
class Receipt:
    """What a version commits to, and the event that announced it."""

    record_id: str
    version: int
    commitment: str
    salt: bytes
    event_id: str


@dataclass(frozen=True)
class Written:
    record_id: str
    version: int
    receipt: Receipt


@dataclass(frozen=True)
class Disclosed:
    """A version as read, with the consent decision that allowed it ("" for one's own)."""

    content: bytes
    media_type: str
    version: int
    receipt: Receipt
    decision_id: str
    patient_id: str
    category: int
    provenance: dict[str, Any]


@dataclass(frozen=True)
class Listing:
    records: list[storage.Record]
    next_page_token: str
    decision_ids: list[str]


@dataclass(frozen=True)
class Export:
    """A FHIR Bundle (a collection): each record's latest version, then its Provenance."""

    bundle: dict[str, Any]
    records: int


@dataclass(frozen=True)
class VersionEntry:
    """A version without its content: when it was written and what it commits to."""

    version: int
    written_at: float
    receipt: Receipt


@dataclass(frozen=True)
class VersionListing:
    """A page of a record's versions, newest first, with the consent decision that allowed it
    ("" for one's own)."""

    record: storage.Record
    versions: list[VersionEntry]
    next_page_token: str
    decision_id: str
