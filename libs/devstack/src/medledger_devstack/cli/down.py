"""``medledger down``: stop what a ``medledger up`` started, found through its state folder.

The usual way to stop ``up`` is Ctrl-C in its terminal. This is for the other cases: ``up``
runs in another terminal or in the background, or it was killed (SIGKILL, a closed terminal)
and left Kafka, OpenBao, Anvil and the services running, so that the next ``up`` refuses to
start. ``up.pid`` names every process, with its start time, so a pid the kernel has given to an
unrelated process since is never signalled.

If ``up`` itself still runs it is asked to stop (SIGTERM), as Ctrl-C would, and given time to
stop its children in order. What is left is stopped here in the same order: the FHIR gateway,
the services (SIGTERM, then SIGKILL after their grace), then OpenBao, Anvil (SIGCONT first, in
case it was stopped) and Kafka.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from typing import Any

from medledger_devstack.cli.state import DEFAULT_STATE_DIR, RecordedProcess, StateDir
from medledger_devstack.stack.layout import GATEWAYS

SUPERVISOR = "medledger up"
# `up` gives its services 15 s and each piece of infrastructure 10 s: wait that long for it.
SUPERVISOR_STOP_SECONDS = 50.0
SERVICE_STOP_SECONDS = 15.0
INFRA_STOP_SECONDS = 10.0
# Stopped last, in this order: everything else depends on them.
INFRA_ORDER = ("openbao", "anvil", "kafka")


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "down",
        help="stop the stack of `medledger up` from its state folder, also what a killed `up` left running",
        description=(
            "Stop the processes a `medledger up` started (its pid file in the state folder names them): "
            "the `up` itself if it runs, else the services, OpenBao, Anvil and Kafka it left behind."
        ),
    )
    parser.add_argument(
        "--state-dir", default=DEFAULT_STATE_DIR, help=f"the state folder (default: ./{DEFAULT_STATE_DIR})"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    state = StateDir.at(args.state_dir)
    running = state.running()
    if not running:
        state.clear_pids()
        print(f"nothing runs from {state.path}")
        return 0
    supervisor = next((p for p in running if p.name == SUPERVISOR), None)
    if supervisor is not None:
        print(f"asking `medledger up` (pid {supervisor.pid}) to stop, as Ctrl-C would ...")
        _signal(supervisor, signal.SIGTERM)
        if _wait_gone([supervisor], SUPERVISOR_STOP_SECONDS):
            print(f"`medledger up` (pid {supervisor.pid}) stopped")
        else:
            print(
                f"`medledger up` (pid {supervisor.pid}) did not stop within {SUPERVISOR_STOP_SECONDS:.0f} s; killing it"
            )
            _signal(supervisor, signal.SIGKILL)
            _wait_gone([supervisor], 5)
    left = [p for p in state.running() if p.name != SUPERVISOR]
    if supervisor is None or left:
        print(
            f"stopping what `medledger up` left running: {', '.join(f'{p.name} (pid {p.pid})' for p in left)}"
            if left
            else "nothing else was left running"
        )
    # The gateway before the services: its calls in flight need them to finish.
    gateways = [p for p in left if p.name in GATEWAYS]
    services = [p for p in left if p.name not in INFRA_ORDER and p.name not in GATEWAYS]
    for tier in (gateways, services):
        for proc in tier:  # all at once, so their grace periods overlap
            _signal(proc, signal.SIGTERM)
        _stop_each(tier, SERVICE_STOP_SECONDS)
    for name in INFRA_ORDER:
        for proc in (p for p in left if p.name == name):
            if name == "anvil":
                _signal(proc, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            _signal(proc, signal.SIGTERM)
            _stop_each([proc], INFRA_STOP_SECONDS)
    still = state.running()
    if still:
        print(f"could not stop: {', '.join(f'{p.name} (pid {p.pid})' for p in still)}")
        return 1
    state.clear_pids()
    print(f"nothing runs from {state.path} any more")
    return 0


def _stop_each(processes: list[RecordedProcess], timeout: float) -> None:
    """Wait for each to exit after its SIGTERM, SIGKILL those that do not, and say which."""
    gone = _wait_gone(processes, timeout)
    for proc in processes:
        if gone or not proc.alive():
            print(f"stopped {proc.name} (pid {proc.pid})")
        else:
            _signal(proc, signal.SIGKILL)
            _wait_gone([proc], 5)
            print(f"killed {proc.name} (pid {proc.pid}): it did not stop within {timeout:.0f} s of SIGTERM")


def _wait_gone(processes: list[RecordedProcess], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in processes:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(proc.pid, os.WNOHANG)  # reaps it if it is ours (in tests)
        if not any(p.alive() for p in processes):
            return True
        time.sleep(0.1)
    return not any(p.alive() for p in processes)


def _signal(proc: RecordedProcess, signum: int) -> None:
    """Signal `proc` only if it is still the process `up` recorded (same start time)."""
    if proc.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signum)
