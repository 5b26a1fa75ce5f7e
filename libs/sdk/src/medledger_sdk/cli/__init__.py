"""The ``medledger`` command.

Subcommands come from the Python entry point group ``medledger.commands``: each entry point is a
callable ``register(subparsers)`` that adds its subparser and sets ``func`` (taking the parsed
``argparse.Namespace`` and returning an exit code). The SDK registers ``verify`` there itself; the
dev stack adds ``up``, ``down``, ``demo``, ``status`` and ``reset``, and audit adds ``audit``, the
same way, without this module knowing about them.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

from medledger_sdk.cli.errors import CommandError

ENTRY_POINT_GROUP = "medledger.commands"

Register = Callable[[Any], None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medledger",
        description="Verify medledger's evidence; with the dev stack installed, run and inspect a local stack.",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    seen: set[str] = set()
    # Sorted so that help output and conflicts resolve the same way on every machine.
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        if ep.name in seen:
            _warn(f"command '{ep.name}' is registered twice; ignoring the one from {ep.value}")
            continue
        try:
            register: Register = ep.load()
            register(subparsers)
        except Exception as exc:
            # A broken plugin must not take the other commands down with it.
            _warn(f"command '{ep.name}' could not be loaded from {ep.value}: {type(exc).__name__}: {exc}")
            continue
        seen.add(ep.name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Progress lines must reach a pipe (tests, `tee`) as they happen, not when a buffer fills.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except CommandError as exc:
        print(f"medledger: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("medledger: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("MEDLEDGER_DEBUG"):
            traceback.print_exc()
        else:
            print(
                f"medledger: unexpected error: {type(exc).__name__}: {exc}\n"
                "(set MEDLEDGER_DEBUG=1 to see the full traceback)",
                file=sys.stderr,
            )
        return 1


def _warn(message: str) -> None:
    print(f"medledger: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
