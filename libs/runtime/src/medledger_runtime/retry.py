"""The one way every loop of the runtime tries again: consumers, the outbox relay, background
jobs, start-up waits, audit's log consumer and the chain sender.

An outage (errors.outage_dependency: the database, Kafka, a service it calls, a dependency out
of reach) is waited out; it says nothing about the work. Any other error is tried a bounded
number of times, then given back to the caller, who decides what giving up means: a consumer
dead-letters the message, a background job ends (and with it the service, a bug to see), a
request answers with its status. Waits grow exponentially with jitter to a cap, so replicas that
failed together do not all come back in the same instant. Every wait logs the error's class and
the dependency it concerns and counts in ``medledger_retries_total``; every giving up counts in
``medledger_retries_exhausted_total``.

Cancellation is never caught: a cancelled wait or attempt ends the loop at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prometheus_client import Counter

from medledger_runtime.errors import DEPENDENCY_WORDS, describe, outage_dependency
from medledger_sdk.backoff import Backoff as Backoff

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRIES = Counter(
    "medledger_retries_total",
    "Failed attempts that are tried again, by operation, the dependency whose outage it was "
    "(none: not an outage) and the error's class.",
    ["operation", "dependency", "error"],
)
EXHAUSTED = Counter(
    "medledger_retries_exhausted_total",
    "Operations given up after their attempts for an error that is not an outage, by error class.",
    ["operation", "error"],
)


class Attempts:
    """One operation's failures in a row and what each means: how long to wait before the next
    attempt, or that the attempts allowed for errors that are not outages are spent.

    `attempts` bounds the attempts of an operation that keeps failing with errors that are not
    outages (None: unbounded, for a periodic job whose every round is a new attempt); outages are
    waited out for as long as they last, or `outages_for_seconds` when given.
    """

    def __init__(
        self,
        operation: str,
        *,
        attempts: int | None = 5,
        backoff: Backoff = Backoff(),
        outages_for_seconds: float | None = None,
    ) -> None:
        self.operation = operation
        self.attempts = attempts
        self.backoff = backoff
        self.outages_for_seconds = outages_for_seconds
        self.failures = 0  # in a row, of any kind: the step of the backoff
        self.faults = 0  # in a row, not outages: what `attempts` bounds
        self._since: float | None = None

    def succeeded(self) -> None:
        self.failures = self.faults = 0
        self._since = None

    def next_delay(self, exc: BaseException) -> float | None:
        """Seconds to wait before trying again after `exc`, logged and counted; None when the
        caller should give up (the attempts are spent, or the outage outlasted its allowance)."""
        dependency = outage_dependency(exc)
        self.failures += 1
        now = time.monotonic()
        if self._since is None:
            self._since = now
        error = type(exc).__name__
        if dependency is None:
            self.faults += 1
            if self.attempts is not None and self.faults >= self.attempts:
                EXHAUSTED.labels(self.operation, error).inc()
                log.warning(
                    "%s failed %d times (%s, not an outage); giving up",
                    self.operation,
                    self.faults,
                    describe(exc),
                    extra={"operation": self.operation, "error": describe(exc), "attempts": self.faults},
                )
                return None
        elif self.outages_for_seconds is not None and now - self._since > self.outages_for_seconds:
            EXHAUSTED.labels(self.operation, error).inc()
            log.warning(
                "%s: %s still unavailable after %.0f s; giving up",
                self.operation,
                DEPENDENCY_WORDS[dependency],
                now - self._since,
                extra={"operation": self.operation, "error": describe(exc), "dependency": dependency},
            )
            return None
        delay = self.backoff.delay(self.failures)
        RETRIES.labels(self.operation, dependency or "none", error).inc()
        log.warning(
            "%s failed (%s, %s); trying again in %.2f s",
            self.operation,
            describe(exc),
            f"{DEPENDENCY_WORDS[dependency]} unavailable" if dependency else "not an outage",
            delay,
            extra={
                "operation": self.operation,
                "error": describe(exc),
                "dependency": dependency or "none",
                "attempt": self.failures,
            },
        )
        return delay

    async def wait_after(self, exc: BaseException) -> bool:
        """Wait before the next attempt after `exc`; False (at once) when the caller should give up."""
        delay = self.next_delay(exc)
        if delay is None:
            return False
        await asyncio.sleep(delay)
        return True


async def retry(
    call: Callable[[], Awaitable[T]],
    operation: str,
    *,
    attempts: int | None = 5,
    backoff: Backoff = Backoff(),
    outages_for_seconds: float | None = None,
    only_outages: bool = False,
) -> T:
    """``await call()`` until it succeeds; outages are waited out, other errors tried `attempts`
    times (once with `only_outages`), then raised."""
    tries = Attempts(
        operation,
        attempts=1 if only_outages else attempts,
        backoff=backoff,
        outages_for_seconds=outages_for_seconds,
    )
    while True:
        try:
            return await call()
        except Exception as exc:
            if not await tries.wait_after(exc):
                raise


async def supervised(operation: str, job: Callable[[], Awaitable[None]], *, attempts: int | None = 5) -> None:
    """Run a long-lived job (a consumer, a relay, a background job) and start it again when it
    ends with an error: at once after an outage's wait, and after other errors `attempts` times
    in a row before the error is raised. A job that ran a while before failing starts afresh."""
    tries = Attempts(operation, attempts=attempts)
    while True:
        started = time.monotonic()
        try:
            await job()
            return
        except Exception as exc:
            if time.monotonic() - started > 60:
                tries.succeeded()  # it worked for a minute: this failure is a new one
            if not await tries.wait_after(exc):
                raise
