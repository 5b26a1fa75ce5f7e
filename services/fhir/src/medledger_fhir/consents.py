"""FHIR Consent over consent's API: read, vread, search in the patient compartment (or by actor),
create (a FHIR Consent POSTed is a grant), and revoke.

Each consent version is the FHIR Consent consent renders and commits to (its salted commitment is
over exactly that document), answered as consent gives it, never re-rendered here. Its id is
consent's, ``<consent>-v<version>`` (``cns-…-v2``): a version is a resource of its own, because
the committed document carries that id. ``Consent/<consent>`` (``cns-…``) reads the latest
version; ``Consent/<id>/_history/<n>`` a given one.

Revoking is an update: ``PUT Consent/<id>`` with ``status`` ``inactive`` and the terms unchanged
(FHIR's own way to withdraw a consent; the revoked version is a new version, the earlier ones stay
readable, so ``DELETE`` — after which a read answers 410 — is not offered: 405). Terms never
change: a different patient or provision is refused (422); grant a new Consent instead.

A POSTed Consent is one grant: one patient, one ``provision`` of type permit or deny for one
actor, its actions (``access`` → read, ``correct`` → write), purposes (HL7 v3 PurposeOfUse),
classes (medledger's data categories, or FHIR resource types, each standing for its category) and
period; each list empty for "all". What consent cannot express (nested provisions, data,
security labels, codes, data periods) is refused with its FHIRPath rather than dropped: a grant
without a restriction the patient wrote would permit more than they meant.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlencode

import grpc
from aiohttp import web
from fhir.resources.R4B.consent import Consent as FhirConsent
from google.protobuf.timestamp_pb2 import Timestamp
from medledger.consent.v1 import consent_service_pb2 as consent_pb
from medledger.types.v1 import vocabulary_pb2
from pydantic import ValidationError

from medledger_fhir import principal_refs
from medledger_fhir.backends import Backends, caller_metadata
from medledger_fhir.capability import SearchParam, TypeSupport
from medledger_fhir.http import (
    BASE_PATH,
    base_url,
    etag,
    fhir_response,
    http_date,
    raw_fhir_response,
    read_resource,
    strict_handling,
    version_from_etag,
    write_request_id,
)
from medledger_fhir.outcomes import FhirError, answer_errors
from medledger_fhir.resource_types import CATEGORY_OF
from medledger_runtime.http_server import HttpRoute
from medledger_sdk.calls import RpcError

# consent's code systems (medledger_consent.fhir), and FHIR's for resource types.
CATEGORY_SYSTEM = "https://medledger.dev/fhir/CodeSystem/data-category"
PURPOSE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ACTION_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentaction"
RESOURCE_TYPE_SYSTEM = "http://hl7.org/fhir/resource-types"

_ACTIONS = {"access": vocabulary_pb2.Action.ACTION_READ, "correct": vocabulary_pb2.Action.ACTION_WRITE}
_PURPOSES = {
    v.name.removeprefix("PURPOSE_OF_USE_"): v.number for v in vocabulary_pb2.PurposeOfUse.DESCRIPTOR.values if v.number
}
_CATEGORIES = {
    v.name.removeprefix("DATA_CATEGORY_").lower(): v.number
    for v in vocabulary_pb2.DataCategory.DESCRIPTOR.values
    if v.number
}
_PROVISION_TYPES = {"permit": consent_pb.PROVISION_TYPE_PERMIT, "deny": consent_pb.PROVISION_TYPE_DENY}
# Restrictions consent cannot express: refused, never dropped (that would widen the grant).
_UNSUPPORTED_PROVISION = ("provision", "data", "dataPeriod", "securityLabel", "code")
# Whom a consent may name as its grantee (consent decides which exist and may be named).
_GRANTEE_KINDS = ("prn", "org", "rsr", "svc")

# `cns-<hex>` (the consent, its latest version) or `cns-<hex>-v<n>` (one version).
_CONSENT_ID = re.compile(r"cns-([0-9a-f]{32})(?:-v([1-9][0-9]{0,8}))?")
# A small count, offset or version: ASCII digits, few enough that int() is cheap and bounded.
_DIGITS = re.compile(r"[0-9]{1,9}")
_STATUSES = {"active": consent_pb.CONSENT_STATUS_ACTIVE, "inactive": consent_pb.CONSENT_STATUS_INACTIVE}
DEFAULT_COUNT, MAX_COUNT = 50, 1000
# A search reads the patient's (or actor's) consents whole, to filter by status and count them
# exactly; beyond this many it refuses rather than answer a wrong total.
MAX_CONSENTS = 10_000
_LIST_PAGE = 1000
_SEARCH_PARAMS = frozenset({"patient", "actor", "status", "_count", "_offset"})

# Where consent's GrantConsent fields are in a FHIR Consent.
_FHIRPATH_OF_FIELD = {
    "patient_id": "Consent.patient",
    "grantee_id": "Consent.provision.actor[0]",
    "provision": "Consent.provision.type",
    "actions": "Consent.provision.action",
    "categories": "Consent.provision.class",
    "purposes": "Consent.provision.purpose",
    "period_start": "Consent.provision.period.start",
    "period_end": "Consent.provision.period.end",
}

SUPPORTS = {
    "Consent": TypeSupport(
        interactions=("read", "vread", "update", "create", "search-type"),
        search_params=(
            SearchParam("patient", "reference", "the patient whose consents (latest versions)"),
            SearchParam("actor", "reference", "the grantee named (latest versions)"),
            SearchParam("status", "token", "active or inactive (revoked)"),
        ),
        read_history=True,
        documentation=(
            "POST a Consent to grant; PUT it back with status inactive to revoke. Each version is "
            "its own id, <consent>-v<n>, as consent commits it; Consent/<consent> reads the latest."
        ),
    )
}


# -- ids -------------------------------------------------------------------------------------------


def consent_ref(fhir_id: str) -> tuple[str, int]:
    """``cns-<hex>[-v<n>]`` → (consent id, version; 0 for the latest); 404 for another id."""
    match = _CONSENT_ID.fullmatch(fhir_id)
    if match is None:
        raise FhirError(404, "no such Consent")
    return f"cns_{match.group(1)}", int(match.group(2) or 0)


# -- a FHIR Consent as a grant ---------------------------------------------------------------------


def _fhirpath(loc: tuple[int | str, ...]) -> str:
    path = "Consent"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _invalid(problems: list[tuple[str, str]]) -> FhirError:
    return FhirError(
        422, "; ".join(f"{path}: {message}" for path, message in problems), expression=tuple(p for p, _ in problems)
    )


def _timestamp(value: datetime | date) -> Timestamp:
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day, tzinfo=UTC)
    elif value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # FHIR requires a zone with a time; read none as UTC
    stamp = Timestamp()
    stamp.FromDatetime(value.astimezone(UTC))
    return stamp


def _codes(value: Any, *, concept: bool) -> list[Mapping[str, Any]]:
    """The codings of a Coding (``concept`` false) or a CodeableConcept."""
    if not isinstance(value, Mapping):
        return []
    if not concept:
        return [value]
    return [c for c in value.get("coding") or [] if isinstance(c, Mapping)]


def _one_code(
    value: Any, table: Mapping[str, int], systems: tuple[str, ...], *, concept: bool, upper: bool = False
) -> int | None:
    """The single vocabulary value a coding names in one of `systems` (or without a system)."""
    found = set()
    for coding in _codes(value, concept=concept):
        if coding.get("system") not in (None, *systems):
            continue
        code = coding.get("code")
        if isinstance(code, str):
            number = table.get(code.upper() if upper else code)
            if number is None:
                return None
            found.add(number)
    return found.pop() if len(found) == 1 else None


def _category(coding: Any) -> int | None:
    if not isinstance(coding, Mapping) or not isinstance(coding.get("code"), str):
        return None
    system, code = coding.get("system"), coding["code"]
    if system == RESOURCE_TYPE_SYSTEM:
        return CATEGORY_OF.get(code)
    if system in (None, CATEGORY_SYSTEM):
        return _CATEGORIES.get(code)
    return None


def valid_consent(resource: Mapping[str, Any]) -> FhirConsent:
    """The body as an R4 Consent; 422 naming each problem's FHIRPath."""
    try:
        return FhirConsent.model_validate(dict(resource))
    except ValidationError as exc:
        raise _invalid([(_fhirpath(tuple(e["loc"])), str(e["msg"])) for e in exc.errors(include_url=False)]) from None


