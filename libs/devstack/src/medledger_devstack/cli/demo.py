"""``medledger demo``: the whole story of medledger against a running stack, in words.

It uses the stack of ``medledger up`` when one answers (its admin credential, trust policy and
chain from the state folder); otherwise it starts one of its own on free ports in a temporary
folder, on the embedded defaults (SQLite, local keyrings, Tansu, Anvil), and stops and removes
exactly that at the end. The story is ``medledger_devstack.demo``; this command finds the stack,
tells the story, prints the table of every verification and exits 0 only if all passed.

With ``--out DIR`` it writes the evidence a third party needs (see ``demo.OUT_FILES``): the
record and its salt, the record's and the first disclosure's tlog-proofs with their entries and
anchors, the log's Ed25519 verifier key, the trust policy, the erasure certificate (a signed
note: ``medledger verify certificate DIR/erasure-certificate.note --trust DIR/trust.json``) and
the consent's grant and revocation with their salts (``medledger verify consent DIR/consent.json
DIR/consent-revocation.json --trust DIR/trust.json --rpc URL --at TIME``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medledger_devstack.cli.state import ADMIN_PRINCIPAL, DEFAULT_STATE_DIR, StateDir
from medledger_devstack.cli.up import port_number, port_taken
from medledger_devstack.demo.narrator import Narrator, StoryResult
from medledger_devstack.demo.story import StoryConfig, run_story
from medledger_devstack.stack.layout import DEFAULT_GRPC_PORT_BASE, HOST, SERVICES, Ports
from medledger_devstack.stack.supervisor import Interrupted, Stack
from medledger_sdk.cli.errors import CommandError
from medledger_sdk.client import Endpoints
from medledger_verifier.proof_files import TrustPolicy

START_TIMEOUT_SECONDS = 120.0


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="tell the whole medledger story against a running stack (or one it starts)",
        description=(
            "Register a hospital, its practitioners, a patient and a researcher; grant, store, read, deny, "
            "break the glass, revoke, audit, anchor, prove and erase — each step in words, then a table of "
            "every verification. Uses the stack of `medledger up` if one answers, else starts its own."
        ),
    )
    parser.add_argument(
        "--out", metavar="DIR", type=Path, help="write the record, its proofs and the trust policy here"
    )
    parser.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        help=f"the state folder of the running `medledger up` (default: ./{DEFAULT_STATE_DIR})",
    )
    parser.add_argument("--grpc-port-base", type=port_number, default=DEFAULT_GRPC_PORT_BASE, help="as given to `up`")
    parser.add_argument(
        "--own-stack",
        action="store_true",
        help="always start a stack of its own, even if one answers",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    base = args.grpc_port_base
    if not args.own_stack and _serving(f"{HOST}:{base}"):
        config = _config_of_running_stack(StateDir.at(args.state_dir), base, args.out)
        print(f"using the stack of `medledger up` at {HOST}:{base} (state in {args.state_dir})")
        result = _tell(config)
        rpc_url: str | None = config.rpc_url
    else:
        if not args.own_stack:
            print(f"no medledger answers at {HOST}:{base}; starting a stack of its own on free ports")
        result = _tell_on_own_stack(args.out)
        rpc_url = None
    return _summarize(result, time.monotonic() - started, args.out, rpc_url)


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _config_of_running_stack(state: StateDir, base: int, out: Path | None) -> StoryConfig:
    admin_file = state.path / "secrets" / "admin.secret"
    needed = [admin_file, state.trust_policy_file, state.chain_file]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise CommandError(
            f"a stack answers at {HOST}:{base}, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing: is it the `medledger up` of {state.path}? "
            "Pass its --state-dir, or use --own-stack."
        )
    return StoryConfig(
        endpoints=_endpoints(base),
        admin_id=ADMIN_PRINCIPAL,
        admin_secret=admin_file.read_text().strip(),
        trust_policy=TrustPolicy.read(state.trust_policy_file),
        rpc_url=str(json.loads(state.chain_file.read_text())["rpc_url"]),
        fhir_base_url=_fhir_base_url(state),
        out_dir=out,
    )


def _fhir_base_url(state: StateDir) -> str:
    """[base] of the running stack's FHIR gateway, as `up` wrote it to stack.json."""
    try:
        return str(json.loads(state.endpoints_file.read_text())["fhir"]["base_url"])
    except (OSError, ValueError, KeyError) as exc:
        raise CommandError(
            f"{state.endpoints_file} names no FHIR gateway ({exc}): a stack of an older `medledger up`? "
            "Restart it, or use --own-stack."
        ) from None


