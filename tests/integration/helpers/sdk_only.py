"""A virtual environment holding only the SDK's wheel and what it declares, as a third party who
installs it to check evidence would have: built from this checkout's wheels (the SDK, the verifier,
the generated protos), third-party versions pinned to uv.lock."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
WHEELS = ("medledger-protos", "medledger-verifier", "medledger-sdk")
# What the services' runtime and the dev stack bring, and a verifier must not need.
NOT_INSTALLED = (
    "aiokafka",
    "asyncpg",
    "sqlalchemy",
    "hvac",
    "opentelemetry.sdk",
    "opentelemetry.exporter",
    "pytest",
    "medledger_runtime",
    "medledger_devstack",
)


def _uv(*args: str, cwd: Path = REPO) -> None:
    uv = shutil.which("uv")
    assert uv is not None, "uv is not on PATH (make setup installs it)"
    done = subprocess.run([uv, *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"uv {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


def build(into: Path) -> Path:
    """Build the wheels and the environment under ``into``; the environment's ``medledger``."""
    dist = into / "dist"
    for package in WHEELS:
        _uv("build", "--quiet", "--wheel", "--package", package, "--out-dir", str(dist))
    constraints = into / "constraints.txt"
    _uv("export", "--quiet", "--frozen", "--no-dev", "--package", "medledger-sdk", "--no-emit-workspace",
        "--no-hashes", "--output-file", str(constraints))  # fmt: skip
    venv = into / "venv"
    _uv("venv", "--quiet", "--python", sys.executable, str(venv))
    python = venv / "bin" / "python"
    # uv caches a wheel by its name and version: refresh ours, built from this checkout just now.
    refresh = [arg for package in WHEELS for arg in ("--refresh-package", package)]
    _uv("pip", "install", "--quiet", "--python", str(python), "--find-links", str(dist), "-c", str(constraints),
        *refresh, "medledger-sdk")  # fmt: skip
    return venv / "bin" / "medledger"


def importable(medledger: Path, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` the environment of ``medledger`` can import."""
    python = medledger.parent / "python"
    probe = "import importlib.util, sys\n" + "\n".join(
        f"try:\n    found = importlib.util.find_spec({m!r}) is not None\nexcept ModuleNotFoundError:\n"
        f"    found = False\nif found:\n    print({m!r})"
        for m in modules
    )
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True)
    return done.stdout.split()
