"""Break-glass: emergency read access for practitioners, and its review by privacy officers.

An organization enables it in its policy. A practitioner of that organization then breaks the
glass for a patient with a reason code and a justification; that yields a short read-only
access for purpose ETREAT (`domain.decide`, rule 4), rate-limited per practitioner. The
justification is stored encrypted under the patient's key; events carry only its hash and the
reason code. The patient and the organization's privacy officers are notified by events, a
counter rises for alerting, and the access stays pending until a privacy officer reviews it.

These are break-glass's use cases, apart from any transport (the gRPC API in ``api.py`` is one
caller): each takes the caller and a command of plain values and returns plain results or
raises the errors of ``medledger_runtime.errors``; writes run in the caller's `transaction`
(``writes.py``) and their accesses join this replica's index as soon as they commit. The
commands and results are in ``break_glass_commands``, the policy rules in ``break_glass_rules``,
the queries in ``break_glass_storage``; what stays, about 400 lines, is the one desk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, overload

from medledger.consent.v1 import consent_service_pb2 as pb
from medledger.events.v1 import consent_events_pb2, notification_events_pb2
from medledger.types.v1 import vocabulary_pb2
from prometheus_client import Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_consent import break_glass_rules, break_glass_storage, domain, storage
from medledger_consent.break_glass_commands import (
    AccessPage,
    AccessRead,
    BreakGlass,
    ListBreakGlassAccesses,
    ReviewBreakGlassAccess,
    SetBreakGlassPolicy,
)
from medledger_consent.writes import RunWrite, T, Transaction, Write, write_then_index
from medledger_runtime.auth import Caller
from medledger_runtime.db import Database
from medledger_runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from medledger_runtime.events import TOPICS, new_event
from medledger_runtime.key_owners import decrypt_owned
from medledger_runtime.keys import KeyManager, KeyType
from medledger_runtime.outbox import enqueue
from medledger_runtime.timestamps import timestamp

log = logging.getLogger(__name__)

Kind = vocabulary_pb2.PrincipalKind
PENDING = pb.BreakGlassReview.BREAK_GLASS_REVIEW_PENDING
JUSTIFIED = pb.BreakGlassReview.BREAK_GLASS_REVIEW_JUSTIFIED
UNJUSTIFIED = pb.BreakGlassReview.BREAK_GLASS_REVIEW_UNJUSTIFIED
MAX_PAGE_SIZE = 1000

# Alert on any increase: every use is an emergency someone must look at.
USES = Counter(
    "medledger_consent_break_glass_uses_total",
    "Break-glass accesses started, by reason code.",
    ["reason"],
)
REFUSALS = Counter(
    "medledger_consent_break_glass_refusals_total",
    "Break-glass requests refused: policy (not enabled) or rate (the practitioner's limit reached).",
    ["why"],
)
PENDING_REVIEWS = Gauge(
    "medledger_consent_break_glass_pending_reviews",
    "Break-glass accesses no privacy officer has reviewed yet (read from the database).",
)


def _is_officer_of(caller: Caller, organization_id: str) -> bool:
    return caller.has_role("privacy-officer") and caller.organization_id == organization_id


class BreakGlassDesk:
    """Break-glass's use cases: policies, breaking the glass, and the review of its uses."""

    def __init__(
        self,
        db: Database,
        keys: KeyManager,
        index: domain.ConsentIndex,
        notify: Callable[[], None],
        *,
        legacy_keys: Callable[[], KeyManager],
        source: str = "medledger.consent",
    ) -> None:
        self.db = db
        self.keys = keys
        self.index = index
        # Reads justifications still under the old shared key (key_owners.py).
        self.legacy_keys = legacy_keys
        self.source = source
        # Writes without a transaction of the caller's: committed, then the relay woken.
        self.transaction = Transaction(db, notify)

    async def _write(
        self, write: Write[Any], transaction: RunWrite[Any, Any] | None, accesses: list[domain.BreakGlassAccess]
    ) -> Any:
        return await write_then_index(transaction or self.transaction, write, accesses, self.index.put_break_glass)

    # -- policy ---------------------------------------------------------------------------------

    @overload
    async def set_policy(self, caller: Caller, command: SetBreakGlassPolicy) -> break_glass_rules.BreakGlassPolicy: ...

    @overload
    async def set_policy(
        self, caller: Caller, command: SetBreakGlassPolicy, transaction: RunWrite[break_glass_rules.BreakGlassPolicy, T]
    ) -> T: ...

    async def set_policy(
        self,
        caller: Caller,
        command: SetBreakGlassPolicy,
        transaction: RunWrite[break_glass_rules.BreakGlassPolicy, Any] | None = None,
    ) -> Any:
        """Set an organization's policy; returns it as stored."""
        policy = break_glass_rules.check_policy(
            command.organization_id,
            enabled=command.enabled,
            overrides_deny=command.overrides_deny,
            access_seconds=command.access_seconds,
            max_uses=command.max_uses,
            rate_window_seconds=command.rate_window_seconds,
        )
        if not (caller.has_role("admin") or caller.organization_id == policy.organization_id):
            raise PermissionDenied("an org-admin sets their own organization's policy; admins any")

        async def write(conn: AsyncConnection) -> break_glass_rules.BreakGlassPolicy:
            organization = await storage.get_principal(conn, policy.organization_id)
            if organization is None or organization.kind != Kind.PRINCIPAL_KIND_ORGANIZATION:
                raise InvalidArgument.field("policy.organization_id", "not a registered organization")
            stored = replace(policy, changed_by=caller.principal_id, changed_at=time.time())
            await break_glass_storage.set_policy(conn, stored)
            event = new_event(
                source=self.source,
                payload=consent_events_pb2.BreakGlassPolicyChanged(
                    organization_id=stored.organization_id,
                    enabled=stored.enabled,
                    overrides_deny=stored.overrides_deny,
                    changed_by=stored.changed_by,
                ),
                aggregate_id=stored.organization_id,
                version=int(stored.changed_at * 1000),
                subject=stored.organization_id,
            )
            await enqueue(conn, TOPICS["consent"], event, key=stored.organization_id.encode())
            return stored

        return await self._write(write, transaction, [])

    async def get_policy(self, caller: Caller, organization_id: str) -> break_glass_rules.BreakGlassPolicy:
        """The organization's policy (a disabled one when it never set any)."""
        if not organization_id:
            raise InvalidArgument.field("organization_id", "required")
        if not (caller.has_role("admin") or caller.organization_id == organization_id):
            raise PermissionDenied("principals of the organization read its policy; admins any")
        async with self.db.connect() as conn:
            return await break_glass_storage.get_policy(conn, organization_id)

    # -- breaking the glass ---------------------------------------------------------------------

    @overload
    async def break_glass(self, caller: Caller, command: BreakGlass) -> domain.BreakGlassAccess: ...

    @overload
    async def break_glass(
        self, caller: Caller, command: BreakGlass, transaction: RunWrite[domain.BreakGlassAccess, T]
    ) -> T: ...

    async def break_glass(
        self, caller: Caller, command: BreakGlass, transaction: RunWrite[domain.BreakGlassAccess, Any] | None = None
    ) -> Any:
        """Start an access of the caller to the patient, under their organization's policy."""
        justification = break_glass_rules.check_break_glass(command.patient_id, command.reason, command.justification)
        started: list[domain.BreakGlassAccess] = []

        async def write(conn: AsyncConnection) -> domain.BreakGlassAccess:
            practitioner = await storage.get_principal(conn, caller.principal_id)
            if practitioner is None or practitioner.kind != Kind.PRINCIPAL_KIND_PRACTITIONER:
                raise PermissionDenied("only practitioners break the glass")
            patient = await storage.get_principal(conn, command.patient_id)
            if patient is None or patient.kind != Kind.PRINCIPAL_KIND_PATIENT:
                raise InvalidArgument.field("patient_id", "not a registered patient")
            policy = await break_glass_storage.get_policy(conn, practitioner.organization_id)
            if not policy.enabled:
                REFUSALS.labels("policy").inc()
                raise PermissionDenied("your organization has not enabled break-glass access")
            now = time.time()
            # One practitioner's requests one at a time, so two at once cannot both pass the limit.
            await break_glass_storage.lock_principal(conn, caller.principal_id)
            if (
                await break_glass_storage.uses_since(conn, caller.principal_id, now - policy.rate_window_seconds)
                >= policy.max_uses
            ):
                REFUSALS.labels("rate").inc()
                raise ResourceExhausted(
                    f"break-glass limit reached: {policy.max_uses} uses per "
                    f"{policy.rate_window_seconds / 3600:g} hours; ask a privacy officer"
                )
            access = domain.BreakGlassAccess(
                access_id=break_glass_rules.new_break_glass_id(),
                patient_id=command.patient_id,
                practitioner_id=caller.principal_id,
                organization_id=practitioner.organization_id,
                reason=command.reason,
                justification_sha256=break_glass_rules.justification_sha256(justification),
                started_at=now,
                expires_at=now + policy.access_seconds,
                overrides_deny=policy.overrides_deny,
                review=PENDING,
            )
            key = domain.justification_key_name(command.patient_id)
            await self.keys.ensure_key(key, KeyType.AES256_GCM96)
            # Bound to the access: a ciphertext moved to another row does not decrypt.
            ciphertext = await self.keys.encrypt(key, justification.encode(), associated_data=access.access_id.encode())
            await break_glass_storage.insert_access(conn, access, ciphertext)
            await self._announce_start(conn, access)
            started.append(access)
            return access

        result = await self._write(write, transaction, started)
        for a in started:  # not for a replayed response
            USES.labels(break_glass_rules.reason_code(a.reason)).inc()
            log.warning(
                "break-glass access started",
                extra={
                    "access_id": a.access_id,
                    "organization_id": a.organization_id,
                    "reason_code": break_glass_rules.reason_code(a.reason),
                },
            )
        return result

    async def _announce_start(self, conn: AsyncConnection, a: domain.BreakGlassAccess) -> None:
        code = break_glass_rules.reason_code(a.reason)
        started = new_event(
            source=self.source,
            payload=consent_events_pb2.BreakGlassAccessStarted(
                access_id=a.access_id,
                patient_id=a.patient_id,
                practitioner_id=a.practitioner_id,
                organization_id=a.organization_id,
                reason_code=code,
                justification_sha256=a.justification_sha256,
                started_at=timestamp(a.started_at),
                expires_at=timestamp(a.expires_at),
                overrides_deny=a.overrides_deny,
            ),
            aggregate_id=a.access_id,
            version=1,
            subject=a.patient_id,
        )
        await enqueue(conn, TOPICS["consent"], started, key=a.patient_id.encode())
        for recipient in (
            notification_events_pb2.NotificationRequested(recipient_id=a.patient_id),
            notification_events_pb2.NotificationRequested(
                organization_id=a.organization_id, recipient_role="privacy-officer"
            ),
        ):
            recipient.topic = "break-glass.started"
            recipient.subject_id = a.access_id
            recipient.reason_code = code
            note = new_event(
                source=self.source,
                payload=recipient,
                aggregate_id=f"{a.access_id}/{recipient.recipient_id or recipient.recipient_role}",
                version=1,
                subject=recipient.recipient_id or a.organization_id,
            )
            await enqueue(conn, TOPICS["notifications"], note, key=a.access_id.encode())

    # -- review ---------------------------------------------------------------------------------

    async def list_accesses(self, caller: Caller, command: ListBreakGlassAccesses) -> AccessPage:
        """An organization's accesses, newest first."""
        organization_id = command.organization_id
        if not organization_id:
            raise InvalidArgument.field("organization_id", "required")
        if not (caller.has_role("admin") or caller.has_role("auditor") or _is_officer_of(caller, organization_id)):
            raise PermissionDenied("privacy officers list their own organization's uses; admins and auditors any")
        if command.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        if command.page_token and not _valid_page_token(command.page_token):
            raise InvalidArgument.field("page_token", "not a token this RPC returned")
        size = min(command.page_size or 100, MAX_PAGE_SIZE)
        async with self.db.connect() as conn:
            accesses = await break_glass_storage.list_accesses(
                conn,
                organization_id,
                pending_only=command.pending_only,
                before=command.page_token,
                limit=size + 1,
            )
        more = len(accesses) > size
        accesses = accesses[:size]
        token = f"{accesses[-1].started_at!r}/{accesses[-1].access_id}" if more else ""
        return AccessPage(accesses, token)

    async def get_access(self, caller: Caller, access_id: str) -> AccessRead:
        """An access with its justification, decrypted."""
        async with self.db.connect() as conn:
            found = await break_glass_storage.get_access(conn, access_id)
        if found is None or not (caller.has_role("admin") or _is_officer_of(caller, found[0].organization_id)):
            # The same answer either way: ids must not reveal whose records were opened.
            raise NotFound("no such break-glass access")
        access, ciphertext = found
        if not ciphertext:  # the patient was erased: the justification went with their keys
            return AccessRead(access)
        try:
            # Still under the old shared key until the key-owner migration moves it.
            justification = await decrypt_owned(
                self.keys,
                self.legacy_keys,
                "consent",
                access.patient_id,
                ciphertext,
                associated_data=access.access_id.encode(),
            )
        except NotFound:
            # The patient's erasure destroyed the key: the access stays reviewable, its text is gone.
            return AccessRead(access)
        return AccessRead(access, justification.decode())

    @overload
    async def review(self, caller: Caller, command: ReviewBreakGlassAccess) -> domain.BreakGlassAccess: ...

    @overload
    async def review(
        self, caller: Caller, command: ReviewBreakGlassAccess, transaction: RunWrite[domain.BreakGlassAccess, T]
    ) -> T: ...

    async def review(
        self,
        caller: Caller,
        command: ReviewBreakGlassAccess,
        transaction: RunWrite[domain.BreakGlassAccess, Any] | None = None,
    ) -> Any:
        """A privacy officer's review of a use; UNJUSTIFIED also ends a running access at once."""
        if command.review not in (JUSTIFIED, UNJUSTIFIED):
            raise InvalidArgument.field("review", "BREAK_GLASS_REVIEW_JUSTIFIED or BREAK_GLASS_REVIEW_UNJUSTIFIED")
        reviewed: list[domain.BreakGlassAccess] = []

        async def write(conn: AsyncConnection) -> domain.BreakGlassAccess:
            found = await break_glass_storage.get_access(conn, command.access_id, for_update=True)
            if found is None or not _is_officer_of(caller, found[0].organization_id):
                raise NotFound("no such break-glass access among your organization's")
            access = found[0]
            if access.practitioner_id == caller.principal_id:
                raise PermissionDenied("a privacy officer does not review their own break-glass use")
            if access.review != PENDING:
                raise FailedPrecondition("this break-glass access was reviewed already")
            now = time.time()
            ended = now if command.review == UNJUSTIFIED and access.running(now) else None
            access = replace(
                access, review=command.review, reviewed_by=caller.principal_id, reviewed_at=now, ended_at=ended
            )
            await break_glass_storage.record_review(conn, access)
            event = consent_events_pb2.BreakGlassAccessReviewed(
                access_id=access.access_id,
                patient_id=access.patient_id,
                organization_id=access.organization_id,
                review=pb.BreakGlassReview.Name(access.review),  # type: ignore[arg-type]
                reviewed_by=access.reviewed_by,
            )
            if ended is not None:
                event.ended_at.CopyFrom(timestamp(ended))
            await enqueue(
                conn,
                TOPICS["consent"],
                new_event(
                    source=self.source,
                    payload=event,
                    aggregate_id=access.access_id,
                    version=2,
                    subject=access.patient_id,
                ),
                key=access.patient_id.encode(),
            )
            reviewed.append(access)
            return access

        return await self._write(write, transaction, reviewed)

    async def watch_pending_reviews(self, every_seconds: float = 15.0) -> None:
        """Keep the pending-review gauge current (every replica reports the same count)."""
        while True:
            async with self.db.connect() as conn:
                PENDING_REVIEWS.set(await break_glass_storage.pending_reviews(conn))
            await asyncio.sleep(every_seconds)


def _valid_page_token(token: str) -> bool:
    started, sep, access_id = token.partition("/")
    try:
        float(started)
    except ValueError:
        return False
    return bool(sep) and access_id.startswith("bgl_")
