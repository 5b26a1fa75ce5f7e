"""OpenTelemetry tracing and the Prometheus /metrics endpoint."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult, TraceIdRatioBased
from opentelemetry.trace import Link, SpanKind, TraceState, get_current_span
from opentelemetry.util.types import Attributes
from prometheus_client import start_http_server

_provider: TracerProvider | None = None


class ParentBasedRatioSampler(Sampler):
    """The decision of ``ParentBased(TraceIdRatioBased(ratio))``: a span with a parent follows
    the parent's sampled flag, a root span is sampled when its trace id falls under the ratio.

    Written out because the SDK's composition builds two SamplingResult objects and looks up
    the parent twice per span; the consumer starts a span per Kafka message, where that was a
    third of the span's cost. The results here are shared constants.
    """

    _SAMPLE = SamplingResult(Decision.RECORD_AND_SAMPLE)
    _DROP = SamplingResult(Decision.DROP)

    def __init__(self, ratio: float) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError("sampling ratio must be between 0 and 1")
        self.ratio = ratio
        self._bound = TraceIdRatioBased.get_bound_for_rate(ratio)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        parent = get_current_span(parent_context).get_span_context()
        if parent.is_valid:
            sampled = parent.trace_flags.sampled
            if parent.trace_state:
                # Keep the parent's tracestate on the child, as the SDK's ParentBased does.
                return SamplingResult(
                    Decision.RECORD_AND_SAMPLE if sampled else Decision.DROP, None, parent.trace_state
                )
        else:
            sampled = trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < self._bound
        return self._SAMPLE if sampled else self._DROP

    def get_description(self) -> str:
        return f"ParentBasedRatioSampler{{{self.ratio}}}"


def configure_tracing(service: str, sampling_ratio: float, otlp_endpoint: str = "") -> TracerProvider:
    """Install a tracer provider: ratio sampling of new traces, parents decide for children.

    Spans are exported over OTLP/gRPC only when an endpoint is configured.
    """
    global _provider
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"medledger-{service}", "service.namespace": "medledger"}),
        sampler=ParentBasedRatioSampler(sampling_ratio),
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
