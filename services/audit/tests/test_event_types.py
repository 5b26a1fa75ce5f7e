"""Event types describe themselves: what audit reads from the event messages' options is, for
every event type, exactly what its hand-written tables said (entry types, FHIR codings, actor
fields and patient fields are hashed into the log's entries: they never change); and an event type
audit's code has never named, declared only in a message's options, becomes an entry with its
entry type, actor and subject."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf import message as pb_message
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from medledger.options.v1 import options_pb2

from medledger_audit import columns, entries, event_types, fhir_audit
from medledger_audit.sequencer import lookup_columns
from medledger_runtime.events import new_event

PATIENT = "pat_" + "3" * 32
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)

# The tables audit had by hand before the events described themselves, verbatim.
# entries._KNOWN: entry type -> payload message.
OLD_KNOWN = {
    "principal.registered": "medledger.events.v1.PrincipalRegistered",
    "principal.updated": "medledger.events.v1.PrincipalUpdated",
    "principal.deactivated": "medledger.events.v1.PrincipalDeactivated",
    "principal.role_changed": "medledger.events.v1.PrincipalRoleChanged",
    "identity.signing_key_rotated": "medledger.events.v1.SigningKeyRotated",
    "consent.version_recorded": "medledger.events.v1.ConsentVersionRecorded",
    "consent.decision": "medledger.events.v1.ConsentDecisionRecorded",
    "consent.guardianship_changed": "medledger.events.v1.GuardianshipChanged",
    "break_glass.started": "medledger.events.v1.BreakGlassAccessStarted",
    "break_glass.reviewed": "medledger.events.v1.BreakGlassAccessReviewed",
    "break_glass.policy_changed": "medledger.events.v1.BreakGlassPolicyChanged",
    "record.stored": "medledger.events.v1.RecordStored",
    "record.disclosed": "medledger.events.v1.RecordDisclosed",
    "record.access_denied": "medledger.events.v1.RecordAccessDenied",
    "records.listed": "medledger.events.v1.RecordsListed",
    "erasure.requested": "medledger.events.v1.ErasureRequested",
    "erasure.cancelled": "medledger.events.v1.ErasureCancelled",
    "legal_hold.changed": "medledger.events.v1.LegalHoldChanged",
    "erasure.completed": "medledger.events.v1.PatientRecordsErased",
    "erasure.keys_requested": "medledger.events.v1.PatientKeysErasureRequested",
    "erasure.keys_destroyed": "medledger.events.v1.PatientKeysDestroyed",
    "notification.requested": "medledger.events.v1.NotificationRequested",
    "consent.commitment_on_chain": "medledger.events.v1.ConsentCommitmentRecorded",
    # Shipped after the tables: written out here so that its options never change either.
    "personal_data.disclosed": "medledger.events.v1.PersonalDataDisclosed",
}
# fhir_audit: DICOM types, `_KINDS` (entry type -> (DICOM type, action)), its default for a type
# not in `_KINDS`, the outcome rule and `_ACTOR_FIELDS`.
_PATIENT_RECORD = ("110110", "Patient Record")
_QUERY = ("110112", "Query")
_SECURITY_ALERT = ("110113", "Security Alert")
_USER_SECURITY = ("110114", "User Authentication")
_EMERGENCY_STARTED = ("110127", "Emergency Override Started")
_EMERGENCY_STOPPED = ("110128", "Emergency Override Stopped")
_APPLICATION_ACTIVITY = ("110100", "Application Activity")
OLD_FHIR_KINDS = {
    "record.stored": (_PATIENT_RECORD, "C"),
    "record.disclosed": (_PATIENT_RECORD, "R"),
    "record.access_denied": (_PATIENT_RECORD, "R"),
    "records.listed": (_QUERY, "R"),
    "personal_data.disclosed": (_PATIENT_RECORD, "R"),
    "erasure.requested": (_PATIENT_RECORD, "E"),
    "erasure.cancelled": (_PATIENT_RECORD, "E"),
    "erasure.completed": (_PATIENT_RECORD, "D"),
    "erasure.keys_requested": (_PATIENT_RECORD, "E"),
    "erasure.keys_destroyed": (_PATIENT_RECORD, "D"),
    "legal_hold.changed": (_PATIENT_RECORD, "U"),
    "consent.version_recorded": (_PATIENT_RECORD, "U"),
    "consent.decision": (_QUERY, "E"),
    "consent.guardianship_changed": (_USER_SECURITY, "U"),
    "break_glass.started": (_EMERGENCY_STARTED, "E"),
    "break_glass.reviewed": (_EMERGENCY_STOPPED, "E"),
    "break_glass.policy_changed": (_APPLICATION_ACTIVITY, "U"),
    "principal.registered": (_USER_SECURITY, "C"),
    "principal.updated": (_USER_SECURITY, "U"),
    "principal.deactivated": (_USER_SECURITY, "U"),
    "principal.role_changed": (_USER_SECURITY, "U"),
    "identity.signing_key_rotated": (_APPLICATION_ACTIVITY, "U"),
    "notification.requested": (_APPLICATION_ACTIVITY, "E"),
    "unprocessable": (_SECURITY_ALERT, "E"),
    "entry.redacted": (_APPLICATION_ACTIVITY, "D"),
}
OLD_FHIR_DEFAULT = (_APPLICATION_ACTIVITY, "E")


def old_outcome(entry_type: str) -> str:
    return "4" if entry_type == "record.access_denied" else "0"


OLD_FHIR_ACTOR_FIELDS = (
    "actor_id",
    "written_by",
    "practitioner_id",
    "requested_by",
    "reviewed_by",
    "changed_by",
    "cancelled_by",
    "principal_id",
    "redacted_by",
)
# sequencer._ACTOR_FIELDS (the actor an entry is found by).
OLD_LOOKUP_ACTOR_FIELDS = (
    "actor_id",
    "written_by",
    "practitioner_id",
    "requested_by",
    "reviewed_by",
    "changed_by",
    "cancelled_by",
    "grantee_id",
)
# entries._PATIENT_FIELDS: `patient_id` always names the patient; the others when they hold a
# patient's id (`pat_…`).
OLD_PATIENT_FIELDS = ("patient_id", "principal_id", "recipient_id")


def old_take_patient(fields: dict[str, Any]) -> str | None:
    """entries._take_patient as it was, by field name in every message."""
    found: str | None = None
    for name in OLD_PATIENT_FIELDS:
        value = fields.get(name)
        if isinstance(value, str) and value and (name == "patient_id" or value.startswith("pat_")):
            found = found or value
            del fields[name]
    for value in fields.values():
        if isinstance(value, dict):
            nested = old_take_patient(value)
            found = found or nested
    return found


def old_actor(fields: dict[str, Any], names: tuple[str, ...]) -> Any:
    return next((fields[f] for f in names if isinstance(fields.get(f), str) and fields[f]), None)


def test_the_event_types_read_from_the_messages_are_exactly_the_old_ones() -> None:
    derived = {t.entry_type: t.full_name for t in event_types.known()}
    assert derived == OLD_KNOWN
    assert {k: v[0] for k, v in entries.ENTRY_TYPES.items()} == {v: k for k, v in OLD_KNOWN.items()}
    for entry_type, full_name in OLD_KNOWN.items():
        known = event_types.by_event_type(full_name)
        assert known is not None and known.entry_type == entry_type
        assert known.message_class.DESCRIPTOR.full_name == full_name
        assert event_types.by_entry_type(entry_type) is known


@pytest.mark.parametrize("entry_type", sorted(OLD_KNOWN))
def test_each_event_types_fhir_coding_and_actor_fields_are_the_old_ones(entry_type: str) -> None:
    known = event_types.by_entry_type(entry_type)
    assert known is not None
    (code, display), action = OLD_FHIR_KINDS.get(entry_type, OLD_FHIR_DEFAULT)
    assert known.audit_event == event_types.AuditEventCoding(code, display, action, old_outcome(entry_type))
    fields = known.message_class.DESCRIPTOR.fields_by_name
    # The old lists were looked up in every entry; a type's own list is the old one cut to its
    # message's fields, in the same order.
    assert known.agent_fields == tuple(f for f in OLD_FHIR_ACTOR_FIELDS if f in fields)
    assert known.actor_fields == tuple(f for f in OLD_LOOKUP_ACTOR_FIELDS if f in fields)


def _reachable(descriptor: Descriptor) -> list[Descriptor]:
    out: list[Descriptor] = []
    pending = [descriptor]
    while pending:
        d = pending.pop()
        if d in out:
            continue
        out.append(d)
        pending.extend(f.message_type for f in d.fields if f.type == FieldDescriptor.TYPE_MESSAGE)
    return out


def _old_holds_patient(descriptor: Descriptor) -> bool:
    """Whether the old rule found a patient field in this message type or in singular messages it
    holds (lists it never looked into)."""
    return any(n in descriptor.fields_by_name for n in OLD_PATIENT_FIELDS) or any(
        _old_holds_patient(f.message_type)
        for f in descriptor.fields
        if f.type == FieldDescriptor.TYPE_MESSAGE and not f.is_repeated
    )


@pytest.mark.parametrize("entry_type", sorted(OLD_KNOWN))
def test_each_event_types_patient_fields_are_the_old_ones(entry_type: str) -> None:
    known = event_types.by_entry_type(entry_type)
    assert known is not None
    for descriptor in _reachable(known.message_class.DESCRIPTOR):
        personal = event_types.personal_fields(descriptor)
        names = descriptor.fields_by_name
        assert personal.patient_ids == (("patient_id",) if "patient_id" in names else ()), descriptor.full_name
        assert personal.principal_ids == tuple(n for n in ("principal_id", "recipient_id") if n in names)
        assert [(name, inner.full_name) for name, inner in personal.nested] == [
            (f.name, f.message_type.full_name)
            for f in descriptor.fields
            if f.type == FieldDescriptor.TYPE_MESSAGE and not f.is_repeated and _old_holds_patient(f.message_type)
        ]


def _filled(message: pb_message.Message, principal: str, *, without: frozenset[str] = frozenset()) -> None:
    """Every field of `message` set: ids of the patient where the old rule looked for them (the
    principal fields to `principal`), other strings to values naming their field."""
    for f in message.DESCRIPTOR.fields:
        if f.name in without:
            continue
        if f.name == "patient_id":
            value: Any = PATIENT
        elif f.name in ("principal_id", "recipient_id"):
            value = principal
        elif f.type == FieldDescriptor.TYPE_STRING:
            # Strings holding the patient id inside them too, as key names do.
            value = f"{f.name}-{PATIENT}" if f.name == "key_name" else f"{f.name}-1"
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            inner = getattr(message, f.name).add() if f.is_repeated else getattr(message, f.name)
            if f.message_type.full_name == "google.protobuf.Timestamp":
                inner.FromDatetime(NOW)
            else:
                _filled(inner, principal, without=without)
            continue
        elif f.type == FieldDescriptor.TYPE_BOOL:
            value = True
        elif f.type == FieldDescriptor.TYPE_BYTES:
            value = b"\x01\x02"
        elif f.type == FieldDescriptor.TYPE_ENUM:
            value = 1
        else:
            value = 7
        if f.is_repeated:
            getattr(message, f.name).extend([value, value])
        else:
            setattr(message, f.name, value)


ACTING = frozenset({"actor_id", "written_by", "practitioner_id", "requested_by", "reviewed_by", "changed_by"})


@pytest.mark.parametrize("entry_type", sorted(OLD_KNOWN))
@pytest.mark.parametrize("principal", [PATIENT, "prn_" + "4" * 32])
@pytest.mark.parametrize("without", [frozenset(), ACTING | {"cancelled_by"}])
def test_each_event_type_drafts_the_same_entry_as_the_old_tables_did(
    entry_type: str, principal: str, without: frozenset[str]
) -> None:
    """Drafting, the actor it is found by and its AuditEvent, compared with the old rules run on the
    same payload: with patients and other principals in the principal fields, with and without
    the acting fields (where the AuditEvent's agent falls back to the principal acted upon)."""
    known = event_types.by_entry_type(entry_type)
    assert known is not None
    payload = known.message_class()
    _filled(payload, principal, without=without)
    event = new_event(source="medledger.test", payload=payload, aggregate_id="a", version=1, time=NOW)
    draft = entries.draft_entry(event)
    assert draft is not None and draft.type == entry_type

    expected_fields = entries._fields_of(payload)
    expected_patient = old_take_patient(expected_fields)
    if expected_patient:
        entries._replace_value(expected_fields, expected_patient, entries.SUBJECT_ITSELF)
    assert draft.patient_id == expected_patient
    assert draft.fields == expected_fields
    assert lookup_columns(draft)[2] == old_actor(draft.fields, OLD_LOOKUP_ACTOR_FIELDS)

    entry = json.loads(entries.encode_entry(draft, "vault:v1:aGFzaA==", NOW.timestamp()))
    # `audit verify` takes the lookup columns again from the entry's bytes: the same ones.
    assert columns.lookup_columns(entry["type"], entry) == lookup_columns(draft)
    resource = fhir_audit.audit_event(entry, index=3, leaf_hash_hex="ab")
    (code, display), action = OLD_FHIR_KINDS.get(entry_type, OLD_FHIR_DEFAULT)
    assert resource["type"]["code"] == code and resource["type"]["display"] == display
    assert resource["action"] == action and resource["outcome"] == old_outcome(entry_type)
    actor = old_actor(entry, OLD_FHIR_ACTOR_FIELDS)
    who = {"identifier": {"system": "urn:medledger:principal", "value": actor}} if actor else {"display": "medledger"}
    assert resource["agent"][0]["who"] == who


def test_the_logs_own_entry_types_keep_their_coding_and_actor() -> None:
    redaction = entries.redaction_entry(4, "cd" * 32, "court order", "prn_auditor", "req-1")
    entry = json.loads(entries.encode_entry(redaction, None, NOW.timestamp()))
    resource = fhir_audit.audit_event(entry, index=9, leaf_hash_hex="ab")
    assert (resource["type"]["code"], resource["action"]) == ("110100", "D")
    assert resource["agent"][0]["who"]["identifier"]["value"] == "prn_auditor"
    assert lookup_columns(redaction)[2] is None  # the log finds no entry by its redactor
    unprocessable = entries.unprocessable_entry(b"\x00junk", "medledger.records.v1", 0, 1)
    entry = json.loads(entries.encode_entry(unprocessable, None, NOW.timestamp()))
    resource = fhir_audit.audit_event(entry, index=10, leaf_hash_hex="ab")
    assert (resource["type"]["code"], resource["action"], resource["outcome"]) == ("110113", "E", "0")


# An event type that audit's code has never named: a prescription, declared only here.
_PRESCRIPTION_FILE = "medledger/testing/v1/prescription_events.proto"
_PRESCRIPTION = "medledger.testing.v1.PrescriptionIssued"


def _prescription_class() -> type[pb_message.Message]:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_PRESCRIPTION_FILE)
    except KeyError:
        file = descriptor_pb2.FileDescriptorProto(
            name=_PRESCRIPTION_FILE,
            package="medledger.testing.v1",
            syntax="proto3",
            dependency=["medledger/options/v1/options.proto"],
        )
        message = file.message_type.add(name="PrescriptionIssued")
        declared = message.options.Extensions[options_pb2.audit_entry]
        declared.type = "prescription.issued"
        declared.audit_event.type_code = "110110"
        declared.audit_event.type_display = "Patient Record"
        declared.audit_event.action = "C"
        string = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
        optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
        for number, name in enumerate(["prescription_id", "patient_id", "prescriber_id", "medication_code"], 1):
            message.field.add(name=name, number=number, type=string, label=optional, json_name=name)
        message.field[1].options.Extensions[options_pb2.personal_data] = options_pb2.PERSONAL_DATA_PATIENT_ID
        message.field[2].options.Extensions[options_pb2.actor] = options_pb2.ACTOR_ACTING
        pool.AddSerializedFile(file.SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(_PRESCRIPTION))


