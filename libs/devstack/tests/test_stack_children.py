"""A stack stops the children it started, and only those: run inside a test session, the
session's own broker and chain are children of the same process. (`stop_all` once stopped every
child of the process, and so the session's Anvil, failing every later test that needed it.)
`Stack.stop_all` stops the children that appeared since `Stack.start` noted its own; that is
`stop_children_since`."""

from __future__ import annotations

import subprocess

from medledger_devstack.stack.processes import own_children, stop_children_since


def test_stray_children_are_those_that_came_after_the_stack_began() -> None:
    before = subprocess.Popen(["sleep", "30"])  # a test session's own process, say
    children_before = set(own_children())  # what Stack.start() notes first
    stray = subprocess.Popen(["sleep", "30"])  # spawned by the stack and lost track of
    try:
        stop_children_since(children_before)
        assert stray.wait(timeout=10) is not None
        assert before.poll() is None, "a child from before the stack was stopped"
    finally:
        for p in (before, stray):
            p.kill()
            p.wait()
