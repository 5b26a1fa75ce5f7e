"""The witnesses of the log outside its database, which `medledger audit verify` compares the
stored log with: what the database alone cannot show is a log rolled back consistently (entries,
tiles, checkpoints and state rewritten to an earlier size) or checkpoint rows deleted.

- The checkpointer's **last-checkpoint file** (`MEDLEDGER_LAST_CHECKPOINT_FILE`): the newest
  checkpoint the log itself remembers signing, written before the database commits it and kept
  on a volume of its own (see `checkpoints`). The stored log must hold that checkpoint, and its
  entries must produce its root.
- The **chain**: the AnchorRegistry's latest accepted checkpoint for the log's origin. The
  stored log must be at least that long and produce that root at that size (RFC 9162: the
  stored tree's root at the anchored size is recomputed from the entries). A legitimate rollback
  continues under a new origin, whose anchors start afresh.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from medledger_audit.findings import Divergence, Finding
from medledger_verifier import chain, notes, tlog

RPC_TIMEOUT_SECONDS = 15.0


@dataclass(frozen=True)
class RememberedCheckpoint:
    """The last-checkpoint file as read: its path and text (None: no file there)."""

    path: Path
    note: str | None

    @classmethod
    def read(cls, path: Path) -> RememberedCheckpoint:
        """Reads the file; OSError other than its absence propagates (the caller says so)."""
        try:
            return cls(path, path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls(path, None)


@dataclass(frozen=True)
class ChainWitness:
    """What the registry holds for the origin: `latest` (tree size 0: nothing anchored yet; None:
    no log of that origin registered), or `problem` when the chain could not be read."""

    where: str
    latest: chain.LatestAnchor | None = None
    problem: str | None = None


async def read_chain(rpc_url: str, registry: str, origin: str, *, chain_id: int | None = None) -> ChainWitness:
    """The registry's latest checkpoint of `origin`; never raises (a failure is `problem`)."""
    where = f"registry {registry} at {rpc_url}"
    try:
        w3 = chain.connect(rpc_url, timeout=RPC_TIMEOUT_SECONDS)
    except Exception as exc:
        return ChainWitness(where, problem=_rpc_failure(exc))
    try:
        served = await w3.eth.chain_id
        where = f"registry {registry} on chain {served}"
        if chain_id is not None and served != chain_id:
            problem = f"the RPC endpoint serves chain {served}, the trust policy's is {chain_id}"
            return ChainWitness(where, problem=problem)
        if not await w3.eth.get_code(chain.anchor_registry_reader(w3, registry).address):
            return ChainWitness(where, problem=f"there is no contract at {registry} on chain {served}")
        return ChainWitness(where, await chain.latest_anchor(w3, registry, origin))
    except Exception as exc:  # unreachable, refused, not a chain, not the registry
        return ChainWitness(where, problem=_rpc_failure(exc))
    finally:
        await w3.provider.disconnect()


def _rpc_failure(exc: BaseException) -> str:
    text = (str(exc).strip() or type(exc).__name__)[:300]
    return f"could not read the chain ({type(exc).__name__}: {text})"


