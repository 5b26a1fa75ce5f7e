"""The sampler must decide as ParentBased(TraceIdRatioBased) does; it only does it cheaper."""

from __future__ import annotations

import random

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from medledger_runtime.telemetry import ParentBasedRatioSampler


def _parent(sampled: bool, state: TraceState | None = None) -> Context:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    span_context = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=flags, trace_state=state)
    return trace.set_span_in_context(NonRecordingSpan(span_context), Context())


def test_decisions_match_the_sdk_composition() -> None:
    rng = random.Random(7)
    contexts = [None, Context(), _parent(True), _parent(False), _parent(True, TraceState([("vendor", "x")]))]
    for ratio in (0.0, 0.01, 0.5, 1.0):
        ours, sdk = ParentBasedRatioSampler(ratio), ParentBased(TraceIdRatioBased(ratio))
        for _ in range(400):
            trace_id = rng.getrandbits(128)
            for ctx in contexts:
                a = ours.should_sample(ctx, trace_id, "span")
                b = sdk.should_sample(ctx, trace_id, "span")
                assert a.decision == b.decision, (ratio, ctx)
                assert (a.trace_state or TraceState()) == (b.trace_state or TraceState())


def test_a_ratio_outside_zero_to_one_is_refused() -> None:
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            ParentBasedRatioSampler(bad)


def test_start_span_decides_each_new_trace_once_as_the_sdk_would() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanKind

    from medledger_runtime import telemetry

    for ratio in (0.0, 0.3, 1.0):
        ids, sampler = telemetry.PresetTraceIds(), ParentBasedRatioSampler(ratio)
        tracer = TracerProvider(sampler=sampler, id_generator=ids).get_tracer("t")
        saved = telemetry._ids, telemetry._sampler
        telemetry._ids, telemetry._sampler = ids, sampler
        try:
            spans = [telemetry.start_span(tracer, "m", Context(), SpanKind.CONSUMER) for _ in range(2000)]
            child = telemetry.start_span(tracer, "c", _parent(True), SpanKind.CONSUMER)
        finally:
            telemetry._ids, telemetry._sampler = saved
        recorded = [s for s in spans if s.is_recording()]
        for s in spans:
            ctx = s.get_span_context()
            assert ctx.is_valid and not ctx.is_remote
            # Sampled exactly when the trace id falls under the ratio, like TraceIdRatioBased.
            under = ctx.trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < TraceIdRatioBased.get_bound_for_rate(ratio)
            assert s.is_recording() == under == ctx.trace_flags.sampled
        assert len({s.get_span_context().trace_id for s in spans}) == len(spans)
        assert abs(len(recorded) / len(spans) - ratio) < 0.05
        # A message with a sampled parent continues its trace.
        assert child.is_recording() and child.get_span_context().trace_id == 0x1234


def test_a_sampled_span_keeps_the_attributes_it_was_started_with() -> None:
    # The SDK gives a span the attributes of the sampler's result (gRPC server spans are
    # started with rpc.system, rpc.service and rpc.method).
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanKind

    attributes = {"rpc.system": "grpc", "rpc.method": "Get"}
    tracer = TracerProvider(sampler=ParentBasedRatioSampler(1.0)).get_tracer("t")
    for ctx in (Context(), _parent(True), _parent(True, TraceState([("v", "x")]))):
        span = tracer.start_span("s", ctx, SpanKind.SERVER, attributes)
        assert span.is_recording()
        assert dict(span.attributes or {}) == attributes  # type: ignore[attr-defined]
    dropped = tracer.start_span("s", _parent(False), SpanKind.SERVER, attributes)
    assert not dropped.is_recording()
