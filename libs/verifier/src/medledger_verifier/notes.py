"""C2SP signed notes, checkpoints and tlog-proofs, without I/O (apart from the signing callable).

- ``signed-note``: a text ending in a newline, a blank line, then lines
  ``— <key name> base64(key id[4] || signature)``. Two signature types:

  - 0x01 Ed25519 over the note text; key id = SHA-256(name || 0x0A || 0x01 || 32-byte key)[:4];
  - 0x02 ECDSA P-256 "as implemented by transparency-dev/witness": an ASN.1 DER signature over
    SHA-256(note text), key id = SHA-256(DER SubjectPublicKeyInfo)[:4] (no name, no type byte),
    verifier key ``<name>+<hex id>+base64(0x02 || DER SPKI)``.

- ``tlog-checkpoint``: the note text ``<origin>\\n<tree size>\\n<base64 root>\\n`` plus optional
  non-empty extension lines.
- ``tlog-proof``: ``c2sp.org/tlog-proof@v1``, optional ``extra <base64>``, ``index <N>``, the
  inclusion hashes (leaf's sibling first), a blank line, the signed checkpoint verbatim.

Signing keys never come here: a :class:`NoteSigner` holds the public key and an async callable
that returns a signature (the key manager signs). Parsing is strict: anything the specs do not
allow is refused with InvalidArgument, so a stored or received note is either exactly well formed
or rejected.

One module on purpose, though over 400 lines: the checkpoint and the tlog-proof are defined by the
signed-note grammar they embed, and keeping the three specs' strict parsers side by side is how
they stay consistent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from medledger_verifier import tlog
from medledger_verifier.errors import FailedPrecondition, InvalidArgument

SIGNATURE_ED25519 = 0x01
SIGNATURE_ECDSA = 0x02
KEY_ID_BYTES = 4
MAX_SIGNATURES = 64
"""The spec asks verifiers to accept at least 16 signatures; more is refused as malformed."""
MAX_NOTE_BYTES = 1 << 20
TLOG_PROOF_HEADER = "c2sp.org/tlog-proof@v1"

_DECIMAL = re.compile(r"0|[1-9][0-9]*")
_HEX_KEY_ID = re.compile(r"[0-9a-f]{8}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode_canonical(text: str, field: str) -> bytes:
    """Standard padded base64 that re-encodes to the same text (no stray bits, no whitespace)."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument.field(field, "not base64") from None
    if _b64(data) != text:
        raise InvalidArgument.field(field, "not canonical base64")
    return data


def _check_text(text: str, field: str) -> None:
    """C2SP: valid UTF-8 (a str here) without ASCII control characters other than newline."""
    if any(ch < " " and ch != "\n" for ch in text):
        raise InvalidArgument.field(field, "holds a control character")


def valid_key_name(name: str) -> bool:
    """Key names are non-empty, with no Unicode space and no ``+``."""
    return bool(name) and "+" not in name and not any(ch.isspace() or ch < " " for ch in name)


