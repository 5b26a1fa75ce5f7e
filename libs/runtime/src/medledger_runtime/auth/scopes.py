"""SMART App Launch v2 scopes: what a scoped access token may do, whatever its principal's roles.

A token's ``scope`` claim is a space-separated list. Resource scopes read
``{patient|user|system}/{ResourceType|*}.{c?r?u?d?s?}`` (the letters in that order, at least one):
create, read, update, delete, search. A ``patient/`` scope reaches only the compartment of the
patient in context (the token's ``patient`` claim); ``user/`` and ``system/`` scopes reach what
the principal's roles and consent already allow. Scopes only ever narrow: a scoped token can do
no more than the same principal's unscoped one.

The launch and identity scopes SMART defines (``openid``, ``fhirUser``, ``launch/patient``,
``offline_access``, ...) are accepted and grant no resource access. Any other scope is refused
(``InvalidScope``), the whole token with it: medledger's own identity writes this claim, so a
scope nobody here understands is a bug or a forgery; ignoring a granular scope
(``patient/Observation.rs?category=...``) would even read it as wider than it is.

Pure: no I/O. ``ScopeNeed`` is what an RPC or HTTP route needs of a scoped token.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medledger_runtime.auth.callers import Caller

INTERACTIONS = "cruds"
INTERACTION_NAMES = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}
CONTEXTS = frozenset({"patient", "user", "system"})
ALL_TYPES = "*"
# SMART's scopes that are not about resources: accepted, granting nothing here.
NON_RESOURCE_SCOPES = frozenset(
    {"openid", "fhirUser", "profile", "launch", "launch/patient", "launch/encounter", "offline_access", "online_access"}
)
MAX_SCOPES = 100
_RESOURCE_SCOPE = re.compile(r"(patient|user|system)/(\*|[A-Z][A-Za-z]{0,63})\.(c?r?u?d?s?)")


class InvalidScope(ValueError):
    """A scope string that is not a SMART v2 scope medledger understands."""


@dataclass(frozen=True)
class Scope:
    """One resource scope, e.g. ``patient/Observation.rs``."""

    context: str
    resource_type: str
    interactions: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> Scope:
        match = _RESOURCE_SCOPE.fullmatch(text)
        if match is None or not match.group(3):
            raise InvalidScope(f"not a SMART v2 resource scope: {text[:80]!r}")
        return cls(match.group(1), match.group(2), frozenset(match.group(3)))

    def covers(self, resource_type: str, interaction: str) -> bool:
        """Whether this scope allows `interaction` on `resource_type` ("*": every type, which
        only a ``*`` scope covers)."""
        return interaction in self.interactions and self.resource_type in (ALL_TYPES, resource_type)

    def __str__(self) -> str:
        letters = "".join(i for i in INTERACTIONS if i in self.interactions)
        return f"{self.context}/{self.resource_type}.{letters}"


@dataclass(frozen=True)
class ScopeSet:
    """The resource scopes of a token (its non-resource scopes are dropped)."""

    scopes: frozenset[Scope]

    @classmethod
    def parse(cls, text: str) -> ScopeSet:
        """A ``scope`` claim's value; InvalidScope for any scope not understood."""
        words = text.split()
        if len(words) > MAX_SCOPES:
            raise InvalidScope(f"more than {MAX_SCOPES} scopes")
        return cls(frozenset(Scope.parse(w) for w in words if w not in NON_RESOURCE_SCOPES))

    @classmethod
    def of(cls, *texts: str) -> ScopeSet:
        return cls.parse(" ".join(texts))

    def permits(self, resource_type: str, interaction: str) -> bool:
        """Whether any scope, of any context, allows `interaction` on `resource_type`. For a
        patient's compartment, ask :meth:`permits_for_patient`."""
        _check_interaction(interaction)
        return any(s.covers(resource_type, interaction) for s in self.scopes)

    def permits_for_patient(self, resource_type: str, interaction: str, patient_id: str, patient_context: str) -> bool:
        """Whether `interaction` on `resource_type` of `patient_id`'s compartment is allowed: by a
        user or system scope, or by a patient scope when that patient is the one in context."""
        _check_interaction(interaction)
        in_context = bool(patient_context) and patient_id == patient_context
        return any(s.covers(resource_type, interaction) and (s.context != "patient" or in_context) for s in self.scopes)

    def __str__(self) -> str:
        return " ".join(sorted(str(s) for s in self.scopes))


def _check_interaction(interaction: str) -> None:
    if len(interaction) != 1 or interaction not in INTERACTIONS:
        raise ValueError(f"an interaction is one of {INTERACTIONS!r}, not {interaction!r}")


RequestValue = Callable[[Any], str]
# Checks a scoped caller against a request whose needs are more than one (type, interaction):
# raises PermissionDenied (through ``Caller.require_scope``) when the scopes fall short.
RequestCheck = Callable[["Caller", Any], None]


@dataclass(frozen=True)
class ScopeNeed:
    """What a scoped token needs to make one RPC (or HTTP request): `interaction` on
    `resource_type` (a name, ``*`` for every type, or a function of the request), in the
    compartment of the patient `patient` reads from the request when the RPC names one.

    ``ScopeNeed.in_use_case()``: the resource type is known only once the use case has read the
    record; the use case then checks with ``Caller.require_scope``. ``ScopeNeed.by(check)``: the
    request needs several (a batch of writes): `check` calls ``Caller.require_scope`` for each.
    """

    resource_type: str | RequestValue = ""
    interaction: str = ""
    patient: RequestValue | None = None
    checked_in_use_case: bool = False
    check: RequestCheck | None = None

    def __post_init__(self) -> None:
        if not self.checked_in_use_case and self.check is None:
            _check_interaction(self.interaction)
            if not self.resource_type:
                raise ValueError("a ScopeNeed names its resource type")

    @classmethod
    def in_use_case(cls) -> ScopeNeed:
        return cls(checked_in_use_case=True)

    @classmethod
    def by(cls, check: RequestCheck) -> ScopeNeed:
        return cls(check=check)

    def resource_type_of(self, request: Any) -> str:
        rt = self.resource_type
        return rt if isinstance(rt, str) else (rt(request) or ALL_TYPES)

    def patient_of(self, request: Any) -> str | None:
        return None if self.patient is None else self.patient(request)


def patient_id_field(request: Any) -> str:
    """The request's ``patient_id``: the compartment most RPCs name."""
    return str(request.patient_id)
