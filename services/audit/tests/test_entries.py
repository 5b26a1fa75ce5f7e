"""Entries: what each event becomes in the log. JCS bytes, the common fields, the patient never
in the clear, long lists hashed beside the log, nothing dropped."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import pytest
import rfc8785
from medledger.events.v1 import (
    anchoring_events_pb2,
    audit_events_pb2,
    disclosure_events_pb2,
    identity_events_pb2,
    records_events_pb2,
)
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_audit import entries
from medledger_runtime.events import new_event

PATIENT = "pat_" + "1" * 32
NOW = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)


def event(payload, source: str = "medledger.records"):  # type: ignore[no-untyped-def]
    return new_event(source=source, payload=payload, aggregate_id="agg", version=3, subject=PATIENT, time=NOW)


def decoded(data: bytes) -> dict:
    value = json.loads(data)
    assert rfc8785.dumps(value) == data, "entries are RFC 8785 canonical JSON"
    return value


def test_a_record_stored_event_becomes_an_entry_with_its_commitment_and_no_patient_id() -> None:
    stored = records_events_pb2.RecordStored(
        record_id="rec_1",
        version=2,
        patient_id=PATIENT,
        category=vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS,
        commitment="ab" * 32,
        written_by="prn_9",
    )
    e = event(stored)
    draft = entries.draft_entry(e)
    assert draft is not None and draft.type == "record.stored" and draft.patient_id == PATIENT
    data = entries.encode_entry(draft, "vault:v1:c3ViamVjdA==", NOW.timestamp() + 1.5)
    entry = decoded(data)
    assert entry == {
        "v": 1,
        "type": "record.stored",
        "event_id": e.id,
        "event_time": "2026-11-25T09:30:00.000Z",
        "integrated_time": "2026-11-25T09:30:01.500Z",
        "subject": "vault:v1:c3ViamVjdA==",
        "record_id": "rec_1",
        "version": 2,
        "category": "DATA_CATEGORY_OBSERVATIONS",
        "commitment": "ab" * 32,
        "written_by": "prn_9",
    }
    assert PATIENT.encode() not in data


def test_a_patient_principal_is_the_subject_and_other_principals_stay_named() -> None:
    patient = entries.draft_entry(
        event(
            identity_events_pb2.PrincipalRegistered(
                principal_id=PATIENT, kind=vocab.PrincipalKind.PRINCIPAL_KIND_PATIENT
            ),
            source="medledger.identity",
        )
    )
    assert patient is not None and patient.patient_id == PATIENT and "principal_id" not in patient.fields
    doctor = entries.draft_entry(
        event(
            identity_events_pb2.PrincipalRegistered(principal_id="prn_2", organization_id="org_3"), "medledger.identity"
        )
    )
    assert doctor is not None and doctor.patient_id is None
    assert doctor.fields == {"principal_id": "prn_2", "organization_id": "org_3"}


def test_the_erasure_certificate_names_no_patient_either() -> None:
    certificate = records_events_pb2.ErasureCertificate(
        erasure_id="era_1", patient_id=PATIENT, key_name="patient-x", key_versions=[1, 2], records_erased=3
    )
    draft = entries.draft_entry(event(records_events_pb2.PatientRecordsErased(certificate=certificate)))
    assert draft is not None and draft.type == "erasure.completed" and draft.patient_id == PATIENT
    entry = decoded(entries.encode_entry(draft, None, NOW.timestamp()))
    assert entry["certificate"]["key_versions"] == [1, 2] and "patient_id" not in entry["certificate"]


def test_the_erasure_protocols_key_names_do_not_name_the_patient_in_the_log() -> None:
    """Key names hold the patient id (`patient-<id>`): the log keeps them with the subject
    standing in for it, or the erased patient's entries would stay linkable to them."""
    key = records_events_pb2.DestroyedKey(key_name=f"patient-{PATIENT}", versions=[1])
    certificate = records_events_pb2.ErasureCertificate(
        erasure_id="era_1",
        patient_id=PATIENT,
        key_name=f"patient-{PATIENT}",
        participants=[records_events_pb2.ErasureParticipant(participant="identity", outcome=1, keys=[key])],
    )
    confirmed = records_events_pb2.PatientKeysDestroyed(
        erasure_id="era_1", patient_id=PATIENT, participant="identity", keys=[key]
    )
    for payload in (records_events_pb2.PatientRecordsErased(certificate=certificate), confirmed):
        draft = entries.draft_entry(event(payload))
        assert draft is not None and draft.patient_id == PATIENT
        encoded = entries.encode_entry(draft, None, NOW.timestamp())
        assert PATIENT.encode() not in encoded
        assert f"patient-{entries.SUBJECT_ITSELF}".encode() in encoded