def _endpoints(base: int) -> Endpoints:
    address = {name: f"{HOST}:{base + i}" for i, name in enumerate(SERVICES)}
    return Endpoints(**address)


def _tell(config: StoryConfig) -> StoryResult:
    with _sigterm_as_interrupt():
        return asyncio.run(run_story(config, Narrator()))


def _tell_on_own_stack(out: Path | None) -> StoryResult:
    folder = Path(tempfile.mkdtemp(prefix="medledger-demo-"))
    state = StateDir.at(folder)
    state.create()
    stack = Stack(state, free_ports())
    try:
        with stack.handling_signals():
            try:
                stack.start(START_TIMEOUT_SECONDS)
            except Interrupted as exc:
                raise CommandError(f"received {exc.signal_name} while starting; stopped what was started") from None
        print(f"the stack is up (state in {folder}); now the story")
        config = StoryConfig(
            endpoints=_endpoints(stack.ports.grpc_base),
            admin_id=ADMIN_PRINCIPAL,
            admin_secret=state.admin_secret_file().read_text().strip(),
            trust_policy=TrustPolicy.read(state.trust_policy_file),
            rpc_url=stack.rpc_url,
            fhir_base_url=stack.ports.fhir_base_url,
            out_dir=out,
        )
        return _tell(config)
    finally:
        print("\nstopping the demo's own stack ...")
        stack.stop_all()
        shutil.rmtree(folder, ignore_errors=True)
        print(f"removed {folder}")


def free_ports(attempts: int = 200) -> Ports:
    """Ports for a whole stack where nothing listens: Kafka, Anvil, OpenBao's two, the FHIR
    gateway's HTTP port, and blocks of gRPC and metrics ports (the metrics block spans 15, for
    JWKS and the log tiles)."""
    # Below the kernel's ephemeral range (32768 and up by default): a service restarted later
    # (the chaos suite does) must find its port free, not taken by some outgoing connection.
    rng = random.Random()
    for _ in range(attempts):
        grpc_base = rng.randrange(20000, 26000)
        metrics_base = rng.randrange(26000, 32000)
        openbao = rng.randrange(10000, 11999)  # and the next port, its cluster port
        fhir = rng.randrange(32100, 32700)  # above the metrics block, below the ephemeral range
        ports = Ports(rng.randrange(12000, 16000), rng.randrange(16000, 20000), grpc_base, metrics_base, openbao, fhir)
        if not any(port_taken(port) for port, _ in ports.purposes()):
            return ports
    raise CommandError("found no free ports for a stack of its own")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the story like Ctrl-C, so the stack the demo started is still stopped."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _summarize(result: StoryResult, seconds: float, out: Path | None, rpc_url: str | None) -> int:
    print("\nEvery verification of the story:\n")
    width = max((len(o.name) for o in result.outcomes), default=0)
    for o in result.outcomes:
        print(f"  {'PASS' if o.passed else 'FAIL'}  {o.name.ljust(width)}  {o.detail}")
    if out is not None and result.written:
        print(f"\nwrote {len(result.written)} files to {out}: {', '.join(p.name for p in result.written)}")
        if rpc_url is None:
            print("(the demo's own chain is gone with its stack: run it against `medledger up` to check them later)")
        else:
            print(
                f"check them yourself: medledger verify {out / 'record.tlog-proof'} --trust {out / 'trust.json'} "
                f"--rpc {rpc_url} --record {out / 'record.json'} --salt $(cat {out / 'record.salt'})"
            )
        if (out / "erasure-certificate.note") in result.written:
            print(
                f"and the erasure certificate, offline: medledger verify certificate "
                f"{out / 'erasure-certificate.note'} --trust {out / 'trust.json'}"
            )
    failed = [o for o in result.outcomes if not o.passed]
    if failed or not result.outcomes:
        print(f"\nthe demo took {seconds:.0f} s: {len(failed)} of {len(result.outcomes)} verifications FAILED")
        return 1
    print(f"\nthe demo took {seconds:.0f} s: all {len(result.outcomes)} verifications passed")
    return 0
