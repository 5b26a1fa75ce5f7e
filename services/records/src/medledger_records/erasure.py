"""Erasure's use cases, apart from any transport (the gRPC API in ``api.py`` is one caller of
these): a patient's records erased on request, approved, held or cancelled.

A patient, their guardian (for them) or an admin asks. The erasure is pending until a privacy
officer other than the requester approves it, or until its grace period passes; it never starts
while a legal hold is in force, and the patient, an admin or a privacy officer may cancel it
while it is pending. Running it, crypto-shredding the patient's keys in every participant and
issuing the signed certificate, is :class:`erasure_runner.ErasureRunner`'s (the protocol's steps
are described there); the certificate is built in ``erasure_certificates.py``.

Each use case takes the caller and a command of plain values and returns plain results or
raises the errors of ``medledger_runtime.errors``. Someone else's erasure looks like a missing
one to a patient (NotFound). A guardian the patient appointed (holding the role) requests,
follows and cancels the patient's erasure as the patient would; its events name the guardian as
who acted and the patient in `on_behalf_of`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from medledger.events.v1 import records_events_pb2 as ev
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_records import erasure_storage, storage
from medledger_records.erasure_runner import (
    CANCELLED,
    COMPLETED,
    PENDING,
    RUNNING,
    ErasureRunner,
    awaiting,
    emit,
    state_name,
)
from medledger_runtime.auth import Caller
from medledger_runtime.db import Database
from medledger_runtime.errors import (
    ERASED,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MedledgerError,
    NotFound,
    PermissionDenied,
)
from medledger_runtime.guardians import Guardians
from medledger_runtime.timestamps import timestamp

log = logging.getLogger(__name__)
MAX_REASON = 500


def _is_officer(caller: Caller) -> bool:
    return caller.has_role("privacy-officer")


def _is_admin(caller: Caller) -> bool:
    return caller.has_role("admin")


# Commands.


@dataclass(frozen=True)
class RequestErasure:
    patient_id: str
    reason: str = ""


@dataclass(frozen=True)
class PlaceLegalHold:
    patient_id: str
    reason: str  # the matter


# Results.


@dataclass(frozen=True)
class ErasureView:
    """An erasure as its reader sees it: with the legal holds in force on a pending one, and the
    participants a running one still awaits."""

    erasure: erasure_storage.ErasureRow
    holds: int = 0
    awaiting: tuple[str, ...] = ()


Write = Callable[[AsyncConnection], Awaitable[Any]]


class ErasureDesk:
    """Erasure's use cases; its dependencies come through the constructor."""

    def __init__(
        self,
        db: Database,
        runner: ErasureRunner,
        notify: Callable[[], None],
        *,
        grace_seconds: float,
        source: str = "medledger.records",
        guardians: Guardians | None = None,
    ) -> None:
        self.db = db
        self.runner = runner
        # Wakes the outbox relay after a transaction with events commits.
        self.notify = notify
        self.grace_seconds = grace_seconds
        self.source = source
        # Who acts for a patient (consent's guardianships, projected); None: nobody does.
        self.guardians = guardians

    async def _guardian_of(self, caller: Caller, patient_id: str) -> bool:
        return self.guardians is not None and await self.guardians.acts_for(caller, patient_id)

    async def verifier_key(self) -> str:
        """The C2SP verifier key of erasure certificates (public: for the trust policy)."""
        return await self.runner.certifier.verifier_key()

    def after_request(self) -> None:
        """What follows a committed request: the relay, and the runner (a request whose grace
        period is zero is due at once)."""
        self.notify()
        self.runner.wake()

    async def request(
        self, caller: Caller, command: RequestErasure, transaction: Callable[[Write], Awaitable[Any]] | None = None
    ) -> Any:
        """A pending erasure of the patient's records (the patient, or an admin), and
        ErasureRequested; refused while a legal hold is in force or another erasure is pending or
        running. Returns what the transaction returns (by default the new erasure's row)."""
        if not command.patient_id:
            raise InvalidArgument.field("patient_id", "required")
        if len(command.reason) > MAX_REASON:
            raise InvalidArgument.field("reason", f"at most {MAX_REASON} characters")
        guardian = await self._guardian_of(caller, command.patient_id)
        if caller.principal_id != command.patient_id and not guardian and not _is_admin(caller):
            raise PermissionDenied("a patient (or their guardian) asks to erase their own records only")

        async def write(conn: AsyncConnection) -> erasure_storage.ErasureRow:
            await storage.lock_patient(conn, command.patient_id, exclusive=True)
            holds = await erasure_storage.holds_in_force(conn, command.patient_id)
            if holds:
                raise FailedPrecondition(
                    f"a legal hold is in force on this patient's records ({', '.join(h.hold_id for h in holds)})"
                )
            for other in await erasure_storage.erasures_of(conn, command.patient_id, [PENDING, RUNNING, COMPLETED]):
                if other.state == COMPLETED:
                    raise FailedPrecondition(f"this patient's records were erased ({other.erasure_id})", reason=ERASED)
                raise AlreadyExists(f"an erasure of this patient's records is {state_name(other.state)}")
            now = time.time()
            row = erasure_storage.ErasureRow(
                f"era_{uuid.uuid4().hex}",
                command.patient_id,
                PENDING,
                caller.principal_id,
                now,
                command.reason,
                now + self.grace_seconds,
            )
            await erasure_storage.insert_erasure(conn, row)
            payload = ev.ErasureRequested(
                erasure_id=row.erasure_id,
                patient_id=row.patient_id,
                requested_by=row.requested_by,
                runs_after=timestamp(row.runs_after),
                on_behalf_of=row.patient_id if guardian and caller.principal_id != row.patient_id else "",
            )
            await emit(conn, self.source, row.patient_id, row.erasure_id, payload)
            return row

        return await (transaction or self._transaction(self.after_request))(write)

    async def approve(self, caller: Caller, erasure_id: str) -> ErasureView:
        """A privacy officer other than the requester approves a pending erasure, which starts
        at once (unless a legal hold is in force); approving it again answers as it is now."""
        async with self.db.transaction() as conn:
            row = await self._find(conn, erasure_id, caller)
            await storage.lock_patient(conn, row.patient_id, exclusive=True)
            row = await self._find(conn, erasure_id, caller)  # as it is now that we hold the lock
            if row.state in (RUNNING, COMPLETED) and row.approved_by == caller.principal_id:
                return ErasureView(row)  # a retried approval
            if row.state != PENDING:
                raise FailedPrecondition(f"the erasure is {state_name(row.state)}, not pending")
            if row.requested_by == caller.principal_id:
                raise PermissionDenied("an erasure is approved by someone other than who requested it")
            holds = await erasure_storage.holds_in_force(conn, row.patient_id)
            if holds:
                raise FailedPrecondition(
                    f"a legal hold is in force on this patient's records ({', '.join(h.hold_id for h in holds)})"
                )
            await erasure_storage.set_erasure_state(
                conn, erasure_id, PENDING, state=RUNNING, approved_by=caller.principal_id, approved_at=time.time()
            )
            await self.runner.ask(conn, row)
        self.notify()
        log.info("erasure approved", extra={"erasure_id": erasure_id})
        with contextlib.suppress(MedledgerError):
            # Approved is approved: if the key manager is away, the runner finishes it later.
            await self.runner.execute(erasure_id)
        async with self.db.connect() as conn:
            return ErasureView(await self._find(conn, erasure_id, caller))

    async def cancel(self, caller: Caller, erasure_id: str) -> ErasureView:
        """A pending erasure cancelled (the patient, an admin, a privacy officer), and
        ErasureCancelled; cancelling it again answers as it is."""
        async with self.db.transaction() as conn:
            row = await self._find(conn, erasure_id, caller)
            if row.state == CANCELLED:
                return ErasureView(row)
            if not await erasure_storage.set_erasure_state(conn, erasure_id, PENDING, state=CANCELLED):
                raise FailedPrecondition(f"the erasure is {state_name(row.state)}, not pending")
            guardian = await self._guardian_of(caller, row.patient_id)
            payload = ev.ErasureCancelled(
                erasure_id=erasure_id,
                patient_id=row.patient_id,
                cancelled_by=caller.principal_id,
                on_behalf_of=row.patient_id if guardian else "",
            )
            await emit(conn, self.source, row.patient_id, erasure_id, payload)
            row = await self._find(conn, erasure_id, caller)
        self.notify()
        log.info("erasure cancelled", extra={"erasure_id": erasure_id})
        return ErasureView(row)

    async def get(self, caller: Caller, erasure_id: str) -> ErasureView:
        async with self.db.connect() as conn:
            row = await self._find(conn, erasure_id, caller)
            holds = await erasure_storage.holds_in_force(conn, row.patient_id) if row.state == PENDING else []
            confirmed = await erasure_storage.confirmations_of(conn, erasure_id) if row.state == RUNNING else {}
        waiting = tuple(awaiting(row, confirmed)) if row.state == RUNNING else ()
        return ErasureView(row, holds=len(holds), awaiting=waiting)

    async def place_hold(
        self, caller: Caller, command: PlaceLegalHold, transaction: Callable[[Write], Awaitable[Any]] | None = None
    ) -> Any:
        """A legal hold on the patient's records (refused once an erasure runs or ran), and
        LegalHoldChanged; returns what the transaction returns (by default the hold's row)."""
        if not command.patient_id:
            raise InvalidArgument.field("patient_id", "required")
        if not command.reason or len(command.reason) > MAX_REASON:
            raise InvalidArgument.field("reason", f"required: the matter, at most {MAX_REASON} characters")

        async def write(conn: AsyncConnection) -> erasure_storage.LegalHoldRow:
            await storage.lock_patient(conn, command.patient_id, exclusive=True)
            for erasure in await erasure_storage.erasures_of(conn, command.patient_id, [RUNNING, COMPLETED]):
                raise FailedPrecondition(f"this patient's records are already {state_name(erasure.state)} erasure")
            hold = erasure_storage.LegalHoldRow(
                f"hold_{uuid.uuid4().hex}", command.patient_id, command.reason, caller.principal_id, time.time()
            )
            await erasure_storage.insert_hold(conn, hold)
            await self._hold_changed(conn, hold, "placed", caller)
            return hold

        return await (transaction or self._transaction(self.notify))(write)

    async def release_hold(self, caller: Caller, hold_id: str) -> erasure_storage.LegalHoldRow:
        """Release a legal hold (releasing it again changes nothing), and LegalHoldChanged."""
        async with self.db.transaction() as conn:
            hold = await erasure_storage.get_hold(conn, hold_id)
            if hold is None:
                raise NotFound("no such legal hold")
            if await erasure_storage.release_hold(conn, hold_id, caller.principal_id, time.time()):
                await self._hold_changed(conn, hold, "released", caller)
            hold = await erasure_storage.get_hold(conn, hold_id)
        assert hold is not None
        self.after_request()  # a pending erasure past its grace period may run now
        return hold

    # Helpers.

    def _transaction(self, after_commit: Callable[[], None]) -> Callable[[Write], Awaitable[Any]]:
        async def transaction(write: Write) -> Any:
            async with self.db.transaction() as conn:
                result = await write(conn)
            after_commit()
            return result

        return transaction

    async def _find(self, conn: AsyncConnection, erasure_id: str, caller: Caller) -> erasure_storage.ErasureRow:
        row = await erasure_storage.get_erasure(conn, erasure_id)
        # Someone else's erasure looks like a missing one to a patient.
        if row is None or not (
            caller.principal_id == row.patient_id
            or _is_admin(caller)
            or _is_officer(caller)
            or await self._guardian_of(caller, row.patient_id)
        ):
            raise NotFound("no such erasure")
        return row

    async def _hold_changed(
        self, conn: AsyncConnection, hold: erasure_storage.LegalHoldRow, change: str, caller: Caller
    ) -> None:
        payload = ev.LegalHoldChanged(
            hold_id=hold.hold_id, patient_id=hold.patient_id, change=change, changed_by=caller.principal_id
        )
        await emit(conn, self.source, hold.patient_id, hold.hold_id, payload)
