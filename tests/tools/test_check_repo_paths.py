"""tools/check_repo_paths.py, the lint rule that keeps every path inside the repository: it finds
the ways tests used to leave it, lets the ways that stay inside pass, and the tree is clean."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "check_repo_paths.py"
_spec = importlib.util.spec_from_file_location("check_repo_paths", TOOL)
assert _spec is not None and _spec.loader is not None
check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = check  # dataclasses look their module up
_spec.loader.exec_module(check)


@pytest.mark.parametrize(
    ("file", "source"),
    [
        # The lines that made a fresh clone fail (issue 19), each as it was written.
        ("services/records/tests/test_domain.py", 'X = Path(__file__).resolve().parents[3].parent / "shared"\n'),
        ("tests/integration/test_records.py", 'X = Path(__file__).resolve().parents[2].parent / "shared" / "data"\n'),
        ("tests/integration/test_access.py", 'REPO = Path(__file__).resolve().parents[2]\nX = REPO.parent / "s"\n'),
        ("tests/x.py", 'X = Path(__file__).parents[1] / ".." / "shared"\n'),
        ("tests/x.py", "X = localstack.repo_root().parent\n"),
        ("bench/x.py", 'data = open("../shared/data/synthea/a.json")\n'),
        ("bench/x.py", 'data = Path("../../elsewhere")\n'),
    ],
)
def test_a_python_path_that_leaves_the_repository_is_found(file: str, source: str) -> None:
    findings = check.check_file(file, source)
    assert [f.line for f in findings] == [source.count("\n")], findings


@pytest.mark.parametrize(
    ("file", "source"),
    [
        ("tests/integration/test_identity.py", "REPO = Path(__file__).resolve().parents[2]\n"),
        ("tests/deploy/x.py", 'ROOT = Path(__file__).resolve().parents[2]\nY = ROOT / "deploy" / "helm"\n'),
        ("tests/chaos/chaos.py", 'sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))\n'),
        ("libs/protos/src/medledger_protos/__init__.py", "G = Path(__file__).resolve().parent.parent\n"),
        ("libs/x.py", "log_path.parent.mkdir(parents=True)\n"),  # not built from the file's place
        ("tests/x.py", 'HOSTILE = ("../../etc/passwd",)\n'),  # a string, not a path that is read
        ("tests/x.py", 'p = Path("/tmp/x") / ".." / "y"\n'),  # absolute: not the checkout's neighbours
    ],
)
def test_a_path_that_stays_inside_passes(file: str, source: str) -> None:
    assert check.check_file(file, source) == []


def test_shell_and_node_paths_are_worked_out_from_the_script() -> None:
    assert check.check_file("tools/setup.sh", 'cd "$(dirname "$0")/.."\n') == []
    [found] = check.check_file("tools/setup.sh", 'ls "$(dirname "$0")/../../shared"\n')
    assert found.path == "../shared"
    assert check.check_file("tools/c.js", 'const root = path.join(__dirname, "..", "contracts");\n') == []
    [found] = check.check_file("tools/c.js", 'const s = path.resolve(__dirname, "..", "..", "shared");\n')
    assert found.path == "../shared"


def test_the_repository_is_clean_and_lint_runs_the_check() -> None:
    done = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout
    assert "no path leaves the repository" in done.stdout
    assert "tools/check_repo_paths.py" in (TOOL.parents[1] / "Makefile").read_text()
