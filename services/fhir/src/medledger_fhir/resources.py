"""Instance-level FHIR REST on resources: create (with `If-None-Exist`), read, vread, update
(with `If-Match`) and instance history of clinical resources, which are records; the Provenance
of each record version; and Patient read, which is identity's.

A clinical resource's FHIR id is its record id with `_` written `-` (`rec_3f…` is `rec-3f…`: FHIR
ids allow no `_`), its `meta.versionId` the record version, and records sets both (and
`meta.lastUpdated`) before committing, so a read answers with the bytes committed. A
Provenance's id is `{FHIR id}-{version}` (`rec-3f…-2`): one per record version, never updated. A
Patient's id is the patient's principal id written the same way (`pat-…`).
Every read goes to the service that owns the data with the caller's token and the purpose of
use of the request (`X-Purpose-Of-Use`), so consent decides and the disclosure is logged there.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import grpc
from aiohttp import web
from fhir.resources.R4B import get_fhir_model_class
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.records.v1 import records_service_pb2 as pb
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_fhir.backends import Backends, caller_metadata
from medledger_fhir.capability import SearchParam, TypeSupport
from medledger_fhir.http import (
    BASE_PATH,
    base_url,
    etag,
    fhir_response,
    http_date,
    purpose_of,
    raw_fhir_response,
    read_resource,
    strict_handling,
    version_from_etag,
    write_request_id,
)
from medledger_fhir.ids import fhir_id, service_id
from medledger_fhir.outcomes import FHIR_JSON, FhirError, answer_errors
from medledger_fhir.resource_types import CATEGORY_OF, CLINICAL_TYPES, PATIENT_ELEMENTS
from medledger_runtime.http_server import HttpRoute
from medledger_sdk.calls import RpcError

# --- pure helpers --------------------------------------------------------------------------------

_PATIENT_ID = re.compile(r"pat[-_]([0-9a-f]{32})")


def principal_id_of(patient_id: str) -> str | None:
    """The patient principal id (`pat_…`) of a Patient's FHIR id (`pat-…`, or `pat_…` as is)."""
    match = _PATIENT_ID.fullmatch(patient_id)
    return f"pat_{match.group(1)}" if match else None


def patient_of(resource: dict[str, Any]) -> str:
    """The patient a clinical resource is about: the principal id (`pat_…`) its `subject` or
    `patient` reference names (`Patient/pat-…`, relative or absolute). 422 naming the element
    otherwise: records file every resource under one patient."""
    resource_type = resource.get("resourceType", "Resource")
    for element in PATIENT_ELEMENTS:
        value = resource.get(element)
        if value is None:
            continue
        reference = value.get("reference") if isinstance(value, dict) else None
        parts = reference.split("/") if isinstance(reference, str) else []
        principal_id = principal_id_of(parts[-1]) if len(parts) >= 2 and parts[-2] == "Patient" else None
        if principal_id:
            return principal_id
        raise FhirError(
            422, "the patient must be referenced as Patient/{id}", expression=(f"{resource_type}.{element}",)
        )
    raise FhirError(
        422,
        "a resource is filed under its patient: give a subject (or patient) reference Patient/{id}",
        expression=(f"{resource_type}.{PATIENT_ELEMENTS[0]}",),
    )


@dataclass(frozen=True)
class ExistCriteria:
    """`If-None-Exist`'s query: `identifier=system|value` (any of a comma list) and/or `_id`."""

    identifiers: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()


# What If-None-Exist may name, checked as search parameters are: a FHIR id; an identifier's
# `system|value` (or a value alone), one bar, no whitespace but single spaces, no control character.
_RESOURCE_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_IDENTIFIER = re.compile(r"(?:[^|\s\x00-\x1f]{1,200}\|)?[^|\s\x00-\x1f]{1,200}(?: [^|\s\x00-\x1f]{1,200})*")


