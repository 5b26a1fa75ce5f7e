"""``medledger up`` as a user runs it: a subprocess that starts the real stack (Tansu, Anvil and
the five services), serves gRPC with reflection, and leaves no process behind when stopped."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path

import grpc
import pytest
from medledger.audit.v1 import audit_service_pb2, audit_service_pb2_grpc

from medledger_common import chain, localstack, notes
from medledger_common.anchored_proofs import TrustPolicy
from medledger_sdk.cli import up as up_command
from medledger_sdk.cli.state import RecordedProcess, StateDir, read_chain_key

GRPCURL = Path(sys.executable).parent / "grpcurl"
SERVICES = ("identity", "consent", "records", "anchoring", "audit")


def _port_block(size: int, avoid: set[int]) -> int:
    """The first of `size` consecutive free ports, none of them in `avoid` (chosen already but
    not yet bound, so the OS could hand them out again)."""
    for _ in range(50):
        base = localstack.free_port()
        block = set(range(base, base + size))
        if base + size > 65535 or block & avoid:
            continue
        if all(_bindable(p) for p in block):
            avoid |= block
            return base
    raise RuntimeError(f"no {size} consecutive free ports found")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((localstack.HOST, port))
        except OSError:
            return False
    return True


class Ports:
    def __init__(self) -> None:
        chosen: set[int] = set()
        self.kafka = _port_block(1, chosen)
        self.anvil = _port_block(1, chosen)
        self.grpc_base = _port_block(len(SERVICES), chosen)
        self.metrics_base = _port_block(len(SERVICES), chosen)

    def grpc(self, service: str) -> int:
        return self.grpc_base + SERVICES.index(service)

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
    deployment = chain.Deployment.from_json(recorded)
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
    policy = TrustPolicy.read(state_dir / "trust-policy.json")
    assert policy == TrustPolicy(
        ORIGIN, tuple(served.verifier_keys), deployment.chain_id, deployment.anchor_registry, 1
    )

    w3 = chain.connect(recorded["rpc_url"])
    try:
        assert deployment.chain_id == await w3.eth.chain_id
        assert deployment.owner == (await w3.eth.accounts)[0]
        assert await w3.eth.get_code(deployment.anchor_registry)
        assert await w3.eth.get_code(deployment.consent_registry)
        anchors = chain.contract(w3, chain.ANCHOR_REGISTRY, deployment.anchor_registry)
        consents = chain.contract(w3, chain.CONSENT_REGISTRY, deployment.consent_registry)
        assert tuple(await anchors.functions.logKey(ORIGIN).call()) == chain.p256_xy(p256.public_key)
        assert await anchors.functions.isAnchorer(deployment.anchorer).call()
        assert not await anchors.functions.isAnchorer(deployment.owner).call()
        assert await consents.functions.isWriter(deployment.anchorer).call()
        assert await w3.eth.get_balance(deployment.anchorer) >= up_command.ANCHORER_LOW_WEI
    finally:
        await w3.provider.disconnect()
    return dict(recorded)


async def _check_reuse(state_dir: Path, recorded: dict[str, object], capsys: pytest.CaptureFixture[str]) -> None:
    """The next `up`'s chain step on the chain state Anvil dumped: the same contracts, nothing
    deployed. (The step itself, on a fresh Anvil, rather than a second full `up`: seconds.)"""
    port = localstack.free_port()
    anvil = localstack.start_anvil(port, state_dir / "anvil-state.json", state_dir / "logs" / "anvil-reuse.log")
    try:
        capsys.readouterr()
        again = await up_command.set_up_contracts(StateDir.at(state_dir), f"http://{localstack.HOST}:{port}")
        said = capsys.readouterr().out
    finally:
        anvil.stop()
    assert "reusing the contracts" in said, said
    assert "deployed AnchorRegistry" not in said, said
    assert again.as_json() == {k: v for k, v in recorded.items() if k != "rpc_url"}
    assert json.loads((state_dir / "chain.json").read_text())["anchor_registry"] == recorded["anchor_registry"]


@pytest.mark.timeout(120)
async def test_up_serves_every_service_and_stops_everything_it_started(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = tmp_path / "state"
    ports = Ports()
    up = await _medledger("up", "--state-dir", str(state_dir), *ports.args())
    output: list[str] = []
    try:
        await _read_until(up, "ready", output, within=60)

        recorded = json.loads((state_dir / "up.pid").read_text())
        children = [RecordedProcess(**p) for p in recorded["processes"]]
        assert sorted(p.name for p in children) == sorted(["kafka", "anvil", *SERVICES])
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
        assert "5 of 5 services serving" in out and "anchorer balance" in out, out
        assert "identity   SERVING" in out and "outbox backlog" in out, out

        # The chain side: both registries deployed, the anchorer named and funded, the log's
        # P-256 key registered, the trust policy written.
        recorded = await _check_chain_side(state_dir, ports, printed)

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
        if up.returncode is None:
            up.kill()
            await up.wait()

    log = "".join(output)
    assert up.returncode == 0, log
    for name in ("kafka", "anvil", *SERVICES):
        assert f"stopped {name} (pid" in log, log
    leftovers = [p for p in children if p.alive()]
    assert not leftovers, f"still running after `up` stopped: {leftovers}"
    assert not _processes_mentioning(*ports.traces(state_dir))
    assert not (state_dir / "up.pid").exists()
    assert (state_dir / "anvil-state.json").exists()  # Anvil dumped its chain on SIGTERM
    code, out = await _run("status", *status_ports)
    assert code == 1 and "0 of 5 services serving" in out and "unreachable" in out, out
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
