"""FHIR over HTTP: the base URL, JSON bodies in and out, ETags and the headers FHIR asks for."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any, TypeAlias

from aiohttp import web
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_fhir.outcomes import FHIR_JSON, FhirError
from medledger_runtime.auth import current_caller
from medledger_runtime.fhir_json import CONTROL_CHARACTER_RULE, control_character_at

BASE_PATH = "/fhir/R4"
# Media types a FHIR JSON body may come as (http.html#mime): the FHIR one, plain JSON too.
_JSON_TYPES = frozenset({FHIR_JSON, "application/json", "application/json+fhir"})


def base_url(request: web.Request, configured: str) -> str:
    """[base] as the client reaches it: the configured public URL, else this request's host."""
    if configured:
        return configured.rstrip("/")
    return f"{request.scheme}://{request.host}{BASE_PATH}"


def fhir_response(
    resource: dict[str, Any], *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(status=status, text=json.dumps(resource), content_type=FHIR_JSON, headers=headers)


def raw_fhir_response(body: bytes, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """Bytes as committed (a record's content), not re-serialized: the bytes a receipt proves."""
    return web.Response(status=status, body=body, content_type=FHIR_JSON, headers=headers)


async def read_resource(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object: 415 for another media type, 400 when it is not JSON
    or not an object (a FHIR resource). Its validity as FHIR is for records (422)."""
    if request.content_type not in _JSON_TYPES:
        raise FhirError(415, f"send {FHIR_JSON}")
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: nested deeper than the parser goes, which no resource is.
        raise FhirError(400, "the body is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise FhirError(400, "the body is not a FHIR resource (a JSON object with resourceType)")
    where = control_character_at(body)
    if where is not None:
        raise FhirError(422, CONTROL_CHARACTER_RULE, expression=(where,))
    return body


def etag(version: int) -> str:
    return f'W/"{version}"'


def version_from_etag(value: str, header: str) -> int:
    """The version in `W/"3"` (or `"3"`, or `3`); 400 otherwise."""
    text = value.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    if not text.isdigit() or not 0 < int(text) < 2**31:
        raise FhirError(400, f'{header} must be a version ETag such as W/"1"')
    return int(text)


def http_date(seconds: float) -> str:
    """An HTTP date (RFC 9110), for Last-Modified."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


# --- purpose of use ------------------------------------------------------------------------------

# Why the client asks (consent decides on it): an HL7 v3 PurposeOfUse code in this header, as
# tokens carry no purpose. A practitioner's everyday reason when absent; a patient reading their
# own data needs none (the services ignore it then).
PURPOSE_HEADER = "X-Purpose-Of-Use"
# HL7 v3 ActReason, as a Coding's system may name it in the header (`system|code`).
PURPOSE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
DEFAULT_PURPOSE = vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT
Purpose: TypeAlias = vocab.PurposeOfUse.ValueType
PURPOSES: dict[str, Purpose] = {
    v.name.removeprefix("PURPOSE_OF_USE_"): vocab.PurposeOfUse.Value(v.name)
    for v in vocab.PurposeOfUse.DESCRIPTOR.values
    if v.number
}


def purpose_of_use(value: str | None) -> Purpose:
    """The purpose a request states in `X-Purpose-Of-Use`: an HL7 v3 code (`TREAT`, `ETREAT`,
    `HPAYMT`, `HOPERAT`, `HRESCH`, `PATRQT`, `PUBHLTH`), bare or as `system|code`; TREAT when
    absent. 400 for anything else."""
    if value is None or not value.strip():
        return DEFAULT_PURPOSE
    system, bar, code = value.strip().rpartition("|")
    if bar and system not in ("", PURPOSE_SYSTEM):
        raise FhirError(400, f"{PURPOSE_HEADER}: the code system must be {PURPOSE_SYSTEM}")
    if code.upper() not in PURPOSES:
        raise FhirError(400, f"{PURPOSE_HEADER} must be one of {', '.join(PURPOSES)}")
    return PURPOSES[code.upper()]


def purpose_of(request: web.Request) -> Purpose:
    return purpose_of_use(request.headers.get(PURPOSE_HEADER))


def strict_handling(request: web.Request) -> bool:
    """`Prefer: handling=strict` (search.html#errors): unknown parameters are refused; lenient
    (ignored) otherwise, as FHIR's default."""
    for part in request.headers.getall("Prefer", []):
        for pref in part.split(","):
            name, _, value = pref.strip().partition("=")
            if name.strip().lower() == "handling" and value.strip().strip('"').lower() == "strict":
                return True
    return False


def request_id(header: str | None, *, principal_id: str, operation: str) -> str:
    """The request_id of a write: derived from the client's `X-Request-Id` (so a client's retry
    is answered with the first result), else fresh. Derived with the caller and the operation, so
    one header value sent for two different writes never names the same request."""
    if header is None:
        return str(uuid.uuid4())
    if not 0 < len(header) <= 128 or not header.isprintable():
        raise FhirError(400, "X-Request-Id must be 1 to 128 printable characters")
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"medledger-fhir:{principal_id}:{operation}:{header}"))


def write_request_id(request: web.Request, operation: str) -> str:
    """The request_id of the caller's write `operation` (see request_id)."""
    return request_id(
        request.headers.get("X-Request-Id"), principal_id=current_caller().principal_id, operation=operation
    )
