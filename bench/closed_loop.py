"""The closed-loop client every RPC benchmark uses: ``in_flight`` callers, each calling again as
soon as its call returns, for ``seconds``; calls per second and latency percentiles. One copy, so
that the baseline (an empty call) and every measured RPC are driven the same way."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

IN_FLIGHT = int(os.environ.get("IN_FLIGHT", "16"))
"""Callers at once; ``IN_FLIGHT=1`` measures a lone caller (run.py's "lone" figures)."""


async def measure(
    call: Callable[[], Awaitable[Any]], seconds: float, *, in_flight: int = IN_FLIGHT, warm_up: int = 50
) -> dict[str, float]:
    for _ in range(warm_up):
        await call()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "calls": len(latencies),
        "calls_per_s": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }
