"""FHIR R4 search in the patient compartment, without I/O: which search terms a resource has, how a
query's values become the same terms, and FHIR's date matching.

Tokens (``code``, ``category``, ``status``, ``identifier``, ...) are exact matches: every value a
resource has for a parameter of ``TOKEN_PARAMETERS`` (``medledger_runtime.fhir_search``, the table
the FHIR gateway reads too) becomes terms in FHIR's three forms (``system|code``, ``code`` for any
system, ``|code`` for no system), each folded with the resource
type and the parameter into one byte string (:func:`term`). ``search.py`` stores only their HMACs
(the blind index), never the terms. Dates are not indexed: they are matched after decryption
within the patient's compartment (:func:`resource_dates`, :func:`date_matches`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

from medledger_runtime.errors import InvalidArgument
from medledger_runtime.fhir_search import DATE_ELEMENTS, DATE_PREFIXES, TOKEN_PARAMETERS

TERM_DOMAIN = b"medledger:records-search:term:v1\n"

# Bounds of what a search may ask (each beyond is INVALID_ARGUMENT naming the field).
MAX_TOKEN_MATCHES = 10
MAX_VALUES_PER_MATCH = 50
MAX_VALUE_CHARS = 512
MAX_DATE_MATCHES = 4
MAX_RECORD_IDS = 100
MAX_LAST_UPDATED = 4


def check_resource_type(resource_type: str) -> str:
    """A FHIR R4 resource type, required."""
    if not resource_type:
        raise InvalidArgument.field("resource_type", "required: the FHIR resource type searched")
    if len(resource_type) > 64 or not resource_type.isalpha():
        raise InvalidArgument.field("resource_type", "not a FHIR R4 resource type")
    try:
        get_fhir_model_class(resource_type)
    except (KeyError, ValueError):
        raise InvalidArgument.field("resource_type", "not a FHIR R4 resource type") from None
    return resource_type


# -- tokens ---------------------------------------------------------------------------------------

# The three forms of a token value (FHIR R4 search, "token"): `system|code`, `code` (any system)
# and `|code` (no system).
WITH_SYSTEM, ANY_SYSTEM, NO_SYSTEM = "system", "any", "none"


def term(resource_type: str, parameter: str, form: str, system: str, code: str) -> bytes:
    """One search term as the bytes that are HMACed: the resource type and the parameter are part
    of it, so that a code under one parameter never matches another. JSON keeps it unambiguous."""
    return (
        TERM_DOMAIN
        + json.dumps([resource_type, parameter, form, system, code], ensure_ascii=False, separators=(",", ":")).encode()
    )


def _codes(value: Any) -> Iterator[tuple[str, str]]:
    """(system, code) of each value of an element: a code, a Coding, a CodeableConcept or an
    Identifier (the shape tells which), or a list of them."""
    if isinstance(value, list):
        for each in value:
            yield from _codes(each)
    elif isinstance(value, str):
        if value:
            yield "", value
    elif isinstance(value, dict):
        if isinstance(value.get("coding"), list):
            yield from _codes(value["coding"])
        code = value.get("code", value.get("value"))
        system = value.get("system", "")
        if isinstance(code, str) and code and isinstance(system, str):
            yield system, code


def _forms(system: str, code: str) -> Iterator[tuple[str, str, str]]:
    yield ANY_SYSTEM, "", code
    if system:
        yield WITH_SYSTEM, system, code
    else:
        yield NO_SYSTEM, "", code


def resource_terms(resource: Mapping[str, Any]) -> set[bytes]:
    """Every search term of a FHIR resource (none for a type without indexed parameters)."""
    resource_type = resource.get("resourceType")
    parameters = TOKEN_PARAMETERS.get(resource_type) if isinstance(resource_type, str) else None
    if not parameters or not isinstance(resource_type, str):
        return set()
    terms = set()
    for parameter, element in parameters.items():
        for system, code in _codes(resource.get(element)):
            for form, s, c in _forms(system, code):
                terms.add(term(resource_type, parameter, form, s, c))
    return terms


def _split_token(value: str) -> tuple[str | None, str] | None:
    """(system, code) with FHIR's escapes undone (backslash before |, comma, $ or backslash);
    system None when there is no `|`. None when malformed."""
    parts: list[str] = [""]
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\":
            if i + 1 >= len(value) or value[i + 1] not in "|,$\\":
                return None
            parts[-1] += value[i + 1]
            i += 2
            continue
        if ch == "|":
            parts.append("")
        else:
            parts[-1] += ch
        i += 1
    if len(parts) == 1:
        return None, parts[0]
    if len(parts) != 2:
        return None
    return parts[0], parts[1]


def query_term(resource_type: str, parameter: str, value: str, field: str) -> bytes:
    """The term a query's token value looks up: `system|code`, `|code` or `code`."""
    if not value or len(value) > MAX_VALUE_CHARS:
        raise InvalidArgument.field(field, f"a token value is 1-{MAX_VALUE_CHARS} characters")
    if any(ord(ch) < 0x20 for ch in value):
        raise InvalidArgument.field(field, "a token value has no control characters")
    split = _split_token(value)
    if split is None:
        raise InvalidArgument.field(field, "not a token: system|code, |code or code (escape | as \\|)")
    system, code = split
    if not code:
        raise InvalidArgument.field(field, "a code is required (system| alone is not supported)")
    if system is None:
        return term(resource_type, parameter, ANY_SYSTEM, "", code)
    if system == "":
        return term(resource_type, parameter, NO_SYSTEM, "", code)
    return term(resource_type, parameter, WITH_SYSTEM, system, code)


