"""The SDK's call policy against a real grpc.aio server (the common bootstrap, with its error
mapping): UNAVAILABLE retried with the same request, other errors raised at once as RpcError with
their field violations, deadlines, pages followed to the end, and the Medledger client's stubs
carrying a token for each service against a running identity."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest
from medledger.identity.v1 import identity_service_pb2 as pb
from medledger.identity.v1 import identity_service_pb2_grpc as pb_grpc

from medledger_runtime.errors import InvalidArgument
from medledger_runtime.grpc_server import GrpcServer
from medledger_sdk.calls import CallPolicy, RpcError, pages
from medledger_sdk.channels import make_channel

SERVICE = pb.DESCRIPTOR.services_by_name["IdentityService"]
PRINCIPALS = [f"prn_{i:032x}" for i in range(25)]


class Flaky(pb_grpc.IdentityServiceServicer):
    """Unavailable for the first ``failures`` calls of RegisterPrincipal; remembers each request id."""

    def __init__(self, failures: int) -> None:
        self.failures, self.request_ids = failures, []  # type: list[str]

    async def RegisterPrincipal(self, request, context):  # type: ignore[no-untyped-def]
        self.request_ids.append(request.request_id)
        if len(self.request_ids) <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return pb.RegisterPrincipalResponse(principal=pb.Principal(principal_id="prn_" + "1" * 32))

    async def GetPrincipal(self, request, context):  # type: ignore[no-untyped-def]
        if request.principal_id == "slow":
            await asyncio.sleep(2)
        raise InvalidArgument.field("principal_id", "not a principal id")

    async def ListPrincipals(self, request, context):  # type: ignore[no-untyped-def]
        start = int(request.page_token or 0)
        end = start + (request.page_size or 10)
        return pb.ListPrincipalsResponse(
            principals=[pb.Principal(principal_id=p) for p in PRINCIPALS[start:end]],
            next_page_token=str(end) if end < len(PRINCIPALS) else "",
        )


async def serve(servicer: Flaky) -> GrpcServer:
    server = GrpcServer(
        host="127.0.0.1",
        port=0,
        max_message_bytes=1 << 20,
        service_descriptors=[SERVICE],
        register=lambda s: pb_grpc.add_IdentityServiceServicer_to_server(servicer, s),
    )
    await server.start()
    await server.set_serving(True)
    return server


async def stub_for(servicer: Flaky, **policy: Any) -> tuple[pb_grpc.IdentityServiceStub, GrpcServer, Any]:
    server = await serve(servicer)
    channel = make_channel(f"127.0.0.1:{server.port}", interceptors=[CallPolicy(first_backoff_seconds=0.01, **policy)])
    return pb_grpc.IdentityServiceStub(channel), server, channel


async def test_unavailable_is_retried_with_the_same_request_id() -> None:
    servicer = Flaky(failures=2)
    stub, server, channel = await stub_for(servicer, attempts=4)
    try:
        request_id = str(uuid.uuid4())
        reply = await stub.RegisterPrincipal(pb.RegisterPrincipalRequest(request_id=request_id))
        assert reply.principal.principal_id.startswith("prn_")
        assert servicer.request_ids == [request_id] * 3
    finally:
        await channel.close()
        await server.stop(0)


async def test_retries_end_and_the_error_says_how_many_attempts() -> None:
    servicer = Flaky(failures=10)
    stub, server, channel = await stub_for(servicer, attempts=3)
    try:
        with pytest.raises(RpcError) as raised:
            await stub.RegisterPrincipal(pb.RegisterPrincipalRequest(request_id=str(uuid.uuid4())))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE and raised.value.attempts == 3
        assert len(servicer.request_ids) == 3
    finally:
        await channel.close()
        await server.stop(0)


async def test_other_errors_are_not_retried_and_name_the_field() -> None:
    servicer = Flaky(failures=0)
    stub, server, channel = await stub_for(servicer)
    try:
        with pytest.raises(RpcError) as raised:
            await stub.GetPrincipal(pb.GetPrincipalRequest(principal_id="x"))
        error = raised.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.attempts == 1
        assert [v.field for v in error.field_violations] == ["principal_id"]
        assert "principal_id: not a principal id" in str(error)
        assert isinstance(error, grpc.aio.AioRpcError), "code written for grpc errors keeps working"
    finally:
        await channel.close()
        await server.stop(0)


async def test_a_call_without_a_timeout_gets_the_default_deadline() -> None:
    servicer = Flaky(failures=0)
    stub, server, channel = await stub_for(servicer, deadline_seconds=0.3)
    try:
        with pytest.raises(RpcError) as raised:
            await stub.GetPrincipal(pb.GetPrincipalRequest(principal_id="slow"))
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await channel.close()
        await server.stop(0)


async def test_pages_follow_the_page_tokens_to_the_end() -> None:
    servicer = Flaky(failures=0)
    stub, server, channel = await stub_for(servicer)
    try:
        seen = [p.principal_id async for p in pages(stub.ListPrincipals, pb.ListPrincipalsRequest(), "principals")]
        assert seen == PRINCIPALS
        seven = [p async for p in pages(stub.ListPrincipals, pb.ListPrincipalsRequest(), "principals", page_size=7)]
        assert len(seven) == len(PRINCIPALS)
    finally:
        await channel.close()
        await server.stop(0)