def ed25519_key_id(name: str, public_key: bytes) -> bytes:
    """SHA-256(name || 0x0A || 0x01 || 32-byte Ed25519 public key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([SIGNATURE_ED25519]) + public_key).digest()[:KEY_ID_BYTES]


def ecdsa_key_id(spki_der: bytes) -> bytes:
    """SHA-256(DER SubjectPublicKeyInfo)[:4], as transparency-dev/witness computes it."""
    return hashlib.sha256(spki_der).digest()[:KEY_ID_BYTES]


# --- verifier keys ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteVerifier:
    """A public key that verifies note signatures: its name, 4-byte id, signature type and key
    (Ed25519: the 32 raw bytes; ECDSA: the DER SubjectPublicKeyInfo)."""

    name: str
    key_id: bytes
    signature_type: int
    public_key: bytes

    @classmethod
    def from_public_key(cls, name: str, key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) -> NoteVerifier:
        if not valid_key_name(name):
            raise InvalidArgument.field("name", "a note key name is non-empty, with no space or '+'")
        if isinstance(key, ed25519.Ed25519PublicKey):
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return cls(name, ed25519_key_id(name, raw), SIGNATURE_ED25519, raw)
        if not isinstance(key.curve, ec.SECP256R1):
            raise InvalidArgument.field("key", "only P-256 ECDSA keys are used for notes")
        der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return cls(name, ecdsa_key_id(der), SIGNATURE_ECDSA, der)

    @classmethod
    def parse(cls, text: str) -> NoteVerifier:
        """A verifier key in C2SP form ``<name>+<8 hex digits>+<base64(type || key)>``; the id
        must be the one the key gives."""
        parts = text.split("+", 2)  # the base64 key may itself hold "+"
        if len(parts) != 3 or not valid_key_name(parts[0]) or not _HEX_KEY_ID.fullmatch(parts[1]):
            raise InvalidArgument.field("verifier_key", "not <name>+<hex key id>+<base64 key>")
        name, key_id_hex, key_b64 = parts
        blob = _b64decode_canonical(key_b64, "verifier_key")
        if len(blob) < 2:
            raise InvalidArgument.field("verifier_key", "key too short")
        key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
        if blob[0] == SIGNATURE_ED25519:
            if len(blob) != 33:
                raise InvalidArgument.field("verifier_key", "an Ed25519 key is 32 bytes")
            key = ed25519.Ed25519PublicKey.from_public_bytes(blob[1:])
        elif blob[0] == SIGNATURE_ECDSA:
            try:
                loaded = serialization.load_der_public_key(blob[1:])
            except ValueError:
                raise InvalidArgument.field("verifier_key", "not a DER SubjectPublicKeyInfo") from None
            if not isinstance(loaded, ec.EllipticCurvePublicKey):
                raise InvalidArgument.field("verifier_key", "not an ECDSA key")
            key = loaded
        else:
            raise InvalidArgument.field("verifier_key", f"unknown signature type {blob[0]}")
        verifier = cls.from_public_key(name, key)
        if verifier.public_key != blob[1:]:  # e.g. a non-canonical DER encoding of the same key
            raise InvalidArgument.field("verifier_key", "key not in its canonical encoding")
        if verifier.key_id.hex() != key_id_hex:
            raise InvalidArgument.field("verifier_key", "key id does not match the key")
        return verifier

    def text(self) -> str:
        """The C2SP verifier key to publish: ``<name>+<hex key id>+<base64(type || key)>``."""
        return f"{self.name}+{self.key_id.hex()}+{_b64(bytes([self.signature_type]) + self.public_key)}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Ed25519 over ``message``; ECDSA: DER signature over SHA-256(``message``)."""
        try:
            if self.signature_type == SIGNATURE_ED25519:
                ed25519.Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
            else:
                key = serialization.load_der_public_key(self.public_key)
                assert isinstance(key, ec.EllipticCurvePublicKey)
                key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True


# --- signers ----------------------------------------------------------------------------------

SignFunction = Callable[[bytes], Awaitable[bytes]]
"""Signs a message: Ed25519 returns the 64-byte signature of the message itself; ECDSA P-256
returns the ASN.1 DER signature of SHA-256(message) (the key manager's ``Signature.der()``)."""


@dataclass(frozen=True)
class NoteSigner:
    """A note signer: the verifier key it signs as, and the callable that signs."""

    verifier: NoteVerifier
    sign: SignFunction


# --- signed notes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteSignature:
    name: str
    key_id: bytes
    signature: bytes

    def line(self) -> str:
        return f"— {self.name} {_b64(self.key_id + self.signature)}\n"


@dataclass(frozen=True)
class SignedNote:
    """A note's text (ending in a newline) and its signatures, in order."""

    text: str
    signatures: tuple[NoteSignature, ...]

    def format(self) -> str:
        return self.text + "\n" + "".join(s.line() for s in self.signatures)


def _check_note_text(text: str) -> None:
    if not text.endswith("\n"):
        raise InvalidArgument.field("note", "the note text ends with a newline")
    _check_text(text, "note")


def parse_note(data: str | bytes) -> SignedNote:
    """Parse a signed note strictly; its signatures are not verified here (see :func:`open_note`)."""
    if len(data) > MAX_NOTE_BYTES:
        raise InvalidArgument.field("note", "too large")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument.field("note", "not UTF-8") from None
    _check_text(data, "note")
    split = data.rfind("\n\n")  # the last blank line separates the text from the signatures
    if split < 0 or not data.endswith("\n"):
        raise InvalidArgument.field("note", "no blank line before signature lines ending in a newline")
    text, block = data[: split + 1], data[split + 2 :]
    lines = block[:-1].split("\n") if block else []
    if not lines:
        raise InvalidArgument.field("note", "no signature")
    if len(lines) > MAX_SIGNATURES:
        raise InvalidArgument.field("note", f"more than {MAX_SIGNATURES} signatures")
    signatures = []
    for line in lines:
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != "—" or not valid_key_name(parts[1]):
            raise InvalidArgument.field("note", "a signature line is '— <key name> <base64>'")
        blob = _b64decode_canonical(parts[2], "note")
        if len(blob) <= KEY_ID_BYTES:
            raise InvalidArgument.field("note", "a signature is a key id and at least one byte")
        signatures.append(NoteSignature(parts[1], blob[:KEY_ID_BYTES], blob[KEY_ID_BYTES:]))
    return SignedNote(text, tuple(signatures))


