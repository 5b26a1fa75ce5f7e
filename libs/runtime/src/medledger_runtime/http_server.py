"""The HTTP server the runtime runs for a service's routes (identity's JWKS, audit's C2SP tiles).

A service declares its endpoints as ``HttpRoute`` values in ``ServiceParts.http_routes``; the
runtime serves them all on one port (``MEDLEDGER_HTTP_PORT``) with what the gRPC server gives
every RPC: the same bearer-token authentication (routes are authenticated unless declared
public), a request limit (bodies over ``MEDLEDGER_HTTP_MAX_BODY_BYTES`` get 413), RED metrics
by route and status, a server span per request continuing the caller's W3C ``traceparent``,
and a graceful stop (stop accepting, let in-flight requests finish within the grace period).

/metrics stays on its own port, served by prometheus_client's threaded server, rather than
joining this one: every service has a metrics port but only those with routes open this one;
the chart lets clients reach this port and only Prometheus the metrics port (so an outside
verifier fetching tiles never reaches the metrics); and a thread answers scrapes and liveness
probes even while the event loop is busy, which is when the figures matter most.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter, Histogram

from medledger_runtime.auth import ANY_CALLER, Access, Caller, ScopeNeed, acting_as, check_scopes
from medledger_runtime.errors import MedledgerError, PermissionDenied, dependency_outage, grpc_code
from medledger_runtime.telemetry import start_span

log = logging.getLogger(__name__)
_EMPTY_CONTEXT = otel_context.Context()

HttpHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The caller behind an `Authorization` header value (None: no header); Unauthenticated otherwise.
Authenticator = Callable[[str | None], Awaitable[Caller]]
# The body of an error answer: (HTTP status, message) → response. The default is the message as
# text; the FHIR gateway answers an OperationOutcome instead.
ErrorRenderer = Callable[[int, str], web.Response]

# Named as OpenTelemetry's HTTP server metrics are when exported to Prometheus.
HTTP_REQUESTS = Counter(
    "http_server_requests_total",
    "HTTP requests answered by the server, by route and status.",
    ["http_request_method", "http_route", "http_response_status_code"],
)
HTTP_SECONDS = Histogram(
    "http_server_request_duration_seconds",
    "Time to answer an HTTP request on the server.",
    ["http_request_method", "http_route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# The route label of requests no declared route matched (404, 405): one label, whatever the path.
UNMATCHED = "unmatched"
# Statuses that are the server's fault: created at zero for every route, as gRPC's fault codes.
_FAULT_STATUSES = ("500", "503")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# A domain error's HTTP status, from the gRPC status it already carries; any other is 500.
_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}


class _MalformedRequestsWithoutContent(logging.Filter):
    """aiohttp logs a request it cannot parse at ERROR with the exception, whose message quotes
    the offending request line or header: a FHIR search's parameters, a bearer token. Such a log
    keeps the exception's class and status only, at WARNING: a malformed request is the client's
    fault, not the server's."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg, record.args = "refused a malformed HTTP request: %s (%s)", (type(error).__name__, error.code)
            record.exc_info, record.exc_text = None, None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_PROTOCOL_LOG = logging.getLogger("medledger.http.protocol")
_PROTOCOL_LOG.addFilter(_MalformedRequestsWithoutContent())


@dataclass(frozen=True)
class HttpRoute:
    """One HTTP endpoint of a service.

    `method` and `path` as aiohttp routes them (``{name}`` or ``{name:regex}`` for a variable
    part); a GET route answers HEAD too. Like an RPC, a route needs a bearer token unless it is
    `public`, and then a caller that `access` allows (roles or principal kinds, as in a gRPC
    access table); the handler reads that caller with ``auth.current_caller()``. A public route
    that opens only some of its answers to callers (audit's entry bundles) calls
    ``authenticate(request)`` itself. A token with SMART scopes needs what `scope` declares (a
    ``ScopeNeed``, its functions given the ``web.Request``); a route declaring none answers such
    a token 403, as an RPC does.
    """

    method: str
    path: str
    handler: HttpHandler
    public: bool = False
    access: Access = ANY_CALLER
    scope: ScopeNeed | None = None

    @classmethod
    def get(
        cls,
        path: str,
        handler: HttpHandler,
        *,
        public: bool = False,
        access: Access = ANY_CALLER,
        scope: ScopeNeed | None = None,
    ) -> HttpRoute:
        return cls("GET", path, handler, public=public, access=access, scope=scope)


_AUTHENTICATOR: web.AppKey[Authenticator] = web.AppKey("authenticator")


async def authenticate(request: web.Request) -> Caller:
    """The caller behind the request's ``Authorization: Bearer`` header, checked as on every
    authenticated route; Unauthenticated (answered 401) otherwise."""
    return await request.app[_AUTHENTICATOR](request.headers.get("Authorization"))


