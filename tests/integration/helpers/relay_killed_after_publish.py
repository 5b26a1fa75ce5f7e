"""Runs the outbox relay for one batch and SIGKILLs itself after the broker acknowledged the
messages but before the rows' marking as published commits: the crash the outbox must survive.

Usage: python relay_killed_after_publish.py DATABASE_URL BOOTSTRAP_SERVERS SERVICE
"""

import asyncio
import os
import signal
import sys

from medledger_runtime.db import Database
from medledger_runtime.kafka import make_producer
from medledger_runtime.outbox_relay import OutboxRelay


class RelayKilledBeforeMarking(OutboxRelay):
    marking = 0

    async def _mark_published(self, conn, ids):  # type: ignore[no-untyped-def]
        self.marking = len(ids)
        await super()._mark_published(conn, ids)

    # Called once every message is acknowledged, inside the transaction that marks the rows.
    async def _raise_watermarks(self, conn, metas):  # type: ignore[no-untyped-def]
        print(f"published {self.marking} rows; killing myself before the marking commits", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


async def main(url: str, bootstrap: str, service: str) -> None:
    db = Database(url)
    producer = make_producer(bootstrap)
    await producer.start()
    await RelayKilledBeforeMarking(db, producer, service=service).publish_once()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
