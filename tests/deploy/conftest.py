"""Fixtures of the static checks of deploy/: the chart rendered once per scenario for the session
(rendering is what costs time). The helpers are in deploylib.py, beside this file."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploylib import SCENARIOS, documents, exported_metrics, render, scenario_values


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every scenario's manifests as objects, rendered once."""
    return {name: documents(render(scenario_values(name))) for name in SCENARIOS}


@pytest.fixture(scope="session")
def notes() -> Callable[[str], str]:
    def _notes(name: str) -> str:
        manifests = render(scenario_values(name))
        return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))

    return _notes


@pytest.fixture(scope="session")
def code_metrics() -> set[str]:
    return exported_metrics()
