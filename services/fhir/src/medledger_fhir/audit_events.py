"""FHIR AuditEvent search over audit's export: "who saw my data".

``GET [base]/AuditEvent?patient=Patient/pat-…`` answers a searchset Bundle of the AuditEvents
audit renders from its log (``ExportAuditEvents``), oldest first, paged by audit's page token
(``_cursor`` in the ``next`` link). audit decides who may: the patient themself (the default
when ``patient`` is left out), a guardian they appointed, auditors (any patient, or all);
anyone else gets 403. ``date`` and ``_lastUpdated`` (the AuditEvent's ``recorded``, the entry's
integrated time) narrow the range in audit; ``action`` and ``subtype`` (the entry type, e.g.
``record.disclosed``) filter each page here, so a page may hold fewer than ``_count``.
The Bundle has no ``total``: audit does not count.
"""

from __future__ import annotations

import calendar
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import grpc
from aiohttp import web
from google.protobuf.timestamp_pb2 import Timestamp
from medledger.audit.v1 import audit_service_pb2 as audit_pb

from medledger_fhir import principal_refs
from medledger_fhir.backends import Backends, caller_metadata
from medledger_fhir.capability import SearchParam, TypeSupport
from medledger_fhir.http import BASE_PATH, base_url, fhir_response, strict_handling
from medledger_fhir.outcomes import FhirError, answer_errors
from medledger_runtime.http_server import HttpRoute
from medledger_sdk.calls import RpcError

DEFAULT_COUNT, MAX_COUNT = 100, 1000
ENTRY_TYPE_SYSTEM = "urn:medledger:audit-entry-type"
_ACTIONS = frozenset("CRUDE")
_SEARCH_PARAMS = frozenset({"patient", "date", "_lastUpdated", "action", "subtype", "_count", "_cursor"})
# A FHIR date, dateTime or instant: year, month, day, then a time (seconds, fraction optional).
_DATE = re.compile(
    r"(?P<y>[0-9]{4})(?:-(?P<m>[0-9]{2})(?:-(?P<d>[0-9]{2})"
    r"(?:T(?P<H>[0-9]{2}):(?P<M>[0-9]{2})(?::(?P<S>[0-9]{2})(?P<f>\.[0-9]{1,9})?)?"
    r"(?P<z>Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?"
)
_PREFIX = re.compile(r"(eq|ge|gt|le|lt)?(.*)")

SUPPORTS = {
    "AuditEvent": TypeSupport(
        interactions=("search-type",),
        search_params=(
            SearchParam("patient", "reference", "whose data (default: the caller, a patient)"),
            SearchParam("date", "date", "when recorded: eq, ge, gt, le, lt"),
            SearchParam("_lastUpdated", "date", "as date"),
            SearchParam("action", "token", "C, R, U, D or E"),
            SearchParam("subtype", "token", f"the log entry type ({ENTRY_TYPE_SYSTEM}), e.g. record.disclosed"),
        ),
        versioning="no-version",
        documentation="Who did what with a patient's data, from the transparency log; paged, oldest first.",
    )
}


@dataclass(frozen=True)
class Range:
    """Recorded at or after `start`, before `end` (seconds since the epoch; None: open)."""

    start: float | None = None
    end: float | None = None

    def narrowed(self, start: float | None, end: float | None) -> Range:
        starts = [x for x in (self.start, start) if x is not None]
        ends = [x for x in (self.end, end) if x is not None]
        return Range(max(starts) if starts else None, min(ends) if ends else None)


def period_of(text: str) -> tuple[float, float]:
    """The instants a FHIR date value covers, [start, end), at its precision: ``2026`` is the
    year, ``2026-12-07T10:00`` the minute. 400 for anything else."""
    match = _DATE.fullmatch(text)
    if match is None:
        raise FhirError(400, "a date is YYYY, YYYY-MM, YYYY-MM-DD or a dateTime with its zone")
    g = match.groupdict()
    if g["H"] is not None and g["z"] is None:
        raise FhirError(400, "a dateTime with a time has a zone (Z or ±hh:mm)")
    try:
        year, month, day = int(g["y"]), int(g["m"] or 1), int(g["d"] or 1)
        hour, minute, second = int(g["H"] or 0), int(g["M"] or 0), int(g["S"] or 0)
        start = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        raise FhirError(400, "not a date") from None
    offset = 0
    if g["z"] and g["z"] != "Z":
        sign = 1 if g["z"][0] == "+" else -1
        offset = sign * (int(g["z"][1:3]) * 3600 + int(g["z"][4:6]) * 60)
    begin = start.timestamp() - offset
    if g["f"]:
        return begin + float(g["f"]), begin + float(g["f"]) + 10.0 ** -(len(g["f"]) - 1)
    if g["S"] is not None:
        return begin, begin + 1
    if g["M"] is not None:
        return begin, begin + 60
    if g["d"] is not None:
        return begin, begin + 86400
    if g["m"] is not None:
        return begin, begin + calendar.monthrange(year, month)[1] * 86400
    return begin, datetime(year + 1, 1, 1, tzinfo=UTC).timestamp()


