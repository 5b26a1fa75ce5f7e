"""The sampler must decide as ParentBased(TraceIdRatioBased) does; it only does it cheaper."""

from __future__ import annotations

import random

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from medledger_common.telemetry import ParentBasedRatioSampler


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
