"""Generate Python protobuf and gRPC code from protos/ into libs/protos/src (not committed).

Skips the work when the .proto files have not changed since the last run, so that a second
`make setup` takes seconds.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "libs" / "protos" / "src"
GENERATED = OUT / "medledger"
STAMP = GENERATED / ".protos.sha256"
BIN = Path(sys.executable).parent


def digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(PROTOS)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def main() -> int:
    files = sorted(PROTOS.rglob("*.proto"))
    want = digest(files)
    if STAMP.exists() and STAMP.read_text() == want:
        print(f"protos: {len(files)} files unchanged, generated code is current")
        return 0
    shutil.rmtree(GENERATED, ignore_errors=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        # Typed stubs (mypy-protobuf) so that services type-check against the protos.
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        *[str(f.relative_to(PROTOS)) for f in files],
    ]
    code = protoc.main(args)
    if code != 0:
        print("protos: protoc failed", file=sys.stderr)
        return int(code)
    STAMP.write_text(want)
    print(f"protos: generated Python code for {len(files)} files into {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
