"""A C2SP note signer backed by a key manager's key: how the audit log signs its checkpoints and
records its erasure certificates (the verifier's ``notes`` checks them and knows no key manager)."""

from __future__ import annotations

from medledger_runtime.keys.base import KeyManager, KeyType
from medledger_verifier.errors import FailedPrecondition
from medledger_verifier.notes import NoteSigner, NoteVerifier


async def key_manager_signer(keys: KeyManager, key_name: str, note_key_name: str) -> NoteSigner:
    """A signer for the key manager's key ``key_name`` (``ed25519`` or ``ecdsa-p256``) signing as
    ``note_key_name`` (usually the log's origin). The key's current version is fixed here: if the
    key is rotated later, signing fails (FailedPrecondition) instead of signing under a key that
    the published verifier key does not name."""
    current = (await keys.public_key(key_name)).current
    verifier = NoteVerifier.from_public_key(note_key_name, current.load())

    async def sign(message: bytes) -> bytes:
        signature = await keys.sign(key_name, message)
        if signature.version != current.version:
            raise FailedPrecondition(f"key {key_name} was rotated: reload the note signer and publish its key")
        return signature.der() if signature.type is KeyType.ECDSA_P256 else signature.raw

    return NoteSigner(verifier, sign)
