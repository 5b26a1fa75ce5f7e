"""How the story waits on a stack that is eventually consistent: a call's status, a condition
polled until it holds, a call retried until a service has learned of a new principal."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from medledger_devstack.demo.narrator import Narrator
from medledger_sdk.calls import RpcError

_T = TypeVar("_T")

# Defaults of `medledger up`: checkpoints every 5 s, anchors every 10 s; two minutes is generous.
ANCHOR_WAIT_SECONDS = 120.0
# Identity announces new principals by event; consent and audit learn them within a moment.
LEARN_WAIT_SECONDS = 30.0
POLL_SECONDS = 0.5


async def code_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    """The status a call ended with (OK if it succeeded) and its message."""
    try:
        await call
    except RpcError as exc:
        return exc.code(), exc.message
    return grpc.StatusCode.OK, ""


async def eventually(
    attempt: Callable[[], Awaitable[_T | None]],
    what: str,
    within: float,
    narrator: Narrator | None = None,
    every: float = POLL_SECONDS,
) -> _T:
    """``attempt()`` until it returns something, saying every 5 s how long it has waited."""
    started = time.monotonic()
    said = started
    while True:
        found = await attempt()
        if found is not None:
            return found
        now = time.monotonic()
        if now - started > within:
            raise TimeoutError(f"{what}: not within {within:.0f} s")
        if narrator is not None and now - said >= 5:
            narrator.say(f"… still waiting for {what} ({now - started:.0f} s)")
            said = now
        await asyncio.sleep(every)


async def until_known(call: Callable[[], Awaitable[_T]], within: float = LEARN_WAIT_SECONDS) -> _T:
    """Consent learns new principals from identity's events, a moment after registration; a call
    naming one is retried (the same request, so the same request_id) until it has."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except RpcError as exc:
            unknown = exc.code() == grpc.StatusCode.INVALID_ARGUMENT and any(
                "not a registered" in v.description for v in exc.field_violations
            )
            if not unknown or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)
