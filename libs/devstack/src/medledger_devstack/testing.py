"""Pytest fixtures that start the real components on free ports and stop them afterwards:
Tansu (Kafka protocol), Anvil (EVM), a PostgreSQL cluster and an OpenBao server of the tests' own.

Registered for every test folder by the repository's root ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaProducer
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from medledger_devstack import localstack
from medledger_devstack.openbao import OpenBao
from medledger_runtime.db import Migration
from medledger_runtime.kafka_consumer import EventConsumer
from medledger_runtime.parts import H, ServiceParts
from medledger_runtime.service import ServiceRuntime
from medledger_runtime.settings import ServiceSettings
from medledger_runtime.telemetry import configure_tracing


@dataclass
class Kafka:
    bootstrap_servers: str
    process: localstack.ManagedProcess


@dataclass
class Anvil:
    rpc_url: str
    state_file: Path
    process: localstack.ManagedProcess


@dataclass
class OpenBaoServer:
    """The tests' OpenBao: its address, the root token (for the contract suite and set-up) and
    one token file per policy of ``deploy/vault/`` (``medledger-<file stem>``)."""

    address: str
    root_token: str
    token_files: dict[str, Path]
    server: OpenBao

    def token_file(self, policy: str) -> Path:
        return self.server.token_file(policy)


class Postgres:
    def __init__(self, cluster: localstack.PostgresCluster) -> None:
        self.cluster = cluster

    def new_database(self, prefix: str = "t") -> str:
        """A fresh, empty database on the tests' cluster; returns its SQLAlchemy URL."""
        return self.cluster.create_database(f"{prefix}_{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kafka]:
    """A Tansu broker for the whole test session (memory storage)."""
    port = localstack.free_port()
    proc = localstack.start_tansu(port, tmp_path_factory.mktemp("kafka") / "tansu.log")
    try:
        yield Kafka(f"{localstack.HOST}:{port}", proc)
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Anvil]:
    port = localstack.free_port()
    folder = tmp_path_factory.mktemp("anvil")
    proc = localstack.start_anvil(port, folder / "state.json", folder / "anvil.log")
    try:
        yield Anvil(f"http://{localstack.HOST}:{port}", folder / "state.json", proc)
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """A PostgreSQL cluster made with initdb in a temporary folder, on a free port."""
    cluster = localstack.PostgresCluster(tmp_path_factory.mktemp("pg") / "data", localstack.free_port())
    cluster.init()
    cluster.start()
    try:
        yield Postgres(cluster)
    finally:
        cluster.stop("immediate")


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoServer]:
    """A real OpenBao server (raft storage, initialized and unsealed, transit mounted, the
    repository's ``deploy/vault/*.hcl`` loaded) for the whole test session. Tests that seal or
    stop a server start one of their own."""
    folder = tmp_path_factory.mktemp("openbao")
    server = OpenBao(folder / "state", folder / "secrets", localstack.repo_root() / "deploy" / "vault")
    server.start()
    try:
        yield OpenBaoServer(server.address, server.root_token, server.token_files, server)
    finally:
        server.stop()


@asynccontextmanager
async def running_service(
    name: str,
    settings: ServiceSettings,
    migrations: Sequence[Migration],
    build: Callable[[ServiceRuntime[H]], ServiceParts[H]],
    *,
    stateless: bool = False,
) -> AsyncIterator[ServiceRuntime[H]]:
    """Run a service in the test's event loop, exactly as its ``main`` wires it; its own objects
    are ``runtime.handle``, typed by its build. `stateless`: the FHIR gateway's mode."""
    runtime: ServiceRuntime[H] = ServiceRuntime(name, settings, migrations, stateless=stateless)
    try:
        await runtime.start(build)
        yield runtime
    finally:
        await runtime.stop()


@asynccontextmanager
async def consuming(
    consumer: EventConsumer, producer: AIOKafkaProducer | None = None
) -> AsyncIterator[asyncio.Task[None]]:
    """Start `consumer` and run it in a task for the block, which gets the task; afterwards, even
    when the block failed, cancel the task, stop the consumer and then `producer` (the test's own,
    already started: the one the consumer dead-letters through)."""
    await consumer.start()
    task = asyncio.create_task(consumer.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.stop()
        if producer is not None:
            await producer.stop()


async def eventually(check: Callable[[], Awaitable[Any]], what: str, within: float = 60.0, every: float = 0.2) -> Any:
    """``check()`` again every `every` seconds until it returns something truthy, which is
    returned; an AssertionError naming `what` after `within` seconds. For what a test waits on
    across an event's trip (a consumer, the log, the chain)."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(every)


async def status_of(call: Awaitable[object]) -> grpc.StatusCode:
    """The gRPC status a call ends with: OK, or the code of the error it raised."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The fields named by the google.rpc.BadRequest details of an error."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the error"
    fields: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


_memory_exporter: InMemorySpanExporter | None = None


def span_exporter() -> InMemorySpanExporter:
    """Finished spans of this test process, kept in memory (tracing sampled at 100%)."""
    global _memory_exporter
    if _memory_exporter is None:
        provider = configure_tracing("tests", 1.0)
        _memory_exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(_memory_exporter))
    return _memory_exporter


async def read_topic(bootstrap_servers: str, topic: str, want: int, within: float = 15.0) -> list[Any]:
    """The records of `topic` from its start, once `want` have arrived or `within` seconds passed."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap_servers, auto_offset_reset="earliest")
    await consumer.start()
    out: list[Any] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while len(out) < want and loop.time() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


def b64u(data: bytes) -> str:
    """Unpadded base64url, as JWS segments are encoded."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """Signs access tokens the way identity does (EdDSA key ``ed-1``, ES256 key ``es-1``), with
    keys of its own; `fetch` is its JWKS for a ``TokenVerifier``. Tokens are issued at `now`,
    valid for 900 s, for `audience`."""

    def __init__(self, *, now: float, audience: str = "medledger.consent") -> None:
        self.now = now
        self.audience = audience
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.p256 = ec.generate_private_key(ec.SECP256R1())
        n = self.p256.public_key().public_numbers()
        ed_x = b64u(self.ed.public_key().public_bytes_raw())
        self.jwks: dict[str, Any] = {
            "keys": [
                {"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": "ed-1", "x": ed_x},
                {
                    "kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "es-1",
                    "x": b64u(n.x.to_bytes(32, "big")), "y": b64u(n.y.to_bytes(32, "big")),
                },
            ]
        }  # fmt: skip
        self.fetches = 0

    async def fetch(self) -> dict[str, Any]:
        self.fetches += 1
        return self.jwks

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = self.now
        base = {
            "iss": "medledger.identity", "aud": self.audience, "sub": "rsr_1", "jti": uuid.uuid4().hex,
            "iat": now, "nbf": now, "exp": now + 900, "kind": "researcher", "roles": ["pdp-client"], "org": "",
        }  # fmt: skip
        base.update(changes)
        return {k: v for k, v in base.items() if v is not None}

    def token(
        self, alg: str = "EdDSA", kid: str | None = None, header: dict[str, Any] | None = None, **changes: Any
    ) -> str:
        head = header or {"alg": alg, "typ": "JWT", "kid": kid or ("ed-1" if alg == "EdDSA" else "es-1")}
        signing_input = f"{b64u(json.dumps(head).encode())}.{b64u(json.dumps(self.claims(**changes)).encode())}"
        if alg == "EdDSA":
            signature = self.ed.sign(signing_input.encode())
        else:
            r, s = decode_dss_signature(self.p256.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
            signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input}.{b64u(signature)}"
