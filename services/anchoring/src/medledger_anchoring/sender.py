"""The chain account: the one place that signs and sends transactions.

web3.py does the JSON-RPC, ABI encoding and signing (eth-account). What is ours is the sending
discipline a single sender needs on any EVM chain:

- EIP-1559 fees: ``maxFeePerGas`` = twice the latest base fee plus the node's suggested tip,
  capped by a configured ceiling, so a transaction stays includable for several blocks of rising
  base fee;
- its own nonce, read from the chain once and then counted here (several transactions may be in
  flight), and read again when the node answers "nonce too low/high";
- every call simulated first (``eth_estimateGas``), so a revert is known by its custom error
  *before* gas is paid: ``AlreadyAnchored`` means a resent transaction was recognised;
- a transaction counts once it has the configured confirmations and its receipt is still there
  at that depth; a receipt that vanishes (a reorg, a node restarted from older state) counts as
  never mined, and the caller reconciles with the contract.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from eth_account import Account
from eth_account.signers.local import LocalAccount
from prometheus_client import Counter, Gauge, Histogram
from web3.exceptions import ContractCustomError, ContractLogicError, TransactionNotFound, Web3RPCError

from medledger_runtime.errors import outage_dependency
from medledger_runtime.retry import Backoff, retry
from medledger_runtime.settings import read_secret_file
from medledger_verifier import chain

log = logging.getLogger(__name__)
T = TypeVar("T")

RPC_ERRORS = Counter("medledger_anchoring_rpc_errors_total", "Chain JSON-RPC calls that failed, by kind.", ["kind"])
for _kind in ("unreachable", "nonce"):
    RPC_ERRORS.labels(_kind)  # created at zero
GAS_USED = Counter("medledger_anchoring_gas_used_total", "Gas used by the anchoring account's transactions.", ["call"])
TRANSACTIONS = Counter(
    "medledger_anchoring_transactions_total", "Transactions sent, by call and outcome.", ["call", "outcome"]
)
BALANCE = Gauge("medledger_anchoring_account_balance_ether", "The anchoring account's balance, in ether.")
CONFIRM_SECONDS = Histogram(
    "medledger_anchoring_confirmation_seconds",
    "From sending a transaction to its last required confirmation.",
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
)

# The node out of reach: waits from 0.5 s doubling to 10 s, so a restarting node is not hammered.
CHAIN_BACKOFF = Backoff(first_seconds=0.5, max_seconds=10.0)


class Reverted(Exception):
    """The contract refused the call; ``error`` is its custom error when it has one."""

    def __init__(self, call: str, error: chain.CustomError | None, message: str = "") -> None:
        self.call, self.error = call, error
        super().__init__(f"{call} reverted: {error or message or 'no reason'}")

    @property
    def name(self) -> str:
        return self.error.name if self.error else ""


class Dropped(Exception):
    """A sent transaction is not (or no longer) in the chain at the required depth."""


@dataclass(frozen=True)
class Mined:
    transaction_hash: str
    block_number: int
    block_hash: bytes
    block_time: float
    gas_used: int
    logs: list[Any]


def load_account(path: Path) -> LocalAccount:
    """The account whose hex private key is in ``path`` (a mounted secret)."""
    key = read_secret_file(path).decode().strip()
    account: LocalAccount = Account.from_key(key)
    return account


async def with_backoff(what: str, call: Callable[[], Awaitable[T]], *, give_up_after: float = 300.0) -> T:
    """``call`` retried while the node is out of reach (medledger_runtime.retry); re-raised after
    ``give_up_after`` seconds so the caller's loop can report and start over. Any other error
    (a revert, a refused nonce) is raised at once: the caller knows what it means."""

    async def counted() -> T:
        try:
            return await call()
        except Exception as exc:
            if outage_dependency(exc) is not None:
                RPC_ERRORS.labels("unreachable").inc()
            raise

    return await retry(
        counted, f"chain RPC {what}", only_outages=True, outages_for_seconds=give_up_after, backoff=CHAIN_BACKOFF
    )


class Sender:
    def __init__(
        self,
        w3: chain.Web3,
        account: LocalAccount,
        *,
        chain_id: int,
        confirmations: int,
        max_fee_per_gas_wei: int,
        receipt_timeout: float = 120.0,
        poll_seconds: float = 0.25,
    ) -> None:
        self.w3, self.account, self.chain_id = w3, account, chain_id
        self.confirmations = confirmations
        self.max_fee_per_gas_wei = max_fee_per_gas_wei
        self.receipt_timeout, self.poll_seconds = receipt_timeout, poll_seconds
        self._nonce: int | None = None
        self._lock = asyncio.Lock()

    @property
    def address(self) -> str:
        return str(self.account.address)

    async def check_chain(self) -> None:
        """Refuse to send to a chain other than the configured one."""
        actual = await with_backoff("eth_chainId", lambda: self.w3.eth.chain_id)
        if actual != self.chain_id:
            raise RuntimeError(f"the RPC endpoint serves chain {actual}, not the configured chain {self.chain_id}")

    async def has_code(self, address: str) -> bool:
        code = await with_backoff("eth_getCode", lambda: self.w3.eth.get_code(address))  # type: ignore[arg-type]
        return len(code) > 0

    async def update_balance(self) -> int:
        wei = await with_backoff("eth_getBalance", lambda: self.w3.eth.get_balance(self.account.address))
        BALANCE.set(wei / 10**18)
        return int(wei)

    def forget_nonce(self) -> None:
        """Read the nonce from the chain before the next transaction (after a reconnect)."""
        self._nonce = None

    async def _fees(self) -> tuple[int, int]:
        block = await self.w3.eth.get_block("latest")
        base = int(block.get("baseFeePerGas") or 0)
        tip = int(await self.w3.eth.max_priority_fee)
        max_fee = min(2 * base + tip, self.max_fee_per_gas_wei)
        if max_fee < base:
            raise RuntimeError(
                f"the base fee ({base} wei) is above the configured maximum fee per gas "
                f"({self.max_fee_per_gas_wei} wei)"
            )
        return max_fee, min(tip, max_fee)

    async def send(self, name: str, contract_name: str, call: Any) -> Mined:
        """Simulate, sign, send and wait for ``call`` (a web3 contract function call) to be
        confirmed. Raises Reverted (with the custom error) or Dropped."""
        async with self._lock:
            try:
                gas = await call.estimate_gas({"from": self.account.address})
            except (ContractCustomError, ContractLogicError) as exc:
                TRANSACTIONS.labels(name, "refused").inc()
                raise Reverted(name, chain.decode_error(contract_name, getattr(exc, "data", None)), str(exc)) from None
            tx_hash = await self._sign_and_send(name, call, gas)
        started = time.monotonic()
        mined = await self._wait_confirmed(tx_hash)
        CONFIRM_SECONDS.observe(time.monotonic() - started)
        GAS_USED.labels(name).inc(mined.gas_used)
        TRANSACTIONS.labels(name, "confirmed").inc()
        return mined

    async def _sign_and_send(self, name: str, call: Any, gas: int) -> str:
        for attempt in range(3):
            if self._nonce is None:
                self._nonce = await self.w3.eth.get_transaction_count(self.account.address, "pending")
            max_fee, tip = await self._fees()
            tx = await call.build_transaction(
                {
                    "from": self.account.address,
                    "chainId": self.chain_id,
                    "nonce": self._nonce,
                    # 20% over the estimate: state may change between simulation and inclusion.
                    "gas": gas * 6 // 5,
                    "maxFeePerGas": max_fee,
                    "maxPriorityFeePerGas": tip,
                }
            )
            signed = self.account.sign_transaction(tx)
            try:
                sent = await self.w3.eth.send_raw_transaction(signed.raw_transaction)
            except Web3RPCError as exc:
                text = str(exc).lower()
                if "nonce too low" in text or "nonce too high" in text or "already known" in text:
                    RPC_ERRORS.labels("nonce").inc()
                    log.warning("%s: the node refused nonce %s (%s); reading it from the chain", name, self._nonce, exc)
                    self._nonce = None
                    if attempt < 2:
                        continue
                raise
            self._nonce += 1
            TRANSACTIONS.labels(name, "sent").inc()
            return "0x" + bytes(sent).hex()
        raise RuntimeError("unreachable")

    async def receipt(self, tx_hash: str) -> Any | None:
        """The transaction's receipt, or None while it is not mined (or no longer is)."""
        try:
            return await self.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
        except TransactionNotFound:
            return None

    async def _known(self, tx_hash: str) -> bool:
        try:
            await self.w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
        except TransactionNotFound:
            return False
        return True

    async def _wait_confirmed(self, tx_hash: str) -> Mined:
        deadline = time.monotonic() + self.receipt_timeout
        while True:
            try:
                receipt = await self.receipt(tx_hash)
                if receipt is None and not await self._known(tx_hash):
                    # Neither mined nor pending: the node lost it (restarted from older state).
                    self._nonce = None
                    TRANSACTIONS.labels("transaction", "dropped").inc()
                    raise Dropped(f"{tx_hash} is no longer known to the node")
                if receipt is not None:
                    if receipt["status"] != 1:
                        raise Reverted("transaction", None, f"{tx_hash} reverted when mined")
                    head = await self.w3.eth.block_number
                    if head - receipt["blockNumber"] + 1 >= self.confirmations:
                        # Still there at depth, in the same block: not reorganised away meanwhile.
                        again = await self.receipt(tx_hash)
                        if again is not None and again["blockHash"] == receipt["blockHash"]:
                            block = await self.w3.eth.get_block(receipt["blockNumber"])
                            return Mined(
                                tx_hash,
                                int(receipt["blockNumber"]),
                                bytes(receipt["blockHash"]),
                                float(block["timestamp"]),
                                int(receipt["gasUsed"]),
                                list(receipt["logs"]),
                            )
            except Exception as exc:
                if outage_dependency(exc) is None:
                    raise
                RPC_ERRORS.labels("unreachable").inc()  # polled again until the deadline
            if time.monotonic() > deadline:
                # Never mined, or mined and then dropped: the nonce may be free again.
                self._nonce = None
                TRANSACTIONS.labels("transaction", "dropped").inc()
                raise Dropped(f"{tx_hash} was not confirmed within {self.receipt_timeout:.0f} s")
            await asyncio.sleep(self.poll_seconds)
