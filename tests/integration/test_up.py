"""``medledger up`` as a user runs it: a subprocess that starts the real stack (Tansu, Anvil, the
five services and the FHIR gateway), serves gRPC with reflection and FHIR R4 REST, and leaves no
process behind when stopped; with it running, ``medledger demo --out`` writes evidence that
``medledger verify`` and a verifier without any medledger code accept. And the same story
through the SDK against the stack on PostgreSQL, with what it leaves in the databases checked."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType

import aiohttp
import grpc
import pytest
from medledger.audit.v1 import audit_service_pb2, audit_service_pb2_grpc
from medledger.identity.v1 import identity_service_pb2 as identity_pb
from medledger.records.v1 import records_service_pb2, records_service_pb2_grpc
from medledger.records.v1 import records_service_pb2 as records_pb
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_devstack import contracts, localstack
from medledger_devstack.cli.demo import free_ports
from medledger_devstack.cli.state import ADMIN_PRINCIPAL, RecordedProcess, StateDir, read_chain_key
from medledger_devstack.demo.evidence import OUT_FILES
from medledger_devstack.demo.narrator import Narrator
from medledger_devstack.demo.story import StoryConfig, run_story
from medledger_devstack.stack import chain_side
from medledger_devstack.testing import Postgres
from medledger_sdk.client import Endpoints, Medledger
from medledger_verifier import chain, commitments, notes
from medledger_verifier.proof_files import TrustPolicy

GRPCURL = Path(sys.executable).parent / "grpcurl"
SERVICES = ("identity", "consent", "records", "anchoring", "audit")
# Stateless, after the services in port order; its own processes all the same.
GATEWAYS = ("fhir",)


class Ports:
    """A whole stack's ports, chosen as the demo chooses its own (`free_ports`): below the
    kernel's ephemeral range, every port `up` serves checked free, the JWKS and tile ports of the
    metrics block included. Ports the OS handed out had met both failures in CI: a gRPC block on
    the tiles' port, and a service starting late whose port an outgoing connection had taken."""

    def __init__(self) -> None:
        chosen = free_ports()
        self.kafka, self.anvil = chosen.kafka, chosen.anvil
        self.grpc_base, self.metrics_base = chosen.grpc_base, chosen.metrics_base
        self.openbao = chosen.openbao
        self.fhir = chosen.fhir

    def grpc(self, service: str) -> int:
        return self.grpc_base + (*SERVICES, *GATEWAYS).index(service)

    def traces(self, state_dir: Path) -> tuple[str, str]:
        """Strings in the command line or environment of every process `up` starts: the state
        folder (services, Anvil, `up` itself) and the broker's listener URL (Tansu)."""
        return str(state_dir), f"tcp://{localstack.HOST}:{self.kafka}"

    def args(self) -> list[str]:
        return [
            "--kafka-port",
            str(self.kafka),
            "--anvil-port",
            str(self.anvil),
            "--grpc-port-base",
            str(self.grpc_base),
            "--metrics-port-base",
            str(self.metrics_base),
            "--openbao-port",
            str(self.openbao),
            "--fhir-port",
            str(self.fhir),
        ]


