"""The gRPC API of records: medledger.records.v1.RecordsService.

Every read and every practitioner's write asks consent first (records holds the `pdp-client`
role) and carries the decision id into its event. Each version is sealed under a fresh data
key from the key manager, wrapped under the patient's key; the row, its event and the
idempotency record commit together.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from typing import Any, Protocol

import grpc
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
from medledger.events.v1 import records_events_pb2 as ev
from medledger.records.v1 import records_service_pb2 as pb
from medledger.records.v1 import records_service_pb2_grpc as pb_grpc
from medledger.types.v1 import vocabulary_pb2
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_common import commitments
from medledger_common.auth import Access, Caller, current_caller
from medledger_common.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    MedledgerError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from medledger_common.events import TOPICS, Event, new_event
from medledger_common.group_commit import OutboxGroupCommit
from medledger_common.idempotency import run_idempotent
from medledger_common.keys import LEGACY_PATIENT_KEY_PREFIX, DataKey, KeyInfo, KeyManager, KeyType, patient_key_name
from medledger_common.keys.base import parse_versioned
from medledger_common.outbox import enqueue
from medledger_common.service import ServiceRuntime
from medledger_common.settings import ConfigError
from medledger_common.timestamps import seconds, timestamp
from medledger_records import domain, storage
from medledger_records.blobs import BlobStore, blob_key
from medledger_records.erasure import COMPLETED, RUNNING, ErasureDesk

log = logging.getLogger(__name__)
_SERVICE = "/medledger.records.v1.RecordsService/"
# The erasure certificates' verifier key is public: anyone may verify a certificate.
PUBLIC_METHODS: tuple[str, ...] = (_SERVICE + "GetErasureVerifierKey",)
# The coarse table; keep it equal to services/records/README.md (a test compares them).
ACCESS: dict[str, Access] = {
    _SERVICE + "PutRecord": Access.of(kinds=["practitioner", "patient"]),
    _SERVICE + "GetRecord": Access.of(kinds=["practitioner", "patient", "researcher"]),
    _SERVICE + "ListRecords": Access.of(kinds=["practitioner", "patient", "researcher"]),
    _SERVICE + "ExportRecords": Access.of(kinds=["patient"]),
    _SERVICE + "RotatePatientKey": Access.of(roles=["admin"]),
    _SERVICE + "RequestErasure": Access.of(kinds=["patient"], roles=["admin"]),
    _SERVICE + "ApproveErasure": Access.of(roles=["privacy-officer"]),
    _SERVICE + "CancelErasure": Access.of(kinds=["patient"], roles=["admin", "privacy-officer"]),
    _SERVICE + "GetErasure": Access.of(kinds=["patient"], roles=["admin", "privacy-officer"]),
    _SERVICE + "PlaceLegalHold": Access.of(roles=["admin", "privacy-officer"]),
    _SERVICE + "ReleaseLegalHold": Access.of(roles=["admin", "privacy-officer"]),
}
ROTATION_PAGE = 100
MAX_PAGE_SIZE = 500
MAX_RECORD_BYTES = 4 * 1024 * 1024
# Versions are 32-bit integers in the database: none is larger.
MAX_VERSION = 2**31 - 1
READ, WRITE = vocabulary_pb2.Action.ACTION_READ, vocabulary_pb2.Action.ACTION_WRITE
TREAT = vocabulary_pb2.PurposeOfUse.PURPOSE_OF_USE_TREAT
PERMIT = co_pb.Decision.DECISION_PERMIT
_CATEGORIES = {v.number for v in vocabulary_pb2.DataCategory.DESCRIPTOR.values if v.number}
_PURPOSES = {v.number for v in vocabulary_pb2.PurposeOfUse.DESCRIPTOR.values if v.number}
TAMPERED = Counter(
    "medledger_records_tampered_total", "Stored record versions that failed to decrypt (altered data or key)."
)


def _receipt(v: storage.StoredVersion) -> pb.Receipt:
    return pb.Receipt(
        record_id=v.record_id, version=v.version, commitment=v.commitment, salt=v.salt.hex(), event_id=v.event_id
    )


def _denied(answer: co_pb.CheckConsentResponse) -> PermissionDenied:
    return PermissionDenied(f"consent {answer.reason_code}: {answer.reason} (decision {answer.decision_id})")


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


class RecordsApi(pb_grpc.RecordsServiceServicer):
    def __init__(
        self,
        runtime: ServiceRuntime,
        keys: RecordKeys,
        consent: co_grpc.ConsentServiceStub,
        erasures: ErasureDesk,
        disclosures: OutboxGroupCommit,
        blobs: BlobStore | None = None,
    ) -> None:
        self.rt = runtime
        self.disclosures = disclosures
        self.keys = keys
        self.consent = consent
        self.erasures = erasures
        self.blobs = blobs

    async def _ask(
        self, caller: Caller, patient_id: str, action: int, category: int, purpose: int
    ) -> co_pb.CheckConsentResponse:
        request = co_pb.CheckConsentRequest(
            patient_id=patient_id,
            actor_id=caller.principal_id,
            action=action,  # type: ignore[arg-type]
            category=category,  # type: ignore[arg-type]
            purpose=purpose,  # type: ignore[arg-type]
        )
        answer: co_pb.CheckConsentResponse = await self.consent.CheckConsent(request)
        return answer

    async def PutRecord(self, request: pb.PutRecordRequest, context: grpc.aio.ServicerContext) -> pb.PutRecordResponse:
        caller = current_caller()
        if len(request.content) > MAX_RECORD_BYTES:
            raise ResourceExhausted(f"a record is at most {MAX_RECORD_BYTES} bytes")
        if not request.patient_id:
            raise InvalidArgument.field("patient_id", "required")
        if request.category not in _CATEGORIES:
            raise InvalidArgument.field("category", "required: a DataCategory")
        if not request.media_type:
            raise InvalidArgument.field("media_type", "required: application/fhir+json or a document's media type")
        resource_type = ""
        if request.media_type == domain.FHIR_JSON:
            resource_type = domain.validate_fhir(commitments.parse_json(request.content))
        if caller.principal_id != request.patient_id:
            if caller.kind == "patient":
                raise PermissionDenied("a patient writes their own records only")
            answer = await self._ask(caller, request.patient_id, WRITE, request.category, TREAT)
            if answer.decision != PERMIT:
                raise _denied(answer)

        async def work(conn: AsyncConnection) -> pb.PutRecordResponse:
            # Shared with other writes, exclusive with the start of an erasure: once an erasure
            # runs, no version is added (and no key re-created) for this patient.
            await storage.lock_patient(conn, request.patient_id, exclusive=False)
            for erasure in await storage.erasures_of(conn, request.patient_id, [RUNNING, COMPLETED]):
                raise FailedPrecondition(f"this patient's records were erased ({erasure.erasure_id})")
            now = time.time()
            if request.record_id:
                record = await storage.get_record(conn, request.record_id, for_update=True)
                if record is None or record.patient_id != request.patient_id:
                    raise NotFound("no such record of this patient")
                if (record.category, record.media_type) != (request.category, request.media_type):
                    raise InvalidArgument.field("category", "a new version keeps its record's category and media type")
                version = record.latest_version + 1
                await storage.set_latest_version(conn, record.record_id, version, now)
            else:
                record = storage.Record(
                    f"rec_{uuid.uuid4().hex}",
                    request.patient_id,
                    request.category,
                    request.media_type,
                    1,
                    resource_type,
                )
                version = 1
                await storage.insert_record(conn, record, now)
            salt = domain.new_salt()
            if request.media_type == domain.FHIR_JSON:
                commitment = commitments.record_commitment(request.content, salt)
            else:
                commitment = commitments.document_commitment(request.media_type, request.content, salt)
            key_name = patient_key_name("records", request.patient_id)
            await self.keys.ensure_key(key_name, KeyType.AES256_GCM96)
            data_key = await self.keys.data_key_for(key_name, len(request.content))
            sealed = domain.seal(data_key.plaintext, request.content, record.record_id, version, request.patient_id)
            stored_key = ""
            if self.blobs is not None:
                stored_key = blob_key(record.record_id, version)
                await self.blobs.put(stored_key, sealed)
            event = new_event(
                source=self.rt.source,
                payload=ev.RecordStored(
                    record_id=record.record_id,
                    version=version,
                    patient_id=request.patient_id,
                    category=request.category,
                    commitment=commitment,
                    written_by=caller.principal_id,
                ),
                aggregate_id=record.record_id,
                version=version,
                subject=request.patient_id,
            )
            stored = storage.StoredVersion(
                record.record_id,
                version,
                request.patient_id,
                key_name,
                data_key.wrapped,
                b"" if stored_key else sealed,
                salt,
                commitment,
                event.id,
                stored_key,
            )
            await storage.insert_version(
                conn, stored, written_by=caller.principal_id, organization_id=caller.organization_id, now=now
            )
            await enqueue(conn, TOPICS["records"], event, key=request.patient_id.encode())
            return pb.PutRecordResponse(record_id=record.record_id, version=version, receipt=_receipt(stored))

        return await run_idempotent(
            self.rt.db,
            scope="records.PutRecord",
            request_id=request.request_id,
            request=request,
            response_cls=pb.PutRecordResponse,
            work=work,
            after_commit=self.rt.relay.notify,
        )

    async def GetRecord(self, request: pb.GetRecordRequest, context: grpc.aio.ServicerContext) -> pb.GetRecordResponse:
        caller = current_caller()
        if request.version > MAX_VERSION:
            raise NotFound("no such version")
        found = await storage.get_record_and_version(self.rt.db, request.record_id, request.version)
        if found is None:
            raise NotFound("no such record")
        record, stored = found
        version = request.version or record.latest_version
        if record.erased_at is not None:
            raise FailedPrecondition("this patient's records were erased")
        own = caller.principal_id == record.patient_id
        if own:
            decision_id = ""
        elif caller.kind == "patient":
            raise NotFound("no such record")  # another patient's: the same answer as a missing one
        else:
            if request.purpose not in _PURPOSES:
                raise InvalidArgument.field("purpose", "required: a PurposeOfUse, why the record is read")
            answer = await self._ask(caller, record.patient_id, READ, record.category, request.purpose)
            if answer.decision != PERMIT:
                await self._announce_denial(caller, record, request.purpose, answer)
                raise _denied(answer)
            decision_id = answer.decision_id
        if stored is None:
            raise NotFound("no such version")
        content = await self._open(record, stored)
        event = new_event(
            source=self.rt.source,
            payload=ev.RecordDisclosed(
                record_id=record.record_id,
                version=version,
                patient_id=record.patient_id,
                actor_id=caller.principal_id,
                purpose=request.purpose,
                decision_id=decision_id,
            ),
            aggregate_id=record.record_id,
            version=version,
            subject=record.patient_id,
        )
        # No disclosure without a durable record of it: the event commits before the answer.
        await self._publish(event, record.patient_id)
        return pb.GetRecordResponse(
            content=content,
            media_type=record.media_type,
            version=version,
            receipt=_receipt(stored),
            decision_id=decision_id,
            patient_id=record.patient_id,
            category=record.category,  # type: ignore[arg-type]
            provenance_fhir_json=json.dumps(_provenance(record, stored)).encode(),
        )

    async def _announce_denial(
        self, caller: Caller, record: storage.Record, purpose: int, answer: co_pb.CheckConsentResponse
    ) -> None:
        event = new_event(
            source=self.rt.source,
            payload=ev.RecordAccessDenied(
                record_id=record.record_id,
                patient_id=record.patient_id,
                actor_id=caller.principal_id,
                action=READ,
                purpose=purpose,  # type: ignore[arg-type]
                decision_id=answer.decision_id,
                reason_code=answer.reason_code,
            ),
            aggregate_id=record.record_id,
            version=0,
            subject=record.patient_id,
        )
        await self._publish(event, record.patient_id)

    async def ListRecords(
        self, request: pb.ListRecordsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRecordsResponse:
        caller = current_caller()
        if not request.patient_id:
            raise InvalidArgument.field("patient_id", "required")
        own = caller.principal_id == request.patient_id
        if not own and caller.kind == "patient":
            raise PermissionDenied("a patient lists their own records only")
        if not own and request.purpose not in _PURPOSES:
            raise InvalidArgument.field("purpose", "required: a PurposeOfUse, why the records are listed")
        if any(c not in _CATEGORIES for c in request.categories):
            raise InvalidArgument.field("categories", "DataCategory values only")
        if request.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        after = _page_position(request.page_token) if request.page_token else None
        size = min(request.page_size or 50, MAX_PAGE_SIZE)
        categories: list[int] = [int(c) for c in request.categories] or sorted(_CATEGORIES)
        decision_ids: list[str] = []
        if not own:
            # One decision per category: only the categories consent permits are listed.
            permitted = []
            for category in categories:
                answer = await self._ask(caller, request.patient_id, READ, category, request.purpose)
                if answer.decision == PERMIT:
                    permitted.append(category)
                    decision_ids.append(answer.decision_id)
            categories = permitted
        found: list[storage.Record] = []
        if categories:
            async with self.rt.db.read() as conn:
                found = await storage.list_records(
                    conn,
                    request.patient_id,
                    categories=categories,
                    resource_type=request.resource_type,
                    updated_from=seconds(request.updated_from) if request.HasField("updated_from") else None,
                    updated_before=seconds(request.updated_before) if request.HasField("updated_before") else None,
                    after=after,
                    limit=size + 1,
                )
        more = len(found) > size
        found = found[:size]
        await self._announce_listing(caller, request.patient_id, found, decision_ids, request.purpose, "list")
        return pb.ListRecordsResponse(
            records=[_summary(r) for r in found],
            next_page_token=f"{found[-1].updated_at!r}/{found[-1].record_id}" if more else "",
            decision_ids=decision_ids,
        )

    async def ExportRecords(
        self, request: pb.ExportRecordsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExportRecordsResponse:
        caller = current_caller()
        if caller.principal_id != request.patient_id:
            raise PermissionDenied("a patient exports their own records only")
        async with self.rt.db.connect() as conn:
            found = await storage.list_records(conn, request.patient_id, limit=1_000_000)
            versions = [await storage.get_version(conn, r.record_id, r.latest_version) for r in found]
        entries = []
        for record, stored in zip(found, versions, strict=True):
            if stored is None:
                continue
            content = await self._open(record, stored)
            if record.media_type == domain.FHIR_JSON:
                resource = json.loads(content)
            else:
                resource = {
                    "resourceType": "Binary",
                    "contentType": record.media_type,
                    "data": base64.b64encode(content).decode("ascii"),
                }
            entries.append(
                {"fullUrl": f"urn:medledger:record:{record.record_id}:{stored.version}", "resource": resource}
            )
            entries.append(
                {
                    "fullUrl": f"urn:medledger:provenance:{record.record_id}:{stored.version}",
                    "resource": _provenance(record, stored),
                }
            )
        bundle = {"resourceType": "Bundle", "type": "collection", "entry": entries}
        await self._announce_listing(caller, request.patient_id, found, [], 0, "export")
        return pb.ExportRecordsResponse(fhir_bundle_json=json.dumps(bundle).encode(), records=len(entries) // 2)

    async def RotatePatientKey(
        self, request: pb.RotatePatientKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RotatePatientKeyResponse:
        """Rotate, rewrap every data key, and only then raise the minimum decryption version.
        Each page of rewrapped keys commits with the rotation's position, so a crash between
        pages loses nothing and a new call goes on from there (as does :meth:`finish_rotations`,
        at start). Only records' own key: the patient's keys in identity and consent are theirs."""
        if not request.patient_id:
            raise InvalidArgument.field("patient_id", "required")
        target, rewrapped = await self._rotate(request.patient_id)
        return pb.RotatePatientKeyResponse(key_version=target, rewrapped=rewrapped)

    async def finish_rotations(self, every: float = 600.0) -> None:
        """Background: rotations a crash left unfinished (rotated, but not every data key
        rewrapped or the floor not raised yet) are finished at start, and checked for again
        every ``every`` seconds; one that cannot go on now (an erasure since, the key manager
        away) is tried again then."""
        while True:
            await self.finish_unfinished_rotations()
            await asyncio.sleep(every)

    async def finish_unfinished_rotations(self) -> int:
        """One pass of :meth:`finish_rotations`; how many it finished."""
        async with self.rt.db.connect() as conn:
            unfinished = await storage.rotations_in_progress(conn)
        finished = 0
        for patient_id in unfinished:
            try:
                target, rewrapped = await self._rotate(patient_id)
            except MedledgerError as exc:
                log.warning("an unfinished key rotation could not go on", extra={"error": type(exc).__name__})
                continue
            finished += 1
            log.info("an unfinished key rotation finished", extra={"key_version": target, "rewrapped": rewrapped})
        return finished

    async def _rotate(self, patient_id: str) -> tuple[int, int]:
        """(key version, data keys rewrapped by this call) of the patient's rotation."""
        name = patient_key_name("records", patient_id)
        async with self.rt.db.transaction() as conn:
            in_progress = await storage.rotation_in_progress(conn, patient_id)
        if in_progress is None:
            info = await self.keys.rotate(name)  # NotFound when the patient has no key (no records)
            target, done_record, done_version = info.latest_version, "", 0
            async with self.rt.db.transaction() as conn:
                await storage.start_rotation(conn, patient_id, target, time.time())
        else:
            target, done_record, done_version = in_progress
        rewrapped = 0
        while True:
            async with self.rt.db.transaction() as conn:
                page = await storage.versions_after(
                    conn, patient_id, done_record, done_version, ROTATION_PAGE, key_name=name
                )
                for record_id, version, wrapped in page:
                    # An erased version has no wrapped key left to rewrap.
                    if wrapped and parse_versioned(wrapped, what="wrapped_key")[0] < target:
                        await storage.set_wrapped_key(conn, record_id, version, await self.keys.rewrap(name, wrapped))
                        rewrapped += 1
                if page:
                    done_record, done_version = page[-1][0], page[-1][1]
                    await storage.advance_rotation(conn, patient_id, done_record, done_version)
            if len(page) < ROTATION_PAGE:
                break
        await self.keys.set_min_decryption_version(name, target)
        async with self.rt.db.transaction() as conn:
            await storage.finish_rotation(conn, patient_id)
        log.info("patient key rotated", extra={"key_version": target, "rewrapped": rewrapped})
        return target, rewrapped

    def _keys_of(self, key_name: str) -> RecordKeys | KeyManager:
        """Records' own keys; a version the key-owner migration has not moved yet is under the old
        shared key, read with the legacy credential."""
        if not key_name.startswith(LEGACY_PATIENT_KEY_PREFIX):
            return self.keys
        try:
            return self.rt.legacy_keys()
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
            raise FailedPrecondition("this patient's records were erased") from None
        except DataLoss:
            TAMPERED.inc()
            log.error(
                "a stored record version failed to decrypt",
                extra={"record_id": record.record_id, "version": stored.version},
            )
            raise

    async def _announce_listing(
        self,
        caller: Caller,
        patient_id: str,
        found: list[storage.Record],
        decision_ids: list[str],
        purpose: int,
        operation: str,
    ) -> None:
        event = new_event(
            source=self.rt.source,
            payload=ev.RecordsListed(
                patient_id=patient_id,
                actor_id=caller.principal_id,
                record_ids=[r.record_id for r in found],
                decision_ids=decision_ids,
                purpose=purpose,  # type: ignore[arg-type]
                operation=operation,
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

    # Erasure and legal holds: see erasure.py.

    async def RequestErasure(
        self, request: pb.RequestErasureRequest, context: grpc.aio.ServicerContext
    ) -> pb.RequestErasureResponse:
        return await self.erasures.request(current_caller(), request)

    async def ApproveErasure(
        self, request: pb.ApproveErasureRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApproveErasureResponse:
        return await self.erasures.approve(current_caller(), request.erasure_id)

    async def CancelErasure(
        self, request: pb.CancelErasureRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelErasureResponse:
        return await self.erasures.cancel(current_caller(), request.erasure_id)

    async def GetErasure(
        self, request: pb.GetErasureRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetErasureResponse:
        return await self.erasures.get(current_caller(), request.erasure_id)

    async def PlaceLegalHold(
        self, request: pb.PlaceLegalHoldRequest, context: grpc.aio.ServicerContext
    ) -> pb.PlaceLegalHoldResponse:
        return await self.erasures.place_hold(current_caller(), request)

    async def ReleaseLegalHold(
        self, request: pb.ReleaseLegalHoldRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseLegalHoldResponse:
        return await self.erasures.release_hold(current_caller(), request.hold_id)

    async def GetErasureVerifierKey(
        self, request: pb.GetErasureVerifierKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetErasureVerifierKeyResponse:
        return pb.GetErasureVerifierKeyResponse(verifier_key=await self.erasures.verifier_key())


def _provenance(record: storage.Record, stored: storage.StoredVersion) -> dict[str, Any]:
    return domain.provenance(
        record_id=record.record_id,
        version=stored.version,
        patient_id=record.patient_id,
        written_by=stored.written_by,
        organization_id=stored.organization_id,
        written_at=stored.written_at,
    )


def _page_position(token: str) -> tuple[float, str]:
    updated, _, record_id = token.partition("/")
    try:
        position = float(updated)
    except ValueError:
        raise InvalidArgument.field("page_token", "not a token this RPC returned") from None
    if not record_id.startswith("rec_"):
        raise InvalidArgument.field("page_token", "not a token this RPC returned")
    return position, record_id


def _summary(r: storage.Record) -> pb.RecordSummary:
    return pb.RecordSummary(
        record_id=r.record_id,
        patient_id=r.patient_id,
        category=r.category,  # type: ignore[arg-type]
        media_type=r.media_type,
        resource_type=r.resource_type,
        latest_version=r.latest_version,
        updated_at=timestamp(r.updated_at),
    )
