"""Records' use cases: a caller puts a version of a record, gets one, lists a patient's records or
exports them, apart from any transport (the gRPC API in ``api.py`` is one caller of these).

Each takes the caller and a command of plain values and returns plain results or raises the
errors of ``medledger_runtime.errors``. Every read and every practitioner's write asks consent
first (through :class:`ConsentService`) and carries the decision id into its event. Each
version is sealed under a fresh data key from the key manager, wrapped under the patient's key;
the row and its event commit together. The rules without I/O are in ``domain.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, overload

from medledger.events.v1 import records_events_pb2 as ev
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_records import domain, erasure_storage, search_storage, storage
from medledger_records.blobs import BlobStore, blob_key
from medledger_records.erasure_runner import COMPLETED, RUNNING
from medledger_records.record_commands import (
    ConsentAnswer,
    ConsentService,
    Disclosed,
    Export,
    ExportRecords,
    GetRecord,
    Listing,
    ListRecords,
    ListRecordVersions,
    PutRecord,
    PutRecords,
    Receipt,
    RecordKeys,
    SearchIndexer,
    VersionEntry,
    VersionListing,
    Written,
)
from medledger_runtime.auth import Caller
from medledger_runtime.db import Database
from medledger_runtime.errors import ERASED, DataLoss, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from medledger_runtime.events import TOPICS, Event, new_event
from medledger_runtime.group_commit import OutboxGroupCommit
from medledger_runtime.guardians import Guardians
from medledger_runtime.keys import LEGACY_PATIENT_KEY_PREFIX, DataKey, KeyInfo, KeyManager, KeyType, patient_key_name
from medledger_runtime.outbox import current_traceparent, enqueue, enqueue_many
from medledger_runtime.settings import ConfigError

log = logging.getLogger(__name__)
TAMPERED = Counter(
    "medledger_records_tampered_total", "Stored record versions that failed to decrypt (altered data or key)."
)


def _denied(answer: ConsentAnswer) -> PermissionDenied:
    return PermissionDenied(
        f"consent {answer.reason_code}: {answer.reason} (decision {answer.decision_id})", reason=answer.reason_code
    )


Write = Callable[[AsyncConnection], Awaitable[Written]]
WriteMany = Callable[[AsyncConnection], Awaitable[list[Written]]]
T = TypeVar("T")


def _new_record_id() -> str:
    return f"rec_{uuid.uuid4().hex}"


class _SealingKeys(Protocol):
    """What a write needs of the key manager: the patient's key, and a data key under it."""

    async def ensure_key(self, name: str, key_type: KeyType | str) -> KeyInfo: ...
    async def data_key_for(self, name: str, plaintext_bytes: int) -> DataKey: ...


class _OneDataKey:
    """One data key for every record of a PutRecords, asked for by its first write (after the
    erasure check, so that no key is re-created for an erased patient). Each version still has
    its own nonce and associated data (record id, version, patient)."""

    def __init__(self, keys: RecordKeys, plaintext_bytes: int) -> None:
        self._keys = keys
        self._bytes = plaintext_bytes
        self._info: KeyInfo | None = None
        self._key: DataKey | None = None

    async def ensure_key(self, name: str, key_type: KeyType | str) -> KeyInfo:
        if self._info is None:
            self._info = await self._keys.ensure_key(name, key_type)
        return self._info

    async def data_key_for(self, name: str, plaintext_bytes: int) -> DataKey:
        if self._key is None:
            self._key = await self._keys.data_key_for(name, self._bytes)
        return self._key


@dataclass
class _Batch:
    """A PutRecords' new rows, written in one statement per table once every record is ready
    (records, versions, index terms, outbox): a bulk load's cost is its rows, not its round trips."""

    records: list[dict[str, Any]] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)
    terms: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[str, Event, bytes | None, str | None]] = field(default_factory=list)
    # The request's trace context, the same for every event of the batch.
    traceparent: str | None = field(default_factory=current_traceparent)

    async def flush(self, conn: AsyncConnection) -> None:
        await storage.insert_records_and_versions(conn, self.records, self.versions)
        await search_storage.insert_terms(conn, self.terms)
        await enqueue_many(conn, self.events)


