"""Records benchmarks. (One script, though long: its modes share the fixtures of one records
service on PostgreSQL.)

stages:  the cost of each stage of a put and a get, per record of SIZE bytes: validation,
         canonicalization (with the commitment), keys (a data key from the local keyring, and
         its unwrapping), crypto (seal, unseal), events (building and serializing), and the
         database (a put's transaction, a get's read) on PostgreSQL at DATABASE_URL.
server:  identity and consent in this process, records in a process of its own as deployed
         (PostgreSQL; the local keyring, or Vault: a real OpenBao server started for the run);
         PATIENTS patients (env RECORDS_PATIENTS, default 1,000) who each let a doctor read and
         write observations for treatment, and for each an Observation of 1 KiB (and for the
         first fifth one of 64 KiB) written before the clients run: the contents are the seeded
         synthetic patients' Observations (medledger_devstack.synthetic), padded to the size;
         measures what one consent check costs records; writes what a client needs to CONFIG,
         serves until SIGTERM.
client:  PutRecord (to a random patient) or GetRecord (of a random record written earlier) calls
         per second and latencies as the doctor, from its own process, 16 in flight, every call
         with its consent check; after a warm-up, records' own metrics give the key-manager calls
         per operation and the data-key cache's hit rate over the measured calls.

Usage: python bench_records.py stages SIZE DATABASE_URL
       python bench_records.py server BOOTSTRAP CONSENT_DATABASE_URL,RECORDS_DATABASE_URL FOLDER CONFIG local|vault
       python bench_records.py client CONFIG SECONDS put|get SIZE
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import chart_defaults
import grpc
from closed_loop import measure
from medledger.events.v1 import records_events_pb2
from medledger.records.v1 import records_service_pb2 as pb
from medledger.records.v1 import records_service_pb2_grpc as pb_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_records import domain
from medledger_runtime.events import new_event
from medledger_runtime.keys import KeyType, LocalKeyring, create_master_key_file

IN_FLIGHT = int(os.environ.get("IN_FLIGHT", "16"))
PATIENTS = int(os.environ.get("RECORDS_PATIENTS", "1000"))
LARGE = 65536
WARM_UP_SECONDS = 2.0
OBS = vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS
TREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT
READ, WRITE = vocab.Action.ACTION_READ, vocab.Action.ACTION_WRITE
FHIR_JSON = "application/fhir+json"


def observation(size: int) -> bytes:
    """A valid FHIR Observation of about `size` bytes (the note's text pads it)."""
    base = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "valueQuantity": {"value": 72, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"},
        "note": [{"text": ""}],
    }
    pad = max(0, size - len(json.dumps(base)))
    base["note"][0]["text"] = "x" * pad  # type: ignore[index]
    return json.dumps(base).encode()


def synthetic_observations(size: int, count: int = 64) -> list[bytes]:
    """`count` of the synthetic patients' Observations, each padded (a note's text) to about
    `size` bytes; the subject reference is dropped, as the bench files them under its own
    patients."""
    from medledger_devstack.synthetic import population

    out = []
    for resource in population().of_type("Observation")[:count]:
        resource = {k: v for k, v in resource.items() if k != "subject"}
        resource["note"] = [{"text": ""}]
        pad = max(0, size - len(json.dumps(resource)))
        resource["note"][0]["text"] = "x" * pad
        out.append(json.dumps(resource).encode())
    return out


def _per_op(fn: Any, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


async def _per_op_async(fn: Any, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        await fn()
    return (time.perf_counter() - t0) / n * 1e6


async def stages(size: int, database_url: str) -> dict[str, float]:
    content = observation(size)
    n = 2000 if size <= 4096 else 200
    salt = domain.new_salt()
    out = {
        "validation_us": _per_op(lambda: domain.validate_fhir(domain.parse_json(content)), n),
        "canonicalization_us": _per_op(lambda: domain.record_commitment(content, salt), n),
    }
    with tempfile.TemporaryDirectory() as tmp:
        keys = await LocalKeyring.open(
            Path(tmp) / "k" / "records.keyring", create_master_key_file(Path(tmp) / "master.key")
        )
        name = "records-patient-bench"
        await keys.ensure_key(name, KeyType.AES256_GCM96)
        data_key = await keys.generate_data_key(name)
        out["keys_us"] = await _per_op_async(lambda: keys.generate_data_key(name), n)
        out["key_unwrap_us"] = await _per_op_async(lambda: keys.decrypt_data_key(name, data_key.wrapped), n)
        await keys.aclose()
    sealed = domain.seal(data_key.plaintext, content, "rec_1", 1, "pat_1")
    out["seal_us"] = _per_op(lambda: domain.seal(data_key.plaintext, content, "rec_1", 1, "pat_1"), n)
    out["unseal_us"] = _per_op(lambda: domain.unseal(data_key.plaintext, sealed, "rec_1", 1, "pat_1"), n)
    out["events_us"] = _per_op(
        lambda: new_event(
            source="medledger.records",
            payload=records_events_pb2.RecordStored(
                record_id="rec_1", version=1, patient_id="pat_1", commitment="0" * 64
            ),
            aggregate_id="rec_1",
            version=1,
        ).SerializeToString(),
        n,
    )
    out.update(await database_stages(content, database_url, n=300))
    return out


async def database_stages(content: bytes, database_url: str, n: int) -> dict[str, float]:
    """A put's transaction (record, version, outbox row) and a get's read, one at a time, on
    records' tables in PostgreSQL."""
    from medledger_records import storage
    from medledger_runtime.db import Database
    from medledger_runtime.outbox import COMMON_MIGRATIONS, enqueue

    db = Database(database_url)
    await db.migrate("common", COMMON_MIGRATIONS)
    await db.migrate("records", storage.MIGRATIONS)
    sealed = b"\0" * (len(content) + 28)
    ids: list[str] = []

    async def write() -> None:
        record = storage.Record(f"rec_{uuid.uuid4().hex}", "pat_bench", OBS, FHIR_JSON, 1, "Observation")
        version = storage.StoredVersion(
            record.record_id, 1, "pat_bench", "records-patient-bench", "vault:v1:x", sealed, b"s" * 32, "0" * 64, "e"
        )
        async with db.transaction() as conn:
            await storage.insert_record(conn, record, time.time())
            await storage.insert_version(conn, version, written_by="prc_1", organization_id="org_1", now=time.time())
            event = new_event(
                source="medledger.records",
                payload=records_events_pb2.RecordStored(record_id=record.record_id, version=1),
                aggregate_id=record.record_id,
                version=1,
            )
            await enqueue(conn, "medledger.records.v1", event, b"pat_bench")
        ids.append(record.record_id)

    async def read() -> None:
        await storage.get_record_and_version(db, ids[0], 0)

    try:
        return {"database_write_us": await _per_op_async(write, n), "database_read_us": await _per_op_async(read, n)}
    finally:
        await db.close()


@contextlib.contextmanager
def records_process(platform: Any, bootstrap: str, database_url: str, folder: Path, key_manager: str) -> Any:
    """records as it is deployed: a process of its own (`python -m medledger_records`), asking the
    consent in this process; with the local keyring, or with Vault: a real OpenBao server
    (medledger_devstack.openbao: raft storage, the repository's deploy/vault policies, records'
    everyday and erasure tokens as deployed). Yields records' gRPC and metrics ports."""
    from medledger_devstack import localstack
    from medledger_devstack.openbao import OpenBao

    port, metrics_port = localstack.free_port(), localstack.free_port()
    env = {
        **os.environ,
        "MEDLEDGER_GRPC_PORT": str(port),
        "MEDLEDGER_METRICS_PORT": str(metrics_port),
        "MEDLEDGER_DATABASE_URL": database_url,
        "MEDLEDGER_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "MEDLEDGER_IDENTITY_ADDRESS": platform.identity_address,
        "MEDLEDGER_CONSENT_ADDRESS": f"127.0.0.1:{platform.consents[0].grpc_port}",
        "MEDLEDGER_CLIENT_SECRET_FILE": str(folder / "secrets" / "records.secret"),
        "MEDLEDGER_OUTBOX_POLL_SECONDS": "0.5",
        "MEDLEDGER_LOG_LEVEL": "WARNING",
        "MEDLEDGER_TRACE_SAMPLING_RATIO": str(chart_defaults.TRACE_SAMPLING),  # as the chart runs it
    }
    children: list[subprocess.Popen[bytes]] = []
    bao: OpenBao | None = None
    try:
        if key_manager == "vault":
            bao = OpenBao(
                folder / "openbao", folder / "secrets" / "openbao", localstack.repo_root() / "deploy" / "vault"
            ).start()
            env |= {
                "MEDLEDGER_KEY_MANAGER": "vault",
                "MEDLEDGER_VAULT_ADDR": bao.address,
                "MEDLEDGER_VAULT_TOKEN_FILE": str(bao.token_file("records")),
                "MEDLEDGER_ERASURE_VAULT_TOKEN_FILE": str(bao.token_file("records-erasure")),
            }
        else:
            env |= {
                "MEDLEDGER_MASTER_KEY_FILE": str(create_master_key_file(folder / "master-records.key")),
                "MEDLEDGER_KEYRING_FILE": str(folder / "keyrings" / "records.keyring"),
            }
        children.append(subprocess.Popen([sys.executable, "-m", "medledger_records"], env=env))
        yield port, metrics_port
    finally:
        for child in reversed(children):
            child.terminate()
            child.wait(20)
        if bao is not None:
            bao.stop()


async def consent_check_us(platform: Any, folder: Path, patient_id: str, doctor: str, n: int = 300) -> float:
    """What one consent check costs records: a CheckConsent as records makes it (its own
    credential), one at a time, median, microseconds."""
    from medledger.consent.v1 import consent_service_pb2 as co_pb
    from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc

    secret = (folder / "secrets" / "records.secret").read_text().strip()
    client = platform.client("svc_records", secret)
    stub = co_grpc.ConsentServiceStub(
        client.channel(f"127.0.0.1:{platform.consents[0].grpc_port}", "medledger.consent")
    )
    ask = co_pb.CheckConsentRequest(patient_id=patient_id, actor_id=doctor, action=READ, category=OBS, purpose=TREAT)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await stub.CheckConsent(ask)
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e6


async def _patients_with_grants(platform: Any, doctor: str, count: int) -> list[str]:
    """`count` registered patients who each let `doctor` read and write observations for
    treatment, registered 16 at a time."""
    from bench_consent import patient_with_grant
    from medledger.consent.v1 import consent_service_pb2 as co_pb

    gate = asyncio.Semaphore(16)

    async def one() -> str:
        async with gate:
            patient_id, consent, _ = await patient_with_grant(platform, doctor)
            await consent.GrantConsent(
                co_pb.GrantConsentRequest(
                    request_id=str(uuid.uuid4()),
                    patient_id=patient_id,
                    grantee_id=doctor,
                    provision=co_pb.ProvisionType.PROVISION_TYPE_PERMIT,
                    actions=[WRITE],
                    categories=[OBS],
                    purposes=[TREAT],
                )
            )
            return patient_id

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def _seed(stub: Any, metadata: Any, patients: list[str], contents: list[bytes]) -> list[str]:
    """One record per patient, 16 puts at a time, retried while records starts; the record ids."""
    gate = asyncio.Semaphore(16)

    async def one(i: int, patient_id: str) -> str:
        request = _put(patient_id, contents[i % len(contents)])
        deadline = time.monotonic() + 60
        async with gate:
            while True:  # records may still be starting
                try:
                    return str((await stub.PutRecord(request, metadata=metadata)).record_id)
                except grpc.aio.AioRpcError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(patients))))


