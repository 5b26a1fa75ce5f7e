"""The evidence files of ``medledger demo --out``: what a patient or an auditor takes away and checks
with ``medledger verify``, trusting no service."""

from __future__ import annotations

from typing import TYPE_CHECKING

from medledger_runtime.files import write_atomically
from medledger_verifier import notes

if TYPE_CHECKING:
    from medledger_devstack.demo.story import Story

# The files `--out` writes, as named by the platform issue and read by `medledger verify`.
OUT_FILES = (
    "record.json",
    "record.salt",
    "record.tlog-proof",
    "record.entry",
    "record-anchor.json",
    "access.tlog-proof",
    "access.entry",
    "access-anchor.json",
    "log.vkey",
    "trust.json",
    "erasure-certificate.note",
    "consent.json",
    "consent.salt",
    "consent-revocation.json",
    "consent-revocation.salt",
    "decision.json",
)


async def write_files(story: Story) -> None:
    out = story.config.out_dir
    if out is None:
        return
    record, access = story.result.record_proof, story.result.access_proof
    assert record is not None and access is not None
    out.mkdir(parents=True, exist_ok=True)
    policy = story.config.trust_policy
    ed25519 = [
        k for k in policy.log_verifier_keys if notes.NoteVerifier.parse(k).signature_type == notes.SIGNATURE_ED25519
    ]
    files = {
        "record.json": story.result.record,
        "record.salt": (story.result.salt + "\n").encode(),
        "record.tlog-proof": record.tlog_proof.encode(),
        "record.entry": record.entry,
        "record-anchor.json": record.anchor_json,
        "access.tlog-proof": access.tlog_proof.encode(),
        "access.entry": story.access_bytes,
        "access-anchor.json": access.anchor_json,
        "log.vkey": "".join(k + "\n" for k in ed25519).encode(),
        "trust.json": policy.to_json().encode(),
    }
    for stem, document, salt in story.result.consent_documents:
        files[f"{stem}.json"] = document
        files[f"{stem}.salt"] = (salt + "\n").encode()
    if story.result.decision_evidence:
        files["decision.json"] = story.result.decision_evidence
    if story.result.erasure_certificate:
        files["erasure-certificate.note"] = story.result.erasure_certificate.encode()
    for name, data in files.items():
        write_atomically(out / name, data)
        story.result.written.append(out / name)