def date_range(values: list[str], narrowed: Range | None = None) -> Range:
    """The range several FHIR date parameters (all must hold) leave: ``ge``/``gt``/``le``/``lt``/
    ``eq`` (the default) against each value's period."""
    out = narrowed or Range()
    for value in values:
        match = _PREFIX.fullmatch(value)
        assert match is not None  # (.*) matches anything
        prefix, text = match.group(1) or "eq", match.group(2)
        if not text[:1].isdigit():
            raise FhirError(400, "date prefixes are eq, ge, gt, le and lt")
        start, end = period_of(text)
        bound = {"ge": (start, None), "gt": (end, None), "le": (None, end), "lt": (None, start), "eq": (start, end)}
        out = out.narrowed(*bound[prefix])
    return out


def _token_codes(values: list[str], system: str | None) -> set[str]:
    """Codes of token parameter values (comma = any): ``code``, or ``system|code`` in `system`."""
    codes = set()
    for value in values:
        for token in value.split(","):
            wanted_system, bar, code = token.rpartition("|")
            if bar and wanted_system and wanted_system != system:
                raise FhirError(400, f"{token}: not a system of this parameter")
            codes.add(code)
    return codes


def matches(event: Mapping[str, Any], actions: set[str], subtypes: set[str]) -> bool:
    if actions and event.get("action") not in actions:
        return False
    return not subtypes or any(c.get("code") in subtypes for c in event.get("subtype") or [])


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def export_request(query: Mapping[str, str], getall: Any) -> audit_pb.ExportAuditEventsRequest:
    """The ExportAuditEvents a search asks for (patient, range, page); 400 for bad values."""
    patient_id = ""
    if "patient" in query:
        patient_id = principal_refs.from_reference(query["patient"], ("pat",)) or ""
        if not patient_id:
            raise FhirError(400, "patient is a Patient reference, Patient/pat-…")
    text = query.get("_count", str(DEFAULT_COUNT))
    if not re.fullmatch(r"[0-9]{1,9}", text) or not 0 < int(text) <= MAX_COUNT:
        raise FhirError(400, f"_count is 1 to {MAX_COUNT}")
    span = date_range([*getall("date", []), *getall("_lastUpdated", [])])
    request = audit_pb.ExportAuditEventsRequest(
        patient_id=patient_id, page_size=int(text), page_token=query.get("_cursor", "")
    )
    if span.start is not None:
        request.time_from.CopyFrom(_timestamp(max(span.start, 0.0)))
    if span.end is not None:
        if span.end <= max(span.start or 0.0, 0.0):
            raise FhirError(400, "the date range is empty")
        request.time_before.CopyFrom(_timestamp(span.end))
    return request


def routes(backends: Backends, *, public_base_url: str) -> list[HttpRoute]:
    audit = backends.audit

    @answer_errors
    async def search(request: web.Request) -> web.StreamResponse:
        query = request.query
        unknown = sorted(set(query) - _SEARCH_PARAMS)
        if unknown and strict_handling(request):
            raise FhirError(400, f"unknown search parameters: {', '.join(unknown)}")
        export = export_request(query, query.getall)
        actions = _token_codes(query.getall("action", []), "http://hl7.org/fhir/audit-event-action")
        if actions - _ACTIONS:
            raise FhirError(400, "action is C, R, U, D or E")
        subtypes = _token_codes(query.getall("subtype", []), ENTRY_TYPE_SYSTEM)
        try:
            page = await audit.ExportAuditEvents(export, metadata=caller_metadata(request))
        except grpc.aio.AioRpcError as exc:
            if isinstance(exc, RpcError) and exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                # audit's words about its request fields; the client sent search parameters.
                raise FhirError(400, exc.message) from None
            raise
        exported = json.loads(page.fhir_bundle_json)
        base = base_url(request, public_base_url)
        kept = [e["resource"] for e in exported.get("entry", []) if matches(e["resource"], actions, subtypes)]
        params = [(k, v) for k, v in query.items() if k in _SEARCH_PARAMS and k != "_cursor"]
        this_page = [*params, *([("_cursor", query["_cursor"])] if "_cursor" in query else [])]
        links = [{"relation": "self", "url": f"{base}/AuditEvent?" + urlencode(this_page)}]
        if page.next_page_token:
            links.append(
                {
                    "relation": "next",
                    "url": f"{base}/AuditEvent?" + urlencode([*params, ("_cursor", page.next_page_token)]),
                }
            )
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "link": links,
            "entry": [
                {"fullUrl": f"{base}/AuditEvent/{e['id']}", "resource": e, "search": {"mode": "match"}} for e in kept
            ],
        }
        return fhir_response(bundle)

    return [HttpRoute.get(f"{BASE_PATH}/AuditEvent", search)]
