"""Running erasures: the erasure protocol (``medledger_runtime.erasure``) that records coordinates,
once an erasure is approved or past its grace period (``erasure.py`` holds the requests,
approvals and legal holds). Each step is repeatable, so that a crash anywhere is finished by the
next run (the runner takes RUNNING erasures up again):

1. PENDING -> RUNNING under the patient's exclusive lock, and in the same transaction
   PatientKeysErasureRequested goes to the outbox, naming the participants asked (the
   deployment's, from the setting; kept with the erasure). Every put takes that lock shared and
   refuses a patient with a running or completed erasure, so no version is written after this.
2. records' own part: the patient key's versions are read and kept; the key, and the patient's
   search key (``records-search-<id>``, the blind index's), are deleted through the
   :class:`KeyShredder` (the one credential that may delete keys); blob-store ciphertexts are
   deleted; then one transaction drops ciphertexts, wrapped keys, salts and every metadata beyond
   ids, versions and commitments, and stores records' own confirmation.
3. Each other participant (identity, consent) destroys its keys and confirms with
   PatientKeysDestroyed; :meth:`ErasureRunner.confirm` stores the first confirmation of each.
4. Once every present participant but audit has confirmed, the certificate is assembled and
   signed (``erasure_certificates.py``), kept, RUNNING -> COMPLETED, and PatientRecordsErased
   carrying it goes to the outbox for the audit log.

Until then `GetErasure` names the participants awaited, and so does a gauge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from medledger.events.v1 import records_events_pb2 as ev
from medledger.records.v1 import records_service_pb2 as pb
from prometheus_client import Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_records import erasure_storage, storage
from medledger_records.blobs import BlobStore
from medledger_records.erasure_certificates import Certifier
from medledger_runtime.db import Database
from medledger_runtime.erasure import AT_APPEND, PARTICIPANTS
from medledger_runtime.errors import MedledgerError
from medledger_runtime.events import TOPICS, new_event
from medledger_runtime.keys import KeyShredder, patient_key_name
from medledger_runtime.outbox import enqueue

log = logging.getLogger(__name__)
PENDING = pb.ErasureState.ERASURE_STATE_PENDING
RUNNING = pb.ErasureState.ERASURE_STATE_RUNNING
COMPLETED = pb.ErasureState.ERASURE_STATE_COMPLETED
CANCELLED = pb.ErasureState.ERASURE_STATE_CANCELLED
ERASURES = Counter("medledger_records_erasures_total", "Patients' records erased (crypto-shredded).")
AWAITED = Gauge(
    "medledger_records_erasure_participants_awaited",
    "Running erasures still waiting for a participant's confirmation that it destroyed its keys.",
    ["participant"],
)
for _participant in PARTICIPANTS:
    if _participant not in AT_APPEND:
        AWAITED.labels(_participant)
ErasureEvent = (
    ev.ErasureRequested
    | ev.ErasureCancelled
    | ev.LegalHoldChanged
    | ev.PatientRecordsErased
    | ev.PatientKeysErasureRequested
)


def state_name(state: int) -> str:
    return pb.ErasureState.Name(state).removeprefix("ERASURE_STATE_").lower()  # type: ignore[arg-type]


def awaiting(row: erasure_storage.ErasureRow, confirmed: dict[str, tuple[bytes, float]]) -> list[str]:
    """The present participants whose confirmation a running erasure still waits for (records
    included until its own part is done; an erasure not yet asked waits for every one)."""
    present = row.participants or PARTICIPANTS
    return [p for p in present if p not in AT_APPEND and p not in confirmed]


async def emit(conn: AsyncConnection, source: str, patient_id: str, aggregate_id: str, payload: ErasureEvent) -> None:
    """An erasure's or legal hold's event, through the outbox in the caller's transaction."""
    event = new_event(source=source, payload=payload, aggregate_id=aggregate_id, version=0, subject=patient_id)
    await enqueue(conn, TOPICS["records"], event, key=patient_id.encode())


