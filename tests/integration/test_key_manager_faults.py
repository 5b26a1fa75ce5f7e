"""identity, consent and records on PostgreSQL and Kafka, with their keys in an OpenBao of this
module's own, while that OpenBao is sealed, stopped (its process gone; under load also killed)
or answering 403 (the services' policies emptied): a request that needs the key manager is
refused with UNAVAILABLE (PERMISSION_DENIED for the 403), never INTERNAL or DATA_LOSS; it leaves
nothing behind (no row, no event, no idempotency record that would replay the failure); and once
OpenBao is back the client's retry with the same request_id takes effect exactly once. Records'
data-key cache keeps a patient whose keys it holds going through the fault (libs/runtime/KEYS.md,
"Data-key cache"); with the cache off, reads need OpenBao too. Under a load of 16 requests in
flight, every acknowledged write exists once and every refusal is UNAVAILABLE or
PERMISSION_DENIED."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
from medledger.events.v1 import consent_events_pb2, identity_events_pb2, records_events_pb2
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.records.v1 import records_service_pb2 as pb
from medledger.records.v1 import records_service_pb2_grpc as pb_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab
from prometheus_client import REGISTRY
from sqlalchemy import and_, func, select

from medledger_consent import storage as consent_storage
from medledger_devstack import synthetic
from medledger_devstack.localstack import repo_root
from medledger_devstack.openbao import POLICY_PREFIX, OpenBao
from medledger_identity import storage as identity_storage
from medledger_records import storage as records_storage
from medledger_runtime.db import Database
from medledger_runtime.events import decode, unpack
from medledger_runtime.outbox import idempotency_keys, outbox
from medledger_sdk.channels import make_channel

Kind = vocab.PrincipalKind
CODE = grpc.StatusCode
OBS = vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS
FHIR_JSON = "application/fhir+json"
LIFE_THREATENING = co_pb.BreakGlassReason.BREAK_GLASS_REASON_LIFE_THREATENING
# The services whose keys live in OpenBao here, by their policy's file stem in deploy/vault/.
SERVICES = ("identity", "consent", "records")
# What a service's policy holds during the 403 fault: its token is valid but reaches no key.
NO_KEYS = 'path "sys/seal-status" { capabilities = ["read"] }\n'
# How long a refused client waits before it tries the same request again.
RETRY_PAUSE = 0.05


def rid() -> str:
    return str(uuid.uuid4())


def observation(tag: str) -> bytes:
    """The seeded synthetic patients' first Observation, with `tag` as its id (to tell versions apart)."""
    return json.dumps({**synthetic.population().first("Observation"), "id": tag}).encode()


def patient_json() -> bytes:
    return json.dumps(
        {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": uuid.uuid4().hex}]}
    ).encode()


# -- the faults --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    name: str
    code: grpc.StatusCode  # what a request that needs a key gets meanwhile
    says: str  # what its message says
    begin: Callable[[OpenBao], None]
    end: Callable[[OpenBao], None]


def _forbid(bao: OpenBao) -> None:
    client = bao.root_client()
    for stem in SERVICES:
        client.sys.create_or_update_policy(POLICY_PREFIX + stem, NO_KEYS)


def _restore_policies(bao: OpenBao) -> None:
    """The services' policies as deploy/vault/ has them (what `start` loads)."""
    assert bao.policies_dir is not None
    client = bao.root_client()
    for path in sorted(bao.policies_dir.glob("*.hcl")):
        client.sys.create_or_update_policy(POLICY_PREFIX + path.stem, path.read_text(encoding="utf-8"))


FAULTS = (
    Fault("sealed", CODE.UNAVAILABLE, "sealed", OpenBao.seal, lambda b: b.unseal()),
    Fault("stopped", CODE.UNAVAILABLE, "cannot reach", lambda b: b.stop(), lambda b: b.start()),
    Fault("forbidden", CODE.PERMISSION_DENIED, "denied", _forbid, _restore_policies),
)
# Under load, a crash too: requests in flight lose their connection rather than meet a sealing server.
LOAD_FAULTS = (*FAULTS, Fault("killed", CODE.UNAVAILABLE, "cannot reach", OpenBao.kill, lambda b: b.start()))


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """This module's own OpenBao, with the repository's policies: its tests seal and stop it."""
    folder = tmp_path_factory.mktemp("faults-bao")
    server = OpenBao(folder / "state", folder / "secrets", repo_root() / "deploy" / "vault")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def healthy_bao(bao: OpenBao) -> Iterator[OpenBao]:
    """The module's OpenBao running, unsealed and with its policies, before and after a test."""

    def heal() -> None:
        bao.start()  # no-op when running
        bao.unseal()
        _restore_policies(bao)

    heal()
    yield bao
    heal()


def on_vault(bao: OpenBao, service: str) -> dict[str, Any]:
    """A service's settings for its keys in `bao`, with the token of its own policy."""
    settings: dict[str, Any] = {
        "key_manager": "vault",
        "vault_addr": bao.address,
        "vault_token_file": bao.token_file(service),
    }
    if POLICY_PREFIX + f"{service}-erasure" in bao.policies:  # the erasure credential, where it has one
        settings["erasure_vault_token_file"] = bao.token_file(f"{service}-erasure")
    return settings


def stack_on_vault(bao: OpenBao, **records: Any) -> dict[str, Any]:
    return {
        "records": True,
        "identity_settings": on_vault(bao, "identity"),
        "consent_settings": on_vault(bao, "consent"),
        "records_settings": {**on_vault(bao, "records"), **records},
    }


# -- looking into the databases ----------------------------------------------------------------


async def count(db: Database, table: Any, *where: Any) -> int:
    async with db.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table).where(*where))).scalar_one())


