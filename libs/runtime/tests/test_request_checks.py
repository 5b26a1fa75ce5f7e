"""Every request is checked before its handler for what no medledger field may hold: NUL
characters (PostgreSQL cannot store them; such ids ended INTERNAL deep in a query) and times
outside the Timestamp and Duration ranges (converting them raised in the handler), and ids longer
than the 64 characters their columns hold (an insert failed)."""

from __future__ import annotations

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from medledger.audit.v1 import audit_service_pb2 as au_pb
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.records.v1 import records_service_pb2 as rec_pb

from medledger_runtime.errors import InvalidArgument
from medledger_runtime.request_checks import check_request, violations


def fields(request: object) -> list[str]:
    return [v.field for v in violations(request)]  # type: ignore[arg-type]


def test_nul_characters_are_refused_wherever_they_are() -> None:
    assert fields(rec_pb.GetRecordRequest(record_id="rec_1\x00")) == ["record_id"]
    policy = co_pb.BreakGlassPolicy(organization_id="\x00org")
    assert fields(co_pb.SetBreakGlassPolicyRequest(request_id="r", policy=policy)) == ["policy.organization_id"]
    with pytest.raises(InvalidArgument) as refused:
        check_request(rec_pb.GetRecordRequest(record_id="\x00"))
    assert [v.field for v in refused.value.violations] == ["record_id"]


def test_times_out_of_range_are_refused_and_edges_pass() -> None:
    assert fields(au_pb.ListEntriesRequest(time_from=Timestamp(nanos=1_000_000_000))) == ["time_from"]
    assert fields(au_pb.ListEntriesRequest(time_before=Timestamp(seconds=253_402_300_800))) == ["time_before"]
    assert fields(au_pb.ListEntriesRequest(time_from=Timestamp(seconds=-62_135_596_801))) == ["time_from"]
    mixed = co_pb.BreakGlassPolicy(access_duration=Duration(seconds=1, nanos=-1))
    assert fields(co_pb.SetBreakGlassPolicyRequest(policy=mixed)) == ["policy.access_duration"]
    huge = co_pb.BreakGlassPolicy(rate_window=Duration(seconds=315_576_000_001))
    assert fields(co_pb.SetBreakGlassPolicyRequest(policy=huge)) == ["policy.rate_window"]
    edges = au_pb.ListEntriesRequest(
        time_from=Timestamp(seconds=-62_135_596_800), time_before=Timestamp(seconds=253_402_300_799, nanos=999_999_999)
    )
    assert fields(edges) == []
    negative = co_pb.BreakGlassPolicy(access_duration=Duration(seconds=-1, nanos=-999_999_999))
    assert fields(co_pb.SetBreakGlassPolicyRequest(policy=negative)) == []


def test_ordinary_requests_pass_untouched() -> None:
    request = rec_pb.ListRecordsRequest(
        patient_id="pat_1", resource_type="'; DROP TABLE records; --", categories=[1, 2], page_size=-1
    )
    check_request(request)
    check_request(b"raw bytes are not a message")


def test_ids_longer_than_their_columns_are_refused_request_ids_are_left_to_idempotency() -> None:
    hold = rec_pb.PlaceLegalHoldRequest(request_id="r" * 128, patient_id="x" * 65, reason="case")
    assert fields(hold) == ["patient_id"]
    assert fields(rec_pb.PlaceLegalHoldRequest(request_id="r" * 128, patient_id="p" * 64, reason="x" * 500)) == []