def grant_request(resource: Mapping[str, Any], request_id: str) -> consent_pb.GrantConsentRequest:
    """The GrantConsent a FHIR R4 Consent asks for; 422 naming each problem's FHIRPath."""
    if resource.get("resourceType") != "Consent":
        raise FhirError(400, "the body is not a Consent")
    model = valid_consent(resource)
    problems: list[tuple[str, str]] = []
    if resource.get("status") != "active":
        problems.append(("Consent.status", "a consent is granted active"))
    patient_id = None
    if isinstance(resource.get("patient"), Mapping):
        patient_id = principal_refs.from_fhir_reference(resource["patient"], ("pat",))
    if patient_id is None:
        problems.append(("Consent.patient", "a reference to the patient, Patient/pat-…"))
    provision = resource.get("provision")
    if not isinstance(provision, Mapping):
        problems.append(("Consent.provision", "required: whom the consent permits or denies, what and why"))
        raise _invalid(problems)
    for name in _UNSUPPORTED_PROVISION:
        if provision.get(name):
            problems.append((f"Consent.provision.{name}", "not supported: a grant without it would permit more"))
    provision_type = _PROVISION_TYPES.get(str(provision.get("type")))
    if provision_type is None:
        problems.append(("Consent.provision.type", "permit or deny"))
    actors = provision.get("actor") or []
    grantee_id = None
    if len(actors) != 1:
        problems.append(("Consent.provision.actor", "exactly one actor: post one Consent per grantee"))
    else:
        reference = actors[0].get("reference")
        grantee_id = principal_refs.from_fhir_reference(reference, _GRANTEE_KINDS)
        if grantee_id is None:
            problems.append(("Consent.provision.actor[0].reference", "a Practitioner or Organization of medledger"))
    actions = []
    for i, action in enumerate(provision.get("action") or []):
        number = _one_code(action, _ACTIONS, (ACTION_SYSTEM,), concept=True)
        if number is None:
            problems.append((f"Consent.provision.action[{i}]", "access or correct (consentaction)"))
        else:
            actions.append(number)
    purposes = []
    for i, purpose in enumerate(provision.get("purpose") or []):
        number = _one_code(purpose, _PURPOSES, (PURPOSE_SYSTEM,), concept=False, upper=True)
        if number is None:
            problems.append((f"Consent.provision.purpose[{i}]", "an HL7 v3 purpose of use medledger knows"))
        else:
            purposes.append(number)
    categories = []
    for i, coding in enumerate(provision.get("class") or []):
        number = _category(coding)
        if number is None:
            problems.append((f"Consent.provision.class[{i}]", "a medledger data category or a clinical resource type"))
        else:
            categories.append(number)
    period = model.provision.period if model.provision else None
    start = _timestamp(period.start) if period and period.start else None
    end = _timestamp(period.end) if period and period.end else None
    if start and end and end.ToNanoseconds() <= start.ToNanoseconds():
        problems.append(("Consent.provision.period.end", "after the start"))
    if problems:
        raise _invalid(problems)
    assert patient_id and grantee_id  # else a problem above
    request = consent_pb.GrantConsentRequest(
        request_id=request_id,
        patient_id=patient_id,
        grantee_id=grantee_id,
        provision=provision_type,  # type: ignore[arg-type]
        actions=sorted(set(actions)),  # type: ignore[arg-type]
        categories=sorted(set(categories)),  # type: ignore[arg-type]
        purposes=sorted(set(purposes)),  # type: ignore[arg-type]
    )
    if start:
        request.period_start.CopyFrom(start)
    if end:
        request.period_end.CopyFrom(end)
    return request


