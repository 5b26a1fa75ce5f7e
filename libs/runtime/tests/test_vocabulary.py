"""Principal ids name their kind by prefix: every kind has one, and each reads back."""

from __future__ import annotations

from medledger_runtime.vocabulary import (
    KIND_NAMES,
    PRINCIPAL_ID_PREFIX,
    PrincipalKind,
    principal_kind_of,
    service_principal_id,
)


def test_every_principal_kind_has_a_prefix_that_reads_back() -> None:
    assert set(PRINCIPAL_ID_PREFIX) == set(KIND_NAMES)
    assert len(set(PRINCIPAL_ID_PREFIX.values())) == len(PRINCIPAL_ID_PREFIX)
    for kind, prefix in PRINCIPAL_ID_PREFIX.items():
        assert principal_kind_of(f"{prefix}_{'0' * 32}") == kind
    assert principal_kind_of(service_principal_id("records")) == PrincipalKind.PRINCIPAL_KIND_SERVICE


def test_an_id_of_no_known_prefix_has_no_kind() -> None:
    for principal_id in ("", "pat", "patient_1", "xyz_1", "_pat", "PAT_1"):
        assert principal_kind_of(principal_id) is None
