"""SMART-scoped tokens against records: what the interceptor checks from the request (SCOPES in
api.py) and what the use cases check once they know the record's type. Tokens are signed as
identity signs them (medledger_devstack.testing.TokenIssuer); the use cases run on SQLite with a
local keyring, consent answered by a double that permits."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from medledger.records.v1 import records_service_pb2 as pb
from medledger.types.v1 import vocabulary_pb2 as v

from medledger_devstack.testing import TokenIssuer
from medledger_records import storage
from medledger_records.api import ACCESS, SCOPES
from medledger_records.data_keys import DataKeyCache
from medledger_records.record_commands import ConsentAnswer, GetRecord, ListRecordVersions, PutRecord
from medledger_records.records import RecordDesk
from medledger_runtime.auth import ANY_CALLER, AuthInterceptor, Caller, DeactivationSet, TokenVerifier
from medledger_runtime.db import Database
from medledger_runtime.errors import PermissionDenied
from medledger_runtime.group_commit import OutboxGroupCommit
from medledger_runtime.keys import LocalKeyring, create_master_key_file
from medledger_runtime.outbox import COMMON_MIGRATIONS

OBS = v.DataCategory.DATA_CATEGORY_OBSERVATIONS
CONDITIONS = v.DataCategory.DATA_CATEGORY_CONDITIONS
DOCUMENTS = v.DataCategory.DATA_CATEGORY_DOCUMENTS
FHIR = "application/fhir+json"
_SERVICE = "/medledger.records.v1.RecordsService/"
PATIENT = Caller("pat_1", "patient", frozenset(), "", "tok_1", 0.0)


def resource(resource_type: str, **fields: Any) -> bytes:
    body: dict[str, Any] = {"resourceType": resource_type, **fields}
    if resource_type == "Observation":
        body |= {"status": "final", "code": {"text": "heart rate"}}
    if resource_type == "Condition":
        body |= {"subject": {"reference": "Patient/pat_1"}, "code": {"text": "asthma"}}
    return json.dumps(body).encode()


class PermitAll:
    async def check(self, caller: Caller, patient_id: str, action: int, category: int, purpose: int) -> ConsentAnswer:
        return ConsentAnswer(True, "dec_1")


@pytest.fixture
async def records(tmp_path: Path) -> AsyncIterator[RecordDesk]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/records.db")
    await db.migrate("common", COMMON_MIGRATIONS)
    await db.migrate("records", storage.MIGRATIONS)
    master = create_master_key_file(tmp_path / "secrets" / "master.key")
    keys = DataKeyCache(await LocalKeyring.open(tmp_path / "keys" / "records.keyring", master))
    disclosures = OutboxGroupCommit(db, what="the disclosure")
    writer = asyncio.create_task(disclosures.run())
    try:
        yield RecordDesk(db, keys, PermitAll(), disclosures, None, lambda: None)
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await disclosures.close()
        await db.close()


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer(now=time.time(), audience="medledger.records")


def interceptor(issuer: TokenIssuer) -> AuthInterceptor:
    verifier = TokenVerifier(issuer="medledger.identity", audience="medledger.records", fetch_jwks=issuer.fetch)
    # RPCs whose access rows arrive with their servicers (PutRecords, SearchRecords, ...): any
    # caller here, so that what is tested is the scope check.
    access = {method: ACCESS.get(method, ANY_CALLER) for method in {*ACCESS, *SCOPES}}
    return AuthInterceptor(verifier, DeactivationSet(), public_methods=(), access=access, scopes=SCOPES)


def patient_token(issuer: TokenIssuer, scope: str, patient: str = "pat_1") -> str:
    return issuer.token(sub="pat_1", kind="patient", roles=[], scope=scope, patient=patient)


async def as_caller(issuer: TokenIssuer, method: str, token: str, request: Any) -> Caller:
    """The caller the interceptor lets through to `method`; PermissionDenied as it refuses."""
    return await interceptor(issuer).authenticate([("authorization", f"Bearer {token}")], _SERVICE + method, request)


def put_request(content: bytes, **fields: Any) -> pb.PutRecordRequest:
    base: dict[str, Any] = {"request_id": "r1", "patient_id": "pat_1", "category": OBS, "media_type": FHIR}
    return pb.PutRecordRequest(**(base | fields), content=content)


async def test_a_patient_observation_token_reads_its_patients_observations_only(
    records: RecordDesk, issuer: TokenIssuer
) -> None:
    observation = await records.put(PATIENT, PutRecord("pat_1", OBS, FHIR, resource("Observation")))
    condition = await records.put(PATIENT, PutRecord("pat_1", CONDITIONS, FHIR, resource("Condition")))
    token = patient_token(issuer, "launch/patient patient/Observation.rs")
    caller = await as_caller(issuer, "GetRecord", token, pb.GetRecordRequest(record_id=observation.record_id))
    assert caller.patient_context == "pat_1"

    read = await records.get(caller, GetRecord(observation.record_id))
    assert json.loads(read.content)["resourceType"] == "Observation"
    with pytest.raises(PermissionDenied, match="scopes do not allow read of Condition"):
        await records.get(caller, GetRecord(condition.record_id))
    # The same patient without scopes reads both, as before.
    assert (await records.get(PATIENT, GetRecord(condition.record_id))).content == resource("Condition")


async def test_a_read_and_search_token_cannot_put(issuer: TokenIssuer) -> None:
    token = patient_token(issuer, "patient/Observation.rs")
    with pytest.raises(PermissionDenied, match="scopes do not allow create of Observation"):
        await as_caller(issuer, "PutRecord", token, put_request(resource("Observation")))
    with pytest.raises(PermissionDenied, match="scopes do not allow create"):
        await as_caller(
            issuer,
            "PutRecords",
            token,
            pb.PutRecordsRequest(patient_id="pat_1", records=[pb.RecordWrite(content=resource("Observation"))]),
        )
    writer = patient_token(issuer, "patient/Observation.crs")
    assert await as_caller(issuer, "PutRecord", writer, put_request(resource("Observation")))
    # A new version is an update; another type, another patient, or content naming no type: no.
    refused = [
        put_request(resource("Observation"), record_id="rec_1"),
        put_request(resource("Condition")),
        pb.PutRecordRequest(patient_id="pat_2", category=OBS, media_type=FHIR, content=resource("Observation")),
        put_request(b"not json"),
        put_request(b"%PDF-1.7", media_type="application/pdf"),  # a document is a Binary
    ]
    for request in refused:
        with pytest.raises(PermissionDenied):
            await as_caller(issuer, "PutRecord", writer, request)


async def test_a_new_version_needs_update_on_the_stored_records_own_type(
    records: RecordDesk, issuer: TokenIssuer
) -> None:
    observation = await records.put(PATIENT, PutRecord("pat_1", OBS, FHIR, resource("Observation")))
    token = patient_token(issuer, "patient/Condition.cu")
    update = put_request(resource("Condition"), record_id=observation.record_id)
    caller = await as_caller(issuer, "PutRecord", token, update)  # the content claims a Condition
    with pytest.raises(PermissionDenied, match="update of Observation"):
        await records.put(caller, PutRecord("pat_1", OBS, FHIR, resource("Condition"), observation.record_id))


async def test_documents_are_binary_and_lists_need_their_type(records: RecordDesk, issuer: TokenIssuer) -> None:
    document = await records.put(PATIENT, PutRecord("pat_1", DOCUMENTS, "application/pdf", b"%PDF-1.7"))
    binary = await as_caller(issuer, "GetRecord", patient_token(issuer, "patient/Binary.r"), None)
    assert (await records.get(binary, GetRecord(document.record_id))).content == b"%PDF-1.7"

    token = patient_token(issuer, "patient/Observation.rs")
    listing = pb.ListRecordsRequest(patient_id="pat_1", resource_type="Observation")
    assert await as_caller(issuer, "ListRecords", token, listing)
    search = pb.SearchRecordsRequest(patient_id="pat_1", resource_type="Observation")
    assert await as_caller(issuer, "SearchRecords", token, search)
    for method, request in [
        ("ListRecords", pb.ListRecordsRequest(patient_id="pat_1")),  # every type: needs `*`
        ("ListRecords", pb.ListRecordsRequest(patient_id="pat_2", resource_type="Observation")),
        ("SearchRecords", pb.SearchRecordsRequest(patient_id="pat_1", resource_type="Condition")),
        ("ExportRecords", pb.ExportRecordsRequest(patient_id="pat_1")),
        ("RequestErasure", pb.RequestErasureRequest(patient_id="pat_1")),  # not a FHIR interaction
    ]:
        with pytest.raises(PermissionDenied, match="scopes"):
            await as_caller(issuer, method, token, request)
    # A history is a read of the record's own type, checked once the record is known: a document
    # (Binary) is beyond an Observation-only token, within a Binary one.
    observations_only = await as_caller(issuer, "ListRecordVersions", token, None)
    with pytest.raises(PermissionDenied, match="scopes"):
        await records.versions(observations_only, ListRecordVersions(document.record_id))
    assert (await records.versions(binary, ListRecordVersions(document.record_id))).versions
    export = pb.ExportRecordsRequest(patient_id="pat_1")
    assert await as_caller(issuer, "ExportRecords", patient_token(issuer, "patient/*.rs"), export)
    # Unscoped: the roles alone decide, as before.
    assert await as_caller(issuer, "RequestErasure", issuer.token(sub="pat_1", kind="patient", roles=[]), None)


def readme_scope_rpcs() -> set[str]:
    """The RPCs the README's "SMART scopes" table lists."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("\n## SMART scopes\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("|")]
    return {r for r in rows if r != "RPC" and set(r) != {"-"}}


def test_the_readme_lists_exactly_the_rpcs_open_to_scoped_tokens() -> None:
    assert readme_scope_rpcs() == {m.rsplit("/", 1)[1] for m in SCOPES}
