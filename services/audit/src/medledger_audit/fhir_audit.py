"""Log entries as FHIR R4 AuditEvent resources (for export), without I/O.

Each entry maps to one AuditEvent: `type` is the DICOM audit event type closest to what happened
and `subtype` the entry type itself (system `urn:medledger:audit-entry-type`); `action`
C/R/U/D/E; `recorded` is the entry's integrated time; `outcome` 0 (success) or 4 (minor failure:
an access denied); `purposeOfEvent` the HL7 v3 purpose of use; `agent` the principal who acted,
by medledger id, and when a guardian acted for the patient, the patient as the agent's
onBehalfOf (HL7's `auditevent-OnBehalfOf` extension; by the entry's `subject`, as in the
entity); `source.observer` the service that emitted the event; `entity` the records, consents,
accesses and erasures concerned, and the entry's `subject` (the HMAC standing for the patient,
never the patient id). The entry's index in the log and its leaf hash go in an entity too, so
each AuditEvent points back to what proves it; its `id` is `entry-<index>`.
"""

from __future__ import annotations

from typing import Any

from medledger_audit import event_types
from medledger_audit.entries import SUBJECT_ITSELF

_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_PURPOSE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
_ENTRY_TYPE_SYSTEM = "urn:medledger:audit-entry-type"
_PRINCIPAL_SYSTEM = "urn:medledger:principal"
_SUBJECT_SYSTEM = "urn:medledger:audit-subject"
_LOG_SYSTEM = "urn:medledger:audit-log-entry"
_ON_BEHALF_OF_EXTENSION = "http://hl7.org/fhir/StructureDefinition/auditevent-OnBehalfOf"

# DICOM (DCM) audit event types of the log's own entries; an event's entry type has its coding
# from its payload message's options (`event_types`).
_SECURITY_ALERT = ("110113", "Security Alert")
_APPLICATION_ACTIVITY = ("110100", "Application Activity")
# The log's own entry types: (DICOM type, action, fields naming who acted).
_OWN: dict[str, tuple[tuple[str, str], str, tuple[str, ...]]] = {
    "unprocessable": (_SECURITY_ALERT, "E", ()),
    "entry.redacted": (_APPLICATION_ACTIVITY, "D", ("redacted_by",)),
}
# An entry type known neither way.
_OTHER: tuple[tuple[str, str], str, tuple[str, ...]] = (_APPLICATION_ACTIVITY, "E", ())
# Fields naming what was concerned: (field, identifier system).
_WHAT_FIELDS = (
    ("record_id", "urn:medledger:record"),
    ("consent_id", "urn:medledger:consent"),
    ("decision_id", "urn:medledger:consent-decision"),
    ("access_id", "urn:medledger:break-glass-access"),
    ("erasure_id", "urn:medledger:erasure"),
    ("hold_id", "urn:medledger:legal-hold"),
)


def _coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return coding


def audit_event(entry: dict[str, Any], *, index: int, leaf_hash_hex: str, source: str = "") -> dict[str, Any]:
    """The AuditEvent of one log entry (parsed JSON), at `index` in the log."""
    entry_type = str(entry.get("type", "unprocessable"))
    event_type = event_types.by_entry_type(entry_type)
    if event_type is not None:
        coding = event_type.audit_event
        code, display, action, outcome = coding.type_code, coding.type_display, coding.action, coding.outcome
        agent_fields = event_type.agent_fields
        on_behalf_of_fields = event_type.on_behalf_of_fields
    else:
        on_behalf_of_fields = ()
        (code, display), action, agent_fields = _OWN.get(entry_type, _OTHER)
        outcome = "0"
    actor = next((entry[f] for f in agent_fields if isinstance(entry.get(f), str) and entry[f]), None)
    agent: dict[str, Any] = {"requestor": True}
    if actor:
        agent["who"] = {"identifier": {"system": _PRINCIPAL_SYSTEM, "value": actor}}
    else:
        agent["who"] = {"display": "medledger"}
    # The entry names the patient acted for only as "@subject": its keyed hash stands for them.
    # R4's agent has no onBehalfOf element: HL7's extension for it carries the reference.
    if entry.get("subject") and any(entry.get(f) == SUBJECT_ITSELF for f in on_behalf_of_fields):
        patient = {"type": "Patient", "identifier": {"system": _SUBJECT_SYSTEM, "value": str(entry["subject"])}}
        agent["extension"] = [{"url": _ON_BEHALF_OF_EXTENSION, "valueReference": patient}]
    purpose = entry.get("purpose")
    if isinstance(purpose, str) and purpose.startswith("PURPOSE_OF_USE_"):
        agent["purposeOfUse"] = [{"coding": [_coding(_PURPOSE_SYSTEM, purpose.removeprefix("PURPOSE_OF_USE_"))]}]
    entities: list[dict[str, Any]] = [
        {
            "what": {"identifier": {"system": _LOG_SYSTEM, "value": f"{index}:{leaf_hash_hex}"}},
            "description": "the log entry this AuditEvent was made from: index and RFC 6962 leaf hash",
        }
    ]
    for field_name, system in _WHAT_FIELDS:
        value = entry.get(field_name)
        if isinstance(value, str) and value:
            entities.append({"what": {"identifier": {"system": system, "value": value}}})
    if entry.get("subject"):
        entities.append(
            {
                "what": {"identifier": {"system": _SUBJECT_SYSTEM, "value": str(entry["subject"])}},
                "description": "the patient, as the keyed hash that stands for them in the log",
            }
        )
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        # The entry's place in the log: stable, and a FHIR id (a search answer needs one).
        "id": f"entry-{index}",
        "type": _coding(_DCM, code, display),
        "subtype": [_coding(_ENTRY_TYPE_SYSTEM, entry_type)],
        "action": action,
        "recorded": entry.get("integrated_time") or "1970-01-01T00:00:00.000Z",
        "outcome": outcome,
        "agent": [agent],
        "source": {"observer": {"display": source or "medledger.audit"}},
        "entity": entities,
    }
    if entry.get("reason_code"):
        event["outcomeDesc"] = str(entry["reason_code"])
    if "purposeOfUse" in agent:
        event["purposeOfEvent"] = agent["purposeOfUse"]
    return event


def audit_event_bundle(events: list[dict[str, Any]]) -> dict[str, Any]:
    """A FHIR R4 Bundle (collection) of AuditEvents."""
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": e} for e in events]}
