"""The event types the log knows, read from the event messages themselves, without I/O.

An event message says how the log records it with the options of
protos/medledger/options/v1/options.proto: `audit_entry` (its entry type and FHIR AuditEvent
coding) on the message, `actor` on the fields naming principals who took part and
`personal_data` on the fields naming the patient. Audit names no event type: at import it reads
every message of the generated `medledger.events.v1` modules, and an event of a type it has not
read yet is looked up in the descriptor pool (so a message compiled into the process any other
way is known too). A message without `audit_entry` is not an event the log knows: its events are
`unprocessable` entries.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass

import medledger.events.v1
from google.protobuf import descriptor_pool, message_factory
from google.protobuf import message as pb_message
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from medledger.options.v1 import options_pb2

__all__ = [
    "AuditEventCoding",
    "EventType",
    "PersonalFields",
    "by_entry_type",
    "by_event_type",
    "known",
    "personal_fields",
]

# The entry types of the log's own entries, which no event may take.
RESERVED_ENTRY_TYPES = frozenset({"unprocessable", "entry.redacted"})
_ACTIONS = frozenset({"C", "R", "U", "D", "E"})
# AuditEvent.outcome codes (FHIR R4); empty is success.
_OUTCOMES = frozenset({"", "0", "4", "8", "12"})


@dataclass(frozen=True)
class AuditEventCoding:
    """How an entry of the type is exported as a FHIR R4 AuditEvent."""

    type_code: str
    type_display: str
    action: str
    outcome: str  # "0" when the message left it empty


@dataclass(frozen=True)
class PersonalFields:
    """The fields of a message type that name the patient, and its message fields that hold such
    fields in turn (singular ones: lists are not looked into)."""

    patient_ids: tuple[str, ...]
    # Named only when they name a patient (`pat_…`): other principals' ids stay.
    principal_ids: tuple[str, ...]
    nested: tuple[tuple[str, Descriptor], ...]

    def __bool__(self) -> bool:
        return bool(self.patient_ids or self.principal_ids or self.nested)


@dataclass(frozen=True)
class EventType:
    """What the log knows of one event message type."""

    full_name: str
    entry_type: str
    message_class: type[pb_message.Message]
    audit_event: AuditEventCoding
    # The fields naming the AuditEvent's agent, in order of preference: who did it, then the
    # principal acted upon.
    agent_fields: tuple[str, ...]
    # The fields the log finds an entry by as its actor, in order of preference: who did it, then
    # the grantee.
    actor_fields: tuple[str, ...]
    # The fields naming the patient for whom the actor acted (a guardian's patient): the
    # AuditEvent agent's onBehalfOf (extension). In an entry they read "@subject", as the patient's id does
    # wherever it stands.
    on_behalf_of_fields: tuple[str, ...]
    # Its fields naming the patient (`personal_fields` of its message), kept here because every
    # event drafted needs them.
    personal: PersonalFields


_BY_EVENT: dict[str, EventType] = {}
_BY_ENTRY: dict[str, EventType] = {}


def by_event_type(full_name: str) -> EventType | None:
    """The event type of a payload's full protobuf name; None if no message of that name carries
    `audit_entry`."""
    known_type = _BY_EVENT.get(full_name)
    if known_type is not None:
        return known_type
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(full_name)
    except KeyError:
        return None
    return _register(descriptor)


def by_entry_type(entry_type: str) -> EventType | None:
    """The event type whose entries have this `type`; None for the log's own entry types and
    types it does not know."""
    return _BY_ENTRY.get(entry_type)


def known() -> list[EventType]:
    """Every event type known so far, by entry type."""
    return sorted(_BY_ENTRY.values(), key=lambda t: t.entry_type)


@functools.cache
def personal_fields(descriptor: Descriptor) -> PersonalFields:
    """The `personal_data` fields of a message type, and where among its messages there are more."""
    return _personal_fields(descriptor, frozenset())


def _personal_fields(descriptor: Descriptor, outer: frozenset[str]) -> PersonalFields:
    patient_ids: list[str] = []
    principal_ids: list[str] = []
    nested: list[tuple[str, Descriptor]] = []
    for f in descriptor.fields:
        kind = f.GetOptions().Extensions[options_pb2.personal_data]
        if kind == options_pb2.PERSONAL_DATA_PATIENT_ID:
            patient_ids.append(f.name)
        elif kind == options_pb2.PERSONAL_DATA_PRINCIPAL_ID:
            principal_ids.append(f.name)
        inner = f.message_type
        if (
            f.type == FieldDescriptor.TYPE_MESSAGE
            and not f.is_repeated
            and inner is not None
            and inner.full_name not in outer  # a message type holding itself: looked at once
            and _personal_fields(inner, outer | {descriptor.full_name})
        ):
            nested.append((f.name, inner))
    return PersonalFields(tuple(patient_ids), tuple(principal_ids), tuple(nested))


def _register(descriptor: Descriptor) -> EventType | None:
    options = descriptor.GetOptions()
    if not options.HasExtension(options_pb2.audit_entry):
        return None
    declared = options.Extensions[options_pb2.audit_entry]
    coding = declared.audit_event
    where = f"{descriptor.full_name} (option medledger.options.v1.audit_entry)"
    if not declared.type or declared.type in RESERVED_ENTRY_TYPES:
        raise ValueError(f"{where}: an entry type is required, and not one of {sorted(RESERVED_ENTRY_TYPES)}")
    if coding.action not in _ACTIONS or coding.outcome not in _OUTCOMES or not coding.type_code:
        raise ValueError(f"{where}: audit_event needs a type_code, an action in CRUDE and an outcome of 0, 4, 8 or 12")
    other = _BY_ENTRY.get(declared.type)
    if other is not None and other.full_name != descriptor.full_name:
        raise ValueError(f"{where}: entry type {declared.type!r} is already {other.full_name}'s")
    roles: dict[int, list[str]] = {}
    for f in descriptor.fields:
        roles.setdefault(f.GetOptions().Extensions[options_pb2.actor], []).append(f.name)
    acting = roles.get(options_pb2.ACTOR_ACTING, [])
    event_type = EventType(
        full_name=descriptor.full_name,
        entry_type=declared.type,
        message_class=message_factory.GetMessageClass(descriptor),
        audit_event=AuditEventCoding(coding.type_code, coding.type_display, coding.action, coding.outcome or "0"),
        agent_fields=(*acting, *roles.get(options_pb2.ACTOR_ACTED_UPON, [])),
        actor_fields=(*acting, *roles.get(options_pb2.ACTOR_GRANTEE, [])),
        on_behalf_of_fields=tuple(roles.get(options_pb2.ACTOR_ON_BEHALF_OF, [])),
        personal=personal_fields(descriptor),
    )
    _BY_EVENT[event_type.full_name] = event_type
    _BY_ENTRY[event_type.entry_type] = event_type
    return event_type


def _read_events_package() -> None:
    """Every message of the generated modules of `medledger.events.v1` (make setup writes them)."""
    package = medledger.events.v1
    for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        for descriptor in module.DESCRIPTOR.message_types_by_name.values():
            _register(descriptor)


_read_events_package()
