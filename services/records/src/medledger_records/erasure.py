"""Erasure: crypto-shredding a patient's records, on request, approved, held or cancelled.

A patient (or an admin) asks. The erasure is pending until a privacy officer other than the
requester approves it, or until its grace period passes; it never starts while a legal hold is
in force, and the patient, an admin or a privacy officer may cancel it while it is pending.

Running it, each step repeatable so that a crash anywhere is finished by the next run (the
runner takes RUNNING erasures up again):

1. PENDING -> RUNNING under the patient's exclusive lock. Every put takes that lock shared and
   refuses a patient with a running or completed erasure, so no version is written after this.
2. The patient key's versions are read and kept with the erasure (for the certificate).
3. The key is deleted through the :class:`KeyShredder`, the one key-manager credential that may
   delete keys, used nowhere else (the service's everyday credential cannot).
4. Blob-store ciphertexts are deleted.
5. One transaction: ciphertexts, wrapped keys, salts and every metadata beyond ids, versions and
   commitments go; the certificate is kept; RUNNING -> COMPLETED; PatientRecordsErased, carrying
   the certificate for the audit log, goes to the outbox (identity drops the patient's personal
   attributes on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from medledger.events.v1 import records_events_pb2 as ev
from medledger.records.v1 import records_service_pb2 as pb
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_common.auth import Caller
from medledger_common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MedledgerError,
    NotFound,
    PermissionDenied,
)
from medledger_common.events import TOPICS, new_event
from medledger_common.idempotency import run_idempotent
from medledger_common.keys import KeyShredder, patient_key_name
from medledger_common.outbox import enqueue
from medledger_common.service import ServiceRuntime
from medledger_common.timestamps import timestamp
from medledger_records import storage
from medledger_records.blobs import BlobStore

log = logging.getLogger(__name__)
PENDING = pb.ErasureState.ERASURE_STATE_PENDING
RUNNING = pb.ErasureState.ERASURE_STATE_RUNNING
COMPLETED = pb.ErasureState.ERASURE_STATE_COMPLETED
CANCELLED = pb.ErasureState.ERASURE_STATE_CANCELLED
MAX_REASON = 500
GRACE_PERIOD = "grace-period"
ERASURES = Counter("medledger_records_erasures_total", "Patients' records erased (crypto-shredded).")


def _state_name(state: int) -> str:
    return pb.ErasureState.Name(state).removeprefix("ERASURE_STATE_").lower()  # type: ignore[arg-type]


def _is_officer(caller: Caller) -> bool:
    return caller.has_role("privacy-officer")


def _is_admin(caller: Caller) -> bool:
    return caller.has_role("admin")


class ErasureDesk:
    def __init__(
        self,
        runtime: ServiceRuntime,
        shredder: KeyShredder,
        blobs: BlobStore | None,
        *,
        grace_seconds: float,
        check_interval: float,
        backup_retention_seconds: float,
    ) -> None:
        self.rt = runtime
        self.shredder = shredder
        self.blobs = blobs
        self.grace_seconds = grace_seconds
        self.check_interval = check_interval
        self.backup_retention_seconds = backup_retention_seconds
        self._wake = asyncio.Event()

    # The RPCs.

    async def request(self, caller: Caller, request: pb.RequestErasureRequest) -> pb.RequestErasureResponse:
        if not request.patient_id:
            raise InvalidArgument.field("patient_id", "required")
        if len(request.reason) > MAX_REASON:
            raise InvalidArgument.field("reason", f"at most {MAX_REASON} characters")
        if caller.principal_id != request.patient_id and not _is_admin(caller):
            raise PermissionDenied("a patient asks to erase their own records only")

        async def work(conn: AsyncConnection) -> pb.RequestErasureResponse:
            await storage.lock_patient(conn, request.patient_id, exclusive=True)
            holds = await storage.holds_in_force(conn, request.patient_id)
            if holds:
                raise FailedPrecondition(
                    f"a legal hold is in force on this patient's records ({', '.join(h.hold_id for h in holds)})"
                )
            for other in await storage.erasures_of(conn, request.patient_id, [PENDING, RUNNING, COMPLETED]):
                if other.state == COMPLETED:
                    raise FailedPrecondition(f"this patient's records were erased ({other.erasure_id})")
                raise AlreadyExists(f"an erasure of this patient's records is {_state_name(other.state)}")
            now = time.time()
            row = storage.ErasureRow(
                f"era_{uuid.uuid4().hex}",
                request.patient_id,
                PENDING,
                caller.principal_id,
                now,
                request.reason,
                now + self.grace_seconds,
            )
            await storage.insert_erasure(conn, row)
            payload = ev.ErasureRequested(
                erasure_id=row.erasure_id,
                patient_id=row.patient_id,
                requested_by=row.requested_by,
                runs_after=timestamp(row.runs_after),
            )
            await self._enqueue(conn, row.patient_id, row.erasure_id, payload)
            return pb.RequestErasureResponse(erasure=self._message(row))

        response = await run_idempotent(
            self.rt.db,
            scope="records.RequestErasure",
            request_id=request.request_id,
            request=request,
            response_cls=pb.RequestErasureResponse,
            work=work,
            after_commit=self._after_commit,
        )
        log.info("erasure requested", extra={"erasure_id": response.erasure.erasure_id})
        return response

    async def approve(self, caller: Caller, erasure_id: str) -> pb.ApproveErasureResponse:
        async with self.rt.db.transaction() as conn:
            row = await self._find(conn, erasure_id, caller)
            await storage.lock_patient(conn, row.patient_id, exclusive=True)
            row = await self._find(conn, erasure_id, caller)  # as it is now that we hold the lock
            if row.state in (RUNNING, COMPLETED) and row.approved_by == caller.principal_id:
                return pb.ApproveErasureResponse(erasure=self._message(row))  # a retried approval
            if row.state != PENDING:
                raise FailedPrecondition(f"the erasure is {_state_name(row.state)}, not pending")
            if row.requested_by == caller.principal_id:
                raise PermissionDenied("an erasure is approved by someone other than who requested it")
            holds = await storage.holds_in_force(conn, row.patient_id)
            if holds:
                raise FailedPrecondition(
                    f"a legal hold is in force on this patient's records ({', '.join(h.hold_id for h in holds)})"
                )
            await storage.set_erasure_state(
                conn, erasure_id, PENDING, state=RUNNING, approved_by=caller.principal_id, approved_at=time.time()
            )
        log.info("erasure approved", extra={"erasure_id": erasure_id})
        with contextlib.suppress(MedledgerError):
            # Approved is approved: if the key manager is away, the runner finishes it later.
            await self.execute(erasure_id)
        async with self.rt.db.connect() as conn:
            return pb.ApproveErasureResponse(erasure=self._message(await self._find(conn, erasure_id, caller)))

    async def cancel(self, caller: Caller, erasure_id: str) -> pb.CancelErasureResponse:
        async with self.rt.db.transaction() as conn:
            row = await self._find(conn, erasure_id, caller)
            if row.state == CANCELLED:
                return pb.CancelErasureResponse(erasure=self._message(row))
            if not await storage.set_erasure_state(conn, erasure_id, PENDING, state=CANCELLED):
                raise FailedPrecondition(f"the erasure is {_state_name(row.state)}, not pending")
            payload = ev.ErasureCancelled(
                erasure_id=erasure_id, patient_id=row.patient_id, cancelled_by=caller.principal_id
            )
            await self._enqueue(conn, row.patient_id, erasure_id, payload)
            row = await self._find(conn, erasure_id, caller)
        self.rt.relay.notify()
        log.info("erasure cancelled", extra={"erasure_id": erasure_id})
        return pb.CancelErasureResponse(erasure=self._message(row))

    async def get(self, caller: Caller, erasure_id: str) -> pb.GetErasureResponse:
        async with self.rt.db.connect() as conn:
            row = await self._find(conn, erasure_id, caller)
            holds = await storage.holds_in_force(conn, row.patient_id) if row.state == PENDING else []
        return pb.GetErasureResponse(erasure=self._message(row, holds=len(holds)))

    async def place_hold(self, caller: Caller, request: pb.PlaceLegalHoldRequest) -> pb.PlaceLegalHoldResponse:
        if not request.patient_id:
            raise InvalidArgument.field("patient_id", "required")
        if not request.reason or len(request.reason) > MAX_REASON:
            raise InvalidArgument.field("reason", f"required: the matter, at most {MAX_REASON} characters")

        async def work(conn: AsyncConnection) -> pb.PlaceLegalHoldResponse:
            await storage.lock_patient(conn, request.patient_id, exclusive=True)
            for erasure in await storage.erasures_of(conn, request.patient_id, [RUNNING, COMPLETED]):
                raise FailedPrecondition(f"this patient's records are already {_state_name(erasure.state)} erasure")
            hold = storage.LegalHoldRow(
                f"hold_{uuid.uuid4().hex}", request.patient_id, request.reason, caller.principal_id, time.time()
            )
            await storage.insert_hold(conn, hold)
            await self._hold_changed(conn, hold, "placed", caller)
            return pb.PlaceLegalHoldResponse(legal_hold=_hold_message(hold))

        return await run_idempotent(
            self.rt.db,
            scope="records.PlaceLegalHold",
            request_id=request.request_id,
            request=request,
            response_cls=pb.PlaceLegalHoldResponse,
            work=work,
            after_commit=self.rt.relay.notify,
        )

    async def release_hold(self, caller: Caller, hold_id: str) -> pb.ReleaseLegalHoldResponse:
        async with self.rt.db.transaction() as conn:
            hold = await storage.get_hold(conn, hold_id)
            if hold is None:
                raise NotFound("no such legal hold")
            if await storage.release_hold(conn, hold_id, caller.principal_id, time.time()):
                await self._hold_changed(conn, hold, "released", caller)
            hold = await storage.get_hold(conn, hold_id)
        assert hold is not None
        self._after_commit()  # a pending erasure past its grace period may run now
        return pb.ReleaseLegalHoldResponse(legal_hold=_hold_message(hold))

    # Running erasures.

    async def run(self) -> None:
        """Background: run erasures past their grace period, and finish interrupted ones."""
        while True:
            try:
                await self.run_due()
            except MedledgerError as exc:
                log.warning("erasures could not run now; trying again", extra={"error": str(exc)})
            except Exception:
                log.exception("running erasures failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.check_interval)
            self._wake.clear()

    async def run_due(self) -> list[str]:
        """Run what is due now; returns the erasures completed."""
        async with self.rt.db.connect() as conn:
            due = await storage.erasures_to_run(conn, PENDING, RUNNING, time.time())
        done = []
        for row in due:
            if row.state == PENDING and not await self._start_after_grace(row):
                continue
            if await self.execute(row.erasure_id):
                done.append(row.erasure_id)
        return done

    async def _start_after_grace(self, row: storage.ErasureRow) -> bool:
        async with self.rt.db.transaction() as conn:
            await storage.lock_patient(conn, row.patient_id, exclusive=True)
            if await storage.holds_in_force(conn, row.patient_id):
                return False
            return await storage.set_erasure_state(conn, row.erasure_id, PENDING, state=RUNNING)

    async def execute(self, erasure_id: str) -> bool:
        """Steps 2-5 of a RUNNING erasure (see the module's doc); True when this call completed it."""
        async with self.rt.db.connect() as conn:
            row = await storage.get_erasure(conn, erasure_id)
        if row is None or row.state != RUNNING:
            return False
        key_name = patient_key_name("records", row.patient_id)
        versions = list(row.key_versions) or await self.shredder.key_versions(key_name)
        if not row.key_versions:
            async with self.rt.db.transaction() as conn:
                await storage.set_erasure_state(conn, erasure_id, RUNNING, key_versions=versions)
        await self.shredder.shred(key_name)
        if self.blobs is not None:
            async with self.rt.db.connect() as conn:
                blob_keys = await storage.blob_keys_of(conn, row.patient_id)
            for key in blob_keys:
                await self.blobs.delete(key)
        now = time.time()
        async with self.rt.db.transaction() as conn:
            records_erased, versions_erased = await storage.erase_patient_data(conn, row.patient_id, now)
            certificate = ev.ErasureCertificate(
                erasure_id=erasure_id,
                patient_id=row.patient_id,
                requested_by=row.requested_by,
                requested_at=timestamp(row.requested_at),
                authorized_by=f"privacy-officer {row.approved_by}" if row.approved_by else GRACE_PERIOD,
                erased_at=timestamp(now),
                key_name=key_name,
                key_versions=versions,
                records_erased=records_erased,
                versions_erased=versions_erased,
                unrecoverable_after=timestamp(now + self.backup_retention_seconds),
            )
            completed = await storage.set_erasure_state(
                conn, erasure_id, RUNNING, state=COMPLETED, certificate=certificate.SerializeToString()
            )
            if completed:
                await self._enqueue(conn, row.patient_id, erasure_id, ev.PatientRecordsErased(certificate=certificate))
        if completed:
            self.rt.relay.notify()
            ERASURES.inc()
            log.info(
                "patient records erased",
                extra={"erasure_id": erasure_id, "records": records_erased, "versions": versions_erased},
            )
        return completed

    # Helpers.

    def _after_commit(self) -> None:
        self.rt.relay.notify()
        self._wake.set()

    async def _find(self, conn: AsyncConnection, erasure_id: str, caller: Caller) -> storage.ErasureRow:
        row = await storage.get_erasure(conn, erasure_id)
        # Someone else's erasure looks like a missing one to a patient.
        if row is None or not (caller.principal_id == row.patient_id or _is_admin(caller) or _is_officer(caller)):
            raise NotFound("no such erasure")
        return row

    async def _enqueue(
        self,
        conn: AsyncConnection,
        patient_id: str,
        aggregate_id: str,
        payload: ev.ErasureRequested | ev.ErasureCancelled | ev.LegalHoldChanged | ev.PatientRecordsErased,
    ) -> None:
        event = new_event(
            source=self.rt.source, payload=payload, aggregate_id=aggregate_id, version=0, subject=patient_id
        )
        await enqueue(conn, TOPICS["records"], event, key=patient_id.encode())

    async def _hold_changed(
        self, conn: AsyncConnection, hold: storage.LegalHoldRow, change: str, caller: Caller
    ) -> None:
        payload = ev.LegalHoldChanged(
            hold_id=hold.hold_id, patient_id=hold.patient_id, change=change, changed_by=caller.principal_id
        )
        await self._enqueue(conn, hold.patient_id, hold.hold_id, payload)

    def _message(self, row: storage.ErasureRow, *, holds: int = 0) -> pb.Erasure:
        message = pb.Erasure(
            erasure_id=row.erasure_id,
            patient_id=row.patient_id,
            state=row.state,  # type: ignore[arg-type]
            requested_by=row.requested_by,
            requested_at=timestamp(row.requested_at),
            reason=row.reason,
            runs_after=timestamp(row.runs_after),
            approved_by=row.approved_by,
            blocked_by=f"{holds} legal hold(s) in force" if holds else "",
        )
        if row.approved_at is not None:
            message.approved_at.CopyFrom(timestamp(row.approved_at))
        if row.certificate is not None:
            message.certificate.ParseFromString(row.certificate)
        return message


def _hold_message(hold: storage.LegalHoldRow) -> pb.LegalHold:
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
