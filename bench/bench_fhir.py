"""FHIR gateway benchmarks, beside the gRPC path they sit on. (One script, though long: its modes
share one platform and its seeded patients.)

floor:   what a bundle's resource costs before any I/O, per resource, over the seeded synthetic
         patients' resources: R4B validation, canonical JSON with the salted commitment, and its
         audit entry (the RecordStored event built and serialized, and its RFC 6962 leaf hash).
         1 / their sum is the most one core can load, whatever the design around it.
server:  identity and consent in this process; records, audit and the gateway each in a process
         of their own as deployed (PostgreSQL, the local keyring); a hospital, a doctor of it, and
         PATIENTS patients (env FHIR_PATIENTS, default 60) registered with a medical record number
         each, each letting the hospital read and write every category for treatment; the
         hospital's integration engine, a SMART Backend Services client (its token by
         client_credentials with an ES384 assertion); writes what a client needs to CONFIG;
         serves until SIGTERM.
client:  against the server, from its own process:
         bundle  — every patient's synthetic record as one FHIR `transaction` Bundle posted by the
                   engine (the seeded population's bundles as the generator wrote them, the Patient
                   entry carrying the patient's number, so the gateway matches it),
                   BUNDLE_CLIENTS at once: resources per second;
         read    — GET [base]/{type}/{id} of random loaded resources, 16 in flight, beside
                   GetRecord of the same records over gRPC, in three alternating rounds (the
                   median round's figures);
         search  — GET [base]/Observation?patient=…&code=…, 16 in flight;
         mixed   — 16 clients, each call a read (70%), a search (20%) or a create (10%): p50/p99.

Usage: python bench_fhir.py floor
       python bench_fhir.py server BOOTSTRAP CONSENT_URL,RECORDS_URL,AUDIT_URL FOLDER CONFIG
       python bench_fhir.py client CONFIG SECONDS bundle|read|search|mixed
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import chart_defaults
import grpc
from closed_loop import measure
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
from medledger.events.v1 import records_events_pb2
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.records.v1 import records_service_pb2 as pb
from medledger.records.v1 import records_service_pb2_grpc as pb_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_devstack import localstack
from medledger_devstack.synthetic import population
from medledger_fhir.resource_types import CLINICAL_TYPES
from medledger_records import domain
from medledger_runtime.events import new_event
from medledger_runtime.keys import create_master_key_file

PATIENTS = int(os.environ.get("FHIR_PATIENTS", "60"))
BUNDLE_CLIENTS = int(os.environ.get("FHIR_BUNDLE_CLIENTS", "4"))
IN_FLIGHT = 16
READ_ROUNDS = 3
MRN = "urn:medledger:bench:mrn"
TREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT
READ, WRITE = vocab.Action.ACTION_READ, vocab.Action.ACTION_WRITE
FHIR_JSON = "application/fhir+json"
# A code every synthetic patient has many Observations of (LOINC body weight).
SEARCH_CODE = "http://loinc.org|29463-7"


# --- floor -------------------------------------------------------------------------------------


def floor() -> dict[str, float]:
    resources = [json.dumps(r).encode() for r in population().resources()]
    salt = domain.new_salt()

    def per_resource(fn: Any) -> float:
        t0 = time.perf_counter()
        for content in resources:
            fn(content)
        return (time.perf_counter() - t0) / len(resources) * 1e6

    def audit_entry(content: bytes) -> None:
        event = new_event(
            source="medledger.records",
            payload=records_events_pb2.RecordStored(
                record_id="rec_1", version=1, patient_id="pat_1", commitment="0" * 64, written_by="prn_1"
            ),
            aggregate_id="rec_1",
            version=1,
        )
        hashlib.sha256(b"\x00" + event.SerializeToString()).digest()

    out = {
        "resources": float(len(resources)),
        "validation_us": per_resource(lambda c: domain.validate_fhir(domain.parse_json(c))),
        "canonical_commitment_us": per_resource(lambda c: domain.record_commitment(c, salt)),
        "audit_entry_us": per_resource(audit_entry),
    }
    out["floor_resources_per_s"] = 1e6 / (out["validation_us"] + out["canonical_commitment_us"] + out["audit_entry_us"])
    return out


# --- server ------------------------------------------------------------------------------------


@contextlib.contextmanager
def processes(platform: Any, bootstrap: str, urls: dict[str, str], folder: Path) -> Iterator[dict[str, int]]:
    """records, audit and the gateway, each a process of its own as deployed; their ports."""
    ports = {
        f"{name}_{kind}": localstack.free_port()
        for name in ("records", "audit", "fhir")
        for kind in ("grpc", "metrics")
    }
    ports["audit_http"], ports["fhir_http"] = localstack.free_port(), localstack.free_port()
    secrets_dir = folder / "secrets"
    common = {
        **os.environ,
        "MEDLEDGER_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "MEDLEDGER_IDENTITY_ADDRESS": platform.identity_address,
        "MEDLEDGER_OUTBOX_POLL_SECONDS": "0.5",
        "MEDLEDGER_LOG_LEVEL": "WARNING",
        "MEDLEDGER_TRACE_SAMPLING_RATIO": str(chart_defaults.TRACE_SAMPLING),  # as the chart runs them
    }

    def env(name: str, **extra: str) -> dict[str, str]:
        return {
            **common,
            "MEDLEDGER_GRPC_PORT": str(ports[f"{name}_grpc"]),
            "MEDLEDGER_METRICS_PORT": str(ports[f"{name}_metrics"]),
            "MEDLEDGER_CLIENT_SECRET_FILE": str(secrets_dir / f"{name}.secret"),
            **extra,
        }

    def keyring(name: str) -> dict[str, str]:
        return {
            "MEDLEDGER_MASTER_KEY_FILE": str(create_master_key_file(folder / f"master-{name}.key")),
            "MEDLEDGER_KEYRING_FILE": str(folder / "keyrings" / f"{name}.keyring"),
        }

    consent_address = f"127.0.0.1:{platform.consents[0].grpc_port}"
    children = []
    try:
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "medledger_records"],
                env=env(
                    "records",
                    MEDLEDGER_DATABASE_URL=urls["records"],
                    MEDLEDGER_CONSENT_ADDRESS=consent_address,
                    **keyring("records"),
                ),
            )
        )
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "medledger_audit"],
                env=env(
                    "audit",
                    MEDLEDGER_DATABASE_URL=urls["audit"],
                    MEDLEDGER_HTTP_PORT=str(ports["audit_http"]),
                    MEDLEDGER_LAST_CHECKPOINT_FILE=str(folder / "audit" / "last-checkpoint"),
                    **keyring("audit"),
                ),
            )
        )
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "medledger_fhir"],
                env=env(
                    "fhir",
                    MEDLEDGER_HTTP_PORT=str(ports["fhir_http"]),
                    MEDLEDGER_CONSENT_ADDRESS=consent_address,
                    MEDLEDGER_RECORDS_ADDRESS=f"127.0.0.1:{ports['records_grpc']}",
                    MEDLEDGER_AUDIT_ADDRESS=f"127.0.0.1:{ports['audit_grpc']}",
                ),
            )
        )
        yield ports
    finally:
        for child in reversed(children):
            child.terminate()
        for child in children:
            child.wait(20)


async def _until_answers(url: str, within: float = 120) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer")
            await asyncio.sleep(0.2)


async def _patients(platform: Any, hospital: str, count: int) -> list[str]:
    """`count` patients registered by the admin with a medical record number each, each letting
    the hospital read and write every category for treatment; 16 at a time."""
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> str:
        async with gate:
            fhir = {"resourceType": "Patient", "identifier": [{"system": MRN, "value": str(i)}]}
            reply = await platform.admin_identity.RegisterPrincipal(
                id_pb.RegisterPrincipalRequest(
                    request_id=str(uuid.uuid4()),
                    kind=vocab.PrincipalKind.PRINCIPAL_KIND_PATIENT,
                    fhir_resource=json.dumps(fhir).encode(),
                )
            )
            pid = reply.principal.principal_id
            client = platform.client(pid, reply.client_secret)
            consent = co_grpc.ConsentServiceStub(
                client.channel(f"127.0.0.1:{platform.consents[0].grpc_port}", "medledger.consent")
            )
            deadline = time.monotonic() + 60
            while True:  # consent learns the patient and the hospital from identity's events
                try:
                    await consent.GrantConsent(
                        co_pb.GrantConsentRequest(
                            request_id=str(uuid.uuid4()),
                            patient_id=pid,
                            grantee_id=hospital,
                            provision=co_pb.ProvisionType.PROVISION_TYPE_PERMIT,
                            actions=[READ, WRITE],
                            purposes=[TREAT],
                        )
                    )
                    return pid
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.INVALID_ARGUMENT or time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def engine_token(platform: Any, hospital: str) -> str:
    """A SMART Backend Services client of the hospital, registered with its public key, and its
    token from identity's endpoint by client_credentials with a signed assertion."""
    from joserfc import jwk, jwt

    key = jwk.ECKey.generate_key("P-384", parameters={"kid": "bench"}, private=True)
    client = await platform.admin_identity.RegisterSmartClient(
        id_pb.RegisterSmartClientRequest(
            request_id=str(uuid.uuid4()),
            organization_id=hospital,
            jwks_json=json.dumps({"keys": [key.as_dict(private=False)]}),
            allowed_scopes=["system/*.cruds"],
        )
    )
    client_id = client.principal.principal_id
    endpoint = f"http://127.0.0.1:{platform.identity.http_port}/oauth2/token"
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": endpoint,
        "exp": int(time.time()) + 300,
        "jti": uuid.uuid4().hex,
    }
    form = {
        "grant_type": "client_credentials",
        "scope": "system/*.cruds",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": jwt.encode({"alg": "ES384", "kid": key.kid}, claims, key, algorithms=["ES384"]),
    }
    async with aiohttp.ClientSession() as http, http.post(endpoint, data=form) as response:
        body = await response.json(content_type=None)
        if response.status != 200:
            raise RuntimeError(f"the token endpoint answered {response.status}: {body}")
        return str(body["access_token"])


