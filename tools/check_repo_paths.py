"""Refuse code that reads outside the repository: `make lint` runs this over libs/, services/,
tests/, bench/ and tools/.

A fresh clone has nothing beside it, so a path built from the checkout's own location must stay
inside the checkout. Python files are read as syntax trees: every path built from ``__file__``
(``Path(__file__)``, ``.resolve()``, ``.parent``, ``.parents[k]``, ``/ "name"``), from
``repo_root()``, or from a module-level name bound to one of those, is worked out and must stay
inside the repository; ``Path(...)``/``open(...)`` of a literal that climbs out with ``..`` is
refused too. Shell scripts: ``$(dirname "$0")/..`` chains are worked out the same way. Node
scripts: ``path.join(__dirname, ...)`` and ``path.resolve(__dirname, ...)`` with literal parts.

Usage: ``python tools/check_repo_paths.py [FOLDER ...]``; prints each offending line, exits 1 if
there is one.
"""

from __future__ import annotations

import ast
import posixpath
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

FOLDERS = ("libs", "services", "tests", "bench", "tools")
SKIP_PARTS = {"node_modules", ".venv", "__pycache__", ".medledger"}
_GENERATED = ("libs/protos/src/medledger",)


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    path: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: leaves the repository: {self.path}"


def _inside(path: PurePosixPath) -> bool:
    """Paths here are relative to the repository root, normalised: outside starts with '..'."""
    return not (path.parts and path.parts[0] == "..")


def _join(base: PurePosixPath, *parts: str) -> PurePosixPath | None:
    joined = posixpath.normpath(posixpath.join(str(base), *parts))
    if posixpath.isabs(joined):
        return None  # an absolute literal: not built from the checkout's place
    return PurePosixPath(joined)


class _PythonPaths(ast.NodeVisitor):
    """Works out the repository-relative value of path expressions rooted at the file itself."""

    def __init__(self, rel_file: str) -> None:
        self.file = rel_file
        self.names: dict[str, PurePosixPath] = {}
        self.findings: list[Finding] = []

    def value(self, node: ast.AST) -> PurePosixPath | None:
        if isinstance(node, ast.Name):
            if node.id == "__file__":
                return PurePosixPath(self.file)
            return self.names.get(node.id)
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if name == "repo_root" and not node.args:
                return PurePosixPath(".")
            if name in ("Path", "PurePath", "PosixPath") and len(node.args) == 1:
                return self.value(node.args[0])
            if isinstance(func, ast.Attribute) and func.attr in ("resolve", "absolute", "expanduser"):
                return self.value(func.value)
            return None
        if isinstance(node, ast.Attribute) and node.attr == "parent":
            base = self.value(node.value)
            return None if base is None else _join(base, "..")
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parents":
            base = self.value(node.value.value)
            index = node.slice
            if base is not None and isinstance(index, ast.Constant) and isinstance(index.value, int):
                return _join(base, *[".."] * (index.value + 1))
            return None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            base = self.value(node.left)
            right = node.right
            if base is not None and isinstance(right, ast.Constant) and isinstance(right.value, str):
                return _join(base, right.value)
            return None
        return None

    def _check(self, node: ast.AST) -> None:
        path = self.value(node)
        if path is not None and not _inside(path):
            self.findings.append(Finding(self.file, getattr(node, "lineno", 0), str(path)))

    def visit_Assign(self, node: ast.Assign) -> None:
        path = self.value(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name) and path is not None:
                self.names[target.id] = path
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr == "parent":
            self._check(node)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.value, ast.Attribute) and node.value.attr == "parents":
            self._check(node)
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if isinstance(node.op, ast.Div):
            self._check(node)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name in ("Path", "open") and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                norm = posixpath.normpath(first.value)
                if norm == ".." or norm.startswith("../"):
                    self.findings.append(Finding(self.file, node.lineno, first.value))
        self.generic_visit(node)


def check_python(rel_file: str, source: str) -> list[Finding]:
    visitor = _PythonPaths(rel_file)
    visitor.visit(ast.parse(source, rel_file))
    # One expression can be reported at several of its sub-expressions: keep one per line.
    seen: dict[int, Finding] = {}
    for finding in visitor.findings:
        seen.setdefault(finding.line, finding)
    return sorted(seen.values(), key=lambda f: f.line)


_SHELL = re.compile(r"\$\(dirname \"?\$(?:0|\{BASH_SOURCE\[0\]\})\"?\)((?:/[^\s\"')$;]*)*)")
_NODE = re.compile(r"path\.(?:join|resolve)\(\s*__dirname\s*((?:,\s*[\"'][^\"']*[\"']\s*)*)[,)]")


def check_text(rel_file: str, source: str, pattern: re.Pattern[str]) -> list[Finding]:
    out = []
    here = PurePosixPath(rel_file).parent
    for number, line in enumerate(source.splitlines(), start=1):
        for match in pattern.finditer(line):
            if pattern is _SHELL:
                parts = [p for p in match.group(1).split("/") if p]
            else:
                parts = re.findall(r"[\"']([^\"']*)[\"']", match.group(1))
            path = _join(here, *parts)
            if path is not None and not _inside(path):
                out.append(Finding(rel_file, number, str(path)))
    return out


def check_file(rel_file: str, source: str) -> list[Finding]:
    if rel_file.endswith(".py"):
        return check_python(rel_file, source)
    if rel_file.endswith(".sh"):
        return check_text(rel_file, source, _SHELL)
    if rel_file.endswith((".js", ".cjs", ".mjs")):
        return check_text(rel_file, source, _NODE)
    return []


def files(root: str, folders: Iterable[str]) -> Iterator[str]:
    base = Path(root)
    for folder in folders:
        for path in sorted((base / folder).rglob("*")):
            rel = path.relative_to(base).as_posix()
            if not path.is_file() or SKIP_PARTS & set(path.parts) or rel.startswith(_GENERATED):
                continue
            if path.suffix in (".py", ".sh", ".js", ".cjs", ".mjs"):
                yield rel


def main(argv: list[str]) -> int:
    root = str(Path(__file__).resolve().parents[1])
    findings = []
    for rel in files(root, argv or FOLDERS):
        findings += check_file(rel, (Path(root) / rel).read_text(encoding="utf-8"))
    for finding in findings:
        print(finding)
    if findings:
        print(f"check_repo_paths: {len(findings)} path(s) leave the repository; a fresh clone has nothing beside it")
        return 1
    print(f"check_repo_paths: no path leaves the repository ({', '.join(argv or FOLDERS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