async def sign_note(text: str, signers: Sequence[NoteSigner]) -> SignedNote:
    """Sign a note text with every signer, in order. Each new signature is verified with the
    signer's public key before it is used, so a key manager answering with another key's or a
    broken signature cannot produce a note that later fails."""
    _check_note_text(text)
    if not signers:
        raise InvalidArgument.field("signers", "at least one signer")
    message = text.encode()
    signatures = []
    for signer in signers:
        signature = await signer.sign(message)
        if not signer.verifier.verify(message, signature):
            raise FailedPrecondition(f"the signature by {signer.verifier.name} does not verify with its public key")
        signatures.append(NoteSignature(signer.verifier.name, signer.verifier.key_id, signature))
    return SignedNote(text, tuple(signatures))


def verify_note(
    note: SignedNote, verifiers: Sequence[NoteVerifier], *, require_all: bool = False
) -> list[NoteVerifier]:
    """The verifiers whose signatures on the note verify. Per C2SP: signatures of unknown keys
    (name and id not both matching) are ignored; one failing signature of a known key rejects the
    note; no verified signature rejects it. ``require_all``: every verifier must have signed."""
    message = note.text.encode()
    by_key = {(v.name, v.key_id): v for v in verifiers}
    verified: dict[tuple[str, bytes], NoteVerifier] = {}
    for signature in note.signatures:
        verifier = by_key.get((signature.name, signature.key_id))
        if verifier is None:
            continue
        if not verifier.verify(message, signature.signature):
            raise InvalidArgument.field("note", f"the signature by {signature.name} does not verify")
        verified[(verifier.name, verifier.key_id)] = verifier
    if not verified:
        raise InvalidArgument.field("note", "no signature by a known key")
    if require_all and len(verified) != len(by_key):
        missing = sorted(v.name for k, v in by_key.items() if k not in verified)
        raise InvalidArgument.field("note", f"not signed by every required key: {', '.join(missing)}")
    return list(verified.values())


def open_note(data: str | bytes, verifiers: Sequence[NoteVerifier], *, require_all: bool = False) -> SignedNote:
    """Parse and verify a signed note (see :func:`verify_note`)."""
    note = parse_note(data)
    verify_note(note, verifiers, require_all=require_all)
    return note


