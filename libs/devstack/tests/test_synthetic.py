"""The synthetic patients tests and benchmarks use: seeded (the same patients on every machine),
valid FHIR R4, and the hospital-export shape made by the project's own code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle

from medledger_devstack import synthetic


def test_the_seeded_population_is_the_same_on_every_run(
    synthetic_patients: synthetic.Population, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDLEDGER_SYNTHEA_CACHE", str(tmp_path))  # not the cached copy: a new run
    synthetic.population.cache_clear()
    try:
        again = synthetic.population(synthetic.DEFAULT_POPULATION, synthetic.DEFAULT_SEED)
    finally:
        synthetic.population.cache_clear()
    assert again.folder.parent == tmp_path
    assert again.bundles == synthetic_patients.bundles
    other_seed = tmp_path / "other"
    synthetic.generate(other_seed, 1, synthetic.DEFAULT_SEED + 1)
    [bundle] = [json.loads(p.read_text()) for p in (other_seed / "fhir").glob("*.json")]
    assert bundle not in synthetic_patients.bundles


def test_the_population_is_valid_fhir_r4_transactions_of_three_patients(
    synthetic_patients: synthetic.Population,
) -> None:
    assert len(synthetic_patients.bundles) == 3
    for bundle in synthetic_patients:
        assert bundle["type"] == "transaction"
        Bundle.model_validate(bundle)  # every entry, under the R4 (R4B) models
    assert len(synthetic_patients.of_type("Patient")) == 3
    assert synthetic_patients.first("Observation")["resourceType"] == "Observation"
    with pytest.raises(AssertionError, match="no Basic among the generated patients"):
        synthetic_patients.first("Basic")


def test_a_hospital_export_is_a_batch_with_its_organizations_and_practitioners_first(
    synthetic_patients: synthetic.Population,
) -> None:
    source = synthetic_patients.bundles[0]
    export = synthetic.hospital_export(source)
    Bundle.model_validate(export)
    assert export["type"] == "batch"
    types = [e["resource"]["resourceType"] for e in export["entry"]]
    staff = [t for t in types if t in ("Organization", "Practitioner")]
    assert {"Organization", "Practitioner"} <= set(staff) and types[: len(staff)] == staff
    assert "Patient" in types and len(types) == len(source["entry"])
    assert all(e["request"] == {"method": "POST", "url": e["resource"]["resourceType"]} for e in export["entry"])
    assert sorted(json.dumps(e["resource"], sort_keys=True) for e in export["entry"]) == sorted(
        json.dumps(e["resource"], sort_keys=True) for e in source["entry"]
    )
    assert source["type"] == "transaction"  # the population itself is left as it was
