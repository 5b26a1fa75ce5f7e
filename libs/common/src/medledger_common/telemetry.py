"""OpenTelemetry tracing and the Prometheus /metrics endpoint."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from prometheus_client import start_http_server

_provider: TracerProvider | None = None


def configure_tracing(service: str, sampling_ratio: float, otlp_endpoint: str = "") -> TracerProvider:
    """Install a tracer provider: ratio sampling of new traces, parents decide for children.

    Spans are exported over OTLP/gRPC only when an endpoint is configured.
    """
    global _provider
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"medledger-{service}", "service.namespace": "medledger"}),
        sampler=ParentBased(TraceIdRatioBased(sampling_ratio)),
    )
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    if _provider is None:
        trace.set_tracer_provider(provider)
        _provider = provider
    return _provider


def start_metrics_server(host: str, port: int) -> int:
    """Serve the default Prometheus registry at http://host:port/metrics; returns the port."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_address[1])