def if_none_exist(value: str) -> ExistCriteria:
    identifiers: list[str] = []
    ids: list[str] = []
    query = value.split("?", 1)[1] if "?" in value else value  # `Observation?identifier=…` too
    pairs = parse_qsl(query, keep_blank_values=True)
    if not pairs:
        raise FhirError(400, "If-None-Exist needs a search: identifier=system|value or _id=…")
    for name, values in pairs:
        parts = [v for v in values.split(",") if v]
        if not parts:
            raise FhirError(400, f"If-None-Exist: {name} has no value")
        if name == "identifier":
            if not all(_IDENTIFIER.fullmatch(p) for p in parts):
                raise FhirError(400, "If-None-Exist: identifier is system|value or value")
            identifiers += parts
        elif name == "_id":
            if not all(_RESOURCE_ID.fullmatch(p) for p in parts):
                raise FhirError(400, "If-None-Exist: _id is a resource id")
            ids += parts
        else:
            raise FhirError(400, f"If-None-Exist supports identifier and _id, not {name}")
    return ExistCriteria(tuple(identifiers), tuple(ids))


def provenance_id(record_id: str, version: int) -> str:
    """The FHIR id of a record version's Provenance: `{FHIR id}-{version}`."""
    return f"{fhir_id(record_id)}-{version}"


_TARGET = re.compile(r"(?:.*/)?([A-Z][A-Za-z]+)/([A-Za-z0-9\-._]{1,64})(?:/_history/([0-9]{1,9}))?")


def parse_target(value: str | None) -> tuple[str, str, int] | None:
    """A Provenance search's `target` (`[base/]{type}/{id}[/_history/{vid}]`, a clinical type):
    (type, record id, version or 0); None when it names no record."""
    match = _TARGET.fullmatch(value or "") if value and len(value) <= 512 else None
    if match is None or match.group(1) not in CLINICAL_TYPES:
        return None
    return match.group(1), service_id(match.group(2)), int(match.group(3) or 0)


def parse_provenance_id(value: str) -> tuple[str, int] | None:
    """`{FHIR id}-{version}` → the record id and version; None when it is not one of ours."""
    resource_id, dash, version = value.rpartition("-")
    if not dash or not resource_id or not version.isdigit() or not 0 < int(version) < 2**63:
        return None
    return service_id(resource_id), int(version)


def last_modified(resource: dict[str, Any]) -> str | None:
    """`Last-Modified` from the resource's `meta.lastUpdated`, as records stamped it."""
    meta = resource.get("meta")
    updated = meta.get("lastUpdated") if isinstance(meta, dict) else None
    if not isinstance(updated, str):
        return None
    try:
        moment = datetime.fromisoformat(updated)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return http_date(moment.timestamp())


def prefers_minimal(prefer: str | None) -> bool:
    """`Prefer: return=minimal`: no body, just the headers."""
    if not prefer:
        return False
    return any(p.strip().lower() == "return=minimal" for p in prefer.replace(";", ",").split(","))


def history_count(value: str | None) -> int:
    """`_count` of a history page: 1..100, default 20 (each entry is one read of a version)."""
    if value is None:
        return 20
    if not value.isdigit() or not 0 < int(value) <= MAX_HISTORY_PAGE:
        raise FhirError(400, f"_count must be 1 to {MAX_HISTORY_PAGE}")
    return int(value)


MAX_HISTORY_PAGE = 100


