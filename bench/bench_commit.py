"""A durable commit on PostgreSQL, the floor of any request that must write before it answers:
one small row inserted and committed (fsync on), by IN_FLIGHT callers (run.py uses one: a lone
caller's commit), through asyncpg, each caller on a connection of its own.

Usage: python bench_commit.py DATABASE_URL SECONDS
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from typing import Any

import asyncpg
from closed_loop import IN_FLIGHT, measure


async def main(url: str, seconds: float) -> dict[str, Any]:
    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    connections = [await asyncpg.connect(dsn) for _ in range(IN_FLIGHT)]
    try:
        await connections[0].execute("CREATE TABLE IF NOT EXISTS bench_commit (n bigint PRIMARY KEY, body text)")
        free = asyncio.Queue[asyncpg.Connection]()
        for connection in connections:
            free.put_nowait(connection)
        numbers = itertools.count()

        async def commit() -> None:
            connection = await free.get()
            try:  # one statement outside a transaction block: its own commit, flushed to disk
                await connection.execute("INSERT INTO bench_commit VALUES ($1, $2)", next(numbers), "x" * 200)
            finally:
                free.put_nowait(connection)

        return await measure(commit, seconds)
    finally:
        for connection in connections:
            await connection.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], float(sys.argv[2])))))
