"""The envelope check every consumer runs on each message."""

from __future__ import annotations

import pytest
from medledger.events.v1 import identity_events_pb2

from medledger_common import events


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
