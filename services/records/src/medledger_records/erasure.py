"""Erasure: crypto-shredding a patient's material in every service, on request, approved, held
or cancelled.

A patient (or an admin) asks. The erasure is pending until a privacy officer other than the
requester approves it, or until its grace period passes; it never starts while a legal hold is
in force, and the patient, an admin or a privacy officer may cancel it while it is pending.

records coordinates the one erasure protocol (``medledger_runtime.erasure``). Running it, each
step repeatable so that a crash anywhere is finished by the next run (the runner takes RUNNING
erasures up again):

1. PENDING -> RUNNING under the patient's exclusive lock, and in the same transaction
   PatientKeysErasureRequested goes to the outbox, naming the participants asked (the
   deployment's, from the setting; kept with the erasure). Every put takes that lock shared and
   refuses a patient with a running or completed erasure, so no version is written after this.
2. records' own part: the patient key's versions are read and kept; the key is deleted through
   the :class:`KeyShredder` (the one credential that may delete keys); blob-store ciphertexts are
   deleted; then one transaction drops ciphertexts, wrapped keys, salts and every metadata beyond
   ids, versions and commitments, and stores records' own confirmation.
3. Each other participant (identity, consent) destroys its keys and confirms with
   PatientKeysDestroyed; :meth:`ErasureDesk.confirm` stores the first confirmation of each.
4. Once every present participant but audit has confirmed, the certificate is assembled (each
   participant, key and version; audit's key is destroyed when it appends the certificate;
   absent participants named), signed as a C2SP note, kept, RUNNING -> COMPLETED, and
   PatientRecordsErased carrying it goes to the outbox for the audit log.

Until then `GetErasure` names the participants awaited, and so does a gauge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from medledger.events.v1 import records_events_pb2 as ev
from medledger.records.v1 import records_service_pb2 as pb
from prometheus_client import Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_records import storage
from medledger_records.blobs import BlobStore
from medledger_runtime.auth import Caller
from medledger_runtime.erasure import (
    AT_APPEND,
    CERTIFICATE_KEY,
    CERTIFICATE_SIGNER_NAME,
    PARTICIPANTS,
    certificate_text,
)
from medledger_runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MedledgerError,
    NotFound,
    PermissionDenied,
)
from medledger_runtime.events import TOPICS, new_event
from medledger_runtime.idempotency import run_idempotent
from medledger_runtime.keys import KeyManager, KeyShredder, KeyType, audit_subject_key_name, patient_key_name
from medledger_runtime.keys.note_signer import key_manager_signer
from medledger_runtime.outbox import enqueue
from medledger_runtime.service import ServiceRuntime
from medledger_runtime.timestamps import timestamp
from medledger_verifier import notes

log = logging.getLogger(__name__)
PENDING = pb.ErasureState.ERASURE_STATE_PENDING
RUNNING = pb.ErasureState.ERASURE_STATE_RUNNING
COMPLETED = pb.ErasureState.ERASURE_STATE_COMPLETED
CANCELLED = pb.ErasureState.ERASURE_STATE_CANCELLED
MAX_REASON = 500
GRACE_PERIOD = "grace-period"
ERASURES = Counter("medledger_records_erasures_total", "Patients' records erased (crypto-shredded).")
AWAITED = Gauge(
    "medledger_records_erasure_participants_awaited",
    "Running erasures still waiting for a participant's confirmation that it destroyed its keys.",
    ["participant"],
)
for _participant in PARTICIPANTS:
    if _participant not in AT_APPEND:
        AWAITED.labels(_participant)
Outcome = ev.ErasureOutcome


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
        participants: tuple[str, ...] = PARTICIPANTS,
        cache_max_age_seconds: float = 0.0,
        signing_keys: KeyManager | None = None,
    ) -> None:
        self.rt = runtime
        self.shredder = shredder
        self.blobs = blobs
        self.grace_seconds = grace_seconds
        self.check_interval = check_interval
        self.backup_retention_seconds = backup_retention_seconds
        self.cache_max_age_seconds = cache_max_age_seconds
        self.participants = participants
        # The everyday key manager: it holds the certificate's signing key.
        self.signing_keys = signing_keys if signing_keys is not None else runtime.require_keys()
        self._signer: notes.NoteSigner | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        """Make the certificate signing key (once) and load its signer. If the key manager
        refuses now, records serves anyway: erasures wait, RUNNING, until a certificate can be
        signed (the next run tries again)."""
        try:
            await self._load_signer()
        except MedledgerError as exc:
            log.error("the erasure certificate key is unavailable: erasures cannot complete", extra={"error": str(exc)})
        await self.refresh_awaited()

    async def _load_signer(self) -> notes.NoteSigner:
        if self._signer is None:
            await self.signing_keys.ensure_key(CERTIFICATE_KEY, KeyType.ED25519)
            self._signer = await key_manager_signer(self.signing_keys, CERTIFICATE_KEY, CERTIFICATE_SIGNER_NAME)
        return self._signer

    async def verifier_key(self) -> str:
        """The C2SP verifier key of erasure certificates (for the trust policy)."""
        return (await self._load_signer()).verifier.text()

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
            await self._ask(conn, row)
        self.rt.relay.notify()
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
            confirmed = await storage.confirmations_of(conn, erasure_id) if row.state == RUNNING else {}
        message = self._message(row, holds=len(holds))
        if row.state == RUNNING:
            message.awaiting.extend(_awaiting(row, confirmed))
        return pb.GetErasureResponse(erasure=message)

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
            with contextlib.suppress(MedledgerError):
                await self.refresh_awaited()
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
            if not await storage.set_erasure_state(conn, row.erasure_id, PENDING, state=RUNNING):
                return False
            await self._ask(conn, row)
        self.rt.relay.notify()
        return True

    async def _ask(self, conn: AsyncConnection, row: storage.ErasureRow) -> None:
        """Step 1's event: ask every present participant that confirms by event to destroy its
        keys of the patient (records does its own part itself; audit acts on the certificate)."""
        await storage.set_erasure_state(conn, row.erasure_id, RUNNING, participants=self.participants)
        asked = [p for p in self.participants if p != "records" and p not in AT_APPEND]
        payload = ev.PatientKeysErasureRequested(
            erasure_id=row.erasure_id, patient_id=row.patient_id, participants=asked
        )
        await self._enqueue(conn, row.patient_id, row.erasure_id, payload)

    async def execute(self, erasure_id: str) -> bool:
        """Steps 1-2 of a RUNNING erasure (see the module's doc), then step 4 if every participant
        has confirmed; True when this call completed it."""
        async with self.rt.db.connect() as conn:
            row = await storage.get_erasure(conn, erasure_id)
        if row is None or row.state != RUNNING:
            return False
        if not row.participants:  # started before participants were asked (an older release)
            async with self.rt.db.transaction() as conn:
                await self._ask(conn, row)
            self.rt.relay.notify()
        if row.records_erased is None:
            await self._erase_own(row)
        completed = await self.complete_if_confirmed(erasure_id)
        await self.refresh_awaited()
        return completed

    async def _erase_own(self, row: storage.ErasureRow) -> None:
        """records' own part: its key, blobs and data, then its confirmation."""
        key_name = patient_key_name("records", row.patient_id)
        versions = list(row.key_versions) or await self.shredder.key_versions(key_name)
        if not row.key_versions:
            async with self.rt.db.transaction() as conn:
                await storage.set_erasure_state(conn, row.erasure_id, RUNNING, key_versions=versions)
        await self.shredder.shred(key_name)
        if self.blobs is not None:
            async with self.rt.db.connect() as conn:
                blob_keys = await storage.blob_keys_of(conn, row.patient_id)
            for key in blob_keys:
                await self.blobs.delete(key)
        now = time.time()
        async with self.rt.db.transaction() as conn:
            records_erased, versions_erased = await storage.erase_patient_data(conn, row.patient_id, now)
            own = ev.PatientKeysDestroyed(
                erasure_id=row.erasure_id,
                patient_id=row.patient_id,
                participant="records",
                keys=[ev.DestroyedKey(key_name=key_name, versions=versions, already_gone=not versions)],
            )
            if await storage.set_erasure_state(
                conn, row.erasure_id, RUNNING, records_erased=records_erased, versions_erased=versions_erased
            ):
                await storage.add_confirmation(conn, row.erasure_id, "records", own.SerializeToString(), now)
        log.info(
            "patient records erased; waiting for the other participants",
            extra={"erasure_id": row.erasure_id, "records": records_erased, "versions": versions_erased},
        )

    async def confirm(self, confirmation: ev.PatientKeysDestroyed) -> bool:
        """Step 3: store a participant's first confirmation (a later one, redelivered or
        re-sent, changes nothing), then complete the erasure if it was the last awaited. True
        when this confirmation was stored."""
        async with self.rt.db.transaction() as conn:
            row = await storage.get_erasure(conn, confirmation.erasure_id)
            if (
                row is None
                or row.state != RUNNING
                or row.patient_id != confirmation.patient_id
                or confirmation.participant not in row.participants
                or confirmation.participant == "records"
            ):
                return False
            stored = await storage.add_confirmation(
                conn, row.erasure_id, confirmation.participant, confirmation.SerializeToString(), time.time()
            )
        if stored:
            log.info(
                "erasure participant confirmed",
                extra={"erasure_id": row.erasure_id, "participant": confirmation.participant},
            )
        try:
            await self.complete_if_confirmed(row.erasure_id)
        except MedledgerError as exc:
            # The confirmation is stored: the runner completes the erasure when it can.
            log.warning("erasure not completed now; trying again", extra={"error": str(exc)})
            self._wake.set()
        await self.refresh_awaited()
        return stored

    async def complete_if_confirmed(self, erasure_id: str) -> bool:
        """Step 4 (see the module); True when this call completed the erasure."""
        async with self.rt.db.connect() as conn:
            row = await storage.get_erasure(conn, erasure_id)
            if row is None or row.state != RUNNING or row.records_erased is None:
                return False
            confirmed = await storage.confirmations_of(conn, erasure_id)
        if _awaiting(row, confirmed):
            return False
        now = time.time()
        certificate = self._certificate(row, confirmed, now)
        note = await notes.sign_note(certificate_text(certificate), [await self._load_signer()])
        async with self.rt.db.transaction() as conn:
            completed = await storage.set_erasure_state(
                conn,
                erasure_id,
                RUNNING,
                state=COMPLETED,
                certificate=certificate.SerializeToString(),
                signed_certificate=note.format(),
            )
            if completed:
                await self._enqueue(conn, row.patient_id, erasure_id, ev.PatientRecordsErased(certificate=certificate))
        if completed:
            self.rt.relay.notify()
            ERASURES.inc()
            log.info("erasure completed: certificate issued", extra={"erasure_id": erasure_id})
        return completed

    def _certificate(
        self, row: storage.ErasureRow, confirmed: dict[str, tuple[bytes, float]], now: float
    ) -> ev.ErasureCertificate:
        participants = []
        for name in [*PARTICIPANTS, *(p for p in row.participants if p not in PARTICIPANTS)]:
            if name not in row.participants:
                participants.append(ev.ErasureParticipant(participant=name, outcome=Outcome.ERASURE_OUTCOME_ABSENT))
            elif name in AT_APPEND:
                participants.append(
                    ev.ErasureParticipant(
                        participant=name,
                        outcome=Outcome.ERASURE_OUTCOME_DESTROYED_AT_APPEND,
                        keys=[ev.DestroyedKey(key_name=audit_subject_key_name(row.patient_id))],
                    )
                )
            else:
                data, at = confirmed[name]
                destroyed = ev.PatientKeysDestroyed.FromString(data)
                participants.append(
                    ev.ErasureParticipant(
                        participant=name,
                        outcome=Outcome.ERASURE_OUTCOME_DESTROYED,
                        keys=destroyed.keys,
                        confirmed_at=timestamp(at),
                    )
                )
        # No backup of the key manager, and no data-key cache, holds any key after this.
        unrecoverable = now + max(self.backup_retention_seconds, self.cache_max_age_seconds)
        return ev.ErasureCertificate(
            erasure_id=row.erasure_id,
            patient_id=row.patient_id,
            requested_by=row.requested_by,
            requested_at=timestamp(row.requested_at),
            authorized_by=f"privacy-officer {row.approved_by}" if row.approved_by else GRACE_PERIOD,
            erased_at=timestamp(now),
            key_name=patient_key_name("records", row.patient_id),
            key_versions=row.key_versions,
            records_erased=row.records_erased or 0,
            versions_erased=row.versions_erased or 0,
            unrecoverable_after=timestamp(unrecoverable),
            participants=participants,
        )

    async def refresh_awaited(self) -> None:
        """The gauge of participants awaited, from the database (every replica sees the same)."""
        counts = dict.fromkeys((p for p in PARTICIPANTS if p not in AT_APPEND), 0)
        async with self.rt.db.connect() as conn:
            for row in await storage.running_erasures(conn, RUNNING):
                for name in _awaiting(row, await storage.confirmations_of(conn, row.erasure_id)):
                    counts[name] = counts.get(name, 0) + 1
        for name, count in counts.items():
            AWAITED.labels(name).set(count)

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
        payload: ev.ErasureRequested
        | ev.ErasureCancelled
        | ev.LegalHoldChanged
        | ev.PatientRecordsErased
        | ev.PatientKeysErasureRequested,
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
        if row.signed_certificate is not None:
            message.signed_certificate = row.signed_certificate
        return message


def _awaiting(row: storage.ErasureRow, confirmed: dict[str, tuple[bytes, float]]) -> list[str]:
    """The present participants whose confirmation a running erasure still waits for (records
    included until its own part is done; an erasure not yet asked waits for every one)."""
    present = row.participants or PARTICIPANTS
    return [p for p in present if p not in AT_APPEND and p not in confirmed]


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
