"""A verifier of `medledger demo --out` evidence that uses no medledger code at all.

Written from the specifications only — RFC 6962/9162 (Merkle tree hashing and inclusion proofs),
C2SP signed-note, tlog-checkpoint and tlog-proof (text formats, Ed25519 signature type 0x01),
RFC 8785 (JSON canonicalization, via the `rfc8785` package), the record and consent commitment
formulas of the README, and plain Ethereum JSON-RPC over HTTP (``eth_chainId``,
``eth_getTransactionReceipt``, ``eth_call``) — so that a third party can see that the evidence
stands on those alone. It shares
nothing with ``medledger_runtime``: a bug there cannot hide a bug here.

``verify_folder(folder, rpc_url)`` returns the list of problems found (empty: verified);
``consent_on_chain(rpc_url, registry, document, salt_hex)`` recomputes a consent version's
commitment and reads its ConsentRegistry entry; ``in_force(entry, when)`` is the registry's rule;
``verify_decision(folder)`` replays ``decision.json`` (the README's decision rule, written again
from its words).
"""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import rfc8785
from Crypto.Hash import keccak
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


class Refused(Exception):
    pass


def _keccak(data: bytes) -> bytes:
    return keccak.new(digest_bits=256, data=data).digest()


# --- C2SP formats ---------------------------------------------------------------------------


def parse_vkey(text: str) -> tuple[str, bytes, bytes]:
    """A C2SP note verifier key ``<name>+<key id hex>+<base64(type || public key)>`` of type
    0x01 (Ed25519); returns (name, key id, public key) after checking the key id."""
    name, key_id_hex, encoded = text.strip().split("+", 2)  # base64 may hold "+" too
    raw = base64.b64decode(encoded, validate=True)
    if raw[0] != 0x01 or len(raw) != 33:
        raise Refused("log.vkey is not an Ed25519 (type 0x01) verifier key")
    key_id = bytes.fromhex(key_id_hex)
    if hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4] != key_id:
        raise Refused("log.vkey's key id does not match its name and key")
    return name, key_id, raw[1:]


def parse_tlog_proof(text: str) -> tuple[int, list[bytes], str]:
    """c2sp.org/tlog-proof@v1: header, optional ``extra``, ``index N``, inclusion hashes, a blank
    line, the checkpoint verbatim. Returns (index, hashes, checkpoint note)."""
    head, sep, note = text.partition("\n\n")
    if not sep:
        raise Refused("the tlog-proof has no blank line before its checkpoint")
    lines = head.split("\n")
    if lines[0] != "c2sp.org/tlog-proof@v1":
        raise Refused("not a c2sp.org/tlog-proof@v1")
    rest = lines[1:]
    if rest and rest[0].startswith("extra "):
        rest = rest[1:]
    if not rest or not rest[0].startswith("index "):
        raise Refused("the tlog-proof has no index line")
    index = int(rest[0].removeprefix("index "))
    hashes = [base64.b64decode(h, validate=True) for h in rest[1:]]
    if any(len(h) != 32 for h in hashes):
        raise Refused("an inclusion hash is not 32 bytes")
    return index, hashes, note


def open_checkpoint(note: str, name: str, key_id: bytes, public_key: bytes) -> tuple[str, int, bytes]:
    """Check the note's Ed25519 signature by the given key; return (origin, size, root)."""
    body, sep, signatures = note.partition("\n\n")
    if not sep:
        raise Refused("the checkpoint has no signature block")
    body += "\n"
    verified = False
    for line in signatures.strip("\n").split("\n"):
        if not line.startswith("\u2014 "):
            raise Refused("a malformed signature line")
        signer, encoded = line[2:].rsplit(" ", 1)
        blob = base64.b64decode(encoded)
        if signer != name or blob[:4] != key_id:
            continue  # another key's signature (the P-256 one): not ours to check here
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(blob[4:], body.encode())
        except InvalidSignature:
            raise Refused("the checkpoint's Ed25519 signature does not verify") from None
        verified = True
    if not verified:
        raise Refused("the checkpoint carries no signature of log.vkey")
    origin, size, root = body.split("\n")[:3]
    return origin, int(size), base64.b64decode(root, validate=True)


