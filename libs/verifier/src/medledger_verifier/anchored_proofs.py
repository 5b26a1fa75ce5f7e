"""Verifying anchored proofs against a trust policy and the chain.

An anchored proof is three files with one stem (what `medledger demo --out` writes):

- ``<stem>.tlog-proof``: a C2SP tlog-proof of the entry, against a signed checkpoint that the
  chain holds;
- ``<stem>.entry``: the entry's bytes (JCS JSON, services/audit/README.md);
- ``<stem>-anchor.json``: where the checkpoint was anchored (``proof_files.Anchor``).

``verify_anchored_proof`` checks an anchored proof against a policy (``proof_files.TrustPolicy``)
and a chain, in the order of ``proof_checks.CHECKS``, stopping at the first failure (what
`medledger verify` runs).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, cast

from eth_utils.crypto import keccak
from web3.exceptions import TransactionNotFound

from medledger_verifier import chain, commitments, notes, tlog
from medledger_verifier.errors import InvalidArgument, MedledgerError
from medledger_verifier.proof_checks import Check, Verification
from medledger_verifier.proof_files import Anchor, TrustPolicy

_CHECKPOINT_ANCHORED_TOPIC = keccak(text="CheckpointAnchored(bytes32,uint64,bytes32,uint64)")


class _Failed(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _same_address(a: str, b: str) -> bool:
    return a.lower().removeprefix("0x") == b.lower().removeprefix("0x")


def _rpc_failure(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if len(text) > 300:
        text = text[:300] + "…"
    return f"could not ask the chain ({type(exc).__name__}: {text})"


class _Verifier:
    """One verification's state; each ``_<check>`` method returns its detail or raises _Failed."""

    def __init__(
        self,
        policy: TrustPolicy,
        tlog_proof_text: str | bytes,
        entry_bytes: bytes,
        anchor_json: str | bytes,
        w3: chain.Web3,
        record: bytes | None,
        salt_hex: str | None,
        media_type: str | None,
    ) -> None:
        self.policy, self.proof_text, self.entry, self.anchor_json, self.w3 = (
            policy,
            tlog_proof_text,
            entry_bytes,
            anchor_json,
            w3,
        )
        self.record, self.salt_hex, self.media_type = record, salt_hex, media_type
        self.proof: notes.TlogProof | None = None
        self.anchor: Anchor | None = None
        self.claimed: notes.Checkpoint | None = None  # parsed, not yet verified
        self.checkpoint: notes.Checkpoint | None = None  # verified
        self.anchored_at: datetime | None = None

    def _registry(self) -> Any:
        return chain.anchor_registry_reader(self.w3, self.policy.anchor_registry)

    async def proof_format(self) -> str:
        try:
            self.proof = notes.TlogProof.parse(self.proof_text)
            self.claimed = notes.Checkpoint.parse(notes.parse_note(self.proof.checkpoint).text)
        except InvalidArgument as exc:
            raise _Failed(f"the tlog-proof is malformed: {exc.message}") from None
        try:
            self.anchor = Anchor.parse(self.anchor_json)
        except InvalidArgument as exc:
            raise _Failed(f"the anchor file is malformed: {exc.message}") from None
        return (
            f"a tlog-proof of entry {self.proof.index} against a checkpoint of size {self.claimed.tree_size}, "
            f"and an anchor at tree size {self.anchor.tree_size}"
        )

    async def origin(self) -> str:
        assert self.claimed is not None and self.anchor is not None
        expected = self.policy.origin
        if self.claimed.origin != expected:
            raise _Failed(f"the checkpoint is of the log {self.claimed.origin!r}, the trust policy's is {expected!r}")
        if self.anchor.origin != expected:
            raise _Failed(f"the anchor is of the log {self.anchor.origin!r}, the trust policy's is {expected!r}")
        return f"both name the log {expected}"

    async def checkpoint_signature(self) -> str:
        assert self.proof is not None
        try:
            verifiers = [notes.NoteVerifier.parse(k) for k in self.policy.log_verifier_keys]
        except InvalidArgument as exc:
            raise _Failed(f"a verifier key of the trust policy is malformed: {exc.message}") from None
        try:
            self.checkpoint, _ = notes.open_checkpoint(
                self.proof.checkpoint, verifiers, origin=self.policy.origin, require_all=True
            )
        except InvalidArgument as exc:
            raise _Failed(
                f"the checkpoint's signatures do not verify with the trust policy's keys: {exc.message}"
            ) from None
        return f"signed by all {len(verifiers)} keys of the trust policy"

    async def entry_inclusion(self) -> str:
        assert self.proof is not None and self.checkpoint is not None
        size, root = self.checkpoint.tree_size, self.checkpoint.root
        if not tlog.verify_inclusion(self.proof.index, size, tlog.leaf_hash(self.entry), self.proof.hashes, root):
            raise _Failed(
                f"the inclusion proof does not show these entry bytes at index {self.proof.index} "
                f"of the checkpoint's tree (size {size}): the entry, the index or the proof was changed"
            )
        return f"entry {self.proof.index} of {size}, leaf hash {tlog.leaf_hash(self.entry).hex()[:16]}…"

    async def chain(self) -> str:
        assert self.anchor is not None
        policy = self.policy
        if self.anchor.chain_id != policy.chain_id:
            raise _Failed(
                f"the anchor is on chain {self.anchor.chain_id}, the trust policy's is chain {policy.chain_id}"
            )
        if not _same_address(self.anchor.contract_address, policy.anchor_registry):
            raise _Failed(
                f"the anchor names the contract {self.anchor.contract_address}, "
                f"the trust policy's registry is {policy.anchor_registry}"
            )
        try:
            chain_id = await self.w3.eth.chain_id
            code = await self.w3.eth.get_code(self._registry().address)
        except Exception as exc:  # the RPC endpoint: unreachable, refused, not a chain
            raise _Failed(_rpc_failure(exc)) from None
        if chain_id != policy.chain_id:
            raise _Failed(f"the RPC endpoint serves chain {chain_id}, the trust policy's is chain {policy.chain_id}")
        if not code:
            raise _Failed(f"there is no contract at {policy.anchor_registry} on chain {chain_id}")
        return f"chain {chain_id}, registry {policy.anchor_registry}"

    async def anchored(self) -> str:
        assert self.anchor is not None and self.checkpoint is not None
        anchor, checkpoint = self.anchor, self.checkpoint
        try:
            on_chain = bytes(await self._registry().functions.rootAt(self.policy.origin, anchor.tree_size).call())
        except Exception as exc:
            raise _Failed(_rpc_failure(exc)) from None
        if on_chain == bytes(32):
            raise _Failed(f"the registry holds no checkpoint of size {anchor.tree_size} for this log")
        if not hmac.compare_digest(on_chain, anchor.root):
            raise _Failed(
                f"the registry's root at size {anchor.tree_size} is {on_chain.hex()}, "
                f"the anchor says {anchor.root.hex()}"
            )
        if anchor.tree_size == checkpoint.tree_size:
            if anchor.root != checkpoint.root:
                raise _Failed(f"the anchored root at size {anchor.tree_size} is not the checkpoint's root")
            return f"the registry holds this very checkpoint (size {anchor.tree_size})"
        if anchor.tree_size < checkpoint.tree_size:
            raise _Failed(
                f"the anchor (size {anchor.tree_size}) is older than the proof's checkpoint "
                f"(size {checkpoint.tree_size}): it does not cover the entry's checkpoint"
            )
        if not tlog.verify_consistency(
            checkpoint.tree_size, anchor.tree_size, checkpoint.root, anchor.root, anchor.consistency_proof
        ):
            raise _Failed(
                f"the anchor's consistency proof does not show the anchored tree (size {anchor.tree_size}) "
                f"extends the checkpoint (size {checkpoint.tree_size})"
            )
        return (
            f"the registry holds the tree of size {anchor.tree_size}, which provably extends the checkpoint "
            f"(size {checkpoint.tree_size})"
        )

    async def anchor_transaction(self) -> str:
        assert self.anchor is not None
        anchor, policy = self.anchor, self.policy
        tx_hex = anchor.tx_hash.lower().removeprefix("0x")
        if len(tx_hex) != 64 or any(c not in "0123456789abcdef" for c in tx_hex):
            raise _Failed(f"the anchor's transaction hash {anchor.tx_hash[:80]!r} is not 32 bytes of hex")
        registry = self._registry()
        try:
            try:
                receipt: Any = await self.w3.eth.get_transaction_receipt(cast(Any, "0x" + tx_hex))
            except TransactionNotFound:
                raise _Failed(f"the chain has no mined transaction 0x{tx_hex}") from None
            if receipt["status"] != 1:
                raise _Failed(f"the transaction 0x{tx_hex} failed (reverted)")
            to = receipt.get("to")
            if not to or not _same_address(str(to), policy.anchor_registry):
                raise _Failed(f"the transaction 0x{tx_hex} was sent to {to}, not to the registry")
            if receipt["blockNumber"] != anchor.block_number:
                raise _Failed(
                    f"the transaction is in block {receipt['blockNumber']}, the anchor says block {anchor.block_number}"
                )
            origin_hash = keccak(text=policy.origin)
            found = False
            for log in receipt["logs"]:
                if not _same_address(str(log["address"]), policy.anchor_registry):
                    continue
                topics = log["topics"]
                if not topics or bytes(topics[0]) != _CHECKPOINT_ANCHORED_TOPIC:
                    continue
                args = registry.events.CheckpointAnchored().process_log(log)["args"]
                if (
                    bytes(args["originHash"]) == origin_hash
                    and args["size"] == anchor.tree_size
                    and bytes(args["root"]) == anchor.root
                ):
                    found = True
            if not found:
                raise _Failed(
                    f"the transaction 0x{tx_hex} emitted no CheckpointAnchored event of this log "
                    f"with size {anchor.tree_size} and this root"
                )
            latest = await self.w3.eth.block_number
            confirmations = latest - receipt["blockNumber"] + 1
            if confirmations < policy.min_confirmations:
                raise _Failed(
                    f"the transaction has {confirmations} confirmation(s), the trust policy wants "
                    f"{policy.min_confirmations}; try again later"
                )
            block: Any = await self.w3.eth.get_block(receipt["blockNumber"])
            if bytes(block["hash"]) != bytes(receipt["blockHash"]):
                raise _Failed("the transaction's block is no longer on the chain (a reorganisation): try again")
        except _Failed:
            raise
        except Exception as exc:
            raise _Failed(_rpc_failure(exc)) from None
        self.anchored_at = datetime.fromtimestamp(int(block["timestamp"]), UTC)
        return (
            f"transaction 0x{tx_hex} in block {anchor.block_number} "
            f"({self.anchored_at:%Y-%m-%d %H:%M:%S} UTC), {confirmations} confirmation(s)"
        )

    async def record_commitment(self) -> str:
        assert self.record is not None and self.salt_hex is not None
        try:
            salt = bytes.fromhex(self.salt_hex.removeprefix("0x"))
        except ValueError:
            raise _Failed("the salt is not hex") from None
        if len(salt) != commitments.SALT_BYTES:
            raise _Failed(f"the salt is {commitments.SALT_BYTES} bytes (64 hex digits), not {len(salt)}")
        try:
            entry = json.loads(self.entry)
        except (ValueError, UnicodeDecodeError):
            raise _Failed("the entry is not JSON") from None
        committed = entry.get("commitment") if isinstance(entry, dict) else None
        if not isinstance(committed, str):
            raise _Failed("the entry holds no commitment (it is not a record-stored entry)")
        try:
            if self.media_type is not None:
                computed = commitments.document_commitment(self.media_type, self.record, salt)
                what = f"document ({self.media_type})"
            else:
                computed = commitments.record_commitment(self.record, salt)
                what = "FHIR record"
        except InvalidArgument as exc:
            raise _Failed(f"the record is not JSON whose commitment can be computed: {exc.message}") from None
        if not hmac.compare_digest(computed, committed.lower()):
            raise _Failed(
                f"the {what} and salt give the commitment {computed}, the entry holds {committed}: "
                "the record, its salt or its media type differs from what was committed"
            )
        return f"the {what} and salt give the entry's commitment {computed[:16]}…"


