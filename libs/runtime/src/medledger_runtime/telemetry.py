"""OpenTelemetry tracing and the Prometheus /metrics endpoint."""

from __future__ import annotations

from collections.abc import Sequence
from random import getrandbits as _getrandbits

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult, TraceIdRatioBased
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceState, get_current_span
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
                    Decision.RECORD_AND_SAMPLE if sampled else Decision.DROP,
                    attributes if sampled else None,
                    parent.trace_state,
                )
        else:
            sampled = self.samples_new_trace(trace_id)
        if sampled and attributes:
            # The SDK gives a span the attributes of its sampling result, not those it was
            # started with: the sampler must hand them on, as the SDK's samplers do.
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self._SAMPLE if sampled else self._DROP

    def samples_new_trace(self, trace_id: int) -> bool:
        """The decision for a span without a parent: TraceIdRatioBased's."""
        return trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < self._bound

    def get_description(self) -> str:
        return f"ParentBasedRatioSampler{{{self.ratio}}}"


class PresetTraceIds(RandomIdGenerator):
    """Random ids, except that the next trace id can be chosen beforehand (start_span)."""

    def __init__(self) -> None:
        self.next_trace_id = 0

    def generate_trace_id(self) -> int:
        if self.next_trace_id:
            trace_id, self.next_trace_id = self.next_trace_id, 0
            return trace_id
        return super().generate_trace_id()


def start_span(
    tracer: trace.Tracer, name: str, context: Context, kind: SpanKind, attributes: Attributes = None
) -> trace.Span:
    """``tracer.start_span(name, context, kind, attributes)``; a new trace that the sampler drops is made
    here, as the SDK makes it (a non-recording span with fresh random ids), at a fraction of the
    SDK's cost: the consumer starts one per Kafka message, mostly unsampled in production.

    The shortcut draws the trace id and asks the sampler itself; when the sampler keeps the
    trace, the SDK starts the span with that very trace id, so each trace is decided once.
    """
    ids, sampler = _ids, _sampler
    # An empty context (falsy: a Context is a dict) has no parent span.
    if ids is None or sampler is None or (context and get_current_span(context).get_span_context().is_valid):
        return tracer.start_span(name, context, kind, attributes)
    # The ids RandomIdGenerator would draw, drawn here without its two calls per id; zero, which
    # is not a valid id, is drawn again by the generator itself.
    trace_id = _getrandbits(128) or ids.generate_trace_id()
    if sampler.samples_new_trace(trace_id):
        ids.next_trace_id = trace_id
        return tracer.start_span(name, context, kind, attributes)
    return NonRecordingSpan(SpanContext(trace_id, _getrandbits(64) or ids.generate_span_id(), is_remote=False))


_ids: PresetTraceIds | None = None
_sampler: ParentBasedRatioSampler | None = None


def configure_tracing(service: str, sampling_ratio: float, otlp_endpoint: str = "") -> TracerProvider:
    """Install a tracer provider: ratio sampling of new traces, parents decide for children.

    Spans are exported over OTLP/gRPC only when an endpoint is configured.
    """
    global _provider, _ids, _sampler
    ids, sampler = PresetTraceIds(), ParentBasedRatioSampler(sampling_ratio)
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"medledger-{service}", "service.namespace": "medledger"}),
        sampler=sampler,
        id_generator=ids,
    )
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    if _provider is None:
        trace.set_tracer_provider(provider)
        _provider, _ids, _sampler = provider, ids, sampler
    return _provider


def start_metrics_server(host: str, port: int) -> int:
    """Serve the default Prometheus registry at http://host:port/metrics; returns the port."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_address[1])
