"""What no field of any medledger request may hold, checked for every RPC before its handler.

- A string with a NUL character: PostgreSQL's text types cannot store one, so such an id or
  reason could only fail deep in a query (it did: INTERNAL). No medledger string needs one.
- An id (a string field named `*_id`, but `request_id`, which idempotency limits to 128) longer
  than 64 characters: every medledger id is shorter, and the columns that hold ids are
  VARCHAR(64), so a longer one failed on insert (INTERNAL) where nothing looked it up first.
- A `google.protobuf.Timestamp` or `Duration` outside its documented range (seconds within
  0001-01-01 to 9999-12-31, nanos within one second; durations within ±10,000 years, with
  seconds and nanos of one sign): converting one raised in the handler.

Each is INVALID_ARGUMENT with a BadRequest field violation naming the field's path.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from medledger_runtime.errors import FieldViolation, InvalidArgument

_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE
_TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)
_DURATION_SECONDS = 315_576_000_000
_NANOS = 999_999_999
MAX_ID_CHARS = 64


def _time_violation(message: Message) -> str | None:
    name = message.DESCRIPTOR.full_name
    s, n = getattr(message, "seconds", 0), getattr(message, "nanos", 0)
    if name == "google.protobuf.Timestamp" and (
        not _TIMESTAMP_SECONDS[0] <= s <= _TIMESTAMP_SECONDS[1] or not 0 <= n <= _NANOS
    ):
        return "not a valid Timestamp: seconds from 0001-01-01 to 9999-12-31, nanos from 0 to 999999999"
    if name == "google.protobuf.Duration" and (
        abs(s) > _DURATION_SECONDS or abs(n) > _NANOS or (s > 0 > n) or (s < 0 < n)
    ):
        return "not a valid Duration: at most 10,000 years, seconds and nanos of one sign"
    return None


def violations(message: Message, prefix: str = "") -> list[FieldViolation]:
    """The fields of `message` (and of the messages in it) that hold what no request may."""
    found: list[FieldViolation] = []
    for field, value in message.ListFields():
        path = prefix + field.name
        if field.type == _STRING:
            values = value if field.is_repeated else (value,)
            if any("\x00" in v for v in values):
                found.append(FieldViolation(path, "must not contain NUL characters"))
            elif (
                field.name.endswith("_id") and field.name != "request_id" and any(len(v) > MAX_ID_CHARS for v in values)
            ):
                found.append(FieldViolation(path, f"an id: at most {MAX_ID_CHARS} characters"))
        elif (
            field.type == _MESSAGE and field.message_type is not None and not field.message_type.GetOptions().map_entry
        ):
            items = list(value) if field.is_repeated else [value]
            for i, item in enumerate(items):
                item_path = f"{path}[{i}]" if field.is_repeated else path
                problem = _time_violation(item)
                if problem is not None:
                    found.append(FieldViolation(item_path, problem))
                else:
                    found += violations(item, item_path + ".")
    return found


def check_request(request: object) -> None:
    """Raise InvalidArgument naming every field that holds what no request may."""
    if not isinstance(request, Message):
        return
    found = violations(request)
    if found:
        raise InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in found[:5]), violations=tuple(found[:20]))
