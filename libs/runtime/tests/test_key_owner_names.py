"""One function names every service's per-patient key; a shredder takes the old shared name along."""

from __future__ import annotations

from pathlib import Path

import pytest

from medledger_runtime.errors import InvalidArgument, NotFound
from medledger_runtime.keys import (
    PATIENT_KEY_PREFIXES,
    KeyShredder,
    KeyType,
    LocalKeyring,
    create_master_key_file,
    legacy_patient_key_name,
    legacy_twin,
    patient_key_name,
)


def test_each_owner_has_a_prefix_no_other_owners_name_starts_with() -> None:
    owners = ("identity", "consent", "records", "records-search", "audit")
    names = {owner: patient_key_name(owner, "Pat_1") for owner in owners}  # type: ignore[arg-type]
    assert names == {
        "identity": "identity-patient-pat_1",
        "consent": "consent-patient-pat_1",
        "records": "records-patient-pat_1",
        "records-search": "records-search-pat_1",
        "audit": "audit-subject-pat_1",
    }
    for owner, name in names.items():
        others = [p for o, p in PATIENT_KEY_PREFIXES.items() if o != owner]
        assert not any(name.startswith(p) for p in others)
        assert not name.startswith(legacy_patient_key_name("x")[: len("patient-")])
    with pytest.raises(ValueError, match="anchoring"):
        patient_key_name("anchoring", "pat_1")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="key_name"):
        patient_key_name("records", "has space")


def test_legacy_twin_is_the_old_shared_name_of_an_owners_patient_key_only() -> None:
    assert legacy_twin("records-patient-pat_1") == "patient-pat_1"
    assert legacy_twin("identity-patient-pat_1") == "patient-pat_1"
    assert legacy_twin("audit-subject-pat_1") is None  # audit never shared its keys
    assert legacy_twin("records-search-pat_1") is None  # nor were search keys ever shared
    assert legacy_twin("identity-token-signing") is None


async def test_shredding_an_owners_patient_key_takes_the_old_shared_one_along(tmp_path: Path) -> None:
    master = create_master_key_file(tmp_path / "secrets" / "master.key")
    async with await LocalKeyring.open(tmp_path / "keys" / "consent.keyring", master) as keys:
        owned, old, other = patient_key_name("consent", "pat_1"), legacy_patient_key_name("pat_1"), "patient-pat_2"
        for name in (owned, old, other):
            await keys.ensure_key(name, KeyType.AES256_GCM96)
        await keys.rotate(owned)
        shredder = KeyShredder(keys)
        assert await shredder.key_versions(owned) == [1, 2]
        await shredder.shred(owned)
        await shredder.shred(owned)  # again: done
        for name in (owned, old):
            with pytest.raises(NotFound):
                await keys.key_info(name)
        assert (await keys.key_info(other)).latest_version == 1  # another patient's stays
        assert await shredder.key_versions(owned) == []
