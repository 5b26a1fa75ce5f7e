"""Events from one service's outbox reach another service's consumer and take effect exactly
once — on the real broker (Tansu) and a real PostgreSQL.

identity writes PrincipalRegistered through its outbox; consent's principal directory
consumes it through its inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from aiokafka import AIOKafkaConsumer
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.types.v1 import vocabulary_pb2
from opentelemetry import trace
from sqlalchemy import func, select

from medledger_common import events
from medledger_common.grpc_client import make_channel
from medledger_common.outbox import COMMON_MIGRATIONS, inbox, outbox
from medledger_common.service import ServiceRuntime
from medledger_common.testing import Kafka, Postgres, running_service, span_exporter
from medledger_consent import main as consent_main
from medledger_consent import storage as consent_storage
from medledger_consent.config import ConsentSettings
from medledger_consent.handlers import DIRECTORY_CONSUMER
from medledger_identity import main as identity_main
from medledger_identity import storage as identity_storage
from medledger_identity.api import IdentityApi
from medledger_identity.config import IdentitySettings

PATIENT = vocabulary_pb2.PrincipalKind.PRINCIPAL_KIND_PATIENT
HELPERS = Path(__file__).parent / "helpers"


def _settings(cls, kafka: Kafka, database_url: str):
    return cls(
        grpc_port=0,
        metrics_port=0,
        database_url=database_url,
        kafka_bootstrap_servers=kafka.bootstrap_servers,
        outbox_poll_seconds=0.1,
    )


async def _wait_for(predicate, within: float = 20.0, interval: float = 0.05):
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = await predicate()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


async def _directory_entry(runtime: ServiceRuntime, principal_id: str):
    async with runtime.db.connect() as conn:
        return await consent_storage.get_principal(conn, principal_id)


async def _copies_on_topic(bootstrap: str, topic: str, event_id: str, expected: int, within: float = 20.0) -> int:
    """How many messages on `topic` carry `event_id` (reads until `expected` or timeout)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()

    async def copies_in_next_fetch(timeout_ms: int) -> int:
        copies = 0
        for records in (await consumer.getmany(timeout_ms=timeout_ms)).values():
            for r in records:
                with contextlib.suppress(events.MalformedEvent):
                    copies += events.decode(r.value).id == event_id
        return copies

    found = 0
    try:
        deadline = asyncio.get_running_loop().time() + within
        while found < expected and asyncio.get_running_loop().time() < deadline:
            found += await copies_in_next_fetch(300)
        # Read a little longer to be sure there is no extra copy.
        found += await copies_in_next_fetch(500)
    finally:
        await consumer.stop()
    return found


async def test_registered_principal_reaches_consent_once_with_the_callers_trace(
    kafka: Kafka, postgres: Postgres
) -> None:
    exporter = span_exporter()
    id_settings = _settings(IdentitySettings, kafka, postgres.new_database("identity"))
    co_settings = _settings(ConsentSettings, kafka, postgres.new_database("consent"))
    async with (
        running_service("identity", id_settings, identity_storage.MIGRATIONS, identity_main.build) as identity,
        running_service("consent", co_settings, consent_storage.MIGRATIONS, consent_main.build) as consent,
    ):
        tracer = trace.get_tracer("test")
        async with make_channel(f"127.0.0.1:{identity.grpc_port}") as channel:
            stub = id_grpc.IdentityServiceStub(channel)
            with tracer.start_as_current_span("client call") as client_span:
                reply = await stub.RegisterPrincipal(
                    id_pb.RegisterPrincipalRequest(request_id=str(uuid.uuid4()), kind=PATIENT)
                )
            trace_id = client_span.get_span_context().trace_id
        principal_id = reply.principal.principal_id
        entry = await _wait_for(lambda: _directory_entry(consent, principal_id))
        assert entry.kind == PATIENT
        assert entry.status == vocabulary_pb2.PrincipalStatus.PRINCIPAL_STATUS_ACTIVE

        # The consumer's span belongs to the trace of the gRPC call that caused the event.
        def consumer_spans():
            return [
                s
                for s in exporter.get_finished_spans()
                if s.name == f"{events.TOPICS['identity']} process"
                and s.attributes.get("messaging.consumer.group.name") == DIRECTORY_CONSUMER
                and s.context.trace_id == trace_id
            ]

        await _wait_for(lambda: asyncio.sleep(0, consumer_spans()))
        server_spans = [s for s in exporter.get_finished_spans() if s.name.endswith("/RegisterPrincipal")]
        assert any(s.context.trace_id == trace_id for s in server_spans)


