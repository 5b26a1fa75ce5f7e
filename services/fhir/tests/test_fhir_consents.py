"""A FHIR Consent as the grant it asks for: the mapping, the 422s with their FHIRPath, and
consent's own rendering read back to the terms it was rendered from."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from medledger.consent.v1 import consent_service_pb2 as consent_pb
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_consent import domain as consent_domain
from medledger_consent import fhir as consent_fhir
from medledger_fhir import ids, principal_refs
from medledger_fhir.consents import consent_ref, grant_request, searchset
from medledger_fhir.outcomes import FhirError

PATIENT = "pat_" + "a" * 32
PRACTITIONER = "prn_" + "b" * 32
ORGANIZATION = "org_" + "c" * 32


def consent(**provision: Any) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{ids.fhir_id(PATIENT)}"},
        "provision": {
            "type": "permit",
            "actor": [
                {
                    "role": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}
                        ]
                    },
                    "reference": {"reference": f"Practitioner/{ids.fhir_id(PRACTITIONER)}"},
                }
            ],
            **provision,
        },
    }


def problem(resource: dict[str, Any]) -> FhirError:
    with pytest.raises(FhirError) as caught:
        grant_request(resource, "r1")
    return caught.value


def test_a_consent_maps_to_the_grant_it_asks_for() -> None:
    grant = grant_request(
        consent(
            action=[{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "access"}]}],
            purpose=[{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}],
            # A medledger data category, and a resource type standing for its category.
            **{
                "class": [
                    {"system": "https://medledger.dev/fhir/CodeSystem/data-category", "code": "conditions"},
                    {"system": "http://hl7.org/fhir/resource-types", "code": "Observation"},
                ]
            },
            period={"start": "2026-01-01", "end": "2027-01-01T00:00:00+01:00"},
        ),
        "r1",
    )
    assert grant.request_id == "r1" and grant.patient_id == PATIENT and grant.grantee_id == PRACTITIONER
    assert grant.provision == consent_pb.PROVISION_TYPE_PERMIT
    assert list(grant.actions) == [vocab.ACTION_READ]
    assert list(grant.purposes) == [vocab.PURPOSE_OF_USE_TREAT]
    assert set(grant.categories) == {vocab.DATA_CATEGORY_CONDITIONS, vocab.DATA_CATEGORY_OBSERVATIONS}
    assert grant.period_start.ToJsonString() == "2026-01-01T00:00:00Z"
    assert grant.period_end.ToJsonString() == "2026-12-31T23:00:00Z"
    # Lists left out are "all"; an open period starts now (consent's default).
    bare = grant_request(consent(), "r2")
    assert not bare.actions and not bare.purposes and not bare.categories
    assert not bare.HasField("period_start") and not bare.HasField("period_end")


def test_consents_own_rendering_reads_back_to_its_terms() -> None:
    version = consent_domain.ConsentVersion(
        consent_id="cns_" + "d" * 32,
        version=1,
        patient_id=PATIENT,
        grantee_id=ORGANIZATION,
        provision=consent_domain.DENY,
        actions=frozenset({vocab.ACTION_READ, vocab.ACTION_WRITE}),
        categories=frozenset({vocab.DATA_CATEGORY_CLAIMS}),
        purposes=frozenset({vocab.PURPOSE_OF_USE_HRESCH}),
        period_start=1_790_000_000.0,
        period_end=1_800_000_000.0,
        status=consent_domain.ACTIVE,
        recorded_by=PATIENT,
        recorded_at=1_790_000_000.0,
    )
    grant = grant_request(consent_fhir.fhir_consent(version), "r1")
    assert (grant.patient_id, grant.grantee_id, grant.provision) == (
        PATIENT,
        ORGANIZATION,
        consent_pb.PROVISION_TYPE_DENY,
    )
    assert set(grant.actions) == version.actions and set(grant.categories) == version.categories
    assert set(grant.purposes) == version.purposes
    assert grant.period_start.ToSeconds() == 1_790_000_000 and grant.period_end.ToSeconds() == 1_800_000_000


@pytest.mark.parametrize(
    ("change", "expression"),
    [
        (
            lambda c: c["provision"]["actor"].append(copy.deepcopy(c["provision"]["actor"][0])),
            "Consent.provision.actor",
        ),
        (
            lambda c: c["provision"]["actor"][0].update(reference={"reference": "Patient/" + "pat-" + "a" * 32}),
            "Consent.provision.actor[0].reference",
        ),
        (
            lambda c: c["provision"]["actor"][0].update(reference={"reference": 7}),
            "Consent.provision.actor[0].reference.reference",
        ),
        (
            lambda c: c["provision"].update(purpose=[{"code": "TREAT"}, {"code": "SHOPPING"}]),
            "Consent.provision.purpose[1]",
        ),
        (lambda c: c["provision"].update(action=[{"coding": [{"code": "disclose"}]}]), "Consent.provision.action[0]"),
        (
            lambda c: c["provision"].update({"class": [{"system": "urn:other", "code": "x"}]}),
            "Consent.provision.class[0]",
        ),
        (lambda c: c["provision"].update(provision=[{"type": "deny"}]), "Consent.provision.provision"),
        (lambda c: c["provision"].update(securityLabel=[{"code": "R"}]), "Consent.provision.securityLabel"),
        (lambda c: c["provision"].update(type="maybe"), "Consent.provision.type"),
        (
            lambda c: c["provision"].update(period={"start": "2026-02-01", "end": "2026-01-01"}),
            "Consent.provision.period.end",
        ),
        (lambda c: c.update(status="proposed"), "Consent.status"),
        (lambda c: c.update(patient={"reference": "Practitioner/" + "prn-" + "b" * 32}), "Consent.patient"),
        (lambda c: c.pop("scope"), "Consent.scope"),
        (lambda c: c.pop("provision"), "Consent.provision"),
    ],
)
def test_what_consent_cannot_grant_is_422_with_its_fhirpath(change: Any, expression: str) -> None:
    resource = consent()
    change(resource)
    error = problem(resource)
    assert error.status == 422 and expression in error.expression


def test_consent_ids_are_consents_with_or_without_a_version() -> None:
    hex32 = "e" * 32
    assert consent_ref(f"cns-{hex32}") == (f"cns_{hex32}", 0)
    assert consent_ref(f"cns-{hex32}-v12") == (f"cns_{hex32}", 12)
    for other in (f"cns_{hex32}", f"cns-{hex32}-v0", "cns-xyz", f"pat-{hex32}"):
        with pytest.raises(FhirError) as caught:
            consent_ref(other)
        assert caught.value.status == 404


def test_principal_references_both_ways() -> None:
    kinds = ("pat",)
    assert principal_refs.from_reference(f"Patient/{ids.fhir_id(PATIENT)}", kinds) == PATIENT
    assert principal_refs.from_reference(f"http://x/fhir/R4/Patient/pat-{'a' * 32}/_history/2", kinds) == PATIENT
    assert principal_refs.from_reference(PATIENT, kinds) == PATIENT
    assert principal_refs.from_reference(f"Practitioner/pat-{'a' * 32}", kinds) is None  # type and kind disagree
    assert principal_refs.from_reference(f"Practitioner/prn-{'b' * 32}", kinds) is None
    by_identifier = {"identifier": {"system": principal_refs.PRINCIPAL_SYSTEM, "value": PRACTITIONER}}
    assert principal_refs.from_fhir_reference(by_identifier, ("prn",)) == PRACTITIONER
    foreign = {"identifier": {"system": "urn:other", "value": PRACTITIONER}}
    assert principal_refs.from_fhir_reference(foreign, ("prn",)) is None


def test_a_searchset_links_its_pages() -> None:
    document = '{"resourceType":"Consent","id":"cns-1-v1"}'
    bundle = searchset("http://h/fhir/R4", [document], total=3, self_url="s", next_url="n")
    assert bundle["type"] == "searchset" and bundle["total"] == 3
    assert bundle["link"] == [{"relation": "self", "url": "s"}, {"relation": "next", "url": "n"}]
    assert bundle["entry"][0]["fullUrl"] == "http://h/fhir/R4/Consent/cns-1-v1"
    assert "next" not in str(searchset("b", [], total=0, self_url="s", next_url=None)["link"])
