"""What the log holds: one entry per event, a JCS (RFC 8785) JSON object per entry, without I/O.

Every entry has `v` (1), `type`, `event_id`, `event_time`, `integrated_time`, `source` and
`subject`, then the fields of its type. An event's payload message names its own entry type and
which of its fields name the patient (its options, read by `event_types`); the schema of each type
is in the README, generated from them. The patient an entry is about never appears in it: `subject` is the HMAC-SHA-256
of the patient id under a key of that patient's own (`subject_key_name`), which erasure deletes,
so the patient's entries become unlinkable while every hash of the log stays. Ids of other
principals (the actor who read, the grantee) stay: they are who did what.

Long id lists are not written into an entry: it holds their count and the SHA-256 of their JCS
form, and the list is kept beside the log (`EntryDraft.side_lists`), so an entry stays small and
a verifier can still check a list it is shown. An entry is at most `MAX_ENTRY_BYTES`.

One module, a little over 400 lines, because it is one format: how an event's fields become
JSON, which stand for the patient, and the README schema generated from the same rules (a test
keeps the two equal) are read and changed together.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import rfc8785
from google.protobuf import message as pb_message
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from medledger.events.v1 import anchoring_events_pb2, audit_events_pb2

from medledger_audit import event_types
from medledger_runtime.events import Event, unpack
from medledger_runtime.keys import audit_subject_key_name
from medledger_verifier.tlog import MAX_ENTRY_BYTES

ENTRY_VERSION = 1
__all__ = ["MAX_ENTRY_BYTES", "EntryDraft", "draft_entry", "encode_entry", "subject_key_name", "unprocessable_entry"]
# Where the platform's event types are declared (the README documents these).
_PLATFORM_EVENTS = "medledger/events/"
# Above this many ids a list is hashed and kept beside the log.
MAX_LISTED_IDS = 16
PATIENT_PREFIX = "pat_"
UNPROCESSABLE = "unprocessable"
# What stands in a field for the patient the entry is about (e.g. `written_by` when a patient
# wrote their own record).
SUBJECT_ITSELF = "@subject"

# The entry type of each event payload the log knows so far, from the payload's own options
# (`event_types`). An event of another payload type is an `unprocessable` entry (with the SHA-256
# of its bytes), never dropped.
ENTRY_TYPES: dict[str, tuple[str, type[pb_message.Message]]] = {
    t.full_name: (t.entry_type, t.message_class) for t in event_types.known()
}
# The audit service's own checkpoints are not appended: the log would grow by signing that it
# grew. Its other events are: an auditor's reading of entries (PersonalDataDisclosed) is a
# disclosure like any other, and the patient's entries must show it (who audited whom).
OWN_EVENT_SOURCE = "medledger.audit"
OWN_NOT_APPENDED_TYPES = frozenset({audit_events_pb2.CheckpointSigned.DESCRIPTOR.full_name})
# Nor are the anchors of those checkpoints: each would grow the log by one entry, whose
# checkpoint would be anchored in turn, one transaction every interval with no traffic at all.
# The chain is their record (and anchoring's API serves them).
NOT_APPENDED_TYPES = frozenset({anchoring_events_pb2.CheckpointAnchored.DESCRIPTOR.full_name})


@dataclass(frozen=True)
class EntryDraft:
    """An entry before the log integrates it (it then gets `subject` and `integrated_time`)."""

    event_id: str
    type: str
    patient_id: str | None
    event_time: float
    fields: dict[str, Any]
    side_lists: dict[str, list[str]] = field(default_factory=dict)
    # Known to be made only of what `canonical_json`'s fast path writes as RFC 8785 does (the
    # fields of a payload without float fields, see `_fields_of`), so it need not be checked.
    json_safe: bool = False


def subject_key_name(patient_id: str) -> str:
    """The key-manager HMAC key an entry's `subject` is made with; erasure deletes it. Never
    rotated (KEYS.md): a subject's HMAC uses the latest version, so lookups by subject rely on
    there being one."""
    return audit_subject_key_name(patient_id)


def rfc3339(seconds: float) -> str:
    """`datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")` with `Z`, the
    same string (a test compares the two), with the date and time of the whole second cached:
    every entry has one or two times, and building a datetime for each was a tenth of an append.
    The microseconds are rounded as datetime rounds them (half to even), then truncated to ms."""
    frac, whole = math.modf(seconds)
    micros = round(frac * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    return f"{_whole_second(int(whole))}.{micros // 1000:03d}Z"


def entry_time(seconds: float) -> str | None:
    """An entry's `event_time`: None for 0 (a message with no event time)."""
    return rfc3339(seconds) if seconds else None


