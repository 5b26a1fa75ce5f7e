"""JSON logs carry the current trace and span ids."""

import io
import json
import logging

from medledger_devstack.testing import span_exporter
from medledger_runtime.logs import JsonFormatter


def test_log_line_is_json_with_trace_and_span_ids() -> None:
    span_exporter()  # installs a sampling tracer provider for this process
    from opentelemetry import trace

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("identity"))
    log = logging.getLogger("test.logs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with trace.get_tracer("t").start_as_current_span("work") as span:
            log.info("principal registered", extra={"principal_id": "pat_1"})
        log.info("outside a span")
    finally:
        log.removeHandler(handler)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    ctx = span.get_span_context()
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")
    assert inside["service"] == "identity"
    assert inside["principal_id"] == "pat_1"
    assert inside["message"] == "principal registered"
    assert "trace_id" not in outside
