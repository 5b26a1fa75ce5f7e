"""The lookup columns taken again from an entry's bytes (what `audit verify` compares rows with):
an oversize entry, which keeps only a hash of its fields, says which columns it cannot confirm;
bytes that are not an entry are refused by name."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from medledger_audit import columns
from medledger_audit.entries import MAX_ENTRY_BYTES, EntryDraft, encode_entry
from medledger_audit.sequencer import lookup_columns

NOW = 1_780_000_000.123


def _row(draft: EntryDraft, subject: str | None, **changed: object) -> SimpleNamespace:
    """An entries row as the sequencer writes it for `draft`."""
    record_id, commitment, actor = lookup_columns(draft)
    row = {
        "event_id": draft.event_id,
        "type": draft.type,
        "subject": subject,
        "record_id": record_id,
        "commitment": commitment,
        "actor_id": actor,
        "event_time": draft.event_time,
        "integrated_time": NOW,
    }
    return SimpleNamespace(**{**row, **changed})


def _disclosed(**fields: object) -> EntryDraft:
    base = {"record_id": "rec_1", "version": 1, "actor_id": "prn_doc", "purpose": "PURPOSE_OF_USE_TREATMENT"}
    return EntryDraft("evt-1", "record.disclosed", "pat_1", NOW - 1, {**base, **fields})


def test_a_row_as_written_matches_its_bytes_and_a_changed_column_does_not() -> None:
    draft = _disclosed()
    entry = columns.parse_entry(encode_entry(draft, "subj", NOW))
    assert columns.mismatched_columns(_row(draft, "subj"), entry) == ([], True)
    assert columns.mismatched_columns(_row(draft, "subj", actor_id="prn_x"), entry) == (["actor_id"], True)
    # Times compare as the entry writes them: to the millisecond.
    assert columns.mismatched_columns(_row(draft, "subj", integrated_time=NOW + 0.0001), entry) == ([], True)
    assert columns.mismatched_columns(_row(draft, "subj", event_time=NOW - 2), entry) == (["event_time"], True)


def test_an_oversize_entry_says_its_record_commitment_and_actor_cannot_be_checked() -> None:
    draft = _disclosed(note="x" * MAX_ENTRY_BYTES)
    data = encode_entry(draft, None, NOW)
    entry = columns.parse_entry(data)
    assert columns.OVERSIZE_FIELD in entry and "record_id" not in entry
    assert columns.mismatched_columns(_row(draft, None), entry) == ([], False)
    # What the bytes still hold is still checked.
    assert columns.mismatched_columns(_row(draft, None, type="record.stored"), entry) == (["type"], False)


@pytest.mark.parametrize("data", [b"\xff\xfe", b"not json", b"[1, 2]", json.dumps({"v": 1}).encode()])
def test_bytes_that_are_not_an_entry_are_refused_by_name(data: bytes) -> None:
    with pytest.raises(columns.UnreadableEntry):
        columns.parse_entry(data)
