"""A stateless component on the runtime (a gateway that only calls the services): it serves gRPC
and HTTP with the same authentication without a database or Kafka, which are not even reachable
here, refuses to be given what needs them, and follows deactivated principals by reloading them."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medledger_devstack.testing import TokenIssuer
from medledger_runtime import service
from medledger_runtime.auth import current_caller
from medledger_runtime.db import Migration
from medledger_runtime.http_server import HttpRoute
from medledger_runtime.parts import AuthSources, ConsumerSpec, ServiceParts
from medledger_runtime.service import ServiceRuntime
from medledger_runtime.settings import ConfigError, ServiceSettings


def closed_port() -> int:
    """A port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings() -> ServiceSettings:
    # Neither exists: a stateless component must never try them.
    return ServiceSettings(
        grpc_port=0,
        metrics_port=0,
        http_port=0,
        database_url=f"postgresql+asyncpg://medledger@127.0.0.1:{closed_port()}/nothing",
        kafka_bootstrap_servers=f"127.0.0.1:{closed_port()}",
        shutdown_grace_seconds=2,
    )


async def whoami(request: web.Request) -> web.Response:
    return web.Response(text=current_caller().principal_id)


def parts(
    issuer: TokenIssuer, deactivated: list[str], **more: Any
) -> Callable[[ServiceRuntime[None]], ServiceParts[None]]:
    async def load_deactivated() -> list[str]:
        return list(deactivated)

    def build(runtime: ServiceRuntime[None]) -> ServiceParts[None]:
        return ServiceParts(
            service_descriptors=[],
            register=lambda server: None,
            access={},
            handle=None,
            auth=AuthSources(fetch_jwks=issuer.fetch, load_deactivated=load_deactivated),
            http_routes=[HttpRoute.get("/me", whoami)],
            **more,
        )

    return build


async def get(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        return response.status, await response.text()


async def test_a_stateless_component_serves_without_a_database_or_kafka(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "STATELESS_DEACTIVATION_RELOAD_SECONDS", 0.2)
    issuer = TokenIssuer(now=time.time(), audience="medledger.gateway")
    deactivated: list[str] = []
    runtime: ServiceRuntime[None] = ServiceRuntime("gateway", settings(), [], stateless=True)
    started = time.monotonic()
    try:
        await asyncio.wait_for(runtime.start(parts(issuer, deactivated)), 20)
        # Nothing waited for the unreachable database or broker (each would be waited on for 120 s).
        assert time.monotonic() - started < 15
        base = f"http://127.0.0.1:{runtime.http_port}"
        status, _ = await get(f"{base}/me")
        assert status == 401
        assert await get(f"{base}/me", issuer.token()) == (200, "rsr_1")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        for what in ("db", "producer", "relay"):
            with pytest.raises(ConfigError, match="stateless"):
                getattr(runtime, what)
        # A principal deactivated in identity is refused after the next reload.
        deactivated.append("rsr_1")
        deadline = time.monotonic() + 5
        while (await get(f"{base}/me", issuer.token()))[0] != 401:
            assert time.monotonic() < deadline, "the deactivation was never picked up"
            await asyncio.sleep(0.1)
    finally:
        await asyncio.wait_for(runtime.stop(), 15)


async def test_a_stateless_component_is_refused_migrations_and_consumers() -> None:
    async def create(conn: Any) -> None:
        return None

    with pytest.raises(ConfigError, match="stateless"):
        ServiceRuntime("gateway", settings(), [Migration(1, "a table", create)], stateless=True)

    async def handler(message: Any) -> None:
        return None

    issuer = TokenIssuer(now=time.time(), audience="medledger.gateway")
    runtime: ServiceRuntime[None] = ServiceRuntime("gateway", settings(), [], stateless=True)
    try:
        with pytest.raises(ConfigError, match="consumes no events"):
            await asyncio.wait_for(
                runtime.start(parts(issuer, [], consumers=[ConsumerSpec(group_id="g", handler=handler, topics=["t"])])),
                20,
            )
    finally:
        await asyncio.wait_for(runtime.stop(), 15)