# --- RFC 9162 -------------------------------------------------------------------------------


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def root_from_inclusion(index: int, size: int, leaf: bytes, path: list[bytes]) -> bytes:
    """RFC 9162 §2.1.3.2, step by step."""
    if index >= size:
        raise Refused("the index is outside the tree")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise Refused("the inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise Refused("the inclusion proof is too short")
    return r


# --- Ethereum JSON-RPC ----------------------------------------------------------------------


def rpc(url: str, method: str, *params: Any) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}).encode()
    # A URL the test chose, http to a local node.
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
        answer = json.loads(reply.read())
    if "error" in answer:
        raise Refused(f"{method}: {answer['error']}")
    return answer["result"]


def _word(value: int) -> bytes:
    return value.to_bytes(32, "big")


def call_root_at(url: str, registry: str, origin: str, size: int) -> bytes:
    """``rootAt(string,uint64)`` of AnchorRegistry by eth_call, ABI-encoded by hand."""
    selector = _keccak(b"rootAt(string,uint64)")[:4]
    name = origin.encode()
    padded = name + b"\x00" * (-len(name) % 32)
    data = selector + _word(64) + _word(size) + _word(len(name)) + padded
    result = rpc(url, "eth_call", {"to": registry, "data": "0x" + data.hex()}, "latest")
    return bytes.fromhex(result[2:])


CONSENT_STATUSES = ("unknown", "granted", "revoked")


def consent_on_chain(url: str, registry: str, document: bytes, salt_hex: str) -> dict[str, Any]:
    """The README's consent commitment, SHA-256("medledger:consent:v1\\n" || salt || JCS(Consent)),
    and ``statusOf(bytes32)`` of ConsentRegistry for it by eth_call, decoded by hand (a static
    tuple: six 32-byte words)."""
    salt = bytes.fromhex(salt_hex.strip())
    commitment = hashlib.sha256(b"medledger:consent:v1\n" + salt + rfc8785.dumps(json.loads(document))).digest()
    data = _keccak(b"statusOf(bytes32)")[:4] + commitment
    raw = bytes.fromhex(rpc(url, "eth_call", {"to": registry, "data": "0x" + data.hex()}, "latest")[2:])
    if len(raw) != 6 * 32:
        raise Refused(f"statusOf returned {len(raw)} bytes, not six words")
    words = [int.from_bytes(raw[i : i + 32], "big") for i in range(0, len(raw), 32)]
    return {
        "commitment": commitment.hex(),
        "status": CONSENT_STATUSES[words[0]],
        "valid_from": words[1],
        "valid_until": words[2],
        "recorded_at": words[3],
        "revoked_at": words[4],
        "revoked_by": raw[160:192].hex(),
    }


def in_force(entry: dict[str, Any], when: int) -> bool:
    """In force at ``when``: granted, recorded on chain by then, in its window (no end when 0),
    and not revoked at or before ``when``."""
    if entry["status"] == "unknown" or when < entry["recorded_at"] or when < entry["valid_from"]:
        return False
    if entry["valid_until"] and when >= entry["valid_until"]:
        return False
    return entry["status"] != "revoked" or when < entry["revoked_at"]


# --- the whole check --------------------------------------------------------------------------


