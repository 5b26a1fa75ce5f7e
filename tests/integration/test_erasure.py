"""The one erasure protocol across every service, on PostgreSQL, Tansu and each service's own key
manager: records asks, identity and consent destroy their keys and confirm, records issues a
signed certificate, the audit log appends it and destroys its subject key.

The proof of crypto-shredding: copies of every service's database and of the blob store, taken
before the erasure, hold the patient's ciphertexts; after the certificate, not one of them
decrypts with any service's key manager under any of the patient's keys (and before, each did)."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
from medledger.events.v1 import records_events_pb2 as ev
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.records.v1 import records_service_pb2 as pb
from medledger.records.v1 import records_service_pb2_grpc as pb_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab
from prometheus_client import REGISTRY
from sqlalchemy import MetaData, select

from medledger_identity.resources import RESOURCE_KEY
from medledger_records import erasure_storage as records_erasure_storage
from medledger_runtime.errors import InvalidArgument, MedledgerError, Unavailable
from medledger_runtime.events import TOPICS, decode, unpack
from medledger_runtime.kafka import make_producer
from medledger_runtime.keys import KeyManager, VaultKeyManager, audit_subject_key_name, patient_key_name
from medledger_runtime.outbox import outbox
from medledger_runtime.service import ServiceRuntime
from medledger_sdk.channels import make_channel
from medledger_verifier.erasure_certificates import open_certificate

Kind = vocab.PrincipalKind
ERASURE = pb.ErasureState
Outcome = ev.ErasureOutcome
JUSTIFICATION = "Unconscious on arrival; medication history needed at once."
# A ciphertext or wrapped key as every key manager writes it, wherever it lies in a row.
CIPHERTEXT = re.compile(r"vault:v[0-9]+:[A-Za-z0-9+/]+=*")
AWAITED = "medledger_records_erasure_participants_awaited"


def rid() -> str:
    return str(uuid.uuid4())


def patient_key_names(patient_id: str) -> list[str]:
    """Every name a key of the patient has or may get in any service (today's shared name and
    each service's own), so the check holds across the renaming of keys to their owners."""
    names = [f"{prefix}{patient_id}" for prefix in ("patient-", "identity-patient-", "consent-patient-")]
    return [*names, f"records-patient-{patient_id}", audit_subject_key_name(patient_id)]


async def cast(stack: Any) -> dict[str, Any]:
    """A patient with a FHIR resource, two records (one a document in the blob store), and a
    break-glass access with its justification; a privacy officer of the hospital."""
    public = id_grpc.IdentityServiceStub(make_channel(stack.identity_address))
    admin = id_grpc.IdentityServiceStub(stack.admin().channel(stack.identity_address, "medledger.identity"))
    fhir = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.3", "value": uuid.uuid4().hex}],
        "name": [{"family": "Rivera", "given": ["Ana"]}],
        "birthDate": "1984-03-02",
    }
    patient = await public.RegisterPatient(
        id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=json.dumps(fhir).encode())
    )
    org = await admin.RegisterPrincipal(
        id_pb.RegisterPrincipalRequest(request_id=rid(), kind=Kind.PRINCIPAL_KIND_ORGANIZATION)
    )
    org_id = org.principal.principal_id
    people: dict[str, Any] = {}
    for name in ("doctor", "officer"):
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
        people[name] = reply
    await admin.AssignRole(
        id_pb.AssignRoleRequest(
            request_id=rid(),
            principal_id=people["officer"].principal.principal_id,
            role=vocab.Role.ROLE_PRIVACY_OFFICER,
        )
    )
    patient_id = patient.principal.principal_id
    await stack.known_to_consent(patient_id, org_id, *(p.principal.principal_id for p in people.values()))
    records_address = f"127.0.0.1:{stack.records.grpc_port}"

    def records(reply: Any) -> pb_grpc.RecordsServiceStub:
        client = stack.client(reply.principal.principal_id, reply.client_secret)
        return pb_grpc.RecordsServiceStub(client.channel(records_address, "medledger.records"))

    def consent(reply: Any) -> co_grpc.ConsentServiceStub:
        client = stack.client(reply.principal.principal_id, reply.client_secret)
        return co_grpc.ConsentServiceStub(client.channel(stack.consent_address, "medledger.consent"))

    out = {
        "patient_id": patient_id,
        "patient": records(patient),
        "officer": records(people["officer"]),
        "officer_consent": consent(people["officer"]),
    }
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "Blood pressure panel"},
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    for content, media_type, category in (
        (json.dumps(observation).encode(), "application/fhir+json", vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS),
        (b"%PDF-1.7 discharge letter", "application/pdf", vocab.DataCategory.DATA_CATEGORY_DOCUMENTS),
    ):
        await out["patient"].PutRecord(
            pb.PutRecordRequest(
                request_id=rid(), patient_id=patient_id, category=category, content=content, media_type=media_type
            )
        )
    admin_consent = co_grpc.ConsentServiceStub(stack.admin().channel(stack.consent_address, "medledger.consent"))
    await admin_consent.SetBreakGlassPolicy(
        co_pb.SetBreakGlassPolicyRequest(
            request_id=rid(), policy=co_pb.BreakGlassPolicy(organization_id=org_id, enabled=True)
        )
    )
    access = await consent(people["doctor"]).BreakGlass(
        co_pb.BreakGlassRequest(
            request_id=rid(),
            patient_id=patient_id,
            reason=co_pb.BreakGlassReason.BREAK_GLASS_REASON_LIFE_THREATENING,
            justification=JUSTIFICATION,
        )
    )
    out["access_id"] = access.access.access_id
    return out


