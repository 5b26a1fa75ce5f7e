"""The common gRPC server bootstrap: health, reflection, error details, size limits, TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from medledger.identity.v1 import identity_service_pb2 as pb
from medledger.identity.v1 import identity_service_pb2_grpc as pb_grpc
from prometheus_client import REGISTRY

from medledger_runtime.errors import InvalidArgument, NotFound, Unauthenticated
from medledger_runtime.grpc_client import service_channel
from medledger_runtime.grpc_server import GrpcServer, TLSFiles, with_unary_behavior
from medledger_runtime.settings import ServiceSettings
from medledger_sdk.channels import make_channel

SERVICE = pb.DESCRIPTOR.services_by_name["IdentityService"]


class FakeIdentity(pb_grpc.IdentityServiceServicer):
    """A servicer that exercises the error paths; the real one lives in services/identity."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def RegisterPrincipal(self, request, context):
        if not request.request_id:
            raise InvalidArgument.field("request_id", "required")
        if request.request_id == "boom":
            raise RuntimeError("secret internal detail")
        if request.request_id == "slow":
            await self.release.wait()
        return pb.RegisterPrincipalResponse(principal=pb.Principal(principal_id="pat_1"))

    async def GetPrincipal(self, request, context):
        raise NotFound("no such principal")


async def _server(servicer, tls: TLSFiles | None = None, max_bytes: int = 64 * 1024) -> GrpcServer:
    server = GrpcServer(
        host="127.0.0.1",
        port=0,
        max_message_bytes=max_bytes,
        service_descriptors=[SERVICE],
        register=lambda s: pb_grpc.add_IdentityServiceServicer_to_server(servicer, s),
        tls=tls,
    )
    await server.start()
    await server.set_serving(True)
    return server


