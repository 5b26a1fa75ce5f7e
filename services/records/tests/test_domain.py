"""Records' pure domain: every Synthea resource validates and its commitment recomputes from
what `get` returns; JSON that RFC 8785 cannot represent exactly is refused; invalid FHIR names
its problems; sealed versions are bound to their record, version and patient."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import rfc8785

from medledger_devstack.synthetic import Population
from medledger_records import domain
from medledger_runtime.errors import DataLoss, InvalidArgument


def test_every_synthea_resource_validates_and_its_commitment_recomputes(synthetic_patients: Population) -> None:
    # The seeded generated set: three patients, some three thousand resources of 20-odd types.
    resources = synthetic_patients.resources()
    assert len(resources) > 500
    types = set()
    for resource in resources:
        returned = json.dumps(resource).encode()  # what a get would return
        types.add(domain.validate_fhir(domain.parse_json(returned)))
        salt = domain.new_salt()
        commitment = domain.record_commitment(returned, salt)
        # Recomputed by hand, from the README's formula.
        expected = hashlib.sha256(b"medledger:record:v1\n" + salt + rfc8785.dumps(json.loads(returned))).hexdigest()
        assert commitment == expected
        # Key order and whitespace do not matter; the salt does.
        reordered = json.dumps(dict(reversed(list(resource.items()))), indent=2).encode()
        assert domain.record_commitment(reordered, salt) == commitment
        assert domain.record_commitment(returned, domain.new_salt()) != commitment
    assert {"Patient", "Observation", "Encounter", "Condition", "Immunization"} <= types


@pytest.mark.parametrize(
    "content",
    [
        b'{"a": 1, "a": 2}',
        b'{"n": 9007199254740993}',
        b'{"n": 0.10000000000000000001}',
        b'{"n": NaN}',
        b'{"n": Infinity}',
        b'{"n": 1',
        b"\xff\xfe",
    ],
)
def test_json_that_rfc8785_cannot_represent_exactly_is_refused(content: bytes) -> None:
    with pytest.raises(InvalidArgument) as err:
        domain.parse_json(content)
    assert [v.field for v in err.value.violations] == ["content"]


def test_numbers_a_double_holds_exactly_are_accepted() -> None:
    assert domain.parse_json(b'{"a": 0.1, "b": 1e21, "c": 9007199254740991, "d": -2.5}')["c"] == 2**53 - 1


def test_invalid_fhir_names_each_problem() -> None:
    with pytest.raises(InvalidArgument) as err:
        domain.validate_fhir(
            {"resourceType": "Observation", "status": "final", "code": {}, "valueQuantity": {"value": "x"}, "bogus": 1}
        )
    assert {v.field for v in err.value.violations} == {"content.valueQuantity.value", "content.bogus"}
    with pytest.raises(InvalidArgument) as err:
        domain.validate_fhir({"resourceType": "Observation", "code": {}})
    assert [v.field for v in err.value.violations] == ["content.status"]
    for bad, field in (
        ({"resourceType": "NoSuchThing"}, "content.resourceType"),
        ({"id": "x"}, "content.resourceType"),
        ([1, 2], "content"),
    ):
        with pytest.raises(InvalidArgument) as err:
            domain.validate_fhir(bad)
        assert [v.field for v in err.value.violations] == [field]


def test_control_characters_in_a_resource_s_strings_are_invalid_fhir_named_by_their_path() -> None:
    # fhir.resources lets them through; FHIR's JSON format does not (json.html#primitive).
    base = {"resourceType": "Observation", "status": "final", "code": {"text": "ok"}}
    note = dict(base, note=[{"text": "line one\nline two\ttabbed\r"}])
    assert domain.validate_fhir(note) == "Observation"
    for bad, field in (
        (dict(base, code={"text": "a\x1bb"}), "content.code.text"),
        (dict(base, note=[{"text": "fine"}, {"text": "\x00"}]), "content.note[1].text"),
        (dict(base, status="final\x07"), "content.status"),
    ):
        with pytest.raises(InvalidArgument) as err:
            domain.validate_fhir(bad)
        assert [v.field for v in err.value.violations] == [field]
    # Parsed from bytes, as a put parses them: the JSON escape is the character itself.
    with pytest.raises(InvalidArgument) as err:
        domain.validate_fhir(domain.parse_json(json.dumps(dict(base, code={"text": "\u0002"})).encode()))
    assert [v.field for v in err.value.violations] == ["content.code.text"]


def test_document_commitment_is_the_readme_formula() -> None:
    salt, data = domain.new_salt(), os.urandom(1000)
    expected = hashlib.sha256(
        b"medledger:document:v1\n" + salt + hashlib.sha256(b"application/pdf").digest() + data
    ).hexdigest()
    assert domain.document_commitment("application/pdf", data, salt) == expected
    assert domain.document_commitment("image/png", data, salt) != expected


def test_a_sealed_version_opens_only_unaltered_and_under_its_own_binding() -> None:
    key, plaintext = os.urandom(32), b'{"resourceType": "Patient"}'
    sealed = domain.seal(key, plaintext, "rec_1", 2, "pat_1")
    assert plaintext not in sealed
    assert domain.unseal(key, sealed, "rec_1", 2, "pat_1") == plaintext
    for i in (0, len(sealed) // 2, len(sealed) - 1):
        flipped = bytearray(sealed)
        flipped[i] ^= 1
        with pytest.raises(DataLoss):
            domain.unseal(key, bytes(flipped), "rec_1", 2, "pat_1")
    for binding in (("rec_2", 2, "pat_1"), ("rec_1", 1, "pat_1"), ("rec_1", 2, "pat_2")):
        with pytest.raises(DataLoss):
            domain.unseal(key, sealed, *binding)
    with pytest.raises(DataLoss):
        domain.unseal(os.urandom(32), sealed, "rec_1", 2, "pat_1")
    with pytest.raises(DataLoss):
        domain.unseal(key, sealed[:20], "rec_1", 2, "pat_1")
    # Length-prefixed binding: shifting a character between fields changes it.
    assert domain.associated_data("ab", 1, "c") != domain.associated_data("a", 1, "bc")


def test_a_version_provenance_is_a_valid_fhir_provenance_naming_writer_and_organization() -> None:
    from fhir.resources.R4B.provenance import Provenance

    by_practitioner = domain.provenance(
        record_id="rec_" + "a" * 32,
        version=3,
        written_by="prn_2",
        organization_id="org_3",
        written_at=1_764_000_000.25,
    )
    parsed = Provenance.model_validate(by_practitioner)
    agent = parsed.agent[0]
    assert agent.who.type == "Practitioner" and agent.who.identifier.value == "prn_2"
    assert agent.onBehalfOf.identifier.value == "org_3"
    assert parsed.target[0].identifier.value == "rec_" + "a" * 32 + "/_history/3"
    assert by_practitioner["recorded"] == "2025-11-24T16:00:00.250Z"
    by_patient = domain.provenance(
        record_id="rec_" + "a" * 32, version=1, written_by="pat_1", organization_id="", written_at=0
    )
    assert Provenance.model_validate(by_patient).agent[0].who.type == "Patient"
    assert "onBehalfOf" not in by_patient["agent"][0]
    # The writer's own kind, from its id, whoever they write for: a guardian who is a patient is a
    # Patient, one who is a practitioner a Practitioner, an application a Device; an id of no
    # known kind is named by its identifier alone.
    writers = (
        ("pat_9", "Patient"),
        ("prn_8", "Practitioner"),
        ("rsr_7", "Practitioner"),
        ("org_6", "Organization"),
        ("cli_4", "Device"),
        ("svc_records", "Device"),
        ("xyz_5", None),
    )
    for written_by, kind in writers:
        by = domain.provenance(
            record_id="rec_" + "a" * 32,
            version=1,
            written_by=written_by,
            organization_id="",
            written_at=0,
        )
        who = Provenance.model_validate(by).agent[0].who
        assert who.type == kind and who.identifier.value == written_by
