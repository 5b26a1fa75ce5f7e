"""What a verification of the log found: divergences (the log's storage, or a witness, disagrees)
and findings (each check's outcome in words, including those that could not run and why)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Divergence:
    """Where storage stops matching the log: the first entry index concerned (None when no
    single entry can be named), what is wrong, and its kind (a stable name for scripts and
    tests: `missing-entry`, `altered-entry`, `column`, `behind-chain`, ...)."""

    index: int | None
    problem: str
    kind: str = "storage"


@dataclass(frozen=True)
class Finding:
    """One check's outcome: passed True or False, or None when it could not run (`detail` says why)."""

    check: str
    passed: bool | None
    detail: str
