"""Domain errors and the gRPC status each maps to, and the one classification of failures.

The hierarchy itself is ``medledger_verifier.errors`` (re-exported here, where services import
it), so that the verifier needs nothing of the runtime. Domain code raises these; the
error-mapping interceptor turns them into a gRPC status (:func:`grpc_code`) with ``google.rpc``
details, so a client can read which field was wrong from BadRequest details.
:func:`outage_dependency` says whether any error is a dependency's outage (worth waiting out)
or not; ``medledger_runtime.retry`` and the error mapping both ask it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import grpc

from medledger_verifier.errors import (
    ERASED as ERASED,
)
from medledger_verifier.errors import (
    TOO_LARGE as TOO_LARGE,
)
from medledger_verifier.errors import (
    VERSION_CONFLICT as VERSION_CONFLICT,
)
from medledger_verifier.errors import (
    Aborted as Aborted,
)
from medledger_verifier.errors import (
    AlreadyExists as AlreadyExists,
)
from medledger_verifier.errors import (
    DataLoss as DataLoss,
)
from medledger_verifier.errors import (
    FailedPrecondition as FailedPrecondition,
)
from medledger_verifier.errors import (
    FieldViolation as FieldViolation,
)
from medledger_verifier.errors import (
    InvalidArgument as InvalidArgument,
)
from medledger_verifier.errors import (
    MedledgerError as MedledgerError,
)
from medledger_verifier.errors import (
    NotFound as NotFound,
)
from medledger_verifier.errors import (
    PermissionDenied as PermissionDenied,
)
from medledger_verifier.errors import (
    ResourceExhausted as ResourceExhausted,
)
from medledger_verifier.errors import (
    Unauthenticated as Unauthenticated,
)
from medledger_verifier.errors import (
    Unavailable as Unavailable,
)


def grpc_code(error: MedledgerError) -> grpc.StatusCode:
    """The gRPC status a domain error answers with."""
    return grpc.StatusCode[error.status]


_RETRYABLE_CALLS = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

# What PostgreSQL says about a statement that failed through no fault of its own, by SQLSTATE
# (appendix A of its manual): the connection (class 08), a server shutting down or starting
# (57P01-57P03), no connection slot free (53300), a statement or lock timeout (57014, 55P03),
# and the two it asks clients to retry, a serialization failure and a deadlock (40001, 40P01).
# A constraint violation (class 23), a bad query (42) or bad data (22) is none of these.
_OUTAGE_SQLSTATES = frozenset({"40001", "40P01", "57P01", "57P02", "57P03", "53300", "57014", "55P03"})

# The dependencies an outage can concern: the label of `medledger_retries_total` and the words
# of a log line or an UNAVAILABLE answer.
DEPENDENCY_WORDS = {
    "database": "the database",
    "kafka": "Kafka",
    "service": "a service it calls",
    "network": "a dependency",
    "dependency": "a dependency",
}


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The error and what it wraps, a few links down: SQLAlchemy's error, its driver adapter's,
    the driver's own (``orig`` where a wrapper keeps it, else ``__cause__``)."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return
        yield seen
        orig = getattr(seen, "orig", None)
        seen = orig if isinstance(orig, BaseException) else seen.__cause__


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE PostgreSQL gave the error, looking through SQLAlchemy's wrapping; None when
    it is not PostgreSQL's error (or says none)."""
    for seen in _causes(exc):
        code = getattr(seen, "sqlstate", None)
        if isinstance(code, str) and code:
            return code
    return None


def _is_outage_sqlstate(code: str) -> bool:
    return code.startswith("08") or code in _OUTAGE_SQLSTATES


def outage_dependency(exc: BaseException) -> str | None:
    """The one classification of failures: the dependency whose outage `exc` is (a key of
    DEPENDENCY_WORDS), or None when it is not an outage.

    An outage says nothing about the work: it may succeed when tried again, so it is UNAVAILABLE
    to a caller (who retries with the same request_id) and a reason for a job or a consumer to
    wait and retry, never INTERNAL, a dead letter or a reason to stop. Anything else (a
    constraint violation, a bad query, a bug) is tried a bounded number of times at most.
    PostgreSQL's errors are decided by their SQLSTATE, not by class: SQLAlchemy wraps a unique
    violation and a lost connection alike in DBAPIError.
    """
    import sqlite3

    from aiokafka.errors import KafkaError, KafkaTimeoutError
    from asyncpg import exceptions as asyncpg_errors
    from sqlalchemy import exc as sa

    # The driver's error is wrapped by SQLAlchemy's adapter, and that by SQLAlchemy: look down
    # the chain of causes for what actually happened.
    for seen in _causes(exc):
        code = getattr(seen, "sqlstate", None)
        if isinstance(code, str) and code:
            return "database" if _is_outage_sqlstate(code) else None
        if isinstance(seen, sa.DBAPIError):
            if seen.connection_invalidated:
                return "database"
            if isinstance(seen.orig, sqlite3.OperationalError):
                # SQLite says OperationalError for a missing table too: a bug, not an outage.
                return "database" if "locked" in str(seen.orig) or "busy" in str(seen.orig) else None
        if isinstance(seen, sa.TimeoutError | asyncpg_errors.InterfaceError):
            # No pooled connection came free in time; asyncpg's own "connection is closed".
            return "database"
        # aiokafka marks the errors worth retrying (no connection, a partition without its
        # leader yet, ...); a timeout waiting for the broker is one too, though not marked.
        if isinstance(seen, KafkaTimeoutError) or (isinstance(seen, KafkaError) and seen.retriable):
            return "kafka"
        if isinstance(seen, ConnectionError | TimeoutError | socket.gaierror):
            return "network"
        if _http_outage(seen):
            return "network"
        if isinstance(seen, Unavailable):
            return "dependency"  # our own word for it: a key manager sealed or out of reach, say
        if isinstance(seen, grpc.aio.AioRpcError) and seen.code() in _RETRYABLE_CALLS:
            return "service"  # e.g. records asking consent while consent restarts
    return None


def _http_outage(exc: BaseException) -> bool:
    """An HTTP endpoint (the chain node's JSON-RPC) out of reach, or answering that it is
    overloaded or failing (429, 5xx); a 4xx is the request's fault."""
    import aiohttp

    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.status == 429 or exc.status >= 500
    return isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError)


def dependency_outage(exc: BaseException) -> str | None:
    """In words, the dependency an exception says is out of reach ("the database", "Kafka"), or
    None when it is not an outage; see :func:`outage_dependency`."""
    dependency = outage_dependency(exc)
    return None if dependency is None else DEPENDENCY_WORDS[dependency]


def describe(exc: BaseException) -> str:
    """An error in words safe to log and to put in a dead letter: its class and, for PostgreSQL,
    its SQLSTATE, never its message (a constraint violation's names the values it met)."""
    code = sqlstate_of(exc)
    return f"{type(exc).__name__} (SQLSTATE {code})" if code else type(exc).__name__