async def remembered(db: Database, scope: str, request_id: str) -> bool:
    """Whether the idempotency table holds a response for (scope, request_id)."""
    k = idempotency_keys.c
    return await count(db, idempotency_keys, and_(k.scope == scope, k.request_id == request_id)) > 0


async def events_of(db: Database, cls: type[Any]) -> list[Any]:
    """Every event of type `cls` in a service's outbox (published or not), as `cls`."""
    async with db.connect() as conn:
        # In the order they were written: the tests take the ones after a point.
        values = [bytes(r.value) for r in await conn.execute(select(outbox.c.value).order_by(outbox.c.id))]
    found = [decode(v) for v in values]
    return [unpack(e, cls) for e in found if e.type == cls.DESCRIPTOR.full_name]


async def refused_for(fault: Fault, call: Awaitable[object]) -> None:
    """The call is refused with the fault's code, and its message says why."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        assert (error.code(), fault.name) == (fault.code, fault.name), error.details()
        assert fault.says in (error.details() or ""), error.details()
        return
    raise AssertionError(f"the call succeeded while OpenBao was {fault.name}")


def key_manager_errors(code: grpc.StatusCode) -> float:
    """medledger_key_manager_errors_total of the Vault backend with `code`, over every operation
    (the services run in this process: their counters are this registry's)."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "medledger_key_manager_errors"
        for sample in metric.samples
        if sample.name.endswith("_total")
        and (sample.labels.get("backend"), sample.labels.get("code")) == ("vault", code.name)
    )


async def in_thread(fn: Callable[[OpenBao], None], bao: OpenBao) -> None:
    """OpenBao's set-up calls block: off the event loop, where the services keep running."""
    await asyncio.to_thread(fn, bao)


# -- the people --------------------------------------------------------------------------------


@dataclass
class Patient:
    patient_id: str
    secret: str
    records: pb_grpc.RecordsServiceStub


@dataclass
class People:
    public: id_grpc.IdentityServiceStub
    admin: id_grpc.IdentityServiceStub
    org_id: str
    doctor: co_grpc.ConsentServiceStub


async def register_patient(stack: Any, public: id_grpc.IdentityServiceStub) -> Patient:
    reply = await public.RegisterPatient(id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=patient_json()))
    pid = reply.principal.principal_id
    client = stack.client(pid, reply.client_secret)
    await client.token("medledger.records")  # issued now: IssueToken needs OpenBao (it signs)
    return Patient(
        pid,
        reply.client_secret,
        pb_grpc.RecordsServiceStub(client.channel(f"127.0.0.1:{stack.records.grpc_port}", "medledger.records")),
    )


