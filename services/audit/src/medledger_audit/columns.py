"""The lookup columns of an entry row: what queries find entries by (its event id, type, subject,
record, commitment, actor and times), all taken from the entry itself.

One derivation, two uses: the sequencer takes them from the draft it encodes; `verify` takes them
again from the entry's stored bytes (which it has checked against the tree) and compares them
with the row. A column changed while the bytes were not would otherwise mislead every query
(a patient's trail, who read a record) while the log still verified.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from medledger_audit import event_types
from medledger_audit.entries import entry_time, rfc3339

# An entry whose fields did not fit is kept with only their hash (`encode_entry`): its record,
# commitment and actor columns came from fields its bytes no longer hold, so they cannot be checked.
OVERSIZE_FIELD = "oversize_fields_sha256"


def lookup_columns(entry_type: str, fields: Mapping[str, Any]) -> tuple[str | None, str | None, str | None]:
    """The record id, commitment and actor an entry is found by, from its type and fields."""
    record_id = fields.get("record_id")
    commitment = fields.get("commitment")
    # Which fields name the actor, the entry's event type says (the log's own entries have none).
    event_type = event_types.by_entry_type(entry_type)
    actor_fields = event_type.actor_fields if event_type is not None else ()
    actor = next((fields[f] for f in actor_fields if isinstance(fields.get(f), str) and fields[f]), None)
    return (
        record_id[:200] if isinstance(record_id, str) and record_id else None,
        commitment[:200] if isinstance(commitment, str) and commitment else None,
        actor[:200] if actor else None,
    )


class UnreadableEntry(ValueError):
    """Entry bytes that are not an entry (not a JSON object with the common fields)."""


def parse_entry(data: bytes) -> dict[str, Any]:
    try:
        entry = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise UnreadableEntry("its bytes are not JSON") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
        raise UnreadableEntry("its bytes are not an entry (a JSON object with a type)")
    return entry


def mismatched_columns(row: Any, entry: Mapping[str, Any]) -> tuple[list[str], bool]:
    """The columns of `row` (an entries row) that differ from what `entry` (its parsed bytes) says,
    and whether its record, commitment and actor columns could be checked at all (see
    OVERSIZE_FIELD). A time column is compared as the entry writes it (to the millisecond)."""
    expected: dict[str, Any] = {
        "event_id": entry.get("event_id"),
        "type": entry.get("type"),
        "subject": entry.get("subject"),
    }
    checkable = OVERSIZE_FIELD not in entry
    if checkable:
        expected["record_id"], expected["commitment"], expected["actor_id"] = lookup_columns(str(entry["type"]), entry)
    wrong = [name for name, value in expected.items() if getattr(row, name) != value]
    if entry_time(float(row.event_time)) != entry.get("event_time"):
        wrong.append("event_time")
    if rfc3339(float(row.integrated_time)) != entry.get("integrated_time"):
        wrong.append("integrated_time")
    return wrong, checkable
