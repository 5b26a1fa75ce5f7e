"""The gRPC API of records: medledger.records.v1.RecordsService.

Each RPC parses its request into a command of ``records.py`` (or ``erasure.py``), calls the use
case with the caller, and maps the result to its response; the use cases hold the rules.
Idempotency stays here (see :meth:`RecordsApi.PutRecord`; erasure requests and legal holds
likewise). Consent is asked through
:class:`ConsentClient`, consent's gRPC API as the use cases' consent port.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf import message as pb_message
from medledger.records.v1 import records_service_pb2 as pb
from medledger.records.v1 import records_service_pb2_grpc as pb_grpc
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_records import domain, erasure_storage, key_storage, storage
from medledger_records.erasure import ErasureDesk, ErasureView, PlaceLegalHold, RequestErasure
from medledger_records.record_commands import (
    ExportRecords,
    GetRecord,
    ListRecords,
    ListRecordVersions,
    PutRecord,
    PutRecords,
    Receipt,
    RecordKeys,
    RecordWrite,
    VersionListing,
    Written,
)
from medledger_records.records import RecordDesk
from medledger_records.search import DateMatch, SearchDesk, SearchRecords, TokenMatch
from medledger_runtime.auth import Access, Caller, ScopeNeed, current_caller, patient_id_field
from medledger_runtime.errors import FailedPrecondition, InvalidArgument, MedledgerError
from medledger_runtime.idempotency import once_per_request
from medledger_runtime.keys import patient_key_name
from medledger_runtime.keys.wire import (
    parse_versioned,
)
from medledger_runtime.service import ServiceRuntime
from medledger_runtime.timestamps import seconds, timestamp

log = logging.getLogger(__name__)
_SERVICE = "/medledger.records.v1.RecordsService/"
# The erasure certificates' verifier key is public: anyone may verify a certificate.
PUBLIC_METHODS: tuple[str, ...] = (_SERVICE + "GetErasureVerifierKey",)
# The coarse table; keep it equal to services/records/README.md (a test compares them). A SMART
# Backend Services client (an integration engine) reads and writes as a practitioner does: consent
# decides, by the client's organization.
ACCESS: dict[str, Access] = {
    _SERVICE + "PutRecord": Access.of(kinds=["practitioner", "patient", "smart-client"]),
    _SERVICE + "PutRecords": Access.of(kinds=["practitioner", "patient", "smart-client"]),
    # A guardian (holding the role) acts for the patients who appointed them: the finer rules
    # ask the guardianships records keeps from consent's events.
    _SERVICE + "GetRecord": Access.of(
        kinds=["practitioner", "patient", "researcher", "smart-client"], roles=["guardian"]
    ),
    # A record's history is decided as a read of it.
    _SERVICE + "ListRecordVersions": Access.of(
        kinds=["practitioner", "patient", "researcher", "smart-client"], roles=["guardian"]
    ),
    _SERVICE + "ListRecords": Access.of(
        kinds=["practitioner", "patient", "researcher", "smart-client"], roles=["guardian"]
    ),
    _SERVICE + "SearchRecords": Access.of(
        kinds=["practitioner", "patient", "researcher", "smart-client"], roles=["guardian"]
    ),
    _SERVICE + "ExportRecords": Access.of(kinds=["patient"], roles=["guardian"]),
    _SERVICE + "RotatePatientKey": Access.of(roles=["admin"]),
    _SERVICE + "RequestErasure": Access.of(kinds=["patient"], roles=["admin", "guardian"]),
    _SERVICE + "ApproveErasure": Access.of(roles=["privacy-officer"]),
    _SERVICE + "CancelErasure": Access.of(kinds=["patient"], roles=["admin", "privacy-officer", "guardian"]),
    _SERVICE + "GetErasure": Access.of(kinds=["patient"], roles=["admin", "privacy-officer", "guardian"]),
    _SERVICE + "PlaceLegalHold": Access.of(roles=["admin", "privacy-officer"]),
    _SERVICE + "ReleaseLegalHold": Access.of(roles=["admin", "privacy-officer"]),
}


def _put_scopes(caller: Caller, request: pb.PutRecordRequest) -> None:
    """Create for a new record, update for a new version, of the type the content claims (the
    use case checks the stored record's own type on an update)."""
    resource_type = domain.content_scope_type(request.media_type, request.content)
    caller.require_scope(resource_type, "u" if request.record_id else "c", request.patient_id)


def _put_many_scopes(caller: Caller, request: pb.PutRecordsRequest) -> None:
    for write in request.records:
        resource_type = domain.content_scope_type(write.media_type, write.content)
        caller.require_scope(resource_type, "u" if write.record_id else "c", request.patient_id)


# What a token with SMART scopes needs (medledger_runtime.auth.scopes); any RPC not here refuses
# such a token (erasure, legal holds, key rotation are not FHIR interactions). Documents are
# FHIR Binary resources. Keep it equal to the README's scopes table.
SCOPES: dict[str, ScopeNeed] = {
    _SERVICE + "PutRecord": ScopeNeed.by(_put_scopes),
    _SERVICE + "PutRecords": ScopeNeed.by(_put_many_scopes),
    # The record's type is known once the use case has read it.
    _SERVICE + "GetRecord": ScopeNeed.in_use_case(),
    # Instance history reads one record, of a type the request does not name: until its use case
    # checks that type, only a token that reads every type may ask.
    _SERVICE + "ListRecordVersions": ScopeNeed.in_use_case(),
    # No resource type asked: every type, which needs a `*` scope.
    _SERVICE + "ListRecords": ScopeNeed(lambda r: r.resource_type, "s", patient=patient_id_field),
    _SERVICE + "SearchRecords": ScopeNeed(lambda r: r.resource_type, "s", patient=patient_id_field),
    _SERVICE + "ExportRecords": ScopeNeed("*", "r", patient=patient_id_field),
}
ROTATION_PAGE = 100
T = TypeVar("T")
R = TypeVar("R", bound=pb_message.Message)


def _receipt(r: Receipt) -> pb.Receipt:
    return pb.Receipt(
        record_id=r.record_id, version=r.version, commitment=r.commitment, salt=r.salt.hex(), event_id=r.event_id
    )


def _put_response(w: Written) -> pb.PutRecordResponse:
    return pb.PutRecordResponse(record_id=w.record_id, version=w.version, receipt=_receipt(w.receipt))


def _put_records_response(written: list[Written]) -> pb.PutRecordsResponse:
    return pb.PutRecordsResponse(records=[_put_response(w) for w in written])


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


def _versions_response(listing: VersionListing) -> pb.ListRecordVersionsResponse:
    return pb.ListRecordVersionsResponse(
        record=_summary(listing.record),
        versions=[
            pb.RecordVersion(version=v.version, written_at=timestamp(v.written_at), receipt=_receipt(v.receipt))
            for v in listing.versions
        ],
        next_page_token=listing.next_page_token,
        decision_id=listing.decision_id,
    )


def _erasure(view: ErasureView) -> pb.Erasure:
    row = view.erasure
    message = pb.Erasure(
        erasure_id=row.erasure_id,
        patient_id=row.patient_id,
        state=row.state,  # type: ignore[arg-type]
        requested_by=row.requested_by,
        requested_at=timestamp(row.requested_at),
        reason=row.reason,
        runs_after=timestamp(row.runs_after),
        approved_by=row.approved_by,
        blocked_by=f"{view.holds} legal hold(s) in force" if view.holds else "",
    )
    if row.approved_at is not None:
        message.approved_at.CopyFrom(timestamp(row.approved_at))
    if row.certificate is not None:
        message.certificate.ParseFromString(row.certificate)
    if row.signed_certificate is not None:
        message.signed_certificate = row.signed_certificate
    message.awaiting.extend(view.awaiting)
    return message


def _hold(hold: erasure_storage.LegalHoldRow) -> pb.LegalHold:
    message = pb.LegalHold(
        hold_id=hold.hold_id,
        patient_id=hold.patient_id,
        reason=hold.reason,
        placed_by=hold.placed_by,
        placed_at=timestamp(hold.placed_at),
        released_by=hold.released_by,
    )
    if hold.released_at is not None:
        message.released_at.CopyFrom(timestamp(hold.released_at))
    return message


def _erasure_requested(row: erasure_storage.ErasureRow) -> pb.RequestErasureResponse:
    return pb.RequestErasureResponse(erasure=_erasure(ErasureView(row)))


def _hold_placed(row: erasure_storage.LegalHoldRow) -> pb.PlaceLegalHoldResponse:
    return pb.PlaceLegalHoldResponse(legal_hold=_hold(row))


class RecordsApi(pb_grpc.RecordsServiceServicer):
    def __init__(
        self,
        runtime: ServiceRuntime,
        keys: RecordKeys,
        records: RecordDesk,
        erasures: ErasureDesk,
        search: SearchDesk | None = None,
    ) -> None:
        self.rt = runtime
        self.keys = keys  # for key rotation
        self.records = records
        self.erasures = erasures
        self.search = search

    def _once(
        self,
        scope: str,
        request: pb_message.Message,
        response_cls: type[R],
        respond: Callable[[T], R],
        after_commit: Callable[[], None],
    ) -> Callable[[Callable[[AsyncConnection], Awaitable[T]]], Awaitable[R]]:
        """The transaction of a mutating RPC's write: once per request id (see
        ``idempotency.once_per_request``)."""
        return once_per_request(
            self.rt.db,
            scope=scope,
            request=request,
            response_cls=response_cls,
            respond=respond,
            after_commit=after_commit,
        )

    async def PutRecord(self, request: pb.PutRecordRequest, context: grpc.aio.ServicerContext) -> pb.PutRecordResponse:
        """Idempotency is kept here, around the use case's transaction, because what it keys and
        keeps is the wire's: the request's fingerprint is its protobuf bytes (request_id
        included), and a retry is answered with the very response first stored. The use case
        checks and asks consent before (as every call does, a retry too) and writes inside it."""
        command = PutRecord(
            patient_id=request.patient_id,
            category=request.category,
            media_type=request.media_type,
            content=request.content,
            record_id=request.record_id,
            expected_version=request.expected_version,
            assign_fhir_identity=request.assign_fhir_identity,
        )

        once = self._once("records.PutRecord", request, pb.PutRecordResponse, _put_response, self.rt.relay.notify)
        return await self.records.put(current_caller(), command, once)

    async def PutRecords(
        self, request: pb.PutRecordsRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutRecordsResponse:
        """All or nothing, idempotent as PutRecord: every record's write runs in the one
        transaction that keeps the request id and the response."""
        command = PutRecords(
            patient_id=request.patient_id,
            records=tuple(
                RecordWrite(
                    category=r.category,
                    media_type=r.media_type,
                    content=r.content,
                    record_id=r.record_id,
                    expected_version=r.expected_version,
                    full_url=r.full_url,
                )
                for r in request.records
            ),
            references=dict(request.references),
            assign_fhir_identity=request.assign_fhir_identity,
        )
        once = self._once(
            "records.PutRecords", request, pb.PutRecordsResponse, _put_records_response, self.rt.relay.notify
        )
        response: pb.PutRecordsResponse = await self.records.put_records(current_caller(), command, once)
        return response

    async def GetRecord(self, request: pb.GetRecordRequest, context: grpc.aio.ServicerContext) -> pb.GetRecordResponse:
        command = GetRecord(record_id=request.record_id, version=request.version, purpose=request.purpose)
        d = await self.records.get(current_caller(), command)
        return pb.GetRecordResponse(
            content=d.content,
            media_type=d.media_type,
            version=d.version,
            receipt=_receipt(d.receipt),
            decision_id=d.decision_id,
            patient_id=d.patient_id,
            category=d.category,  # type: ignore[arg-type]
            provenance_fhir_json=json.dumps(d.provenance).encode(),
        )

    async def ListRecordVersions(
        self, request: pb.ListRecordVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRecordVersionsResponse:
        command = ListRecordVersions(
            record_id=request.record_id,
            purpose=request.purpose,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return _versions_response(await self.records.versions(current_caller(), command))

    async def ListRecords(
        self, request: pb.ListRecordsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRecordsResponse:
        command = ListRecords(
            patient_id=request.patient_id,
            purpose=request.purpose,
            categories=tuple(request.categories),
            resource_type=request.resource_type,
            updated_from=seconds(request.updated_from) if request.HasField("updated_from") else None,
            updated_before=seconds(request.updated_before) if request.HasField("updated_before") else None,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        listing = await self.records.list(current_caller(), command)
        return pb.ListRecordsResponse(
            records=[_summary(r) for r in listing.records],
            next_page_token=listing.next_page_token,
            decision_ids=listing.decision_ids,
        )

    async def SearchRecords(
        self, request: pb.SearchRecordsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SearchRecordsResponse:
        """FHIR search in the patient's compartment (search.py); RecordsListed is durable before
        this answers, so the disclosure interceptor is told not to write its own."""
        if self.search is None:
            raise FailedPrecondition("search is not wired in this process")
        command = SearchRecords(
            patient_id=request.patient_id,
            resource_type=request.resource_type,
            tokens=tuple(TokenMatch(t.parameter, tuple(t.values)) for t in request.tokens),
            dates=tuple(DateMatch(d.parameter, d.value) for d in request.dates),
            record_ids=tuple(request.record_ids),
            last_updated=tuple(request.last_updated),
            purpose=request.purpose,
            page_size=request.page_size,
            page_token=request.page_token,
            count_only=request.count_only,
        )
        result = await self.search.search(current_caller(), command)
        return pb.SearchRecordsResponse(
            records=[
                pb.FoundRecord(summary=_summary(f.record), content=f.content, receipt=_receipt(f.receipt))
                for f in result.records
            ],
            next_page_token=result.next_page_token,
            total=result.total,
            decision_ids=result.decision_ids,
        )

    async def ExportRecords(
        self, request: pb.ExportRecordsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExportRecordsResponse:
        export = await self.records.export(current_caller(), ExportRecords(patient_id=request.patient_id))
        return pb.ExportRecordsResponse(fhir_bundle_json=json.dumps(export.bundle).encode(), records=export.records)

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
            unfinished = await key_storage.rotations_in_progress(conn)
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
            in_progress = await key_storage.rotation_in_progress(conn, patient_id)
        if in_progress is None:
            info = await self.keys.rotate(name)  # NotFound when the patient has no key (no records)
            target, done_record, done_version = info.latest_version, "", 0
            async with self.rt.db.transaction() as conn:
                await key_storage.start_rotation(conn, patient_id, target, time.time())
        else:
            target, done_record, done_version = in_progress
        rewrapped = 0
        while True:
            async with self.rt.db.transaction() as conn:
                page = await key_storage.versions_after(
                    conn, patient_id, done_record, done_version, ROTATION_PAGE, key_name=name
                )
                for record_id, version, wrapped in page:
                    # An erased version has no wrapped key left to rewrap.
                    if wrapped and parse_versioned(wrapped, what="wrapped_key")[0] < target:
                        await key_storage.set_wrapped_key(
                            conn, record_id, version, await self.keys.rewrap(name, wrapped)
                        )
                        rewrapped += 1
                if page:
                    done_record, done_version = page[-1][0], page[-1][1]
                    await key_storage.advance_rotation(conn, patient_id, done_record, done_version)
            if len(page) < ROTATION_PAGE:
                break
        await self.keys.set_min_decryption_version(name, target)
        async with self.rt.db.transaction() as conn:
            await key_storage.finish_rotation(conn, patient_id)
        log.info("patient key rotated", extra={"key_version": target, "rewrapped": rewrapped})
        return target, rewrapped

    # Erasure and legal holds: see erasure.py.

    async def RequestErasure(
        self, request: pb.RequestErasureRequest, context: grpc.aio.ServicerContext
    ) -> pb.RequestErasureResponse:
        command = RequestErasure(patient_id=request.patient_id, reason=request.reason)

        once = self._once(
            "records.RequestErasure",
            request,
            pb.RequestErasureResponse,
            _erasure_requested,
            self.erasures.after_request,
        )
        response: pb.RequestErasureResponse = await self.erasures.request(current_caller(), command, once)
        # Logged for a retry too, with the erasure it answers with.
        log.info("erasure requested", extra={"erasure_id": response.erasure.erasure_id})
        return response

    async def ApproveErasure(
        self, request: pb.ApproveErasureRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApproveErasureResponse:
        view = await self.erasures.approve(current_caller(), request.erasure_id)
        return pb.ApproveErasureResponse(erasure=_erasure(view))

    async def CancelErasure(
        self, request: pb.CancelErasureRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelErasureResponse:
        view = await self.erasures.cancel(current_caller(), request.erasure_id)
        return pb.CancelErasureResponse(erasure=_erasure(view))

    async def GetErasure(
        self, request: pb.GetErasureRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetErasureResponse:
        view = await self.erasures.get(current_caller(), request.erasure_id)
        return pb.GetErasureResponse(erasure=_erasure(view))

    async def PlaceLegalHold(
        self, request: pb.PlaceLegalHoldRequest, context: grpc.aio.ServicerContext
    ) -> pb.PlaceLegalHoldResponse:
        command = PlaceLegalHold(patient_id=request.patient_id, reason=request.reason)

        once = self._once(
            "records.PlaceLegalHold",
            request,
            pb.PlaceLegalHoldResponse,
            _hold_placed,
            self.rt.relay.notify,
        )
        response: pb.PlaceLegalHoldResponse = await self.erasures.place_hold(current_caller(), command, once)
        return response

    async def ReleaseLegalHold(
        self, request: pb.ReleaseLegalHoldRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseLegalHoldResponse:
        hold = await self.erasures.release_hold(current_caller(), request.hold_id)
        return pb.ReleaseLegalHoldResponse(legal_hold=_hold(hold))

    async def GetErasureVerifierKey(
        self, request: pb.GetErasureVerifierKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetErasureVerifierKeyResponse:
        return pb.GetErasureVerifierKeyResponse(verifier_key=await self.erasures.verifier_key())
