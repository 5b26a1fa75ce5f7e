"""Domain errors and the gRPC status each maps to.

Domain code raises these; the error-mapping interceptor turns them into a gRPC status with
``google.rpc`` details, so a client can read which field was wrong from BadRequest details.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class MedledgerError(Exception):
    """Base of every error a client may see. The message must hold no personal data."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, violations: tuple[FieldViolation, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.violations = violations


class InvalidArgument(MedledgerError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls(f"{field}: {description}", violations=(FieldViolation(field, description),))


class NotFound(MedledgerError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MedledgerError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(MedledgerError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(MedledgerError):
    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(MedledgerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(MedledgerError):
    """A concurrent change got there first; the client may retry the call."""

    code = grpc.StatusCode.ABORTED


class ResourceExhausted(MedledgerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DataLoss(MedledgerError):
    """Stored data failed an integrity check (tampering); never returned as data."""

    code = grpc.StatusCode.DATA_LOSS


class Unavailable(MedledgerError):
    """A dependency (database, broker, key manager) cannot be reached; the client may retry."""

    code = grpc.StatusCode.UNAVAILABLE


_RETRYABLE_CALLS = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@functools.cache
def _asyncpg_outages() -> tuple[type[BaseException], ...]:
    """asyncpg's errors that say PostgreSQL is out of reach or going away: a lost or refused
    connection (class 08), a server shutting down or starting (57P01-57P03), no connection slot
    free (53300), and the client's own "connection is closed". Met unwrapped where a hot path
    uses asyncpg itself (db.DriverQuery), wrapped by SQLAlchemy elsewhere."""
    from asyncpg import exceptions as pg

    return (
        pg.PostgresConnectionError,
        pg.AdminShutdownError,
        pg.CrashShutdownError,
        pg.CannotConnectNowError,
        pg.TooManyConnectionsError,
        pg.InterfaceError,
    )


def dependency_outage(exc: BaseException) -> str | None:
    """The dependency an exception says is out of reach ("the database", "Kafka"), or None.

    What a request or a background job meets while PostgreSQL restarts or the broker is away:
    the work may succeed when tried again, so it is UNAVAILABLE to a caller (who retries with
    the same request_id) and a reason to retry for a job, never INTERNAL or a reason to stop.
    A call to another service that could not be made (UNAVAILABLE, DEADLINE_EXCEEDED) is one too.
    A constraint violation or a bad query is not an outage, though SQLAlchemy wraps both alike.
    """
    import sqlite3

    from aiokafka.errors import KafkaError, KafkaTimeoutError
    from sqlalchemy import exc as sa

    # The driver's error is wrapped by SQLAlchemy's adapter, and that by SQLAlchemy: look down
    # the chain of causes (a few links) for what actually happened.
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return None
        if isinstance(seen, sa.DBAPIError) and (
            seen.connection_invalidated or isinstance(seen, sa.OperationalError | sa.InterfaceError)
        ):
            if isinstance(seen.orig, sqlite3.OperationalError) and "locked" not in str(seen.orig):
                return None  # SQLite says OperationalError for a missing table too: a bug, not an outage
            return "the database"
        if isinstance(seen, (sa.TimeoutError, *_asyncpg_outages())):
            return "the database"  # sa.TimeoutError: no pooled connection came free in time
        # aiokafka marks the errors worth retrying (no connection, a partition without its
        # leader yet, ...); a timeout waiting for the broker is one too, though not marked.
        if isinstance(seen, KafkaTimeoutError) or (isinstance(seen, KafkaError) and seen.retriable):
            return "Kafka"
        if isinstance(seen, ConnectionError | TimeoutError):
            return "a dependency"
        if isinstance(seen, Unavailable):
            return "a dependency"  # our own word for it: a key manager sealed or out of reach, say
        if isinstance(seen, grpc.aio.AioRpcError) and seen.code() in _RETRYABLE_CALLS:
            return "a service it calls"  # e.g. records asking consent while consent restarts
        orig = getattr(seen, "orig", None)
        seen = orig if isinstance(orig, BaseException) else seen.__cause__
    return None
