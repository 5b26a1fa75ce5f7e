"""Anchoring's rules, without I/O: when to anchor, what a checkpoint's on-chain form is, and what
a consent version becomes on chain."""

from __future__ import annotations

from dataclasses import dataclass

from medledger_runtime.keys import der_to_raw_rs
from medledger_verifier import notes


@dataclass(frozen=True)
class ChainLatest:
    """The contract's latest checkpoint of an origin (``latest(origin)``); size 0: none yet."""

    tree_size: int
    root: bytes
    block_number: int
    block_time: float


@dataclass(frozen=True)
class AnchorPolicy:
    # Anchor once this long has passed since the last anchor (or since the first checkpoint
    # that waits, when the chain has none yet) ...
    interval_seconds: float
    # ... or once this many entries wait, whichever comes first.
    every_entries: int


@dataclass(frozen=True)
class Decision:
    anchor: bool
    reason: str


def decide(
    newest_signed: int, chain: ChainLatest, *, now: float, first_waiting_since: float | None, policy: AnchorPolicy
) -> Decision:
    """Whether to anchor the newest signed checkpoint now.

    Only a checkpoint larger than the contract's latest is ever sent (the chain, not our
    database, says what is anchored), so with nothing new nothing is sent. The interval runs
    from the later of the last anchor's block time and the arrival of the oldest waiting
    checkpoint: after a quiet spell the next anchor still batches for up to one interval.
    """
    waiting = newest_signed - chain.tree_size
    if waiting <= 0:
        return Decision(False, "nothing new: the chain holds the newest signed checkpoint")
    if waiting >= policy.every_entries:
        return Decision(True, f"{waiting} entries wait (at least {policy.every_entries})")
    since = max(chain.block_time, first_waiting_since or 0.0)
    if now - since >= policy.interval_seconds:
        return Decision(True, f"{waiting} entries waited {now - since:.1f} s (interval {policy.interval_seconds:g} s)")
    return Decision(False, f"{waiting} entries wait; anchoring in {policy.interval_seconds - (now - since):.1f} s")


def p256_signature(note_text: str, verifiers: list[notes.NoteVerifier], origin: str) -> tuple[notes.Checkpoint, bytes]:
    """The checkpoint of a signed note, verified with the log's keys, and its P-256 signature
    as the contract takes it (raw ``r || s``)."""
    checkpoint, note = notes.open_checkpoint(note_text, verifiers, origin=origin, require_all=True)
    ecdsa = [v for v in verifiers if v.signature_type == notes.SIGNATURE_ECDSA]
    for signature in note.signatures:
        if any(signature.key_id == v.key_id and signature.name == v.name for v in ecdsa):
            return checkpoint, der_to_raw_rs(signature.signature)
    raise ValueError("the checkpoint has no P-256 signature of the log's key")


@dataclass(frozen=True)
class ConsentChainWrite:
    """What one consent version does on chain: revoke the version it replaces (if any), then
    grant itself (unless it is a revocation)."""

    revoke: str | None
    grant: str | None


def consent_chain_write(commitment: str, revoked: bool, previous: str | None) -> ConsentChainWrite:
    return ConsentChainWrite(revoke=previous, grant=None if revoked else commitment)
