"""Records' domain, free of I/O: FHIR validation, canonical JSON, commitments and the envelope
encryption of one record version; what a put, get, list or export may carry; and who may do
what without asking consent (the use cases in ``records.py`` ask consent for the rest).

The commitment formulas (also in the README, so anyone can recompute them) and the RFC 8785
parsing they need are in ``medledger_verifier.commitments``, shared with `medledger verify`; they
are re-exported here. Each version has a random 32-byte salt.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fhir.resources.R4B import get_fhir_model_class
from medledger.types.v1 import vocabulary_pb2
from pydantic import ValidationError

from medledger_runtime.auth import Caller
from medledger_runtime.errors import (
    TOO_LARGE,
    VERSION_CONFLICT,
    DataLoss,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    MedledgerError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from medledger_runtime.fhir_json import check_strings
from medledger_runtime.vocabulary import PrincipalKind, principal_kind_of

# The commitment formulas live in medledger_verifier.commitments (the verifier recomputes them);
# re-exported here for the tests and benchmarks that have always found them here.
from medledger_verifier.commitments import (  # noqa: F401
    DOCUMENT_DOMAIN,
    RECORD_DOMAIN,
    SALT_BYTES,
    canonical_json,
    document_commitment,
    parse_json,
    record_commitment,
)

SEAL_DOMAIN = b"medledger:record-seal:v1"
NONCE_BYTES = 12
FHIR_JSON = "application/fhir+json"
# Identifier systems naming medledger's own ids in FHIR resources.
RECORD_SYSTEM = "urn:medledger:record"
PRINCIPAL_SYSTEM = "urn:medledger:principal"
ORGANIZATION_SYSTEM = "urn:medledger:organization"
MAX_RECORD_BYTES = 4 * 1024 * 1024
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# Versions are 32-bit integers in the database: none is larger.
MAX_VERSION = 2**31 - 1
# A PutRecords holds at most this many records (and fits the gRPC receive limit, which the server
# enforces before any of this runs).
MAX_RECORDS_PER_REQUEST = 5000
URN_UUID = "urn:uuid:"
READ, WRITE = vocabulary_pb2.Action.ACTION_READ, vocabulary_pb2.Action.ACTION_WRITE
TREAT = vocabulary_pb2.PurposeOfUse.PURPOSE_OF_USE_TREAT
CATEGORIES = frozenset(v.number for v in vocabulary_pb2.DataCategory.DESCRIPTOR.values if v.number)
PURPOSES = frozenset(v.number for v in vocabulary_pb2.PurposeOfUse.DESCRIPTOR.values if v.number)


def validate_fhir(resource: Any) -> str:
    """Check a parsed resource against the FHIR R4 model of its `resourceType` (with
    `fhir.resources.R4B`) and FHIR JSON's string rule; returns the resource type.
    InvalidArgument names each problem."""
    if not isinstance(resource, dict):
        raise InvalidArgument.field("content", "a FHIR resource is a JSON object")
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise InvalidArgument.field("content.resourceType", "required")
    try:
        model = get_fhir_model_class(resource_type)
    except (KeyError, ValueError):
        raise InvalidArgument.field(
            "content.resourceType", f"not a FHIR R4 resource type: {resource_type[:60]}"
        ) from None
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        violations = tuple(
            FieldViolation(
                "content." + ".".join(str(part) for part in error["loc"]) if error["loc"] else "content",
                error["msg"],
            )
            for error in exc.errors()[:20]
        )
        raise InvalidArgument(f"invalid FHIR {resource_type}", violations=violations) from None
    check_strings(resource, "content")
    return resource_type


def new_salt() -> bytes:
    return os.urandom(SALT_BYTES)


def associated_data(record_id: str, version: int, patient_id: str) -> bytes:
    """What a version's ciphertext is bound to: moved to another record, version or patient, it
    does not decrypt. Length-prefixed, so no two triples give the same bytes."""
    parts = [record_id.encode(), str(version).encode(), patient_id.encode()]
    return SEAL_DOMAIN + b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def seal(data_key: bytes, plaintext: bytes, record_id: str, version: int, patient_id: str) -> bytes:
    """AES-256-GCM under a version's data key: nonce (12 bytes) || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(data_key).encrypt(nonce, plaintext, associated_data(record_id, version, patient_id))


