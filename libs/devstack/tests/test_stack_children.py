"""A stack stops the children it started, and only those: run inside a test session, the
session's own broker and chain are children of the same process. (`stop_all` once stopped every
child of the process, and so the session's Anvil, failing every later test that needed it.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

from medledger_devstack.cli.state import StateDir
from medledger_devstack.cli.up import Ports, Stack, _own_children


def test_stray_children_are_those_that_came_after_the_stack_began(tmp_path: Path) -> None:
    before = subprocess.Popen(["sleep", "30"])  # a test session's own process, say
    stack = Stack(StateDir.at(tmp_path), Ports(1, 2, 3, 4))
    stack._children_before = set(_own_children())  # what start() notes first
    stray = subprocess.Popen(["sleep", "30"])  # spawned by the stack and lost track of
    try:
        stack._stop_stray_children()
        assert stray.wait(timeout=10) is not None
        assert before.poll() is None, "a child from before the stack was stopped"
    finally:
        for p in (before, stray):
            p.kill()
            p.wait()
