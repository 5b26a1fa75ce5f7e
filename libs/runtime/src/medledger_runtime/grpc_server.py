"""The gRPC server bootstrap every service uses, and the observability interceptor.

One server shape for all five services: grpc.aio, health and reflection, explicit message-size
limits, TLS or mTLS from certificate files, and a graceful stop that first reports NOT_SERVING
(so load balancers drain) and then waits for in-flight calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter, Histogram

from medledger_runtime.errors import MedledgerError, dependency_outage, grpc_code
from medledger_runtime.request_checks import check_request
from medledger_runtime.telemetry import start_span

log = logging.getLogger(__name__)
_EMPTY_CONTEXT = otel_context.Context()

# go-grpc-prometheus names, which Grafana dashboards for gRPC already understand.
RPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", ["grpc_service", "grpc_method"])
RPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
RPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time to handle an RPC on the server.",
    ["grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


@dataclass(frozen=True)
class TLSFiles:
    """Certificate files mounted into the service; ``ca_file`` turns on mTLS."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        ca = self.ca_file.read_bytes() if self.ca_file else None
        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


def status_for(error: MedledgerError) -> grpc.Status:
    """A gRPC status with google.rpc details: BadRequest field violations where there are any,
    ErrorInfo when the error has a reason."""
    details = []
    if error.reason:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain="medledger.dev"))
        details.append(info)
    if error.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    return rpc_status.to_status(
        status_pb2.Status(code=grpc_code(error).value[0], message=error.message, details=details)
    )


def _split_method(full: str) -> tuple[str, str]:
    _, service, method = full.split("/", 2) if full.count("/") == 2 else ("", full, "")
    return service, method


UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def with_unary_behavior(handler: grpc.RpcMethodHandler, behavior: UnaryBehavior) -> grpc.RpcMethodHandler:
    """`handler` with its unary behaviour replaced, keeping its (de)serializers: how interceptors wrap."""
    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class UnaryWrappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """An interceptor that wraps each unary method's behaviour once and caches the wrapped
    handler per method: grpc.aio calls `intercept_service` on every call, so a cached method
    skips the rest of the chain and the method lookup. A subclass says how in `wrap`."""

    def __init__(self) -> None:
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    def wrap(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior | None:
        """The behaviour to run for `method` instead of `behavior`; None leaves it as it is."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        # Streaming RPCs keep their own handlers; medledger's APIs are unary.
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = self.wrap(method, handler.unary_unary)
        if behavior is None:
            return handler
        wrapped = with_unary_behavior(handler, behavior)
        self._cache[method] = wrapped
        return wrapped


class ObservabilityInterceptor(UnaryWrappingInterceptor):
    """RED metrics, a server span and error mapping, applied in one wrapper per method.

    They share one pass on purpose: each grpc.aio interceptor adds an awaited layer to every
    call, and these three always go together.
    """

    def wrap(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior | None:
        if method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return None
        return _wrap_unary(method, behavior)


class RequestChecksInterceptor(UnaryWrappingInterceptor):
    """Every unary request through ``check_request`` (no NUL in strings, times in range, ids of
    at most 64 characters) before its handler: INVALID_ARGUMENT naming the field otherwise."""

    def wrap(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior | None:
        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            check_request(request)
            return await behavior(request, context)

        return checked


def _wrap_unary(full_method: str, behavior: UnaryBehavior) -> UnaryBehavior:
    service, method = _split_method(full_method)
    started = RPC_STARTED.labels(service, method)
    seconds = RPC_SECONDS.labels(service, method)
    handled: dict[grpc.StatusCode, Any] = {}

    def count(code: grpc.StatusCode) -> None:
        counter = handled.get(code)
        if counter is None:
            counter = handled[code] = RPC_HANDLED.labels(service, method, code.name)
        counter.inc()

    count_ok = RPC_HANDLED.labels(service, method, grpc.StatusCode.OK.name)
    span_name = full_method.lstrip("/")
    # The provider's own tracer once one is installed (handlers are wrapped after start-up), not
    # the module's proxy, which looks the provider up again on every span.
    method_tracer = trace.get_tracer("medledger.grpc")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}

    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started.inc()
        t0 = time.perf_counter()
        # The caller's trace context when it sent one; else the span starts a new trace.
        parent = _EMPTY_CONTEXT
        metadata = context.invocation_metadata()
        if metadata and any(k == "traceparent" for k, _ in metadata):
            parent = propagate.extract(dict(metadata), context=_EMPTY_CONTEXT)
        span = start_span(method_tracer, span_name, parent, SpanKind.SERVER, attributes)
        # attach/detach rather than trace.use_span: the context manager cost more than the
        # span's bookkeeping here, on every call.
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            try:
                response = await behavior(request, context)
            except MedledgerError as exc:
                code = grpc_code(exc)
                count(code)
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code in _SERVER_FAULTS:
                    span.set_status(Status(StatusCode.ERROR, code.name))
                await context.abort_with_status(status_for(exc))
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                count(code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN)
                raise
            except NotImplementedError:
                # What a generated base servicer raises for an RPC not built yet.
                count(grpc.StatusCode.UNIMPLEMENTED)
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this RPC is not implemented yet")
            except Exception as exc:
                outage = dependency_outage(exc)
                if outage is not None:
                    # The effect did not commit: the client retries with the same request_id.
                    count(grpc.StatusCode.UNAVAILABLE)
                    span.set_status(Status(StatusCode.ERROR, "UNAVAILABLE"))
                    log.warning("%s unavailable in %s", outage, full_method, extra={"error": type(exc).__name__})
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{outage} is unavailable; retry")
                count(grpc.StatusCode.INTERNAL)
                span.set_status(Status(StatusCode.ERROR, "INTERNAL"))
                log.exception("unhandled error in %s", full_method)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            count_ok.inc()
            return response
        finally:
            otel_context.detach(token)
            span.end()
            seconds.observe(time.perf_counter() - t0)

    return wrapper


_SERVER_FAULTS = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNKNOWN}
)


# Codes that are the server's fault, not the caller's: created at zero for every method too, so
# that a healthy service's fault panels and ratios show 0 rather than no data.
_FAULT_CODES = (*_SERVER_FAULTS, grpc.StatusCode.DEADLINE_EXCEEDED)


def init_method_metrics(service_descriptors: Iterable[Any]) -> None:
    """Create every method's counters at zero, so rate() works before the first call."""
    for desc in service_descriptors:
        for m in desc.methods:
            RPC_STARTED.labels(desc.full_name, m.name)
            for code in (grpc.StatusCode.OK, *_FAULT_CODES):
                RPC_HANDLED.labels(desc.full_name, m.name, code.name)


class GrpcServer:
    """A grpc.aio server with health, reflection, interceptors, size limits and TLS."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        max_message_bytes: int,
        service_descriptors: Sequence[Any],
        register: Callable[[grpc.aio.Server], None],
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        tls: TLSFiles | None = None,
        observability: bool = True,
    ) -> None:
        self._host = host
        self._port = port
        self._tls = tls
        self._descriptors = list(service_descriptors)
        chain: list[grpc.aio.ServerInterceptor] = [ObservabilityInterceptor()] if observability else []
        chain.extend(interceptors)
        if observability:
            # Innermost: after authentication, so a caller without a token learns nothing of
            # what the checks refuse; before the handler, so nothing malformed reaches storage.
            chain.append(RequestChecksInterceptor())
        self.server = grpc.aio.server(
            interceptors=chain,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        register(self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [d.full_name for d in self._descriptors]
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        if observability:
            init_method_metrics(self._descriptors)
        self.port = 0

    async def start(self) -> int:
        address = f"{self._host}:{self._port}"
        if self._tls is not None:
            self.port = self.server.add_secure_port(address, self._tls.server_credentials())
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}: the port is taken or not allowed")
        await self.server.start()
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        for d in self._descriptors:
            await self.health.set(d.full_name, status)

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, then stop accepting calls and wait up to `grace` for the rest."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
