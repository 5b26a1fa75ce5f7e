"""Search in the patient compartment: `GET [base]/{type}?...`, `POST [base]/{type}/_search` and
`GET [base]/Patient/{id}/$everything`, answered as `searchset` Bundles.

FHIR search parameters are parsed here into records' SearchRecords (token matches through its
blind indexes, dates decrypted and filtered within the compartment); records asks consent once
per category, counts and returns only what the caller may read, and logs every resource returned
before it answers, so `Bundle.total` and paging never reveal a denied resource.

Every search names its patient (`patient` or `subject`): records indexes under the patient's own
search key, so there is no search across patients. Parameter values are bounded (length, count
of parameters and of comma-separated alternatives) and kept as opaque values: nothing here builds
a query from them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import grpc
from aiohttp import web
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.records.v1 import records_service_pb2 as pb

from medledger_fhir.backends import Backends, caller_metadata
from medledger_fhir.capability import SearchParam, TypeSupport
from medledger_fhir.http import BASE_PATH, base_url, fhir_response, purpose_of, strict_handling
from medledger_fhir.ids import fhir_id, service_id
from medledger_fhir.outcomes import FhirError, answer_errors
from medledger_fhir.resource_types import CATEGORY_OF
from medledger_runtime.auth import Caller, ScopeNeed
from medledger_runtime.errors import PermissionDenied
from medledger_runtime.fhir_search import DATE_ELEMENTS, DATE_PREFIXES, TOKEN_PARAMETERS
from medledger_runtime.http_server import HttpRoute

# The paging parameter of `next` links: records' opaque page token, carried as is.
PAGE_TOKEN_PARAM = "_page_token"  # noqa: S105 - a parameter name
DEFAULT_COUNT = 50
MAX_COUNT = 500
# Bounds on what a search may ask: beyond them 400, before any service is called.
MAX_PARAMETERS = 40
MAX_VALUE_CHARS = 512
MAX_ALTERNATIVES = 50
# records' own bounds, checked here first so the answer names the FHIR parameter.
MAX_TOKEN_MATCHES = 10
MAX_DATE_MATCHES = 4
MAX_IDS = 100
MAX_PAGE_TOKEN_CHARS = 2048

# The token search parameters records indexes, by resource type (other types: none), and the
# types with a clinical date records matches `date` against.
TOKEN_PARAMS: dict[str, tuple[str, ...]] = {t: tuple(names) for t, names in TOKEN_PARAMETERS.items()}
DATE_TYPES = frozenset(DATE_ELEMENTS)
SEARCH_TYPES = tuple(sorted(CATEGORY_OF))
# Parameters that name the compartment: `subject` as well, for the types that have one.
COMPARTMENT_PARAMS = ("patient", "subject")
# Result parameters understood (anything else starting with `_` is unknown).
_RESULT_PARAMS = frozenset({"_id", "_lastUpdated", "_count", "_summary", "_include", "_revinclude", PAGE_TOKEN_PARAM})
# Parameters a client sends that change nothing here: the format is always JSON.
_IGNORED = frozenset({"_format", "_pretty"})

# FHIR date / dateTime / instant (datatypes.html#dateTime), without the prefix.
_DATE = re.compile(
    r"-?[0-9]{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12][0-9]|3[01])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9](:([0-5][0-9]|60)(\.[0-9]{1,9})?)?(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00))?)?)?)?"
)
# FHIR ids, and identity's principal ids (`pat_...`), which carry an underscore.
_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# A token: `system|code`, `|code` or `code` (a system is a URI; a code has no whitespace but
# single spaces, FHIR's `code` type).
_TOKEN = re.compile(r"([^|\s]{1,200})?\|?[^|\s]+( [^|\s]+)*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PAGE_TOKEN = re.compile(r"[A-Za-z0-9_\-=.~+/]{1,2048}")

INCLUDE_PATIENT = frozenset({"*"})
REVINCLUDE_PROVENANCE = frozenset({"Provenance:target", "*"})


@dataclass
class SearchQuery:
    """A FHIR search as records' SearchRecords asks it, and the parameters it used (for the
    self link)."""

    resource_type: str
    patient_id: str
    tokens: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    dates: list[str] = field(default_factory=list)
    record_ids: list[str] = field(default_factory=list)
    last_updated: list[str] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    count_only: bool = False
    page_token: str = ""
    include_patient: bool = False
    revinclude_provenance: bool = False
    used: list[tuple[str, str]] = field(default_factory=list)

    def request(self, purpose: int) -> pb.SearchRecordsRequest:
        return pb.SearchRecordsRequest(
            patient_id=self.patient_id,
            resource_type=self.resource_type,
            tokens=[pb.TokenMatch(parameter=name, values=values) for name, values in self.tokens],
            dates=[pb.DateMatch(parameter="date", value=value) for value in self.dates],
            record_ids=self.record_ids,
            last_updated=self.last_updated,
            purpose=purpose,  # type: ignore[arg-type]
            page_size=0 if self.count_only else self.count,
            page_token=self.page_token,
            count_only=self.count_only,
        )

    def link_params(self, page_token: str = "") -> list[tuple[str, str]]:
        """The used parameters (the page token apart), then `_page_token` when given."""
        params = [(k, v) for k, v in self.used if k != PAGE_TOKEN_PARAM]
        return params + ([(PAGE_TOKEN_PARAM, page_token)] if page_token else [])


def _bad(name: str, message: str) -> FhirError:
    # The parameter is named, its value never echoed (it may be hostile or personal).
    return FhirError(400, f"search parameter {name[:64]!r}: {message}")


def patient_reference(name: str, value: str) -> str:
    """`Patient/{id}`, `{id}` or `[base]/Patient/{id}` → the patient's id."""
    ref = value.strip()
    if "/" in ref:
        head, _, ref = ref.rpartition("/")
        if not head.endswith("Patient"):
            raise _bad(name, "must reference a Patient (Patient/{id})")
    if not _ID.fullmatch(ref):
        raise _bad(name, "not a Patient id")
    return service_id(ref)


