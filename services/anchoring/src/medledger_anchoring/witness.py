"""Anchoring's queries, the witness's side, apart from any transport (the gRPC API in ``api.py``
is one caller of these): the anchored checkpoints, the latest anchor, an entry's anchored proof,
and the verification of a proof against this deployment's trust policy.

Anchors and proofs are transparency data: hashes, sizes and chain coordinates. An entry's bytes
are handed out only for a commitment lookup, as the audit log's FindCommitment does (whoever
holds a receipt's commitment finds its entry); by index, read the entry in audit, which decides
who may. Each use case takes a command of plain values and returns plain results or raises the
errors of ``medledger_runtime.errors``; the audit log is reached through :class:`EntryProofs`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from medledger_anchoring import storage
from medledger_runtime.db import Database
from medledger_runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from medledger_verifier import anchored_proofs, chain, proof_checks, proof_files

DEFAULT_PAGE, MAX_PAGE = 20, 100
MAX_PROOF_BYTES = 64 * 1024
# Indexes are 64-bit signed integers in the databases; a uint64 above is no entry.
MAX_ENTRY_INDEX = 2**63 - 2
_PAGE_TOKEN = re.compile(r"[0-9]{1,18}")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class EntryProofs(Protocol):
    """What the proofs need from the audit log: the entry a commitment is in, and the entry's
    C2SP tlog-proof at a tree size. Its errors are already ours (NotFound, InvalidArgument,
    Unavailable)."""

    async def find_commitment(self, commitment: str) -> tuple[int, bytes]:
        """(index, entry bytes) of the log entry holding `commitment`."""
        ...

    async def tlog_proof(self, index: int, tree_size: int) -> str:
        """The tlog-proof of entry `index` at exactly `tree_size`."""
        ...


# Commands.


@dataclass(frozen=True)
class ListAnchoredCheckpoints:
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class GetAnchoredProof:
    """Exactly one of `commitment` and `entry_index` (None: not given)."""

    commitment: str | None = None
    entry_index: int | None = None


@dataclass(frozen=True)
class VerifyProof:
    tlog_proof: str = ""
    entry: bytes = b""
    anchor_json: bytes = b""
    record: bytes = b""
    salt: str = ""
    media_type: str = ""


# Results.


@dataclass(frozen=True)
class AnchoredCheckpoints:
    anchors: list[storage.AnchorRow]
    next_page_token: str


@dataclass(frozen=True)
class LatestAnchor:
    anchor: storage.AnchorRow
    latest_signed_tree_size: int  # 0: no signed checkpoint received yet


@dataclass(frozen=True)
class AnchoredProof:
    """The smallest anchor whose tree holds the entry, and the entry's proof at its size."""

    tlog_proof: str
    entry: bytes  # only for a commitment lookup
    anchor: storage.AnchorRow
    entry_index: int

    @property
    def anchor_json(self) -> bytes:
        """The anchor as the file `medledger verify` reads."""
        return anchor_file(self.anchor).to_json().encode()


def anchor_file(row: storage.AnchorRow) -> proof_files.Anchor:
    return proof_files.Anchor(
        chain_id=row.chain_id,
        contract_address=row.contract_address,
        tx_hash=row.transaction_hash,
        block_number=row.block_number,
        origin=row.origin,
        tree_size=row.tree_size,
        root=row.root,
    )


class Witness:
    """Anchoring's queries over its anchors table, the audit log's proofs and the chain; its
    dependencies come through the constructor."""

    def __init__(
        self,
        db: Database,
        origin: str,
        proofs: EntryProofs,
        w3: chain.Web3,
        policy: proof_files.TrustPolicy | None,
    ) -> None:
        self.db, self.origin, self.proofs, self.w3, self.policy = db, origin, proofs, w3, policy

    async def anchored_checkpoints(self, command: ListAnchoredCheckpoints) -> AnchoredCheckpoints:
        """A page of anchors, the largest first; the page token is the last one's tree size."""
        if command.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        size = min(command.page_size or DEFAULT_PAGE, MAX_PAGE)
        below: int | None = None
        if command.page_token:
            # ASCII digits only (str.isdigit takes "²", which int() refuses), few enough for BIGINT.
            if not _PAGE_TOKEN.fullmatch(command.page_token):
                raise InvalidArgument.field("page_token", "not a token this RPC returned")
            below = int(command.page_token)
        async with self.db.read() as conn:
            rows = await storage.list_anchors(conn, self.origin, below_size=below, limit=size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return AnchoredCheckpoints(anchors=rows, next_page_token=str(rows[-1].tree_size) if more else "")

    async def latest(self) -> LatestAnchor:
        async with self.db.read() as conn:
            row = await storage.latest_anchor(conn, self.origin)
            newest = await storage.newest_signed_checkpoint(conn, self.origin)
        if row is None:
            raise NotFound("nothing is anchored yet")
        return LatestAnchor(anchor=row, latest_signed_tree_size=newest.tree_size if newest else 0)

    async def anchored_proof(self, command: GetAnchoredProof) -> AnchoredProof:
        """FailedPrecondition while no anchor covers the entry yet (retry after the next one)."""
        entry = b""
        if command.commitment is not None:
            if not _HEX64.match(command.commitment):
                raise InvalidArgument.field("commitment", "a SHA-256, 64 lowercase hex digits")
            index, entry = await self.proofs.find_commitment(command.commitment)
        elif command.entry_index is not None:
            index = command.entry_index
            if index > MAX_ENTRY_INDEX:
                raise InvalidArgument.field("entry_index", "beyond the largest index a log can have")
        else:
            raise InvalidArgument.field("target", "give a commitment or an entry index")
        async with self.db.read() as conn:
            row = await storage.anchor_covering(conn, self.origin, index)
            latest = await storage.latest_anchor(conn, self.origin) if row is None else None
        if row is None:
            anchored = latest.tree_size if latest else 0
            raise FailedPrecondition(
                f"entry {index} is not covered by an anchor yet (anchored tree size {anchored}); retry later"
            )
        proof = await self.proofs.tlog_proof(index, row.tree_size)
        return AnchoredProof(tlog_proof=proof, entry=entry, anchor=row, entry_index=index)

    async def verify(self, command: VerifyProof) -> proof_checks.Verification:
        """The checks of ``medledger verify`` against this deployment's trust policy; a bad proof
        is a failed check, not an error."""
        if self.policy is None:
            raise FailedPrecondition("this deployment has no trust policy configured (MEDLEDGER_TRUST_POLICY_FILE)")
        for name in ("tlog_proof", "entry", "anchor_json", "record"):
            if len(getattr(command, name)) > MAX_PROOF_BYTES * (16 if name == "record" else 1):
                raise InvalidArgument.field(name, "too large")
        if bool(command.record) != bool(command.salt):
            raise InvalidArgument.field("salt", "give the record and its salt together")
        if command.media_type and not command.record:
            raise InvalidArgument.field("media_type", "give it with the record (a document's media type)")
        return await anchored_proofs.verify_anchored_proof(
            self.policy,
            command.tlog_proof,
            command.entry,
            command.anchor_json,
            self.w3,
            record=command.record or None,
            salt_hex=command.salt or None,
            media_type=command.media_type or None,
        )
