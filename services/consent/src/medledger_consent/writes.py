"""Idempotent writes whose results join this replica's consent index as soon as they commit
(other replicas add them from their events): consent versions and break-glass accesses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf import message as pb_message
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_consent import domain
from medledger_runtime.idempotency import run_idempotent
from medledger_runtime.service import ServiceRuntime

R = TypeVar("R", bound=pb_message.Message)
Item = TypeVar("Item", domain.ConsentVersion, domain.BreakGlassAccess)


async def write_once(
    runtime: ServiceRuntime,
    index: domain.ConsentIndex,
    *,
    scope: str,
    request: pb_message.Message,
    response_cls: type[R],
    work: Callable[[AsyncConnection, list[Item]], Awaitable[R]],
) -> tuple[R, list[Item]]:
    """Run `work` once per request id (`request.request_id`); returns the response and what
    `work` recorded, none when the response is a replay, after adding it to `index`."""
    recorded: list[Item] = []
    response = await run_idempotent(
        runtime.db,
        scope=scope,
        request_id=request.request_id,  # type: ignore[attr-defined]
        request=request,
        response_cls=response_cls,
        work=lambda conn: work(conn, recorded),
        after_commit=runtime.relay.notify,
    )
    for item in recorded:
        if isinstance(item, domain.ConsentVersion):
            index.add(item)
        else:
            index.put_break_glass(item)
    return response, recorded