def date_value(name: str, value: str) -> str:
    prefix = value[:2] if value[:2] in DATE_PREFIXES else ""
    if not _DATE.fullmatch(value[len(prefix) :]):
        raise _bad(name, "must be a FHIR date with an optional prefix (eq ne gt lt ge le sa eb ap)")
    return value


def _alternatives(name: str, value: str) -> tuple[str, ...]:
    # FHIR escapes a literal comma as `\,`; a code never needs one here, so a comma separates.
    values = tuple(v for v in value.split(",") if v)
    if not values:
        raise _bad(name, "empty value")
    if len(values) > MAX_ALTERNATIVES:
        raise _bad(name, f"at most {MAX_ALTERNATIVES} alternatives")
    return values


def parse_search(resource_type: str, params: Sequence[tuple[str, str]], *, strict: bool) -> SearchQuery:
    """The search `params` (in request order) as a SearchQuery; FhirError 400 for a bad value,
    for a missing patient, and (strict handling) for an unknown or unsupported parameter."""
    if len(params) > MAX_PARAMETERS:
        raise FhirError(400, f"at most {MAX_PARAMETERS} search parameters")
    token_names = TOKEN_PARAMS.get(resource_type, ())
    query = SearchQuery(resource_type=resource_type, patient_id="")
    count_given = False

    def unknown(name: str, why: str) -> None:
        if strict:
            raise _bad(name, why)

    for raw_name, value in params:
        if len(raw_name) > 64 or (len(value) > MAX_VALUE_CHARS and raw_name != PAGE_TOKEN_PARAM):
            raise _bad(raw_name, f"names and values are at most {MAX_VALUE_CHARS} characters")
        if _CONTROL.search(raw_name) or _CONTROL.search(value):
            raise _bad(raw_name, "control characters are not allowed")
        name, _, modifier = raw_name.partition(":")
        if name in _IGNORED:
            continue
        if modifier and name not in COMPARTMENT_PARAMS:
            # Modifiers (:text, :not, :missing, ...) would change the meaning: never silently dropped.
            raise _bad(raw_name, "modifiers are not supported")
        if name in COMPARTMENT_PARAMS:
            if modifier and modifier != "Patient":
                raise _bad(raw_name, "only a Patient may be the compartment")
            patient = patient_reference(raw_name, value)
            if query.patient_id and patient != query.patient_id:
                raise _bad(raw_name, "one patient per search (the patient compartment)")
            query.patient_id = patient
        elif name in token_names:
            values = _alternatives(name, value)
            for v in values:
                if not _TOKEN.fullmatch(v):
                    raise _bad(name, "must be a token: system|code, |code or code")
            query.tokens.append((name, values))
        elif name == "date" and resource_type in DATE_TYPES:
            if "," in value:
                raise _bad(name, "alternatives of dates are not supported; repeat the parameter for a range")
            query.dates.append(date_value(name, value))
        elif name == "_lastUpdated":
            if "," in value:
                raise _bad(name, "alternatives of dates are not supported; repeat the parameter for a range")
            query.last_updated.append(date_value(name, value))
        elif name == "_id":
            ids = _alternatives(name, value)
            if not all(_ID.fullmatch(i) for i in ids):
                raise _bad(name, "not a resource id")
            query.record_ids.extend(service_id(i) for i in ids)
        elif name == "_count":
            if not value.isdigit() or len(value) > 6:
                raise _bad(name, "must be a whole number")
            # A server may return fewer than asked (search.html#count): at most MAX_COUNT.
            query.count = min(int(value), MAX_COUNT)
            query.count_only = query.count_only or query.count == 0
            count_given = True
            value = str(query.count)
        elif name == "_summary":
            if value != "count":
                unknown(name, "only _summary=count is supported")
                continue
            query.count_only = True
        elif name == "_include":
            if value in INCLUDE_PATIENT or value in {f"{resource_type}:patient", f"{resource_type}:subject"}:
                query.include_patient = True
            else:
                unknown(name, "only the patient may be included (_include=*)")
                continue
        elif name == "_revinclude":
            if value in REVINCLUDE_PROVENANCE:
                query.revinclude_provenance = True
            else:
                unknown(name, "only _revinclude=Provenance:target is supported")
                continue
        elif name == PAGE_TOKEN_PARAM:
            if not _PAGE_TOKEN.fullmatch(value):
                raise _bad(name, "not a page token of this server")
            query.page_token = value
        else:
            unknown(raw_name, f"not a search parameter of {resource_type} here")
            continue
        query.used.append((raw_name, value))
    for bounded, limit, what in (
        (query.tokens, MAX_TOKEN_MATCHES, "token parameters"),
        (query.dates, MAX_DATE_MATCHES, "date parameters"),
        (query.last_updated, MAX_DATE_MATCHES, "_lastUpdated parameters"),
        (query.record_ids, MAX_IDS, "_id values"),
    ):
        if len(bounded) > limit:
            raise FhirError(400, f"at most {limit} {what} in one search")
    if not query.patient_id:
        raise FhirError(
            400,
            "name the patient (patient=Patient/{id}): search is within one patient's compartment, "
            "since records indexes each patient's resources under that patient's own key",
            expression=("patient",),
        )
    if not count_given and not query.count_only:
        query.used.append(("_count", str(query.count)))
    return query


