"""``medledger reset``: delete the state folder of ``medledger up``, once nothing runs from it."""

from __future__ import annotations

import argparse
from typing import Any

from medledger_devstack.cli.state import DEFAULT_STATE_DIR, StateDir, describe_running
from medledger_sdk.cli.errors import CommandError


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "reset",
        help="delete the local state folder (databases, chain state, logs)",
        description="Delete the state folder that `medledger up` keeps, after checking nothing runs from it.",
    )
    parser.add_argument(
        "--state-dir", default=DEFAULT_STATE_DIR, help=f"the state folder (default: ./{DEFAULT_STATE_DIR})"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    reset_state(StateDir.at(args.state_dir))
    return 0


def reset_state(state: StateDir) -> None:
    """Remove `state` and print what went; raises CommandError if something still uses it."""
    if not state.path.exists():
        print(f"nothing to reset: {state.path} does not exist")
        return
    if not state.path.is_dir():
        raise CommandError(f"{state.path} is not a folder; not deleting it")
    if not state.looks_like_ours():
        raise CommandError(
            f"{state.path} does not look like a medledger state folder (no MEDLEDGER_STATE file in it); "
            "not deleting it. Delete it yourself if you are sure."
        )
    running = state.running()
    if running:
        raise CommandError(
            f"medledger is still running from {state.path}: {describe_running(running)}. "
            "Stop it first (Ctrl-C in the terminal running `medledger up`, or `medledger down`)."
        )
    removed = state.remove()
    for line in removed:
        print(f"  removed {line}")
    print(f"removed {state.path}")
