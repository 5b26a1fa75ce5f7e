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
from sqlalchemy import and_, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_runtime.db import Database
from medledger_runtime.errors import InvalidArgument
from medledger_runtime.outbox import idempotency_keys

R = TypeVar("R", bound=pb_message.Message)
T = TypeVar("T")
MAX_REQUEST_ID = 128


def check_request_id(request_id: str) -> None:
    if not request_id:
        raise InvalidArgument.field("request_id", "required: a client-chosen id that makes retries safe")
    if len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
        raise InvalidArgument.field("request_id", f"at most {MAX_REQUEST_ID} printable characters")


def request_fingerprint(request: pb_message.Message) -> bytes:
    return hashlib.sha256(request.SerializeToString(deterministic=True)).digest()


# Built once with bind parameters: every mutating RPC runs them, and building a statement costs
# more CPU than sending it.
_K = idempotency_keys.c
_STORED = select(_K.request_hash, _K.response).where(
    and_(_K.scope == bindparam("scope"), _K.request_id == bindparam("request_id"))
)
_CLAIM = insert(idempotency_keys)
_KEEP_RESPONSE = (
    update(idempotency_keys)
    .where(and_(_K.scope == bindparam("key_scope"), _K.request_id == bindparam("key_request_id")))
    .values(response=bindparam("kept"))
)


async def _stored(conn: AsyncConnection, scope: str, request_id: str) -> tuple[bytes, bytes] | None:
    row = (await conn.execute(_STORED, {"scope": scope, "request_id": request_id})).first()
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
    seal: Callable[[R], Awaitable[R]] | None = None,
    unseal: Callable[[R], Awaitable[R]] | None = None,
) -> R:
    """Run `work` in a transaction once per (scope, request_id); replay its response after.

    A response holding a secret that must reach a retrying client (a new client secret) is
    stored as `seal` makes it (e.g. that field encrypted) and replayed through `unseal`.
    """
    check_request_id(request_id)
    fingerprint = request_fingerprint(request)
    try:
        async with db.transaction() as conn:
            stored = await _stored(conn, scope, request_id)
            if stored is not None:
                replayed = _replay(stored, fingerprint, response_cls)
                return await unseal(replayed) if unseal else replayed
            # Claim the request id before the work: a concurrent retry blocks on this row until
            # we commit, then fails its insert and replays our response, instead of racing us
            # through the work (and tripping over the unique constraints our effect created).
            await conn.execute(
                _CLAIM,
                {
                    "scope": scope,
                    "request_id": request_id,
                    "request_hash": fingerprint,
                    "response": b"",
                    "created_at": time.time(),
                },
            )
            response = await work(conn)
            kept = await seal(response) if seal else response
            await conn.execute(
                _KEEP_RESPONSE,
                {"key_scope": scope, "key_request_id": request_id, "kept": kept.SerializeToString(deterministic=True)},
            )
    except IntegrityError:
        # A concurrent call with the same request_id committed first: its result stands.
        async with db.connect() as conn:
            stored = await _stored(conn, scope, request_id)
        if stored is None:
            raise
        replayed = _replay(stored, fingerprint, response_cls)
        return await unseal(replayed) if unseal else replayed
    if after_commit is not None:
        after_commit()
    return response


def once_per_request(
    db: Database,
    *,
    scope: str,
    request: pb_message.Message,
    response_cls: type[R],
    respond: Callable[[T], R],
    request_id: str | None = None,
    after_commit: Callable[[], None] | None = None,
    seal: Callable[[R], Awaitable[R]] | None = None,
    unseal: Callable[[R], Awaitable[R]] | None = None,
) -> Callable[[Callable[[AsyncConnection], Awaitable[T]]], Awaitable[R]]:
    """The transaction a mutating RPC gives its use case: the use case's write (a function of a
    connection) runs once per request id (``request.request_id`` unless given), its result
    mapped by `respond` to the wire response that is stored and replayed to a retry (see
    :func:`run_idempotent`). Idempotency stays at the transport because what it keys and keeps
    is the wire's: the request's protobuf bytes and the response first sent."""
    rid: str = request.request_id if request_id is None else request_id  # type: ignore[attr-defined]

    async def transaction(write: Callable[[AsyncConnection], Awaitable[T]]) -> R:
        async def work(conn: AsyncConnection) -> R:
            return respond(await write(conn))

        return await run_idempotent(
            db,
            scope=scope,
            request_id=rid,
            request=request,
            response_cls=response_cls,
            work=work,
            after_commit=after_commit,
            seal=seal,
            unseal=unseal,
        )

    return transaction
