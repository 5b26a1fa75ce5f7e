"""The verifier reads the anchor and consent registries through ABIs of its own (no compiled contracts beside
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


def test_the_verifiers_consent_registry_abi_is_the_compiled_contracts() -> None:
    compiled = {(e["type"], e.get("name")): e for e in chain.abi(chain.CONSENT_REGISTRY)}
    assert chain.CONSENT_REGISTRY_READS
    for entry in chain.CONSENT_REGISTRY_READS:
        assert compiled.get((entry["type"], entry["name"])) == entry, entry["name"]


def test_a_changed_consent_registry_entry_would_be_caught() -> None:
    compiled = {(e["type"], e.get("name")): e for e in chain.abi(chain.CONSENT_REGISTRY)}
    status_of = chain.CONSENT_REGISTRY_READS[0]
    (output,) = status_of["outputs"]
    # The entry's fields in another order would decode the times into the wrong names.
    swapped = [output["components"][0], output["components"][2], output["components"][1], *output["components"][3:]]
    changed = {**status_of, "outputs": [{**output, "components": swapped}]}
    assert compiled[(changed["type"], changed["name"])] != changed