@functools.lru_cache(maxsize=4096)
def _whole_second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").removesuffix("+00:00")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def draft_entry(event: Event) -> EntryDraft | None:
    """The entry an event becomes; None for the audit service's own checkpoints and for anchors."""
    if (event.source == OWN_EVENT_SOURCE and event.type in OWN_NOT_APPENDED_TYPES) or event.type in NOT_APPENDED_TYPES:
        return None
    event_time = event.time.seconds + event.time.nanos / 1e9
    known = event_types.by_event_type(event.type)
    if known is None:
        return _unprocessable(
            event.id or f"sha256:{sha256_hex(event.SerializeToString())}",
            event_time,
            reason="unknown event type",
            raw=event.SerializeToString(),
            where={"event_type": event.type[:200]},
        )
    try:
        payload = unpack(event, known.message_class)
    except Exception:
        return _unprocessable(
            event.id, event_time, reason="undecodable payload", raw=event.SerializeToString(), where={}
        )
    fields = _fields_of(payload)
    patient_id = _take_patient(fields, known.personal)
    if patient_id:
        # The patient acting on their own data (writing their record, reading it): named as the
        # subject, not by id.
        _replace_value(fields, patient_id, SUBJECT_ITSELF)
    side_lists = _hash_long_lists(fields)
    return EntryDraft(
        event.id,
        known.entry_type,
        patient_id,
        event_time,
        fields,
        side_lists,
        json_safe=_float_free(payload.DESCRIPTOR),
    )


def unprocessable_entry(raw: bytes, topic: str, partition: int, offset: int) -> EntryDraft:
    """A Kafka message that is not an event envelope: kept as the SHA-256 of its bytes."""
    digest = sha256_hex(raw)
    # Its own id: a redelivery of the same message at the same place is the same entry.
    event_id = f"kafka:{topic}/{partition}/{offset}:{digest[:16]}"
    return _unprocessable(
        event_id,
        0.0,
        reason="not an event envelope",
        raw=raw,
        where={"topic": topic[:249], "partition": partition, "offset": offset},
    )


def _unprocessable(event_id: str, event_time: float, *, reason: str, raw: bytes, where: dict[str, Any]) -> EntryDraft:
    fields = {"reason": reason, "raw_sha256": sha256_hex(raw), "raw_bytes": len(raw), **where}
    return EntryDraft(event_id[:200], UNPROCESSABLE, None, event_time, fields)


REDACTION = "entry.redacted"


def redaction_entry(index: int, leaf_hash_hex: str, reason: str, redacted_by: str, request_id: str) -> EntryDraft:
    """The entry recording that entry `index` lost its payload (its leaf hash stays in the tree).
    Its id comes from the request, so a retried redaction is the same entry."""
    fields = {
        "redacted_index": index,
        "redacted_leaf_hash": leaf_hash_hex,
        "reason": reason,
        "redacted_by": redacted_by,
    }
    return EntryDraft(f"redaction:{request_id}"[:200], REDACTION, None, 0.0, fields)


def encode_entry(draft: EntryDraft, subject: str | None, integrated_time: float) -> bytes:
    """The entry's bytes: JCS of the common fields and the type's fields."""
    entry: dict[str, Any] = {
        **draft.fields,
        "v": ENTRY_VERSION,
        "type": draft.type,
        "event_id": draft.event_id,
        "event_time": entry_time(draft.event_time),
        "integrated_time": rfc3339(integrated_time),
        "subject": subject,
    }
    data = canonical_json(entry, known_safe=draft.json_safe)
    if len(data) > MAX_ENTRY_BYTES:
        # Cannot happen with ids and codes alone; if it ever does, the fields are kept by hash.
        common = {k: entry[k] for k in ("v", "type", "event_id", "event_time", "integrated_time", "subject")}
        data = rfc8785.dumps({**common, "oversize_fields_sha256": sha256_hex(rfc8785.dumps(draft.fields))})
    return data


