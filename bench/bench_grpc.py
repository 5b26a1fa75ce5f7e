"""(c) An empty unary RPC through the common server bootstrap with all its interceptors vs a
bare grpc.aio server; server and client each in their own process, 16 calls in flight.

With `auth`, the common server also runs the authentication interceptor (every call carries a
token, verified once and then served from the verifier's cache, as repeated tokens are).

`chain` is a bare server whose method makes one call to a bare server at DOWNSTREAM_PORT before
answering: the gRPC alone of a request that asks another service (records asking consent).
`commit` is a bare server whose method commits one row (bench_commit.py's insert) before
answering, on ONE connection of its own (so for a lone caller, IN_FLIGHT=1, as run.py runs it):
an empty call and a durable commit composed in one server, the floor of any call that must
write before it answers, with no logic of its own.
`common-10` is `common` sampling 10% of traces (the Helm chart's default) instead of all.
Usage: python bench_grpc.py server bare|common|common-10|auth|auth-10 PORT [TOKEN_FILE]   (serves until killed)
       python bench_grpc.py server chain PORT DOWNSTREAM_PORT            (serves until killed)
       python bench_grpc.py server commit PORT DATABASE_URL              (serves until killed)
       python bench_grpc.py client PORT SECONDS [TOKEN_FILE]            (prints one JSON line)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from closed_loop import measure
from medledger.identity.v1 import identity_service_pb2 as pb
from medledger.identity.v1 import identity_service_pb2_grpc as pb_grpc

from medledger_runtime.auth import Access, AuthInterceptor, DeactivationSet, TokenVerifier
from medledger_runtime.grpc_server import GrpcServer
from medledger_runtime.telemetry import configure_tracing


class Empty(pb_grpc.IdentityServiceServicer):
    async def GetPrincipal(self, request, context):  # type: ignore[no-untyped-def]
        return pb.GetPrincipalResponse()


class Chain(pb_grpc.IdentityServiceServicer):
    """Answers once a call of its own to another server has returned."""

    def __init__(self, downstream: pb_grpc.IdentityServiceStub) -> None:
        self.downstream = downstream

    async def GetPrincipal(self, request, context):  # type: ignore[no-untyped-def]
        await self.downstream.GetPrincipal(pb.GetPrincipalRequest())
        return pb.GetPrincipalResponse()


class Commit(pb_grpc.IdentityServiceServicer):
    """Answers once one row is committed (autocommit: one statement, one fsync)."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.numbers = itertools.count()

    async def GetPrincipal(self, request, context):  # type: ignore[no-untyped-def]
        await self.connection.execute("INSERT INTO bench_commit VALUES ($1, $2)", next(self.numbers), "x" * 200)
        return pb.GetPrincipalResponse()


async def auth_interceptor(token_file: Path) -> AuthInterceptor:
    """An interceptor that accepts one principal, whose token it writes to `token_file`."""
    from bench_auth import make_token, signing_keys

    key, jwk = signing_keys()["EdDSA"]

    async def fetch() -> dict:
        return {"keys": [jwk]}

    token, _, _ = make_token("EdDSA", key, jwk["kid"], int(time.time()))
    token_file.write_text(token)  # noqa: ASYNC240 - once, before serving
    return AuthInterceptor(
        TokenVerifier(issuer="medledger.identity", audience="medledger.consent", fetch_jwks=fetch),
        DeactivationSet(),
        public_methods=(),
        access={"/medledger.identity.v1.IdentityService/GetPrincipal": Access.of(roles=["pdp-client"])},
    )


async def serve(
    kind: str, port: int, token_file: Path | None = None, downstream: int = 0, database_url: str = ""
) -> None:
    if kind in ("bare", "chain", "commit"):
        server = grpc.aio.server()
        if kind == "commit":
            connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
            await connection.execute("DROP TABLE IF EXISTS bench_commit")
            await connection.execute("CREATE TABLE bench_commit (n bigint PRIMARY KEY, body text)")
            pb_grpc.add_IdentityServiceServicer_to_server(Commit(connection), server)
        elif kind == "chain":
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{downstream}")
            pb_grpc.add_IdentityServiceServicer_to_server(Chain(pb_grpc.IdentityServiceStub(channel)), server)
        else:
            pb_grpc.add_IdentityServiceServicer_to_server(Empty(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()
        return
    # Every call traced, as the services' own default; `common-10` and `auth-10` at the Helm
    # chart's default.
    configure_tracing("bench", 0.1 if kind.endswith("-10") else 1.0)
    common = GrpcServer(
        host="127.0.0.1",
        port=port,
        max_message_bytes=8 * 1024 * 1024,
        service_descriptors=[pb.DESCRIPTOR.services_by_name["IdentityService"]],
        register=lambda s: pb_grpc.add_IdentityServiceServicer_to_server(Empty(), s),
        interceptors=[await auth_interceptor(token_file)] if kind.startswith("auth") and token_file else [],
    )
    await common.start()
    await common.set_serving(True)
    await common.server.wait_for_termination()


async def client(port: int, seconds: float, token_file: Path | None = None) -> None:
    token = token_file.read_text() if token_file else None  # noqa: ASYNC240 - once, before calling
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.IdentityServiceStub(channel)
        await channel.channel_ready()
        figures = await measure(
            lambda: stub.GetPrincipal(pb.GetPrincipalRequest(), metadata=metadata), seconds, warm_up=200
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    if sys.argv[1] == "server" and sys.argv[2] == "chain":
        asyncio.run(serve("chain", int(sys.argv[3]), downstream=int(sys.argv[4])))
    elif sys.argv[1] == "server" and sys.argv[2] == "commit":
        asyncio.run(serve("commit", int(sys.argv[3]), database_url=sys.argv[4]))
    elif sys.argv[1] == "server":
        asyncio.run(serve(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]) if len(sys.argv) > 4 else None))
    else:
        asyncio.run(client(int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]) if len(sys.argv) > 4 else None))
