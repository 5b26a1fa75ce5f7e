"""The JSON files of anchored proofs: the trust policy a verifier trusts (``TrustPolicy``) and the
anchor file, which says where a checkpoint was anchored (``Anchor``).

The trust policy is what a verifier trusts instead of the proof: the log's origin and verifier
keys, the chain id, the registries' addresses and the confirmations it wants. `medledger up` writes
it; an operator publishes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medledger_verifier.errors import InvalidArgument

POLICY_VERSION = 1


def _hex32(value: Any, name: str) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x") or len(value) != 66:
        raise InvalidArgument.field(name, "32 bytes as 0x-prefixed hex")
    try:
        return bytes.fromhex(value[2:])
    except ValueError:
        raise InvalidArgument.field(name, "32 bytes as 0x-prefixed hex") from None


def _object(data: bytes | str, what: str) -> dict[str, Any]:
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument.field(what, "not JSON") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument.field(what, "not a JSON object")
    return parsed


@dataclass(frozen=True)
class TrustPolicy:
    """What a verifier trusts: everything in a proof is compared with this, never trusted."""

    origin: str
    # C2SP note verifier keys (`<name>+<hex id>+<base64>`); every one must have signed.
    log_verifier_keys: tuple[str, ...]
    chain_id: int
    anchor_registry: str
    min_confirmations: int = 1
    version: int = POLICY_VERSION
    # C2SP note verifier keys that sign erasure certificates (records'); absent from policies
    # written before certificates were signed, which still load (and verify no certificate).
    erasure_certificate_keys: tuple[str, ...] = ()
    # The ConsentRegistry on the same chain (`medledger verify consent`); empty in policies written
    # before consents were verified, which still load.
    consent_registry: str = ""

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "version": self.version,
                    "origin": self.origin,
                    "log_verifier_keys": list(self.log_verifier_keys),
                    "chain_id": self.chain_id,
                    "anchor_registry": self.anchor_registry,
                    "min_confirmations": self.min_confirmations,
                    "erasure_certificate_keys": list(self.erasure_certificate_keys),
                    **({"consent_registry": self.consent_registry} if self.consent_registry else {}),
                },
                indent=2,
            )
            + "\n"
        )

    @classmethod
    def parse(cls, data: bytes | str) -> TrustPolicy:
        obj = _object(data, "trust_policy")
        try:
            policy = cls(
                origin=str(obj["origin"]),
                log_verifier_keys=tuple(str(k) for k in obj["log_verifier_keys"]),
                chain_id=int(obj["chain_id"]),
                anchor_registry=str(obj["anchor_registry"]),
                min_confirmations=int(obj.get("min_confirmations", 1)),
                version=int(obj.get("version", POLICY_VERSION)),
                erasure_certificate_keys=tuple(str(k) for k in obj.get("erasure_certificate_keys", ())),
                consent_registry=str(obj.get("consent_registry", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument.field("trust_policy", f"missing or malformed field: {exc}") from None
        if policy.version != POLICY_VERSION:
            raise InvalidArgument.field("trust_policy", f"unknown version {policy.version}")
        if not policy.log_verifier_keys or policy.min_confirmations < 1:
            raise InvalidArgument.field("trust_policy", "needs verifier keys and at least one confirmation")
        return policy

    @classmethod
    def read(cls, path: Path) -> TrustPolicy:
        return cls.parse(path.read_bytes())


@dataclass(frozen=True)
class Anchor:
    """Where a checkpoint was anchored (``<stem>-anchor.json``). ``consistency_proof`` is given
    only when the anchored tree is larger than the proof's checkpoint: it proves that tree
    extends the checkpoint (RFC 9162 §2.1.4)."""

    chain_id: int
    contract_address: str
    tx_hash: str
    block_number: int
    origin: str
    tree_size: int
    root: bytes
    consistency_proof: tuple[bytes, ...] = field(default=())

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "chain_id": self.chain_id,
            "contract_address": self.contract_address,
            "tx_hash": self.tx_hash,
            "block_number": self.block_number,
            "origin": self.origin,
            "tree_size": self.tree_size,
            "root": "0x" + self.root.hex(),
        }
        if self.consistency_proof:
            data["consistency_proof"] = ["0x" + h.hex() for h in self.consistency_proof]
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def parse(cls, data: bytes | str) -> Anchor:
        obj = _object(data, "anchor")
        try:
            return cls(
                chain_id=int(obj["chain_id"]),
                contract_address=str(obj["contract_address"]),
                tx_hash=str(obj["tx_hash"]),
                block_number=int(obj["block_number"]),
                origin=str(obj["origin"]),
                tree_size=int(obj["tree_size"]),
                root=_hex32(obj["root"], "anchor.root"),
                consistency_proof=tuple(
                    _hex32(h, "anchor.consistency_proof") for h in obj.get("consistency_proof", [])
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument.field("anchor", f"missing or malformed field: {exc}") from None
