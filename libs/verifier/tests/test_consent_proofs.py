"""A consent version's document and salt, read as the patient holds them, and the registry's rule
for "in force at a time", without a chain: the commitment formula, what is refused, how a
revocation is tied to the version it ended, and the verdict for several versions."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import rfc8785

from medledger_verifier.consent_documents import ConsentDocument, parse_salt, parse_time
from medledger_verifier.consent_proofs import ACTIVE, REVOKED, UNKNOWN, ConsentProof, RegistryEntry, findings
from medledger_verifier.errors import InvalidArgument

SALT = bytes(range(32))
START = 1_800_000_000  # 2027-01-15T08:00:00Z


def consent(version: int, status: str = "active", *, recorded: str = "2027-01-15T08:00:00.250Z") -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "id": f"cns-1-v{version}",
        "meta": {"versionId": str(version)},
        "identifier": [{"system": "https://medledger.dev/consent", "value": "cns_1"}],
        "status": status,
        "dateTime": recorded,
        "provision": {
            "type": "permit",
            "period": {"start": "2027-01-15T08:00:00.900Z", "end": "2027-01-16T08:00:00.900Z"},
        },
    }


def document(value: dict[str, Any], salt: bytes = SALT) -> ConsentDocument:
    return ConsentDocument.parse(json.dumps(value, indent=2).encode(), salt, source="c.json")


def entry(
    status: int = ACTIVE, *, recorded_at: int = START + 5, revoked_at: int = 0, revoked_by: str = ""
) -> RegistryEntry:
    return RegistryEntry(status, START, START + 86_400, recorded_at, revoked_at, bytes.fromhex(revoked_by or "00" * 32))


def test_the_commitment_is_the_readmes_formula_whatever_the_json_layout() -> None:
    value = consent(1)
    expected = hashlib.sha256(b"medledger:consent:v1\n" + SALT + rfc8785.dumps(value)).hexdigest()
    parsed = document(value)
    assert parsed.commitment == expected
    assert (
        ConsentDocument.parse(json.dumps(value, sort_keys=True, separators=(",", ":")).encode(), SALT).commitment
        == expected
    )
    assert document(value, bytes(32)).commitment != expected
    assert (parsed.consent_id, parsed.version, parsed.status, parsed.is_revocation) == ("cns_1", 1, "active", False)
    assert parsed.recorded is not None and parsed.recorded.timestamp() == START + 0.25
    assert parsed.period_start is not None and parsed.period_start.timestamp() == START + 0.9


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"{", "not JSON"),
        (b"[]", "not a FHIR Consent"),
        (b'{"resourceType": "Patient", "status": "active"}', "not a FHIR Consent"),
        (b'{"resourceType": "Consent"}', "has no status"),
        (b'{"resourceType": "Consent", "status": "active", "status": "inactive"}', "duplicate JSON key"),
        (b'{"resourceType": "Consent", "status": "active", "n": 9007199254740993}', "beyond"),
    ],
)
def test_what_is_not_a_consent_document_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        ConsentDocument.parse(data, SALT)
    assert why in refused.value.message and refused.value.message.startswith("consent: ")


def test_salts_and_times_as_given() -> None:
    assert parse_salt("0x" + SALT.hex().upper() + "\n") == SALT
    for bad in ("", "ab", "zz" * 32, "00" * 33):
        with pytest.raises(InvalidArgument):
            parse_salt(bad)
    moment = parse_time("2027-01-15T09:00:00+01:00")
    assert moment is not None and moment.timestamp() == START
    # A date alone, or a time without its zone, is too vague to compare with a block time.
    assert parse_time("2027-01-15") is None and parse_time("2027-01-15T08:00:00") is None


@pytest.mark.parametrize(
    ("when", "in_force"),
    [
        (START + 4, False),  # in the window, but the chain recorded it only at START + 5
        (START + 5, True),
        (START + 99, True),  # the second before its revocation
        (START + 100, False),  # revoked at START + 100
        (START + 86_400, False),
    ],
)
def test_the_rule_answers_for_the_past(when: int, in_force: bool) -> None:
    assert entry(REVOKED, revoked_at=START + 100, revoked_by="ab" * 32).in_force(when) is in_force


def test_windows_and_unknown_entries() -> None:
    active = entry()
    assert active.in_force(START + 86_399) and not active.in_force(START + 86_400)
    assert not entry(UNKNOWN, recorded_at=0).in_force(START + 10)
    open_ended = RegistryEntry(ACTIVE, START, 0, START, 0, bytes(32))
    assert open_ended.in_force(2**64 - 1)


def test_several_versions_one_in_force_and_the_revocation_tied_to_what_it_ended() -> None:
    v1, v2 = document(consent(1)), document(consent(2, "inactive", recorded="2027-01-15T08:01:00.000Z"))
    entries = [entry(REVOKED, revoked_at=START + 62, revoked_by=v2.commitment), entry(UNKNOWN, recorded_at=0)]
    during = findings([v1, v2], entries, START + 30)
    assert during[0].revoked_by == v2 and during[1].revokes == during[0]
    assert during[0].window_matches is True and during[1].window_matches is None
    assert during[0].anchoring_lag == pytest.approx(4.75) and during[0].revocation_lag == pytest.approx(2.0)
    proof = ConsentProof(START + 30, 1, "0x" + "11" * 20, 9, START + 200, 1, during)
    assert proof.verified and proof.verdict().startswith("IN FORCE: version 1 of consent cns_1")
    assert "it ended version 1" in during[1].reasons(START + 30)[0]

    # Inside the revocation's anchoring lag the chain still says in force, and says that too.
    lagging = findings([v1, v2], entries, START + 61)
    assert lagging[0].in_force and "falls in that lag" in lagging[0].caveats(START + 61)[0]

    after = findings([v1, v2], entries, START + 62)
    assert not ConsentProof(START + 62, 1, "0x", 9, START + 200, 1, after).verified
    assert after[0].reasons(START + 62) == ["it was revoked on chain at 2027-01-15 08:01:02 UTC"]


def test_a_window_other_than_the_documents_is_not_proved() -> None:
    v1 = document(consent(1))
    shifted = RegistryEntry(ACTIVE, START + 1, START + 86_400, START + 5, 0, bytes(32))
    (finding,) = findings([v1], [shifted], START + 10)
    assert finding.in_force and finding.window_matches is False
    proof = ConsentProof(START + 10, 1, "0x", 9, START + 200, 1, (finding,))
    assert not proof.verified and proof.verdict().startswith("NOT PROVED")
