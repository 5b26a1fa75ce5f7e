"""Dependency outages (PostgreSQL restarting, a service it calls restarting) are UNAVAILABLE to a
caller and a reason to retry for a background job or a start — never INTERNAL, never a stop.
Found by the chaos suite: records answered INTERNAL while consent restarted, consent stopped when
its reconciliation met a refused database connection, records exited when it started during a
database outage."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import grpc
import pytest
import sqlalchemy
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, NotLeaderForPartitionError
from medledger.identity.v1 import identity_service_pb2 as pb
from medledger.identity.v1 import identity_service_pb2_grpc as pb_grpc
from sqlalchemy.ext.asyncio import create_async_engine

from medledger_devstack import localstack
from medledger_runtime.errors import Unavailable, dependency_outage
from medledger_runtime.grpc_server import GrpcServer
from medledger_runtime.service import _retry_until_up
from medledger_sdk.channels import make_channel

SERVICE = pb.DESCRIPTOR.services_by_name["IdentityService"]


async def _refused_database_error() -> Exception:
    engine = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{localstack.closed_port()}/x")
    try:
        async with engine.connect():
            pass
    except Exception as exc:
        return exc
    finally:
        await engine.dispose()
    raise AssertionError("nothing listens there, the connection must fail")


async def _missing_table_error() -> Exception:
    engine = create_async_engine("sqlite+aiosqlite:///:memory:")
    try:
        async with engine.connect() as conn:
            await conn.execute(sqlalchemy.text("SELECT * FROM no_such_table"))
    except Exception as exc:
        return exc
    finally:
        await engine.dispose()
    raise AssertionError("the table does not exist")


async def test_what_counts_as_an_outage() -> None:
    assert dependency_outage(await _refused_database_error()) is not None
    locked = sqlalchemy.exc.OperationalError("UPDATE", {}, sqlite3.OperationalError("database is locked"))
    assert dependency_outage(locked) == "the database"
    # A bug is not an outage, though SQLAlchemy raises OperationalError for it on SQLite.
    assert dependency_outage(await _missing_table_error()) is None
    assert dependency_outage(NotLeaderForPartitionError()) == "Kafka"  # aiokafka marks it retriable
    assert dependency_outage(KafkaTimeoutError()) == "Kafka"
    assert dependency_outage(MessageSizeTooLargeError()) is None
    assert dependency_outage(ValueError("bad")) is None
    assert dependency_outage(Unavailable("Vault is sealed")) is not None  # our own word for an outage
    assert dependency_outage(sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate key"))) is None


async def test_asyncpg_errors_met_unwrapped_count_as_the_database_being_away() -> None:
    # Hot reads go through asyncpg itself (db.DriverQuery): its errors reach the error mapping
    # without SQLAlchemy around them.
    from asyncpg import exceptions as pg

    from medledger_runtime.db import Database, DriverQuery

    for error in (
        pg.AdminShutdownError("terminating connection due to administrator command"),
        pg.CannotConnectNowError("the database system is starting up"),
        pg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        pg.TooManyConnectionsError("sorry, too many clients already"),
        pg.InterfaceError("connection is closed"),
    ):
        assert dependency_outage(error) == "the database", error
    assert dependency_outage(pg.UniqueViolationError("duplicate key")) is None
    assert dependency_outage(pg.UndefinedTableError("relation does not exist")) is None
    db = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{localstack.closed_port()}/x")
    try:
        with pytest.raises(Exception) as refused:
            await DriverQuery(sqlalchemy.select(sqlalchemy.literal(1))).first(db, {})
        assert dependency_outage(refused.value) is not None
    finally:
        await db.close()


class Failing(pb_grpc.IdentityServiceServicer):
    """Fails the way a handler does when what it depends on is away, or with a bug."""

    def __init__(self, downstream: str) -> None:
        self.downstream = downstream
        self.database_error: Exception | None = None

    async def GetPrincipal(self, request, context):
        if request.principal_id == "database":
            assert self.database_error is not None
            raise self.database_error
        if request.principal_id == "downstream":
            # A call to another service that is down, as records calls consent.
            async with make_channel(self.downstream) as channel:
                await pb_grpc.IdentityServiceStub(channel).GetJwks(pb.GetJwksRequest(), timeout=2)
        raise RuntimeError("a bug")


async def test_outages_are_unavailable_to_the_caller_and_bugs_internal() -> None:
    servicer = Failing(f"127.0.0.1:{localstack.closed_port()}")
    servicer.database_error = await _refused_database_error()
    server = GrpcServer(
        host="127.0.0.1",
        port=0,
        max_message_bytes=64 * 1024,
        service_descriptors=[SERVICE],
        register=lambda s: pb_grpc.add_IdentityServiceServicer_to_server(servicer, s),
    )
    await server.start()
    await server.set_serving(True)
    try:
        async with make_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.IdentityServiceStub(channel)
            for cause, code in (
                ("database", grpc.StatusCode.UNAVAILABLE),
                ("downstream", grpc.StatusCode.UNAVAILABLE),
                ("bug", grpc.StatusCode.INTERNAL),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.GetPrincipal(pb.GetPrincipalRequest(principal_id=cause))
                assert raised.value.code() == code, cause
    finally:
        await server.stop(0)


async def test_a_start_waits_for_the_database_but_not_for_a_bug() -> None:
    tries = 0

    async def migrate() -> str:
        nonlocal tries
        tries += 1
        if tries < 3:
            raise ConnectionRefusedError(111, "Connect call failed")
        return "migrated"

    assert await _retry_until_up("database", migrate, only_outages=True) == "migrated"
    assert tries == 3

    async def broken_migration() -> str:
        nonlocal tries
        tries += 1
        raise ValueError("syntax error in a migration")

    tries = 0
    with pytest.raises(ValueError):
        await _retry_until_up("database", broken_migration, only_outages=True)
    assert tries == 1


async def test_a_start_waits_for_a_sealed_key_manager(tmp_path: Path) -> None:
    """A start-up step that makes its signing key (audit's checkpoint keys, identity's token key)
    while OpenBao is sealed waits until it is unsealed, rather than ending the service: chaos
    met a restarted audit exiting while OpenBao was stopped."""
    from medledger_devstack.openbao import OpenBao
    from medledger_runtime.keys import KeyType, VaultKeyManager

    bao = OpenBao(tmp_path / "state", tmp_path / "secrets").start()
    keys = VaultKeyManager(bao.address, token=bao.root_token, timeout=2.0)
    try:
        bao.seal()
        loop = asyncio.get_running_loop()
        unsealed = loop.run_in_executor(None, lambda: (time.sleep(1.0), bao.unseal()))
        info = await _retry_until_up(
            "a start-up step's dependency", lambda: keys.ensure_key("t-signing", KeyType.ED25519), only_outages=True
        )
        await unsealed
        assert info.latest_version == 1
    finally:
        await keys.aclose()
        bao.stop()