def history_entry(base: str, resource_type: str, record_id: str, version: int, written_at: float, resource: Any) -> Any:
    """One version in a `history` Bundle: the resource, how it came (create for version 1, then
    update) and its answer's status, ETag and time."""
    return {
        "fullUrl": f"{base}/{resource_type}/{fhir_id(record_id)}",
        "resource": resource,
        "request": {
            "method": "POST" if version == 1 else "PUT",
            "url": resource_type if version == 1 else f"{resource_type}/{fhir_id(record_id)}",
        },
        "response": {
            "status": "201 Created" if version == 1 else "200 OK",
            "etag": etag(version),
            "lastModified": datetime.fromtimestamp(written_at, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
        },
    }


def content_error(error: grpc.aio.AioRpcError, resource_type: str) -> FhirError | None:
    """records' refusal of the resource itself (INVALID_ARGUMENT on `content.…`) as FHIR's 422,
    each problem's FHIRPath `{type}.{path}`; None for any other error."""
    if not isinstance(error, RpcError) or error.code() != grpc.StatusCode.INVALID_ARGUMENT:
        return None
    fields = [v.field for v in error.field_violations]
    if not fields or not all(f == "content" or f.startswith("content.") for f in fields):
        return None
    expression = tuple(f"{resource_type}{f.removeprefix('content')}" for f in fields)
    return FhirError(422, error.message or "the resource is not valid FHIR R4", expression=expression)


# --- what the module serves ----------------------------------------------------------------------

CLINICAL_SUPPORT = TypeSupport(
    interactions=("read", "vread", "update", "history-instance", "create"),
    versioning="versioned-update",
    conditional_create=True,
    read_history=True,
)
# A type whose resources name no patient (Medication) cannot be filed from its content alone, so
# it is not created or updated here (a batch or records' own API files it under a patient given
# beside it); it is read like the others.
READ_ONLY_SUPPORT = TypeSupport(interactions=("read", "vread", "history-instance"), read_history=True)
WRITABLE_TYPES = frozenset(
    name
    for name in CLINICAL_TYPES
    if any(element in get_fhir_model_class(name).model_fields for element in PATIENT_ELEMENTS)
)


def declarations() -> dict[str, TypeSupport]:
    return {
        **{name: CLINICAL_SUPPORT if name in WRITABLE_TYPES else READ_ONLY_SUPPORT for name in sorted(CLINICAL_TYPES)},
        # One Provenance per record version, never updated.
        "Provenance": TypeSupport(
            interactions=("read", "search-type"),
            search_params=(
                SearchParam("target", "reference", "the record (version) it is about: {type}/{id}[/_history/{vid}]"),
            ),
            versioning="no-version",
        ),
        # identity's principal: meta.versionId is the principal's version.
        "Patient": TypeSupport(interactions=("read",), versioning="versioned"),
    }


_TYPE = "{type:" + "|".join(sorted(CLINICAL_TYPES)) + "}"
_WRITABLE_TYPE = "{type:" + "|".join(sorted(WRITABLE_TYPES)) + "}"
_ID = "{id:[A-Za-z0-9._-]{1,64}}"
_VID = "{vid:[1-9][0-9]{0,17}}"


def routes(backends: Backends, *, public_base_url: str) -> list[HttpRoute]:
    records, identity = backends.records, backends.identity

    purpose = purpose_of

    def clinical_type(request: web.Request) -> str:
        return request.match_info["type"]

    async def get_record(request: web.Request, record_id: str, version: int) -> pb.GetRecordResponse:
        # NOT_FOUND of a malformed id is records' answer too: the gateway does not guess ids.
        response: pb.GetRecordResponse = await records.GetRecord(
            pb.GetRecordRequest(
                record_id=record_id,
                version=version,
                purpose=purpose(request),
            ),
            metadata=caller_metadata(request),
        )
        return response

    def check_type(got: pb.GetRecordResponse, resource_type: str) -> dict[str, Any]:
        """The record as a resource of the URL's type; a record of another type (or a document)
        is not found at this URL."""
        if got.media_type != FHIR_JSON:
            raise FhirError(404, f"no such {resource_type}")
        resource = json.loads(got.content)
        if not isinstance(resource, dict) or resource.get("resourceType") != resource_type:
            raise FhirError(404, f"no such {resource_type}")
        return resource

    def version_headers(request: web.Request, resource_type: str, record_id: str, version: int) -> dict[str, str]:
        base = base_url(request, public_base_url)
        location = f"{base}/{resource_type}/{fhir_id(record_id)}/_history/{version}"
        return {"ETag": etag(version), "Location": location}

    def answer_version(
        request: web.Request, resource_type: str, record_id: str, got: pb.GetRecordResponse, status: int = 200
    ) -> web.Response:
        resource = check_type(got, resource_type)
        headers = version_headers(request, resource_type, record_id, got.version)
        modified = last_modified(resource)
        if modified:
            headers["Last-Modified"] = modified
        if status == 200:
            # A read's URL is the resource's own: Content-Location says which version it is.
            headers["Content-Location"] = headers.pop("Location")
        return raw_fhir_response(got.content, status=status, headers=headers)

    async def answer_written(
        request: web.Request, resource_type: str, written: pb.PutRecordResponse, status: int
    ) -> web.Response:
        """Location and ETag of the version written and, unless the client prefers minimal, the
        resource as committed (read back: records stamped its id and meta)."""
        headers = version_headers(request, resource_type, written.record_id, written.version)
        if not prefers_minimal(request.headers.get("Prefer")):
            try:
                got = await get_record(request, written.record_id, written.version)
                return answer_version(request, resource_type, written.record_id, got, status)
            except grpc.aio.AioRpcError as exc:
                # A writer consent lets write but not read still learns where its write went.
                if exc.code() != grpc.StatusCode.PERMISSION_DENIED:
                    raise
        # No body to take the time from: the gateway's clock, a moment after records' stamp.
        headers["Last-Modified"] = http_date(time.time())
        return web.Response(status=status, headers=headers)

    async def put(request: web.Request, resource_type: str, message: pb.PutRecordRequest) -> pb.PutRecordResponse:
        try:
            written: pb.PutRecordResponse = await records.PutRecord(message, metadata=caller_metadata(request))
        except grpc.aio.AioRpcError as exc:
            raise content_error(exc, resource_type) or exc from None
        return written

    async def body_of(request: web.Request, resource_type: str) -> dict[str, Any]:
        resource = await read_resource(request)
        if resource["resourceType"] != resource_type:
            raise FhirError(
                400, f"the body is a {resource['resourceType']}, not a {resource_type}", expression=("resourceType",)
            )
        return resource

    @answer_errors
    async def create(request: web.Request) -> web.StreamResponse:
        resource_type = clinical_type(request)
        purpose(request)  # a bad header is refused before anything is written
        resource = await body_of(request, resource_type)
        patient_id = patient_of(resource)
        condition = request.headers.get("If-None-Exist")
        if condition is not None:
            existing = await find_existing(request, resource_type, patient_id, if_none_exist(condition))
            if existing is not None:
                return existing
        # The server assigns the id (create ignores one sent); records stamps id and meta.
        resource.pop("id", None)
        written = await put(
            request,
            resource_type,
            pb.PutRecordRequest(
                request_id=write_request_id(request, f"create:{resource_type}"),
                patient_id=patient_id,
                category=CATEGORY_OF[resource_type],  # type: ignore[arg-type]
                content=json.dumps(resource, separators=(",", ":")).encode(),
                media_type=FHIR_JSON,
                assign_fhir_identity=True,
            ),
        )
        return await answer_written(request, resource_type, written, 201)

    async def find_existing(
        request: web.Request, resource_type: str, patient_id: str, criteria: ExistCriteria
    ) -> web.Response | None:
        """Conditional create: None when nothing matches (create), the match (200, no write)
        when one does, 412 when several do. Only matches the caller may read are seen."""
        found: pb.SearchRecordsResponse = await records.SearchRecords(
            pb.SearchRecordsRequest(
                patient_id=patient_id,
                resource_type=resource_type,
                tokens=[pb.TokenMatch(parameter="identifier", values=criteria.identifiers)]
                if criteria.identifiers
                else [],
                record_ids=[service_id(i) for i in criteria.ids],
                purpose=purpose(request),
                page_size=2,
            ),
            metadata=caller_metadata(request),
        )
        if not found.records:
            return None
        if len(found.records) > 1 or found.total > 1:
            raise FhirError(412, "If-None-Exist matches more than one resource")
        match = found.records[0]
        headers = version_headers(request, resource_type, match.summary.record_id, match.summary.latest_version)
        modified = last_modified(json.loads(match.content))
        if modified:
            headers["Last-Modified"] = modified
        if prefers_minimal(request.headers.get("Prefer")):
            return web.Response(status=200, headers=headers)
        return raw_fhir_response(match.content, status=200, headers=headers)

    @answer_errors
    async def read(request: web.Request) -> web.StreamResponse:
        resource_type, record_id = clinical_type(request), service_id(request.match_info["id"])
        return answer_version(request, resource_type, record_id, await get_record(request, record_id, 0))

    @answer_errors
    async def vread(request: web.Request) -> web.StreamResponse:
        resource_type, record_id = clinical_type(request), service_id(request.match_info["id"])
        version = int(request.match_info["vid"])
        return answer_version(request, resource_type, record_id, await get_record(request, record_id, version))

    @answer_errors
    async def update(request: web.Request) -> web.StreamResponse:
        resource_type, record_id = clinical_type(request), service_id(request.match_info["id"])
        purpose(request)  # a bad header is refused before anything is written
        resource = await body_of(request, resource_type)
        if resource.get("id") != request.match_info["id"]:
            raise FhirError(400, "the resource's id must be the id in the URL", expression=(f"{resource_type}.id",))
        patient_id = patient_of(resource)
        if_match = request.headers.get("If-Match")
        expected = version_from_etag(if_match, "If-Match") if if_match is not None else 0
        written = await put(
            request,
            resource_type,
            pb.PutRecordRequest(
                request_id=write_request_id(request, f"update:{resource_type}/{fhir_id(record_id)}"),
                patient_id=patient_id,
                category=CATEGORY_OF[resource_type],  # type: ignore[arg-type]
                content=json.dumps(resource, separators=(",", ":")).encode(),
                media_type=FHIR_JSON,
                record_id=record_id,
                expected_version=expected,
                assign_fhir_identity=True,
            ),
        )
        return await answer_written(request, resource_type, written, 200)

    @answer_errors
    async def history(request: web.Request) -> web.StreamResponse:
        resource_type, record_id = clinical_type(request), service_id(request.match_info["id"])
        count = history_count(request.query.get("_count"))
        page_token = request.query.get("_page_token", "")
        listed: pb.ListRecordVersionsResponse = await records.ListRecordVersions(
            pb.ListRecordVersionsRequest(
                record_id=record_id,
                purpose=purpose(request),
                page_size=count,
                page_token=page_token,
            ),
            metadata=caller_metadata(request),
        )
        if listed.record.resource_type != resource_type:
            raise FhirError(404, f"no such {resource_type}")
        # Each version is read as a vread is: consent asked and the disclosure logged by records.
        got = await asyncio.gather(*(get_record(request, record_id, v.version) for v in listed.versions))
        base = base_url(request, public_base_url)
        entries = [
            history_entry(
                base,
                resource_type,
                record_id,
                v.version,
                v.written_at.seconds + v.written_at.nanos / 1e9,
                check_type(g, resource_type),
            )
            for v, g in zip(listed.versions, got, strict=True)
        ]
        here = f"{base}/{resource_type}/{fhir_id(record_id)}/_history"
        # Links rebuilt from what was understood, not echoed from the request.
        this_page = {"_count": count, **({"_page_token": page_token} if page_token else {})}
        links = [{"relation": "self", "url": f"{here}?{urlencode(this_page)}"}]
        if listed.next_page_token:
            query = urlencode({"_count": count, "_page_token": listed.next_page_token})
            links.append({"relation": "next", "url": f"{here}?{query}"})
        bundle = {
            "resourceType": "Bundle",
            "type": "history",
            "total": listed.record.latest_version,
            "link": links,
            "entry": entries,
        }
        return fhir_response(bundle)

    async def provenance_of(request: web.Request, record_id: str, version: int) -> dict[str, Any]:
        # The Provenance is the version's: read as the version is (consent, logged disclosure).
        got = await get_record(request, record_id, version)
        if not got.provenance_fhir_json:
            raise FhirError(404, "no such Provenance")
        resource: dict[str, Any] = json.loads(got.provenance_fhir_json)
        resource["id"] = provenance_id(record_id, got.version)
        if got.media_type == FHIR_JSON:
            target_type = json.loads(got.content).get("resourceType")
            if isinstance(target_type, str):
                for target in resource.get("target", []):
                    target["reference"] = f"{target_type}/{fhir_id(record_id)}/_history/{got.version}"
        return resource

    @answer_errors
    async def provenance(request: web.Request) -> web.StreamResponse:
        parsed = parse_provenance_id(request.match_info["id"])
        if parsed is None:
            raise FhirError(404, "no such Provenance")
        return fhir_response(await provenance_of(request, *parsed))

    @answer_errors
    async def provenance_search(request: web.Request) -> web.StreamResponse:
        """`Provenance?target={type}/{id}[/_history/{vid}]`: the record's versions' Provenances,
        newest first (one version's with `_history`), each read as the version is."""
        query = request.query
        unknown = sorted(set(query) - {"target", "_count", "_page_token"})
        if unknown and strict_handling(request):
            raise FhirError(400, f"unknown search parameter {unknown[0]!r}", expression=(unknown[0],))
        target = parse_target(query.get("target"))
        if target is None:
            raise FhirError(400, "a Provenance search names its target: target={type}/{id}", expression=("target",))
        resource_type, record_id, version = target
        count = history_count(query.get("_count"))
        page_token = query.get("_page_token", "")
        versions: list[int] = [version] if version else []
        next_token = ""
        if not version:
            listed: pb.ListRecordVersionsResponse = await records.ListRecordVersions(
                pb.ListRecordVersionsRequest(
                    record_id=record_id, purpose=purpose(request), page_size=count, page_token=page_token
                ),
                metadata=caller_metadata(request),
            )
            if listed.record.resource_type != resource_type:
                raise FhirError(404, f"no such {resource_type}")
            versions, next_token = [v.version for v in listed.versions], listed.next_page_token
        found = await asyncio.gather(*(provenance_of(request, record_id, v) for v in versions))
        base = base_url(request, public_base_url)
        here = f"{base}/Provenance"
        target_text = f"{resource_type}/{fhir_id(record_id)}" + (f"/_history/{version}" if version else "")
        this_page: dict[str, Any] = {
            "target": target_text,
            "_count": count,
            **({"_page_token": page_token} if page_token else {}),
        }
        links = [{"relation": "self", "url": f"{here}?{urlencode(this_page)}"}]
        if next_token:
            links.append({"relation": "next", "url": f"{here}?{urlencode({**this_page, '_page_token': next_token})}"})
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "link": links,
            "entry": [{"fullUrl": f"{here}/{r['id']}", "resource": r, "search": {"mode": "match"}} for r in found],
        }
        if not page_token and not next_token:
            bundle["total"] = len(found)
        return fhir_response(bundle)

    @answer_errors
    async def patient(request: web.Request) -> web.StreamResponse:
        principal_id = principal_id_of(request.match_info["id"])
        if principal_id is None:
            raise FhirError(404, "no such Patient")
        got: id_pb.GetPrincipalResponse = await identity.GetPrincipal(
            id_pb.GetPrincipalRequest(
                principal_id=principal_id,
                include_fhir_resource=True,
                purpose=purpose(request),
            ),
            metadata=caller_metadata(request),
        )
        if got.principal.kind != vocab.PrincipalKind.PRINCIPAL_KIND_PATIENT:
            raise FhirError(404, "no such Patient")
        if not got.fhir_resource:
            # A patient's resource is deleted with their keys: what an erasure leaves.
            raise FhirError(410, "this patient's data was erased")
        resource = json.loads(got.fhir_resource)
        resource["id"] = fhir_id(principal_id)
        meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
        resource["meta"] = {**meta, "versionId": str(got.principal.version)}
        return fhir_response(resource, headers={"ETag": etag(got.principal.version)})

    typed, writable = f"{BASE_PATH}/{_TYPE}", f"{BASE_PATH}/{_WRITABLE_TYPE}"
    return [
        HttpRoute("POST", writable, create),
        HttpRoute.get(f"{typed}/{_ID}", read),
        HttpRoute("PUT", f"{writable}/{_ID}", update),
        HttpRoute.get(f"{typed}/{_ID}/_history", history),
        HttpRoute.get(f"{typed}/{_ID}/_history/{_VID}", vread),
        HttpRoute.get(f"{BASE_PATH}/Provenance/{_ID}", provenance),
        HttpRoute.get(f"{BASE_PATH}/Provenance", provenance_search),
        HttpRoute.get(f"{BASE_PATH}/Patient/{_ID}", patient),
    ]
