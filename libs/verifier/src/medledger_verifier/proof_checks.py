"""The checks of an anchored proof, in the order ``verify_anchored_proof`` runs them, and the
verification it returns: each check's outcome and, when all passed, the verdict in words."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

# The checks of `verify_anchored_proof`, in the order they run; `record-commitment` only when a
# record and its salt are given.
CHECKS = (
    "proof-format",
    "origin",
    "checkpoint-signature",
    "entry-inclusion",
    "chain",
    "anchored",
    "anchor-transaction",
    "record-commitment",
)

# What each check establishes, in words a person reads.
CHECK_TITLES = {
    "proof-format": "the proof and anchor files are well formed",
    "origin": "the proof and the anchor are of the trusted log",
    "checkpoint-signature": "the checkpoint is signed by every key of the trust policy",
    "entry-inclusion": "the entry is in the signed checkpoint's tree",
    "chain": "the chain and registry are the trusted ones",
    "anchored": "the registry on chain holds the checkpoint's tree",
    "anchor-transaction": "the anchoring transaction is on chain and confirmed",
    "record-commitment": "the record and salt give the entry's commitment",
}


@dataclass(frozen=True)
class Check:
    """One named check: ``passed`` is True or False once run, None when an earlier check failed
    and this one was not run; ``detail`` says what was found."""

    name: str
    passed: bool | None
    detail: str

    @property
    def title(self) -> str:
        return CHECK_TITLES.get(self.name, self.name)


@dataclass(frozen=True)
class Verification:
    """The result of ``verify_anchored_proof``: every check in order, and, when verified, the
    time of the block that anchored the checkpoint (UTC) — an upper bound on when the entry
    (and the record) existed."""

    checks: tuple[Check, ...]
    anchored_at: datetime | None = None
    origin: str = ""
    index: int | None = None
    checkpoint_size: int | None = None
    anchor_size: int | None = None
    block_number: int | None = None
    chain_id: int | None = None
    record_checked: bool = False

    @property
    def verified(self) -> bool:
        return bool(self.checks) and all(c.passed is True for c in self.checks)

    @property
    def failed(self) -> Check | None:
        """The first failed check, if any."""
        return next((c for c in self.checks if c.passed is False), None)

    def verdict(self) -> str:
        failed = self.failed
        if failed is not None or not self.verified:
            if failed is None:
                return "NOT VERIFIED: no check ran"
            return f"NOT VERIFIED: {failed.name}: {failed.detail}"
        when = self.anchored_at.strftime("%Y-%m-%d %H:%M:%S UTC") if self.anchored_at else "an unknown time"
        what = "the entry and the record it commits to" if self.record_checked else "the entry"
        return (
            f"VERIFIED: entry {self.index} of the log {self.origin} is in its signed checkpoint of size "
            f"{self.checkpoint_size}, which chain {self.chain_id} anchored (tree size {self.anchor_size}) in block "
            f"{self.block_number} at {when}. So {what} existed, unchanged, no later than {when}: the block "
            f"time is an upper bound on when it existed, not the time it was written."
        )
