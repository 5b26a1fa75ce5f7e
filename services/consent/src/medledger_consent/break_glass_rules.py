"""Break-glass's rules, free of I/O: an organization's policy and its defaults and limits, the
check of a request, and the justification's digest. (A running access's effect on a decision is
the decision rule's: ``domain``.)"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

from medledger.consent.v1 import consent_service_pb2 as pb

from medledger_runtime.errors import InvalidArgument

JUSTIFICATION_DOMAIN = b"medledger:break-glass-justification:v1\n"
JUSTIFICATION_MIN_CHARS = 10
JUSTIFICATION_MAX_CHARS = 2000
DEFAULT_ACCESS_SECONDS = 4 * 3600.0
MAX_ACCESS_SECONDS = 24 * 3600.0
DEFAULT_MAX_USES = 3
DEFAULT_RATE_WINDOW_SECONDS = 24 * 3600.0
_REASONS_OF_BREAK_GLASS = {v.number: v.name for v in pb.BreakGlassReason.DESCRIPTOR.values if v.number}


@dataclass(frozen=True)
class BreakGlassPolicy:
    organization_id: str
    enabled: bool = False
    overrides_deny: bool = False
    access_seconds: float = DEFAULT_ACCESS_SECONDS
    max_uses: int = DEFAULT_MAX_USES
    rate_window_seconds: float = DEFAULT_RATE_WINDOW_SECONDS
    changed_by: str = ""
    changed_at: float = 0.0


def check_policy(
    organization_id: str,
    *,
    enabled: bool,
    overrides_deny: bool,
    access_seconds: float | None,
    max_uses: int,
    rate_window_seconds: float | None,
) -> BreakGlassPolicy:
    """A policy with defaults for unset durations (None) and counts (0)."""
    if not organization_id:
        raise InvalidArgument.field("policy.organization_id", "required")
    access = DEFAULT_ACCESS_SECONDS if access_seconds is None else access_seconds
    if not 0 < access <= MAX_ACCESS_SECONDS:
        raise InvalidArgument.field("policy.access_duration", "more than 0 and at most 24 hours")
    window = DEFAULT_RATE_WINDOW_SECONDS if rate_window_seconds is None else rate_window_seconds
    if window <= 0:
        raise InvalidArgument.field("policy.rate_window", "must be positive")
    if max_uses < 0:
        raise InvalidArgument.field("policy.max_uses", "must not be negative (0: the default, 3)")
    return BreakGlassPolicy(
        organization_id=organization_id,
        enabled=enabled,
        overrides_deny=overrides_deny,
        access_seconds=access,
        max_uses=max_uses or DEFAULT_MAX_USES,
        rate_window_seconds=window,
    )


def check_break_glass(patient_id: str, reason: int, justification: str) -> str:
    """Field checks of a break-glass request; returns the justification, stripped."""
    if not patient_id:
        raise InvalidArgument.field("patient_id", "required")
    if reason not in _REASONS_OF_BREAK_GLASS:
        raise InvalidArgument.field("reason", "required: one of " + ", ".join(_REASONS_OF_BREAK_GLASS.values()))
    justification = justification.strip()
    if not JUSTIFICATION_MIN_CHARS <= len(justification) <= JUSTIFICATION_MAX_CHARS:
        raise InvalidArgument.field(
            "justification",
            f"{JUSTIFICATION_MIN_CHARS} to {JUSTIFICATION_MAX_CHARS} characters explaining the emergency",
        )
    return justification


def justification_sha256(justification: str) -> str:
    return hashlib.sha256(JUSTIFICATION_DOMAIN + justification.encode()).hexdigest()


def reason_code(reason: int) -> str:
    return _REASONS_OF_BREAK_GLASS.get(reason, "BREAK_GLASS_REASON_UNSPECIFIED")


def new_break_glass_id() -> str:
    return f"bgl_{uuid.uuid4().hex}"
