"""Bundles: `POST [base]` with a Bundle of type `batch` or `transaction` (http.html#transaction).

Organization and Practitioner entries are identity's principals: matched by identifier
(FindPrincipals) or registered, with their resource, when the caller may (RegisterPrincipal; a
SMART client as its scopes allow: practitioners of its own organization or of one it
registered). A Patient entry is matched or registered the same way, as an idempotent first step
(the request id of a registration is derived from the identifier, so a retried bundle finds the
same principal). Clinical entries are records: a transaction puts them all in ONE PutRecords
call (one database transaction, one consent check per category, one data key), each entry's
`urn:uuid:` fullUrl rewritten by records and the principals' fullUrls passed as `references`.

A batch handles each entry on its own, but puts a patient's clinical entries in one PutRecords
call first, for speed; when that call fails, one call per category (in dependency order, so
references to entries stored before are rewritten), and, in a category refused for another
reason than consent, one per entry: every entry gets its own status (a denied category is 403 for
its entries only, an invalid resource 422 for itself only). GET, DELETE and PATCH entries are
refused (400 per entry in a batch): search and read have their own routes.

Entries of types this server keeps nowhere (Location, PractitionerRole, a client's Provenance:
records writes its own for every version) are answered `200 OK` with an informational outcome
saying they were not stored, so a generator's bundle can be posted as it comes.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.records.v1 import records_service_pb2 as pb
from medledger.types.v1 import vocabulary_pb2

from medledger_fhir.backends import Backends, Metadata, caller_metadata
from medledger_fhir.http import BASE_PATH, etag, fhir_response, read_resource, version_from_etag
from medledger_fhir.ids import fhir_id, service_id
from medledger_fhir.outcomes import FHIR_JSON, FhirError, answer_errors, from_rpc_error, operation_outcome
from medledger_fhir.resource_types import FILED_WITH, PATIENT_ELEMENTS
from medledger_runtime.auth import current_caller
from medledger_runtime.errors import PermissionDenied
from medledger_runtime.http_server import HttpRoute

Kind = vocabulary_pb2.PrincipalKind
C = vocabulary_pb2.DataCategory

SYSTEM_INTERACTIONS = ("batch", "transaction")
# A bundle of more entries is refused whole (the body limit bounds bytes; this bounds work).
MAX_ENTRIES = 5000
# records' bound on one PutRecords: a transaction's clinical entries must fit one call (413
# above); a batch's are put in chunks of it.
MAX_RECORDS_PER_PUT = 5000
# Principals an entry may be, by resource type.
PRINCIPAL_KINDS: dict[str, int] = {
    "Patient": Kind.PRINCIPAL_KIND_PATIENT,
    "Organization": Kind.PRINCIPAL_KIND_ORGANIZATION,
    "Practitioner": Kind.PRINCIPAL_KIND_PRACTITIONER,
}
# Kept nowhere here: answered as not stored (see the module's docstring).
NOT_KEPT = frozenset({"Location", "PractitionerRole", "Provenance"})
_URN_UUID = re.compile(r"urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# Namespace of the request ids derived here (registrations, record puts).
_NAMESPACE = uuid.UUID("6f1d3a52-7a0e-4d8e-9a51-2f6c1b0e8d44")
# Registrations and records are put in dependency order in the per-entry fallback, so an entry's
# references to earlier entries are already resolved (an Observation to its Encounter, a
# DiagnosticReport to its Observations, a Claim to what it bills, an EOB to its Claim).
_CATEGORY_ORDER = (
    C.DATA_CATEGORY_ENCOUNTERS,
    C.DATA_CATEGORY_CONDITIONS,
    C.DATA_CATEGORY_ALLERGIES,
    C.DATA_CATEGORY_OBSERVATIONS,
    C.DATA_CATEGORY_PROCEDURES,
    C.DATA_CATEGORY_IMMUNIZATIONS,
    C.DATA_CATEGORY_MEDICATIONS,
    C.DATA_CATEGORY_DIAGNOSTIC_REPORTS,
    C.DATA_CATEGORY_DOCUMENTS,
    C.DATA_CATEGORY_CARE_PLANS,
    C.DATA_CATEGORY_CLAIMS,
)


@dataclass
class Entry:
    """One entry of a bundle, as validated; `response` once answered."""

    index: int
    resource_type: str
    resource: dict[str, Any]
    method: str
    full_url: str = ""
    record_id: str = ""  # PUT Type/{id}
    expected_version: int = 0  # PUT with ifMatch
    patient_ref: str = ""  # clinical: the Patient fullUrl or Patient/{id} it names
    response: dict[str, Any] | None = None

    @property
    def path(self) -> str:
        return f"Bundle.entry[{self.index}]"


@dataclass
class Parsed:
    kind: str  # batch | transaction
    entries: list[Entry]
    # A batch's entries refused by validation: index → error (answered in order).
    refused: dict[int, FhirError] = field(default_factory=dict)
    size: int = 0


def _patient_of(resource: dict[str, Any]) -> str:
    for name in PATIENT_ELEMENTS:
        ref = resource.get(name)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            return str(ref["reference"])
    return ""


def _entry(index: int, raw: Any, kind: str) -> Entry:
    where = f"Bundle.entry[{index}]"
    if not isinstance(raw, dict):
        raise FhirError(400, "an entry must be an object", expression=(where,))
    resource = raw.get("resource")
    request = raw.get("request")
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise FhirError(400, "an entry needs a resource", expression=(f"{where}.resource",))
    if not isinstance(request, dict) or not isinstance(request.get("method"), str):
        raise FhirError(400, f"a {kind} entry needs request.method", expression=(f"{where}.request",))
    resource_type = resource["resourceType"]
    method = request["method"].upper()
    url = request["url"] if isinstance(request.get("url"), str) else ""
    if method not in ("POST", "PUT"):
        raise FhirError(
            400,
            "only POST and PUT entries are accepted in a bundle here; search and read at [base]/{type}",
            expression=(f"{where}.request.method",),
        )
    if "ifNoneExist" in request or "ifNoneMatch" in request or "ifModifiedSince" in request:
        raise FhirError(400, "conditional entries are not supported in bundles", expression=(f"{where}.request",))
    full_url = raw.get("fullUrl", "")
    if not isinstance(full_url, str) or len(full_url) > 200:
        raise FhirError(400, "fullUrl must be a URI", expression=(f"{where}.fullUrl",))
    known = resource_type in FILED_WITH or resource_type in PRINCIPAL_KINDS or resource_type in NOT_KEPT
    if not known:
        raise FhirError(
            422, f"{resource_type[:60]} is not a resource type this server keeps", expression=(f"{where}.resource",)
        )
    entry = Entry(index, resource_type, resource, method, full_url=full_url)
    if method == "POST":
        if url.split("?")[0].strip("/") != resource_type:
            raise FhirError(400, "request.url must be the resource type", expression=(f"{where}.request.url",))
    else:
        if resource_type not in FILED_WITH:
            raise FhirError(
                400, "PUT in a bundle updates clinical records only", expression=(f"{where}.request.method",)
            )
        head, _, record_id = url.strip("/").partition("/")
        if head != resource_type or not _ID.fullmatch(record_id):
            raise FhirError(400, "request.url must be {type}/{id}", expression=(f"{where}.request.url",))
        entry.record_id = service_id(record_id)
        if isinstance(request.get("ifMatch"), str):
            entry.expected_version = version_from_etag(request["ifMatch"], f"{where}.request.ifMatch")
    if resource_type in FILED_WITH:
        entry.patient_ref = _patient_of(resource)
        if not entry.patient_ref:
            raise FhirError(422, "a clinical resource must name its patient", expression=(f"{where}.resource.subject",))
    return entry


def parse_bundle(body: dict[str, Any]) -> Parsed:
    """A request bundle's entries, validated; FhirError 400 for the bundle as a whole (and, in a
    transaction, for any entry); a batch's bad entries are kept in `refused`."""
    if body.get("resourceType") != "Bundle":
        raise FhirError(400, "POST [base] takes a Bundle", expression=("Bundle.resourceType",))
    kind = body.get("type")
    if kind not in ("batch", "transaction"):
        raise FhirError(400, "the Bundle's type must be batch or transaction", expression=("Bundle.type",))
    raw_entries = body.get("entry", [])
    if not isinstance(raw_entries, list):
        raise FhirError(400, "Bundle.entry must be a list", expression=("Bundle.entry",))
    if len(raw_entries) > MAX_ENTRIES:
        raise FhirError(413, f"at most {MAX_ENTRIES} entries in a bundle", expression=("Bundle.entry",))
    parsed = Parsed(kind=kind, entries=[], size=len(raw_entries))
    full_urls: set[str] = set()
    patients = 0
    for index, raw in enumerate(raw_entries):
        try:
            entry = _entry(index, raw, kind)
            if entry.full_url:
                if entry.full_url in full_urls:
                    raise FhirError(400, "fullUrl appears twice", expression=(f"{entry.path}.fullUrl",))
                full_urls.add(entry.full_url)
            if entry.resource_type == "Patient":
                patients += 1
                if kind == "transaction" and patients > 1:
                    raise FhirError(400, "a transaction is about one patient", expression=(f"{entry.path}",))
        except FhirError as exc:
            if kind == "transaction":
                raise
            parsed.refused[index] = exc
            continue
        parsed.entries.append(entry)
    return parsed