def check_token_parameter(resource_type: str, parameter: str, field: str) -> None:
    if parameter not in TOKEN_PARAMETERS.get(resource_type, {}):
        known = ", ".join(sorted(TOKEN_PARAMETERS.get(resource_type, {}))) or "none"
        raise InvalidArgument.field(
            field, f"not a token parameter searchable on {resource_type} (modifiers unsupported); known: {known}"
        )


# -- dates ----------------------------------------------------------------------------------------

EARLIEST = datetime.min.replace(tzinfo=UTC)
LATEST = datetime.max.replace(tzinfo=UTC)
_DATE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?"
)


@dataclass(frozen=True)
class DateRange:
    """The instants a FHIR date stands for, at its precision: [low, high)."""

    low: datetime
    high: datetime


def _plus(start: datetime, delta: timedelta) -> datetime:
    try:
        return start + delta
    except OverflowError:
        return LATEST


def _next_month(year: int, month: int, tz: Any) -> datetime:
    if month == 12:
        return LATEST if year == 9999 else datetime(year + 1, 1, 1, tzinfo=tz)
    return datetime(year, month + 1, 1, tzinfo=tz)


def parse_date(text: str) -> DateRange | None:
    """A FHIR date, dateTime or instant as the range its precision covers (a year, a month, a day,
    a minute, a second or a fraction of one); without a time zone, UTC. None when malformed."""
    match = _DATE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    tz: Any = UTC
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        if hours > 14 or minutes > 59:
            return None
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        if month is None:
            low = datetime(int(year), 1, 1, tzinfo=tz)
            high = LATEST if int(year) == 9999 else datetime(int(year) + 1, 1, 1, tzinfo=tz)
        elif day is None:
            low = datetime(int(year), int(month), 1, tzinfo=tz)
            high = _next_month(int(year), int(month), tz)
        elif hour is None:
            low = datetime(int(year), int(month), int(day), tzinfo=tz)
            high = _plus(low, timedelta(days=1))
        elif second is None:
            low = datetime(int(year), int(month), int(day), int(hour), int(minute), tzinfo=tz)
            high = _plus(low, timedelta(minutes=1))
        else:
            low = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=tz)
            if fraction:
                digits = fraction[:6]
                low = low.replace(microsecond=int(digits.ljust(6, "0")))
                high = _plus(low, timedelta(microseconds=10 ** (6 - len(digits))))
            else:
                high = _plus(low, timedelta(seconds=1))
        return DateRange(low.astimezone(UTC), high.astimezone(UTC) if high is not LATEST else LATEST)
    except (ValueError, OverflowError):
        return None


