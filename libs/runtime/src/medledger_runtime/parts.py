"""What a service hands the runtime: its gRPC API and authorization table, its consumers,
HTTP routes, background jobs, start and stop hooks, and its typed handle (its own objects, for
tests and benchmarks); built by its main's ``build``, started by ``service.ServiceRuntime``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic

import grpc
from typing_extensions import TypeVar

from medledger_runtime.auth import Access, JwksFetcher, ScopeNeed
from medledger_runtime.http_server import ErrorRenderer, HttpRoute
from medledger_runtime.kafka import Handler

# A service's handle: its own objects, as its main's frozen dataclass (RecordsParts, ...). Code
# that needs no handle (a servicer given the runtime) writes a bare ServiceRuntime: Any.
H = TypeVar("H", default=Any)


@dataclass
class ConsumerSpec:
    """An event handler and what it listens to.

    `group_id` None: a consumer of this replica alone, reading every partition from the end as
    of start (for in-memory views that `on_start` hooks then load in full); it needs a `name`.
    """

    group_id: str | None
    handler: Handler
    topics: Sequence[str] = ()
    pattern: str | None = None
    accept_malformed: bool = False
    name: str = ""
    fetch_max_wait_ms: int = 500


@dataclass
class AuthSources:
    """Where a service's authentication gets the token-signing keys and the deactivated
    principals. Every service but identity asks identity (the default); identity asks itself."""

    fetch_jwks: JwksFetcher
    load_deactivated: Callable[[], Awaitable[Iterable[str]]]


@dataclass
class ServiceParts(Generic[H]):
    """What a service contributes to the runtime; built by its main's ``build`` from the runtime.

    `handle` is the service's own objects, typed, kept by the runtime as ``runtime.handle`` for
    tests and benchmarks; the runtime itself never looks inside.

    `access` is the service's authorization table (RPC full name → who may call it) and
    `public_methods` the RPCs callable without a token; health and reflection always are.
    `scopes` says what a token with SMART scopes needs to call each RPC (RPC full name →
    ``ScopeNeed``); an RPC not in it refuses scoped tokens (PERMISSION_DENIED).
    `http_routes` are the service's HTTP endpoints, served on MEDLEDGER_HTTP_PORT with the same
    authentication (each route says whether it is public and whom it allows).
    """

    service_descriptors: Sequence[Any]
    register: Callable[[grpc.aio.Server], None]
    access: Mapping[str, Access]
    handle: H
    public_methods: Sequence[str] = ()
    scopes: Mapping[str, ScopeNeed] = field(default_factory=dict)
    auth: AuthSources | None = None
    consumers: Sequence[ConsumerSpec] = ()
    interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
    http_routes: Sequence[HttpRoute] = ()
    # How the routes' errors are answered (the FHIR gateway: OperationOutcome); default plain text.
    http_error_renderer: ErrorRenderer | None = None
    # RPCs answering with personal data whose use case writes its own disclosure event (records'
    # RecordDisclosed); the runtime logs every other such RPC (medledger_runtime.disclosures).
    discloses_itself: Sequence[str] = ()
    background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = ()
    # Run in order once the consumers have started, before anything serves (keys, provisioning,
    # loading in-memory views).
    on_start: Sequence[Callable[[], Awaitable[None]]] = ()
    on_stop: Sequence[Callable[[], Awaitable[None]]] = field(default_factory=list)