# RFC 8785 serializes integers as IEEE doubles: only those within ±(2**53 - 1) are exact.
_MAX_SAFE_INT = 2**53 - 1
_FAST_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json(value: Any, *, known_safe: bool = False) -> bytes:
    r"""RFC 8785 (JCS) bytes of `value`.

    The rfc8785 package is pure Python and was most of an append's CPU. For the values entries
    are made of, the standard library's C encoder writes the very same bytes: object keys that
    are all ASCII (so sorting by code point is RFC 8785's sort by UTF-16 code units), no floats
    (whose RFC 8785 form differs from Python's repr), integers within ±(2**53 - 1), strings
    escaped alike (`\"`, `\\`, `\b\f\n\r\t`, other control characters as lowercase `\u00xx`,
    everything else, U+2028/U+2029 and characters above U+FFFF included, as UTF-8; a test
    compares the two over every code point). `_jcs_safe` proves those conditions for the value;
    anything else, and a string that is not valid UTF-8 (a lone surrogate), goes to rfc8785.
    `known_safe` says the caller knows those conditions hold (it skips the walk through `value`).
    """
    if known_safe or _jcs_safe(value):
        try:
            return _FAST_JSON.encode(value).encode("utf-8")
        except UnicodeEncodeError:
            pass  # a lone surrogate: rfc8785 refuses it as it should
    data: bytes = rfc8785.dumps(value)
    return data


