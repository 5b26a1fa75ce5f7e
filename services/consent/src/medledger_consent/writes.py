"""The transaction a use case's write runs in.

A write is a function of a connection; a transaction runs it and returns what it makes of the
write's result. By default (:class:`Transaction`) that is the result itself, committed, then the
outbox relay is woken. The gRPC API passes one that runs the write once per request id and
returns the wire response it stored, first time or replayed (idempotency keys and keeps the
wire's request and response, so it stays at the transport).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_runtime.db import Database

R = TypeVar("R")
T = TypeVar("T")
X = TypeVar("X")
Write = Callable[[AsyncConnection], Awaitable[R]]
# Runs a write (of result R) and returns T.
RunWrite = Callable[[Write[R]], Awaitable[T]]


class Transaction:
    """The default: one database transaction, then the relay's wake-up."""

    def __init__(self, db: Database, notify: Callable[[], None]) -> None:
        self.db = db
        self.notify = notify

    async def __call__(self, write: Write[R]) -> R:
        async with self.db.transaction() as conn:
            result = await write(conn)
        self.notify()
        return result


async def write_then_index(
    run: RunWrite[Any, T], write: Write[Any], written: list[X], index: Callable[[X], object]
) -> T:
    """Run `write` through `run`, then hand what it wrote to `index` (the in-memory index the
    checks read): only once committed, and nothing when `run` replayed an earlier response
    (`write` then never ran, and `written` stayed empty)."""
    result = await run(write)
    for item in written:
        index(item)
    return result
