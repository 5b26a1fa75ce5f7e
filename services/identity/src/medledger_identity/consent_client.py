"""identity asking consent, as records does: whether a reader other than the patient (and the
patient's administrators) may see the patient's FHIR resource (demographics) for a purpose.

identity calls consent as its own service principal, ``svc_identity``, which holds the
``pdp-client`` role. Being the token issuer, identity signs that token itself
(``tokens.OwnTokens``) rather than exchanging a client secret with itself over gRPC.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc

from medledger_runtime.auth import Caller
from medledger_sdk.channels import with_metadata

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
    """Whether `caller` may do `action` on the patient's data of `category` for `purpose`."""

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


class OwnTokenInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Attaches identity's own token for one audience to every call on a channel; after an
    UNAUTHENTICATED answer (a rotation, say) the next call gets a new one."""

    def __init__(self, token: Callable[[str], Awaitable[str]], forget: Callable[[str], None], audience: str) -> None:
        self.token = token
        self.forget = forget
        self.audience = audience

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        token = await self.token(self.audience)
        call = await continuation(with_metadata(client_call_details, [("authorization", f"Bearer {token}")]), request)
        if await call.code() == grpc.StatusCode.UNAUTHENTICATED:
            self.forget(self.audience)
        return call
