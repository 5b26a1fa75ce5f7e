"""Consent benchmarks.

decide:       in-process decisions per second on an index of N consent versions (the pure rule).
server:       identity and consent running (consent on PostgreSQL, so decision records are
              durable with fsync), a patient who granted a doctor; writes what a client needs to
              CONFIG and serves until killed.
client:       CheckConsent calls per second and latencies from its own process, 16 in flight.
propagation:  two consent replicas; a grant through one, then its revocation, until the other
              replica decides differently; p50/p99 over several consents.

Usage: python bench_consent.py decide N
       python bench_consent.py server BOOTSTRAP DATABASE_URL FOLDER CONFIG
       python bench_consent.py client CONFIG SECONDS
       python bench_consent.py propagation BOOTSTRAP DATABASE_URL FOLDER
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from closed_loop import measure
from medledger.consent.v1 import consent_service_pb2 as pb
from medledger.consent.v1 import consent_service_pb2_grpc as pb_grpc
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_consent import domain

READ = vocab.Action.ACTION_READ
OBS = vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS
TREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT
CATEGORIES = [v.number for v in vocab.DataCategory.DESCRIPTOR.values if v.number]
PURPOSES = [v.number for v in vocab.PurposeOfUse.DESCRIPTOR.values if v.number]


def bench_decide(n: int) -> dict[str, Any]:
    """N consent versions over N/10 patients and 500 doctors; random questions about them."""
    rng = random.Random(1)
    now = time.time()
    index = domain.ConsentIndex()
    stored: list[domain.ConsentVersion] = []
    patients = [f"pat_{i}" for i in range(n // 10)]
    doctors = [f"prn_{i}" for i in range(500)]
    for i in range(n):
        stored.append(
            domain.ConsentVersion(
                consent_id=f"cns_{i}",
                version=1,
                patient_id=patients[i % len(patients)],
                grantee_id=rng.choice(doctors),
                provision=domain.DENY if i % 20 == 0 else domain.PERMIT,
                actions=frozenset({READ}),
                categories=frozenset(rng.sample(CATEGORIES, 3)),
                purposes=frozenset(rng.sample(PURPOSES, 2)),
                period_start=now - 86400,
                period_end=now + 86400 * rng.randint(-5, 365),
                status=domain.ACTIVE,
                recorded_by="pat",
                recorded_at=now - 86400,
            )
        )
        index.add(stored[-1])

    def about(v: domain.ConsentVersion) -> domain.Question:
        """A question its consent answers (then the rule runs through every stage)."""
        return domain.Question(
            patient_id=v.patient_id,
            actor_id=v.grantee_id,
            actor_organization_id="",
            action=READ,
            category=rng.choice(sorted(v.categories)),
            purpose=rng.choice(sorted(v.purposes)),
            now=now,
        )

    # Half about a grantee of the patient, half about a random doctor.
    questions = [about(rng.choice(stored)) for _ in range(50_000)] + [
        domain.Question(
            patient_id=rng.choice(patients),
            actor_id=rng.choice(doctors),
            actor_organization_id="",
            action=READ,
            category=rng.choice(CATEGORIES),
            purpose=rng.choice(PURPOSES),
            now=now,
        )
        for _ in range(50_000)
    ]
    rng.shuffle(questions)
    t0 = time.perf_counter()
    outcomes = [index.decide(q) for q in questions]
    rate = len(questions) / (time.perf_counter() - t0)
    permits = sum(o.decision == pb.Decision.DECISION_PERMIT for o in outcomes)
    return {"consents": index.size, "decisions_per_s": rate, "permit_share": permits / len(outcomes)}


async def patient_with_grant(platform: Any, grantee_id: str) -> tuple[str, Any, pb.GrantConsentResponse]:
    """A registered patient who granted `grantee_id` read access to observations for treatment."""
    public = id_grpc.IdentityServiceStub(platform.admin.channel(platform.identity_address, "medledger.identity"))
    fhir = {"resourceType": "Patient", "identifier": [{"system": "urn:bench", "value": uuid.uuid4().hex}]}
    patient = await public.RegisterPatient(
        id_pb.RegisterPatientRequest(request_id=str(uuid.uuid4()), fhir_patient=json.dumps(fhir).encode())
    )
    pid = patient.principal.principal_id
    client = platform.client(pid, patient.client_secret)
    consent = pb_grpc.ConsentServiceStub(
        client.channel(f"127.0.0.1:{platform.consents[0].grpc_port}", "medledger.consent")
    )
    # Consent learns principals from identity's events: at a stack's start its consumer group may
    # still be joining (Tansu's rebalance took over 20 s on this machine), so wait up to a minute.
    deadline = time.monotonic() + 60
    while True:
        try:
            granted = await consent.GrantConsent(
                pb.GrantConsentRequest(
                    request_id=str(uuid.uuid4()),
                    patient_id=pid,
                    grantee_id=grantee_id,
                    provision=pb.ProvisionType.PROVISION_TYPE_PERMIT,
                    actions=[READ],
                    categories=[OBS],
                    purposes=[TREAT],
                )
            )
            return pid, consent, granted
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def serve(bootstrap: str, database_url: str, folder: Path, config: Path) -> None:
    from running_stack import identity_and_consent

    async with identity_and_consent(bootstrap, folder, consent_database_url=database_url) as platform:
        doctor, _ = await platform.principal(vocab.PrincipalKind.PRINCIPAL_KIND_RESEARCHER)
        patient_id, _, _ = await patient_with_grant(platform, doctor)
        pdp_id, pdp_secret = await platform.researcher_with_pdp_role()
        token = await platform.client(pdp_id, pdp_secret).token("medledger.consent")
        config.write_text(  # noqa: ASYNC240 - once, before serving
            json.dumps(
                {
                    "port": platform.consents[0].grpc_port,
                    "token": token,
                    "patient_id": patient_id,
                    "actor_id": doctor,
                }
            )
        )
        # Until the runner's SIGTERM; then leave the block, which stops the services.
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()


async def client(config_path: Path, seconds: float) -> dict[str, Any]:
    config = json.loads(config_path.read_text())  # noqa: ASYNC240 - once, before measuring
    metadata = (("authorization", f"Bearer {config['token']}"),)
    request = pb.CheckConsentRequest(
        patient_id=config["patient_id"], actor_id=config["actor_id"], action=READ, category=OBS, purpose=TREAT
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{config['port']}") as channel:
        stub = pb_grpc.ConsentServiceStub(channel)
        first = await stub.CheckConsent(request, metadata=metadata)
        assert first.decision == pb.Decision.DECISION_PERMIT, first
        return await measure(lambda: stub.CheckConsent(request, metadata=metadata), seconds, warm_up=200)


async def propagation(bootstrap: str, database_url: str, folder: Path, rounds: int = 20) -> dict[str, Any]:
    from running_stack import identity_and_consent

    async with identity_and_consent(
        bootstrap, folder, consent_database_url=database_url, consent_replicas=2
    ) as platform:
        doctor, _ = await platform.principal(vocab.PrincipalKind.PRINCIPAL_KIND_RESEARCHER)
        pdp = platform.client(*await platform.researcher_with_pdp_role())
        other = pb_grpc.ConsentServiceStub(
            pdp.channel(f"127.0.0.1:{platform.consents[1].grpc_port}", "medledger.consent")
        )
        latencies = []
        for _ in range(rounds):
            patient_id, consent, granted = await patient_with_grant(platform, doctor)
            question = pb.CheckConsentRequest(
                patient_id=patient_id, actor_id=doctor, action=READ, category=OBS, purpose=TREAT
            )
            while (await other.CheckConsent(question)).decision != pb.Decision.DECISION_PERMIT:  # noqa: ASYNC110
                await asyncio.sleep(0.005)  # polling the other replica is what is measured
            t0 = time.perf_counter()
            await consent.RevokeConsent(
                pb.RevokeConsentRequest(request_id=str(uuid.uuid4()), consent_id=granted.consent.consent_id)
            )
            while (await other.CheckConsent(question)).decision == pb.Decision.DECISION_PERMIT:
                if time.perf_counter() - t0 > 10:
                    raise RuntimeError("a revocation did not reach the other replica within 10 s")
                await asyncio.sleep(0.002)
            latencies.append(time.perf_counter() - t0)
    latencies.sort()
    return {
        "rounds": rounds,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    }


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "decide":
        print(json.dumps(bench_decide(int(sys.argv[2]))))
    elif mode == "server":
        asyncio.run(serve(sys.argv[2], sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5])))
    elif mode == "client":
        print(json.dumps(asyncio.run(client(Path(sys.argv[2]), float(sys.argv[3])))))
    else:
        print(json.dumps(asyncio.run(propagation(sys.argv[2], sys.argv[3], Path(sys.argv[4])))))
