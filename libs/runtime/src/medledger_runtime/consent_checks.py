"""Consent's decision point as a service asks it: one question (may this caller do this action on
the patient's data of this category for this purpose?), one answer with its decision id.

records asks before every read and write, identity before showing a patient's demographics to
another reader; both through ``ConsentClient`` (over consent's gRPC API, as a principal holding
the ``pdp-client`` role), and their use cases through the ``ConsentService`` port, which tests
replace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc

from medledger_runtime.auth import Caller

CONSENT_AUDIENCE = "medledger.consent"
_PERMIT = co_pb.Decision.DECISION_PERMIT


@dataclass(frozen=True)
class ConsentAnswer:
    """Consent's decision on one question."""

    permit: bool
    decision_id: str
    reason_code: str = ""
    reason: str = ""


class ConsentService(Protocol):
    """Whether `caller` may do `action` on the patient's data of `category` for `purpose` (values
    of medledger.types.v1 Action, DataCategory, PurposeOfUse)."""

    async def check(
        self, caller: Caller, patient_id: str, action: int, category: int, purpose: int
    ) -> ConsentAnswer: ...


class ConsentClient:
    """ConsentService over consent's gRPC API."""

    def __init__(self, stub: co_grpc.ConsentServiceStub) -> None:
        self.stub = stub

    async def check(self, caller: Caller, patient_id: str, action: int, category: int, purpose: int) -> ConsentAnswer:
        request = co_pb.CheckConsentRequest(
            patient_id=patient_id,
            actor_id=caller.principal_id,
            action=action,  # type: ignore[arg-type]
            category=category,  # type: ignore[arg-type]
            purpose=purpose,  # type: ignore[arg-type]
        )
        answer: co_pb.CheckConsentResponse = await self.stub.CheckConsent(request)
        return ConsentAnswer(
            permit=answer.decision == _PERMIT,
            decision_id=answer.decision_id,
            reason_code=answer.reason_code,
            reason=answer.reason,
        )
