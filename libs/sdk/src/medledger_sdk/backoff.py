"""How long to wait before trying again: the client's retries and the runtime's loops share it."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential waits from `first_seconds`, doubling to `max_seconds`, each drawn between half
    and all of its step ("equal jitter": never shorter than half, never in lockstep)."""

    first_seconds: float = 0.1
    max_seconds: float = 5.0

    def delay(self, failures: int) -> float:
        step = min(self.max_seconds, self.first_seconds * 2.0 ** min(failures - 1, 32))
        return step / 2 + random.random() * step / 2