def unseal(data_key: bytes, sealed: bytes, record_id: str, version: int, patient_id: str) -> bytes:
    """The plaintext of `seal`; DataLoss when the bytes, the key or the binding were altered."""
    if len(sealed) < NONCE_BYTES + 16:
        raise DataLoss("a stored record version is truncated")
    try:
        return AESGCM(data_key).decrypt(
            sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data(record_id, version, patient_id)
        )
    except InvalidTag:
        raise DataLoss("a stored record version does not decrypt: altered ciphertext or data key") from None


def fhir_instant(at: float) -> str:
    """A FHIR `instant`: UTC, milliseconds, "Z"."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Provenance.agent.who's resource type by the writer's kind: an application (a SMART client, a
# platform service) is a Device in FHIR R4; a researcher acts as a Practitioner.
_AGENT_TYPE: dict[int, str] = {
    PrincipalKind.PRINCIPAL_KIND_PATIENT: "Patient",
    PrincipalKind.PRINCIPAL_KIND_PRACTITIONER: "Practitioner",
    PrincipalKind.PRINCIPAL_KIND_RESEARCHER: "Practitioner",
    PrincipalKind.PRINCIPAL_KIND_ORGANIZATION: "Organization",
    PrincipalKind.PRINCIPAL_KIND_SMART_CLIENT: "Device",
    PrincipalKind.PRINCIPAL_KIND_SERVICE: "Device",
}


def provenance(
    *, record_id: str, version: int, written_by: str, organization_id: str, written_at: float
) -> dict[str, Any]:
    """A FHIR R4 Provenance for one record version: who wrote it (a patient, a practitioner, an
    application), for which organization, and when. Principals and organizations are named by
    medledger identifiers, never by personal data."""
    author: dict[str, Any] = {
        "type": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "author"}
            ]
        },
        "who": {"identifier": {"system": PRINCIPAL_SYSTEM, "value": written_by}},
    }
    agent_type = _AGENT_TYPE.get(principal_kind_of(written_by) or 0)
    if agent_type:
        author["who"] = {"type": agent_type, **author["who"]}
    if organization_id:
        author["onBehalfOf"] = {
            "type": "Organization",
            "identifier": {"system": ORGANIZATION_SYSTEM, "value": organization_id},
        }
    recorded = fhir_instant(written_at)
    return {
        "resourceType": "Provenance",
        "target": [{"identifier": {"system": RECORD_SYSTEM, "value": f"{record_id}/_history/{version}"}}],
        "recorded": recorded,
        "agent": [author],
    }


# What a request may carry.


def check_put(patient_id: str, category: int, media_type: str, content: bytes) -> str:
    """A put's fields, checked in this order; returns the FHIR resource type ("" for a document)."""
    _check_put_fields(patient_id, category, media_type, content)
    if media_type == FHIR_JSON:
        return validate_fhir(parse_json(content))
    return ""


def _check_put_fields(patient_id: str, category: int, media_type: str, content: bytes) -> None:
    if len(content) > MAX_RECORD_BYTES:
        raise ResourceExhausted(f"a record is at most {MAX_RECORD_BYTES} bytes", reason=TOO_LARGE)
    if not patient_id:
        raise InvalidArgument.field("patient_id", "required")
    if category not in CATEGORIES:
        raise InvalidArgument.field("category", "required: a DataCategory")
    if not media_type:
        raise InvalidArgument.field("media_type", "required: application/fhir+json or a document's media type")


def check_new_version(record_category: int, record_media_type: str, category: int, media_type: str) -> None:
    if (record_category, record_media_type) != (category, media_type):
        raise InvalidArgument.field("category", "a new version keeps its record's category and media type")


def check_expected_version(latest_version: int, expected_version: int) -> None:
    """FHIR `If-Match`: a write based on another version than the latest is refused (another
    writer got there first). 0 expects nothing. The version numbers are no personal data."""
    if expected_version and expected_version != latest_version:
        raise FailedPrecondition(
            f"the record is at version {latest_version}, not {expected_version}", reason=VERSION_CONFLICT
        )