def _identifiers(resource: dict[str, Any]) -> list[str]:
    out = []
    for ident in resource.get("identifier") or []:
        if isinstance(ident, dict) and isinstance(ident.get("system"), str) and isinstance(ident.get("value"), str):
            text = f"{ident['system']}|{ident['value']}"
            if len(text) <= 512:
                out.append(text)
    return out[:8]


def _request_id(*parts: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, "\x1f".join(parts)))


def _answer(
    status: str, *, location: str = "", version: int = 0, outcome: dict[str, Any] | None = None
) -> dict[str, Any]:
    response: dict[str, Any] = {"status": status}
    if location:
        response["location"] = location
    if version:
        response["etag"] = etag(version)
    if outcome is not None:
        response["outcome"] = outcome
    return response


_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    410: "Gone",
    412: "Precondition Failed",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


def _error_answer(error: FhirError) -> dict[str, Any]:
    outcome = operation_outcome(
        error.status, error.message, expression=error.expression, code=error.code, reason=error.reason
    )
    return _answer(f"{error.status} {_REASONS.get(error.status, '')}".strip(), outcome=outcome)


class BundleRunner:
    """One bundle's work, with the caller's token on every call."""

    def __init__(self, backends: Backends, metadata: Metadata, caller_key: str, body_digest: str) -> None:
        self.backends = backends
        self.metadata = metadata
        self.caller_key = caller_key
        self.body_digest = body_digest
        # fullUrl (urn:uuid:...) → `Type/{id}` of what was matched, registered or stored.
        self.references: dict[str, str] = {}
        self.organization_id = ""
        # Practitioner fullUrl → its Organization's fullUrl, from the bundle's PractitionerRoles.
        self.employer: dict[str, str] = {}

    def learn_roles(self, entries: Sequence[Entry]) -> None:
        for entry in entries:
            if entry.resource_type == "PractitionerRole":
                who, org = (entry.resource.get(k) for k in ("practitioner", "organization"))
                if isinstance(who, dict) and isinstance(org, dict):
                    self.employer[str(who.get("reference"))] = str(org.get("reference"))

    async def principal(self, entry: Entry) -> dict[str, Any]:
        """Match the principal by identifier, else register it; its entry's response."""
        return await self.match(entry) or await self.register(entry)

    async def match(self, entry: Entry) -> dict[str, Any] | None:
        """The principal identity holds under one of the entry's identifiers (FindPrincipals);
        its entry's response, or None."""
        kind = PRINCIPAL_KINDS[entry.resource_type]
        for identifier in self.identifiers(entry):
            found = await self.backends.identity.FindPrincipals(
                id_pb.FindPrincipalsRequest(kind=kind, identifier=identifier),  # type: ignore[arg-type]
                metadata=self.metadata,
            )
            if found.principals:
                return self._principal_answer(entry, found.principals[0], "200 OK")
        return None

    def identifiers(self, entry: Entry) -> list[str]:
        identifiers = _identifiers(entry.resource)
        if not identifiers:
            raise FhirError(
                422,
                f"a {entry.resource_type} needs an identifier (system and value) to be matched or registered",
                expression=(f"{entry.path}.resource.identifier",),
            )
        return identifiers

    async def register(self, entry: Entry) -> dict[str, Any]:
        """Register the principal (see `_register`); when another bundle registered it since it
        was looked up (two exports naming the same people, loaded at once), it matches now."""
        try:
            return await self._register(entry)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.ABORTED):
                raise
            matched = await self.match(entry)
            if matched is None:
                raise
            return matched

    async def _register(self, entry: Entry) -> dict[str, Any]:
        """Register the entry's principal with its resource (RegisterPrincipal); its response."""
        kind = PRINCIPAL_KINDS[entry.resource_type]
        identifiers = self.identifiers(entry)
        resource = {k: v for k, v in entry.resource.items() if k not in ("id", "meta")}
        organization_id = ""
        if kind == Kind.PRINCIPAL_KIND_PRACTITIONER:
            employer = self.references.get(self.employer.get(entry.full_url, ""), "")
            organization_id = (
                service_id(employer.partition("/")[2]) or self.organization_id or current_caller().organization_id
            )
            if not organization_id:
                raise FhirError(
                    422,
                    "a Practitioner is registered with its Organization: put one in the bundle",
                    expression=(f"{entry.path}.resource",),
                )
        reply = await self.backends.identity.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(
                # Derived from the identifier: registering the same principal again is a retry.
                request_id=_request_id("principal", str(kind), identifiers[0]),
                kind=kind,  # type: ignore[arg-type]
                organization_id=organization_id,
                fhir_resource=json.dumps(resource).encode(),
            ),
            metadata=self.metadata,
        )
        return self._principal_answer(entry, reply.principal, "201 Created")

    def _principal_answer(self, entry: Entry, principal: Any, status: str) -> dict[str, Any]:
        location = f"{entry.resource_type}/{fhir_id(principal.principal_id)}"
        if entry.full_url:
            self.references[entry.full_url] = location
        if entry.resource_type == "Organization" and not self.organization_id:
            self.organization_id = principal.principal_id
        return _answer(status, location=location, version=int(principal.version))

    def patient_id(self, entry: Entry) -> str:
        """The patient a clinical entry belongs to: its Patient entry's principal, or `Patient/{id}`."""
        ref = self.references.get(entry.patient_ref, entry.patient_ref)
        if ref.startswith("urn:"):
            raise FhirError(
                422,
                "the Patient entry this resource names was not matched or registered",
                expression=(f"{entry.path}.resource.subject",),
            )
        head, _, patient_id = ref.partition("/")
        if head != "Patient" or not _ID.fullmatch(patient_id):
            raise FhirError(
                422,
                "the resource's patient is neither a Patient of the bundle nor Patient/{id}",
                expression=(f"{entry.path}.resource.subject",),
            )
        return service_id(patient_id)

    def _write(self, entry: Entry) -> pb.RecordWrite:
        return pb.RecordWrite(
            category=FILED_WITH[entry.resource_type],  # type: ignore[arg-type]
            content=json.dumps(entry.resource).encode(),
            media_type=FHIR_JSON,
            record_id=entry.record_id,
            expected_version=entry.expected_version,
            full_url=entry.full_url if _URN_UUID.fullmatch(entry.full_url) else "",
        )

    async def put(self, patient_id: str, entries: Sequence[Entry], key: str) -> None:
        """One PutRecords call for these entries; each entry's response set."""
        reply = await self.backends.records.PutRecords(
            pb.PutRecordsRequest(
                # The same bundle from the same caller is the same request: a retry stores nothing twice.
                request_id=_request_id("records", self.caller_key, self.body_digest, key),
                patient_id=patient_id,
                records=[self._write(e) for e in entries],
                references=self.references,
                assign_fhir_identity=True,
            ),
            metadata=self.metadata,
        )
        for entry, stored in zip(entries, reply.records, strict=True):
            location = f"{entry.resource_type}/{fhir_id(stored.record_id)}"
            if entry.full_url:
                self.references[entry.full_url] = location
            status = "200 OK" if entry.record_id else "201 Created"
            entry.response = _answer(status, location=f"{location}/_history/{stored.version}", version=stored.version)