async def people(stack: Any) -> People:
    public = id_grpc.IdentityServiceStub(make_channel(stack.identity_address))
    admin = id_grpc.IdentityServiceStub(stack.admin().channel(stack.identity_address, "medledger.identity"))
    org = await admin.RegisterPrincipal(
        id_pb.RegisterPrincipalRequest(request_id=rid(), kind=Kind.PRINCIPAL_KIND_ORGANIZATION)
    )
    org_id = org.principal.principal_id

    async def staff(role: int | None = None) -> tuple[str, Any]:
        reply = await admin.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(
                request_id=rid(),
                kind=Kind.PRINCIPAL_KIND_PRACTITIONER,
                organization_id=org_id,
                fhir_resource=json.dumps(
                    {"resourceType": "Practitioner", "identifier": [{"system": "urn:npi", "value": uuid.uuid4().hex}]}
                ).encode(),
            )
        )
        pid = reply.principal.principal_id
        if role is not None:
            await admin.AssignRole(id_pb.AssignRoleRequest(request_id=rid(), principal_id=pid, role=role))
        client = stack.client(pid, reply.client_secret)
        await client.token("medledger.consent")
        return pid, co_grpc.ConsentServiceStub(client.channel(stack.consent_address, "medledger.consent"))

    doctor_id, doctor = await staff()
    org_admin_id, org_admin = await staff(vocab.Role.ROLE_ORG_ADMIN)
    await stack.known_to_consent(org_id, doctor_id, org_admin_id)
    await org_admin.SetBreakGlassPolicy(
        co_pb.SetBreakGlassPolicyRequest(
            request_id=rid(), policy=co_pb.BreakGlassPolicy(organization_id=org_id, enabled=True, max_uses=100)
        )
    )
    return People(public, admin, org_id, doctor)


def put_request(patient: Patient, tag: str, record_id: str = "") -> pb.PutRecordRequest:
    return pb.PutRecordRequest(
        request_id=rid(),
        patient_id=patient.patient_id,
        record_id=record_id,
        category=OBS,
        content=observation(tag),
        media_type=FHIR_JSON,
    )


# -- the tests ---------------------------------------------------------------------------------


async def test_each_fault_refuses_what_needs_a_key_leaves_nothing_and_the_retry_lands_once(
    start_stack, healthy_bao: OpenBao
) -> None:
    """Records with its data-key cache on (the default): per fault, a patient whose keys are
    cached goes on writing and reading; a new patient's first put, a registration, a token, a
    break-glass and a read of a patient's resource are refused and leave nothing; after the
    fault each retry lands once."""
    bao = healthy_bao
    async with start_stack(**stack_on_vault(bao)) as stack:
        assert stack.records is not None and stack.consent is not None
        ppl = await people(stack)
        cached = await register_patient(stack, ppl.public)
        first = await cached.records.PutRecord(put_request(cached, "cached-0"))  # its keys now cached

        for fault in FAULTS:
            fresh = await register_patient(stack, ppl.public)  # no record yet: nothing cached
            await stack.known_to_consent(fresh.patient_id)
            put = put_request(fresh, f"{fault.name}-first")
            registration = id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=patient_json())
            breaking = co_pb.BreakGlassRequest(
                request_id=rid(),
                patient_id=fresh.patient_id,
                reason=LIFE_THREATENING,
                justification=f"Unresponsive on arrival ({fault.name}); need medication history",
            )
            reading = id_pb.GetPrincipalRequest(principal_id=cached.patient_id, include_fhir_resource=True)
            principals_before = await count(stack.identity.db, identity_storage.principals)
            identifiers_before = await count(stack.identity.db, identity_storage.principal_identifiers)
            registered_before = len(await events_of(stack.identity.db, identity_events_pb2.PrincipalRegistered))

            await in_thread(fault.begin, bao)
            try:
                # The cached patient goes on: a new version and a read need no key-manager call.
                again = await cached.records.PutRecord(put_request(cached, f"cached-{fault.name}", first.record_id))
                got = await cached.records.GetRecord(pb.GetRecordRequest(record_id=first.record_id))
                assert (got.version, json.loads(got.content)["id"]) == (again.version, f"cached-{fault.name}")

                # A patient without cached keys: refused, with a message saying why.
                await refused_for(fault, fresh.records.PutRecord(put))
                await refused_for(fault, ppl.public.RegisterPatient(registration))
                credentials = id_pb.IssueTokenRequest(
                    principal_id=fresh.patient_id, client_secret=fresh.secret, audience="medledger.records"
                )
                await refused_for(fault, ppl.public.IssueToken(credentials))
                await refused_for(fault, ppl.doctor.BreakGlass(breaking))
                # A read of a patient's resource too: refused, not answered without the resource
                # (which is how identity answers once the patient's key is erased).
                await refused_for(fault, ppl.admin.GetPrincipal(reading))

                # Nothing half-written, and no idempotency record that would replay the refusal.
                rdb, idb, cdb = stack.records.db, stack.identity.db, stack.consent.db
                of_fresh = records_storage.records.c.patient_id == fresh.patient_id
                assert await count(rdb, records_storage.records, of_fresh) == 0
                assert (
                    await count(
                        rdb,
                        records_storage.record_versions,
                        records_storage.record_versions.c.patient_id == fresh.patient_id,
                    )
                    == 0
                )
                stored = await events_of(rdb, records_events_pb2.RecordStored)
                assert [e for e in stored if e.patient_id == fresh.patient_id] == []
                assert not await remembered(rdb, "records.PutRecord", put.request_id)
                assert await count(idb, identity_storage.principals) == principals_before
                assert await count(idb, identity_storage.principal_identifiers) == identifiers_before
                assert len(await events_of(idb, identity_events_pb2.PrincipalRegistered)) == registered_before
                assert not await remembered(idb, "identity.RegisterPatient", registration.request_id)
                accesses = consent_storage.break_glass_accesses
                assert await count(cdb, accesses, accesses.c.patient_id == fresh.patient_id) == 0
                started = await events_of(cdb, consent_events_pb2.BreakGlassAccessStarted)
                assert [e for e in started if e.patient_id == fresh.patient_id] == []
                assert not await remembered(cdb, "consent.BreakGlass", breaking.request_id)
            finally:
                await in_thread(fault.end, bao)

            # The same requests again, as a client retries them: each takes effect once.
            written = await fresh.records.PutRecord(put)
            assert written.version == 1
            replayed = await fresh.records.PutRecord(put)
            assert replayed == written
            of_fresh = records_storage.records.c.patient_id == fresh.patient_id
            assert await count(stack.records.db, records_storage.records, of_fresh) == 1
            stored = await events_of(stack.records.db, records_events_pb2.RecordStored)
            assert [(e.record_id, e.version) for e in stored if e.patient_id == fresh.patient_id] == [
                (written.record_id, 1)
            ]
            got = await fresh.records.GetRecord(pb.GetRecordRequest(record_id=written.record_id))
            assert json.loads(got.content)["id"] == f"{fault.name}-first"

            patient = await ppl.public.RegisterPatient(registration)
            assert await ppl.public.RegisterPatient(registration) == patient  # the secret too
            assert await count(stack.identity.db, identity_storage.principals) == principals_before + 1
            registered = await events_of(stack.identity.db, identity_events_pb2.PrincipalRegistered)
            assert [e.principal_id for e in registered[registered_before:]] == [patient.principal.principal_id]
            token = await ppl.public.IssueToken(
                id_pb.IssueTokenRequest(
                    principal_id=patient.principal.principal_id,
                    client_secret=patient.client_secret,
                    audience="medledger.records",
                )
            )
            assert token.access_token
            assert json.loads((await ppl.admin.GetPrincipal(reading)).fhir_resource)["resourceType"] == "Patient"

            access = (await ppl.doctor.BreakGlass(breaking)).access
            assert (await ppl.doctor.BreakGlass(breaking)).access == access
            accesses = consent_storage.break_glass_accesses
            assert await count(stack.consent.db, accesses, accesses.c.patient_id == fresh.patient_id) == 1
            started = await events_of(stack.consent.db, consent_events_pb2.BreakGlassAccessStarted)
            assert [e.access_id for e in started if e.patient_id == fresh.patient_id] == [access.access_id]