def _jcs_safe(value: Any) -> bool:
    """Whether `value` is made only of what `canonical_json`'s fast path writes as RFC 8785 does:
    dicts with ASCII str keys, lists, str, bool, None and ints in the safe range (exact types, no
    subclasses: an IntEnum or a str subclass goes the slow way)."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(-_MAX_SAFE_INT <= value <= _MAX_SAFE_INT)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not key.isascii() or not _jcs_safe(item):
                return False
        return True
    if kind is list:
        return all(_jcs_safe(item) for item in value)
    return False


def _take_patient(fields: dict[str, Any], personal: event_types.PersonalFields) -> str | None:
    """Remove the patient id from an entry's fields (it becomes `subject`), wherever the payload's
    type marks it as personal data: a patient id field, a principal id field holding a patient's
    id, or such a field within a message the payload holds (the erasure certificate)."""
    found: str | None = None
    for name in personal.patient_ids:
        value = fields.get(name)
        if isinstance(value, str) and value:
            found = found or value
            del fields[name]
    for name in personal.principal_ids:
        value = fields.get(name)
        if isinstance(value, str) and value.startswith(PATIENT_PREFIX):
            found = found or value
            del fields[name]
    for name, inner in personal.nested:
        value = fields.get(name)
        if isinstance(value, dict):
            nested = _take_patient(value, event_types.personal_fields(inner))
            found = found or nested
    return found


def _replace_value(fields: dict[str, Any], old: str, new: str) -> None:
    """Put `new` for `old` wherever it stands, also within a longer string (a key name such as
    `patient-<id>` in an erasure's events) and within lists of messages."""
    for name, value in fields.items():
        fields[name] = _replaced(value, old, new)


def _replaced(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return value.replace(old, new) if old in value else value
    if isinstance(value, dict):
        _replace_value(value, old, new)
    elif isinstance(value, list):
        return [_replaced(v, old, new) for v in value]
    return value


def _hash_long_lists(fields: dict[str, Any]) -> dict[str, list[str]]:
    side: dict[str, list[str]] = {}
    for name in [n for n, v in fields.items() if isinstance(v, list) and len(v) > MAX_LISTED_IDS]:
        values = [str(v) for v in fields.pop(name)]
        digest = sha256_hex(rfc8785.dumps(values))
        fields[f"{name}_sha256"] = digest
        fields[f"{name}_count"] = len(values)
        side[digest] = values
    return side


def _fields_of(message: pb_message.Message) -> dict[str, Any]:
    """A payload's set fields as JSON values: enums by name, timestamps in RFC 3339, bytes in
    hex, 64-bit integers as numbers (ids and versions stay far below 2^53)."""
    out: dict[str, Any] = {}
    for descriptor, value in message.ListFields():
        plan = _PLANS.get(descriptor)
        if plan is None:
            plan = _PLANS[descriptor] = (descriptor.is_repeated, _converter(descriptor))
        repeated, convert = plan
        if convert is None:  # strings, integers, booleans: as they are
            out[descriptor.name] = list(value) if repeated else value
        elif repeated:
            out[descriptor.name] = [convert(v) for v in value]
        else:
            out[descriptor.name] = convert(value)
    return out


# Per field: whether it is repeated and how its values become JSON (None: as they are). Made
# once per field, not per value: _fields_of runs for every event the log takes in.
_PLANS: dict[FieldDescriptor, tuple[bool, Callable[[Any], Any] | None]] = {}


_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_FLOAT_TYPES = frozenset({FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT})


def _safe_integer(value: int) -> int:
    """A 64-bit integer field's value if RFC 8785 represents it exactly; otherwise the payload
    cannot be an entry as it is (`draft_of` keeps it as `unprocessable`, by hash)."""
    if -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
        return value
    raise ValueError(f"integer {value} is beyond what RFC 8785 represents exactly (2**53 - 1)")


@functools.cache
def _float_free(descriptor: Descriptor) -> bool:
    """Whether a message type has no float fields, in itself or in the messages it holds: then
    `_fields_of` makes only values that `canonical_json` may write on its fast path (proto3
    strings are valid UTF-8, field names ASCII, integers range-checked)."""
    seen: set[str] = set()
    pending = [descriptor]
    while pending:  # a loop, not recursion: message types may hold themselves
        message = pending.pop()
        if message.full_name in seen:
            continue
        seen.add(message.full_name)
        for f in message.fields:
            if f.type in _FLOAT_TYPES:
                return False
            if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type is not None:
                pending.append(f.message_type)
    return True


def _converter(descriptor: FieldDescriptor) -> Callable[[Any], Any] | None:
    if descriptor.type in _INT64_TYPES:
        return _safe_integer
    if descriptor.type == FieldDescriptor.TYPE_ENUM and descriptor.enum_type is not None:
        names = {number: v.name for number, v in descriptor.enum_type.values_by_number.items()}
        return lambda value: names.get(value, int(value))
    if descriptor.type == FieldDescriptor.TYPE_MESSAGE:
        if descriptor.message_type is not None and descriptor.message_type.full_name == "google.protobuf.Timestamp":
            return lambda value: rfc3339(value.seconds + value.nanos / 1e9)
        return _fields_of
    if descriptor.type == FieldDescriptor.TYPE_BYTES:
        return lambda value: bytes(value).hex()
    if descriptor.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return float
    return None


_JSON_TYPES = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BOOL: "boolean",
    FieldDescriptor.TYPE_BYTES: "string (hex)",
    FieldDescriptor.TYPE_ENUM: "string (enum name)",
    FieldDescriptor.TYPE_DOUBLE: "number",
    FieldDescriptor.TYPE_FLOAT: "number",
}


def schema_markdown() -> str:
    """The README's table of entry types and their fields (a test keeps the two equal)."""
    lines = ["| type | event | fields besides the common ones |", "|---|---|---|"]
    # The platform's own event types: a type a test (or a deployment) declares elsewhere is
    # logged just the same, but is not the platform's to document.
    for known in (t for t in event_types.known() if t.message_class.DESCRIPTOR.file.name.startswith(_PLATFORM_EVENTS)):
        described = []
        patient_ids = event_types.personal_fields(known.message_class.DESCRIPTOR).patient_ids
        for f in known.message_class.DESCRIPTOR.fields:
            if f.name in patient_ids:
                described.append(f"(`{f.name}` → `subject`)")
                continue
            if f.name in known.on_behalf_of_fields:
                described.append(f'`{f.name}` "{SUBJECT_ITSELF}" when a guardian acted for the patient')
                continue
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                timestamp = f.message_type is not None and f.message_type.full_name == "google.protobuf.Timestamp"
                kind = "string (RFC 3339)" if timestamp else "object"
            else:
                kind = _JSON_TYPES.get(f.type, "integer")
            if f.is_repeated:
                kind = f"array of {kind}; over {MAX_LISTED_IDS}: `{f.name}_sha256`, `{f.name}_count`"
            described.append(f"`{f.name}` {kind}")
        lines.append(f"| `{known.entry_type}` | `{known.full_name.rsplit('.', 1)[1]}` | {', '.join(described)} |")
    lines.append(
        "| `entry.redacted` | (`RedactEntry`) | `redacted_index` integer, `redacted_leaf_hash` string (hex), "
        "`reason` string, `redacted_by` string |"
    )
    lines.append(
        "| `unprocessable` | (anything else) | `reason` string, `raw_sha256` string (hex), `raw_bytes` integer; "
        "`event_type` string, or `topic` string, `partition` integer, `offset` integer |"
    )
    return "\n".join(lines)