async def search_params(request: web.Request) -> list[tuple[str, str]]:
    """The query string's parameters and, for POST _search, the form body's (search.html#Introduction)."""
    params = list(request.query.items())
    # A POST without a body (all parameters in the URL) is a search too, whatever its media type.
    if request.method == "POST" and request.body_exists:
        if request.content_type not in ("application/x-www-form-urlencoded", ""):
            raise FhirError(415, "send the search parameters as application/x-www-form-urlencoded")
        form = await request.post()
        params += [(k, v) for k, v in form.items() if isinstance(v, str)]
    return params


def _bundle(base: str, self_params: list[tuple[str, str]], path: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")},
        "type": "searchset",
        "link": [{"relation": "self", "url": _url(base, path, self_params)}],
    }


def _url(base: str, path: str, params: Iterable[tuple[str, str]]) -> str:
    query = urlencode(list(params))
    return f"{base}/{path}" + (f"?{query}" if query else "")


def _match(base: str, resource: dict[str, Any], mode: str = "match", resource_id: str = "") -> dict[str, Any]:
    return {
        "fullUrl": f"{base}/{resource.get('resourceType')}/{resource_id or resource.get('id')}",
        "resource": resource,
        "search": {"mode": mode},
    }


def provenance_resource(raw: bytes, record_id: str, version: int, resource_type: str) -> dict[str, Any]:
    """records' Provenance of a version as `Provenance/{id}` reads it: id `{FHIR id}-{version}`
    (one per version, never updated) and its target referenced as `{type}/{id}/_history/{version}`."""
    resource: dict[str, Any] = json.loads(raw)
    resource["id"] = f"{fhir_id(record_id)}-{version}"
    if resource_type:
        for target in resource.get("target", []):
            target["reference"] = f"{resource_type}/{fhir_id(record_id)}/_history/{version}"
    return resource


