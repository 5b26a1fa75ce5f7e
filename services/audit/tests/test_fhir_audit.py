"""Every entry type maps to an AuditEvent that validates with fhir.resources.R4B, and a Bundle of
them validates; the patient appears only as the entry's subject HMAC."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle

from medledger_audit import entries, fhir_audit
from medledger_runtime.events import new_event
from medledger_verifier import tlog

PATIENT = "pat_" + "2" * 32
NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


def entry_of(type_name: str, **fields: object) -> tuple[dict, bytes]:
    _, message_class = entries.ENTRY_TYPES[type_name]
    payload = message_class()
    for descriptor in message_class.DESCRIPTOR.fields:
        if descriptor.name in ("patient_id", "recipient_id", "principal_id"):
            setattr(payload, descriptor.name, PATIENT)
    for name, value in fields.items():
        if name in message_class.DESCRIPTOR.fields_by_name:
            setattr(payload, name, value)
    event = new_event(source="medledger.records", payload=payload, aggregate_id="a", version=1, time=NOW)
    draft = entries.draft_entry(event)
    assert draft is not None
    data = entries.encode_entry(draft, "vault:v1:aGFzaA==", NOW.timestamp())
    return json.loads(data), data


@pytest.mark.parametrize("type_name", sorted(entries.ENTRY_TYPES))
def test_every_entry_type_is_a_valid_audit_event(type_name: str) -> None:
    entry, data = entry_of(type_name, actor_id="prn_7", record_id="rec_1", purpose=1, reason_code="EXPLICIT_DENY")
    resource = fhir_audit.audit_event(entry, index=5, leaf_hash_hex=tlog.leaf_hash(data).hex())
    parsed = AuditEvent.model_validate(resource)
    assert parsed.subtype[0].code == entry["type"]
    assert PATIENT not in json.dumps(resource)
    identifiers = [e.what.identifier.value for e in parsed.entity]
    assert f"5:{tlog.leaf_hash(data).hex()}" in identifiers and "vault:v1:aGFzaA==" in identifiers


def test_a_disclosure_names_the_reader_the_purpose_and_the_record_and_a_denial_fails() -> None:
    entry, _ = entry_of(
        "medledger.events.v1.RecordDisclosed", actor_id="prn_7", record_id="rec_1", purpose=1, decision_id="dec_1"
    )
    disclosed = fhir_audit.audit_event(entry, index=0, leaf_hash_hex="00")
    assert disclosed["action"] == "R" and disclosed["outcome"] == "0"
    assert disclosed["agent"][0]["who"]["identifier"]["value"] == "prn_7"
    assert disclosed["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
    denied, _ = entry_of("medledger.events.v1.RecordAccessDenied", actor_id="prn_7", reason_code="NO_CONSENT")
    assert fhir_audit.audit_event(denied, index=1, leaf_hash_hex="00")["outcome"] == "4"


def test_a_bundle_of_audit_events_validates() -> None:
    events = [
        fhir_audit.audit_event(entry_of(t)[0], index=i, leaf_hash_hex="ab")
        for i, t in enumerate(sorted(entries.ENTRY_TYPES))
    ]
    bundle = Bundle.model_validate(fhir_audit.audit_event_bundle(events))
    assert len(bundle.entry) == len(entries.ENTRY_TYPES)


def test_a_guardians_act_names_the_guardian_as_agent_on_behalf_of_the_patient_by_subject() -> None:
    entry, data = entry_of(
        "medledger.events.v1.RecordDisclosed", actor_id="prn_guardian", record_id="rec_1", on_behalf_of=PATIENT
    )
    assert entry["on_behalf_of"] == "@subject" and PATIENT.encode() not in data
    resource = fhir_audit.audit_event(entry, index=3, leaf_hash_hex=tlog.leaf_hash(data).hex())
    parsed = AuditEvent.model_validate(resource)
    (agent,) = parsed.agent
    assert agent.who.identifier.value == "prn_guardian"
    (on_behalf_of,) = agent.extension
    assert on_behalf_of.url == "http://hl7.org/fhir/StructureDefinition/auditevent-OnBehalfOf"
    assert on_behalf_of.valueReference.identifier.value == "vault:v1:aGFzaA==" == entry["subject"]
    assert PATIENT not in json.dumps(resource)
    # The type and coding stay those of every disclosure.
    assert (parsed.type.code, parsed.action, parsed.subtype[0].code) == ("110110", "R", "record.disclosed")
    # Without a guardian, no onBehalfOf.
    own, _ = entry_of("medledger.events.v1.RecordDisclosed", actor_id="prn_7", record_id="rec_1")
    assert "on_behalf_of" not in own
    assert "extension" not in fhir_audit.audit_event(own, index=4, leaf_hash_hex="00")["agent"][0]
