"""(c) An empty unary RPC through the common server bootstrap with all its interceptors vs a
bare grpc.aio server; server and client each in their own process, 16 calls in flight.

Usage: python bench_grpc.py server bare|common PORT     (serves until killed)
       python bench_grpc.py client PORT SECONDS         (prints one JSON line)
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc
from medledger.identity.v1 import identity_service_pb2 as pb
from medledger.identity.v1 import identity_service_pb2_grpc as pb_grpc

from medledger_common.grpc_server import GrpcServer
from medledger_common.telemetry import configure_tracing

IN_FLIGHT = 16


class Empty(pb_grpc.IdentityServiceServicer):
    async def GetPrincipal(self, request, context):  # type: ignore[no-untyped-def]
        return pb.GetPrincipalResponse()


async def serve(kind: str, port: int) -> None:
    if kind == "bare":
        server = grpc.aio.server()
        pb_grpc.add_IdentityServiceServicer_to_server(Empty(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()
        return
    configure_tracing("bench", 1.0)
    common = GrpcServer(
        host="127.0.0.1",
        port=port,
        max_message_bytes=8 * 1024 * 1024,
        service_descriptors=[pb.DESCRIPTOR.services_by_name["IdentityService"]],
        register=lambda s: pb_grpc.add_IdentityServiceServicer_to_server(Empty(), s),
    )
    await common.start()
    await common.set_serving(True)
    await common.server.wait_for_termination()


async def client(port: int, seconds: float) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.IdentityServiceStub(channel)
        await channel.channel_ready()
        for _ in range(200):  # warm-up
            await stub.GetPrincipal(pb.GetPrincipalRequest())
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                await stub.GetPrincipal(pb.GetPrincipalRequest())
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    print(
        json.dumps(
            {
                "calls_per_s": len(latencies) / elapsed,
                "p50_ms": latencies[len(latencies) // 2] * 1000,
                "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
            }
        )
    )


if __name__ == "__main__":
    if sys.argv[1] == "server":
        asyncio.run(serve(sys.argv[2], int(sys.argv[3])))
    else:
        asyncio.run(client(int(sys.argv[2]), float(sys.argv[3])))
