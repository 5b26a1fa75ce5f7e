"""Idempotent mutating RPCs: a client ``request_id`` makes a retry return the first result.

The response is stored in the same transaction as the effect, so either both happened or
neither did. Reusing a ``request_id`` for a different request is INVALID_ARGUMENT.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf import message as pb_message
from sqlalchemy import and_, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_common.db import Database
from medledger_common.errors import InvalidArgument
from medledger_common.outbox import idempotency_keys

R = TypeVar("R", bound=pb_message.Message)
MAX_REQUEST_ID = 128


def check_request_id(request_id: str) -> None:
    if not request_id:
        raise InvalidArgument.field("request_id", "required: a client-chosen id that makes retries safe")
    if len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
        raise InvalidArgument.field("request_id", f"at most {MAX_REQUEST_ID} printable characters")


def request_fingerprint(request: pb_message.Message) -> bytes:
    return hashlib.sha256(request.SerializeToString(deterministic=True)).digest()


async def _stored(conn: AsyncConnection, scope: str, request_id: str) -> tuple[bytes, bytes] | None:
    row = (
        await conn.execute(
            select(idempotency_keys.c.request_hash, idempotency_keys.c.response).where(
                and_(idempotency_keys.c.scope == scope, idempotency_keys.c.request_id == request_id)
            )
        )
    ).first()
    return (row.request_hash, row.response) if row else None


def _replay(stored: tuple[bytes, bytes], fingerprint: bytes, response_cls: type[R]) -> R:
    if stored[0] != fingerprint:
        raise InvalidArgument.field("request_id", "already used for a different request")
    response = response_cls()
    response.ParseFromString(stored[1])
    return response


async def run_idempotent(
    db: Database,
    *,
    scope: str,
    request_id: str,
    request: pb_message.Message,
    response_cls: type[R],
    work: Callable[[AsyncConnection], Awaitable[R]],
    after_commit: Callable[[], None] | None = None,
) -> R:
    """Run `work` in a transaction once per (scope, request_id); replay its response after."""
    check_request_id(request_id)
    fingerprint = request_fingerprint(request)
    try:
        async with db.transaction() as conn:
            stored = await _stored(conn, scope, request_id)
            if stored is not None:
                return _replay(stored, fingerprint, response_cls)
            response = await work(conn)
            await conn.execute(
                insert(idempotency_keys).values(
                    scope=scope,
                    request_id=request_id,
                    request_hash=fingerprint,
                    response=response.SerializeToString(deterministic=True),
                    created_at=time.time(),
                )
            )
    except IntegrityError:
        # A concurrent call with the same request_id committed first: its result stands.
        async with db.connect() as conn:
            stored = await _stored(conn, scope, request_id)
        if stored is None:
            raise
        return _replay(stored, fingerprint, response_cls)
    if after_commit is not None:
        after_commit()
    return response