def verify_proof(folder: Path, stem: str, rpc_url: str, problems: list[str]) -> dict[str, Any] | None:
    """The tlog-proof ``<stem>.tlog-proof`` of ``<stem>.entry``, anchored per ``<stem>-anchor.json``."""
    trust = json.loads((folder / "trust.json").read_text())
    name, key_id, public_key = parse_vkey((folder / "log.vkey").read_text())
    if name != trust["origin"] or (folder / "log.vkey").read_text().strip() not in trust["log_verifier_keys"]:
        problems.append(f"{stem}: log.vkey is not the trust policy's key of its log")
        return None
    entry = (folder / f"{stem}.entry").read_bytes()
    anchor = json.loads((folder / f"{stem}-anchor.json").read_text())
    try:
        index, path, note = parse_tlog_proof((folder / f"{stem}.tlog-proof").read_text())
        origin, size, root = open_checkpoint(note, name, key_id, public_key)
        if origin != trust["origin"]:
            raise Refused("the checkpoint is of another log")
        if root_from_inclusion(index, size, leaf_hash(entry), path) != root:
            raise Refused("the entry is not in the checkpoint's tree")
        # The anchor names exactly this checkpoint, on the trusted chain and registry.
        if (anchor["origin"], anchor["tree_size"], anchor["root"]) != (origin, size, "0x" + root.hex()):
            raise Refused("the anchor is not this checkpoint")
        if anchor["chain_id"] != trust["chain_id"] or int(rpc(rpc_url, "eth_chainId"), 16) != trust["chain_id"]:
            raise Refused("not the trusted chain")
        registry = trust["anchor_registry"].lower()
        if anchor["contract_address"].lower() != registry:
            raise Refused("the anchor names another registry")
        receipt = rpc(rpc_url, "eth_getTransactionReceipt", anchor["tx_hash"])
        if receipt is None or receipt["status"] != "0x1" or (receipt["to"] or "").lower() != registry:
            raise Refused("the anchoring transaction is not a successful call of the registry")
        if int(receipt["blockNumber"], 16) != anchor["block_number"]:
            raise Refused("the anchoring transaction is in another block")
        topic = "0x" + _keccak(b"CheckpointAnchored(bytes32,uint64,bytes32,uint64)").hex()
        origin_hash = "0x" + _keccak(origin.encode()).hex()
        emitted = [
            bytes.fromhex(log["data"][2:])
            for log in receipt["logs"]
            if log["address"].lower() == registry and log["topics"][:2] == [topic, origin_hash]
        ]
        if not any(int.from_bytes(d[0:32], "big") == size and d[32:64] == root for d in emitted):
            raise Refused("the transaction did not anchor this checkpoint")
        if call_root_at(rpc_url, registry, origin, size) != root:
            raise Refused("the registry does not hold this root now")
    except (Refused, ValueError, KeyError) as exc:
        problems.append(f"{stem}: {exc}")
        return None
    parsed: dict[str, Any] = json.loads(entry)
    return parsed


def verify_folder(folder: Path, rpc_url: str) -> list[str]:
    problems: list[str] = []
    stored = verify_proof(folder, "record", rpc_url, problems)
    if stored is not None:
        # The README's formula: SHA-256("medledger:record:v1\n" || salt || JCS(record)).
        salt = bytes.fromhex((folder / "record.salt").read_text().strip())
        record = json.loads((folder / "record.json").read_bytes())
        computed = hashlib.sha256(b"medledger:record:v1\n" + salt + rfc8785.dumps(record)).hexdigest()
        if stored.get("type") != "record.stored" or stored.get("commitment") != computed:
            problems.append("record: the record and salt do not give the entry's commitment")
    access = verify_proof(folder, "access", rpc_url, problems)
    if access is not None and access.get("type") != "record.disclosed":
        problems.append("access: the entry is not a disclosure")
    return problems


# --- a decision, replayed -------------------------------------------------------------------

# The README's propagation window: versions younger than this may be missing from a decision.
WINDOW_SECONDS = 3.0
_TESTS = ("NO_MATCHING_GRANTEE", "REVOKED", "NOT_IN_PERIOD", "ACTION_NOT_COVERED", "CATEGORY_NOT_COVERED",
          "PURPOSE_NOT_COVERED")  # fmt: skip