def _found(base: str, record: pb.FoundRecord) -> dict[str, Any]:
    return _match(base, json.loads(record.content), resource_id=fhir_id(record.summary.record_id))


async def _provenances(
    backends: Backends, found: Sequence[pb.FoundRecord], purpose: int, metadata: Any
) -> list[dict[str, Any]]:
    """The Provenance of each version returned: GetRecord carries it (a read like any other,
    asked of consent and logged, as the version it belongs to was)."""

    async def one(record: pb.FoundRecord) -> dict[str, Any] | None:
        record_id = record.summary.record_id
        got = await backends.records.GetRecord(
            pb.GetRecordRequest(
                record_id=record_id,
                version=record.receipt.version or record.summary.latest_version,
                purpose=purpose,  # type: ignore[arg-type]
            ),
            metadata=metadata,
        )
        if not got.provenance_fhir_json:
            return None
        return provenance_resource(got.provenance_fhir_json, record_id, got.version, record.summary.resource_type)

    out = await asyncio.gather(*(one(r) for r in found))
    return [p for p in out if p is not None]


async def _patient_resource(backends: Backends, patient_id: str, purpose: int, metadata: Any) -> dict[str, Any] | None:
    """The patient's Patient resource from identity, or None when the caller may not read it
    (identity asks consent for the demographics category)."""
    try:
        got = await backends.identity.GetPrincipal(
            id_pb.GetPrincipalRequest(principal_id=patient_id, include_fhir_resource=True, purpose=purpose),  # type: ignore[arg-type]
            metadata=metadata,
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND):
            return None
        raise
    if not got.fhir_resource:
        return None
    resource: dict[str, Any] = json.loads(got.fhir_resource)
    resource["id"] = fhir_id(patient_id)
    return resource


async def run_search(
    backends: Backends, request: web.Request, resource_type: str, params: Sequence[tuple[str, str]], base: str
) -> dict[str, Any]:
    query = parse_search(resource_type, params, strict=strict_handling(request))
    purpose = purpose_of(request)
    metadata = caller_metadata(request)
    reply = await backends.records.SearchRecords(query.request(purpose), metadata=metadata)
    bundle = _bundle(base, query.link_params(query.page_token), resource_type)
    bundle["total"] = reply.total
    if query.count_only:
        return bundle
    if reply.next_page_token:
        bundle["link"].append(
            {"relation": "next", "url": _url(base, resource_type, query.link_params(reply.next_page_token))}
        )
    entries = [_found(base, r) for r in reply.records]
    if query.include_patient and reply.records:
        patient = await _patient_resource(backends, query.patient_id, purpose, metadata)
        if patient is not None:
            entries.append(_match(base, patient, "include"))
    if query.revinclude_provenance and reply.records:
        entries += [_match(base, p, "include") for p in await _provenances(backends, reply.records, purpose, metadata)]
    bundle["entry"] = entries
    return bundle


