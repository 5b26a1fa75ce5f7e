"""The gRPC interceptor that authenticates every non-public RPC and applies its access rule, the
same check for an HTTP ``Authorization: Bearer`` header, and the principals whose tokens are
refused (deactivated)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc

from medledger_runtime.auth.callers import Access, Caller, current_caller_var
from medledger_runtime.auth.scopes import ScopeNeed
from medledger_runtime.auth.tokens import TokenVerifier
from medledger_runtime.errors import PermissionDenied, Unauthenticated
from medledger_runtime.grpc_server import UnaryBehavior, UnaryWrappingInterceptor


class DeactivationSet:
    """Principals whose tokens are refused. Loaded before SERVING, kept current from events."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self.loaded = False

    def replace(self, ids: Iterable[str]) -> None:
        self._ids = set(ids)
        self.loaded = True

    def add(self, principal_id: str) -> None:
        self._ids.add(principal_id)

    def discard(self, principal_id: str) -> None:
        self._ids.discard(principal_id)

    def __contains__(self, principal_id: object) -> bool:
        return principal_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


async def authenticate_bearer(
    authorization: str | None, verifier: TokenVerifier, deactivated: DeactivationSet
) -> Caller:
    """The caller behind an HTTP `Authorization: Bearer` header, checked as the interceptor
    checks calls (signature, audience, expiry, deactivation); Unauthenticated otherwise."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("this request needs an access token (Authorization: Bearer …)")
    caller = await verifier.verify(token.strip())
    if caller.principal_id in deactivated:
        raise Unauthenticated("the principal is deactivated")
    return caller


def check_scopes(caller: Caller, need: ScopeNeed | None, request: Any) -> None:
    """A scoped caller's token must allow what the RPC or route needs (`need`, None: nothing is
    declared, so a scoped token may not call it); unscoped callers pass. RPCs whose resource type
    only the use case knows are checked there (``Caller.require_scope``)."""
    if caller.scopes is None:
        return
    if need is None:
        raise PermissionDenied("this token's scopes do not allow this call")
    if need.checked_in_use_case:
        return
    if need.check is not None:
        need.check(caller, request)
        return
    caller.require_scope(need.resource_type_of(request), need.interaction, need.patient_of(request))


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
            return None
    return None


class AuthInterceptor(UnaryWrappingInterceptor):
    """Authenticates every non-public RPC and applies its coarse access rule, then, for a scoped
    token, what the RPC needs of its scopes (before the servicer runs)."""

    def __init__(
        self,
        verifier: TokenVerifier,
        deactivated: DeactivationSet,
        *,
        public_methods: Iterable[str],
        access: Mapping[str, Access],
        scopes: Mapping[str, ScopeNeed] | None = None,
    ) -> None:
        self.verifier = verifier
        self.deactivated = deactivated
        self.public_methods = frozenset(public_methods)
        self.access = dict(access)
        # RPC → what a scoped token needs to call it; an RPC not here refuses scoped tokens.
        self.scopes = dict(scopes or {})
        super().__init__()

    def is_public(self, method: str) -> bool:
        return (
            method in self.public_methods
            or method.startswith("/grpc.health.v1.Health/")
            or method.startswith("/grpc.reflection.")
        )

    async def authenticate(
        self, metadata: Iterable[tuple[str, Any]] | None, method: str, request: Any = None
    ) -> Caller:
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated("this call needs an access token (authorization: Bearer …)")
        caller = await self.verifier.verify(token)
        if caller.principal_id in self.deactivated:
            raise Unauthenticated("the principal is deactivated")
        rule = self.access.get(method)
        if rule is None:
            # An RPC without a rule is a mistake in the service's table: refuse, never allow.
            raise PermissionDenied("no access rule for this call")
        if not rule.allows(caller):
            raise PermissionDenied("the caller's roles do not allow this call")
        check_scopes(caller, self.scopes.get(method), request)
        return caller

    def wrap(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior | None:
        if self.is_public(method):
            return None

        async def authenticated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            caller = await self.authenticate(context.invocation_metadata(), method, request)
            token = current_caller_var.set(caller)
            try:
                return await behavior(request, context)
            finally:
                current_caller_var.reset(token)

        return authenticated
