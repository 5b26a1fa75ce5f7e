"""Disclosures of personal data by RPCs: every answer carrying personal data leaves a durable
PersonalDataDisclosed event first, and a refused call leaves none.

What is personal data is read from the protos, not listed here: a response field marked
`personal_data: PERSONAL_DATA_CONTENT` (options.proto) carries it, and a call whose answer has such
a field non-empty is a disclosure. The patient it concerns is named by the fields marked
PERSONAL_DATA_PATIENT_ID (or PERSONAL_DATA_PRINCIPAL_ID holding a `pat_` id) of the response or
the request; the event names the caller (the actor), that patient (the audit entry's subject, so
the patient's own entries show who saw their data), the RPC and the ids the request asked for.

The runtime wraps every such RPC of a service (``DisclosureInterceptor``, innermost after
authentication): the handler has authorized and answered, and only then the event is written
through a group commit (reads under load share commits) and the answer sent. A service whose use
case writes its own disclosure event (records' RecordDisclosed) names the RPC in
``ServiceParts.discloses_itself``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from medledger.events.v1.disclosure_events_pb2 import PersonalDataDisclosed
from medledger.options.v1 import options_pb2

from medledger_runtime.auth.callers import acting_for, current_caller
from medledger_runtime.events import new_event
from medledger_runtime.group_commit import OutboxGroupCommit
from medledger_runtime.grpc_server import UnaryBehavior, UnaryWrappingInterceptor

PATIENT_PREFIX = "pat_"
_CONTENT = options_pb2.PERSONAL_DATA_CONTENT
_PATIENT = options_pb2.PERSONAL_DATA_PATIENT_ID
_PRINCIPAL = options_pb2.PERSONAL_DATA_PRINCIPAL_ID


def _mark(field: FieldDescriptor) -> int:
    return int(field.GetOptions().Extensions[options_pb2.personal_data])


@functools.cache
def carries_content(descriptor: Descriptor) -> bool:
    """Whether a message type has a field marked PERSONAL_DATA_CONTENT, itself or in a message it holds."""
    return _carries(descriptor, frozenset())


def _carries(descriptor: Descriptor, outer: frozenset[str]) -> bool:
    for f in descriptor.fields:
        if _mark(f) == _CONTENT:
            return True
        inner = f.message_type
        if inner is not None and inner.full_name not in outer and _carries(inner, outer | {descriptor.full_name}):
            return True
    return False


def disclosing_methods(service_descriptors: Iterable[Any]) -> dict[str, Descriptor]:
    """Every RPC (`/package.Service/Method`) whose response type carries personal data, with that type."""
    return {
        f"/{service.full_name}/{method.name}": method.output_type
        for service in service_descriptors
        for method in service.methods
        if carries_content(method.output_type)
    }


def discloses(message: Message) -> bool:
    """Whether `message` holds personal data: a PERSONAL_DATA_CONTENT field set (non-empty), in it
    or in a message it holds."""
    for f, value in message.ListFields():
        if _mark(f) == _CONTENT:
            return True
        if f.message_type is not None:
            values = value if f.is_repeated else [value]
            if any(discloses(v) for v in values):
                return True
    return False


def patients_named(message: Message) -> list[str]:
    """The patient ids `message` names in fields marked as naming a patient (lists included),
    each once, in order."""
    found: dict[str, None] = {}
    _collect_patients(message, found)
    return list(found)


def _collect_patients(message: Message, found: dict[str, None]) -> None:
    for f, value in message.ListFields():
        mark = _mark(f)
        if f.message_type is not None:
            for v in value if f.is_repeated else [value]:
                _collect_patients(v, found)
        elif mark in (_PATIENT, _PRINCIPAL) and f.type == FieldDescriptor.TYPE_STRING:
            for v in value if f.is_repeated else [value]:
                if v and (mark == _PATIENT or v.startswith(PATIENT_PREFIX)):
                    found[v] = None


def resources_asked(request: Message) -> list[str]:
    """The ids a request asked for (its `*_id` string fields), never a patient's: the log keeps a
    patient id only as an entry's subject."""
    ids = []
    for f, value in request.ListFields():
        if (
            f.type == FieldDescriptor.TYPE_STRING
            and not f.is_repeated
            and f.name.endswith("_id")
            and f.name != "request_id"
            and _mark(f) == 0
            and not value.startswith(PATIENT_PREFIX)
        ):
            ids.append(value)
    return ids


def disclosure_events(
    *, source: str, method: str, actor_id: str, request: Message, response: Message, guardian_of: str = ""
) -> list[tuple[str, Any]]:
    """The events a disclosure writes, with their Kafka keys: one per patient named by the answer
    (or, when it names none, the request; or, when neither does, the caller if a patient: a
    patient asking without naming anyone reads their own), or one naming no patient. A read
    for `guardian_of` (the patient the caller acted for as guardian) says so."""
    caller_patient = [actor_id] if actor_id.startswith(PATIENT_PREFIX) else []
    patients = patients_named(response) or patients_named(request) or caller_patient or [""]
    resources = resources_asked(request)
    out = []
    for patient_id in patients:
        payload = PersonalDataDisclosed(
            actor_id=actor_id,
            patient_id=patient_id,
            method=method,
            resource_ids=resources,
            on_behalf_of=patient_id if guardian_of and guardian_of == patient_id else "",
        )
        event = new_event(source=source, payload=payload, aggregate_id=actor_id, version=0, subject=patient_id)
        out.append((patient_id, event))
    return out


class DisclosureInterceptor(UnaryWrappingInterceptor):
    """Around each RPC that may answer with personal data: once the handler answered (so it
    authorized), the disclosure is written durably, then the answer goes out. A handler that
    refuses raises, and nothing is written; an answer without personal data (a resource not
    asked for, an empty list) is no disclosure."""

    def __init__(self, commit: OutboxGroupCommit, *, source: str, topic: str, methods: Sequence[str]) -> None:
        super().__init__()
        self.commit = commit
        self.source = source
        self.topic = topic
        self.methods = frozenset(methods)

    def wrap(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior | None:
        if method not in self.methods:
            return None

        async def disclosing(request: Any, context: grpc.aio.ServicerContext) -> Any:
            response = await behavior(request, context)
            if discloses(response):
                await self.record(method, request, response)
            return response

        return disclosing

    async def record(self, method: str, request: Message, response: Message) -> None:
        actor_id = current_caller().principal_id
        events = disclosure_events(
            source=self.source,
            method=method,
            actor_id=actor_id,
            request=request,
            response=response,
            guardian_of=acting_for.get(),
        )
        await asyncio.gather(
            *(self.commit.write(self.topic, event, patient_id.encode() or None) for patient_id, event in events)
        )