def test_an_event_type_audit_never_named_becomes_an_entry_by_its_own_options() -> None:
    audit_source = Path(entries.__file__).parent
    for path in audit_source.rglob("*.py"):
        assert "prescription" not in path.read_text().lower(), f"{path} names the new event type"
    prescription = _prescription_class()
    payload = prescription(
        prescription_id="rx_1", patient_id=PATIENT, prescriber_id="prn_doctor", medication_code="ATC:N02BE01"
    )
    event = new_event(source="medledger.prescriptions", payload=payload, aggregate_id="rx_1", version=1, time=NOW)

    draft = entries.draft_entry(event)
    assert draft is not None
    assert draft.type == "prescription.issued"
    assert draft.patient_id == PATIENT
    assert draft.fields == {"prescription_id": "rx_1", "prescriber_id": "prn_doctor", "medication_code": "ATC:N02BE01"}
    assert lookup_columns(draft)[2] == "prn_doctor"
    data = entries.encode_entry(draft, "vault:v1:c3ViamVjdA==", NOW.timestamp())
    assert PATIENT.encode() not in data
    entry = json.loads(data)
    assert entry["type"] == "prescription.issued" and entry["subject"] == "vault:v1:c3ViamVjdA=="
    resource = fhir_audit.audit_event(entry, index=0, leaf_hash_hex="ab")
    assert resource["type"] == {
        "system": "http://dicom.nema.org/resources/ontology/DCM",
        "code": "110110",
        "display": "Patient Record",
    }
    assert resource["subtype"][0]["code"] == "prescription.issued" and resource["action"] == "C"
    assert resource["agent"][0]["who"]["identifier"]["value"] == "prn_doctor"