class HttpServer:
    """An aiohttp server for a service's ``HttpRoute``s; see the module's docstring."""

    def __init__(
        self,
        routes: Sequence[HttpRoute],
        *,
        host: str,
        port: int,
        authenticate: Authenticator,
        max_body_bytes: int,
        shutdown_grace_seconds: float,
        render_error: ErrorRenderer | None = None,
    ) -> None:
        self._host = host
        # What is served, as declared (tests enumerate a service's routes from its runtime).
        self.routes: tuple[HttpRoute, ...] = tuple(routes)
        self._render_error = render_error or _text_error
        self._port = port
        self._max_body_bytes = max_body_bytes
        self.port = 0
        self._started = False
        app = web.Application(client_max_size=max_body_bytes, middlewares=[self._serve])
        app[_AUTHENTICATOR] = authenticate
        # aiohttp's route → the declared route, which says how to authenticate and how to label.
        self._declared: dict[web.AbstractRoute, HttpRoute] = {}
        for route in routes:
            method = route.method.upper()
            self._declared[app.router.add_route(method, route.path, route.handler)] = route
            if method == "GET":
                self._declared[app.router.add_route("HEAD", route.path, route.handler)] = route
            for status in ("200", *_FAULT_STATUSES):
                HTTP_REQUESTS.labels(method, route.path, status)
        # The runner drains: on cleanup it closes the listening socket and idle connections,
        # then waits up to the grace for in-flight requests before cancelling them. aiohttp
        # reads a timeout of 0 as none at all, so no grace is the shortest one instead.
        self._runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=max(shutdown_grace_seconds, 0.001),
            logger=_PROTOCOL_LOG,
        )
        self._tracer = trace.get_tracer("medledger.http")

    async def start(self) -> int:
        self._started = True
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, then close."""
        if self._started:
            await self._runner.cleanup()

    @web.middleware
    async def _serve(self, request: web.Request, handler: HttpHandler) -> web.StreamResponse:
        declared = self._declared.get(request.match_info.route)
        route = declared.path if declared is not None else UNMATCHED
        method = request.method if request.method in _METHODS else "OTHER"
        t0 = time.perf_counter()
        # The caller's trace context when it sent one; else the span starts a new trace.
        parent = propagate.extract(request.headers) if "traceparent" in request.headers else _EMPTY_CONTEXT
        # No URL in the span: a path may one day carry an identifier, the route never does.
        attributes: dict[str, Any] = {"http.request.method": method, "http.route": route}
        span = start_span(self._tracer, f"{method} {route}", parent, SpanKind.SERVER, attributes)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        status = 500
        try:
            response = await self._answer(request, handler, declared)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            otel_context.detach(token)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR, str(status)))
            span.end()
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_SECONDS.labels(method, route).observe(time.perf_counter() - t0)

    async def _answer(
        self, request: web.Request, handler: HttpHandler, declared: HttpRoute | None
    ) -> web.StreamResponse:
        if declared is None:  # aiohttp's own 404 or 405
            try:
                return await handler(request)
            except web.HTTPException as exc:
                if self._render_error is _text_error:
                    raise
                return self._with_headers(self._render_error(exc.status, exc.reason), exc)
        length = request.content_length
        if length is not None and length > self._max_body_bytes:
            # Refused before anything reads it; a body without a length is bounded by aiohttp's
            # client_max_size as it is read, with the same answer.
            return self._render_error(413, f"the request body is larger than {self._max_body_bytes} bytes")
        try:
            if declared.public:
                return await handler(request)
            caller = await authenticate(request)
            if not declared.access.allows(caller):
                raise PermissionDenied("the caller's roles do not allow this request")
            check_scopes(caller, declared.scope, request)
            with acting_as(caller):
                return await handler(request)
        except MedledgerError as exc:
            status = _HTTP_STATUS.get(grpc_code(exc), 500)
            if status >= 500:
                log.error("%s in %s %s", type(exc).__name__, request.method, declared.path)
            response = self._render_error(status, exc.message)
            if status == 401:
                response.headers["WWW-Authenticate"] = "Bearer"
            return response
        except web.HTTPRequestEntityTooLarge:
            # A body without a length, grown past client_max_size as it was read.
            return self._render_error(413, f"the request body is larger than {self._max_body_bytes} bytes")
        except web.HTTPException:
            raise
        except Exception as exc:
            outage = dependency_outage(exc)
            if outage is not None:
                log.warning(
                    "%s unavailable in %s %s",
                    outage,
                    request.method,
                    declared.path,
                    extra={"error": type(exc).__name__},
                )
                response = self._render_error(503, f"{outage} is unavailable; retry")
                response.headers["Retry-After"] = "1"
                return response
            log.exception("unhandled error in %s %s", request.method, declared.path)
            return self._render_error(500, "internal error")

    @staticmethod
    def _with_headers(response: web.Response, exc: web.HTTPException) -> web.Response:
        # aiohttp's 405 says which methods the route allows.
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


def _text_error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=f"{message}\n")
