"""Break-glass's use cases' commands and results: plain values, apart from any transport. The
use cases are ``break_glass.BreakGlassDesk``."""

from __future__ import annotations

from dataclasses import dataclass

from medledger_consent import domain

# Commands.


@dataclass(frozen=True)
class SetBreakGlassPolicy:
    """An organization's policy; unset durations (None) and count (0) take the defaults."""

    organization_id: str
    enabled: bool = False
    overrides_deny: bool = False
    access_seconds: float | None = None
    max_uses: int = 0
    rate_window_seconds: float | None = None


@dataclass(frozen=True)
class BreakGlass:
    """The caller (a practitioner) breaks the glass for the patient (reason: a BreakGlassReason)."""

    patient_id: str
    reason: int
    justification: str


@dataclass(frozen=True)
class ListBreakGlassAccesses:
    organization_id: str
    pending_only: bool = False
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class ReviewBreakGlassAccess:
    """review: JUSTIFIED or UNJUSTIFIED (a BreakGlassReview)."""

    access_id: str
    review: int


# Results.


@dataclass(frozen=True)
class AccessPage:
    accesses: list[domain.BreakGlassAccess]
    next_page_token: str


@dataclass(frozen=True)
class AccessRead:
    """An access with its justification ("" once the patient's erasure destroyed its key)."""

    access: domain.BreakGlassAccess
    justification: str = ""
