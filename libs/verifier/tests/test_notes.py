"""C2SP signed notes, checkpoints and tlog-proofs (medledger_verifier.notes).

Signatures made by the production code are checked here with plain ``cryptography`` calls on
a note split by hand, and key ids are recomputed here from the spec's formulas. External vectors:
golang.org/x/mod/sumdb/note's PeterNeumann example (Ed25519) and transparency-dev/witness's
ECDSA note tests (Rekor's and the Pixel 6 log's real checkpoints).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature, encode_dss_signature

from medledger_verifier import notes, tlog
from medledger_verifier.errors import FailedPrecondition, InvalidArgument

ORIGIN = "medledger.example/audit"

# golang.org/x/mod/sumdb/note (package documentation and note_test.go)
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_SKEY_SEED = "AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"  # from PRIVATE+KEY+PeterNeumann+c74f20a3+...
GO_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
GO_NOTE = (
    GO_TEXT
    + "\n— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)

# transparency-dev/witness internal/note/note_verifier_test.go (signature type 0x02)
REKOR_VKEY = (
    "rekor.sigstore.dev+c0d23d6a+AjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABNhtmPtrWm3U1eQXBogSMdGvXwBcK5AW5i0hrZLOC96l"
    "+smGNM7nwZ4QvFK/4sueRoVj//QP22Ni4Qt9DPfkWLc="
)
REKOR_NOTE = (
    "Rekor\n798034\nf+7CoKgXKE/tNys9TTXcr/ad6U/K3xvznmzew9y6SP0=\n\n— rekor.sigstore.dev "
    "wNI9ajBEAiARInWIWyCdyG27CO6LPnPekyw20qO0YJfoaPaowGp/XgIgc+qEHS3+GKVClgqq20uDLet7MCoTURUCRdxwWBHHufk=\n"
)
PIXEL_VKEY = (
    "pixel6_transparency_log+91c16e30+AjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABN+4x0Jk1yTwvLFI9A4NDdGZcX0aiWVdWM5XJVy0"
    "M4VWD3AvyW5Q6Hs9A0mcDkpUoYgn+KKPNzFC0H3nN3q6JQ8="
)
PIXEL_NOTE = (
    "DEFAULT\n10\nbsWRucJU5xJPHb5eBdOm6+DM+VelCZBuvtI3sHERJ9Y=\n\n— pixel6_transparency_log "
    "kcFuMDBFAiEAhqMAP8P6qf6QxtUJhzMhbN+MbZ9dwfUHzGQJmffJHtoCIGD0cNe47dHWBoPwYdgBCepB06/+g5O1FmYjXl06owL4\n"
)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


class LocalKeys:
    """The test plays the key manager: private keys here, signers see only callables."""

    def __init__(self) -> None:
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.p256 = ec.generate_private_key(ec.SECP256R1())

    def signers(self, name: str = ORIGIN) -> list[notes.NoteSigner]:
        async def sign_ed(message: bytes) -> bytes:
            return self.ed.sign(message)

        async def sign_p256(message: bytes) -> bytes:
            return self.p256.sign(message, ec.ECDSA(hashes.SHA256()))  # DER

        return [
            notes.NoteSigner(notes.NoteVerifier.from_public_key(name, self.ed.public_key()), sign_ed),
            notes.NoteSigner(notes.NoteVerifier.from_public_key(name, self.p256.public_key()), sign_p256),
        ]


@pytest.fixture
def keys() -> LocalKeys:
    return LocalKeys()


def split_note(text: str) -> tuple[str, list[tuple[str, bytes]]]:
    """A signed note split by hand per C2SP: text up to the last blank line, then signature lines."""
    body, _, sigs = text.rpartition("\n\n")
    lines = sigs.rstrip("\n").split("\n")
    out = []
    for line in lines:
        dash, name, b64 = line.split(" ")
        assert dash == "\u2014"
        out.append((name, base64.b64decode(b64)))
    return body + "\n", out


# --- key ids ----------------------------------------------------------------------------------


def test_key_ids_are_the_specs(keys: LocalKeys) -> None:
    ed_pub = keys.ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    spki = keys.p256.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ed_verifier, p256_verifier = (s.verifier for s in keys.signers())
    assert ed_verifier.key_id == hashlib.sha256(ORIGIN.encode() + b"\n\x01" + ed_pub).digest()[:4]
    assert p256_verifier.key_id == hashlib.sha256(spki).digest()[:4]
    assert ed_verifier.text() == f"{ORIGIN}+{ed_verifier.key_id.hex()}+" + base64.b64encode(b"\x01" + ed_pub).decode()
    assert p256_verifier.text() == f"{ORIGIN}+{p256_verifier.key_id.hex()}+" + base64.b64encode(b"\x02" + spki).decode()
    for verifier in (ed_verifier, p256_verifier):
        assert notes.NoteVerifier.parse(verifier.text()) == verifier
    # the published vectors' ids recompute
    assert notes.NoteVerifier.parse(GO_VKEY).key_id.hex() == "c74f20a3"
    assert notes.NoteVerifier.parse(REKOR_VKEY).key_id.hex() == "c0d23d6a"
    assert notes.NoteVerifier.parse(PIXEL_VKEY).key_id.hex() == "91c16e30"


def test_malformed_verifier_keys_are_refused() -> None:
    name, key_id, key = GO_VKEY.split("+")
    for bad in (
        f"{name}+{key_id}",
        f"{name}+00000000+{key}",  # id does not match
        f"{name}+{key_id.upper()}+{key}",
        f"{name} x+{key_id}+{key}",
        f"+{key_id}+{key}",
        f"{name}+{key_id}+{key}=",
        f"{name}+{key_id}+" + base64.b64encode(b"\x03" + bytes(32)).decode(),  # unknown type
        f"{name}+{key_id}+" + base64.b64encode(b"\x01" + bytes(31)).decode(),
        "rekor.sigstore.dev+c0d23d6a+AwEB",
        GO_VKEY.replace("rekor", "x") + "+extra",
        REKOR_VKEY.replace("rekor.sigstore.dev", "bananas.sigstore.dev").replace("c0d23d6a", "00000000"),
    ):
        with pytest.raises(InvalidArgument):
            notes.NoteVerifier.parse(bad)


# --- external vectors -------------------------------------------------------------------------


def test_the_go_note_example_is_reproduced_and_verified() -> None:
    verifier = notes.NoteVerifier.parse(GO_VKEY)
    assert notes.open_note(GO_NOTE, [verifier]).text == GO_TEXT
    seed = base64.b64decode(GO_SKEY_SEED)[1:]  # type byte 0x01, then the Ed25519 seed
    private = ed25519.Ed25519PrivateKey.from_private_bytes(seed)

    async def sign(message: bytes) -> bytes:
        return private.sign(message)

    signer = notes.NoteSigner(notes.NoteVerifier.from_public_key("PeterNeumann", private.public_key()), sign)
    assert signer.verifier == verifier
    assert run(notes.sign_note(GO_TEXT, [signer])).format() == GO_NOTE  # Ed25519 is deterministic


def test_ecdsa_notes_of_real_logs_verify() -> None:
    rekor, pixel = notes.NoteVerifier.parse(REKOR_VKEY), notes.NoteVerifier.parse(PIXEL_VKEY)
    checkpoint, _ = notes.open_checkpoint(REKOR_NOTE, [rekor], origin="Rekor")
    assert checkpoint.tree_size == 798034 and checkpoint.root == base64.b64decode(
        "f+7CoKgXKE/tNys9TTXcr/ad6U/K3xvznmzew9y6SP0="
    )
    assert notes.open_checkpoint(PIXEL_NOTE, [pixel], origin="DEFAULT")[0].tree_size == 10
    with pytest.raises(InvalidArgument):  # the other log's key: no known signature
        notes.open_note(REKOR_NOTE, [pixel])
    with pytest.raises(InvalidArgument):
        notes.open_note(REKOR_NOTE.replace("798034", "798035"), [rekor])


# --- our checkpoints --------------------------------------------------------------------------


def test_signed_checkpoint_verifies_with_plain_libraries(keys: LocalKeys) -> None:
    root = hashlib.sha256(b"some root").digest()
    checkpoint = notes.Checkpoint(ORIGIN, 1234, root)
    note = run(notes.sign_checkpoint(checkpoint, keys.signers()))
    assert note.startswith(f"{ORIGIN}\n1234\n{base64.b64encode(root).decode()}\n\n\u2014 {ORIGIN} ")
    text, sigs = split_note(note)
    assert text == f"{ORIGIN}\n1234\n{base64.b64encode(root).decode()}\n"
    assert [name for name, _ in sigs] == [ORIGIN, ORIGIN]
    (_, ed_blob), (_, ec_blob) = sigs
    ed_pub = keys.ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    spki = keys.p256.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert ed_blob[:4] == hashlib.sha256(ORIGIN.encode() + b"\n\x01" + ed_pub).digest()[:4]
    assert ec_blob[:4] == hashlib.sha256(spki).digest()[:4]
    keys.ed.public_key().verify(ed_blob[4:], text.encode())  # raises if invalid
    keys.p256.public_key().verify(ec_blob[4:], text.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(ec_blob[4:])  # what an on-chain P256VERIFY needs, with SHA-256(text)
    digest = hashlib.sha256(text.encode()).digest()
    keys.p256.public_key().verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    # and the production side agrees
    verifiers = [signer.verifier for signer in keys.signers()]
    opened, _ = notes.open_checkpoint(note, verifiers, origin=ORIGIN, require_all=True)
    assert opened == checkpoint
    assert notes.Checkpoint.parse(checkpoint.body()) == checkpoint


def test_checkpoint_with_extension_lines() -> None:
    checkpoint = notes.Checkpoint(ORIGIN, 0, tlog.EMPTY_ROOT, ("anchored 0x1234",))
    assert checkpoint.body().endswith("\nanchored 0x1234\n")
    assert notes.Checkpoint.parse(checkpoint.body()) == checkpoint


def test_altered_and_forged_notes_are_refused(keys: LocalKeys) -> None:
    signers = keys.signers()
    verifiers = [s.verifier for s in signers]
    root = hashlib.sha256(b"r").digest()
    note = run(notes.sign_checkpoint(notes.Checkpoint(ORIGIN, 10, root), signers))
    text, sigs = split_note(note)

    def with_line(name: str, blob: bytes) -> str:
        return f"\u2014 {name} {base64.b64encode(blob).decode()}\n"

    other = LocalKeys()
    forged_note = run(notes.sign_checkpoint(notes.Checkpoint(ORIGIN, 10, root), other.signers()))
    flipped = bytearray(sigs[0][1])
    flipped[10] ^= 1
    altered = [
        note.replace("\n10\n", "\n11\n"),  # size
        note.replace(base64.b64encode(root).decode(), base64.b64encode(tlog.EMPTY_ROOT).decode()),  # root
        text + "\n" + with_line(ORIGIN, bytes(flipped)) + with_line(ORIGIN, sigs[1][1]),  # one bad signature
        forged_note,  # signed by someone else under our name: unknown keys, nothing verifies
        text + "\n" + with_line("someone.else", sigs[0][1]),  # our signature under another name
        note.replace(f"{ORIGIN}\n10", f"{ORIGIN}x\n10"),
    ]
    for bad in altered:
        with pytest.raises(InvalidArgument):
            notes.open_checkpoint(bad, verifiers, origin=ORIGIN)
    # an unknown signer's extra line is ignored; another origin is refused
    extra = note + with_line("witness.example", b"\x00\x01\x02\x03" + bytes(64))
    assert notes.open_checkpoint(extra, verifiers, origin=ORIGIN)[0].tree_size == 10
    with pytest.raises(InvalidArgument):
        notes.open_checkpoint(note, verifiers, origin="another.example/log")
    # require_all: a note with only the Ed25519 signature passes unless both keys are required
    only_ed = text + "\n" + with_line(ORIGIN, sigs[0][1])
    assert notes.open_checkpoint(only_ed, verifiers, origin=ORIGIN)[0].tree_size == 10
    with pytest.raises(InvalidArgument):
        notes.open_checkpoint(only_ed, verifiers, origin=ORIGIN, require_all=True)


def test_malformed_notes_are_refused() -> None:
    good = GO_NOTE
    sig = good.rsplit(" ", 1)[1]
    for bad in (
        good[:-1],  # no final newline
        GO_TEXT,  # no signatures
        GO_TEXT + "\n",
        good.replace("\n\n", "\n"),
        good.replace("\u2014 ", "- "),
        good.replace("\u2014 PeterNeumann ", "\u2014 PeterNeumann  "),
        good.replace("PeterNeumann ", "Peter+Neumann "),
        good.replace(sig, sig.replace("=", "")),  # bad base64
        good.replace(sig, "AAAA\n"),  # too short
        good.replace("problem,", "problem,\x01"),
        good + "\n",
        good + "trailing",
        b"\xff" + good.encode(),
    ):
        with pytest.raises(InvalidArgument):
            notes.parse_note(bad)
    for bad_text in (
        "origin\n10\n",
        "origin\n010\n" + base64.b64encode(bytes(32)).decode() + "\n",
        "origin\n-1\n" + base64.b64encode(bytes(32)).decode() + "\n",
        "origin\n10\n" + base64.b64encode(bytes(31)).decode() + "\n",
        "origin\n10\n" + base64.b64encode(bytes(32)).decode() + "\n\n",  # empty extension line
        "origin\n10\n" + base64.b64encode(bytes(32)).decode(),
        "\n10\n" + base64.b64encode(bytes(32)).decode() + "\n",
        "origin\n10\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB=\n",  # non-canonical base64
    ):
        with pytest.raises(InvalidArgument):
            notes.Checkpoint.parse(bad_text)
    with pytest.raises(InvalidArgument):
        run(notes.sign_note("no newline", []))


def test_a_signer_returning_a_bad_signature_is_caught(keys: LocalKeys) -> None:
    ed, _ = keys.signers()

    async def wrong(message: bytes) -> bytes:
        return LocalKeys().ed.sign(message)

    with pytest.raises(FailedPrecondition):
        run(notes.sign_note("text\n", [notes.NoteSigner(ed.verifier, wrong)]))


# --- the signing rule -------------------------------------------------------------------------


def test_never_sign_a_checkpoint_that_does_not_extend_the_last() -> None:
    leaves = [tlog.leaf_hash(f"e{i}".encode()) for i in range(20)]

    async def go() -> None:
        store, size = tlog.MemoryTiles(), 0
        for batch in (5, 15):
            result = await tlog.append(store, size, leaves[size : size + batch])
            store.write(result.tiles)
            size = result.tree_size
        last = notes.Checkpoint(ORIGIN, 5, await tlog.tree_root(store, 5))
        new = notes.Checkpoint(ORIGIN, 20, await tlog.tree_root(store, 20))
        proof = await tlog.consistency_proof(store, 5, 20)
        notes.check_extends(None, last, [])
        notes.check_extends(last, new, proof)
        notes.check_extends(last, last, [])
        notes.check_extends(notes.Checkpoint(ORIGIN, 0, tlog.EMPTY_ROOT), new, [])
        fork = notes.Checkpoint(ORIGIN, 20, hashlib.sha256(b"fork").digest())
        for bad_last, bad_new, bad_proof in (
            (last, fork, proof),  # a fork
            (new, last, proof),  # a rollback
            (last, new, proof[:-1]),
            (last, new, []),
            (last, notes.Checkpoint("other.example/log", 20, new.root), proof),
            (last, notes.Checkpoint(ORIGIN, 5, new.root), []),  # same size, another root
        ):
            with pytest.raises(FailedPrecondition):
                notes.check_extends(bad_last, bad_new, bad_proof)

    run(go())


# --- tlog-proof -------------------------------------------------------------------------------


def test_tlog_proof_round_trip_and_offline_verification(keys: LocalKeys) -> None:
    entries = [f"entry {i}".encode() for i in range(300)]

    async def go() -> None:
        store = tlog.MemoryTiles()
        result = await tlog.append(store, 0, [tlog.leaf_hash(e) for e in entries])
        store.write(result.tiles)
        signed = await notes.sign_checkpoint(notes.Checkpoint(ORIGIN, 300, result.root), keys.signers())
        verifiers = [s.verifier for s in keys.signers()]
        for index, extra in ((0, None), (257, b"record 42"), (299, b"")):
            hashes_ = tuple(await tlog.inclusion_proof(store, index, 300))
            proof = notes.TlogProof(index, hashes_, signed, extra)
            text = proof.format()
            lines = text.split("\n")
            assert lines[0] == "c2sp.org/tlog-proof@v1"
            assert text.endswith("\n\n" + signed)
            if extra is not None:
                assert lines[1] == "extra " + base64.b64encode(extra).decode()
            assert f"index {index}" in lines
            parsed = notes.TlogProof.parse(text)
            assert parsed == proof
            leaf = tlog.leaf_hash(entries[index])
            assert notes.verify_tlog_proof(parsed, leaf, verifiers, origin=ORIGIN).tree_size == 300
            for forged in (
                notes.TlogProof(index + 1, hashes_, signed, extra),
                notes.TlogProof(index, hashes_[:-1], signed, extra),
                notes.TlogProof(index, (*hashes_[:-1], bytes(32)), signed, extra),
                notes.TlogProof(index, hashes_, signed.replace("\n300\n", "\n301\n"), extra),
            ):
                with pytest.raises(InvalidArgument):
                    notes.verify_tlog_proof(forged, leaf, verifiers, origin=ORIGIN)
            with pytest.raises(InvalidArgument):
                notes.verify_tlog_proof(parsed, tlog.leaf_hash(b"another entry"), verifiers, origin=ORIGIN)

    run(go())


def test_malformed_tlog_proofs_are_refused() -> None:
    h = base64.b64encode(bytes(32)).decode()
    for bad in (
        f"c2sp.org/tlog-proof@v2\nindex 0\n{h}\n\n{GO_NOTE}",
        f"c2sp.org/tlog-proof@v1\nindex 01\n{h}\n\n{GO_NOTE}",
        f"c2sp.org/tlog-proof@v1\n{h}\n\n{GO_NOTE}",
        f"c2sp.org/tlog-proof@v1\nindex 0\n{h}\n{GO_NOTE}",
        f"c2sp.org/tlog-proof@v1\nindex 0\n{base64.b64encode(bytes(31)).decode()}\n\n{GO_NOTE}",
        f"c2sp.org/tlog-proof@v1\nindex 0\nextra AAAA\n\n{GO_NOTE}",  # extra after index
        f"c2sp.org/tlog-proof@v1\nindex 0\n\n{GO_TEXT}",  # the checkpoint is not a signed note
    ):
        with pytest.raises(InvalidArgument):
            notes.TlogProof.parse(bad)
    assert notes.TlogProof.parse(f"c2sp.org/tlog-proof@v1\nindex 0\n\n{GO_NOTE}").hashes == ()