async def test_health_reflection_and_error_details() -> None:
    server = await _server(FakeIdentity())
    try:
        async with make_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", SERVICE.full_name):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING

            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = refl.ServerReflectionInfo()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            listed = await call.read()
            await call.done_writing()
            names = {s.name for s in listed.list_services_response.service}
            assert {"grpc.health.v1.Health", "medledger.identity.v1.IdentityService"} <= names

            stub = pb_grpc.IdentityServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RegisterPrincipal(pb.RegisterPrincipalRequest())
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            status = rpc_status.from_call(err.value)
            bad = error_details_pb2.BadRequest()
            assert status.details[0].Unpack(bad)
            assert bad.field_violations[0].field == "request_id"

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetPrincipal(pb.GetPrincipalRequest(principal_id="x"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

            # An unexpected error is INTERNAL without its message.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RegisterPrincipal(pb.RegisterPrincipalRequest(request_id="boom"))
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "secret" not in (err.value.details() or "")

            # Oversize messages are refused before they reach the servicer.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RegisterPrincipal(pb.RegisterPrincipalRequest(request_id="x" * 100_000))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(0)

    def handled(code: str) -> float:
        value = REGISTRY.get_sample_value(
            "grpc_server_handled_total",
            {"grpc_service": SERVICE.full_name, "grpc_method": "RegisterPrincipal", "grpc_code": code},
        )
        return value or 0.0

    assert handled("INVALID_ARGUMENT") >= 1
    assert handled("INTERNAL") >= 1
    # Counters exist at zero for every method before it is called.
    assert (
        REGISTRY.get_sample_value(
            "grpc_server_started_total", {"grpc_service": SERVICE.full_name, "grpc_method": "GetPrincipal"}
        )
        is not None
    )


async def test_graceful_stop_reports_not_serving_and_drains_in_flight_calls() -> None:
    servicer = FakeIdentity()
    server = await _server(servicer)
    async with make_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.IdentityServiceStub(channel)
        in_flight = asyncio.ensure_future(stub.RegisterPrincipal(pb.RegisterPrincipalRequest(request_id="slow")))
        await asyncio.sleep(0.2)
        stopping = asyncio.create_task(server.stop(grace=10))
        await asyncio.sleep(0.2)
        status = await server.health.Check(health_pb2.HealthCheckRequest(service=""), None)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        servicer.release.set()
        reply = await in_flight
        assert reply.principal.principal_id == "pat_1"
        await stopping


def _cert(name: str, issuer_key, issuer_name, key, *, ca: bool = False, san: str | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, key, cert: x509.Certificate) -> tuple[Path, Path]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".crt")
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for `identity.medledger.test` and a client certificate."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medledger test CA")])
    ca_cert = _cert("medledger test CA", ca_key, ca_name, ca_key, ca=True)
    (tmp_path / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _cert("identity", ca_key, ca_name, server_key, san="identity.medledger.test")
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _cert("records", ca_key, ca_name, client_key)
    s_cert, s_key = _write(tmp_path / "server", server_key, server_cert)
    c_cert, c_key = _write(tmp_path / "client", client_key, client_cert)
    return {
        "ca": tmp_path / "ca.crt",
        "server_cert": s_cert,
        "server_key": s_key,
        "client_cert": c_cert,
        "client_key": c_key,
    }


async def test_mtls_round_trip_and_a_client_without_a_certificate_is_refused(pki: dict[str, Path]) -> None:
    server = await _server(FakeIdentity(), tls=TLSFiles(pki["server_cert"], pki["server_key"], pki["ca"]))
    target = f"127.0.0.1:{server.port}"
    try:
        await _accepted_then_refused(
            make_channel(
                target,
                ca_file=pki["ca"],
                cert_file=pki["client_cert"],
                key_file=pki["client_key"],
                server_name_override="identity.medledger.test",
            ),
            make_channel(target, ca_file=pki["ca"], server_name_override="identity.medledger.test"),
        )
    finally:
        await server.stop(0)


async def _accepted_then_refused(
    accepted: AbstractAsyncContextManager[grpc.aio.Channel], refused: AbstractAsyncContextManager[grpc.aio.Channel]
) -> None:
    """A call through the `accepted` channel succeeds; through `refused` the server turns the
    connection down (UNAVAILABLE)."""
    async with accepted as channel:
        reply = await pb_grpc.IdentityServiceStub(channel).RegisterPrincipal(
            pb.RegisterPrincipalRequest(request_id="r1"), timeout=10
        )
        assert reply.principal.principal_id == "pat_1"
    async with refused as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.IdentityServiceStub(channel).RegisterPrincipal(
                pb.RegisterPrincipalRequest(request_id="r1"), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_calls_between_services_use_the_services_own_tls_files(tmp_path: Path) -> None:
    """`service_channel`: with MEDLEDGER_TLS_CA_FILE set, a service calls another over TLS and
    presents its own certificate (the files its server uses), so servers that require client
    certificates accept it; without the CA file the channel is plaintext, and refused by them."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medledger mesh CA")])
    (tmp_path / "ca.crt").write_bytes(
        _cert("medledger mesh CA", ca_key, ca_name, ca_key, ca=True).public_bytes(serialization.Encoding.PEM)
    )
    identity_key, records_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    id_cert, id_key = _write(tmp_path / "identity", identity_key, _cert("identity", ca_key, ca_name, identity_key,
                                                                         san="localhost"))  # fmt: skip
    rec_cert, rec_key = _write(tmp_path / "records", records_key, _cert("records", ca_key, ca_name, records_key,
                                                                        san="localhost"))  # fmt: skip
    server = await _server(FakeIdentity(), tls=TLSFiles(id_cert, id_key, tmp_path / "ca.crt"))
    records = ServiceSettings(tls_cert_file=rec_cert, tls_key_file=rec_key, tls_ca_file=tmp_path / "ca.crt")
    plaintext = ServiceSettings()
    try:
        await _accepted_then_refused(
            service_channel(records, f"localhost:{server.port}"),
            service_channel(plaintext, f"localhost:{server.port}"),
        )
    finally:
        await server.stop(0)


class _Refusing(grpc.aio.ServerInterceptor):
    """Stands in for the authentication interceptor: refuses every call as unauthenticated."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)

        async def refuse(request, context):
            raise Unauthenticated("this call needs an access token")

        return with_unary_behavior(handler, refuse)


async def test_request_checks_run_after_authentication_and_before_the_handler() -> None:
    """A malformed request (a NUL in a string) is INVALID_ARGUMENT naming the field, but only for
    a caller who got past authentication: without a token, UNAUTHENTICATED, telling nothing."""
    malformed = pb.GetPrincipalRequest(principal_id="pat_\x00")
    for interceptors, code in (
        ([], grpc.StatusCode.INVALID_ARGUMENT),
        ([_Refusing()], grpc.StatusCode.UNAUTHENTICATED),
    ):
        servicer = FakeIdentity()
        server = GrpcServer(
            host="127.0.0.1",
            port=0,
            max_message_bytes=64 * 1024,
            service_descriptors=[SERVICE],
            register=lambda s, servicer=servicer: pb_grpc.add_IdentityServiceServicer_to_server(servicer, s),
            interceptors=interceptors,
        )
        await server.start()
        try:
            async with make_channel(f"127.0.0.1:{server.port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await pb_grpc.IdentityServiceStub(channel).GetPrincipal(malformed, timeout=5)
                assert err.value.code() == code
        finally:
            await server.stop(0)
