"""The one retry helper, alone: outages waited out, other errors tried a bounded number of times,
waits that grow with jitter to a cap, every retry counted, and cancellation never swallowed."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.errors import KafkaConnectionError
from prometheus_client import REGISTRY

from medledger_runtime.errors import Unavailable
from medledger_runtime.retry import Attempts, Backoff, retry, supervised

QUICK = Backoff(first_seconds=0.001, max_seconds=0.004)


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_waits_grow_with_jitter_to_the_cap() -> None:
    backoff = Backoff(first_seconds=0.1, max_seconds=1.0)
    for failures, step in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (40, 1.0), (5000, 1.0)):
        delays = [backoff.delay(failures) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in delays), (failures, min(delays), max(delays))
        assert len(set(delays)) > 100  # jittered: replicas that failed together spread out


async def test_an_outage_is_waited_out_however_many_times_it_fails() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls <= 12:  # more than the attempts allowed for other errors
            raise KafkaConnectionError("no broker")
        return "sent"

    before = _count("medledger_retries_total", operation="t-outage", dependency="kafka", error="KafkaConnectionError")
    assert await retry(flaky, "t-outage", attempts=3, backoff=QUICK) == "sent"
    assert calls == 13
    after = _count("medledger_retries_total", operation="t-outage", dependency="kafka", error="KafkaConnectionError")
    assert after - before == 12


async def test_an_error_that_is_not_an_outage_is_tried_a_bounded_number_of_times() -> None:
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        await retry(broken, "t-bug", attempts=4, backoff=QUICK)
    assert calls == 4
    assert _count("medledger_retries_total", operation="t-bug", dependency="none", error="ValueError") == 3
    assert _count("medledger_retries_exhausted_total", operation="t-bug", error="ValueError") == 1

    calls = 0
    with pytest.raises(ValueError):
        await retry(broken, "t-bug-once", only_outages=True, backoff=QUICK)
    assert calls == 1


async def test_outages_interleaved_with_faults_do_not_use_up_the_attempts() -> None:
    errors: list[Exception] = [ValueError("x"), Unavailable("sealed"), Unavailable("sealed"), ValueError("y")]

    async def mixed() -> str:
        if errors:
            raise errors.pop(0)
        return "done"

    assert await retry(mixed, "t-mixed", attempts=3, backoff=QUICK) == "done"


async def test_an_outage_can_be_given_a_time_limit() -> None:
    async def down() -> None:
        raise ConnectionRefusedError(111, "refused")

    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        await retry(down, "t-limit", outages_for_seconds=0.2, backoff=Backoff(0.01, 0.05))
    assert 0.2 <= time.monotonic() - started < 5


async def test_cancellation_ends_a_wait_at_once_and_is_never_retried() -> None:
    started = asyncio.Event()

    async def down() -> None:
        started.set()
        raise ConnectionRefusedError(111, "refused")

    task = asyncio.create_task(retry(down, "t-cancel", backoff=Backoff(30.0, 30.0)))
    await started.wait()
    await asyncio.sleep(0.01)  # now in its 15-30 s wait
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1)

    calls = 0

    async def cancelled() -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await retry(cancelled, "t-cancelled", backoff=QUICK)
    assert calls == 1


async def test_attempts_start_afresh_after_a_success() -> None:
    tries = Attempts("t-reset", attempts=2, backoff=QUICK)
    assert tries.next_delay(ValueError("one")) is not None
    tries.succeeded()
    assert tries.next_delay(ValueError("one again")) is not None  # not the second in a row
    assert tries.next_delay(ValueError("two")) is None


async def test_a_supervised_job_is_restarted_after_an_outage_and_given_up_after_repeated_bugs() -> None:
    runs = 0

    async def reconcile() -> None:
        nonlocal runs
        runs += 1
        if runs < 4:
            raise ConnectionRefusedError(111, "Connect call failed")

    await asyncio.wait_for(supervised("t-reconcile", reconcile, attempts=2), 10)
    assert runs == 4

    runs = 0

    async def buggy() -> None:
        nonlocal runs
        runs += 1
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        await asyncio.wait_for(supervised("t-buggy", buggy, attempts=3), 10)
    assert runs == 3