def test_a_message_without_the_entry_option_stays_unprocessable() -> None:
    from medledger.events.v1 import records_events_pb2

    # A message of the events package that is not an event itself.
    event = new_event(
        source="medledger.records",
        payload=records_events_pb2.ErasureCertificate(erasure_id="er_1", patient_id=PATIENT),
        aggregate_id="er_1",
        version=1,
        time=NOW,
    )
    draft = entries.draft_entry(event)
    assert draft is not None and draft.type == entries.UNPROCESSABLE and draft.patient_id is None
    assert draft.fields["event_type"] == "medledger.events.v1.ErasureCertificate"


def test_a_message_taking_another_types_entry_type_is_refused() -> None:
    """Two messages with one entry type would make the log's entries ambiguous: the second is an
    error, not a silent replacement."""
    pool = descriptor_pool.Default()
    name = "medledger/testing/v1/duplicate_events.proto"
    try:
        pool.FindFileByName(name)
    except KeyError:
        file = descriptor_pb2.FileDescriptorProto(
            name=name,
            package="medledger.testing.v1",
            syntax="proto3",
            dependency=["medledger/options/v1/options.proto"],
        )
        message = file.message_type.add(name="RecordStoredAgain")
        declared = message.options.Extensions[options_pb2.audit_entry]
        declared.type = "record.stored"
        declared.audit_event.type_code = "110110"
        declared.audit_event.action = "C"
        pool.AddSerializedFile(file.SerializeToString())
    with pytest.raises(ValueError, match=r"record\.stored"):
        event_types.by_event_type("medledger.testing.v1.RecordStoredAgain")
    known = event_types.by_entry_type("record.stored")
    assert known is not None and known.full_name == "medledger.events.v1.RecordStored"


def test_the_acts_a_guardian_does_for_the_patient_name_the_patient_on_behalf_of_and_nothing_else_does() -> None:
    """A guardian's reads, listings, exports and erasure requests carry the patient they acted for
    in a field of kind ACTOR_ON_BEHALF_OF: neither the agent nor a field the log finds actors by.
    (A guardian's read of other personal data, such as the patient's audit trail, is a
    `personal_data.disclosed` that says so the same way.)"""
    guardian_acts = {
        "record.disclosed",
        "records.listed",
        "erasure.requested",
        "erasure.cancelled",
        "personal_data.disclosed",
    }
    for known in event_types.known():
        expected = ("on_behalf_of",) if known.entry_type in guardian_acts else ()
        assert known.on_behalf_of_fields == expected, known.entry_type
        assert "on_behalf_of" not in known.agent_fields + known.actor_fields
