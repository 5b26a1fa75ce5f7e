"""FHIR JSON's string rule: no control character but tab, CR and LF, named by its FHIRPath."""

from __future__ import annotations

from medledger_runtime.fhir_json import control_character_at


def test_control_characters_in_a_body_s_strings_are_named_by_their_fhirpath() -> None:
    ok = {"resourceType": "Observation", "note": [{"text": "line one\nline two\ttabbed\r"}]}
    assert control_character_at(ok) is None
    assert control_character_at({"resourceType": "Observation", "status": "final\x00"}) == "Observation.status"
    nested = {"resourceType": "Bundle", "entry": [{}, {"resource": {"code": {"text": "a\x1bb"}}}]}
    assert control_character_at(nested) == "Bundle.entry[1].resource.code.text"
    assert control_character_at({"resourceType": "Observation", "x\x07": 1}) == "Observation"
    deep: object = "\x00"
    for _ in range(5000):  # deeper than recursion would go
        deep = [deep]
    assert control_character_at({"resourceType": "Basic", "deep": deep}) is not None
