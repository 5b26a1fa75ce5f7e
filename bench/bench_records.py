"""Records benchmarks.

stages:  the cost of each stage of a put and a get, in process, per record of SIZE bytes:
         validation, canonicalization (with the commitment), keys (a data key from the local
         keyring, and its unwrapping), crypto (seal, unseal), events (building and serializing).
server:  identity, consent and records running (records and consent on PostgreSQL, the local
         keyring); a patient who let a doctor read and write observations for treatment, and a
         1 KiB and a 64 KiB Observation stored; writes what a client needs to CONFIG, serves
         until SIGTERM.
client:  PutRecord or GetRecord calls per second and latencies as the doctor, from its own
         process, 16 in flight, every call with its consent check.

Usage: python bench_records.py stages SIZE
       python bench_records.py server BOOTSTRAP DATABASE_URL FOLDER CONFIG
       python bench_records.py client CONFIG SECONDS put|get SIZE
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from medledger.events.v1 import records_events_pb2
from medledger.records.v1 import records_service_pb2 as pb
from medledger.records.v1 import records_service_pb2_grpc as pb_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_common.events import new_event
from medledger_common.keys import KeyType, LocalKeyring, create_master_key_file
from medledger_records import domain

IN_FLIGHT = int(__import__("os").environ.get("IN_FLIGHT", "16"))
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


async def stages(size: int) -> dict[str, float]:
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
        await keys.ensure_key("patient-bench", KeyType.AES256_GCM96)
        data_key = await keys.generate_data_key("patient-bench")
        out["keys_us"] = await _per_op_async(lambda: keys.generate_data_key("patient-bench"), n)
        out["key_unwrap_us"] = await _per_op_async(lambda: keys.decrypt_data_key("patient-bench", data_key.wrapped), n)
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
    return out


async def serve(bootstrap: str, database_url: str, folder: Path, config: Path) -> None:
    from bench_consent import patient_with_grant
    from medledger.consent.v1 import consent_service_pb2 as co_pb
    from running_stack import identity_and_consent

    consent_url, records_url = database_url.split(",")
    async with identity_and_consent(
        bootstrap, folder, consent_database_url=consent_url, records_database_url=records_url
    ) as platform:
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
        token = await platform.client(doctor, doctor_secret).token("medledger.records")
        address = f"127.0.0.1:{platform.records.grpc_port}"
        metadata = (("authorization", f"Bearer {token}"),)
        stored: dict[str, str] = {}
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.RecordsServiceStub(channel)
            for size in (1024, 65536):
                deadline = time.monotonic() + 20
                while True:  # records' consent checks need consent to know the doctor first
                    try:
                        reply = await stub.PutRecord(_put(patient_id, size), metadata=metadata)
                        break
                    except grpc.aio.AioRpcError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.1)
                stored[str(size)] = reply.record_id
        config.write_text(  # noqa: ASYNC240 - once, before serving
            json.dumps(
                {"port": platform.records.grpc_port, "token": token, "patient_id": patient_id, "records": stored}
            )
        )
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()


def _put(patient_id: str, size: int) -> pb.PutRecordRequest:
    return pb.PutRecordRequest(
        request_id=str(uuid.uuid4()),
        patient_id=patient_id,
        category=OBS,
        content=observation(size),
        media_type=FHIR_JSON,
    )


async def client(config_path: Path, seconds: float, op: str, size: int) -> dict[str, Any]:
    config = json.loads(config_path.read_text())  # noqa: ASYNC240 - once, before measuring
    metadata = (("authorization", f"Bearer {config['token']}"),)
    get = pb.GetRecordRequest(record_id=config["records"][str(size)], purpose=TREAT)
    options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{config['port']}", options=options) as channel:
        stub = pb_grpc.RecordsServiceStub(channel)

        async def call() -> None:
            if op == "put":
                await stub.PutRecord(_put(config["patient_id"], size), metadata=metadata)
            else:
                await stub.GetRecord(get, metadata=metadata)

        for _ in range(50):
            await call()
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                await call()
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "calls_per_s": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "stages":
        print(json.dumps(asyncio.run(stages(int(sys.argv[2])))))
    elif mode == "server":
        asyncio.run(serve(sys.argv[2], sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5])))
    else:
        print(json.dumps(asyncio.run(client(Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5])))))
