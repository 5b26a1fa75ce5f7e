"""A key manager's keys sign C2SP notes that plain libraries and the verifier check, and a
rotated key refuses to sign under the key id it was published with."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from medledger_runtime.keys import KeyType, LocalKeyring, create_master_key_file
from medledger_runtime.keys.note_signer import key_manager_signer
from medledger_verifier import notes
from medledger_verifier.errors import FailedPrecondition

ORIGIN = "medledger.example/audit"


def split_note(text: str) -> tuple[str, list[tuple[str, bytes]]]:
    """A signed note split by hand per C2SP: text up to the last blank line, then signature lines."""
    body, _, sigs = text.rpartition("\n\n")
    out = []
    for line in sigs.rstrip("\n").split("\n"):
        dash, name, b64 = line.split(" ")
        assert dash == "\u2014"
        out.append((name, base64.b64decode(b64)))
    return body + "\n", out


def test_key_manager_signers(tmp_path: Path) -> None:
    async def go() -> None:
        master = create_master_key_file(tmp_path / "master.key")
        km = await LocalKeyring.open(tmp_path / "data" / "keys.keyring", master)
        try:
            await km.ensure_key("audit-checkpoint", KeyType.ED25519)
            await km.ensure_key("audit-checkpoint-p256", KeyType.ECDSA_P256)
            signers = [
                await key_manager_signer(km, "audit-checkpoint", ORIGIN),
                await key_manager_signer(km, "audit-checkpoint-p256", ORIGIN),
            ]
            assert [s.verifier.signature_type for s in signers] == [notes.SIGNATURE_ED25519, notes.SIGNATURE_ECDSA]
            checkpoint = notes.Checkpoint(ORIGIN, 3, hashlib.sha256(b"x").digest())
            note = await notes.sign_checkpoint(checkpoint, signers)
            text, sigs = split_note(note)
            ed_pub = (await km.public_key("audit-checkpoint")).current.load()
            ec_pub = (await km.public_key("audit-checkpoint-p256")).current.load()
            assert isinstance(ed_pub, ed25519.Ed25519PublicKey) and isinstance(ec_pub, ec.EllipticCurvePublicKey)
            ed_pub.verify(sigs[0][1][4:], text.encode())
            ec_pub.verify(sigs[1][1][4:], text.encode(), ec.ECDSA(hashes.SHA256()))
            # published verifier keys open it
            published = [notes.NoteVerifier.parse(s.verifier.text()) for s in signers]
            assert notes.open_checkpoint(note, published, origin=ORIGIN, require_all=True)[0] == checkpoint
            await km.rotate("audit-checkpoint")  # a rotated key must not sign under the old key id
            with pytest.raises(FailedPrecondition):
                await notes.sign_checkpoint(checkpoint, signers)
        finally:
            await km.aclose()

    asyncio.run(go())
