"""Domain errors and the gRPC status each maps to.

Domain code raises these; the error-mapping interceptor turns them into a gRPC status with
``google.rpc`` details, so a client can read which field was wrong from BadRequest details.
"""

from __future__ import annotations

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