def grant_error(error: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError | FhirError:
    """consent's refusal of a grant's content as 422 with the FHIRPath of the field it named;
    anything else as it is."""
    if not isinstance(error, RpcError) or error.code() != grpc.StatusCode.INVALID_ARGUMENT:
        return error
    paths = [_FHIRPATH_OF_FIELD.get(v.field) for v in error.field_violations]
    if not paths or None in paths:
        return error
    return FhirError(422, error.message, expression=tuple(p for p in paths if p))


# -- answers ---------------------------------------------------------------------------------------


def _version_headers(consent: consent_pb.Consent) -> dict[str, str]:
    return {"ETag": etag(consent.version), "Last-Modified": http_date(consent.recorded_at.ToSeconds())}


def searchset(base: str, documents: list[str], *, total: int, self_url: str, next_url: str | None) -> dict[str, Any]:
    """A searchset Bundle of consent's documents, in order."""
    links = [{"relation": "self", "url": self_url}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    entries = []
    for text in documents:
        document = json.loads(text)
        entries.append(
            {"fullUrl": f"{base}/Consent/{document['id']}", "resource": document, "search": {"mode": "match"}}
        )
    return {"resourceType": "Bundle", "type": "searchset", "total": total, "link": links, "entry": entries}


def _count(query: Mapping[str, str]) -> int:
    text = query.get("_count", str(DEFAULT_COUNT))
    # 0: the total only (FHIR's way to count, as fhirpy's count() asks).
    if not _DIGITS.fullmatch(text) or int(text) > MAX_COUNT:
        raise FhirError(400, f"_count is 0 to {MAX_COUNT}")
    return int(text)


def _offset(query: Mapping[str, str]) -> int:
    text = query.get("_offset", "0")
    if not _DIGITS.fullmatch(text) or int(text) > MAX_CONSENTS:
        raise FhirError(400, "_offset is a position this search gave")
    return int(text)


def routes(backends: Backends, *, public_base_url: str) -> list[HttpRoute]:
    consent = backends.consent

    async def get_version(request: web.Request, consent_id: str, version: int) -> consent_pb.GetConsentResponse:
        return await consent.GetConsent(  # type: ignore[no-any-return]
            consent_pb.GetConsentRequest(consent_id=consent_id, version=version), metadata=caller_metadata(request)
        )

    @answer_errors
    async def read(request: web.Request) -> web.StreamResponse:
        consent_id, version = consent_ref(request.match_info["id"])
        found = await get_version(request, consent_id, version)
        return raw_fhir_response(found.fhir_consent_json.encode(), headers=_version_headers(found.consent))

    @answer_errors
    async def vread(request: web.Request) -> web.StreamResponse:
        consent_id, version = consent_ref(request.match_info["id"])
        wanted = request.match_info["vid"]
        if not _DIGITS.fullmatch(wanted) or version not in (0, int(wanted)):
            raise FhirError(404, "no such Consent version")
        found = await get_version(request, consent_id, int(wanted))
        return raw_fhir_response(found.fhir_consent_json.encode(), headers=_version_headers(found.consent))

    @answer_errors
    async def search(request: web.Request) -> web.StreamResponse:
        query = request.query
        unknown = sorted(set(query) - _SEARCH_PARAMS)
        if unknown and strict_handling(request):
            raise FhirError(400, f"unknown search parameters: {', '.join(unknown)}")
        if len(query.getall("patient", [])) + len(query.getall("actor", [])) != 1:
            raise FhirError(400, "search by one patient or one actor")
        patient_id = grantee_id = ""
        if "patient" in query:
            patient_id = principal_refs.from_reference(query["patient"], ("pat",)) or ""
            if not patient_id:
                raise FhirError(400, "patient is a Patient reference, Patient/pat-…")
        else:
            grantee_id = principal_refs.from_reference(query["actor"], _GRANTEE_KINDS) or ""
            if not grantee_id:
                raise FhirError(400, "actor is a Practitioner or Organization reference")
        statuses = set()
        for value in query.getall("status", []):
            for code in value.split(","):
                if code not in _STATUSES:
                    raise FhirError(400, "status is active or inactive")
                statuses.add(_STATUSES[code])
        count, offset = _count(query), _offset(query)
        documents: list[str] = []
        token = ""
        while True:
            page = await consent.ListConsents(
                consent_pb.ListConsentsRequest(
                    patient_id=patient_id, grantee_id=grantee_id, page_size=_LIST_PAGE, page_token=token
                ),
                metadata=caller_metadata(request),
            )
            documents += [
                d
                for c, d in zip(page.consents, page.fhir_consent_json, strict=True)
                if not statuses or c.status in statuses
            ]
            token = page.next_page_token
            if not token:
                break
            if len(documents) >= MAX_CONSENTS:
                raise FhirError(422, f"more than {MAX_CONSENTS} consents: narrow the search", code="too-costly")
        base = base_url(request, public_base_url)
        used = [(k, v) for k, v in query.items() if k in _SEARCH_PARAMS and k not in ("_count", "_offset")]

        def url(at: int) -> str:
            return f"{base}/Consent?" + urlencode([*used, ("_count", str(count)), ("_offset", str(at))])

        more = count > 0 and offset + count < len(documents)
        bundle = searchset(
            base,
            documents[offset : offset + count],
            total=len(documents),
            self_url=url(offset),
            next_url=url(offset + count) if more else None,
        )
        return fhir_response(bundle)

    @answer_errors
    async def create(request: web.Request) -> web.StreamResponse:
        grant = grant_request(await read_resource(request), write_request_id(request, "create:Consent"))
        try:
            granted = await consent.GrantConsent(grant, metadata=caller_metadata(request))
        except grpc.aio.AioRpcError as exc:
            raise grant_error(exc) from None
        document = json.loads(granted.fhir_consent_json)
        location = f"{base_url(request, public_base_url)}/Consent/{document['id']}/_history/{granted.consent.version}"
        headers = {**_version_headers(granted.consent), "Location": location}
        return raw_fhir_response(granted.fhir_consent_json.encode(), status=201, headers=headers)

    @answer_errors
    async def update(request: web.Request) -> web.StreamResponse:
        consent_id, version = consent_ref(request.match_info["id"])
        body = await read_resource(request)
        if body.get("resourceType") != "Consent":
            raise FhirError(400, "the body is not a Consent")
        if not isinstance(body.get("id"), str) or _CONSENT_ID.fullmatch(body["id"]) is None:
            raise FhirError(400, "the body's id is the URL's")
        if consent_ref(body["id"])[0] != consent_id:
            raise FhirError(400, "the body's id is the URL's")
        # Invalid FHIR is refused before the current version is read (a read is a disclosure).
        valid_consent(body)
        latest = await get_version(request, consent_id, 0)
        if "If-Match" in request.headers:
            version = version_from_etag(request.headers["If-Match"], "If-Match")
        if version and version != latest.consent.version:
            raise FhirError(412, f"version {version} is not the latest ({latest.consent.version})")
        current = json.loads(latest.fhir_consent_json)
        changed = [k for k in ("patient", "provision") if body.get(k) != current.get(k)]
        if changed:
            raise _invalid(
                [(f"Consent.{k}", "a consent's terms do not change: revoke it, POST a new one") for k in changed]
            )
        status = body.get("status")
        if status == current["status"]:
            return raw_fhir_response(latest.fhir_consent_json.encode(), headers=_version_headers(latest.consent))
        if status != "inactive":
            raise _invalid([("Consent.status", "inactive revokes; a revoked consent stays revoked")])
        revoked = await consent.RevokeConsent(
            consent_pb.RevokeConsentRequest(
                request_id=write_request_id(request, f"revoke:Consent/{consent_id}"), consent_id=consent_id
            ),
            metadata=caller_metadata(request),
        )
        return raw_fhir_response(revoked.fhir_consent_json.encode(), headers=_version_headers(revoked.consent))

    path = f"{BASE_PATH}/Consent"
    return [
        HttpRoute.get(path, search),
        HttpRoute("POST", path, create),
        HttpRoute.get(path + "/{id}", read),
        HttpRoute("PUT", path + "/{id}", update),
        HttpRoute.get(path + "/{id}/_history/{vid}", vread),
    ]