async def serve(bootstrap: str, database_urls: str, folder: Path, config: Path) -> None:
    from running_stack import identity_and_consent

    consent_url, records_url, audit_url = database_urls.split(",")
    async with identity_and_consent(bootstrap, folder, consent_database_url=consent_url) as platform:
        hospital, _ = await platform.principal(vocab.PrincipalKind.PRINCIPAL_KIND_ORGANIZATION)
        practitioner = {
            "resourceType": "Practitioner",
            "identifier": [{"system": "urn:npi", "value": uuid.uuid4().hex}],
        }
        doctor, doctor_secret = await platform.principal(
            vocab.PrincipalKind.PRINCIPAL_KIND_PRACTITIONER,
            organization_id=hospital,
            fhir_resource=json.dumps(practitioner).encode(),
        )
        started = time.monotonic()
        patients = await _patients(platform, hospital, PATIENTS)
        print(f"     {len(patients):,} patients registered with their consents in {time.monotonic() - started:.0f} s")
        with processes(platform, bootstrap, {"records": records_url, "audit": audit_url}, folder) as ports:
            base = f"http://127.0.0.1:{ports['fhir_http']}/fhir/R4"
            await _until_answers(f"{base}/metadata")
            doctor_client = platform.client(doctor, doctor_secret)
            config.write_text(  # noqa: ASYNC240 - set-up, before any figure
                json.dumps(
                    {
                        "base": base,
                        "records": f"127.0.0.1:{ports['records_grpc']}",
                        "fhir_token": await doctor_client.token("medledger.fhir"),
                        "engine_token": await engine_token(platform, hospital),
                        "records_token": await doctor_client.token("medledger.records"),
                        "patients": patients,
                        "folder": str(folder),
                    }
                )
            )
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()


