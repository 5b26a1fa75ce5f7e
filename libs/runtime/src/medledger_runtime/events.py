"""The event envelope (medledger.events.v1.Event) and the topic names.

Every topic carries the same protobuf envelope with CloudEvents attributes; the payload is a
typed message packed in ``data``. Events carry ids only, never personal data.
"""

from __future__ import annotations

import time as _time
import uuid
from datetime import datetime

from google.protobuf import message as pb_message
from google.protobuf.message import DecodeError
from medledger.events.v1 import envelope_pb2

Event = envelope_pb2.Event

SERVICES = ("identity", "consent", "records", "audit", "anchoring")
# Components with a principal of their own but no topic: the stateless FHIR gateway.
STATELESS_COMPONENTS = ("fhir",)
TOPICS = {name: f"medledger.{name}.v1" for name in SERVICES}
# Consent decisions, one per record access, apart from consent's own changes: the consumers of
# changes (every consent replica) need not read through the decisions.
TOPICS["consent.decisions"] = "medledger.consent.decisions.v1"
# What a person must be told (e.g. a patient, of a break-glass access to their data), for
# whatever delivers notifications.
TOPICS["notifications"] = "medledger.notifications.v1"
# Service topics, never their dead-letter topics.
SERVICE_TOPIC_PATTERN = r"^medledger\.[a-z]+(\.[a-z]+)?\.v[0-9]+$"
CONTENT_TYPE = "application/cloudevents+protobuf"


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


class MalformedEvent(ValueError):
    """A Kafka message that is not a valid envelope."""


def new_event(
    *,
    source: str,
    payload: pb_message.Message,
    aggregate_id: str,
    version: int,
    subject: str = "",
    time: datetime | None = None,
    event_id: str | None = None,
) -> Event:
    event = Event(
        id=event_id or str(uuid.uuid4()),
        source=source,
        type=payload.DESCRIPTOR.full_name,
        subject=subject,
        aggregate_id=aggregate_id,
        version=version,
    )
    if time is None:
        event.time.FromNanoseconds(_time.time_ns())  # FromDatetime costs several times more
    else:
        event.time.FromDatetime(time)
    event.data.Pack(payload)
    return event


def decode(raw: bytes | None) -> Event:
    """Parse and check an envelope; raises MalformedEvent naming what is wrong."""
    if not raw:
        raise MalformedEvent("empty message")
    try:
        # FromString: half the cost of Event() and ParseFromString, once per consumed message.
        event = Event.FromString(raw)
    except DecodeError:
        raise MalformedEvent("not a protobuf envelope") from None
    if not event.id:
        raise MalformedEvent("envelope has no id")
    type_ = event.type
    if not type_ or not event.data.type_url.endswith("/" + type_):
        raise MalformedEvent("envelope type does not match its payload")
    return event


def unpack(event: Event, cls: type[pb_message.Message]) -> pb_message.Message:
    """The event's payload as a `cls`; MalformedEvent if it is another type (DecodeError if its
    bytes are not one).

    Any.Unpack's own check and parse, written out: Unpack looks the type name up anew on every
    call, which cost more than parsing the payload (the audit log unpacks every event).
    """
    data = event.data
    type_url = data.type_url
    if "/" not in type_url or type_url[type_url.rindex("/") + 1 :] != cls.DESCRIPTOR.full_name:
        raise MalformedEvent(f"payload is not {cls.DESCRIPTOR.full_name}")
    return cls.FromString(data.value)