def _not_kept(entry: Entry) -> dict[str, Any]:
    outcome = operation_outcome(200, f"{entry.resource_type} is not stored by this server", code="informational")
    return _answer("200 OK", outcome=outcome)


def _by_category(entries: Sequence[Entry]) -> list[tuple[int, list[Entry]]]:
    """Entries grouped by category, the categories in dependency order (_CATEGORY_ORDER)."""
    rank: dict[int, int] = {c: i for i, c in enumerate(_CATEGORY_ORDER)}
    groups: dict[int, list[Entry]] = {}
    for entry in entries:
        groups.setdefault(FILED_WITH[entry.resource_type], []).append(entry)
    return sorted(groups.items(), key=lambda item: rank.get(item[0], len(rank)))


def _check_scopes(entries: Sequence[Entry]) -> None:
    """403 before anything is written when the caller's SMART scopes leave out a principal to
    register or a clinical entry (identity and records refuse those themselves; asking first
    keeps a transaction from registering its Organizations and then failing on a Practitioner)."""
    caller = current_caller()
    for entry in entries:
        interaction = "u" if entry.record_id else "c"
        try:
            caller.require_scope(entry.resource_type, interaction)
        except PermissionDenied as exc:
            raise FhirError(403, str(exc), expression=(f"{entry.path}.resource",)) from None


