"""identity asking consent (``medledger_runtime.consent_checks``), as records does: whether a reader
other than the patient (and the patient's administrators) may see the patient's FHIR resource
(demographics) for a purpose.

identity calls consent as its own service principal, ``svc_identity``, which holds the
``pdp-client`` role. Being the token issuer, identity signs that token itself
(``tokens.OwnTokens``) rather than exchanging a client secret with itself over gRPC.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from medledger_sdk.channels import with_metadata


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
