"""Errors as FHIR answers them: an ``OperationOutcome`` with the right HTTP status.

The gateway's one boundary for errors: handlers raise ``FhirError`` (or let a service's gRPC
error through) and ``answer_errors`` turns either into the HTTP answer. A service's status says
which answer: PERMISSION_DENIED is 403 with consent's reason code, FAILED_PRECONDITION 410 for an
erased patient and 412 for a stale version (the ErrorInfo reason tells them apart), and so on.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

import grpc
from aiohttp import web

from medledger_runtime.errors import ERASED, TOO_LARGE, VERSION_CONFLICT
from medledger_sdk.calls import RpcError

FHIR_JSON = "application/fhir+json"

# http.html#Status: the issue type code each status answers with.
_ISSUE_CODE = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    409: "conflict",
    410: "deleted",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "processing",
    429: "throttled",
    500: "exception",
    503: "transient",
}

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 503,
}
_BY_REASON = {ERASED: 410, VERSION_CONFLICT: 412, TOO_LARGE: 413}


class FhirError(Exception):
    """A request the gateway answers with an OperationOutcome: `status`, a message for people
    (no personal data) and, for a problem in the request, its FHIRPath `expression`s."""

    def __init__(
        self, status: int, message: str, *, expression: tuple[str, ...] = (), code: str = "", reason: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.expression = expression
        self.code = code or _ISSUE_CODE.get(status, "processing")
        self.reason = reason

    def response(self) -> web.Response:
        return outcome_response(
            self.status, self.message, expression=self.expression, code=self.code, reason=self.reason
        )


# Where a denial's reason code (consent's, e.g. NO_CONSENT) is named in `issue.details`.
REASON_SYSTEM = "urn:medledger:reason"


def operation_outcome(
    status: int, message: str, *, expression: tuple[str, ...] = (), code: str = "", reason: str = ""
) -> dict[str, Any]:
    issue: dict[str, Any] = {
        "severity": "error" if status >= 400 else "information",
        "code": code or _ISSUE_CODE.get(status, "processing"),
        "diagnostics": message,
    }
    if reason:
        issue["details"] = {"coding": [{"system": REASON_SYSTEM, "code": reason}]}
    if expression:
        issue["expression"] = list(expression)
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def outcome_response(
    status: int, message: str, *, expression: tuple[str, ...] = (), code: str = "", reason: str = ""
) -> web.Response:
    """The runtime's error renderer (authentication, 413, 404 of unknown paths) and ours."""
    body = operation_outcome(status, message, expression=expression, code=code, reason=reason)
    response = web.Response(status=status, text=json.dumps(body), content_type=FHIR_JSON)
    if status in (429, 503):
        response.headers["Retry-After"] = "1"
    return response


def from_rpc_error(error: grpc.aio.AioRpcError) -> FhirError:
    """A service's gRPC error as the FHIR answer it is."""
    reason = error.reason if isinstance(error, RpcError) else ""
    message = str(error.details() or error.code().name)
    status = _BY_REASON.get(reason) or _HTTP_STATUS.get(error.code(), 500)
    expression: tuple[str, ...] = ()
    if isinstance(error, RpcError) and error.field_violations:
        expression = tuple(v.field for v in error.field_violations)
    return FhirError(status, message, expression=expression, reason=reason if status == 403 else "")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def answer_errors(handler: Handler) -> Handler:
    """Wraps a route's handler: FhirError and services' gRPC errors become OperationOutcomes."""

    @wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except FhirError as exc:
            return exc.response()
        except grpc.aio.AioRpcError as exc:
            return from_rpc_error(exc).response()

    return wrapped