async def run_transaction(runner: BundleRunner, parsed: Parsed) -> list[dict[str, Any]]:
    """All or nothing: principals first (matched, then the unmatched registered, idempotent),
    then every clinical entry in one PutRecords. Any failure answers the whole request; what the
    caller's scopes do not allow is refused before any registration (`_check_scopes`)."""
    entries = parsed.entries
    runner.learn_roles(entries)
    principals = [e for kind in ("Organization", "Practitioner", "Patient") for e in entries if e.resource_type == kind]
    for entry in principals:
        entry.response = await runner.match(entry)
    clinical = [e for e in entries if e.resource_type in FILED_WITH]
    _check_scopes([*(e for e in principals if e.response is None), *clinical])
    for entry in principals:
        if entry.response is None:
            entry.response = await runner.register(entry)
    patients = {runner.patient_id(e) for e in clinical}
    if len(patients) > 1:
        raise FhirError(400, "a transaction's clinical entries belong to one patient", expression=("Bundle.entry",))
    if len(clinical) > MAX_RECORDS_PER_PUT:
        raise FhirError(
            413,
            f"a transaction holds at most {MAX_RECORDS_PER_PUT} clinical entries; send a batch",
            expression=("Bundle.entry",),
        )
    if clinical:
        await runner.put(patients.pop(), clinical, "transaction")
    for entry in entries:
        if entry.resource_type in NOT_KEPT:
            entry.response = _not_kept(entry)
    return [e.response or {} for e in entries]


