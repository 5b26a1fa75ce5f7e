"""Events from one service's outbox reach another service's consumer and take effect exactly
once — on the real broker (Tansu) and a real PostgreSQL.

identity writes PrincipalRegistered through its outbox; consent's principal directory
consumes it through its inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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

from medledger_consent import storage as consent_storage
from medledger_consent.handlers import DIRECTORY_CONSUMER
from medledger_devstack.testing import Kafka, Postgres, span_exporter
from medledger_identity import storage as identity_storage
from medledger_identity.api import IdentityApi
from medledger_identity.config import IdentitySettings
from medledger_identity.credentials import SecretHasher
from medledger_identity.principals import Directory
from medledger_identity.tokens import TokenDesk, TokenSigner
from medledger_runtime import events
from medledger_runtime.keys import create_master_key_file
from medledger_runtime.outbox import COMMON_MIGRATIONS, inbox, outbox
from medledger_runtime.service import ServiceRuntime
from medledger_runtime.startup import open_key_manager
from medledger_sdk.channels import make_channel

PATIENT = vocabulary_pb2.PrincipalKind.PRINCIPAL_KIND_PATIENT
HELPERS = Path(__file__).parent / "helpers"


def _patient(mrn: str) -> bytes:
    return json.dumps(
        {"resourceType": "Patient", "identifier": [{"system": "urn:oid:2.16.840.1.113883.4.1", "value": mrn}]}
    ).encode()


def _register_patient(request_id: str | None = None, mrn: str | None = None) -> id_pb.RegisterPatientRequest:
    return id_pb.RegisterPatientRequest(
        request_id=request_id or str(uuid.uuid4()), fhir_patient=_patient(mrn or uuid.uuid4().hex)
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


async def test_registered_principal_reaches_consent_once_with_the_callers_trace(start_stack) -> None:
    exporter = span_exporter()
    async with start_stack() as stack:
        consent = stack.consent
        tracer = trace.get_tracer("test")
        async with make_channel(stack.identity_address) as channel:
            stub = id_grpc.IdentityServiceStub(channel)
            with tracer.start_as_current_span("client call") as client_span:
                reply = await stub.RegisterPatient(_register_patient())
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
        server_spans = [s for s in exporter.get_finished_spans() if s.name.endswith("/RegisterPatient")]
        assert any(s.context.trace_id == trace_id for s in server_spans)


async def test_relay_killed_between_publish_and_mark_duplicate_dropped_by_inbox(
    kafka: Kafka, postgres: Postgres, start_stack, tmp_path: Path
) -> None:
    id_url = postgres.new_database("identity")
    master = create_master_key_file(tmp_path / "master-identity.key")
    id_settings = IdentitySettings(
        database_url=id_url, master_key_file=master, keyring_file=tmp_path / "keyrings" / "identity.keyring"
    )
    # identity's API writes the principal and its event in one transaction; no relay runs yet.
    writer = ServiceRuntime("identity", id_settings, identity_storage.MIGRATIONS)
    keys = await open_key_manager(id_settings, "identity")
    assert keys is not None
    try:
        await writer.db.migrate("common", COMMON_MIGRATIONS)
        await writer.db.migrate("identity", identity_storage.MIGRATIONS)
        hasher = SecretHasher()
        principals = Directory(writer.db, keys, hasher, writer.relay.notify, source=writer.source)
        tokens = TokenDesk(writer.db, TokenSigner(keys), hasher, writer.relay.notify, source=writer.source)
        api = IdentityApi(writer, principals, tokens)
        await principals.start()
        await tokens.start()
        reply = await api.RegisterPatient(_register_patient(), None)
        async with writer.db.connect() as conn:
            event_id = (await conn.execute(select(outbox.c.event_id))).scalar_one()
    finally:
        await writer.db.close()
        await keys.aclose()

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

    # On the broker the killed relay published to.
    async with start_stack(identity_db=id_url, kafka=kafka) as stack:
        identity, consent = stack.identity, stack.consent

        # The restarted relay publishes the unmarked row again: two copies on the topic.
        async def row_published():
            async with identity.db.connect() as conn:
                query = select(outbox.c.published_at).where(outbox.c.event_id == event_id)
                return (await conn.execute(query)).scalar_one() is not None

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
            table = consent_storage.principal_directory
            query = select(func.count()).select_from(table).where(table.c.principal_id == reply.principal.principal_id)
            n = (await conn.execute(query)).scalar_one()
        assert n == 1


async def test_retried_register_with_same_request_id_has_one_effect(start_stack) -> None:
    async with start_stack(consent=False) as stack:
        identity = stack.identity
        async with identity.db.connect() as conn:
            outbox_before = (await conn.execute(select(func.count()).select_from(outbox))).scalar_one()
        async with make_channel(stack.identity_address) as channel:
            stub = id_grpc.IdentityServiceStub(channel)
            request = _register_patient(request_id="req-42")
            first, second = await asyncio.gather(stub.RegisterPatient(request), stub.RegisterPatient(request))
            third = await stub.RegisterPatient(request)
            assert first.principal.principal_id == second.principal.principal_id == third.principal.principal_id
            # The client secret reaches a retrying client too (kept encrypted meanwhile).
            assert first.client_secret == second.client_secret == third.client_secret != ""
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RegisterPatient(_register_patient(request_id="req-42"))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        async with identity.db.connect() as conn:
            patients = select(func.count()).select_from(identity_storage.principals)
            patients = patients.where(identity_storage.principals.c.kind == PATIENT)
            assert (await conn.execute(patients)).scalar_one() == 1
            assert (await conn.execute(select(func.count()).select_from(outbox))).scalar_one() == outbox_before + 1