# --- client ------------------------------------------------------------------------------------


def patient_bundle(template: dict[str, Any], number: int) -> dict[str, Any]:
    """A seeded synthetic patient's transaction Bundle for the bench's patient `number`: fresh
    fullUrls (so no two bundles share an entry) and the Patient entry carrying the number."""
    bundle = copy.deepcopy(template)
    renamed = {e["fullUrl"]: f"urn:uuid:{uuid.uuid4()}" for e in bundle["entry"] if "fullUrl" in e}
    text = json.dumps(bundle)
    for old, new in renamed.items():
        text = text.replace(old, new)
    bundle = json.loads(text)
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "Patient":
            entry["resource"]["identifier"] = [{"system": MRN, "value": str(number)}]
    return bundle


async def load_bundles(cfg: dict[str, Any], http: aiohttp.ClientSession) -> dict[str, Any]:
    templates = population().bundles
    bundles = [patient_bundle(templates[i % len(templates)], i) for i in range(len(cfg["patients"]))]
    queue = list(enumerate(bundles))
    loaded: dict[str, list[str]] = {}
    resources = 0

    async def worker() -> None:
        nonlocal resources
        while queue:
            _, bundle = queue.pop()
            headers = {"Content-Type": FHIR_JSON, "Authorization": f"Bearer {cfg['engine_token']}"}
            async with http.post(cfg["base"], json=bundle, headers=headers) as response:
                body = await response.json(content_type=None)
                if response.status != 200:
                    raise RuntimeError(f"a transaction failed: {response.status} {json.dumps(body)[:500]}")
            resources += len(bundle["entry"])
            for entry in body.get("entry", []):
                location = entry.get("response", {}).get("location", "")
                parts = location.split("/")
                if len(parts) >= 2 and parts[0] in CLINICAL_TYPES:  # records, read at [base]/{type}/{id}
                    loaded.setdefault(parts[0], []).append(parts[1])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(BUNDLE_CLIENTS)))
    elapsed = time.perf_counter() - t0
    Path(cfg["folder"], "loaded.json").write_text(json.dumps(loaded))  # noqa: ASYNC240 - after the figure
    return {"bundles": len(bundles), "resources": resources, "seconds": elapsed, "resources_per_s": resources / elapsed}


