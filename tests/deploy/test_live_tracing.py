"""One trace covers a gRPC put, its Kafka event and the audit entry it produced.

The local stack (`medledger up`'s Stack: each service its own process, on free ports, SQLite)
exports its spans over OTLP/gRPC (MEDLEDGER_OTLP_ENDPOINT, sampling 1.0) to a trace receiver in
this test (opentelemetry-proto's TraceService on grpc.aio). A practitioner with consent puts one
record; then, under the trace id of records' server span for that PutRecord, there must be the
spans of the `record.stored` event's consumers, audit's among them, each naming the event (its id
and topic) and each a child of a span of that trace, and the event must be the audit entry of the
record's commitment.

The outbox relay publishes in the background, outside the request; the event carries the
request's `traceparent` (stored with the outbox row, sent as a Kafka header), so the consumers'
spans join the request's trace. No producer span is made: the event shows in the trace as the
consumers' `<topic> process` spans with `messaging.message.id`.

About 25 s.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from deploylib import ROOT
from medledger.audit.v1 import audit_service_pb2 as audit_pb
from medledger.records.v1 import records_service_pb2 as records_pb
from medledger.types.v1 import vocabulary_pb2 as vocab
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from medledger_devstack.cli.demo import free_ports
from medledger_devstack.cli.state import StateDir
from medledger_devstack.demo.fhir import blood_pressure
from medledger_devstack.stack.supervisor import Stack
from medledger_runtime.events import TOPICS
from medledger_sdk.calls import RpcError

sys.path.insert(0, str(ROOT / "bench"))
from load import Load, StackInfo  # bench/load.py: its set-up makes a hospital, a doctor with consent

SERVER, CONSUMER = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CONSUMER
PUT_SPAN = "medledger.records.v1.RecordsService/PutRecord"
RECORDS_TOPIC = TOPICS["records"]
AUDIT_LOG_GROUP = "audit.log"
SPANS_WITHIN = 15.0  # the SDK's BatchSpanProcessor exports every 5 s


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps every span with its service's name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, trace_pb2.Span]] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = attributes(resource_spans.resource.attributes).get("service.name", "")
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((str(service), span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def attributes(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, int]]:
    server = grpc.aio.server()
    collector = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield collector, port
    finally:
        await server.stop(0)


async def test_one_trace_covers_a_put_its_event_and_its_audit_entry(
    receiver: tuple[Receiver, int], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    collector, port = receiver
    # The Stack's services inherit this process's environment.
    monkeypatch.setenv("MEDLEDGER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MEDLEDGER_TRACE_SAMPLING_RATIO", "1.0")
    state = StateDir.at(tmp_path / "state")
    state.create()
    stack = Stack(state, free_ports())
    load: Load | None = None
    found_trace: tuple[bytes, list[tuple[str, trace_pb2.Span]]] | None = None
    try:
        # In a thread: Stack.start runs event loops of its own.
        await asyncio.to_thread(stack.start, 120)
        load = Load(StackInfo.read(state.path), patients=1, seed=1)
        await load.setup()
        patient_id = load.patients[0][0]
        reply = await load.doctor_a.records.PutRecord(
            records_pb.PutRecordRequest(
                request_id=str(uuid.uuid4()),
                patient_id=patient_id,
                category=vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS,
                content=blood_pressure(patient_id),
                media_type="application/fhir+json",
            )
        )
        commitment = reply.receipt.commitment

        # The audit entry the put produced, and the event it is.
        deadline = time.monotonic() + SPANS_WITHIN
        while True:
            try:
                found = await load.doctor_a.audit.FindCommitment(audit_pb.FindCommitmentRequest(commitment=commitment))
                break
            except RpcError as exc:  # NOT_FOUND until audit has appended it
                if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        entry = json.loads(found.entry.entry)
        event_id = entry["event_id"]

        def trace_of_the_put() -> tuple[bytes, list[tuple[str, trace_pb2.Span]]] | None:
            puts = [s for svc, s in collector.spans if svc == "medledger-records" and s.name == PUT_SPAN]
            if len(puts) != 1:
                return None
            trace_id = puts[0].trace_id
            return trace_id, [(svc, s) for svc, s in collector.spans if s.trace_id == trace_id]

        def audit_span(spans: list[tuple[str, trace_pb2.Span]]) -> trace_pb2.Span | None:
            for service, span in spans:
                a = attributes(span.attributes)
                if (
                    service == "medledger-audit"
                    and span.kind == CONSUMER
                    and a.get("messaging.consumer.group.name") == AUDIT_LOG_GROUP
                    and a.get("messaging.message.id") == event_id
                ):
                    return span
            return None

        deadline = time.monotonic() + SPANS_WITHIN
        while True:
            found_trace = trace_of_the_put()
            if found_trace is not None and audit_span(found_trace[1]) is not None:
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    finally:
        if load is not None:
            await load.close()
        await asyncio.to_thread(stack.stop_all)

    assert found_trace is not None, "records exported no single PutRecord server span: " + ", ".join(
        sorted({f"{svc}: {s.name}" for svc, s in collector.spans})
    )
    _, spans = found_trace
    in_trace = sorted(f"{svc}: {s.name}" for svc, s in spans)
    put = next(s for svc, s in spans if s.name == PUT_SPAN)
    assert put.kind == SERVER
    assert attributes(put.attributes)["rpc.method"] == "PutRecord"
    ids = {s.span_id for _, s in spans}

    # The event: every consumer of the records topic that handled it did so in this trace, in a
    # span that names the message and descends from the put's.
    consumers = [
        (svc, s)
        for svc, s in spans
        if s.kind == CONSUMER and attributes(s.attributes).get("messaging.message.id") == event_id
    ]
    assert consumers, f"no consumer span of event {event_id} in the put's trace: {in_trace}"
    for service, span in consumers:
        a = attributes(span.attributes)
        assert span.name == f"{RECORDS_TOPIC} process", (service, span.name)
        assert a["messaging.system"] == "kafka" and a["messaging.destination.name"] == RECORDS_TOPIC
        assert span.parent_span_id in ids, f"{service}: {span.name} hangs from no span of the trace"
        assert _descends(span, put, spans), f"{service}: {span.name} is not under the put's span"

    # The audit entry: audit's log consumer appended that very event, in this trace.
    appended = audit_span(spans)
    assert appended is not None, f"audit's span for event {event_id} is not in the put's trace: {in_trace}"
    assert entry["type"] == "record.stored", entry
    assert _descends(appended, put, spans), "audit's span is not under the put's span"
    assert attributes(appended.attributes)["messaging.destination.name"] == RECORDS_TOPIC


def _descends(span: trace_pb2.Span, ancestor: trace_pb2.Span, spans: list[tuple[str, trace_pb2.Span]]) -> bool:
    """`span` is a child of `ancestor`, or of a child of it, and so on."""
    by_id = {s.span_id: s for _, s in spans}
    parent = by_id.get(span.parent_span_id)
    while parent is not None:
        if parent.span_id == ancestor.span_id:
            return True
        parent = by_id.get(parent.parent_span_id)
    return False