async def _medledger(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "medledger_sdk.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def _run(*args: str, within: float = 30) -> tuple[int, str]:
    proc = await _medledger(*args)
    out, _ = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def _run_sdk_only(medledger: Path, *args: str, within: float = 30) -> tuple[int, str]:
    """``medledger`` of the environment that holds only the SDK's wheel (``sdk_only``)."""
    proc = await asyncio.create_subprocess_exec(
        str(medledger), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def _kill_if_running(up: asyncio.subprocess.Process, state_dir: Path) -> None:
    """After a failed test: kill `up`, then `medledger down` stops what it left running, so that
    no stack outlives its test (and loads the machine for the ones after)."""
    if up.returncode is None:
        up.kill()
        await up.wait()
        await _run("down", "--state-dir", str(state_dir), within=60)


async def _read_until(proc: asyncio.subprocess.Process, marker: str, output: list[str], within: float) -> None:
    """Collect output lines until one starts with `marker`; fail with the output so far."""
    assert proc.stdout is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            raw = await asyncio.wait_for(proc.stdout.readline(), max(0.1, deadline - loop.time()))
        except TimeoutError:
            raise AssertionError(f"no {marker!r} line within {within}s:\n{''.join(output)}") from None
        if not raw:
            raise AssertionError(f"medledger up exited before {marker!r}:\n{''.join(output)}")
        line = raw.decode()
        output.append(line)
        if line.startswith(marker):
            return


def _processes_mentioning(*texts: str) -> list[str]:
    """Live processes whose command line or environment contains one of `texts` (Linux /proc)."""
    needles = [t.encode() for t in texts]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if any(n in cmdline or n in environ for n in needles):
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"pid {entry.name}: {command}")
    return found


async def _grpcurl_list(port: int) -> str:
    proc = await asyncio.create_subprocess_exec(
        str(GRPCURL),
        "-plaintext",
        f"{localstack.HOST}:{port}",
        "list",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()
    return out.decode()


ORIGIN = "medledger.local/audit"


async def _check_chain_side(state_dir: Path, ports: Ports, printed: str) -> dict[str, object]:
    """What `up` set up on the chain, checked against the chain and against audit itself."""
    from eth_account import Account

    recorded = json.loads((state_dir / "chain.json").read_text())
    deployment = contracts.Deployment.from_json(recorded)
    assert recorded["rpc_url"] == f"http://{localstack.HOST}:{ports.anvil}"
    key_file = state_dir / "secrets" / "anchorer.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert Account.from_key(read_chain_key(key_file)).address == deployment.anchorer
    assert deployment.anchor_registry in printed and deployment.consent_registry in printed
    assert "trust-policy.json" in printed

    async with grpc.aio.insecure_channel(f"{localstack.HOST}:{ports.grpc('audit')}") as channel:
        served = await audit_service_pb2_grpc.AuditServiceStub(channel).GetVerifierKeys(
            audit_service_pb2.GetVerifierKeysRequest(), timeout=10
        )
    (p256,) = [
        v for v in map(notes.NoteVerifier.parse, served.verifier_keys) if v.signature_type == notes.SIGNATURE_ECDSA
    ]
    async with grpc.aio.insecure_channel(f"{localstack.HOST}:{ports.grpc('records')}") as channel:
        certificate_key = await records_service_pb2_grpc.RecordsServiceStub(channel).GetErasureVerifierKey(
            records_service_pb2.GetErasureVerifierKeyRequest(), timeout=10
        )
    policy = TrustPolicy.read(state_dir / "trust-policy.json")
    assert policy == TrustPolicy(
        ORIGIN,
        tuple(served.verifier_keys),
        deployment.chain_id,
        deployment.anchor_registry,
        1,
        erasure_certificate_keys=(certificate_key.verifier_key,),
        consent_registry=deployment.consent_registry,
    )

    w3 = chain.connect(recorded["rpc_url"])
    try:
        assert deployment.chain_id == await w3.eth.chain_id
        assert deployment.owner == (await w3.eth.accounts)[0]
        assert await w3.eth.get_code(deployment.anchor_registry)
        assert await w3.eth.get_code(deployment.consent_registry)
        anchors = chain.contract(w3, chain.ANCHOR_REGISTRY, deployment.anchor_registry)
        consents = chain.contract(w3, chain.CONSENT_REGISTRY, deployment.consent_registry)
        assert tuple(await anchors.functions.logKey(ORIGIN).call()) == contracts.p256_xy(p256.public_key)
        assert await anchors.functions.isAnchorer(deployment.anchorer).call()
        assert not await anchors.functions.isAnchorer(deployment.owner).call()
        assert await consents.functions.isWriter(deployment.anchorer).call()
        assert await w3.eth.get_balance(deployment.anchorer) >= chain_side.ANCHORER_LOW_WEI
    finally:
        await w3.provider.disconnect()
    return dict(recorded)


async def _check_fhir_gateway(state_dir: Path, ports: Ports, printed: str) -> None:
    """The gateway answers FHIR at the base URL `up` printed and wrote to stack.json: its
    CapabilityStatement, public, as application/fhir+json."""
    base = f"http://{localstack.HOST}:{ports.fhir}/fhir/R4"
    assert f"FHIR R4 base     {base}" in printed, printed
    stack = json.loads((state_dir / "stack.json").read_text())
    assert stack["fhir"]["base_url"] == base, stack
    assert stack["fhir"]["grpc"] == f"{localstack.HOST}:{ports.grpc('fhir')}", stack
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metadata") as reply:
        assert reply.status == 200, await reply.text()
        assert reply.content_type == "application/fhir+json"
        capability = await reply.json(content_type=None)
    assert capability["resourceType"] == "CapabilityStatement", capability
    assert capability["fhirVersion"].startswith("4.0"), capability
    # It points SMART clients at identity's token endpoint, as `up` configured it.
    token_url = f"http://{localstack.HOST}:{ports.metrics_base + 10}/oauth2/token"
    assert token_url in json.dumps(capability), capability


async def _check_reuse(state_dir: Path, recorded: dict[str, object], capsys: pytest.CaptureFixture[str]) -> None:
    """The next `up`'s chain step on the chain state Anvil dumped: the same contracts, nothing
    deployed. (The step itself, on a fresh Anvil, rather than a second full `up`: seconds.)"""
    port = localstack.free_port()
    anvil = localstack.start_anvil(port, state_dir / "anvil-state.json", state_dir / "logs" / "anvil-reuse.log")
    try:
        capsys.readouterr()
        again = await chain_side.set_up_contracts(StateDir.at(state_dir), f"http://{localstack.HOST}:{port}")
        said = capsys.readouterr().out
    finally:
        anvil.stop()
    assert "reusing the contracts" in said, said
    assert "deployed AnchorRegistry" not in said, said
    assert again.as_json() == {k: v for k, v in recorded.items() if k != "rpc_url"}
    assert json.loads((state_dir / "chain.json").read_text())["anchor_registry"] == recorded["anchor_registry"]


@pytest.mark.timeout(300)
async def test_up_serves_every_service_and_stops_everything_it_started(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --keys local (a keyring file per service): the story on PostgreSQL and the restart
    test run on the default, OpenBao."""
    state_dir = tmp_path / "state"
    ports = Ports()
    up = await _medledger("up", "--state-dir", str(state_dir), *ports.args(), "--keys", "local")
    output: list[str] = []
    try:
        await _read_until(up, "ready", output, within=60)

        recorded = json.loads((state_dir / "up.pid").read_text())
        children = [RecordedProcess(**p) for p in recorded["processes"]]
        assert sorted(p.name for p in children) == sorted(["kafka", "anvil", *SERVICES, *GATEWAYS])
        assert all(p.alive() for p in children)
        # The leftover check below must see these processes while they run, or it proves nothing.
        assert len(_processes_mentioning(*ports.traces(state_dir))) >= 1 + len(children)
        # The printed table names the same pids as the pid file.
        printed = "".join(output)
        for p in children:
            assert str(p.pid) in printed

        listings = await asyncio.gather(*(_grpcurl_list(ports.grpc(s)) for s in SERVICES))
        for service, listing in zip(SERVICES, listings, strict=True):
            assert "grpc.health.v1.Health" in listing.splitlines(), listing
            assert f"medledger.{service}.v1.{service.capitalize()}Service" in listing.splitlines(), listing

        # `medledger status` finds every service serving, and anchoring's account and progress.
        status_ports = ["--grpc-port-base", str(ports.grpc_base), "--metrics-port-base", str(ports.metrics_base)]
        code, out = await _run("status", *status_ports)
        assert code == 0, out
        assert "5 of 5 services serving, the FHIR gateway serving" in out and "anchorer balance" in out, out
        assert "identity   SERVING" in out and "outbox backlog" in out, out
        assert "fhir       SERVING\n" in out, out  # its metrics answer, with nothing to report

        await _check_fhir_gateway(state_dir, ports, printed)

        # The chain side: both registries deployed, the anchorer named and funded, the log's
        # P-256 key registered, the trust policy written.
        recorded = await _check_chain_side(state_dir, ports, printed)

        # The whole story against this stack, and its evidence checked three ways.
        await _check_demo(state_dir, ports, tmp_path / "demo")

        # The state folder is in use: reset must refuse and delete nothing.
        code, out = await _run("reset", "--state-dir", str(state_dir))
        assert code == 1
        assert "still running" in out
        assert (state_dir / "identity.db").exists()

        up.send_signal(signal.SIGTERM)
        assert up.stdout is not None
        rest, _ = await asyncio.wait_for(up.communicate(), 45)
        output.append(rest.decode())
    finally:
        await _kill_if_running(up, state_dir)

    log = "".join(output)
    assert up.returncode == 0, log
    for name in ("kafka", "anvil", *SERVICES, *GATEWAYS):
        assert f"stopped {name} (pid" in log, log
    # The gateway stops before the services it calls.
    assert log.index("stopped fhir (pid") < min(log.index(f"stopped {s} (pid") for s in SERVICES), log
    leftovers = [p for p in children if p.alive()]
    assert not leftovers, f"still running after `up` stopped: {leftovers}"
    assert not _processes_mentioning(*ports.traces(state_dir))
    assert not (state_dir / "up.pid").exists()
    assert (state_dir / "anvil-state.json").exists()  # Anvil dumped its chain on SIGTERM
    code, out = await _run("status", *status_ports)
    assert code == 1 and "0 of 5 services serving, the FHIR gateway not serving" in out, out
    assert "fhir       unreachable" in out, out
    await _check_reuse(state_dir, recorded, capsys)

    code, out = await _run("reset", "--state-dir", str(state_dir))
    assert code == 0, out
    assert "removed identity.db" in out
    assert not state_dir.exists()


@pytest.mark.timeout(60)
async def test_up_refuses_a_taken_port_and_starts_nothing(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    ports = Ports()
    taken = ports.grpc("records")
    with socket.socket() as blocker:
        blocker.bind((localstack.HOST, taken))
        blocker.listen()
        code, out = await _run("up", "--state-dir", str(state_dir), *ports.args())

    assert code == 1, out
    assert f"port {taken} (records gRPC)" in out
    assert "Nothing was started" in out
    assert not state_dir.exists()
    assert not localstack.port_in_use(ports.kafka)
    assert not localstack.port_in_use(ports.anvil)
    assert not _processes_mentioning(*ports.traces(state_dir))


# --- the story --------------------------------------------------------------------------------


def _chaos_module(name: str) -> ModuleType:
    """A module of tests/chaos (the leak scan)."""
    path = Path(__file__).parents[1] / "chaos" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"chaos_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _independent_verifier() -> ModuleType:
    """helpers/independent_verifier.py: a verifier of the demo's evidence without medledger code."""
    return _helper("independent_verifier")


def _helper(name: str) -> ModuleType:
    path = Path(__file__).parent / "helpers" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tampered(folder: Path, into: Path, name: str, old: bytes, new: bytes) -> Path:
    """A copy of the evidence with one change in one file."""
    shutil.copytree(folder, into)
    data = (into / name).read_bytes()
    assert old in data, f"{old!r} is not in {name}"
    (into / name).write_bytes(data.replace(old, new, 1))
    return into


async def _check_demo(state_dir: Path, ports: Ports, out: Path) -> None:
    """`medledger demo --out` against the running `up`; its files verify with `medledger verify`
    and with RFC 6962, Ed25519, RFC 8785 and plain JSON-RPC alone; tampered copies do not."""
    code, said = await _run(
        "demo", "--state-dir", str(state_dir), "--grpc-port-base", str(ports.grpc_base), "--out", str(out), within=150
    )
    assert code == 0, said
    assert "using the stack of `medledger up`" in said, said
    assert "verifications passed" in said and "  FAIL  " not in said, said
    assert sorted(os.listdir(out)) == sorted(OUT_FILES)
    rpc_url = f"http://{localstack.HOST}:{ports.anvil}"
    assert (out / "trust.json").read_bytes() == (state_dir / "trust-policy.json").read_bytes()
    anchor = json.loads((out / "record-anchor.json").read_text())
    assert set(anchor) >= {"chain_id", "contract_address", "tx_hash", "block_number", "origin", "tree_size", "root"}
    assert anchor["root"].startswith("0x")
    salt = (out / "record.salt").read_text().strip()
    assert len(salt) == 64 and salt == salt.lower()

    # The evidence is checked with `medledger verify` from an environment holding only the SDK's
    # wheel and what it declares: none of the services' runtime, no dev stack.
    sdk_only = _helper("sdk_only")
    sdk_medledger = await asyncio.to_thread(sdk_only.build, out.parent / "sdk-only")
    assert sdk_only.importable(sdk_medledger, sdk_only.NOT_INSTALLED) == []
    code, said = await _run_sdk_only(sdk_medledger, "--help")
    assert code == 0 and "verify" in said and " up " not in said, said

    async def verify(*args: str) -> tuple[int, str]:
        return await _run_sdk_only(sdk_medledger, "verify", *args)

    # The erasure certificate verifies offline against the trust policy; an altered one does not.
    code, said = await verify("certificate", str(out / "erasure-certificate.note"), "--trust",
                            str(out / "trust.json"))  # fmt: skip
    assert code == 0 and "VERIFIED: the erasure certificate is authentic" in said, said
    altered = _tampered(out, out.parent / "altered-certificate", "erasure-certificate.note", b"\nrecords-erased ",
                        b"\nrecords-erased 9")  # fmt: skip
    code, said = await verify("certificate", str(altered / "erasure-certificate.note"), "--trust",
                            str(out / "trust.json"))  # fmt: skip
    assert code == 1 and "NOT VERIFIED" in said, said

    trust, record = ["--trust", str(out / "trust.json"), "--rpc", rpc_url], str(out / "record.json")
    code, said = await verify(str(out / "record.tlog-proof"), *trust, "--record", record, "--salt", salt)
    assert code == 0 and "VERIFIED" in said, said
    code, said = await verify(str(out / "access.tlog-proof"), *trust)
    assert code == 0 and "VERIFIED" in said, said

    verifier = _independent_verifier()
    assert verifier.verify_folder(out, rpc_url) == []
    await _check_consent_evidence(out, rpc_url, verify, verifier)
    _check_decision_evidence(out, verifier)
    entry = (out / "access.entry").read_bytes()
    other_tx = "0x" + "ab" * 32
    proof_lines = (out / "record.tlog-proof").read_text().split("\n")
    index_line = proof_lines[1]
    index = int(index_line.removeprefix("index "))
    assert index > 0  # entries of identity's and consent's events come before the record's
    first_hash = next(line for line in proof_lines[2:] if line)  # after the header and the index
    other_hash = ("B" if first_hash[0] != "B" else "C") + first_hash[1:]
    root_line = proof_lines[proof_lines.index("") + 3]  # the checkpoint's origin, size, root
    other_root = ("B" if root_line[0] != "B" else "C") + root_line[1:]
    tampers = {
        "the record": ("record.json", b"128", b"129", "record: the record and salt do not give"),
        "the salt": ("record.salt", salt[:8].encode(), b"00000000", "record: the record and salt do not give"),
        "the index": ("record.tlog-proof", index_line.encode(), f"index {index - 1}".encode(),
                      "record: the entry is not in the checkpoint's tree"),
        "an inclusion hash": ("record.tlog-proof", first_hash.encode(), other_hash.encode(),
                              "record: the entry is not in the checkpoint's tree"),
        "the checkpoint's root": ("record.tlog-proof", root_line.encode(), other_root.encode(),
                                  "record: the checkpoint's Ed25519 signature does not verify"),
        "the disclosure": ("access.entry", b'"purpose":"PURPOSE_OF_USE_TREAT"', b'"purpose":"PURPOSE_OF_USE_HRESCH"',
                           "access: the entry is not in the checkpoint's tree"),
        "the anchoring transaction": ("record-anchor.json", anchor["tx_hash"].encode(), other_tx.encode(),
                                      "record: the anchoring transaction is not"),
    }  # fmt: skip
    assert b'"purpose":"PURPOSE_OF_USE_TREAT"' in entry
    for what, (name, old, new, expected) in tampers.items():
        copy = _tampered(out, out.parent / f"tampered-{name}-{uuid.uuid4().hex[:6]}", name, old, new)
        problems = verifier.verify_folder(copy, rpc_url)
        assert any(p.startswith(expected) for p in problems), (what, problems)
    copy = _tampered(out, out.parent / "tampered-medledger-verify", "record.json", b"128", b"129")
    code, said = await verify(str(copy / "record.tlog-proof"), *trust, "--record", str(copy / "record.json"),
                            "--salt", salt)  # fmt: skip
    assert code == 1 and "record-commitment" in said, said


def _check_decision_evidence(out: Path, verifier: ModuleType) -> None:
    """The decision that let the doctor read, replayed from decision.json with RFC 9162, C2SP and
    the README's rule alone; with a version taken out of what it considered, the entry is no longer
    the logged one; with the log's version entry left out, the version considered is unknown."""
    assert verifier.verify_decision(out) == []
    evidence = json.loads((out / "decision.json").read_text())
    decision = json.loads(evidence["decision"]["entry"])
    (grant,) = decision["considered"]
    removed = {**evidence, "decision": {**evidence["decision"], "entry": json.dumps(
        {**decision, "considered": []}, separators=(",", ":"), sort_keys=True)}}  # fmt: skip
    copy = out.parent / "decision-version-removed"
    shutil.copytree(out, copy)
    (copy / "decision.json").write_text(json.dumps(removed))
    problems = verifier.verify_decision(copy)
    assert "decision: entry 0: the entry is not in the checkpoint's tree" in problems, problems
    assert any(p.startswith("decision: the rule gives ('DECISION_NO_CONSENT'") for p in problems), problems
    unlisted = {**evidence, "entries": [e for e in evidence["entries"] if grant not in e["entry"]]}
    copy = out.parent / "decision-version-unlisted"
    shutil.copytree(out, copy)
    (copy / "decision.json").write_text(json.dumps(unlisted))
    problems = verifier.verify_decision(copy)
    assert f"decision: considered version {grant[:16]} is not a logged version up to the decision" in problems


async def _check_consent_evidence(
    out: Path, rpc_url: str, verify: Callable[..., Awaitable[tuple[int, str]]], verifier: ModuleType
) -> None:
    """The patient's consent and its revocation, as the demo wrote them: `medledger verify consent`
    (SDK only) and plain hashlib, RFC 8785 and eth_call agree on the commitments, the statuses and
    which version was in force when; a changed document is unknown to the chain."""
    registry = json.loads((out / "trust.json").read_text())["consent_registry"]
    grant, revocation = (
        verifier.consent_on_chain(rpc_url, registry, (out / f"{s}.json").read_bytes(), (out / f"{s}.salt").read_text())
        for s in ("consent", "consent-revocation")
    )
    assert grant["status"] == "revoked" and grant["revoked_by"] == revocation["commitment"]
    assert revocation["status"] == "unknown"  # a revocation grants nothing; it is the grant's revokedBy
    before = grant["revoked_at"] - 1
    assert verifier.in_force(grant, before) and not verifier.in_force(grant, grant["revoked_at"])

    documents = [str(out / "consent.json"), str(out / "consent-revocation.json")]
    trust = ["--trust", str(out / "trust.json"), "--rpc", rpc_url]
    code, said = await verify("consent", *documents, *trust, "--at", str(before))
    assert code == 0 and "IN FORCE: version 1 of consent" in said, said
    assert f"commitment {grant['commitment']}" in said and f"commitment {revocation['commitment']}" in said, said
    assert "anchoring lag" in said and "recorded on chain as the revocation of version 1" in said, said
    code, said = await verify("consent", *documents, *trust)
    assert code == 1 and "NOT IN FORCE" in said and "by version 2" in said, said
    changed = _tampered(out, out.parent / "tampered-consent", "consent.json", b'"permit"', b'"deny"')
    code, said = await verify("consent", str(changed / "consent.json"), *trust, "--at", str(before))
    assert code == 1 and "the registry has no record of this commitment" in said, said


async def _auditor(config: StoryConfig) -> tuple[str, str]:
    """A principal with the auditor role, registered by the admin; its id and client secret."""
    async with Medledger(config.endpoints, principal_id=config.admin_id, client_secret=config.admin_secret) as admin:
        reply = await admin.identity.RegisterPrincipal(
            identity_pb.RegisterPrincipalRequest(
                request_id=str(uuid.uuid4()), kind=vocab.PrincipalKind.PRINCIPAL_KIND_RESEARCHER
            )
        )
        await admin.identity.AssignRole(
            identity_pb.AssignRoleRequest(
                request_id=str(uuid.uuid4()), principal_id=reply.principal.principal_id, role=vocab.Role.ROLE_AUDITOR
            )
        )
    return reply.principal.principal_id, reply.client_secret


def _dump(postgres: Postgres, database: str) -> str:
    """Everything a database holds, as pg_dump writes it (data included)."""
    cluster = postgres.cluster
    return subprocess.run(
        [cluster._bin("pg_dump"), "-h", localstack.HOST, "-p", str(cluster.port), "-U", "postgres", database],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@pytest.mark.timeout(300)
async def test_the_story_on_postgresql_through_the_sdk(tmp_path: Path, postgres: Postgres) -> None:
    """The demo's story, told in this process through the SDK, against `medledger up` running
    every service in a process of its own on PostgreSQL."""
    state_dir, ports = tmp_path / "state", Ports()
    prefix = f"story_{uuid.uuid4().hex[:8]}_"
    databases = {s: f"{prefix}{s}" for s in SERVICES}
    for name in databases.values():
        postgres.cluster.create_database(name)
    template = postgres.cluster.url(prefix + "{service}")
    up = await _medledger("up", "--state-dir", str(state_dir), *ports.args(), "--database-url", template)
    output: list[str] = []
    said: list[str] = []
    try:
        await _read_until(up, "ready", output, within=90)
        config = StoryConfig(
            endpoints=Endpoints(**{s: f"{localstack.HOST}:{ports.grpc(s)}" for s in SERVICES}),
            admin_id=ADMIN_PRINCIPAL,
            admin_secret=(state_dir / "secrets" / "admin.secret").read_text().strip(),
            trust_policy=TrustPolicy.read(state_dir / "trust-policy.json"),
            rpc_url=f"http://{localstack.HOST}:{ports.anvil}",
            fhir_base_url=f"http://{localstack.HOST}:{ports.fhir}/fhir/R4",
            out_dir=tmp_path / "out",
        )
        result = await run_story(config, Narrator(said.append))

        story = "\n".join(said)
        assert result.passed, story
        assert [o.name for o in result.outcomes] == [
            "receipt commitment",
            "researcher denied",
            "no emergency read without break-glass",
            "break-glass read",
            "break-glass pending review",
            "break-glass reviewed",
            "the engine's transaction",
            "FHIR search",
            "FHIR read denied to the researcher",
            "who saw my data, over FHIR",
            "revoked consent denies",
            "who saw my data",
            "decision replayed",
            "tampered decision fails replay",
            "record proof verifies",
            "disclosure proof verifies",
            "latest checkpoint anchored",
            "consent in force until revoked",
            "consent revoked on chain",
            "erasure completed",
            "erasure certificate verified",
            "break-glass justification erased",
            "erased record unreadable",
            "proof verifies after erasure",
        ], story
        assert result.record_proof is not None and result.access_proof is not None
        assert result.record_proof.anchor.tree_size > result.access_proof.entry_index

        # The services ran on PostgreSQL and kept no SQLite file of their own.
        assert not list(state_dir.glob("*.db"))
        # The log on PostgreSQL verifies from its rows, pinned to the keys of the trust policy; its
        # last-checkpoint file and the chain's latest anchor agree with it.
        keys = [a for k in config.trust_policy.log_verifier_keys for a in ("--verifier-key", k)]
        code, out = await _run(
            "audit", "verify", "--database-url", postgres.cluster.url(databases["audit"]),
            "--origin", config.trust_policy.origin, *keys, within=60,
        )  # fmt: skip
        assert code == 0, out
        code, out = await _run(
            "audit", "verify", "--database-url", postgres.cluster.url(databases["audit"]),
            "--trust", str(state_dir / "trust-policy.json"), "--rpc", config.rpc_url,
            "--last-checkpoint-file", str(state_dir / "audit" / "last-checkpoint"), within=60,
        )  # fmt: skip
        assert code == 0 and "✓ last checkpoint: the checkpoint of size" in out and "✓ chain: " in out, out
        assert "anchored size" in out and "DIVERGES" not in out, out

        # `medledger audit entries`, as an auditor: the record's whole trail; a researcher is refused.
        auditor, secret = await _auditor(config)
        (tmp_path / "auditor.secret").write_text(secret)
        addresses = ["--identity-address", config.endpoints.identity, "--audit-address", config.endpoints.audit]
        code, out = await _run("audit", "entries", "--principal", auditor, "--secret-file",
                               str(tmp_path / "auditor.secret"), "--record", result.record_id, *addresses)  # fmt: skip
        assert code == 0, out
        assert "record.stored" in out and "record.disclosed" in out and "record.access_denied" in out, out
        readers = [p for p, name in result.cast.items() if name.startswith(("Dr. Grey", "Dr. Ross"))]
        assert all(f"actor_id={r}" in out for r in readers), out
        code, out = await _run("audit", "entries", "--principal", "rsr_nobody", "--secret-file",
                               str(tmp_path / "auditor.secret"), *addresses)  # fmt: skip
        assert code == 1 and "identity refused the credentials of rsr_nobody" in out, out

        # No personal data of the patient in any database or log in the clear: the name and
        # birth date live only encrypted in identity (and were erased with the patient's key).
        dumps = {s: _dump(postgres, db) for s, db in databases.items()}
        assert result.record_id in dumps["records"] and result.record_id in dumps["audit"]
        logs = {p.name: p.read_text(errors="replace") for p in (state_dir / "logs").iterdir()}
        # The FHIR chapter's synthetic record too: a LOINC code it searched by and its display.
        fhir_texts = ("8302-2", "Body Height")
        for text in ("Rivera", "1984-03-02", "Patient unconscious", "Blood pressure panel", result.salt, *fhir_texts):
            assert not [s for s, dump in dumps.items() if text in dump], text
            assert not [name for name, log in logs.items() if text in log], text

        # The leak scan of the chaos suite after the story: every log, every Kafka topic (keys,
        # headers, values), the chain's calldata and logs, and every service's metrics.
        leaks = _chaos_module("leaks")
        stack = json.loads((state_dir / "stack.json").read_text())
        secrets_dir = state_dir / "secrets"
        secrets: dict[str, str | bytes] = {
            "the patient's name": "Rivera",
            "the patient's birth date": "1984-03-02",
            "the break-glass justification": "Patient unconscious on arrival",
            "the record's content": "Blood pressure panel",
            "a synthetic Observation's display (loaded over FHIR)": "Body Height",
            "a LOINC code searched over FHIR": "8302-2",
            "the record's salt": result.salt,
            "the auditor's client secret": secret,
            **{f"secret file {p.name}": p.read_bytes().strip() for p in secrets_dir.rglob("*") if p.is_file()},
            # OpenBao's unseal key and root token: only `up` reads them.
            **_openbao_init_secrets(state_dir),
        }
        async with Medledger(config.endpoints, principal_id=auditor, client_secret=secret) as ml:
            secrets["an access token"] = await ml.token("audit")
        found = await leaks.scan(
            {"the control: a record id": result.record_id, **secrets},
            logs=state_dir / "logs",
            bootstrap=stack["kafka_bootstrap_servers"],
            rpc_url=stack["chain_rpc_url"],
            metrics_urls=list(stack["metrics"].values()),
        )
        assert [f for f in found if f.startswith("the control")], "the scan must see the record id in events"
        assert [f for f in found if not f.startswith("the control")] == []

        up.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(up.communicate(), 45)
        output.append(rest.decode())
    finally:
        await _kill_if_running(up, state_dir)
    assert up.returncode == 0, "".join(output)


# --- keys in OpenBao ----------------------------------------------------------------------------


def _openbao_init_secrets(state_dir: Path) -> dict[str, str | bytes]:
    init = json.loads((state_dir / "openbao" / "openbao-init.json").read_text())
    return {f"OpenBao's {k}": init[k] for k in ("unseal_key", "root_token")}


def _load_module() -> ModuleType:
    """bench/load.py, the load generator: registers a hospital, staff and patients, and puts."""
    path = Path(__file__).parents[2] / "bench" / "load.py"
    spec = importlib.util.spec_from_file_location("medledger_bench_load", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
async def test_a_second_up_finds_the_keys_in_openbao(tmp_path: Path) -> None:
    """Records written before Ctrl-C read after the next `up`: OpenBao's raft storage kept the
    keys (records' data keys, identity's token-signing key, the patients' resources), the
    second start unsealed it rather than initializing it, and nothing of it outlived `up`."""
    state_dir, ports = tmp_path / "state", Ports()
    load_module = _load_module()

    async def up_until_ready() -> tuple[asyncio.subprocess.Process, list[str]]:
        up = await _medledger("up", "--state-dir", str(state_dir), *ports.args())
        output: list[str] = []
        await _read_until(up, "ready", output, within=90)
        return up, output

    async def interrupt(up: asyncio.subprocess.Process, output: list[str]) -> str:
        up.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(up.communicate(), 45)
        output.append(rest.decode())
        log = "".join(output)
        assert up.returncode == 0, log
        return log

    up, output = await up_until_ready()
    try:
        first = "".join(output)
        assert "starting OpenBao" in first and "initializing it" in first, first
        stack = json.loads((state_dir / "stack.json").read_text())
        assert stack["key_manager"] == {"kind": "openbao", "address": f"http://{localstack.HOST}:{ports.openbao}"}
        init = state_dir / "openbao" / "openbao-init.json"
        assert init.stat().st_mode & 0o777 == 0o600
        tokens = sorted((state_dir / "secrets" / "openbao").glob("*.token"))
        assert tokens and all(t.stat().st_mode & 0o777 == 0o600 for t in tokens)
        logs = "".join(p.read_text(errors="replace") for p in (state_dir / "logs").iterdir())
        secrets = json.loads(init.read_text())
        assert secrets["root_token"] not in logs and secrets["unseal_key"] not in logs
        assert not [t.name for t in tokens if t.read_text().strip() in logs]

        load = load_module.Load(load_module.StackInfo.read(state_dir), patients=2, seed=7)
        await load.setup()
        for _ in range(6):
            await load.op_put()
        puts = list(load.ledger.puts)
        assert len(puts) == 6
        log = await interrupt(up, output)
    finally:
        await _kill_if_running(up, state_dir)
    assert "stopped openbao (pid" in log, log
    assert not _processes_mentioning(*ports.traces(state_dir))

    up, output = await up_until_ready()
    try:
        second = "".join(output)
        assert "unsealing it" in second and "initializing it" not in second, second
        for put in puts:
            got = await load.doctor_a.records.GetRecord(
                records_pb.GetRecordRequest(record_id=put.record_id, version=put.version, purpose=TREAT)
            )
            assert commitments.record_commitment(got.content, bytes.fromhex(got.receipt.salt)) == put.commitment
        await load.close()
        # This time `medledger down` from another terminal: it asks the running `up` to stop.
        code, out = await _run("down", "--state-dir", str(state_dir), within=90)
        assert code == 0 and "asking `medledger up`" in out and "nothing runs from" in out, out
        rest, _ = await asyncio.wait_for(up.communicate(), 10)
        assert up.returncode == 0, "".join(output) + rest.decode()
        assert "received SIGTERM; stopping" in rest.decode() and "stopped openbao (pid" in rest.decode()
    finally:
        await _kill_if_running(up, state_dir)


@pytest.mark.timeout(60)
async def test_up_keeps_a_state_folder_on_the_key_manager_it_began_with(tmp_path: Path) -> None:
    state_dir, ports = tmp_path / "state", Ports()
    state_dir.mkdir()
    (state_dir / "MEDLEDGER_STATE").write_text("ours\n")
    (state_dir / "keyrings").mkdir()
    (state_dir / "keyrings" / "records.keyring").write_text("{}")  # a folder from before OpenBao
    code, out = await _run("up", "--state-dir", str(state_dir), *ports.args())
    assert code == 1, out
    assert "keeps its keys in local keyring files" in out and "--keys local" in out, out
    assert not localstack.port_in_use(ports.openbao) and not localstack.port_in_use(ports.kafka)
    assert not (state_dir / "openbao").exists()


TREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT


@pytest.mark.timeout(300)
async def test_down_stops_what_a_killed_up_left_running(tmp_path: Path) -> None:
    """`up` killed with SIGKILL leaves Kafka, OpenBao, Anvil and the services running, and the
    next `up` refuses; `medledger down` stops every one of them from the pid file."""
    state_dir, ports = tmp_path / "state", Ports()
    up = await _medledger("up", "--state-dir", str(state_dir), *ports.args())
    output: list[str] = []
    try:
        await _read_until(up, "ready", output, within=90)
        children = [RecordedProcess(**p) for p in json.loads((state_dir / "up.pid").read_text())["processes"]]
        assert sorted(p.name for p in children) == sorted(["kafka", "openbao", "anvil", *SERVICES, *GATEWAYS])
    finally:
        up.kill()  # SIGKILL: no chance to stop its children
        await up.wait()
    assert all(p.alive() for p in children), "a killed `up` leaves its children running"

    code, out = await _run("up", "--state-dir", str(state_dir), *ports.args())
    assert code == 1 and "already running" in out and "medledger down" in out, out

    code, out = await _run("down", "--state-dir", str(state_dir), within=120)
    assert code == 0, out
    for p in children:
        assert f"stopped {p.name} (pid {p.pid})" in out or f"killed {p.name} (pid {p.pid})" in out, out
    assert "nothing runs from" in out
    assert not [p for p in children if p.alive()]
    assert not _processes_mentioning(*ports.traces(state_dir))
    assert not (state_dir / "up.pid").exists()

    code, out = await _run("down", "--state-dir", str(state_dir))
    assert code == 0 and "nothing runs from" in out, out