def test_long_id_lists_are_hashed_and_kept_beside_the_log() -> None:
    ids = [f"rec_{n:032d}" for n in range(100)]
    draft = entries.draft_entry(
        event(records_events_pb2.RecordsListed(patient_id=PATIENT, actor_id="prn_1", record_ids=ids, operation="list"))
    )
    assert draft is not None and "record_ids" not in draft.fields
    digest = draft.fields["record_ids_sha256"]
    assert draft.fields["record_ids_count"] == 100
    assert draft.side_lists == {digest: ids}
    assert digest == entries.sha256_hex(rfc8785.dumps(ids))  # anyone shown the list can check it
    short = entries.draft_entry(event(records_events_pb2.RecordsListed(patient_id=PATIENT, record_ids=ids[:3])))
    assert short is not None and short.fields["record_ids"] == ids[:3] and short.side_lists == {}


def test_what_cannot_be_read_is_kept_by_hash_never_dropped() -> None:
    raw = b"\x00 not an envelope"
    draft = entries.unprocessable_entry(raw, "medledger.records.v1", 2, 41)
    assert draft.type == "unprocessable" and draft.fields["raw_sha256"] == entries.sha256_hex(raw)
    assert entries.unprocessable_entry(raw, "medledger.records.v1", 2, 41).event_id == draft.event_id
    entry = decoded(entries.encode_entry(draft, None, NOW.timestamp()))
    assert entry["offset"] == 41 and entry["event_time"] is None and entry["subject"] is None
    unknown = event(records_events_pb2.RecordStored(record_id="rec_1"))
    unknown.type = "medledger.events.v1.SomethingNew"
    kept = entries.draft_entry(unknown)
    assert kept is not None and kept.type == "unprocessable" and kept.fields["event_type"] == unknown.type


def test_the_audit_services_own_checkpoint_events_are_not_appended() -> None:
    signed = audit_events_pb2.CheckpointSigned(origin="medledger.local/audit", tree_size=10, root=bytes(32))
    assert entries.draft_entry(event(signed, source="medledger.audit")) is None


def test_the_audit_services_own_disclosures_are_appended_with_the_patient_as_subject() -> None:
    # An auditor's reading of a patient's entries: the patient's own entries must show it.
    read = disclosure_events_pb2.PersonalDataDisclosed(
        actor_id="aud_1",
        patient_id=PATIENT,
        method="/medledger.audit.v1.AuditService/ListEntries",
        resource_ids=["prc_9"],
    )
    draft = entries.draft_entry(event(read, source="medledger.audit"))
    assert draft is not None and draft.type == "personal_data.disclosed"
    assert draft.patient_id == PATIENT and PATIENT not in json.dumps(draft.fields)
    assert draft.fields["actor_id"] == "aud_1" and draft.fields["method"].endswith("/ListEntries")


def test_anchors_are_not_appended_but_consent_commitments_on_chain_are() -> None:
    # An anchor appended would be a new entry to anchor: a transaction every interval, forever.
    anchored = anchoring_events_pb2.CheckpointAnchored(origin="medledger.local/audit", tree_size=10, root=bytes(32))
    assert entries.draft_entry(event(anchored, source="medledger.anchoring")) is None
    on_chain = anchoring_events_pb2.ConsentCommitmentRecorded(commitment="cd" * 32, status="granted", chain_id=1)
    draft = entries.draft_entry(event(on_chain, source="medledger.anchoring"))
    assert draft is not None and draft.type == "consent.commitment_on_chain"
    assert draft.fields["commitment"] == "cd" * 32 and draft.patient_id is None


@pytest.mark.parametrize("type_name", sorted(entries.ENTRY_TYPES))
def test_every_event_type_becomes_a_small_canonical_entry_without_the_patient(type_name: str) -> None:
    entry_type, message_class = entries.ENTRY_TYPES[type_name]
    payload = message_class()
    for field in message_class.DESCRIPTOR.fields:
        if field.name in ("patient_id", "recipient_id", "principal_id"):
            setattr(payload, field.name, PATIENT)
    draft = entries.draft_entry(event(payload))
    assert draft is not None and draft.type == entry_type
    data = entries.encode_entry(draft, "subject", NOW.timestamp())
    assert len(data) <= entries.MAX_ENTRY_BYTES and PATIENT.encode() not in data
    assert {"v", "type", "event_id", "event_time", "integrated_time", "subject"} <= decoded(data).keys()


def test_the_readme_documents_every_entry_type_as_the_code_builds_it() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert entries.schema_markdown() in readme


def test_the_patient_acting_on_their_own_data_is_named_as_the_subject() -> None:
    stored = records_events_pb2.RecordStored(record_id="rec_1", version=1, patient_id=PATIENT, written_by=PATIENT)
    draft = entries.draft_entry(event(stored))
    assert draft is not None and draft.fields["written_by"] == entries.SUBJECT_ITSELF
    assert PATIENT.encode() not in entries.encode_entry(draft, "s", NOW.timestamp())


# --- canonical_json: the standard library's encoder where it writes RFC 8785's bytes ----------


def _all_code_points_in_chunks(size: int = 997) -> list[str]:
    points = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    return ["".join(map(chr, points[i : i + size])) for i in range(0, len(points), size)]


