"""Seconds since the epoch (floats, as services store them) to and from protobuf's Timestamp and
Duration."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def seconds(value: Timestamp | Duration) -> float:
    return value.ToNanoseconds() / 1e9
