"""The verifier reads the anchor registry through an ABI of its own (no compiled contracts beside
an installed SDK): every entry of it must be the compiled contract's, exactly."""

from __future__ import annotations

from medledger_verifier import chain


def test_the_verifiers_registry_abi_is_the_compiled_contracts() -> None:
    compiled = {(e["type"], e.get("name")): e for e in chain.abi(chain.ANCHOR_REGISTRY)}
    assert chain.ANCHOR_REGISTRY_READS
    for entry in chain.ANCHOR_REGISTRY_READS:
        assert compiled.get((entry["type"], entry["name"])) == entry, entry["name"]


def test_a_changed_entry_would_be_caught() -> None:
    compiled = {(e["type"], e.get("name")): e for e in chain.abi(chain.ANCHOR_REGISTRY)}
    changed = {**chain.ANCHOR_REGISTRY_READS[0], "stateMutability": "nonpayable"}
    assert compiled[(changed["type"], changed["name"])] != changed
