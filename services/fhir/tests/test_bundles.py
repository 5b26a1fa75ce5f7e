"""Bundles without the services: validation, the order of the work, what identity and records are
asked, and the answer of each entry (a batch's failures entry by entry, a transaction's whole)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.records.v1 import records_service_pb2 as pb
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_fhir.backends import Backends
from medledger_fhir.bundles import (
    MAX_ENTRIES,
    BundleRunner,
    parse_bundle,
    run_batch,
    run_transaction,
)
from medledger_fhir.outcomes import FhirError
from medledger_runtime.auth import Caller, acting_as
from medledger_runtime.auth.scopes import ScopeSet

FIXTURE = Path(__file__).parent / "fixtures" / "synthea_batch.json"
Kind = vocab.PrincipalKind
C = vocab.DataCategory


def batch() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


def transaction() -> dict[str, Any]:
    bundle = batch()
    bundle["type"] = "transaction"
    return bundle


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class FakeIdentity:
    def __init__(self, *, may_register: bool = True) -> None:
        self.may_register = may_register
        self.by_identifier: dict[tuple[int, str], str] = {}
        self.registered: list[id_pb.RegisterPrincipalRequest] = []

    async def FindPrincipals(self, request: id_pb.FindPrincipalsRequest, metadata: Any) -> Any:
        found = self.by_identifier.get((request.kind, request.identifier))
        return id_pb.FindPrincipalsResponse(
            principals=[id_pb.Principal(principal_id=found, version=3)] if found else []
        )

    async def RegisterPrincipal(self, request: id_pb.RegisterPrincipalRequest, metadata: Any) -> Any:
        if not self.may_register:
            raise rpc_error(grpc.StatusCode.PERMISSION_DENIED, "admins only")
        self.registered.append(request)
        prefix = {Kind.PRINCIPAL_KIND_PATIENT: "pat", Kind.PRINCIPAL_KIND_PRACTITIONER: "prn"}.get(request.kind, "org")
        principal_id = f"{prefix}_{len(self.registered):04x}"
        return id_pb.RegisterPrincipalResponse(principal=id_pb.Principal(principal_id=principal_id, version=1))


class FakeRecords:
    """PutRecords as records answers it: refuses a request with an invalid resource (naming it),
    or of a denied category, whole."""

    def __init__(self, denied: frozenset[int] = frozenset()) -> None:
        self.denied = denied
        self.calls: list[pb.PutRecordsRequest] = []
        self.stored: list[tuple[str, dict[str, Any]]] = []

    async def PutRecords(self, request: pb.PutRecordsRequest, metadata: Any) -> Any:
        self.calls.append(request)
        for i, write in enumerate(request.records):
            if b'"invalid"' in write.content:
                raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, f"records[{i}].content: invalid FHIR")
            if write.category in self.denied:
                raise rpc_error(grpc.StatusCode.PERMISSION_DENIED, "consent denies it")
        out = []
        for write in request.records:
            record_id = f"rec_{len(self.stored):04x}"
            self.stored.append((record_id, json.loads(write.content)))
            out.append(pb.PutRecordResponse(record_id=record_id, version=1))
        return pb.PutRecordsResponse(records=out)


def runner(identity: FakeIdentity, records: FakeRecords) -> BundleRunner:
    backends = Backends(identity, None, records, None, ())  # type: ignore[arg-type]
    return BundleRunner(backends, (("authorization", "Bearer t"),), "prn_engine", "digest")


CALLER = Caller("prn_engine", "practitioner", frozenset({"admin"}), "org_home", "tok", 0.0)


def test_validation_of_the_bundle_as_a_whole() -> None:
    for body, status in (
        ({"resourceType": "Patient"}, 400),
        ({"resourceType": "Bundle", "type": "collection"}, 400),
        ({"resourceType": "Bundle", "type": "batch", "entry": {}}, 400),
        ({"resourceType": "Bundle", "type": "batch", "entry": [{}] * (MAX_ENTRIES + 1)}, 413),
    ):
        with pytest.raises(FhirError) as caught:
            parse_bundle(body)
        assert caught.value.status == status


def test_a_batch_refuses_bad_entries_one_by_one_and_a_transaction_whole() -> None:
    body = batch()
    body["entry"].append(
        {"request": {"method": "GET", "url": "Observation?patient=x"}, "resource": {"resourceType": "Observation"}}
    )
    body["entry"].append({"request": {"method": "POST", "url": "Basic"}, "resource": {"resourceType": "Basic"}})
    orphan = copy.deepcopy(body["entry"][6])
    orphan["fullUrl"] = "urn:uuid:00000000-0000-4000-8000-999999999999"
    del orphan["resource"]["subject"]
    body["entry"].append(orphan)
    body["entry"].append(copy.deepcopy(body["entry"][7]))  # a fullUrl twice
    parsed = parse_bundle(body)
    assert sorted(parsed.refused) == [13, 14, 15, 16]
    assert [parsed.refused[i].status for i in (13, 14, 15, 16)] == [400, 422, 422, 400]
    assert len(parsed.entries) == 13
    body["type"] = "transaction"
    with pytest.raises(FhirError) as caught:
        parse_bundle(body)
    assert caught.value.expression == ("Bundle.entry[13].request.method",)


def test_put_entries_name_the_record_and_its_version() -> None:
    body = transaction()
    body["entry"][6]["request"] = {"method": "PUT", "url": "Observation/rec-00ff", "ifMatch": 'W/"4"'}
    entry = next(e for e in parse_bundle(body).entries if e.index == 6)
    assert (entry.record_id, entry.expected_version) == ("rec_00ff", 4)
    body["entry"][6]["request"] = {"method": "PUT", "url": "Observation/../x"}
    with pytest.raises(FhirError):
        parse_bundle(body)
    body["entry"][2]["request"] = {"method": "PUT", "url": "Patient/pat-1"}
    body["entry"][6]["request"] = {"method": "POST", "url": "Observation"}
    with pytest.raises(FhirError):
        parse_bundle(body)


async def test_a_transaction_registers_principals_then_puts_every_record_in_one_call() -> None:
    identity, records = FakeIdentity(), FakeRecords()
    work = runner(identity, records)
    with acting_as(CALLER):
        answers = await run_transaction(work, parse_bundle(transaction()))
    assert [r.kind for r in identity.registered] == [
        Kind.PRINCIPAL_KIND_ORGANIZATION,
        Kind.PRINCIPAL_KIND_PRACTITIONER,
        Kind.PRINCIPAL_KIND_PATIENT,
    ]
    org, practitioner, patient = identity.registered
    # identity keeps the Organization resource (matched by its identifier the next time).
    assert json.loads(org.fhir_resource)["identifier"][0]["value"] == "fixture-org-0001"
    assert "id" not in json.loads(org.fhir_resource)
    assert practitioner.organization_id == "org_0001"  # the bundle's Organization
    assert json.loads(patient.fhir_resource)["identifier"][0]["value"] == "fixture-patient-0001"
    assert len(records.calls) == 1
    call = records.calls[0]
    assert call.patient_id == "pat_0003" and call.assign_fhir_identity and len(call.records) == 10
    assert call.references["urn:uuid:00000000-0000-4000-8000-000000000003"] == "Patient/pat-0003"
    assert call.references["urn:uuid:00000000-0000-4000-8000-000000000002"] == "Practitioner/prn-0002"
    assert all(w.full_url.startswith("urn:uuid:") for w in call.records)
    assert {w.category for w in call.records} >= {C.DATA_CATEGORY_OBSERVATIONS, C.DATA_CATEGORY_ENCOUNTERS}
    assert [a["status"] for a in answers[:3]] == ["201 Created"] * 3
    assert answers[2]["location"] == "Patient/pat-0003"
    assert answers[3]["location"] == "Encounter/rec-0000/_history/1" and answers[3]["etag"] == 'W/"1"'
    assert len(answers) == 13

    # Posted again: every principal matched by identifier, nothing registered twice, and the same
    # request id for records (a retry, which records answers with its first response).
    identity.by_identifier[
        (Kind.PRINCIPAL_KIND_PATIENT, "https://github.com/synthetichealth/synthea|fixture-patient-0001")
    ] = "pat_0003"
    identity.by_identifier[(Kind.PRINCIPAL_KIND_PRACTITIONER, "http://hl7.org/fhir/sid/us-npi|9999000001")] = "prn_0002"
    identity.by_identifier[
        (Kind.PRINCIPAL_KIND_ORGANIZATION, "https://github.com/synthetichealth/synthea|fixture-org-0001")
    ] = "org_0001"
    again = runner(identity, records)
    with acting_as(CALLER):
        answers = await run_transaction(again, parse_bundle(transaction()))
    assert [a["status"] for a in answers[:3]] == ["200 OK"] * 3
    assert answers[0]["location"] == "Organization/org-0001"
    assert len(identity.registered) == 3  # nothing registered twice
    assert records.calls[1].request_id == records.calls[0].request_id


async def test_a_transaction_beyond_the_callers_scopes_is_refused_before_anything_is_written() -> None:
    """A SMART client whose scopes leave out Practitioner create: 403 naming the entry, and
    neither its Organization nor anything else registered or stored (a transaction is whole)."""
    identity, records = FakeIdentity(), FakeRecords()
    client = Caller(
        "cli_engine", "smart-client", frozenset(), "org_home", "tok", 0.0,
        scopes=ScopeSet.parse("system/Organization.cr system/Patient.cr system/Practitioner.rs system/*.rs "
                              "system/Observation.c system/Encounter.c system/DiagnosticReport.c system/Claim.c "
                              "system/Condition.c system/Procedure.c system/Immunization.c"),
    )  # fmt: skip
    with acting_as(client), pytest.raises(FhirError) as caught:
        await run_transaction(runner(identity, records), parse_bundle(transaction()))
    assert caught.value.status == 403 and caught.value.expression == ("Bundle.entry[1].resource",)
    assert "create of Practitioner" in caught.value.message
    assert not identity.registered and not records.calls
    # The practitioner known already: nothing of it to create, and the rest is allowed.
    identity.by_identifier[(Kind.PRINCIPAL_KIND_PRACTITIONER, "http://hl7.org/fhir/sid/us-npi|9999000001")] = "prn_0009"
    with acting_as(client):
        answers = await run_transaction(runner(identity, records), parse_bundle(transaction()))
    assert [a["status"] for a in answers[:3]] == ["201 Created", "200 OK", "201 Created"]
    assert len(records.calls) == 1


async def test_a_transaction_with_a_bad_entry_fails_whole() -> None:
    body = transaction()
    body["entry"][8]["resource"]["status"] = "invalid"
    records = FakeRecords()
    with acting_as(CALLER), pytest.raises(grpc.aio.AioRpcError):
        await run_transaction(runner(FakeIdentity(), records), parse_bundle(body))
    assert not records.stored


async def test_a_transaction_whose_organization_the_caller_may_not_register_fails() -> None:
    records = FakeRecords()
    with acting_as(CALLER), pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_transaction(runner(FakeIdentity(may_register=False), records), parse_bundle(transaction()))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED and not records.calls


async def test_a_batch_answers_each_entry() -> None:
    body = batch()
    body["entry"][8]["resource"]["status"] = "invalid"  # one bad Observation
    identity = FakeIdentity()
    records = FakeRecords(denied=frozenset({C.DATA_CATEGORY_CLAIMS}))
    with acting_as(CALLER):
        answers = await run_batch(runner(identity, records), parse_bundle(body))
    statuses = [a["status"] for a in answers]
    assert statuses[:3] == ["201 Created"] * 3
    assert statuses[8] == "422 Unprocessable Entity"
    assert answers[8]["outcome"]["issue"][0]["expression"] == ["Bundle.entry[8].resource"]
    assert statuses[12] == "403 Forbidden"  # the Claim: its category denied, its neighbours not
    assert all(s == "201 Created" for i, s in enumerate(statuses) if i not in (8, 12))
    # One call for the patient first; it failed, so one call per category, Encounters first, and
    # in the category with the bad resource one per entry; references to entries stored before
    # are rewritten by the gateway.
    assert len(records.calls[0].records) == 10
    first_types = [json.loads(c.records[0].content)["resourceType"] for c in records.calls[1:]]
    assert first_types[0] == "Encounter" and len(records.calls[1].records) == 2
    observation_calls = [
        c for c in records.calls[1:] if json.loads(c.records[0].content)["resourceType"] == "Observation"
    ]
    assert [len(c.records) for c in observation_calls] == [3, 1, 1, 1]
    assert len(records.calls) == 1 + 7 + 3
    report = next(c for c in records.calls if json.loads(c.records[0].content)["resourceType"] == "DiagnosticReport")
    # Its result is the Observation refused: left a urn:uuid, not pointed at anything else.
    assert "urn:uuid:00000000-0000-4000-8000-000000000009" not in report.references
    assert report.references["urn:uuid:00000000-0000-4000-8000-000000000005"].startswith("Encounter/rec-")


async def test_a_batch_refuses_principals_the_caller_may_not_register_entry_by_entry() -> None:
    identity = FakeIdentity(may_register=False)
    # The patient is known already: their entries go on.
    identity.by_identifier[
        (Kind.PRINCIPAL_KIND_PATIENT, "https://github.com/synthetichealth/synthea|fixture-patient-0001")
    ] = "pat_0777"
    records = FakeRecords()
    with acting_as(CALLER):
        answers = await run_batch(runner(identity, records), parse_bundle(batch()))
    assert [a["status"] for a in answers[:3]] == ["403 Forbidden", "403 Forbidden", "200 OK"]
    assert answers[0]["outcome"]["resourceType"] == "OperationOutcome"
    assert all(a["status"] == "201 Created" for a in answers[3:])
    assert records.calls[0].patient_id == "pat_0777"
    # The organization it could not register stays an unresolved urn:uuid: nothing invents it.
    assert "urn:uuid:00000000-0000-4000-8000-000000000001" not in records.calls[0].references


async def test_entries_of_a_failed_patient_are_refused_with_a_reason() -> None:
    records = FakeRecords()
    with acting_as(CALLER):
        answers = await run_batch(runner(FakeIdentity(may_register=False), records), parse_bundle(batch()))
    assert all(a["status"] == "422 Unprocessable Entity" for a in answers[3:])
    assert not records.calls


async def test_entries_kept_nowhere_are_answered_as_not_stored() -> None:
    body = transaction()
    body["entry"].append(
        {
            "fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000099",
            "resource": {"resourceType": "Location", "name": "A ward"},
            "request": {"method": "POST", "url": "Location"},
        }
    )
    with acting_as(CALLER):
        answers = await run_transaction(runner(FakeIdentity(), FakeRecords()), parse_bundle(body))
    assert answers[-1]["status"] == "200 OK"
    assert answers[-1]["outcome"]["issue"][0]["severity"] == "information"


async def test_a_practitioner_is_registered_with_the_organization_its_role_names() -> None:
    body = transaction()
    second = copy.deepcopy(body["entry"][0])
    second["fullUrl"] = "urn:uuid:00000000-0000-4000-8000-000000000098"
    second["resource"]["identifier"][0]["value"] = "fixture-org-0002"
    role = {
        "fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000097",
        "resource": {
            "resourceType": "PractitionerRole",
            "practitioner": {"reference": "urn:uuid:00000000-0000-4000-8000-000000000002"},
            "organization": {"reference": second["fullUrl"]},
        },
        "request": {"method": "POST", "url": "PractitionerRole"},
    }
    body["entry"][1:1] = [second, role]
    identity = FakeIdentity()
    with acting_as(CALLER):
        await run_transaction(runner(identity, FakeRecords()), parse_bundle(body))
    orgs = [r for r in identity.registered if r.kind == Kind.PRINCIPAL_KIND_ORGANIZATION]
    practitioner = next(r for r in identity.registered if r.kind == Kind.PRINCIPAL_KIND_PRACTITIONER)
    assert len(orgs) == 2 and orgs[0].request_id != orgs[1].request_id
    assert practitioner.organization_id == "org_0002"  # the role's organization, not the first one


class RacedIdentity(FakeIdentity):
    """Another bundle registers each principal between this bundle's look-up and its registration
    (two exports naming the same people, loaded at once): identity answers ALREADY_EXISTS."""

    async def RegisterPrincipal(self, request: id_pb.RegisterPrincipalRequest, metadata: Any) -> Any:
        reply = await super().RegisterPrincipal(request, metadata)
        resource = json.loads(request.fhir_resource or b"{}")
        for identifier in resource.get("identifier", []):
            key = (request.kind, f"{identifier['system']}|{identifier['value']}")
            self.by_identifier[key] = reply.principal.principal_id
        raise rpc_error(grpc.StatusCode.ALREADY_EXISTS, "a principal with this identifier is already registered")


async def test_a_principal_registered_meanwhile_by_another_bundle_is_matched() -> None:
    identity, records = RacedIdentity(), FakeRecords()
    with acting_as(CALLER):
        answers = await run_transaction(runner(identity, records), parse_bundle(transaction()))
    # Each principal was found after all, and the records were put under the patient found.
    principals = [a for a in answers if a["status"] == "200 OK" and "location" in a][:3]
    assert [p["location"].split("/")[0] for p in principals] == ["Organization", "Practitioner", "Patient"]
    assert records.calls and records.calls[0].patient_id == "pat_0003"
