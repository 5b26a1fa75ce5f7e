"""The one exception hierarchy of every medledger package.

The verifier raises these for malformed or forged evidence; services raise them for bad requests
and broken rules; the runtime maps each to its gRPC status at one boundary (the error-mapping
interceptor, with ``google.rpc`` BadRequest details from the field violations). They live here,
at the bottom of the house, so that checking a proof needs nothing of the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

# Reasons (MedledgerError.reason) that clients act on.
ERASED = "ERASED"  # the patient's records were erased (crypto-shredded)
VERSION_CONFLICT = "VERSION_CONFLICT"  # an expected version is no longer the latest
TOO_LARGE = "TOO_LARGE"  # RESOURCE_EXHAUSTED by the size of the request, not by a rate


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class MedledgerError(Exception):
    """Base of every error a client may see. The message must hold no personal data. ``status``
    is the name of its google.rpc code (the runtime answers a gRPC call with that status).
    ``reason``, when set, tells apart errors of one status for programs (google.rpc ErrorInfo's
    reason, UPPER_SNAKE_CASE): a record ``ERASED`` or a ``VERSION_CONFLICT``, both
    FAILED_PRECONDITION, are 410 and 412 to a FHIR client; a denial carries consent's reason code."""

    status = "INTERNAL"

    def __init__(self, message: str, *, violations: tuple[FieldViolation, ...] = (), reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.violations = violations
        self.reason = reason


class InvalidArgument(MedledgerError):
    status = "INVALID_ARGUMENT"

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls(f"{field}: {description}", violations=(FieldViolation(field, description),))


class NotFound(MedledgerError):
    status = "NOT_FOUND"


class AlreadyExists(MedledgerError):
    status = "ALREADY_EXISTS"


class PermissionDenied(MedledgerError):
    status = "PERMISSION_DENIED"


class Unauthenticated(MedledgerError):
    status = "UNAUTHENTICATED"


class FailedPrecondition(MedledgerError):
    status = "FAILED_PRECONDITION"


class Aborted(MedledgerError):
    """A concurrent change got there first; the client may retry the call."""

    status = "ABORTED"


class ResourceExhausted(MedledgerError):
    status = "RESOURCE_EXHAUSTED"


class DataLoss(MedledgerError):
    """Stored data failed an integrity check (tampering); never returned as data."""

    status = "DATA_LOSS"


class Unavailable(MedledgerError):
    """A dependency (database, broker, key manager) cannot be reached; the client may retry."""

    status = "UNAVAILABLE"
