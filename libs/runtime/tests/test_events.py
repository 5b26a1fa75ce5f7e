"""The envelope check every consumer runs on each message."""

from __future__ import annotations

import pytest
from medledger.events.v1 import identity_events_pb2

from medledger_runtime import events


def test_a_well_formed_envelope_decodes_to_the_same_event() -> None:
    e = events.new_event(
        source="medledger.test",
        payload=identity_events_pb2.PrincipalRegistered(principal_id="pat_1"),
        aggregate_id="pat_1",
        version=3,
    )
    decoded = events.decode(e.SerializeToString())
    assert decoded == e
    assert events.unpack(decoded, identity_events_pb2.PrincipalRegistered).principal_id == "pat_1"


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (None, "empty message"),
        (b"", "empty message"),
        (b"\x00not a protobuf envelope\xff", "not a protobuf envelope"),
        (events.Event(type="x.Y").SerializeToString(), "envelope has no id"),
        (events.Event(id="e1").SerializeToString(), "envelope type does not match its payload"),
        # The payload's type must be the envelope's, after the type URL's last slash.
        (
            events.Event(
                id="e1", type="medledger.identity.v1.PrincipalRegistered",
                data={"type_url": "type.googleapis.com/medledger.identity.v1.PrincipalDeactivated"},
            ).SerializeToString(),
            "envelope type does not match its payload",
        ),
        (
            events.Event(
                id="e1", type="PrincipalRegistered",
                data={"type_url": "type.googleapis.com/medledger.identity.v1.PrincipalRegistered"},
            ).SerializeToString(),
            "envelope type does not match its payload",
        ),
    ],
)  # fmt: skip
def test_what_is_not_a_valid_envelope_is_refused_with_the_reason(raw: bytes | None, why: str) -> None:
    with pytest.raises(events.MalformedEvent, match=why):
        events.decode(raw)


def test_unpack_refuses_a_payload_of_another_type_as_any_unpack_does() -> None:
    from google.protobuf import any_pb2
    from google.protobuf.message import DecodeError

    e = events.new_event(
        source="medledger.test",
        payload=identity_events_pb2.PrincipalRegistered(principal_id="pat_1"),
        aggregate_id="pat_1",
        version=1,
    )
    with pytest.raises(events.MalformedEvent, match="PrincipalDeactivated"):
        events.unpack(e, identity_events_pb2.PrincipalDeactivated)
    for type_url in ("medledger.identity.v1.PrincipalRegistered", "x/medledger.identity.v1.PrincipalRegistered2"):
        odd = events.Event(id="e1", data=any_pb2.Any(type_url=type_url, value=e.data.value))
        assert not odd.data.Unpack(identity_events_pb2.PrincipalRegistered())  # what Any says
        with pytest.raises(events.MalformedEvent):
            events.unpack(odd, identity_events_pb2.PrincipalRegistered)
    broken = events.Event(id="e1", data=any_pb2.Any(type_url=e.data.type_url, value=b"\xff\xff"))
    with pytest.raises(DecodeError):
        events.unpack(broken, identity_events_pb2.PrincipalRegistered)