def check_put_options(record_id: str, expected_version: int, media_type: str, assign_identity: bool) -> None:
    """What a PutRecord asks besides its content: an expected version names an existing record;
    FHIR identity is a FHIR resource's."""
    if expected_version and not record_id:
        raise InvalidArgument.field("expected_version", "only with record_id: a new record has no version yet")
    if expected_version > MAX_VERSION:
        raise InvalidArgument.field("expected_version", "no record has that many versions")
    if assign_identity and media_type != FHIR_JSON:
        raise InvalidArgument.field("assign_fhir_identity", f"for FHIR resources ({FHIR_JSON}) only")


# FHIR identity: what a FHIR server sets in a resource it stores.


def fhir_id(record_id: str) -> str:
    """A record's FHIR `id`: the record id with `_` written `-`. A FHIR id holds only letters,
    digits, `-` and `.`, and record ids are `rec_` and hex, so this is one to one
    (:func:`record_id_of` is the way back)."""
    return record_id.replace("_", "-")


def record_id_of(resource_id: str) -> str:
    """The record id of a FHIR `id` that :func:`fhir_id` gave."""
    return resource_id.replace("-", "_")


def assign_fhir_identity(content: bytes, record_id: str, version: int, written_at: float, *, update: bool) -> bytes:
    """The FHIR resource `content` as a FHIR server stores it: `id` the record's FHIR id,
    `meta.versionId` the version, `meta.lastUpdated` the write time, other meta fields kept.
    A new record's resource may carry any id (a create assigns its own, as FHIR's does); an
    update's that names another resource is refused. These are the bytes committed and stored,
    so what a read returns is what the commitment is of."""
    resource = parse_json(content)
    if not isinstance(resource, dict):
        raise InvalidArgument.field("content", "a FHIR resource is a JSON object")
    own = fhir_id(record_id)
    given = resource.get("id")
    if update and given is not None and given != own:
        raise InvalidArgument.field("content.id", f"another resource than this record's ({own})")
    meta = resource.get("meta", {})
    if not isinstance(meta, dict):
        raise InvalidArgument.field("content.meta", "a FHIR Meta is a JSON object")
    stamped: dict[str, Any] = {
        "resourceType": resource.get("resourceType"),
        "id": own,
        "meta": {**meta, "versionId": str(version), "lastUpdated": fhir_instant(written_at)},
    }
    for key, value in resource.items():
        stamped.setdefault(key, value)
    return json.dumps(stamped, ensure_ascii=False, separators=(",", ":")).encode()


def rewrite_references(value: Any, targets: Mapping[str, str]) -> tuple[Any, int]:
    """`value` (parsed JSON) with every FHIR reference string (a `reference` member) that is a key
    of `targets` replaced by its target, and how many were replaced. `value` is left as it was."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        count = 0
        for key, member in value.items():
            if key == "reference" and isinstance(member, str) and member in targets:
                out[key] = targets[member]
                count += 1
            else:
                out[key], n = rewrite_references(member, targets)
                count += n
        return out, count
    if isinstance(value, list):
        items = [rewrite_references(item, targets) for item in value]
        return [item for item, _ in items], sum(n for _, n in items)
    return value, 0


# PutRecords: several records of one patient, all or nothing.


def check_put_records(patient_id: str, writes: Sequence[tuple[str, int, str]], references: Mapping[str, str]) -> None:
    """A PutRecords' shape, before its entries' contents: the patient, how many records, each
    entry's (record_id, expected_version, full_url) and the references resolved outside it.
    Problems are named by the entry's index (`records[3].full_url`)."""
    if not patient_id:
        raise InvalidArgument.field("patient_id", "required")
    if not writes:
        raise InvalidArgument.field("records", "at least one record")
    if len(writes) > MAX_RECORDS_PER_REQUEST:
        raise ResourceExhausted(f"a PutRecords holds at most {MAX_RECORDS_PER_REQUEST} records", reason=TOO_LARGE)
    record_ids: set[str] = set()
    full_urls: set[str] = set()
    for index, (record_id, expected_version, full_url) in enumerate(writes):
        with in_entry(index):
            check_put_options(record_id, expected_version, FHIR_JSON, False)
            if record_id:
                if record_id in record_ids:
                    raise InvalidArgument.field("record_id", "another entry writes this record too")
                record_ids.add(record_id)
            if full_url:
                if not full_url.startswith(URN_UUID) or len(full_url) == len(URN_UUID) or len(full_url) > 100:
                    raise InvalidArgument.field("full_url", "a urn:uuid: URI")
                if full_url in full_urls or full_url in references:
                    raise InvalidArgument.field("full_url", "another entry (or a reference) has this fullUrl too")
                full_urls.add(full_url)
    for source, target in references.items():
        if not source or not target:
            raise InvalidArgument.field("references", "each maps a non-empty reference to a non-empty target")
        if not _REFERENCE_TARGET.fullmatch(target):
            raise InvalidArgument.field("references", "each target is a FHIR literal reference, `Type/id`")