def parse_date_query(value: str, field: str) -> tuple[str, DateRange]:
    """A date search value: an optional prefix (eq by default) and a FHIR date."""
    if not value or len(value) > 64:
        raise InvalidArgument.field(field, "a date: [prefix]YYYY[-MM[-DD[Thh:mm[:ss[.fff]][zone]]]]")
    prefix = "eq"
    if value[:2].isalpha():
        prefix, value = value[:2], value[2:]
        if prefix not in DATE_PREFIXES:
            raise InvalidArgument.field(field, f"unknown prefix; one of {', '.join(sorted(DATE_PREFIXES))}")
    found = parse_date(value)
    if found is None:
        raise InvalidArgument.field(field, "not a FHIR date: YYYY[-MM[-DD[Thh:mm[:ss[.fff]][zone]]]]")
    return prefix, found


def _element(resource: Mapping[str, Any], name: str) -> Any:
    """An element, or the first of its `[x]` forms that holds a date."""
    if name in resource:
        return resource[name]
    for suffix in ("DateTime", "Period", "Instant", "Date"):
        if name + suffix in resource:
            return resource[name + suffix]
    return None


def _as_range(value: Any) -> DateRange | None:
    if isinstance(value, str):
        return parse_date(value)
    if isinstance(value, dict) and ("start" in value or "end" in value):
        start = parse_date(value["start"]) if isinstance(value.get("start"), str) else None
        end = parse_date(value["end"]) if isinstance(value.get("end"), str) else None
        if ("start" in value and start is None) or ("end" in value and end is None):
            return None
        # An open end is unbounded: an ongoing encounter lasts until now and beyond.
        return DateRange(start.low if start else EARLIEST, end.high if end else LATEST)
    return None


def resource_date(resource: Mapping[str, Any]) -> DateRange | None:
    """The clinical date of a resource (``DATE_ELEMENTS``), or None when it has none."""
    resource_type = resource.get("resourceType")
    for name in DATE_ELEMENTS.get(resource_type, ()) if isinstance(resource_type, str) else ():
        found = _as_range(_element(resource, name))
        if found is not None:
            return found
    return None


def date_matches(prefix: str, wanted: DateRange, found: DateRange, now: datetime) -> bool:
    """FHIR R4's prefixes (search.html#prefix), the resource's range against the value's."""
    contained = wanted.low <= found.low and found.high <= wanted.high
    if prefix == "eq":
        return contained
    if prefix == "ne":
        return not contained
    if prefix == "gt":
        return found.high > wanted.high
    if prefix == "lt":
        return found.low < wanted.low
    if prefix == "ge":
        return found.high > wanted.high or contained
    if prefix == "le":
        return found.low < wanted.low or contained
    if prefix == "sa":
        return found.low >= wanted.high
    if prefix == "eb":
        return found.high <= wanted.low
    if prefix == "ap":
        # Approximately: within 10% of the distance between now and the value (at least a day).
        margin = max(abs(now - wanted.low) / 10, timedelta(days=1))
        low = wanted.low - margin if wanted.low - EARLIEST > margin else EARLIEST
        high = wanted.high + margin if LATEST - wanted.high > margin else LATEST
        return found.low < high and found.high > low
    raise ValueError(prefix)


LAST_UPDATED_PREFIXES = frozenset({"eq", "gt", "ge", "lt", "le", "sa", "eb"})


def last_updated_bounds(prefix: str, wanted: DateRange) -> tuple[float | None, float | None]:
    """`_lastUpdated` as bounds on a write time (an instant, in seconds): (from, inclusive;
    before, exclusive), None where unbounded. The prefixes of LAST_UPDATED_PREFIXES."""
    low, high = wanted.low.timestamp(), wanted.high.timestamp() if wanted.high != LATEST else None
    if prefix == "eq":
        return low, high
    if prefix in ("gt", "sa"):
        return high if high is not None else float("inf"), None
    if prefix == "ge":
        return low, None
    if prefix in ("lt", "eb"):
        return None, low
    if prefix == "le":
        return None, high
    raise ValueError(prefix)