async def verify_anchored_proof(
    policy: TrustPolicy,
    tlog_proof_text: str | bytes,
    entry_bytes: bytes,
    anchor_json: str | bytes,
    w3: chain.Web3,
    *,
    record: bytes | None = None,
    salt_hex: str | None = None,
    media_type: str | None = None,
) -> Verification:
    """Verify an anchored proof against ``policy`` and the chain behind ``w3``: the checks of
    ``CHECKS`` in order, stopping at the first failure (the later ones are reported not run).
    ``record`` and ``salt_hex`` (and ``media_type`` for a document) add `record-commitment`.
    Never raises for a bad proof or an unreachable chain: those are failed checks."""
    if (record is None) != (salt_hex is None):
        raise ValueError("record and salt_hex are given together")
    if media_type is not None and record is None:
        raise ValueError("media_type needs a record and its salt")
    v = _Verifier(policy, tlog_proof_text, entry_bytes, anchor_json, w3, record, salt_hex, media_type)
    steps: list[tuple[str, Callable[[], Awaitable[str]]]] = [
        ("proof-format", v.proof_format),
        ("origin", v.origin),
        ("checkpoint-signature", v.checkpoint_signature),
        ("entry-inclusion", v.entry_inclusion),
        ("chain", v.chain),
        ("anchored", v.anchored),
        ("anchor-transaction", v.anchor_transaction),
    ]
    if record is not None:
        steps.append(("record-commitment", v.record_commitment))
    checks: list[Check] = []
    failed = False
    for name, step in steps:
        if failed:
            checks.append(Check(name, None, "not run: an earlier check failed"))
            continue
        try:
            checks.append(Check(name, True, await step()))
        except _Failed as exc:
            checks.append(Check(name, False, exc.detail))
            failed = True
        except MedledgerError as exc:  # a malformed value the step did not expect
            checks.append(Check(name, False, exc.message))
            failed = True
    verified = not failed
    proof, checkpoint, anchor = v.proof, v.checkpoint, v.anchor
    return Verification(
        checks=tuple(checks),
        anchored_at=v.anchored_at if verified else None,
        origin=policy.origin,
        index=proof.index if proof else None,
        checkpoint_size=checkpoint.tree_size if checkpoint else None,
        anchor_size=anchor.tree_size if anchor else None,
        block_number=anchor.block_number if anchor else None,
        chain_id=policy.chain_id,
        record_checked=record is not None,
    )