# $everything ----------------------------------------------------------------------------------

# The types $everything walks, in this order (each a SearchRecords of the compartment).
EVERYTHING_TYPES = SEARCH_TYPES


@dataclass(frozen=True)
class EverythingCursor:
    """Where a `$everything` page resumes: the index of the type in EVERYTHING_TYPES, records'
    page token within it, and the categories consent denied (not asked again)."""

    type_index: int = 0
    page_token: str = ""
    denied: tuple[int, ...] = ()

    def encode(self) -> str:
        raw = json.dumps([self.type_index, self.page_token, list(self.denied)], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> EverythingCursor:
        if len(text) > MAX_PAGE_TOKEN_CHARS:
            raise _bad(PAGE_TOKEN_PARAM, "not a page token of this server")
        try:
            index, token, denied = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            cursor = cls(int(index), str(token), tuple(int(c) for c in denied))
        except (ValueError, TypeError, binascii.Error):
            raise _bad(PAGE_TOKEN_PARAM, "not a page token of this server") from None
        if not 0 <= cursor.type_index < len(EVERYTHING_TYPES) or len(cursor.denied) > len(CATEGORY_OF):
            raise _bad(PAGE_TOKEN_PARAM, "not a page token of this server")
        return cursor


def everything_params(params: Sequence[tuple[str, str]], *, strict: bool) -> tuple[int, EverythingCursor]:
    count, cursor = DEFAULT_COUNT, EverythingCursor()
    for name, value in params:
        if name == "_count":
            if not value.isdigit() or len(value) > 6 or int(value) == 0:
                raise _bad(name, "must be a whole number above 0")
            count = min(int(value), MAX_COUNT)
        elif name == PAGE_TOKEN_PARAM:
            cursor = EverythingCursor.decode(value)
        elif name not in _IGNORED and strict:
            raise _bad(name, "$everything takes _count only here")
    return count, cursor


async def run_everything(
    backends: Backends, request: web.Request, patient_id: str, params: Sequence[tuple[str, str]], base: str
) -> dict[str, Any]:
    """A page of the patient's $everything: the Patient first (first page), then each type's
    resources the caller may read. A type whose category consent denies is skipped, and that
    category not asked again on later pages."""
    # Only a patient has a compartment: another id (a record's, say) is no Patient, as a read says.
    if not _ID.fullmatch(patient_id) or not patient_id.startswith(("pat-", "pat_")):
        raise FhirError(404, "no such Patient")
    path = f"Patient/{patient_id}/$everything"
    patient_id = service_id(patient_id)
    count, cursor = everything_params(params, strict=strict_handling(request))
    purpose = purpose_of(request)
    metadata = caller_metadata(request)
    entries: list[dict[str, Any]] = []
    first = cursor == EverythingCursor()
    if first:
        patient = await _patient_resource(backends, patient_id, purpose, metadata)
        if patient is not None:
            entries.append(_match(base, patient))
    index, token, denied = cursor.type_index, cursor.page_token, set(cursor.denied)
    next_cursor: EverythingCursor | None = None
    while index < len(EVERYTHING_TYPES):
        resource_type = EVERYTHING_TYPES[index]
        category = CATEGORY_OF[resource_type]
        room = count - len(entries)
        if room <= 0:
            next_cursor = EverythingCursor(index, token, tuple(sorted(denied)))
            break
        if category in denied:
            index, token = index + 1, ""
            continue
        try:
            reply = await backends.records.SearchRecords(
                pb.SearchRecordsRequest(
                    patient_id=patient_id,
                    resource_type=resource_type,
                    purpose=purpose,
                    page_size=room,
                    page_token=token,
                ),
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.PERMISSION_DENIED:
                raise
            denied.add(category)
            index, token = index + 1, ""
            continue
        entries += [_found(base, r) for r in reply.records]
        if reply.next_page_token:
            token = reply.next_page_token
        else:
            index, token = index + 1, ""
    self_params = [("_count", str(count))] + ([] if first else [(PAGE_TOKEN_PARAM, cursor.encode())])
    bundle = _bundle(base, self_params, path)
    if next_cursor is not None:
        bundle["link"].append(
            {
                "relation": "next",
                "url": _url(base, path, [("_count", str(count)), (PAGE_TOKEN_PARAM, next_cursor.encode())]),
            }
        )
    bundle["entry"] = entries
    return bundle


# Routes and declarations -----------------------------------------------------------------------

_TYPES_PATTERN = "|".join(SEARCH_TYPES)


def declarations() -> dict[str, TypeSupport]:
    """search-type for every clinical type (resources.py declares read/create/update beside)."""
    common = (
        SearchParam("patient", "reference", "required: the patient compartment (Patient/{id})"),
        SearchParam("subject", "reference", "as patient"),
        SearchParam("_id", "token"),
        SearchParam("_lastUpdated", "date", "write time; prefixes eq ne gt lt ge le sa eb ap"),
    )
    date = SearchParam("date", "date", "the clinical date; prefixes eq ne gt lt ge le sa eb ap; repeat for a range")
    out = {}
    for resource_type in SEARCH_TYPES:
        own = tuple(SearchParam(p, "token") for p in TOKEN_PARAMS.get(resource_type, ()))
        dated = (date,) if resource_type in DATE_TYPES else ()
        out[resource_type] = TypeSupport(interactions=("search-type",), search_params=common + dated + own)
    return out


def everything_scope(caller: Caller, request: web.Request) -> None:
    """What a scoped token needs for `$everything`: leave to search at least one of the types it
    walks (or to read the Patient). Each type is then searched as its scopes allow (records checks
    each, and a refused type is skipped like a category consent denies); a token that allows none
    is refused whole, as every other route refuses a token beyond its scopes."""
    scopes = caller.scopes
    if scopes is None:
        return
    patient_id = service_id(request.match_info["id"])
    context = caller.patient_context
    if not scopes.permits_for_patient("Patient", "r", patient_id, context) and not any(
        scopes.permits_for_patient(t, "s", patient_id, context) for t in EVERYTHING_TYPES
    ):
        raise PermissionDenied("this token's scopes allow none of the resources $everything returns")


def everything_declaration() -> TypeSupport:
    return TypeSupport(interactions=(), operations=("everything",))


def routes(backends: Backends, *, public_base_url: str) -> list[HttpRoute]:
    @answer_errors
    async def search(request: web.Request) -> web.StreamResponse:
        resource_type = request.match_info["type"]
        params = await search_params(request)
        return fhir_response(
            await run_search(backends, request, resource_type, params, base_url(request, public_base_url))
        )

    @answer_errors
    async def everything(request: web.Request) -> web.StreamResponse:
        params = await search_params(request)
        bundle = await run_everything(
            backends, request, request.match_info["id"], params, base_url(request, public_base_url)
        )
        return fhir_response(bundle)

    return [
        HttpRoute.get(f"{BASE_PATH}/{{type:{_TYPES_PATTERN}}}", search),
        HttpRoute("POST", f"{BASE_PATH}/{{type:{_TYPES_PATTERN}}}/_search", search),
        HttpRoute.get(f"{BASE_PATH}/Patient/{{id}}/$everything", everything, scope=ScopeNeed.by(everything_scope)),
        HttpRoute("POST", f"{BASE_PATH}/Patient/{{id}}/$everything", everything, scope=ScopeNeed.by(everything_scope)),
    ]
