"""`medledger verify certificate FILE`: an erasure certificate signed by records' certificate key
(in a real local keyring) verifies against the trust policy and is told in words; an altered or
forged one, or one checked against a policy without the key, is refused with a non-zero exit."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from medledger.events.v1 import records_events_pb2 as ev

from medledger_runtime.erasure import CERTIFICATE_KEY, CERTIFICATE_SIGNER_NAME, certificate_text
from medledger_runtime.keys import KeyType, LocalKeyring, create_master_key_file
from medledger_runtime.keys.note_signer import key_manager_signer
from medledger_runtime.timestamps import timestamp
from medledger_sdk.cli import main as medledger
from medledger_verifier import notes
from medledger_verifier.erasure_certificates import parse_certificate
from medledger_verifier.proof_files import TrustPolicy

Outcome = ev.ErasureOutcome
T0 = 1_780_000_000.0


def certificate() -> ev.ErasureCertificate:
    return ev.ErasureCertificate(
        erasure_id="era_1",
        patient_id="pat_1",
        requested_by="pat_1",
        requested_at=timestamp(T0),
        authorized_by="privacy-officer prn_po",
        erased_at=timestamp(T0 + 60),
        key_name="patient-pat_1",
        key_versions=[1, 2],
        records_erased=2,
        versions_erased=3,
        unrecoverable_after=timestamp(T0 + 60 + 30 * 86400),
        participants=[
            ev.ErasureParticipant(
                participant="identity",
                outcome=Outcome.ERASURE_OUTCOME_DESTROYED,
                keys=[ev.DestroyedKey(key_name="patient-pat_1", versions=[1])],
            ),
            ev.ErasureParticipant(participant="consent", outcome=Outcome.ERASURE_OUTCOME_ABSENT),
            ev.ErasureParticipant(
                participant="records",
                outcome=Outcome.ERASURE_OUTCOME_DESTROYED,
                keys=[ev.DestroyedKey(key_name="patient-pat_1", versions=[1, 2])],
            ),
            ev.ErasureParticipant(
                participant="audit",
                outcome=Outcome.ERASURE_OUTCOME_DESTROYED_AT_APPEND,
                keys=[ev.DestroyedKey(key_name="audit-subject-pat_1")],
            ),
        ],
    )


async def signed(tmp_path: Path, key_name: str = CERTIFICATE_KEY) -> tuple[str, str]:
    """A signed certificate and the verifier key of the keyring's key that signed it."""
    master = tmp_path / f"master-{key_name}.key"
    if not master.exists():
        create_master_key_file(master)
    async with await LocalKeyring.open(tmp_path / "data" / f"{key_name}.keyring", master) as keys:
        await keys.ensure_key(key_name, KeyType.ED25519)
        signer = await key_manager_signer(keys, key_name, CERTIFICATE_SIGNER_NAME)
        note = await notes.sign_note(certificate_text(certificate()), [signer])
    return note.format(), signer.verifier.text()


def policy_file(tmp_path: Path, certificate_keys: tuple[str, ...]) -> Path:
    path = tmp_path / f"trust-policy-{len(certificate_keys)}.json"
    log_key = "medledger.local/audit+00000000+" + "A" * 44  # not used by certificates
    policy = TrustPolicy("medledger.local/audit", (log_key,), 31337, "0x" + "11" * 20, 1, 1, certificate_keys)
    path.write_text(policy.to_json())
    return path


def verify_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = medledger(["verify", *argv])
    return code, out.getvalue()


async def test_a_signed_certificate_verifies_and_is_told_in_words(tmp_path: Path) -> None:
    note, verifier = await signed(tmp_path)
    (tmp_path / "erasure.note").write_text(note)
    code, said = verify_cli(
        "certificate", str(tmp_path / "erasure.note"), "--trust", str(policy_file(tmp_path, (verifier,)))
    )
    assert code == 0, said
    assert "VERIFIED" in said and "NOT VERIFIED" not in said
    assert "Erasure era_1 of patient pat_1" in said
    assert "authorized by privacy-officer prn_po" in said
    assert "2 record(s), 3 version(s)" in said
    assert "records: destroyed key patient-pat_1 (version(s) 1,2)" in said
    assert "identity: destroyed key patient-pat_1 (version(s) 1)" in said
    assert "consent: absent" in said
    assert "audit: destroys key audit-subject-pat_1 (every version) when it appends this certificate" in said
    assert "after 2026-06-27T" in said  # erased_at + 30 days


async def test_an_altered_or_forged_certificate_is_refused(tmp_path: Path) -> None:
    note, verifier = await signed(tmp_path)
    trust = str(policy_file(tmp_path, (verifier,)))

    # One version fewer named as destroyed: the signature no longer covers the text.
    altered = note.replace("key records patient-pat_1 1,2", "key records patient-pat_1 1")
    assert altered != note
    (tmp_path / "altered.note").write_text(altered)
    code, said = verify_cli("certificate", str(tmp_path / "altered.note"), "--trust", trust)
    assert code == 1 and "NOT VERIFIED" in said and "does not verify" in said
    assert "Erasure era_1" not in said  # nothing of an unverified certificate is told as fact

    # Signed by another key under the same name: no signature by a trusted key.
    forged, _ = await signed(tmp_path, "someone-else")
    (tmp_path / "forged.note").write_text(forged)
    code, said = verify_cli("certificate", str(tmp_path / "forged.note"), "--trust", trust)
    assert code == 1 and "NOT VERIFIED" in said and "no signature by a known key" in said

    # Not a note at all.
    (tmp_path / "garbage.note").write_text("hello\n")
    code, said = verify_cli("certificate", str(tmp_path / "garbage.note"), "--trust", trust)
    assert code == 1 and "NOT VERIFIED" in said


async def test_an_old_trust_policy_loads_but_verifies_no_certificate(tmp_path: Path) -> None:
    note, _ = await signed(tmp_path)
    (tmp_path / "erasure.note").write_text(note)
    old = tmp_path / "old-policy.json"
    # A policy as `up` wrote it before certificates were signed: no erasure_certificate_keys.
    old.write_text(
        '{"version": 1, "origin": "medledger.local/audit", "log_verifier_keys": ["k"], "chain_id": 31337, '
        '"anchor_registry": "0x' + "11" * 20 + '", "min_confirmations": 1}'
    )
    assert TrustPolicy.read(old).erasure_certificate_keys == ()
    code, said = verify_cli("certificate", str(tmp_path / "erasure.note"), "--trust", str(old))
    assert code == 2 and "names no erasure-certificate key" in said
    code, said = verify_cli("certificate", "--trust", str(old))
    assert code == 2


def test_the_certificate_text_round_trips() -> None:
    parsed = parse_certificate(certificate_text(certificate()))
    assert parsed.facts["erasure"] == "era_1" and parsed.facts["versions-erased"] == "3"
    assert [(p.name, p.outcome) for p in parsed.participants] == [
        ("audit", "destroyed-at-append"),
        ("consent", "absent"),
        ("identity", "destroyed"),
        ("records", "destroyed"),
    ]
    assert [(k.name, k.versions) for k in parsed.participants[3].keys] == [("patient-pat_1", "1,2")]