def reference_target(resource_type: str, record_id: str) -> str:
    """What a reference to a record of the request becomes: `{resourceType}/{FHIR id}`."""
    return f"{resource_type}/{fhir_id(record_id)}"


# What a reference may be rewritten to: a relative literal reference (`Patient/pat-…`), as the
# request's own targets are (`reference_target`).
_REFERENCE_TARGET = re.compile(r"[A-Z][A-Za-z]{1,63}/[A-Za-z0-9_\-.]{1,64}")


def with_references(content: bytes, resource: Any, targets: Mapping[str, str]) -> bytes:
    """A FHIR entry's content (validated) with its references to `targets` rewritten; the very
    bytes sent when none was. Not validated again: a reference string replaced by a literal
    reference (`Type/id`, as the targets are checked to be) leaves a valid resource valid, and
    validation is a bulk load's largest cost."""
    rewritten, count = rewrite_references(resource, targets)
    if not count:
        return content
    return json.dumps(rewritten, ensure_ascii=False, separators=(",", ":")).encode()


def check_record_write(patient_id: str, category: int, media_type: str, content: bytes) -> tuple[str, Any]:
    """A PutRecords entry's fields, as :func:`check_put`: (resource type, the parsed and validated
    resource), ("", None) for a document."""
    _check_put_fields(patient_id, category, media_type, content)
    if media_type != FHIR_JSON:
        return "", None
    resource = parse_json(content)
    return validate_fhir(resource), resource


@contextmanager
def in_entry(index: int) -> Iterator[None]:
    """Errors raised within are about entry `index` of a PutRecords: they say so, and their
    fields are that entry's (`records[3].content`)."""
    try:
        yield
    except MedledgerError as error:
        raise entry_error(index, error) from None


def entry_error(index: int, error: MedledgerError) -> MedledgerError:
    prefix = f"records[{index}]"
    violations = tuple(FieldViolation(f"{prefix}.{v.field}", v.description) for v in error.violations)
    message = error.message
    message = (
        f"{prefix}.{message}"
        if violations and message.startswith(error.violations[0].field)
        else f"{prefix}: {message}"
    )
    return type(error)(message, violations=violations, reason=error.reason)


def commitment(media_type: str, content: bytes, salt: bytes) -> str:
    """A FHIR resource commits to its canonical JSON, a document to its media type and bytes."""
    if media_type == FHIR_JSON:
        return record_commitment(content, salt)
    return document_commitment(media_type, content, salt)


def check_list(categories: tuple[int, ...], page_size: int) -> None:
    if any(c not in CATEGORIES for c in categories):
        raise InvalidArgument.field("categories", "DataCategory values only")
    if page_size < 0:
        raise InvalidArgument.field("page_size", "must not be negative")