async def client(config: Path, seconds: float, mode: str) -> dict[str, Any]:
    cfg = json.loads(config.read_text())  # noqa: ASYNC240 - before any figure
    headers = {"Authorization": f"Bearer {cfg['fhir_token']}", "Accept": FHIR_JSON}
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT * 2)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as http:
        if mode == "bundle":
            return await load_bundles(cfg, http)
        loaded: dict[str, list[str]] = json.loads(Path(cfg["folder"], "loaded.json").read_text())  # noqa: ASYNC240
        targets = [(t, i) for t, ids in loaded.items() for i in ids]
        rng = random.Random(7)

        async def fhir_read() -> None:
            kind, rid = rng.choice(targets)
            async with http.get(f"{cfg['base']}/{kind}/{rid}") as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"read answered {response.status}")

        async def search() -> None:
            patient = rng.choice(cfg["patients"])
            url = f"{cfg['base']}/Observation"
            async with http.get(url, params={"patient": patient, "code": SEARCH_CODE, "_count": "20"}) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"search answered {response.status}")

        async def create() -> None:
            resource = {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
                "subject": {"reference": f"Patient/{rng.choice(cfg['patients'])}"},
                "effectiveDateTime": "2026-12-01T10:00:00Z",
                "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
            }
            async with http.post(
                f"{cfg['base']}/Observation", json=resource, headers={"Content-Type": FHIR_JSON}
            ) as response:
                await response.read()
                if response.status != 201:
                    raise RuntimeError(f"create answered {response.status}")

        if mode == "read":
            options = [("grpc.max_receive_message_length", 8 << 20)]
            metadata = (("authorization", f"Bearer {cfg['records_token']}"),)
            async with grpc.aio.insecure_channel(cfg["records"], options=options) as channel:
                stub = pb_grpc.RecordsServiceStub(channel)

                async def get_record() -> None:
                    _, rid = rng.choice(targets)
                    # A FHIR id is the record id with `_` written `-`.
                    request = pb.GetRecordRequest(record_id=rid.replace("-", "_"), purpose=TREAT)
                    await stub.GetRecord(request, metadata=metadata)

                # Alternating rounds, judged by the median ratio: the machine (and the audit log
                # still taking in the bundles' events) changes under both alike.
                rounds = []
                for _ in range(READ_ROUNDS):
                    grpc_figures = await measure(get_record, seconds / READ_ROUNDS, in_flight=IN_FLIGHT)
                    fhir_figures = await measure(fhir_read, seconds / READ_ROUNDS, in_flight=IN_FLIGHT)
                    ratio = fhir_figures["calls_per_s"] / grpc_figures["calls_per_s"]
                    rounds.append({"grpc": grpc_figures, "fhir": fhir_figures, "ratio": ratio})
            middle = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
            return {**middle, "rounds": rounds}
        if mode == "search":
            return await measure(search, seconds, in_flight=IN_FLIGHT)
        if mode == "mixed":
            latencies: dict[str, list[float]] = {"read": [], "search": [], "create": []}

            async def one() -> None:
                r = rng.random()
                op, call = ("read", fhir_read) if r < 0.7 else ("search", search) if r < 0.9 else ("create", create)
                t = time.perf_counter()
                await call()
                latencies[op].append(time.perf_counter() - t)

            overall = await measure(one, seconds, in_flight=IN_FLIGHT)
            per_op = {}
            for op, values in latencies.items():
                values.sort()
                if values:
                    per_op[op] = {
                        "calls": len(values),
                        "p50_ms": values[len(values) // 2] * 1000,
                        "p99_ms": values[int(len(values) * 0.99)] * 1000,
                    }
            return {**overall, "per_op": per_op}
        raise SystemExit(f"unknown mode {mode}")


def main() -> None:
    mode = sys.argv[1]
    if mode == "floor":
        print(json.dumps(floor()))
    elif mode == "server":
        asyncio.run(serve(sys.argv[2], sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5])))
    elif mode == "client":
        print(json.dumps(asyncio.run(client(Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]))))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