def services(stack: Any) -> dict[str, ServiceRuntime]:
    return {"identity": stack.identity, "consent": stack.consent, "records": stack.records, "audit": stack.audit}


async def copy_databases(stack: Any) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every row of every table of every service's database, as a backup would keep them."""
    copies: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, runtime in services(stack).items():
        async with runtime.db.connect() as conn:
            metadata = MetaData()
            await conn.run_sync(metadata.reflect)
            copies[name] = {
                table.name: [dict(r) for r in (await conn.execute(select(table))).mappings().all()]
                for table in metadata.sorted_tables
            }
    return copies


def _text(value: Any) -> str:
    if isinstance(value, memoryview):
        value = bytes(value)
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value if isinstance(value, str) else ""


def ciphertexts(copies: dict[str, dict[str, list[dict[str, Any]]]]) -> list[tuple[str, str, str, list[bytes]]]:
    """(service, table, ciphertext, the row's values as candidate associated data) for every
    ciphertext anywhere in the copies."""
    found = []
    for service, tables in copies.items():
        for table, rows in tables.items():
            for row in rows:
                contexts = [v.encode() for v in row.values() if isinstance(v, str) and v and len(v) < 200]
                for value in row.values():
                    for match in CIPHERTEXT.findall(_text(value)):
                        found.append((service, table, match, contexts))
    return found


async def opens(
    stack: Any, patient_id: str, ciphertext: str, contexts: list[bytes], root: KeyManager | None = None
) -> str | None:
    """Which key manager and patient key decrypt the ciphertext (with no associated data or any
    value of its row as associated data); None if none does. With OpenBao, `root` (its root
    token, which every policy's limits spare) tries too."""
    managers: dict[str, Any] = {service: runtime.keys for service, runtime in services(stack).items()}
    if root is not None:
        managers["OpenBao's root token"] = root
    for service, keys in managers.items():
        for name in patient_key_names(patient_id):
            for context in (None, *contexts):
                try:
                    await keys.decrypt(name, ciphertext, associated_data=context)
                except MedledgerError:
                    continue
                return f"{service}:{name}"
    return None


