"""The consent writer: each consent version's commitment and status go to ConsentRegistry.

A version revokes the version it replaces (a change or a revocation), then, unless it is itself a
revocation, is granted with its period. Runs in the anchorer's rounds, under its leader lock and
through its sender: one account, one nonce sequence. Every write is idempotent on chain
(``AlreadyRecorded``, ``NotActive`` say it was done before a crash), so a repeated write is
recognised in the simulation and costs nothing.
"""

from __future__ import annotations

import asyncio
import logging

from medledger.events.v1 import anchoring_events_pb2
from prometheus_client import Counter

from medledger_anchoring import domain, storage
from medledger_anchoring.sender import Reverted, Sender
from medledger_runtime.db import Database
from medledger_runtime.events import TOPICS, new_event
from medledger_runtime.outbox import enqueue
from medledger_verifier import chain

log = logging.getLogger(__name__)

CONSENT_WRITES = Counter(
    "medledger_anchoring_consent_writes_total", "Consent versions written to ConsentRegistry, by outcome.", ["outcome"]
)
# Already so on chain: the write was done before (a crash between the transaction and our record).
_DONE_BEFORE = {"grant": "AlreadyRecorded", "revoke": "NotActive"}


class ConsentWriter:
    def __init__(self, db: Database, sender: Sender, registry_address: str, *, source: str, batch: int = 20) -> None:
        self.db, self.sender, self.source, self.batch = db, sender, source, batch
        self.registry = chain.contract(sender.w3, chain.CONSENT_REGISTRY, registry_address)
        self.after_commit: object = None

    async def write_pending(self) -> int:
        """Write up to ``batch`` pending versions; returns how many were settled.

        The versions of one consent go one after the other, oldest first (a version revokes the
        one before it, which must be on chain by then); different consents go side by side, so
        their transactions share blocks instead of each waiting for the last one's confirmation.
        """
        async with self.db.read() as conn:
            pending = await storage.pending_consent_writes(conn, self.batch)
        by_consent: dict[str, list[storage.ConsentWrite]] = {}
        for write in pending:
            by_consent.setdefault(write.consent_id, []).append(write)

        async def in_order(writes: list[storage.ConsentWrite]) -> None:
            for write in writes:
                await self._write(write)

        await asyncio.gather(*(in_order(w) for w in by_consent.values()))
        return len(pending)

    async def _send(self, name: str, call: object) -> str | None:
        """The transaction hash, or None when the chain already had it."""
        try:
            mined = await self.sender.send(f"consent_{name}", chain.CONSENT_REGISTRY, call)
        except Reverted as exc:
            if exc.name == _DONE_BEFORE[name]:
                return None
            raise
        return mined.transaction_hash

    async def _write(self, write: storage.ConsentWrite) -> None:
        async with self.db.read() as conn:
            previous = await storage.previous_granted_commitment(conn, write.consent_id, write.version)
        plan = domain.consent_chain_write(write.commitment, write.revoked, previous)
        tx_hash: str | None = None
        try:
            if plan.revoke:
                tx_hash = await self._send(
                    "revoke",
                    self.registry.functions.revoke(bytes.fromhex(plan.revoke), bytes.fromhex(write.commitment)),
                )
            if plan.grant:
                tx_hash = (
                    await self._send(
                        "grant",
                        self.registry.functions.grant(bytes.fromhex(plan.grant), write.valid_from, write.valid_until),
                    )
                    or tx_hash
                )
        except Reverted as exc:
            # The contract will never take it (e.g. an empty period): keep why, and move on.
            CONSENT_WRITES.labels("refused").inc()
            log.error("ConsentRegistry refused consent version %s@%d: %s", write.consent_id, write.version, exc)
            async with self.db.transaction() as conn:
                await storage.finish_consent_write(conn, write.seq, "failed", None, str(exc))
            return
        async with self.db.transaction() as conn:
            await storage.finish_consent_write(conn, write.seq, "done", tx_hash, None)
            payload = anchoring_events_pb2.ConsentCommitmentRecorded(
                commitment=write.commitment,
                status="revoked" if write.revoked else "granted",
                chain_id=self.sender.chain_id,
                contract_address=self.registry.address,
                transaction_hash=tx_hash or "",
            )
            event = new_event(
                source=self.source,
                payload=payload,
                aggregate_id=write.consent_id,
                version=write.version,
                event_id=f"consent-chain-{write.event_id}"[:64],
            )
            await enqueue(conn, TOPICS["anchoring"], event, key=write.consent_id.encode())
        CONSENT_WRITES.labels("written").inc()
        if callable(self.after_commit):
            self.after_commit()