@pytest.mark.parametrize("type_name", sorted(entries.ENTRY_TYPES))
def test_every_entry_type_encodes_to_the_bytes_of_rfc8785(type_name: str) -> None:
    _, message_class = entries.ENTRY_TYPES[type_name]
    payload = message_class()
    for field in message_class.DESCRIPTOR.fields:
        if field.type == field.TYPE_STRING:
            tricky = f'é"\\\n\u2028{field.name}😀'
            value = PATIENT if field.name in ("patient_id", "recipient_id", "principal_id") else tricky
            if field.is_repeated:
                getattr(payload, field.name).extend([value, "x"])
            else:
                setattr(payload, field.name, value)
        elif field.type in (field.TYPE_INT64, field.TYPE_UINT64) and not field.is_repeated:
            setattr(payload, field.name, 2**53 - 1)  # the largest integer RFC 8785 writes exactly
    draft = entries.draft_entry(event(payload))
    assert draft is not None
    assert draft.json_safe, "a payload without float fields is known to be safe for the fast path"
    entry = {**draft.fields, "v": 1, "type": draft.type, "event_id": draft.event_id, "subject": "s"}
    assert entries._jcs_safe(entry), "entries take the fast path"
    assert entries.canonical_json(entry) == rfc8785.dumps(entry)
    data = entries.encode_entry(draft, "subject", NOW.timestamp())
    assert data == rfc8785.dumps(json.loads(data))


def test_an_integer_rfc8785_cannot_write_exactly_makes_the_event_unprocessable() -> None:
    from aiokafka import ConsumerRecord

    from medledger_audit.handlers import draft_of

    stored = records_events_pb2.RecordStored(record_id="rec_1", version=2**53, patient_id=PATIENT)
    with pytest.raises(ValueError, match="RFC 8785"):
        entries.draft_entry(event(stored))
    raw = event(stored).SerializeToString()
    record = ConsumerRecord("medledger.records.v1", 0, 7, 0, 0, None, raw, None, 0, len(raw), [])
    draft = draft_of(record)  # kept by hash, never dropped, and never an append that cannot succeed
    assert draft is not None and draft.type == entries.UNPROCESSABLE
    assert draft.fields["raw_sha256"] == hashlib.sha256(raw).hexdigest()


def test_canonical_json_matches_rfc8785_on_every_code_point_in_values_and_keys() -> None:
    tricky = ['"', "\\", "/", "\b\f\n\r\t", "\x00\x01\x1f\x7f", "\u2028\u2029", "\U0001f600\U0010ffff", "é中", ""]
    for text in tricky + _all_code_points_in_chunks():
        value = {"k": text, "list": [text, 1, True, None], "nested": {"a": text}}
        assert entries.canonical_json(value) == rfc8785.dumps(value), repr(text[:20])
    for c in range(0x80):  # every ASCII character in a key, escaped alike and sorted alike
        value = {chr(c): 1, "a" + chr(c): 2, "~": 3}
        assert entries.canonical_json(value) == rfc8785.dumps(value), c


def test_canonical_json_leaves_to_rfc8785_what_the_fast_path_would_write_differently() -> None:
    import enum

    class Kind(enum.IntEnum):
        A = 1

    slow = [
        {"f": 1.5},
        {"f": 1e21},
        {"f": -0.0},
        {"nested": [{"f": 0.1}]},
        {"big": 2**53},
        {"big": -(2**53)},
        {"\ue000": 1, "\U0001f600": 2},  # code-point order and UTF-16 order differ here
        {"enum": Kind.A},
    ]
    for value in slow:
        assert not entries._jcs_safe(value)
        try:
            expected = rfc8785.dumps(value)
        except rfc8785.CanonicalizationError:
            with pytest.raises(rfc8785.CanonicalizationError):
                entries.canonical_json(value)
        else:
            assert entries.canonical_json(value) == expected
    assert entries._jcs_safe({"ok": 2**53 - 1, "neg": -(2**53) + 1})
    with pytest.raises(rfc8785.CanonicalizationError):  # a lone surrogate is not UTF-8
        entries.canonical_json({"s": "\ud800"})


def test_rfc3339_is_datetimes_isoformat_to_the_millisecond() -> None:
    import random

    def reference(seconds: float) -> str:
        return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    rng = random.Random(8785)
    edges = [0.0, 1.0, -1.0, -0.0005, 0.0005, 0.9995, 0.9999995, 0.9999994, 1.0000005, 1e-7, -1e-7]
    values = edges + [1_764_000_000 + e for e in edges] + [rng.uniform(-2e9, 4e9) for _ in range(200_000)]
    values += [rng.randrange(0, 4_000_000_000) + rng.randrange(0, 1_000_000) / 1e6 for _ in range(200_000)]
    values += [rng.randrange(0, 4_000_000_000) + (rng.randrange(0, 1000) + 0.5) / 1000 for _ in range(100_000)]
    for seconds in values:
        assert entries.rfc3339(seconds) == reference(seconds), repr(seconds)