async def run_batch(runner: BundleRunner, parsed: Parsed) -> list[dict[str, Any]]:
    """Each entry on its own (see the module's docstring); responses in the request's order."""
    answers: dict[int, dict[str, Any]] = {i: _error_answer(e) for i, e in parsed.refused.items()}
    runner.learn_roles(parsed.entries)

    async def attempt(entry: Entry, work: Any) -> None:
        try:
            await work
        except FhirError as exc:
            entry.response = _error_answer(exc)
        except grpc.aio.AioRpcError as exc:
            entry.response = _error_answer(_entry_error(exc, entry))

    async def principal(entry: Entry) -> None:
        entry.response = await runner.principal(entry)

    for kind in ("Organization", "Practitioner", "Patient"):
        for entry in (e for e in parsed.entries if e.resource_type == kind):
            await attempt(entry, principal(entry))
    by_patient: dict[str, list[Entry]] = {}
    for entry in (e for e in parsed.entries if e.resource_type in FILED_WITH):
        try:
            by_patient.setdefault(runner.patient_id(entry), []).append(entry)
        except FhirError as exc:
            entry.response = _error_answer(exc)
    chunks = [
        (patient_id, group[i : i + MAX_RECORDS_PER_PUT], i)
        for patient_id, entries in by_patient.items()
        for i in range(0, len(entries), MAX_RECORDS_PER_PUT)
        for group in (entries,)
    ]
    for patient_id, group, start in chunks:
        try:
            await runner.put(patient_id, group, f"batch|{patient_id}|{start}")
        except grpc.aio.AioRpcError:
            # One entry's problem must not be its neighbours': a call per category (consent
            # decides by category), in dependency order; a category refused for another reason
            # than consent, each of its entries on its own.
            for category, entries in _by_category(group):
                try:
                    await runner.put(patient_id, entries, f"category|{patient_id}|{start}|{category}")
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.PERMISSION_DENIED or len(entries) == 1:
                        for entry in entries:
                            entry.response = _error_answer(_entry_error(exc, entry))
                        continue
                    for entry in entries:
                        await attempt(entry, runner.put(patient_id, [entry], f"entry|{entry.index}"))
    for entry in parsed.entries:
        if entry.resource_type in NOT_KEPT:
            entry.response = _not_kept(entry)
        answers[entry.index] = entry.response or {}
    return [answers[i] for i in range(parsed.size)]