class ErasureRunner:
    """Runs erasures (steps 1-4 above); its dependencies come through the constructor."""

    def __init__(
        self,
        db: Database,
        shredder: KeyShredder,
        blobs: BlobStore | None,
        certifier: Certifier,
        notify: Callable[[], None],
        *,
        check_interval: float,
        participants: tuple[str, ...] = PARTICIPANTS,
        source: str = "medledger.records",
    ) -> None:
        self.db = db
        self.shredder = shredder
        self.blobs = blobs
        self.certifier = certifier
        # Wakes the outbox relay after a transaction with events commits.
        self.notify = notify
        self.check_interval = check_interval
        self.participants = participants
        self.source = source
        self._wake = asyncio.Event()

    async def start(self) -> None:
        """Make the certificate signing key (once) and load its signer. If the key manager
        refuses now, records serves anyway: erasures wait, RUNNING, until a certificate can be
        signed (the next run tries again)."""
        try:
            await self.certifier.signer()
        except MedledgerError as exc:
            log.error("the erasure certificate key is unavailable: erasures cannot complete", extra={"error": str(exc)})
        await self.refresh_awaited()

    def wake(self) -> None:
        """Run now rather than at the next check (a request or a release may have made one due)."""
        self._wake.set()

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
        async with self.db.connect() as conn:
            due = await erasure_storage.erasures_to_run(conn, PENDING, RUNNING, time.time())
        done = []
        for row in due:
            if row.state == PENDING and not await self._start_after_grace(row):
                continue
            if await self.execute(row.erasure_id):
                done.append(row.erasure_id)
        return done

    async def _start_after_grace(self, row: erasure_storage.ErasureRow) -> bool:
        async with self.db.transaction() as conn:
            await storage.lock_patient(conn, row.patient_id, exclusive=True)
            if await erasure_storage.holds_in_force(conn, row.patient_id):
                return False
            if not await erasure_storage.set_erasure_state(conn, row.erasure_id, PENDING, state=RUNNING):
                return False
            await self.ask(conn, row)
        self.notify()
        return True

    async def ask(self, conn: AsyncConnection, row: erasure_storage.ErasureRow) -> None:
        """Step 1's event: ask every present participant that confirms by event to destroy its
        keys of the patient (records does its own part itself; audit acts on the certificate)."""
        await erasure_storage.set_erasure_state(conn, row.erasure_id, RUNNING, participants=self.participants)
        asked = [p for p in self.participants if p != "records" and p not in AT_APPEND]
        payload = ev.PatientKeysErasureRequested(
            erasure_id=row.erasure_id, patient_id=row.patient_id, participants=asked
        )
        await emit(conn, self.source, row.patient_id, row.erasure_id, payload)

    async def execute(self, erasure_id: str) -> bool:
        """Steps 1-2 of a RUNNING erasure (see the module's doc), then step 4 if every participant
        has confirmed; True when this call completed it."""
        async with self.db.connect() as conn:
            row = await erasure_storage.get_erasure(conn, erasure_id)
        if row is None or row.state != RUNNING:
            return False
        if not row.participants:  # started before participants were asked (an older release)
            async with self.db.transaction() as conn:
                await self.ask(conn, row)
            self.notify()
        if row.records_erased is None:
            await self._erase_own(row)
        completed = await self.complete_if_confirmed(erasure_id)
        await self.refresh_awaited()
        return completed

    async def _erase_own(self, row: erasure_storage.ErasureRow) -> None:
        """records' own part: its key, blobs and data, then its confirmation."""
        key_name = patient_key_name("records", row.patient_id)
        versions = list(row.key_versions) or await self.shredder.key_versions(key_name)
        if not row.key_versions:
            async with self.db.transaction() as conn:
                await erasure_storage.set_erasure_state(conn, row.erasure_id, RUNNING, key_versions=versions)
        # The search key (the blind index's HMAC key) goes too. Its versions are read now: a run
        # resumed after it went finds none, and the certificate says it was already gone.
        search_key = patient_key_name("records-search", row.patient_id)
        search_versions = await self.shredder.key_versions(search_key)
        await self.shredder.shred(key_name)
        await self.shredder.shred(search_key)
        if self.blobs is not None:
            async with self.db.connect() as conn:
                blob_keys = await erasure_storage.blob_keys_of(conn, row.patient_id)
            for key in blob_keys:
                await self.blobs.delete(key)
        now = time.time()
        async with self.db.transaction() as conn:
            records_erased, versions_erased = await erasure_storage.erase_patient_data(conn, row.patient_id, now)
            own = ev.PatientKeysDestroyed(
                erasure_id=row.erasure_id,
                patient_id=row.patient_id,
                participant="records",
                keys=[
                    ev.DestroyedKey(key_name=key_name, versions=versions, already_gone=not versions),
                    ev.DestroyedKey(key_name=search_key, versions=search_versions, already_gone=not search_versions),
                ],
            )
            if await erasure_storage.set_erasure_state(
                conn, row.erasure_id, RUNNING, records_erased=records_erased, versions_erased=versions_erased
            ):
                await erasure_storage.add_confirmation(conn, row.erasure_id, "records", own.SerializeToString(), now)
        log.info(
            "patient records erased; waiting for the other participants",
            extra={"erasure_id": row.erasure_id, "records": records_erased, "versions": versions_erased},
        )

    async def confirm(self, confirmation: ev.PatientKeysDestroyed) -> bool:
        """Step 3: store a participant's first confirmation (a later one, redelivered or
        re-sent, changes nothing), then complete the erasure if it was the last awaited. True
        when this confirmation was stored."""
        async with self.db.transaction() as conn:
            row = await erasure_storage.get_erasure(conn, confirmation.erasure_id)
            if (
                row is None
                or row.state != RUNNING
                or row.patient_id != confirmation.patient_id
                or confirmation.participant not in row.participants
                or confirmation.participant == "records"
            ):
                return False
            stored = await erasure_storage.add_confirmation(
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
            self.wake()
        await self.refresh_awaited()
        return stored

    async def complete_if_confirmed(self, erasure_id: str) -> bool:
        """Step 4 (see the module); True when this call completed the erasure."""
        async with self.db.connect() as conn:
            row = await erasure_storage.get_erasure(conn, erasure_id)
            if row is None or row.state != RUNNING or row.records_erased is None:
                return False
            confirmed = await erasure_storage.confirmations_of(conn, erasure_id)
        if awaiting(row, confirmed):
            return False
        certificate, signed = await self.certifier.certify(row, confirmed, time.time())
        async with self.db.transaction() as conn:
            completed = await erasure_storage.set_erasure_state(
                conn,
                erasure_id,
                RUNNING,
                state=COMPLETED,
                certificate=certificate.SerializeToString(),
                signed_certificate=signed,
            )
            if completed:
                payload = ev.PatientRecordsErased(certificate=certificate)
                await emit(conn, self.source, row.patient_id, erasure_id, payload)
        if completed:
            self.notify()
            ERASURES.inc()
            log.info("erasure completed: certificate issued", extra={"erasure_id": erasure_id})
        return completed

    async def refresh_awaited(self) -> None:
        """The gauge of participants awaited, from the database (every replica sees the same)."""
        counts = dict.fromkeys((p for p in PARTICIPANTS if p not in AT_APPEND), 0)
        async with self.db.connect() as conn:
            for row in await erasure_storage.running_erasures(conn, RUNNING):
                for name in awaiting(row, await erasure_storage.confirmations_of(conn, row.erasure_id)):
                    counts[name] = counts.get(name, 0) + 1
        for name, count in counts.items():
            AWAITED.labels(name).set(count)