async def until(what: str, check: Any, within: float = 30.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        found = await check()
        if found:
            return found
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


async def erasure_of(stub: pb_grpc.RecordsServiceStub, erasure_id: str) -> pb.Erasure:
    return (await stub.GetErasure(pb.GetErasureRequest(erasure_id=erasure_id))).erasure


async def until_completed(stub: pb_grpc.RecordsServiceStub, erasure_id: str) -> pb.Erasure:
    async def completed() -> pb.Erasure | None:
        erasure = await erasure_of(stub, erasure_id)
        return erasure if erasure.state == ERASURE.ERASURE_STATE_COMPLETED else None

    result: pb.Erasure = await until("the erasure completed", completed)
    return result


async def verifier_key(stack: Any) -> str:
    """records' certificate key, from its public RPC, as `medledger up` puts it in the trust policy."""
    stub = pb_grpc.RecordsServiceStub(make_channel(f"127.0.0.1:{stack.records.grpc_port}"))
    return (await stub.GetErasureVerifierKey(pb.GetErasureVerifierKeyRequest())).verifier_key


@pytest.mark.parametrize("key_manager", ["local", "openbao"])
async def test_after_an_erasure_no_ciphertext_of_the_patient_in_any_copy_decrypts_anywhere(
    start_stack, tmp_path: Path, request: pytest.FixtureRequest, key_manager: str
) -> None:
    """With the local keyrings, and with identity, consent and records on a real OpenBao, each
    with its own tokens (audit keeps its keyring), where the root token tries every copy too."""
    blob_dir = tmp_path / "blobs"
    settings = {"erasure_grace_seconds": 3600, "blob_store": "filesystem", "blob_dir": blob_dir}
    bao = request.getfixturevalue("openbao") if key_manager == "openbao" else None
    root = VaultKeyManager(bao.address, token=bao.root_token) if bao is not None else None
    async with start_stack(records=True, audit=True, records_settings=settings, openbao=bao) as stack:
        c = await cast(stack)
        patient_id = c["patient_id"]
        audit_subject = audit_subject_key_name(patient_id)

        async def subject() -> str | None:
            try:
                return await stack.audit.keys.hmac(audit_subject, patient_id.encode())
            except MedledgerError:
                return None  # the log has not appended an entry about the patient yet

        old_subject = await until("the audit log made the patient's subject key", subject)

        # The copies from before: every database, and the blob store.
        copies = await copy_databases(stack)
        blobs = {path.relative_to(blob_dir): path.read_bytes() for path in blob_dir.rglob("*") if path.is_file()}
        assert len(blobs) == 2  # both versions' ciphertexts are in the blob store

        # Before: the copies hold ciphertexts of the patient in identity (the FHIR resource),
        # consent (the justification) and records (the wrapped data keys), and each decrypts.
        found = ciphertexts(copies)
        opened = {ct: await opens(stack, patient_id, ct, ctx, root) for _, _, ct, ctx in found}
        of_patient = {(s, t, ct) for s, t, ct, _ in found if opened[ct]}
        assert {s for s, _, _ in of_patient} == {"identity", "consent", "records"}, of_patient
        # Both versions' wrapped data keys (one key for both while records' data-key cache kept it).
        assert len([1 for s, t, ct, _ in found if s == "records" and t == "record_versions" and opened[ct]]) == 2
        assert any(s == "consent" and t == "break_glass_accesses" for s, t, _ in of_patient)
        assert any(s == "identity" and t == "principals" for s, t, _ in of_patient)
        # Not every ciphertext is the patient's: the practitioners' resources are under other keys.
        assert len(of_patient) < len(found)
        others = {ct for _, _, ct, _ in found if not opened[ct]}

        # The erasure, approved, runs to its certificate.
        pending = (
            await c["patient"].RequestErasure(
                pb.RequestErasureRequest(request_id=rid(), patient_id=patient_id, reason="leaving")
            )
        ).erasure
        await c["officer"].ApproveErasure(pb.ApproveErasureRequest(erasure_id=pending.erasure_id))
        done = await until_completed(c["patient"], pending.erasure_id)
        assert list(done.awaiting) == []

        # The certificate names every participant, key and version, and verifies offline.
        cert = done.certificate
        by_name = {p.participant: p for p in cert.participants}
        assert set(by_name) == {"identity", "consent", "records", "audit"}
        for name in ("identity", "consent", "records"):
            assert by_name[name].outcome == Outcome.ERASURE_OUTCOME_DESTROYED
            # records also destroys the patient's search key (the blind index of their FHIR terms).
            search_key = [(patient_key_name("records-search", patient_id), [1])] if name == "records" else []
            assert [(k.key_name, list(k.versions)) for k in by_name[name].keys] == [
                (patient_key_name(name, patient_id), [1]),  # type: ignore[arg-type]
                *search_key,
            ]
            assert by_name[name].HasField("confirmed_at")
        assert by_name["audit"].outcome == Outcome.ERASURE_OUTCOME_DESTROYED_AT_APPEND
        assert [k.key_name for k in by_name["audit"].keys] == [audit_subject]
        assert (cert.records_erased, cert.versions_erased) == (2, 2)
        assert cert.unrecoverable_after.seconds - cert.erased_at.seconds == 30 * 24 * 3600
        certified = open_certificate(done.signed_certificate, [await verifier_key(stack)])
        assert certified.facts["erasure"] == pending.erasure_id and certified.facts["patient"] == patient_id
        assert [(p.name, p.outcome) for p in certified.participants] == [
            ("audit", "destroyed-at-append"),
            ("consent", "destroyed"),
            ("identity", "destroyed"),
            ("records", "destroyed"),
        ]
        tampered = done.signed_certificate.replace("records-erased 2", "records-erased 1")
        with pytest.raises(InvalidArgument, match="does not verify"):
            open_certificate(tampered, [await verifier_key(stack)])

        # The audit log appends the certificate and destroys the subject key: the patient's
        # entries can no longer be linked to them.
        async def unlinked() -> bool:
            try:
                return await stack.audit.keys.hmac(audit_subject, patient_id.encode()) != old_subject
            except MedledgerError:
                return True

        await until("audit destroyed the patient's subject key", unlinked)

        # After: not one ciphertext of the copies decrypts with any key manager under any key of
        # the patient, so neither do the blob copies (their data keys are among them) ...
        for service, table, ciphertext, contexts in found:
            assert await opens(stack, patient_id, ciphertext, contexts, root) is None, (service, table)
        assert not [p for p in blob_dir.rglob("*") if p.is_file()]
        versions = copies["records"]["record_versions"]
        assert {Path(v["blob_key"]) for v in versions if v["patient_id"] == patient_id} == set(blobs)
        # ... while the practitioners' resources, under identity's own key, still do: the check
        # is not blind.
        still = []
        for _, table, ciphertext, contexts in found:
            if ciphertext in others and table == "principals":
                for context in contexts:
                    try:
                        still.append(
                            await stack.identity.keys.decrypt(RESOURCE_KEY, ciphertext, associated_data=context)
                        )
                    except MedledgerError:
                        continue
        assert len(still) == 2 and all(b"Practitioner" in r for r in still)

        # consent still shows the access (the accountability), without its justification.
        got = await c["officer_consent"].GetBreakGlassAccess(co_pb.GetBreakGlassAccessRequest(access_id=c["access_id"]))
        assert got.access.access_id == c["access_id"] and got.justification == ""


async def test_an_erasure_waits_visibly_for_a_missing_participant_and_redeliveries_change_nothing(
    start_stack, monkeypatch
) -> None:
    # This deployment runs no audit service: the certificate names it absent.
    settings = {"erasure_grace_seconds": 3600, "erasure_participants": "identity,consent,records"}
    async with start_stack(records=True, records_settings=settings) as stack:
        c = await cast(stack)
        patient_id = c["patient_id"]
        desk = stack.records.handle.erasure_runner

        # consent's key manager is unreachable: its erasure handler retries, unconfirmed.
        real_erase = stack.consent.keys.erase_key

        async def unreachable(name: str) -> None:
            raise Unavailable("the key manager is unreachable")

        monkeypatch.setattr(stack.consent.keys, "erase_key", unreachable)
        pending = (
            await c["patient"].RequestErasure(pb.RequestErasureRequest(request_id=rid(), patient_id=patient_id))
        ).erasure
        await c["officer"].ApproveErasure(pb.ApproveErasureRequest(erasure_id=pending.erasure_id))

        async def only_consent_awaited() -> pb.Erasure | None:
            erasure = await erasure_of(c["patient"], pending.erasure_id)
            return erasure if list(erasure.awaiting) == ["consent"] else None

        waiting = await until("identity and records confirmed, consent awaited", only_consent_awaited)
        assert waiting.state == ERASURE.ERASURE_STATE_RUNNING and not waiting.signed_certificate
        await asyncio.sleep(1.0)  # and it stays so
        assert (await erasure_of(c["patient"], pending.erasure_id)).state == ERASURE.ERASURE_STATE_RUNNING
        await desk.refresh_awaited()
        assert REGISTRY.get_sample_value(AWAITED, {"participant": "consent"}) == 1
        assert REGISTRY.get_sample_value(AWAITED, {"participant": "identity"}) == 0

        # A redelivered confirmation changes nothing: identity's own, sent again through Kafka,
        # and one naming other keys, handed to records directly.
        async with stack.records.db.connect() as conn:
            stored = await records_erasure_storage.confirmations_of(conn, pending.erasure_id)
        assert set(stored) == {"identity", "records"}
        async with stack.identity.db.connect() as conn:
            identity_events = [
                decode(bytes(v)) for v in (await conn.execute(select(outbox.c.value).order_by(outbox.c.id))).scalars()
            ]
        (confirmation,) = [e for e in identity_events if e.type == ev.PatientKeysDestroyed.DESCRIPTOR.full_name]
        producer = make_producer(stack.identity.settings.kafka_bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(TOPICS["identity"], confirmation.SerializeToString(), key=patient_id.encode())
        finally:
            await producer.stop()
        other = unpack(confirmation, ev.PatientKeysDestroyed)
        assert isinstance(other, ev.PatientKeysDestroyed)
        other.keys[0].versions[:] = [1, 2, 3]
        assert await desk.confirm(other) is False
        await asyncio.sleep(1.0)
        async with stack.records.db.connect() as conn:
            assert await records_erasure_storage.confirmations_of(conn, pending.erasure_id) == stored

        # The key manager is back: consent's retry destroys its key and confirms; the certificate
        # follows, naming audit absent.
        monkeypatch.setattr(stack.consent.keys, "erase_key", real_erase)
        done = await until_completed(c["patient"], pending.erasure_id)
        by_name = {p.participant: p for p in done.certificate.participants}
        assert by_name["audit"].outcome == Outcome.ERASURE_OUTCOME_ABSENT and not by_name["audit"].keys
        assert [list(k.versions) for k in by_name["identity"].keys] == [[1]]  # the first confirmation
        assert by_name["consent"].outcome == Outcome.ERASURE_OUTCOME_DESTROYED
        await desk.refresh_awaited()
        assert REGISTRY.get_sample_value(AWAITED, {"participant": "consent"}) == 0
        certified = open_certificate(done.signed_certificate, [await verifier_key(stack)])
        assert ("audit", "absent") in [(p.name, p.outcome) for p in certified.participants]

        # A redelivered request re-confirms (the key already gone counts as destroyed) and the
        # completed erasure and its certificate stay as they are.
        async with stack.records.db.connect() as conn:
            records_events = [
                decode(bytes(v)) for v in (await conn.execute(select(outbox.c.value).order_by(outbox.c.id))).scalars()
            ]
        (request,) = [e for e in records_events if e.type == ev.PatientKeysErasureRequested.DESCRIPTOR.full_name]
        producer = make_producer(stack.identity.settings.kafka_bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(TOPICS["records"], request.SerializeToString(), key=patient_id.encode())
        finally:
            await producer.stop()

        async def reconfirmed() -> list[ev.PatientKeysDestroyed] | None:
            async with stack.identity.db.connect() as conn:
                events = [
                    decode(bytes(v))
                    for v in (await conn.execute(select(outbox.c.value).order_by(outbox.c.id))).scalars()
                ]
            found = [
                unpack(e, ev.PatientKeysDestroyed)
                for e in events
                if e.type == ev.PatientKeysDestroyed.DESCRIPTOR.full_name
            ]
            return found if len(found) == 2 else None  # type: ignore[return-value]

        first, again = await until("identity confirmed the redelivered request", reconfirmed)
        assert list(first.keys[0].versions) == [1] and not first.keys[0].already_gone
        assert again.keys[0].already_gone and again.keys[0].key_name == first.keys[0].key_name
        await asyncio.sleep(1.0)
        after = await erasure_of(c["patient"], pending.erasure_id)
        assert after.signed_certificate == done.signed_certificate and after.certificate == done.certificate