def _entry_error(exc: grpc.aio.AioRpcError, entry: Entry) -> FhirError:
    """A service's error for one entry: records' field paths become the entry's FHIRPath."""
    error = from_rpc_error(exc)
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        # A put of this entry alone: what records refused is the entry's resource.
        error.status, error.code = 422, "processing"
        error.expression = (f"{entry.path}.resource",)
    return error


def _transaction_error(exc: grpc.aio.AioRpcError, entries: Sequence[Entry]) -> FhirError:
    """records names a PutRecords problem `records[i].content...`: the i-th clinical entry."""
    error = from_rpc_error(exc)
    if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
        return error
    clinical = [e for e in entries if e.resource_type in FILED_WITH]
    paths = []
    for path in error.expression:
        match = re.match(r"records\[(\d+)\]", path)
        if match and int(match.group(1)) < len(clinical):
            paths.append(f"{clinical[int(match.group(1))].path}.resource")
    if paths:
        error.status, error.code, error.expression = 422, "processing", tuple(paths)
    return error


def response_bundle(kind: str, answers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": f"{kind}-response",
        "entry": [{"response": answer} for answer in answers],
    }


def routes(backends: Backends) -> list[HttpRoute]:
    @answer_errors
    async def post_bundle(request: web.Request) -> web.StreamResponse:
        body = await read_resource(request)
        parsed = parse_bundle(body)
        caller = current_caller()
        digest = hashlib.sha256(await request.read()).hexdigest()
        runner = BundleRunner(backends, caller_metadata(request), caller.principal_id, digest)
        if parsed.kind == "transaction":
            try:
                answers = await run_transaction(runner, parsed)
            except grpc.aio.AioRpcError as exc:
                raise _transaction_error(exc, parsed.entries) from None
        else:
            answers = await run_batch(runner, parsed)
        return fhir_response(response_bundle(parsed.kind, answers))

    return [HttpRoute("POST", BASE_PATH, post_bundle), HttpRoute("POST", f"{BASE_PATH}/", post_bundle)]