async def test_relay_killed_between_publish_and_mark_duplicate_dropped_by_inbox(
    kafka: Kafka, postgres: Postgres
) -> None:
    id_url = postgres.new_database("identity")
    id_settings = _settings(IdentitySettings, kafka, id_url)
    # identity's API writes the principal and its event in one transaction; no relay runs yet.
    writer = ServiceRuntime("identity", id_settings, identity_storage.MIGRATIONS)
    try:
        await writer.db.migrate("common", COMMON_MIGRATIONS)
        await writer.db.migrate("identity", identity_storage.MIGRATIONS)
        reply = await IdentityApi(writer).RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(request_id=str(uuid.uuid4()), kind=PATIENT), None
        )
        async with writer.db.connect() as conn:
            event_id = (await conn.execute(select(outbox.c.event_id))).scalar_one()
    finally:
        await writer.db.close()

    # A relay publishes the row, then dies by SIGKILL before marking it published.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HELPERS / "relay_killed_after_publish.py"),
        id_url,
        kafka.bootstrap_servers,
        "identity",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == -9, err.decode()
    assert "published 1 rows" in out.decode()

    co_settings = _settings(ConsentSettings, kafka, postgres.new_database("consent"))
    async with (
        running_service("identity", id_settings, identity_storage.MIGRATIONS, identity_main.build) as identity,
        running_service("consent", co_settings, consent_storage.MIGRATIONS, consent_main.build) as consent,
    ):
        # The restarted relay publishes the unmarked row again: two copies on the topic.
        async def row_published():
            async with identity.db.connect() as conn:
                return (await conn.execute(select(outbox.c.published_at))).scalar_one() is not None

        await _wait_for(row_published)
        assert await _copies_on_topic(kafka.bootstrap_servers, events.TOPICS["identity"], event_id, 2) == 2
        await _wait_for(lambda: _directory_entry(consent, reply.principal.principal_id))

        async def inbox_rows():
            async with consent.db.connect() as conn:
                return (
                    await conn.execute(select(func.count()).select_from(inbox).where(inbox.c.event_id == event_id))
                ).scalar_one()

        # Give the duplicate time to be consumed, then: applied once.
        await asyncio.sleep(1.5)
        assert await inbox_rows() == 1
        async with consent.db.connect() as conn:
            n = (await conn.execute(select(func.count()).select_from(consent_storage.principal_directory))).scalar_one()
        assert n == 1


async def test_retried_register_with_same_request_id_has_one_effect(kafka: Kafka, postgres: Postgres) -> None:
    id_settings = _settings(IdentitySettings, kafka, postgres.new_database("identity"))
    async with running_service("identity", id_settings, identity_storage.MIGRATIONS, identity_main.build) as identity:
        async with make_channel(f"127.0.0.1:{identity.grpc_port}") as channel:
            stub = id_grpc.IdentityServiceStub(channel)
            request = id_pb.RegisterPrincipalRequest(request_id="req-42", kind=PATIENT)
            first, second = await asyncio.gather(stub.RegisterPrincipal(request), stub.RegisterPrincipal(request))
            third = await stub.RegisterPrincipal(request)
            assert first.principal.principal_id == second.principal.principal_id == third.principal.principal_id
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RegisterPrincipal(
                    id_pb.RegisterPrincipalRequest(
                        request_id="req-42", kind=vocabulary_pb2.PrincipalKind.PRINCIPAL_KIND_RESEARCHER
                    )
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        async with identity.db.connect() as conn:
            assert (await conn.execute(select(func.count()).select_from(identity_storage.principals))).scalar_one() == 1
            assert (await conn.execute(select(func.count()).select_from(outbox))).scalar_one() == 1