def page_size(asked: int) -> int:
    return min(asked or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def version_page_token(version: int) -> str:
    """Where the next page of a record's versions starts: below this version."""
    return f"v{version}"


def version_page_position(token: str) -> int:
    number = token[1:] if token.startswith("v") else ""
    if not (number.isascii() and number.isdigit()) or not 1 <= int(number) <= MAX_VERSION:
        raise InvalidArgument.field("page_token", "not a token this RPC returned")
    return int(number)


def page_token(updated_at: float, record_id: str) -> str:
    """Where the next page starts: after this record, in (updated_at, record_id) order."""
    return f"{updated_at!r}/{record_id}"


def page_position(token: str) -> tuple[float, str]:
    updated, _, record_id = token.partition("/")
    try:
        position = float(updated)
    except ValueError:
        raise InvalidArgument.field("page_token", "not a token this RPC returned") from None
    if not record_id.startswith("rec_"):
        raise InvalidArgument.field("page_token", "not a token this RPC returned")
    return position, record_id


# Who may do what without asking consent. Each returns whether consent must be asked, or refuses.
# `guardian` says the caller is a guardian the patient appointed, holding the role: they act for
# the patient, so they read, list and export as the patient would (no consent asked).


def write_needs_consent(caller: Caller, patient_id: str) -> bool:
    """A patient writes their own records (no consent asked); anyone else writing asks consent."""
    if caller.principal_id == patient_id:
        return False
    if caller.kind == "patient":
        raise PermissionDenied("a patient writes their own records only")
    return True


def read_needs_consent(caller: Caller, patient_id: str, purpose: int, *, guardian: bool = False) -> bool:
    """A patient (or their guardian) reads their own records; another patient's are as missing
    ones (NotFound); anyone else names a purpose and asks consent."""
    if caller.principal_id == patient_id or guardian:
        return False
    if caller.kind == "patient":
        raise NotFound("no such record")  # another patient's: the same answer as a missing one
    if purpose not in PURPOSES:
        raise InvalidArgument.field("purpose", "required: a PurposeOfUse, why the record is read")
    return True


def list_needs_consent(caller: Caller, patient_id: str, purpose: int, *, guardian: bool = False) -> bool:
    """A patient (or their guardian) lists their own records; anyone else but a patient names a
    purpose and asks consent (one question per category)."""
    if caller.principal_id == patient_id or guardian:
        return False
    if caller.kind == "patient":
        raise PermissionDenied("a patient lists their own records only")
    if purpose not in PURPOSES:
        raise InvalidArgument.field("purpose", "required: a PurposeOfUse, why the records are listed")
    return True


def check_export(caller: Caller, patient_id: str, *, guardian: bool = False) -> None:
    """Only the patient (or their guardian, for them) exports their records: no consent covers an
    export."""
    if caller.principal_id != patient_id and not guardian:
        raise PermissionDenied("a patient (or their guardian) exports their own records only")


def on_behalf_of(caller: Caller, patient_id: str, guardian: bool) -> str:
    """What an event names as the patient a guardian acted for: the patient when the caller acted
    as their guardian, else nothing."""
    return patient_id if guardian and caller.principal_id != patient_id else ""


def export_resource(media_type: str, content: bytes) -> dict[str, Any]:
    """A version as a Bundle entry's resource: the FHIR resource itself, or a document as a Binary."""
    if media_type == FHIR_JSON:
        resource: dict[str, Any] = json.loads(content)
        return resource
    return {
        "resourceType": "Binary",
        "contentType": media_type,
        "data": base64.b64encode(content).decode("ascii"),
    }


# SMART scopes name FHIR resource types; a document is served as a FHIR Binary (as ExportRecords
# renders it), so its scopes are Binary's.
DOCUMENT_SCOPE_TYPE = "Binary"


def scope_type(resource_type: str) -> str:
    """The resource type a stored record's SMART scopes name (its own; Binary for a document)."""
    return resource_type or DOCUMENT_SCOPE_TYPE


def content_scope_type(media_type: str, content: bytes) -> str:
    """The resource type a put's content claims, for its scope check before anything else is
    checked: a document's is Binary; content that names no type needs a ``*`` scope (the put then
    refuses it as invalid anyway)."""
    if media_type != FHIR_JSON:
        return DOCUMENT_SCOPE_TYPE
    try:
        resource = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return "*"
    name = resource.get("resourceType") if isinstance(resource, dict) else None
    return name if isinstance(name, str) and name else "*"