@dataclass
class Outcome:
    """One call of the load: the phases it began and ended in, and how it ended."""

    began: str
    ended: str
    code: grpc.StatusCode
    details: str = ""


async def test_under_load_every_acknowledged_write_exists_once_and_every_refusal_is_unavailable_or_denied(
    start_stack, healthy_bao: OpenBao
) -> None:
    """Records with its data-key cache off (every put and get asks OpenBao): 16 clients keep
    writing new versions of their records and reading them back through a seal, a stop, a 403 and
    a crash (SIGKILL), each refused request retried with its request_id until it lands."""
    bao = healthy_bao
    async with start_stack(**stack_on_vault(bao, data_key_cache_max_age_seconds=0)) as stack:
        assert stack.records is not None
        ppl = await people(stack)
        patients = [await register_patient(stack, ppl.public) for _ in range(4)]
        workers = 16
        phase = "before"
        stop = asyncio.Event()
        outcomes: list[Outcome] = []  # every call of the load
        acks: list[tuple[Patient, str, pb.PutRecordResponse, bytes]] = []  # (whose, request_id, response, content)

        async def call(rpc: Awaitable[Any]) -> Any:
            began = phase
            try:
                answer = await rpc
            except grpc.aio.AioRpcError as exc:
                outcomes.append(Outcome(began, phase, exc.code(), exc.details() or ""))
                if exc.code() not in (CODE.UNAVAILABLE, CODE.PERMISSION_DENIED):
                    raise
                return None
            outcomes.append(Outcome(began, phase, CODE.OK))
            return answer

        async def client(n: int) -> None:
            patient = patients[n % len(patients)]
            record_id, seq = "", 0
            while not stop.is_set():
                request = put_request(patient, f"w{n}-{seq}", record_id)
                deadline = time.monotonic() + 60
                # Refused: the same request again, until it lands.
                while (answer := await call(patient.records.PutRecord(request, timeout=20))) is None:
                    assert time.monotonic() < deadline, f"a request did not land after the faults: {outcomes[-1]}"
                    await asyncio.sleep(RETRY_PAUSE)
                acks.append((patient, request.request_id, answer, request.content))
                record_id, seq = answer.record_id, seq + 1
                got = await call(patient.records.GetRecord(pb.GetRecordRequest(record_id=record_id), timeout=20))
                if got is not None:
                    assert (got.version, got.content) == (answer.version, request.content)
                await asyncio.sleep(0.01)

        counted_before = {code: key_manager_errors(code) for code in (CODE.UNAVAILABLE, CODE.PERMISSION_DENIED)}
        load = [asyncio.create_task(client(n)) for n in range(workers)]
        try:
            # Every client has written before the first fault (so each then writes a new version).
            deadline = time.monotonic() + 30
            while len({a.record_id for _, _, a, _ in acks}) < workers:
                assert time.monotonic() < deadline, f"only {len(acks)} writes landed before the faults"
                await asyncio.sleep(0.05)
            for fault in LOAD_FAULTS:
                phase = fault.name  # before the fault begins: a call that began earlier and ends after it met it
                await in_thread(fault.begin, bao)
                # A read of a record whose data key cannot be unwrapped now: refused, never DATA_LOSS.
                whose, _, written, _ = acks[0]
                await refused_for(fault, whose.records.GetRecord(pb.GetRecordRequest(record_id=written.record_id)))
                await asyncio.sleep(1.5)
                await in_thread(fault.end, bao)
                phase = f"after {fault.name}"
                await asyncio.sleep(0.5)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*load, return_exceptions=True), 90)
        finally:
            stop.set()
            for task in load:
                task.cancel()

        for task in load:
            assert task.exception() is None, repr(task.exception())
        # Refused only while a fault lasted, and with its code; every fault met by the load.
        faults = {f.name: f.code for f in LOAD_FAULTS}
        for o in outcomes:
            if o.code != CODE.OK:
                met = {faults.get(o.began), faults.get(o.ended)}
                assert o.code in met, o
        for fault in LOAD_FAULTS:
            assert any(o.began == fault.name and o.code == fault.code for o in outcomes), fault.name
        # And the failures were counted where the MedledgerKeyManagerErrors alert looks.
        for code, before in counted_before.items():
            assert key_manager_errors(code) > before, code
        print(f"{len(outcomes)} calls: {Counter(o.code.name for o in outcomes)}")

        # Every acknowledged write exists once: one version per request, numbered without gaps,
        # with the acknowledged event id, one RecordStored event each, one idempotency record each.
        rdb = stack.records.db
        acked = {(a.record_id, a.version): (request_id, a, content) for _, request_id, a, content in acks}
        assert len(acked) == len(acks) > 3 * workers
        versions = records_storage.record_versions
        async with rdb.connect() as conn:
            rows = (await conn.execute(select(versions.c.record_id, versions.c.version, versions.c.event_id))).all()
        patient_ids = {p.patient_id for p in patients}
        ours = {(r.record_id, r.version): r.event_id for r in rows}
        assert set(ours) == set(acked)
        for (record_id, version), (_, answer, _) in acked.items():
            assert ours[(record_id, version)] == answer.receipt.event_id
        per_record = Counter(record_id for record_id, _ in acked)
        for record_id, n in per_record.items():
            assert {v for r, v in acked if r == record_id} == set(range(1, n + 1))
        stored = [e for e in await events_of(rdb, records_events_pb2.RecordStored) if e.patient_id in patient_ids]
        assert Counter((e.record_id, e.version) for e in stored) == Counter(dict.fromkeys(acked, 1))
        k = idempotency_keys.c
        kept = await count(
            rdb, idempotency_keys, and_(k.scope == "records.PutRecord", k.request_id.in_([r for _, r, _, _ in acks]))
        )
        assert kept == len(acks)
        # And they read back as written, now that OpenBao is back.
        owner = {a.record_id: patient for patient, _, a, _ in acks}
        for (record_id, version), (_, _, content) in list(acked.items())[:: max(1, len(acked) // 20)]:
            got = await owner[record_id].records.GetRecord(pb.GetRecordRequest(record_id=record_id, version=version))
            assert got.content == content