# --- checkpoints ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A C2SP tlog-checkpoint: the log's origin, tree size and root (plus extension lines)."""

    origin: str
    tree_size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin:
            raise InvalidArgument.field("origin", "a non-empty line")
        _check_text(self.origin, "origin")
        if not 0 <= self.tree_size < tlog.MAX_TREE_SIZE:
            raise InvalidArgument.field("tree_size", "out of range")
        if len(self.root) != tlog.HASH_SIZE:
            raise InvalidArgument.field("root", "a SHA-256 hash")
        for line in self.extensions:
            if not line or "\n" in line:
                raise InvalidArgument.field("extensions", "extension lines are non-empty lines")
            _check_text(line, "extensions")

    def body(self) -> str:
        """The note text: ``<origin>\\n<size>\\n<base64 root>\\n`` then the extension lines."""
        lines = [self.origin, str(self.tree_size), _b64(self.root), *self.extensions]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """A checkpoint from its note text, strictly (no leading zeros, canonical base64)."""
        if not text.endswith("\n"):
            raise InvalidArgument.field("checkpoint", "the note text ends with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise InvalidArgument.field("checkpoint", "origin, tree size and root lines")
        origin, size_text, root_text, *extensions = lines
        if not _DECIMAL.fullmatch(size_text):
            raise InvalidArgument.field("checkpoint", "the tree size is a decimal without leading zeros")
        root = _b64decode_canonical(root_text, "checkpoint")
        return cls(origin, int(size_text), root, tuple(extensions))


async def sign_checkpoint(checkpoint: Checkpoint, signers: Sequence[NoteSigner]) -> str:
    """The signed checkpoint note, to keep verbatim and publish at ``<prefix>/checkpoint``."""
    return (await sign_note(checkpoint.body(), signers)).format()


def open_checkpoint(
    data: str | bytes, verifiers: Sequence[NoteVerifier], *, origin: str, require_all: bool = False
) -> tuple[Checkpoint, SignedNote]:
    """Parse and verify a signed checkpoint of the log ``origin``."""
    note = open_note(data, verifiers, require_all=require_all)
    checkpoint = Checkpoint.parse(note.text)
    if checkpoint.origin != origin:
        raise InvalidArgument.field("checkpoint", f"origin {checkpoint.origin!r} is not {origin!r}")
    return checkpoint, note


def check_extends(last: Checkpoint | None, new: Checkpoint, proof: Sequence[bytes]) -> None:
    """The signing rule: a log never signs a checkpoint inconsistent with the last one it signed.

    Passes when there is no last checkpoint, or the new one has the same origin and ``proof``
    proves it extends the last (same size: the same root). FailedPrecondition otherwise.
    """
    if last is None:
        return
    if new.origin != last.origin:
        raise FailedPrecondition(f"checkpoint origin {new.origin!r} is not the log's {last.origin!r}")
    if new.tree_size < last.tree_size:
        raise FailedPrecondition(
            f"tree size {new.tree_size} is below the last signed {last.tree_size}: a rolled-back log needs a new origin"
        )
    if not tlog.verify_consistency(last.tree_size, new.tree_size, last.root, new.root, proof):
        raise FailedPrecondition(
            f"the tree of size {new.tree_size} does not extend the last signed checkpoint (size {last.tree_size})"
        )


# --- tlog-proof -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlogProof:
    """A C2SP tlog-proof: an entry's index, its inclusion proof, and the signed checkpoint it
    is proven against (kept verbatim). ``extra`` is opaque and unauthenticated."""

    index: int
    hashes: tuple[bytes, ...]
    checkpoint: str
    extra: bytes | None = None

    def format(self) -> str:
        lines = [TLOG_PROOF_HEADER]
        if self.extra is not None:
            lines.append(f"extra {_b64(self.extra)}")
        lines.append(f"index {self.index}")
        lines += [_b64(h) for h in self.hashes]
        return "\n".join(lines) + "\n\n" + self.checkpoint

    @classmethod
    def parse(cls, text: str | bytes) -> TlogProof:
        """Strictly: the header, optional ``extra``, ``index``, canonical base64 hashes of 32
        bytes, a blank line, and a signed note (parsed, not verified)."""
        if len(text) > MAX_NOTE_BYTES:
            raise InvalidArgument.field("tlog_proof", "too large")
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument.field("tlog_proof", "not UTF-8") from None
        head, blank, checkpoint = text.partition("\n\n")  # the proof's lines are never empty
        lines = head.split("\n")
        if not blank or lines[0] != TLOG_PROOF_HEADER:
            raise InvalidArgument.field("tlog_proof", f"starts with {TLOG_PROOF_HEADER}, ends with a blank line")
        rest = lines[1:]
        extra = None
        if rest and rest[0].startswith("extra "):
            extra = _b64decode_canonical(rest[0].removeprefix("extra "), "tlog_proof")
            rest = rest[1:]
        if not rest or not rest[0].startswith("index ") or not _DECIMAL.fullmatch(rest[0].removeprefix("index ")):
            raise InvalidArgument.field("tlog_proof", "an 'index <N>' line without leading zeros")
        index = int(rest[0].removeprefix("index "))
        hashes = tuple(_b64decode_canonical(line, "tlog_proof") for line in rest[1:])
        if any(len(h) != tlog.HASH_SIZE for h in hashes) or len(hashes) > 64:
            raise InvalidArgument.field("tlog_proof", "inclusion hashes are SHA-256 hashes")
        parse_note(checkpoint)  # well formed; verified with the log's keys by verify_tlog_proof
        return cls(index, hashes, checkpoint, extra)


def verify_tlog_proof(
    proof: TlogProof, leaf: bytes, verifiers: Sequence[NoteVerifier], *, origin: str, require_all: bool = False
) -> Checkpoint:
    """Check a tlog-proof offline: the checkpoint is signed by the log's keys for ``origin``, and
    ``leaf`` (an RFC 6962 leaf hash) is at ``proof.index`` in its tree. InvalidArgument if not."""
    checkpoint, _ = open_checkpoint(proof.checkpoint, verifiers, origin=origin, require_all=require_all)
    if not tlog.verify_inclusion(proof.index, checkpoint.tree_size, leaf, proof.hashes, checkpoint.root):
        raise InvalidArgument.field("tlog_proof", "the inclusion proof does not verify against the checkpoint")
    return checkpoint