async def check_remembered(
    remembered: RememberedCheckpoint,
    verifiers: Sequence[notes.NoteVerifier],
    origin: str,
    stored: Mapping[int, str],
    tree_size: int,
    tree: tlog.TileReader,
) -> tuple[Finding, list[Divergence]]:
    """The file's checkpoint against the stored checkpoints (`stored`: size → note) and the
    recomputed tree of `tree_size` entries (`tree`)."""
    name = "last checkpoint"
    where = f"the last-checkpoint file {remembered.path}"
    if remembered.note is None:
        return Finding(name, None, f"not checked: there is no file at {remembered.path}"), []
    try:
        note = notes.parse_note(remembered.note)
        claimed = notes.Checkpoint.parse(note.text)
    except Exception as exc:
        return _failed(name, "remembered-unreadable", f"{where} is not a checkpoint note: {exc}")
    if claimed.origin != origin:
        # The log continues under a new origin and has signed nothing under it yet, or the file
        # belongs to another log: nothing of this origin to compare.
        return Finding(name, None, f"not checked: {where} is of the log {claimed.origin}, not {origin}"), []
    try:
        checkpoint, _ = notes.open_checkpoint(remembered.note, verifiers, origin=origin, require_all=True)
    except Exception as exc:
        return _failed(name, "remembered-signature", f"{where} does not verify with the log's keys: {exc}")
    size = checkpoint.tree_size
    if size > tree_size:
        return _failed(
            name,
            "behind-remembered",
            f"the log signed a checkpoint of size {size} ({where}), but the stored log has only {tree_size} "
            "entries: it was rolled back or truncated",
        )
    if await tlog.tree_root(tree, size) != checkpoint.root:
        return _failed(
            name,
            "inconsistent-with-remembered",
            f"the stored entries up to {size} do not produce the root of the checkpoint of size {size} in {where}: "
            "the log was rewritten",
        )
    if size not in stored:
        return _failed(
            name,
            "checkpoint-missing",
            f"the newest checkpoint the log remembers signing (size {size}, {where}) is missing from the "
            f"checkpoints table, which holds {_sizes(stored)}: checkpoint rows were deleted",
        )
    newest = max(stored)
    later = f"; the table also holds later ones up to {newest} (the file is older)" if newest > size else ""
    return Finding(name, True, f"the checkpoint of size {size} in {where} is stored and matches the entries{later}"), []


async def check_chain(
    witness: ChainWitness, origin: str, stored: Mapping[int, str], tree_size: int, tree: tlog.TileReader
) -> tuple[Finding, list[Divergence]]:
    """The registry's latest checkpoint of `origin` against the stored log (see the module)."""
    name = "chain"
    if witness.problem is not None:
        return _failed(name, "chain-unreadable", f"not compared with the chain: {witness.problem}")
    latest = witness.latest
    if latest is None:
        return _failed(
            name,
            "chain-unknown-origin",
            f"the {witness.where} has no log registered under the origin {origin}: it witnessed nothing "
            "of this log (a wrong registry or origin?)",
        )
    if latest.tree_size == 0:
        return Finding(name, True, f"the {witness.where} has anchored no checkpoint of {origin} yet"), []
    size = latest.tree_size
    if size > tree_size:
        return _failed(
            name,
            "behind-chain",
            f"the stored log has {tree_size} entries, fewer than the {size} the chain witnessed (anchored at "
            f"block {latest.block_number}): it was rolled back or truncated under the same origin",
        )
    ours = await tlog.tree_root(tree, size)
    if ours != latest.root:
        return _failed(
            name,
            "inconsistent-with-chain",
            f"the stored log ({tree_size} entries) is not consistent with what the chain witnessed: at size {size} "
            f"its entries give the root {ours.hex()}, the chain anchored {latest.root.hex()} (block "
            f"{latest.block_number}): the log was rewritten",
        )
    if size not in stored:
        return _failed(
            name,
            "anchored-checkpoint-missing",
            f"the chain anchored the checkpoint of size {size}, which the checkpoints table no longer holds "
            f"(it holds {_sizes(stored)}): checkpoint rows were deleted",
        )
    return Finding(
        name,
        True,
        f"the {witness.where} anchored size {size} at block {latest.block_number}; the stored log "
        f"({tree_size} entries) holds it and produces its root",
    ), []


def _failed(check: str, kind: str, problem: str) -> tuple[Finding, list[Divergence]]:
    return Finding(check, False, problem), [Divergence(None, problem, kind)]


def _sizes(stored: Mapping[int, str]) -> str:
    if not stored:
        return "none"
    sizes = sorted(stored)
    return ", ".join(map(str, sizes)) if len(sizes) <= 5 else f"{len(sizes)} from {sizes[0]} to {sizes[-1]}"
