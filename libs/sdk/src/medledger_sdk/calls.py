"""How the SDK makes every call: a deadline, retries of UNAVAILABLE with the same request, errors
as exceptions that carry the gRPC status, message and ``google.rpc`` details, and page iteration.

A mutating request carries its client ``request_id``, and a server answers a retry with the same
id with the first result, so resending the very same request message after UNAVAILABLE is safe:
the write happens once.

    channel = make_channel(address, interceptors=[CallPolicy()])
    async for principal in pages(stub.ListPrincipals, ListPrincipalsRequest(), "principals"):
        ...
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from medledger_sdk.backoff import Backoff

DEFAULT_DEADLINE_SECONDS = 10.0
DEFAULT_ATTEMPTS = 4
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class RpcError(grpc.aio.AioRpcError):  # type: ignore[misc]
    """A failed call: ``code()``, ``details()`` (the message) as on any grpc.aio error, and the
    server's ``google.rpc.Status`` details decoded: ``field_violations`` names the fields a
    request got wrong, ``reason`` (ErrorInfo) tells apart errors of one status ("ERASED",
    "VERSION_CONFLICT", a consent reason code), empty when the server gave none."""

    def __init__(self, error: grpc.aio.AioRpcError, attempts: int = 1) -> None:
        super().__init__(
            error.code(),
            error.initial_metadata(),
            error.trailing_metadata(),
            error.details(),
            error.debug_error_string(),
        )
        self.attempts = attempts
        self.status = _status_of(error)
        violations: list[FieldViolation] = []
        self.reason = ""
        for detail in self.status.details if self.status else ():
            bad = error_details_pb2.BadRequest()
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(bad):
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif detail.Unpack(info):
                self.reason = info.reason
        self.field_violations = tuple(violations)

    @property
    def message(self) -> str:
        return str(self.details() or "")

    def __str__(self) -> str:
        fields = "; ".join(f"{v.field}: {v.description}" for v in self.field_violations)
        return f"{self.code().name}: {self.message}" + (f" ({fields})" if fields else "")


def _status_of(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    for key, value in error.trailing_metadata() or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


class CallPolicy(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Deadline, retries and errors for every unary call on a channel.

    - a call without a timeout gets ``deadline_seconds``;
    - UNAVAILABLE (a server restarting, a connection refused) is retried up to ``attempts`` times
      in all with jittered exponential backoff, the same request each time, while the deadline
      allows; no other status is retried;
    - a failure raises ``RpcError``.
    """

    def __init__(
        self,
        *,
        deadline_seconds: float = DEFAULT_DEADLINE_SECONDS,
        attempts: int = DEFAULT_ATTEMPTS,
        first_backoff_seconds: float = 0.1,
    ) -> None:
        if attempts < 1 or deadline_seconds <= 0:
            raise ValueError("attempts >= 1 and a positive deadline")
        self.deadline_seconds, self.attempts = deadline_seconds, attempts
        # The runtime's waits (exponential, jittered so a client's replicas spread out, capped).
        self.backoff = Backoff(first_seconds=first_backoff_seconds, max_seconds=max(first_backoff_seconds, 2.0))

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        loop = asyncio.get_running_loop()
        timeout = client_call_details.timeout or self.deadline_seconds
        deadline = loop.time() + timeout
        for attempt in range(1, self.attempts + 1):
            remaining = deadline - loop.time()
            details = grpc.aio.ClientCallDetails(
                client_call_details.method,
                max(remaining, 0.001),
                client_call_details.metadata,
                client_call_details.credentials,
                client_call_details.wait_for_ready,
            )
            try:
                return await (await continuation(details, request))
            except grpc.aio.AioRpcError as exc:
                pause = self.backoff.delay(attempt)
                retry = (
                    exc.code() == grpc.StatusCode.UNAVAILABLE
                    and attempt < self.attempts
                    and loop.time() + pause < deadline
                )
                if not retry:
                    raise RpcError(exc, attempt) from None
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")


async def pages(
    method: Callable[[Any], Awaitable[Any]], request: Message, items_field: str, *, page_size: int = 0
) -> AsyncIterator[Any]:
    """Every item of a paginated List RPC: calls ``method`` page after page, passing each reply's
    opaque ``next_page_token`` back, until a reply has none."""
    current = type(request)()
    current.CopyFrom(request)
    if page_size:
        current.page_size = page_size  # type: ignore[attr-defined]
    while True:
        reply = await method(current)
        for item in getattr(reply, items_field):
            yield item
        token = reply.next_page_token
        if not token:
            return
        current.page_token = token  # type: ignore[attr-defined]