def receipt(v: storage.StoredVersion) -> Receipt:
    return Receipt(v.record_id, v.version, v.commitment, v.salt, v.event_id)


def provenance(record: storage.Record, stored: storage.StoredVersion) -> dict[str, Any]:
    return domain.provenance(
        record_id=record.record_id,
        version=stored.version,
        written_by=stored.written_by,
        organization_id=stored.organization_id,
        written_at=stored.written_at,
    )


class RecordDesk:
    """Records' use cases; its dependencies come through the constructor."""

    def __init__(
        self,
        db: Database,
        keys: RecordKeys,
        consent: ConsentService,
        disclosures: OutboxGroupCommit,
        blobs: BlobStore | None,
        notify: Callable[[], None],
        *,
        source: str = "medledger.records",
        legacy_keys: Callable[[], KeyManager] | None = None,
        guardians: Guardians | None = None,
        search_index: SearchIndexer | None = None,
    ) -> None:
        self.db = db
        self.keys = keys
        self.consent = consent
        # Disclosures' events are as many as reads: they are group-committed.
        self.disclosures = disclosures
        self.blobs = blobs
        # Wakes the outbox relay after a put's transaction commits.
        self.notify = notify
        self.source = source
        self.legacy_keys = legacy_keys
        # Who acts for a patient (consent's guardianships, projected); None: nobody does.
        self.guardians = guardians
        # The blind index of FHIR search terms (search.SearchIndex); None: nothing indexed.
        self.search_index = search_index

    async def _is_guardian(self, caller: Caller, patient_id: str) -> bool:
        return self.guardians is not None and await self.guardians.acts_for(caller, patient_id)

    @overload
    async def put(self, caller: Caller, command: PutRecord) -> Written: ...

    @overload
    async def put(self, caller: Caller, command: PutRecord, transaction: Callable[[Write], Awaitable[T]]) -> T: ...

    async def put(
        self, caller: Caller, command: PutRecord, transaction: Callable[[Write], Awaitable[Any]] | None = None
    ) -> Any:
        """Write a version. Checked and authorized (consent asked) before any transaction; then,
        in one transaction run by `transaction` (default: the database's, then the relay is
        woken), the version, its row and RecordStored; returns what the transaction returns
        (by default what was written). The gRPC API passes a transaction that runs once per
        request id and answers with the wire response it stored, first time or replayed."""
        resource_type = domain.check_put(command.patient_id, command.category, command.media_type, command.content)
        domain.check_put_options(
            command.record_id, command.expected_version, command.media_type, command.assign_fhir_identity
        )
        if domain.write_needs_consent(caller, command.patient_id):
            answer = await self.consent.check(caller, command.patient_id, domain.WRITE, command.category, domain.TREAT)
            if not answer.permit:
                raise _denied(answer)

        async def write(conn: AsyncConnection) -> Written:
            return await self._write(conn, caller, command, resource_type)

        return await (transaction or self._transaction)(write)

    @overload
    async def put_records(self, caller: Caller, command: PutRecords) -> list[Written]: ...

    @overload
    async def put_records(
        self, caller: Caller, command: PutRecords, transaction: Callable[[WriteMany], Awaitable[T]]
    ) -> T: ...

    async def put_records(
        self, caller: Caller, command: PutRecords, transaction: Callable[[WriteMany], Awaitable[Any]] | None = None
    ) -> Any:
        """Write several records of one patient, all or nothing (a FHIR transaction). Before any
        transaction: every entry checked (a problem names its index), consent asked once per
        category, the new records' ids assigned and every reference to an entry's fullUrl (or
        to a key of `references`) rewritten to its target in every resource, which is then
        validated again. Then one transaction (run by `transaction`, as for :meth:`put`) writes
        every version and its RecordStored under one data key; the first error rolls it all back."""
        patient_id = command.patient_id
        writes = command.records
        domain.check_put_records(
            patient_id, [(w.record_id, w.expected_version, w.full_url) for w in writes], command.references
        )
        checked: list[tuple[str, Any]] = []
        for index, w in enumerate(writes):
            with domain.in_entry(index):
                checked.append(domain.check_record_write(patient_id, w.category, w.media_type, w.content))
        if domain.write_needs_consent(caller, patient_id):
            for category in sorted({w.category for w in writes}):
                answer = await self.consent.check(caller, patient_id, domain.WRITE, category, domain.TREAT)
                if not answer.permit:
                    raise _denied(answer)
        record_ids = [w.record_id or _new_record_id() for w in writes]
        targets = dict(command.references)
        for w, (resource_type, _), record_id in zip(writes, checked, record_ids, strict=True):
            if w.full_url:
                targets[w.full_url] = domain.reference_target(resource_type or "Binary", record_id)
        puts: list[tuple[PutRecord, str, str]] = []
        for index, (w, (resource_type, resource), record_id) in enumerate(
            zip(writes, checked, record_ids, strict=True)
        ):
            content = w.content
            if resource is not None:
                with domain.in_entry(index):
                    content = domain.with_references(w.content, resource, targets)
            put = PutRecord(
                patient_id=patient_id,
                category=w.category,
                media_type=w.media_type,
                content=content,
                record_id=w.record_id,
                expected_version=w.expected_version,
                assign_fhir_identity=command.assign_fhir_identity and resource is not None,
            )
            puts.append((put, resource_type, record_id))
        sealed_bytes = sum(len(put.content) for put, _, _ in puts)

        async def write(conn: AsyncConnection) -> list[Written]:
            keys = _OneDataKey(self.keys, sealed_bytes)
            await self._check_not_erased(conn, patient_id)  # once for the request, under the lock
            batch = _Batch()
            written = []
            for index, (put, resource_type, record_id) in enumerate(puts):
                with domain.in_entry(index):
                    written.append(
                        await self._write(
                            conn, caller, put, resource_type, new_record_id=record_id, keys=keys, batch=batch
                        )
                    )
            await batch.flush(conn)
            return written

        return await (transaction or self._transaction)(write)

    async def _transaction(self, write: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        async with self.db.transaction() as conn:
            written = await write(conn)
        self.notify()
        return written

    async def _write(
        self,
        conn: AsyncConnection,
        caller: Caller,
        command: PutRecord,
        resource_type: str,
        *,
        new_record_id: str = "",
        keys: _SealingKeys | None = None,
        batch: _Batch | None = None,
    ) -> Written:
        """One version. With a `batch` (a PutRecords, whose erasure check ran once before), the
        new rows go to it instead of the database, which the batch then writes in one go."""
        patient_id = command.patient_id
        if batch is None:
            await self._check_not_erased(conn, patient_id)
        now = time.time()
        if command.record_id:
            record = await storage.get_record(conn, command.record_id, for_update=True)
            if record is None or record.patient_id != patient_id:
                raise NotFound("no such record of this patient")
            caller.require_scope(domain.scope_type(record.resource_type), "u", patient_id)
            domain.check_new_version(record.category, record.media_type, command.category, command.media_type)
            if record.resource_type and resource_type != record.resource_type:
                # Types share categories (MedicationRequest, MedicationStatement): the category
                # alone would let an update turn one into the other.
                raise InvalidArgument.field("content.resourceType", "a new version keeps its record's resource type")
            # Under the row lock: of two writes expecting the same version, the second finds it gone.
            domain.check_expected_version(record.latest_version, command.expected_version)
            version = record.latest_version + 1
            await storage.set_latest_version(conn, record.record_id, version, now)
        else:
            record = storage.Record(
                new_record_id or _new_record_id(), patient_id, command.category, command.media_type, 1, resource_type
            )
            version = 1
            if batch is None:
                await storage.insert_record(conn, record, now)
            else:
                batch.records.append(storage.record_row(record, now))
        if command.assign_fhir_identity:
            # Stamped before the commitment: the bytes committed, sealed and read back are these.
            stamped = domain.assign_fhir_identity(
                command.content, record.record_id, version, now, update=bool(command.record_id)
            )
            command = dataclasses.replace(command, content=stamped)
        salt = domain.new_salt()
        commitment = domain.commitment(command.media_type, command.content, salt)
        key_name = patient_key_name("records", patient_id)
        await (keys or self.keys).ensure_key(key_name, KeyType.AES256_GCM96)
        data_key = await (keys or self.keys).data_key_for(key_name, len(command.content))
        sealed = domain.seal(data_key.plaintext, command.content, record.record_id, version, patient_id)
        stored_key = ""
        if self.blobs is not None:
            stored_key = blob_key(record.record_id, version)
            await self.blobs.put(stored_key, sealed)
        event = new_event(
            source=self.source,
            payload=ev.RecordStored(
                record_id=record.record_id,
                version=version,
                patient_id=patient_id,
                category=command.category,  # type: ignore[arg-type]
                commitment=commitment,
                written_by=caller.principal_id,
            ),
            aggregate_id=record.record_id,
            version=version,
            subject=patient_id,
        )
        stored = storage.StoredVersion(
            record.record_id,
            version,
            patient_id,
            key_name,
            data_key.wrapped,
            b"" if stored_key else sealed,
            salt,
            commitment,
            event.id,
            stored_key,
        )
        if batch is None:
            await storage.insert_version(
                conn, stored, written_by=caller.principal_id, organization_id=caller.organization_id, now=now
            )
            if self.search_index is not None:  # the latest version's search terms, in this transaction
                await self.search_index.index(conn, patient_id, record.record_id, resource_type, command.content)
            await enqueue(conn, TOPICS["records"], event, key=patient_id.encode())
            return Written(record.record_id, version, receipt(stored))
        batch.versions.append(
            storage.version_row(stored, written_by=caller.principal_id, organization_id=caller.organization_id, now=now)
        )
        if self.search_index is not None and resource_type:
            hashes = await self.search_index.hashes(patient_id, command.content)
            if command.record_id:  # a new version: the previous version's terms go first
                await search_storage.replace_terms(conn, patient_id, record.record_id, ())
            batch.terms += search_storage.term_rows(patient_id, record.record_id, hashes)
        batch.events.append((TOPICS["records"], event, patient_id.encode(), batch.traceparent))
        return Written(record.record_id, version, receipt(stored))

    async def _check_not_erased(self, conn: AsyncConnection, patient_id: str) -> None:
        """Shared with other writes, exclusive with the start of an erasure: once an erasure
        runs, no version is added (and no key re-created) for this patient."""
        await storage.lock_patient(conn, patient_id, exclusive=False)
        for erasure in await erasure_storage.erasures_of(conn, patient_id, [RUNNING, COMPLETED]):
            raise FailedPrecondition(f"this patient's records were erased ({erasure.erasure_id})", reason=ERASED)

    async def get(self, caller: Caller, command: GetRecord) -> Disclosed:
        """One version, once consent permits (unless it is the caller's own) and RecordDisclosed
        is durable; a denial is announced (RecordAccessDenied) before PermissionDenied."""
        if command.version > domain.MAX_VERSION:
            raise NotFound("no such version")
        found = await storage.get_record_and_version(self.db, command.record_id, command.version)
        if found is None:
            raise NotFound("no such record")
        record, stored = found
        version = command.version or record.latest_version
        if record.erased_at is not None:
            raise FailedPrecondition("this patient's records were erased", reason=ERASED)
        decision_id = ""
        guardian = await self._is_guardian(caller, record.patient_id)
        needs_consent = domain.read_needs_consent(caller, record.patient_id, command.purpose, guardian=guardian)
        caller.require_scope(domain.scope_type(record.resource_type), "r", record.patient_id)
        if needs_consent:
            answer = await self.consent.check(caller, record.patient_id, domain.READ, record.category, command.purpose)
            if not answer.permit:
                await self._announce_denial(caller, record, command.purpose, answer)
                raise _denied(answer)
            decision_id = answer.decision_id
        if stored is None:
            raise NotFound("no such version")
        content = await self._open(record, stored)
        event = new_event(
            source=self.source,
            payload=ev.RecordDisclosed(
                record_id=record.record_id,
                version=version,
                patient_id=record.patient_id,
                actor_id=caller.principal_id,
                purpose=command.purpose,  # type: ignore[arg-type]
                decision_id=decision_id,
                on_behalf_of=domain.on_behalf_of(caller, record.patient_id, guardian),
            ),
            aggregate_id=record.record_id,
            version=version,
            subject=record.patient_id,
        )
        # No disclosure without a durable record of it: the event commits before the answer.
        await self._publish(event, record.patient_id)
        return Disclosed(
            content=content,
            media_type=record.media_type,
            version=version,
            receipt=receipt(stored),
            decision_id=decision_id,
            patient_id=record.patient_id,
            category=record.category,
            provenance=provenance(record, stored),
        )

    async def versions(self, caller: Caller, command: ListRecordVersions) -> VersionListing:
        """A page of a record's versions, newest first, without content (FHIR instance history),
        after the same decision as a read: a denial is announced (RecordAccessDenied) before
        PermissionDenied; the listing (RecordsListed, "history") is durable before the answer."""
        if not command.record_id:
            raise InvalidArgument.field("record_id", "required")
        domain.check_list((), command.page_size)
        below = domain.version_page_position(command.page_token) if command.page_token else None
        size = domain.page_size(command.page_size)
        async with self.db.read() as conn:
            record = await storage.get_record(conn, command.record_id)
        if record is None:
            raise NotFound("no such record")
        if record.erased_at is not None:
            raise FailedPrecondition("this patient's records were erased", reason=ERASED)
        # A history is a read of the record's own type (a scoped token's `.r` of that type).
        caller.require_scope(domain.scope_type(record.resource_type), "r", record.patient_id)
        decision_id = ""
        guardian = await self._is_guardian(caller, record.patient_id)
        if domain.read_needs_consent(caller, record.patient_id, command.purpose, guardian=guardian):
            answer = await self.consent.check(caller, record.patient_id, domain.READ, record.category, command.purpose)
            if not answer.permit:
                await self._announce_denial(caller, record, command.purpose, answer)
                raise _denied(answer)
            decision_id = answer.decision_id
        async with self.db.read() as conn:
            found = await storage.list_versions(conn, record.record_id, below=below, limit=size + 1)
        more = len(found) > size
        found = found[:size]
        await self._announce_listing(
            caller,
            record.patient_id,
            [record],
            [decision_id] if decision_id else [],
            command.purpose,
            "history",
            guardian=guardian,
        )
        return VersionListing(
            record=record,
            versions=[
                VersionEntry(v.version, v.written_at, Receipt(v.record_id, v.version, v.commitment, v.salt, v.event_id))
                for v in found
            ],
            next_page_token=domain.version_page_token(found[-1].version) if more else "",
            decision_id=decision_id,
        )

    async def list(self, caller: Caller, command: ListRecords) -> Listing:
        """A page of the patient's records; someone else than the patient sees only the
        categories consent permits (one decision each). RecordsListed is durable first."""
        if not command.patient_id:
            raise InvalidArgument.field("patient_id", "required")
        guardian = await self._is_guardian(caller, command.patient_id)
        ask = domain.list_needs_consent(caller, command.patient_id, command.purpose, guardian=guardian)
        domain.check_list(command.categories, command.page_size)
        after = domain.page_position(command.page_token) if command.page_token else None
        size = domain.page_size(command.page_size)
        categories: list[int] = [int(c) for c in command.categories] or sorted(domain.CATEGORIES)
        decision_ids: list[str] = []
        if ask:
            permitted = []
            for category in categories:
                answer = await self.consent.check(caller, command.patient_id, domain.READ, category, command.purpose)
                if answer.permit:
                    permitted.append(category)
                    decision_ids.append(answer.decision_id)
            categories = permitted
        found: list[storage.Record] = []
        if categories:
            async with self.db.read() as conn:
                found = await storage.list_records(
                    conn,
                    command.patient_id,
                    categories=categories,
                    resource_type=command.resource_type,
                    updated_from=command.updated_from,
                    updated_before=command.updated_before,
                    after=after,
                    limit=size + 1,
                )
        more = len(found) > size
        found = found[:size]
        await self._announce_listing(
            caller, command.patient_id, found, decision_ids, command.purpose, "list", guardian=guardian
        )
        return Listing(
            records=found,
            next_page_token=domain.page_token(found[-1].updated_at, found[-1].record_id) if more else "",
            decision_ids=decision_ids,
        )

    async def export(self, caller: Caller, command: ExportRecords) -> Export:
        """The patient's own records, each latest version and its Provenance, in one Bundle."""
        guardian = await self._is_guardian(caller, command.patient_id)
        domain.check_export(caller, command.patient_id, guardian=guardian)
        async with self.db.connect() as conn:
            found = await storage.list_records(conn, command.patient_id, limit=1_000_000)
            versions = [await storage.get_version(conn, r.record_id, r.latest_version) for r in found]
        entries = []
        for record, stored in zip(found, versions, strict=True):
            if stored is None:
                continue
            content = await self._open(record, stored)
            entries.append(
                {
                    "fullUrl": f"urn:medledger:record:{record.record_id}:{stored.version}",
                    "resource": domain.export_resource(record.media_type, content),
                }
            )
            entries.append(
                {
                    "fullUrl": f"urn:medledger:provenance:{record.record_id}:{stored.version}",
                    "resource": provenance(record, stored),
                }
            )
        bundle = {"resourceType": "Bundle", "type": "collection", "entry": entries}
        await self._announce_listing(caller, command.patient_id, found, [], 0, "export", guardian=guardian)
        return Export(bundle=bundle, records=len(entries) // 2)

    def _keys_of(self, key_name: str) -> RecordKeys | KeyManager:
        """Records' own keys; a version the key-owner migration has not moved yet is under the old
        shared key, read with the legacy credential."""
        if not key_name.startswith(LEGACY_PATIENT_KEY_PREFIX):
            return self.keys
        try:
            if self.legacy_keys is None:
                raise ConfigError("no legacy key manager")
            return self.legacy_keys()
        except ConfigError:
            raise FailedPrecondition(
                "this version's data key is still under the old shared patient key: the key-owner "
                "migration needs MEDLEDGER_LEGACY_VAULT_TOKEN_FILE"
            ) from None

    async def _open(self, record: storage.Record, stored: storage.StoredVersion) -> bytes:
        """A stored version's plaintext; DataLoss (counted and logged) when it was altered."""
        try:
            data_key = await self._keys_of(stored.key_name).decrypt_data_key(stored.key_name, stored.wrapped_key)
            sealed = await self.blobs.get(stored.blob_key) if stored.blob_key and self.blobs else stored.ciphertext
            return domain.unseal(data_key, sealed, record.record_id, stored.version, record.patient_id)
        except NotFound:
            # The key went between reading the row and opening it: an erasure ran just then.
            raise FailedPrecondition("this patient's records were erased", reason=ERASED) from None
        except DataLoss:
            TAMPERED.inc()
            log.error(
                "a stored record version failed to decrypt",
                extra={"record_id": record.record_id, "version": stored.version},
            )
            raise

    async def _announce_denial(
        self, caller: Caller, record: storage.Record, purpose: int, answer: ConsentAnswer
    ) -> None:
        event = new_event(
            source=self.source,
            payload=ev.RecordAccessDenied(
                record_id=record.record_id,
                patient_id=record.patient_id,
                actor_id=caller.principal_id,
                action=domain.READ,
                purpose=purpose,  # type: ignore[arg-type]
                decision_id=answer.decision_id,
                reason_code=answer.reason_code,
            ),
            aggregate_id=record.record_id,
            version=0,
            subject=record.patient_id,
        )
        await self._publish(event, record.patient_id)

    async def _announce_listing(
        self,
        caller: Caller,
        patient_id: str,
        found: Sequence[storage.Record],
        decision_ids: Sequence[str],
        purpose: int,
        operation: str,
        *,
        guardian: bool,
    ) -> None:
        event = new_event(
            source=self.source,
            payload=ev.RecordsListed(
                patient_id=patient_id,
                actor_id=caller.principal_id,
                record_ids=[r.record_id for r in found],
                decision_ids=decision_ids,
                purpose=purpose,  # type: ignore[arg-type]
                operation=operation,
                on_behalf_of=domain.on_behalf_of(caller, patient_id, guardian),
            ),
            aggregate_id=patient_id,
            version=0,
            subject=patient_id,
        )
        await self._publish(event, patient_id)

    async def _publish(self, event: Event, patient_id: str) -> None:
        """Write one event through the outbox, durably, before answering (group-committed with
        other requests' events: disclosures are as many as reads)."""
        await self.disclosures.write(TOPICS["records"], event, patient_id.encode())
