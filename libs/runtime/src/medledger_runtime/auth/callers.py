"""Who is calling, and the coarse access rules of RPCs: the caller of the request being handled
(a context variable the interceptor and the HTTP server set) and ``Access``, the roles or
principal kinds an RPC allows."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from medledger_runtime.auth.scopes import INTERACTION_NAMES, ScopeSet
from medledger_runtime.errors import PermissionDenied, Unauthenticated


@dataclass(frozen=True)
class Caller:
    """The authenticated principal behind a call."""

    principal_id: str
    kind: str
    roles: frozenset[str]
    organization_id: str
    token_id: str
    expires_at: float
    # SMART v2 scopes of the token (None: unscoped, the roles alone decide) and the patient in
    # context (SMART `patient`; "" none), whose compartment alone `patient/` scopes reach.
    scopes: ScopeSet | None = None
    patient_context: str = ""

    def has_role(self, role: str) -> bool:
        return role in self.roles

    def require_scope(self, resource_type: str, interaction: str, patient_id: str | None = None) -> None:
        """PermissionDenied unless the token's scopes allow `interaction` (c r u d s) on
        `resource_type` ("*": every type), within `patient_id`'s compartment when given (then a
        ``patient/`` scope counts only for the patient in context). Unscoped tokens pass."""
        if self.scopes is None:
            return
        if patient_id is None:
            allowed = self.scopes.permits(resource_type, interaction)
        else:
            allowed = self.scopes.permits_for_patient(resource_type, interaction, patient_id, self.patient_context)
        if not allowed:
            what = "every resource type" if resource_type == "*" else resource_type
            # Allowed by type, refused by compartment: say so, or the refusal reads as a bug.
            outside = patient_id is not None and self.scopes.permits(resource_type, interaction)
            where = " outside the patient in context" if outside else ""
            raise PermissionDenied(
                f"this token's scopes do not allow {INTERACTION_NAMES[interaction]} of {what}{where}"
            )


@dataclass(frozen=True)
class Access:
    """Who may call an RPC: any of these roles or principal kinds. Empty means any caller."""

    roles: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()

    @classmethod
    def of(cls, *, roles: Iterable[str] = (), kinds: Iterable[str] = ()) -> Access:
        return cls(frozenset(roles), frozenset(kinds))

    def allows(self, caller: Caller) -> bool:
        if not self.roles and not self.kinds:
            return True
        return caller.kind in self.kinds or not self.roles.isdisjoint(caller.roles)


ANY_CALLER = Access()

# The caller of the request being handled: set by the gRPC interceptor, and by `acting_as` for HTTP.
current_caller_var: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("medledger_caller", default=None)


# The patient the current request's caller was allowed to act for as their guardian ("" when
# not): set by `guardians.Guardians.acts_for`, read by the disclosure log to say on whose behalf
# a guardian read. Each RPC runs in a task of its own, so it never outlives its request.
acting_for: contextvars.ContextVar[str] = contextvars.ContextVar("medledger_acting_for", default="")


def current_caller() -> Caller:
    """The caller of the RPC or HTTP request being handled; only valid once authenticated."""
    caller = current_caller_var.get()
    if caller is None:
        raise Unauthenticated("no authenticated caller")
    return caller


@contextlib.contextmanager
def acting_as(caller: Caller) -> Iterator[None]:
    """Make `caller` the ``current_caller()`` within: for transports other than gRPC (HTTP)."""
    token = current_caller_var.set(caller)
    try:
        yield
    finally:
        current_caller_var.reset(token)
