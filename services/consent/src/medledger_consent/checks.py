"""Consent's decision point, apart from any transport: a check decides on this replica's
in-memory index (``domain.ConsentIndex``) and records the decision before answering
(``storage.DecisionLog``, group-committed). Also what keeps the index whole: loaded before the
replica serves, repaired from the database now and then (events keep it current otherwise:
``handlers.ConsentIndexHandler``, and the writes of this replica at once).

The check is the hot path: it takes plain values, not a command, and returns the outcome, the
decision id and the time decided as a tuple, so that it costs no more than the decision itself.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from medledger.consent.v1 import consent_service_pb2 as pb
from medledger.events.v1 import consent_events_pb2
from prometheus_client import Counter

from medledger_consent import break_glass_storage, domain, storage
from medledger_consent.consents import acts_for
from medledger_runtime.auth import Caller
from medledger_runtime.db import Database
from medledger_runtime.errors import InvalidArgument, NotFound, PermissionDenied
from medledger_runtime.events import new_event
from medledger_runtime.timestamps import timestamp

INDEX_REPAIRS = Counter(
    "medledger_consent_index_repairs_total",
    "Consent versions and break-glass accesses this replica's index got from the database, not from their event.",
)
DECISIONS = Counter(
    "medledger_consent_decisions_total",
    "Consent decisions made (CheckConsent), by decision and reason code: permits, denials, no consent.",
    ["decision", "reason_code"],
)
# Each (decision, reason code) counter looked up once, here: CheckConsent is the hot path.
_DECISION_COUNTERS = {
    (getattr(pb.Decision, f"DECISION_{decision}"), code): DECISIONS.labels(decision, code)
    for decision, code in domain.DECISION_CODES
}
# (outcome, decision id, decided at): what a check answers.
Decided = tuple[domain.Outcome, str, float]
# Who reads any decision record besides the patient's side and the actor it was about.
_DECISION_READERS = ("privacy-officer", "auditor")


@dataclass(frozen=True)
class DecisionRecord:
    """A decision as recorded: the question, the inputs the rule was given, the outcome."""

    decision_id: str
    decided_at: float
    patient_id: str
    actor_id: str
    actor_organization_id: str
    action: int
    category: int
    purpose: int
    decision: int
    reason_code: str
    deciding: tuple[tuple[str, int], ...]
    rule_version: str
    break_glass_access_id: str
    considered: tuple[str, ...]


class ConsentChecks:
    """Decides consent questions and records each decision."""

    def __init__(
        self,
        db: Database,
        index: domain.ConsentIndex,
        log: storage.DecisionLog,
        *,
        source: str = "medledger.consent",
    ) -> None:
        self.db = db
        self.index = index
        self.log = log
        self.source = source
        self._loaded_until = 0.0
        # A practitioner's organization never changes in identity: remembered once read.
        self._organization_of: dict[str, str] = {}

    async def load_index(self) -> None:
        started = time.time()
        async with self.db.connect() as conn:
            for v in await storage.all_versions(conn):
                self.index.add(v)
            for a in await break_glass_storage.accesses_running_after(conn, started - 60):
                self.index.put_break_glass(a)
        self._loaded_until = started

    async def reconcile_index(self, every_seconds: float = 2.0, overlap_seconds: float = 10.0) -> None:
        """Read recently recorded versions from the database now and then: events keep the index
        current within milliseconds, and this keeps it right should one ever not arrive. The
        overlap covers transactions that commit after the time they recorded."""
        while True:
            await asyncio.sleep(every_seconds)
            started = time.time()
            async with self.db.connect() as conn:
                since = self._loaded_until - overlap_seconds
                for v in await storage.versions_recorded_since(conn, since):
                    if self.index.add(v):
                        INDEX_REPAIRS.inc()
                for a in await break_glass_storage.accesses_changed_since(conn, since):
                    if self.index.put_break_glass(a):
                        INDEX_REPAIRS.inc()
            self._loaded_until = started

    async def _organization(self, actor_id: str) -> str:
        organization = self._organization_of.get(actor_id)
        if organization is None:
            async with self.db.connect() as conn:
                known = await storage.get_principal(conn, actor_id)
            if known is None:
                return ""  # not known (yet): no organization grant can cover it
            organization = self._organization_of[actor_id] = known.organization_id
        return organization

    async def check(
        self, caller: Caller, patient_id: str, actor_id: str, action: int, category: int, purpose: int
    ) -> Decided:
        """May `actor_id` do `action` on the patient's data of `category` for `purpose`, now?
        Decided, recorded with its event (durably), then answered."""
        domain.check_question(patient_id, actor_id, action, category, purpose)
        if not caller.has_role("pdp-client") and not await acts_for(self.db, caller, patient_id):
            # A patient (or their guardian) asks about themselves only: checks must not reveal
            # whom others see.
            raise PermissionDenied("a patient may check consents about themselves only")
        question = domain.Question(
            patient_id=patient_id,
            actor_id=actor_id,
            actor_organization_id=await self._organization(actor_id),
            action=action,
            category=category,
            purpose=purpose,
            now=time.time(),
        )
        outcome = self.index.decide(question)
        considered = self.index.considered(patient_id, question.now)
        decision_id = domain.new_decision_id()
        deciding = [f"{cid}@{ver}" for cid, ver in outcome.deciding]
        decision_name = pb.Decision.Name(outcome.decision)  # type: ignore[arg-type]
        event = new_event(
            source=self.source,
            payload=consent_events_pb2.ConsentDecisionRecorded(
                decision_id=decision_id,
                patient_id=question.patient_id,
                actor_id=question.actor_id,
                action=question.action,  # type: ignore[arg-type]
                category=question.category,  # type: ignore[arg-type]
                purpose=question.purpose,  # type: ignore[arg-type]
                decided_at=timestamp(question.now),
                decision=decision_name,
                reason_code=outcome.reason_code,
                deciding=deciding,
                rule_version=domain.RULE_VERSION,
                break_glass_access_id=outcome.break_glass_access_id,
                actor_organization_id=question.actor_organization_id,
                considered=considered,
            ),
            aggregate_id=decision_id,
            version=1,
            subject=question.patient_id,
        )
        await self.log.record(
            {
                "decision_id": decision_id,
                "decided_at": question.now,
                "patient_id": question.patient_id,
                "actor_id": question.actor_id,
                "action": question.action,
                "category": question.category,
                "purpose": question.purpose,
                "decision": outcome.decision,
                "reason_code": outcome.reason_code,
                "deciding": " ".join(deciding),
                "break_glass_access_id": outcome.break_glass_access_id,
                "rule_version": domain.RULE_VERSION,
                "actor_organization_id": question.actor_organization_id,
                "considered": " ".join(considered),
            },
            event,
        )
        counter = _DECISION_COUNTERS.get((outcome.decision, outcome.reason_code))
        if counter is None:  # a pair DECISION_CODES lacks (the property test keeps this from happening)
            counter = DECISIONS.labels(decision_name.removeprefix("DECISION_"), outcome.reason_code)
        counter.inc()
        return outcome, decision_id, question.now

    async def decision(self, caller: Caller, decision_id: str) -> DecisionRecord:
        """The decision record, to the patient concerned (their guardian, an admin), the actor it
        was about, privacy officers and auditors; to anyone else it is as a missing one."""
        if not domain.DECISION_ID.fullmatch(decision_id):
            raise InvalidArgument.field("decision_id", "not a decision id")
        async with self.db.connect() as conn:
            row = await storage.get_decision(conn, decision_id)
        if row is None:
            raise NotFound("no such decision")
        allowed = (
            caller.principal_id == row.actor_id
            or any(caller.has_role(r) for r in _DECISION_READERS)
            or await acts_for(self.db, caller, row.patient_id)
        )
        if not allowed:
            raise NotFound("no such decision")  # ids must not reveal whom a patient's data went to
        return DecisionRecord(
            decision_id=row.decision_id,
            decided_at=float(row.decided_at),
            patient_id=row.patient_id,
            actor_id=row.actor_id,
            actor_organization_id=row.actor_organization_id,
            action=int(row.action),
            category=int(row.category),
            purpose=int(row.purpose),
            decision=int(row.decision),
            reason_code=row.reason_code,
            deciding=tuple(_consent_ref(ref) for ref in row.deciding.split()),
            rule_version=row.rule_version,
            break_glass_access_id=row.break_glass_access_id,
            considered=tuple(row.considered.split()),
        )


def _consent_ref(text: str) -> tuple[str, int]:
    consent_id, _, version = text.rpartition("@")
    return consent_id, int(version)
