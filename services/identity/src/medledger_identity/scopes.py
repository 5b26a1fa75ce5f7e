"""SMART on FHIR scopes (SMART App Launch 2.x), free of I/O: the grammar identity accepts, the
form tokens carry, and the narrowing of a request to what a client may be granted.

A v2 resource scope is ``{patient|user|system}/{ResourceType|*}.{c?r?u?d?s?}``, the letters in
that order. v1 scopes (``.read``, ``.write``, ``.*``) are accepted and written as their v2
equivalents (``.rs``, ``.cud``, ``.cruds``), so a token's ``scope`` claim is always v2 and its
readers need one grammar. Not accepted: v2 query suffixes (``?category=…``), and the launch and
OpenID scopes (``launch``, ``openid``, ``fhirUser``, ``offline_access``), which mean nothing
without an interactive launch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from medledger_runtime.errors import InvalidArgument

CONTEXTS = ("patient", "user", "system")
PERMISSIONS = "cruds"
MAX_SCOPES = 64
MAX_SCOPE_CHARS = 4096
# FHIR resource type names are ASCII letters starting upper-case (Observation, MedicationRequest);
# the same pattern as the runtime's reader of the claim (medledger_runtime.auth.scopes).
_SCOPE = re.compile(r"(patient|user|system)/(\*|[A-Z][A-Za-z]{0,63})\.([a-z*]+)")
# v1 permission words and their v2 equivalents.
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_V2 = re.compile(r"c?r?u?d?s?")


@dataclass(frozen=True, order=True)
class Scope:
    """One SMART v2 resource scope."""

    context: str  # patient | user | system
    resource_type: str  # a FHIR resource type, or "*"
    permissions: str  # a non-empty subsequence of "cruds"

    def __str__(self) -> str:
        return f"{self.context}/{self.resource_type}.{self.permissions}"

    def covers(self, other: Scope) -> bool:
        """Whether this scope allows everything `other` asks for."""
        return (
            self.context == other.context
            and self.resource_type in ("*", other.resource_type)
            and set(other.permissions) <= set(self.permissions)
        )

    def narrowed_to(self, allowed: Iterable[Scope]) -> Scope | None:
        """What of this scope `allowed` grants: same context, for its resource type, with the
        permissions some allowed scope holds; None when nothing."""
        letters: set[str] = set()
        for scope in allowed:
            if scope.context == self.context and scope.resource_type in ("*", self.resource_type):
                letters |= set(self.permissions) & set(scope.permissions)
        if not letters:
            return None
        return Scope(self.context, self.resource_type, _ordered(letters))


def _ordered(letters: Iterable[str]) -> str:
    chosen = set(letters)
    return "".join(p for p in PERMISSIONS if p in chosen)


def parse_scope(text: str, field: str = "scope") -> Scope:
    """One scope, v1 or v2, as a v2 Scope; InvalidArgument naming `field` otherwise."""
    match = _SCOPE.fullmatch(text)
    if match is None:
        raise InvalidArgument.field(
            field, "each scope must be {patient|user|system}/{ResourceType|*}.{c?r?u?d?s?}, e.g. patient/Observation.rs"
        )
    context, resource_type, permissions = match.groups()
    permissions = _V1.get(permissions, permissions)
    if not permissions or _V2.fullmatch(permissions) is None:
        raise InvalidArgument.field(
            field, "permissions must be letters of c, r, u, d, s in that order, or read/write/*"
        )
    return Scope(context, resource_type, permissions)


def parse_scopes(text: str, field: str = "scope") -> tuple[Scope, ...]:
    """A space-separated scope list (RFC 6749 §3.3) as v2 Scopes, duplicates dropped, in the order
    given; empty for an empty string."""
    if len(text) > MAX_SCOPE_CHARS:
        raise InvalidArgument.field(field, f"longer than {MAX_SCOPE_CHARS} characters")
    words = text.split(" ")
    if text and any(not w for w in words):
        raise InvalidArgument.field(field, "scopes are separated by single spaces")
    scopes = tuple(dict.fromkeys(parse_scope(w, field) for w in words if w))
    if len(scopes) > MAX_SCOPES:
        raise InvalidArgument.field(field, f"at most {MAX_SCOPES} scopes")
    return scopes


def scope_string(scopes: Iterable[Scope]) -> str:
    """The space-separated form a token's ``scope`` claim and an OAuth response carry."""
    return " ".join(str(s) for s in scopes)


def check_context(scopes: Iterable[Scope], context: str, field: str = "scope") -> None:
    """Every scope is of `context` (a patient gets patient/…, a user user/…, a client system/…)."""
    for scope in scopes:
        if scope.context != context:
            raise InvalidArgument.field(
                field, f"{scope} is not a {context}/ scope; this principal may ask {context}/ only"
            )


def narrow(requested: Iterable[Scope], allowed: Iterable[Scope]) -> tuple[Scope, ...]:
    """requested ∩ allowed, scope by scope (RFC 6749 §3.3: the server may grant less)."""
    allowed = tuple(allowed)
    granted = (s.narrowed_to(allowed) for s in requested)
    return tuple(dict.fromkeys(s for s in granted if s is not None))