async def serve(bootstrap: str, database_urls: str, folder: Path, config: Path, key_manager: str) -> None:
    from running_stack import identity_and_consent

    consent_url, records_url = database_urls.split(",")
    async with identity_and_consent(bootstrap, folder, consent_database_url=consent_url) as platform:
        org, _ = await platform.principal(vocab.PrincipalKind.PRINCIPAL_KIND_ORGANIZATION)
        practitioner = {
            "resourceType": "Practitioner",
            "identifier": [{"system": "urn:npi", "value": uuid.uuid4().hex}],
        }
        doctor, doctor_secret = await platform.principal(
            vocab.PrincipalKind.PRINCIPAL_KIND_PRACTITIONER,
            organization_id=org,
            fhir_resource=json.dumps(practitioner).encode(),
        )
        started = time.monotonic()
        patients = await _patients_with_grants(platform, doctor, PATIENTS)
        took = time.monotonic() - started
        print(f"     {len(patients):,} patients registered with their grants in {took:.0f} s", flush=True)
        token = await platform.client(doctor, doctor_secret).token("medledger.records")
        metadata = (("authorization", f"Bearer {token}"),)
        with records_process(platform, bootstrap, records_url, folder, key_manager) as (port, metrics_port):
            started = time.monotonic()
            stored: dict[str, list[str]] = {}
            options = [("grpc.max_send_message_length", 8 << 20)]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                stub = pb_grpc.RecordsServiceStub(channel)
                stored["1024"] = await _seed(stub, metadata, patients, synthetic_observations(1024))
                fifth = patients[: max(1, len(patients) // 5)]
                stored[str(LARGE)] = await _seed(stub, metadata, fifth, synthetic_observations(LARGE))
            took = time.monotonic() - started
            written = sum(map(len, stored.values()))
            print(f"     {written:,} records written before measuring, in {took:.0f} s", flush=True)
            check_us = await consent_check_us(platform, folder, patients[0], doctor)
            config.write_text(  # noqa: ASYNC240 - once, before serving
                json.dumps(
                    {
                        "port": port,
                        "metrics_url": f"http://127.0.0.1:{metrics_port}/metrics",
                        "token": token,
                        "patients": patients,
                        "records": stored,
                        "consent_check_us": check_us,
                    }
                )
            )
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()


def _put(patient_id: str, content: bytes) -> pb.PutRecordRequest:
    return pb.PutRecordRequest(
        request_id=str(uuid.uuid4()), patient_id=patient_id, category=OBS, content=content, media_type=FHIR_JSON
    )


def records_metrics(url: str) -> dict[str, float]:
    """records' key-manager calls and data-key cache lookups, from its Prometheus endpoint."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url, timeout=10) as reply:  # noqa: S310 - our own loopback endpoint
        text = reply.read().decode()
    out = {"key_manager_calls": 0.0, "hit": 0.0, "miss": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "medledger_records_key_manager_calls_total":
                out["key_manager_calls"] += sample.value
            elif sample.name == "medledger_records_data_key_cache_lookups_total":
                out[sample.labels["result"]] += sample.value
    return out


async def client(config_path: Path, seconds: float, op: str, size: int) -> dict[str, Any]:
    config = json.loads(config_path.read_text())  # noqa: ASYNC240 - once, before measuring
    metadata = (("authorization", f"Bearer {config['token']}"),)
    rng = random.Random(size)
    patients, written = config["patients"], config["records"][str(size)]
    contents = synthetic_observations(size)
    options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{config['port']}", options=options) as channel:
        stub = pb_grpc.RecordsServiceStub(channel)

        async def call() -> None:
            if op == "put":
                await stub.PutRecord(_put(rng.choice(patients), rng.choice(contents)), metadata=metadata)
            else:
                get = pb.GetRecordRequest(record_id=rng.choice(written), purpose=TREAT)
                await stub.GetRecord(get, metadata=metadata)

        await measure(call, WARM_UP_SECONDS, in_flight=IN_FLIGHT)  # to the steady state, not counted
        before = records_metrics(config["metrics_url"])
        figures: dict[str, Any] = await measure(call, seconds, in_flight=IN_FLIGHT, warm_up=0)
        after = records_metrics(config["metrics_url"])
    hits, misses = after["hit"] - before["hit"], after["miss"] - before["miss"]
    figures["key_manager_calls_per_op"] = (after["key_manager_calls"] - before["key_manager_calls"]) / figures["calls"]
    figures["cache_hit_rate"] = hits / (hits + misses) if hits + misses else 0.0
    return figures


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "stages":
        print(json.dumps(asyncio.run(stages(int(sys.argv[2]), sys.argv[3]))))
    elif mode == "server":
        asyncio.run(serve(sys.argv[2], sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]), sys.argv[6]))
    else:
        print(json.dumps(asyncio.run(client(Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5])))))
