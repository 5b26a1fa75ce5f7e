"""The anchorer: one leader anchors the audit log's newest signed checkpoint on chain.

Every round, under the leader lock (a PostgreSQL advisory lock; one sender at a time across
replicas, so one nonce sequence):

1. read the contract's latest checkpoint for the origin: the chain, not our database, says what
   is anchored;
2. reconcile: forget anchors the chain no longer holds (a reorg or a node restored from older
   state dropped them), and record the chain's latest anchor if we lack it (sent before a crash,
   or by another replica);
3. decide (``domain.decide``): nothing new → nothing sent; else anchor when N entries wait or T
   seconds passed;
4. fetch the consistency proof from the audit log, send ``anchor(...)``, wait for the
   confirmations, and record the anchor with its CheckpointAnchored event in one transaction
   (the outbox).

A resent or raced transaction reverts with ``AlreadyAnchored`` or ``SizeBelowLatest`` in the
simulation, before any gas is paid, and the next round's reconciliation records what the chain
holds. A crash anywhere repeats the round; nothing is lost because the checkpoints are the log's
and the anchors are the chain's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from eth_utils.crypto import keccak
from medledger.audit.v1 import audit_service_pb2 as audit_pb
from medledger.audit.v1 import audit_service_pb2_grpc as audit_grpc
from medledger.events.v1 import anchoring_events_pb2
from prometheus_client import Counter, Gauge, Histogram
from web3.exceptions import ContractCustomError

from medledger_anchoring import domain, storage
from medledger_anchoring.consents import ConsentWriter
from medledger_anchoring.sender import Dropped, Reverted, Sender, with_backoff
from medledger_runtime.db import Database
from medledger_runtime.errors import outage_dependency
from medledger_runtime.events import TOPICS, new_event
from medledger_runtime.outbox import enqueue
from medledger_runtime.retry import Attempts, Backoff
from medledger_runtime.timestamps import timestamp
from medledger_verifier import chain, notes

log = logging.getLogger(__name__)

LEADER_LOCK = "anchoring-sender"
# After a failed round: 1 s doubling to 30 s, so a node that is down is not asked every poll.
ROUND_BACKOFF = Backoff(first_seconds=1.0, max_seconds=30.0)

ENTRIES_WAITING = Gauge("medledger_anchoring_entries_waiting", "Signed entries not yet covered by an anchor.")
ANCHORED_SIZE = Gauge("medledger_anchoring_anchored_tree_size", "The tree size of the latest anchored checkpoint.")
IS_LEADER = Gauge("medledger_anchoring_leader", "1 while this replica holds the sender lock.")
TIME_TO_ANCHOR = Histogram(
    "medledger_anchoring_time_to_anchor_seconds",
    "From a checkpoint's arrival to its anchor's last confirmation.",
    buckets=(1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600),
)
ANCHORS = Counter("medledger_anchoring_anchors_total", "Checkpoints anchored (confirmed).")
REFUSED = Counter(
    "medledger_anchoring_anchor_refused_total",
    "Anchors the contract refused, by custom error (Fork or BadSignature: alert).",
    ["error"],
)
REORGS = Counter("medledger_anchoring_reorged_anchors_total", "Recorded anchors the chain no longer holds.")
# The refusals an anchor can meet (AnchorRegistry's custom errors), created at zero.
for _error in ("NotAnchorer", "UnknownOrigin", "BadSignature", "AlreadyAnchored", "Fork", "SizeBelowLatest",
               "BadConsistencyProof", "EmptyTree", "ZeroRoot"):  # fmt: skip
    REFUSED.labels(_error)


class AuditLog:
    """What anchoring reads from the audit log (public RPCs: checkpoints and proofs)."""

    def __init__(self, stub: audit_grpc.AuditServiceStub, *, timeout: float = 30.0) -> None:
        self.stub, self.timeout = stub, timeout

    async def verifiers(self) -> tuple[str, list[notes.NoteVerifier]]:
        reply = await self.stub.GetVerifierKeys(audit_pb.GetVerifierKeysRequest(), timeout=self.timeout)
        return reply.origin, [notes.NoteVerifier.parse(k) for k in reply.verifier_keys]

    async def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        reply = await self.stub.GetConsistencyProof(
            audit_pb.GetConsistencyProofRequest(old_size=old_size, new_size=new_size), timeout=self.timeout
        )
        return list(reply.hashes)


class Anchorer:
    def __init__(
        self,
        db: Database,
        sender: Sender,
        audit: AuditLog,
        *,
        registry_address: str,
        origin: str,
        policy: domain.AnchorPolicy,
        source: str,
        poll_seconds: float = 1.0,
    ) -> None:
        self.db, self.sender, self.audit = db, sender, audit
        self.registry = chain.contract(sender.w3, chain.ANCHOR_REGISTRY, registry_address)
        self.registry_address = self.registry.address
        self.origin, self.policy, self.source = origin, policy, source
        self.origin_hash = keccak(text=origin)
        self.poll_seconds = poll_seconds
        self._verifiers: list[notes.NoteVerifier] = []
        self._wake = asyncio.Event()
        self.after_commit: Any = None  # the outbox relay's notify
        # Consent commitments go through the same leader and sender (one nonce sequence).
        self.consents: ConsentWriter | None = None

    def wake(self) -> None:
        """A new checkpoint arrived: look now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        # Each round starts afresh from the chain's and the log's state, so a failed round is
        # not an item to give up on: the next one is its retry, however often it fails (each
        # failure logged and counted by medledger_runtime.retry, an error that is not an outage
        # with its traceback too).
        tries = Attempts("anchoring round", attempts=None, backoff=ROUND_BACKOFF)
        while True:
            try:
                await self.round()
                tries.succeeded()
                delay = self.poll_seconds
            except Exception as exc:
                # Reconnect discipline: read the nonce and the contract afresh next time.
                self.sender.forget_nonce()
                if outage_dependency(exc) is None:
                    log.exception("anchoring round failed")
                delay = max(self.poll_seconds, tries.next_delay(exc) or 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            self._wake.clear()

    async def chain_latest(self) -> domain.ChainLatest:
        size, root, block, when = await with_backoff(
            "latest", lambda: self.registry.functions.latest(self.origin).call()
        )
        return domain.ChainLatest(int(size), bytes(root), int(block), float(when))

    async def round(self) -> domain.Decision | None:
        """One anchoring round; returns its decision (None when another replica leads)."""
        async with self.db.transaction() as lock_conn:
            if not await self.db.try_xact_lock(lock_conn, LEADER_LOCK):
                IS_LEADER.set(0)
                return None
            IS_LEADER.set(1)
            decision = await self._lead()
            if self.consents is not None:
                await self.consents.write_pending()
            return decision

    async def _lead(self) -> domain.Decision:
        if not self._verifiers:
            origin, self._verifiers = await self.audit.verifiers()
            if origin != self.origin:
                raise RuntimeError(f"the audit log's origin is {origin!r}, not the configured {self.origin!r}")
        if not await self.sender.has_code(self.registry_address):
            raise RuntimeError(f"no contract at {self.registry_address} on this chain (reset, or a wrong address)")
        try:
            latest = await self.chain_latest()
        except ContractCustomError as exc:
            error = chain.decode_error(chain.ANCHOR_REGISTRY, exc.data if isinstance(exc.data, str) else None)
            if error is not None and error.name == "UnknownOrigin":
                return domain.Decision(False, f"the origin {self.origin} is not registered on the contract yet")
            raise
        await self.reconcile(latest)
        await self.sender.update_balance()

        async with self.db.read() as conn:
            newest = await storage.newest_signed_checkpoint(conn, self.origin)
            waiting_since = await storage.first_waiting_since(conn, self.origin, latest.tree_size)
        newest_size = newest.tree_size if newest else 0
        ENTRIES_WAITING.set(max(0, newest_size - latest.tree_size))
        decision = domain.decide(
            newest_size, latest, now=time.time(), first_waiting_since=waiting_since, policy=self.policy
        )
        if not decision.anchor or newest is None:
            return decision
        log.info("anchoring the checkpoint of size %d: %s", newest.tree_size, decision.reason)
        await self._anchor(newest, latest)
        return decision

    async def _anchor(self, checkpoint: storage.SignedCheckpoint, latest: domain.ChainLatest) -> None:
        opened, signature = domain.p256_signature(checkpoint.note, self._verifiers, self.origin)
        if (opened.tree_size, opened.root) != (checkpoint.tree_size, checkpoint.root):
            raise ValueError("a stored checkpoint's note does not match its size and root")
        proof = await self.audit.consistency_proof(latest.tree_size, opened.tree_size) if latest.tree_size else []
        call = self.registry.functions.anchor(self.origin, opened.tree_size, opened.root, signature, proof)
        try:
            mined = await self.sender.send("anchor", chain.ANCHOR_REGISTRY, call)
        except Reverted as exc:
            if exc.name in ("AlreadyAnchored", "SizeBelowLatest"):
                # A resent transaction or another sender was first: the chain has it already.
                log.info("the chain already holds this or a later checkpoint (%s); reconciling", exc.error)
                await self.reconcile(await self.chain_latest())
                return
            REFUSED.labels(exc.name or "unknown").inc()
            log.error("the registry refused the checkpoint of size %d: %s", opened.tree_size, exc)
            raise
        except Dropped as exc:
            log.warning("anchor transaction dropped (%s); the next round reads the chain again", exc)
            return
        row = storage.AnchorRow(
            origin=self.origin,
            tree_size=opened.tree_size,
            root=opened.root,
            previous_size=latest.tree_size,
            chain_id=self.sender.chain_id,
            contract_address=self.registry_address,
            transaction_hash=mined.transaction_hash,
            block_number=mined.block_number,
            block_time=mined.block_time,
            gas_used=mined.gas_used,
        )
        await self._record(row)
        TIME_TO_ANCHOR.observe(max(0.0, time.time() - checkpoint.received_at))

    async def reconcile(self, latest: domain.ChainLatest) -> None:
        """Make our anchors agree with the chain's latest checkpoint."""
        async with self.db.transaction() as conn:
            dropped = await storage.drop_anchors_above(conn, self.origin, latest.tree_size)
            ours = await storage.latest_anchor(conn, self.origin)
        if dropped:
            REORGS.inc(dropped)
            # The dropped blocks took our transactions' nonces with them.
            self.sender.forget_nonce()
            log.warning("%d recorded anchor(s) above size %d are no longer on chain", dropped, latest.tree_size)
        ANCHORED_SIZE.set(latest.tree_size)
        if latest.tree_size == 0:
            return
        if ours and (ours.tree_size, ours.root) == (latest.tree_size, latest.root) and await self._still_mined(ours):
            return
        # Not ours yet (sent before a crash, or by another replica), or the same checkpoint whose
        # transaction was re-mined elsewhere: record what the chain holds.
        await self._record_from_chain(latest)

    async def _still_mined(self, row: storage.AnchorRow) -> bool:
        receipt = await with_backoff("receipt", lambda: self.sender.receipt(row.transaction_hash))
        return receipt is not None and int(receipt["blockNumber"]) == row.block_number

    async def _record_from_chain(self, latest: domain.ChainLatest) -> None:
        """Record the anchor the chain holds at ``latest`` from its CheckpointAnchored event."""
        events = await with_backoff(
            "eth_getLogs",
            lambda: self.registry.events.CheckpointAnchored.get_logs(
                from_block=latest.block_number,
                to_block=latest.block_number,
                argument_filters={"originHash": self.origin_hash},
            ),
        )
        for event in events:
            if int(event["args"]["size"]) == latest.tree_size and bytes(event["args"]["root"]) == latest.root:
                tx_hash = "0x" + bytes(event["transactionHash"]).hex()
                receipt = await self.sender.receipt(tx_hash)
                row = storage.AnchorRow(
                    origin=self.origin,
                    tree_size=latest.tree_size,
                    root=latest.root,
                    previous_size=int(event["args"]["previousSize"]),
                    chain_id=self.sender.chain_id,
                    contract_address=self.registry_address,
                    transaction_hash=tx_hash,
                    block_number=latest.block_number,
                    block_time=latest.block_time,
                    gas_used=int(receipt["gasUsed"]) if receipt else 0,
                )
                await self._record(row)
                return
        log.warning("no CheckpointAnchored event for size %d in block %d", latest.tree_size, latest.block_number)

    async def _record(self, row: storage.AnchorRow) -> None:
        payload = anchoring_events_pb2.CheckpointAnchored(
            origin=row.origin,
            tree_size=row.tree_size,
            root=row.root,
            previous_size=row.previous_size,
            chain_id=row.chain_id,
            contract_address=row.contract_address,
            transaction_hash=row.transaction_hash,
            block_number=row.block_number,
            block_time=timestamp(row.block_time),
            gas_used=row.gas_used,
        )
        async with self.db.transaction() as conn:
            if not await storage.save_anchor(conn, row, time.time()):
                return
            event = new_event(
                source=self.source,
                payload=payload,
                aggregate_id=row.origin,
                version=row.tree_size,
                # Idempotent across replicas and crashes: one event per anchor transaction.
                event_id=f"anchor-{row.transaction_hash.removeprefix('0x')[:40]}",
            )
            await enqueue(conn, TOPICS["anchoring"], event, key=row.origin.encode())
        ANCHORS.inc()
        log.info(
            "anchored the checkpoint of size %d in transaction %s (block %d, %d gas)",
            row.tree_size,
            row.transaction_hash,
            row.block_number,
            row.gas_used,
        )
        if self.after_commit is not None:
            self.after_commit()