def _seconds(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _rule(decision: dict[str, Any], versions: list[dict[str, Any]], accesses: list[dict[str, Any]]) -> tuple:
    """medledger-consent-rules/2 as the README words it, over entries: (decision, reason code,
    deciding "consent@version" list, break-glass access id)."""
    now = _seconds(decision["decided_at"])
    latest: dict[str, dict[str, Any]] = {}
    for v in versions:
        if _seconds(v["recorded_at"]) <= now and v["version"] > latest.get(v["consent_id"], {"version": 0})["version"]:
            latest[v["consent_id"]] = v
    actor = {decision["actor_id"], decision.get("actor_organization_id", "")} - {""}
    outcome: tuple[str, str, list[str], str]
    if not latest:
        outcome = ("DECISION_NO_CONSENT", "NO_CONSENT_FOR_PATIENT", [], "")
    else:
        applicable, furthest = [], 0
        for v in (v for v in latest.values() if v["grantee_id"] in actor):
            end = v.get("period_end")
            passed = [
                not v.get("revoked", False),
                _seconds(v["period_start"]) <= now and (end is None or now < _seconds(end)),
                not v.get("actions") or decision["action"] in v["actions"],
                not v.get("categories") or decision["category"] in v["categories"],
                not v.get("purposes") or decision["purpose"] in v["purposes"],
            ]
            reached = next((i + 1 for i, ok in enumerate(passed) if not ok), 6)
            if reached == 6:
                applicable.append(v)
            furthest = max(furthest, reached if reached < 6 else 0)
        refs = {p: sorted(f"{v['consent_id']}@{v['version']}" for v in applicable if v["provision"] == p)
                for p in ("PROVISION_TYPE_DENY", "PROVISION_TYPE_PERMIT")}  # fmt: skip
        if refs["PROVISION_TYPE_DENY"]:
            outcome = ("DECISION_DENY", "EXPLICIT_DENY", refs["PROVISION_TYPE_DENY"], "")
        elif refs["PROVISION_TYPE_PERMIT"]:
            return ("DECISION_PERMIT", "PERMITTED", refs["PROVISION_TYPE_PERMIT"], "")
        else:
            outcome = ("DECISION_NO_CONSENT", _TESTS[furthest], [], "")
    if (decision["action"], decision["purpose"]) != ("ACTION_READ", "PURPOSE_OF_USE_ETREAT"):
        return outcome
    running = sorted(
        (a for a in accesses if a["practitioner_id"] == decision["actor_id"] and a["start"] <= now < a["end"]),
        key=lambda a: a["access_id"],
    )
    if running and outcome[0] == "DECISION_NO_CONSENT":
        return ("DECISION_PERMIT", "BREAK_GLASS", [], running[0]["access_id"])
    overriding = [a for a in running if a.get("overrides_deny")]
    if overriding and outcome[0] == "DECISION_DENY":
        return ("DECISION_PERMIT", "BREAK_GLASS_OVERRIDES_DENY", outcome[2], overriding[0]["access_id"])
    return outcome


def verify_decision(folder: Path) -> list[str]:
    """``decision.json``: every entry in a checkpoint signed by log.vkey (RFC 9162, C2SP); the
    versions the decision considered are the patient's logged versions up to it (all those
    older than the window); the rule re-run over them gives the logged outcome."""
    trust = json.loads((folder / "trust.json").read_text())
    name, key_id, public_key = parse_vkey((folder / "log.vkey").read_text())
    evidence = json.loads((folder / "decision.json").read_text())
    problems: list[str] = []
    parsed = []
    for i, item in enumerate([evidence["decision"], *evidence["entries"]]):
        entry = item["entry"].encode()
        try:
            index, path, note = parse_tlog_proof(item["tlog_proof"])
            origin, size, root = open_checkpoint(note, name, key_id, public_key)
            if origin != trust["origin"] or root_from_inclusion(index, size, leaf_hash(entry), path) != root:
                raise Refused("the entry is not in the checkpoint's tree")
        except (Refused, ValueError) as exc:
            problems.append(f"decision: entry {i}: {exc}")
        parsed.append(json.loads(entry))
    decision, others = parsed[0], [e for e in parsed[1:] if e.get("subject") == parsed[0].get("subject")]
    if decision.get("type") != "consent.decision" or "considered" not in decision:
        return [*problems, "decision: not a decision entry with its considered versions listed"]
    versions = {v["commitment"]: v for v in others if v["type"] == "consent.version_recorded"}
    decided = _seconds(decision["decided_at"])
    considered = set(decision["considered"])
    for c in sorted(considered):
        if c not in versions or _seconds(versions[c]["recorded_at"]) > decided:
            problems.append(f"decision: considered version {c[:16]} is not a logged version up to the decision")
    for c, v in sorted(versions.items()):
        if c not in considered and _seconds(v["recorded_at"]) < decided - WINDOW_SECONDS:
            problems.append(f"decision: {v['consent_id']}@{v['version']} was logged before it and not considered")
    ends = {
        e["access_id"]: _seconds(e["ended_at"])
        for e in others
        if e["type"] == "break_glass.reviewed" and "ended_at" in e
    }
    accesses = [
        {**e, "start": _seconds(e["started_at"]), "end": min(_seconds(e["expires_at"]), ends.get(e["access_id"], 1e18))}
        for e in others
        if e["type"] == "break_glass.started"
    ]
    given = [v for c, v in versions.items() if c in considered]
    got = _rule(decision, given, accesses)
    logged = (
        decision["decision"],
        decision["reason_code"],
        decision.get("deciding", []),
        decision.get("break_glass_access_id", ""),
    )
    if decision.get("rule_version") != "medledger-consent-rules/2" or got != logged:
        problems.append(f"decision: the rule gives {got}, the log says {logged}")
    return problems
