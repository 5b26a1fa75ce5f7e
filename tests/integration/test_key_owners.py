"""The key-owner migration and the erasure backfill, on PostgreSQL, with the local keyrings and
with OpenBao (the services' own tokens and the legacy token of deploy/vault/).

Before each service owned its keys, identity, consent and records encrypted under the shared
`patient-<id>`. The migration moves identity's patient resources, consent's break-glass
justifications and records' wrapped data keys to `<service>-patient-<id>`, resumably; the backfill
destroys consent's keys and justifications of patients whose erasure completed before consent took
part in erasures."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord
from medledger.events.v1 import records_events_pb2
from sqlalchemy import func, select, text

from medledger_consent import break_glass_storage as consent_break_glass_storage
from medledger_consent import domain as consent_domain
from medledger_consent import key_owners as consent_owners
from medledger_consent import storage as consent_storage
from medledger_devstack.testing import OpenBaoServer, Postgres
from medledger_identity import key_owners as identity_owners
from medledger_identity import storage as identity_storage
from medledger_records import domain as records_domain
from medledger_records import key_owners as records_owners
from medledger_records import storage as records_storage
from medledger_runtime.db import Database
from medledger_runtime.errors import NotFound, PermissionDenied
from medledger_runtime.events import new_event
from medledger_runtime.kafka import ConsumedMessage
from medledger_runtime.key_owners import KeyOwnerMigration, decrypt_owned
from medledger_runtime.keys import (
    KeyManager,
    KeyShredder,
    KeyType,
    LocalKeyring,
    VaultKeyManager,
    create_master_key_file,
    legacy_patient_key_name,
    patient_key_name,
)
from medledger_runtime.outbox import COMMON_MIGRATIONS

PATIENT_KIND = 1


@dataclass
class Keys:
    """One service's key managers in a backend: ``everyday`` (its own token or keyring),
    ``old_world`` (what wrote under patient-<id> before: root, or the service's keyring),
    ``legacy`` (the migration's reader of the old keys) and ``erasure`` (its erasure token)."""

    everyday: KeyManager
    old_world: KeyManager
    legacy: KeyManager
    erasure: KeyManager


@dataclass
class Backend:
    name: str
    services: dict[str, Keys] = field(default_factory=dict)
    _open: list[KeyManager] = field(default_factory=list)


@pytest.fixture(params=["local", "openbao"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    b = Backend(request.param)
    if request.param == "local":
        for service in ("identity", "consent", "records"):
            master = tmp_path / "secrets" / f"{service}.master-key"
            master.parent.mkdir(exist_ok=True)
            create_master_key_file(master)
            keyring = await LocalKeyring.open(tmp_path / "keyrings" / f"{service}.keyring", master)
            b._open.append(keyring)
            # One file per service, no access control: every credential is the keyring.
            b.services[service] = Keys(keyring, keyring, keyring, keyring)
    else:
        bao: OpenBaoServer = request.getfixturevalue("openbao")

        def km(policy: str | None) -> KeyManager:
            made = (
                VaultKeyManager(bao.address, token=bao.root_token)
                if policy is None
                else VaultKeyManager(bao.address, token_file=bao.token_file(policy))
            )
            b._open.append(made)
            return made

        root = km(None)
        legacy = km("legacy-patient-keys")
        for service in ("identity", "consent", "records"):
            b.services[service] = Keys(km(service), root, legacy, km(f"{service}-erasure"))
    try:
        yield b
    finally:
        for keys in b._open:
            await keys.aclose()


async def _database(postgres: Postgres, name: str, migrations: Any, upto: int | None = None) -> Database:
    db = Database(postgres.new_database(name))
    await db.migrate("common", COMMON_MIGRATIONS)
    await db.migrate(name, migrations[:upto] if upto else migrations)
    return db


def _crashing(migration: KeyOwnerMigration, after_moves: int) -> None:
    """The process dies while moving row number ``after_moves + 1``: mid-page, mid-transaction."""
    real = migration.move
    calls = 0

    async def move(conn: Any, old: KeyManager, row_id: str) -> bool:
        nonlocal calls
        calls += 1
        if calls > after_moves:
            raise RuntimeError("killed mid-migration")
        return await real(conn, old, row_id)

    migration.move = move  # type: ignore[method-assign]


async def _count(db: Database, query: Any) -> int:
    async with db.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


async def _crash_then_finish(
    migration: KeyOwnerMigration, left: Callable[[], Awaitable[int]], total: int, page_size: int = 2
) -> None:
    """A run that dies in its second page keeps the first page moved and nothing of the second;
    the next run finishes; a third finds nothing to do."""
    migration.page_size = page_size
    real = migration.move
    _crashing(migration, page_size + 1)
    with pytest.raises(RuntimeError, match="killed"):
        await migration.run()
    assert await left() == total - page_size
    migration.move = real  # type: ignore[method-assign]
    await migration.run()
    assert await left() == 0
    await migration.run()


async def _principal_as_of_v2(conn: Any, principal_id: str, kind: int, organization_id: str, resource: str) -> None:
    """A principal row as identity wrote it at schema version 2 (before the columns of later
    migrations existed): what an old deployment holds when the key-owner migration starts."""
    await conn.execute(
        text(
            "INSERT INTO principals (principal_id, kind, status, organization_id, version, created_at, did, "
            "fhir_resource, secret_hash, updated_at) VALUES (:p, :k, 1, :o, 1, 0, '', :r, 'x', 0)"
        ),
        {"p": principal_id, "k": kind, "o": organization_id, "r": resource},
    )


async def test_identity_moves_each_patients_resource_to_its_own_key_and_resumes_after_a_crash(
    postgres: Postgres, backend: Backend
) -> None:
    keys = backend.services["identity"]
    db = await _database(postgres, "identity", identity_storage.MIGRATIONS, upto=2)
    patients = {f"pat_{uuid.uuid4().hex[:12]}": f'{{"resourceType":"Patient","id":"{i}"}}'.encode() for i in range(5)}
    async with db.transaction() as conn:
        for patient, resource in patients.items():
            old = legacy_patient_key_name(patient)
            await keys.old_world.ensure_key(old, KeyType.AES256_GCM96)
            ciphertext = await keys.old_world.encrypt(old, resource, associated_data=patient.encode())
            await _principal_as_of_v2(conn, patient, PATIENT_KIND, "", ciphertext)
        # A practitioner's resource is under identity-resources already: not on the list.
        await _principal_as_of_v2(conn, "prc_1", 2, "org_1", "vault:v1:x")
    await db.migrate("identity", identity_storage.MIGRATIONS)  # migration 3 lists what is left to move
    pending = identity_storage.resources_under_old_keys

    async def left() -> int:
        return await _count(db, select(func.count()).select_from(pending))

    assert await left() == len(patients)
    # Before the move, reads find each resource under the old key.
    async with db.connect() as conn:
        first = next(iter(patients))
        row = await identity_storage.get_principal(conn, first)
    assert row is not None and row.fhir_resource
    assert (
        await decrypt_owned(
            keys.everyday, lambda: keys.legacy, "identity", first, row.fhir_resource, associated_data=first.encode()
        )
        == patients[first]
    )

    migration = identity_owners.resource_migration(db, keys.everyday, lambda: keys.legacy)
    await _crash_then_finish(migration, left, len(patients))
    async with db.connect() as conn:
        for patient, resource in patients.items():
            row = await identity_storage.get_principal(conn, patient)
            assert row is not None and row.fhir_resource and row.version == 1  # not a change of the principal
            owned = patient_key_name("identity", patient)
            assert await keys.everyday.decrypt(owned, row.fhir_resource, associated_data=patient.encode()) == resource
    if backend.name == "openbao":  # identity's own token never could read the old shared key
        with pytest.raises(PermissionDenied):
            await keys.everyday.decrypt(legacy_patient_key_name(first), "vault:v1:AAAA")
    await db.close()


def _access(patient: str) -> consent_domain.BreakGlassAccess:
    now = time.time()
    return consent_domain.BreakGlassAccess(
        access_id=f"bg_{uuid.uuid4().hex}",
        patient_id=patient,
        practitioner_id="prc_1",
        organization_id="org_1",
        reason=1,
        justification_sha256=hashlib.sha256(b"j").hexdigest(),
        started_at=now,
        expires_at=now + 3600,
        overrides_deny=False,
        review=1,
    )


async def test_consent_moves_each_justification_to_its_own_key_and_resumes_after_a_crash(
    postgres: Postgres, backend: Backend
) -> None:
    keys = backend.services["consent"]
    db = await _database(postgres, "consent", consent_storage.MIGRATIONS, upto=6)
    patient = f"pat_{uuid.uuid4().hex[:12]}"
    old = legacy_patient_key_name(patient)
    await keys.old_world.ensure_key(old, KeyType.AES256_GCM96)
    justifications: dict[str, bytes] = {}
    async with db.transaction() as conn:
        for i in range(5):
            access = _access(patient)
            text = f"unconscious, no record of allergies ({i})".encode()
            ciphertext = await keys.old_world.encrypt(old, text, associated_data=access.access_id.encode())
            await consent_break_glass_storage.insert_access(conn, access, ciphertext)
            justifications[access.access_id] = text
    await db.migrate("consent", consent_storage.MIGRATIONS)
    pending = consent_storage.justifications_under_old_keys

    async def left() -> int:
        return await _count(db, select(func.count()).select_from(pending))

    assert await left() == 5
    migration = consent_owners.justification_migration(db, keys.everyday, lambda: keys.legacy)
    await _crash_then_finish(migration, left, 5)
    owned = patient_key_name("consent", patient)
    async with db.connect() as conn:
        for access_id, text in justifications.items():
            found = await consent_break_glass_storage.get_access(conn, access_id)
            assert found is not None
            assert await keys.everyday.decrypt(owned, found[1], associated_data=access_id.encode()) == text
    await db.close()


async def test_records_rewraps_each_data_key_under_its_own_key_and_resumes_after_a_crash(
    postgres: Postgres, backend: Backend
) -> None:
    keys = backend.services["records"]
    db = await _database(postgres, "records", records_storage.MIGRATIONS)
    patient = f"pat_{uuid.uuid4().hex[:12]}"
    old = legacy_patient_key_name(patient)
    await keys.old_world.ensure_key(old, KeyType.AES256_GCM96)
    contents: dict[tuple[str, int], bytes] = {}
    async with db.transaction() as conn:
        for i in range(3):
            record = records_storage.Record(f"rec_{uuid.uuid4().hex}", patient, 1, "text/plain", 2)
            await records_storage.insert_record(conn, record, time.time())
            for version in (1, 2):
                content = f"note {i}.{version}".encode()
                data_key = await keys.old_world.generate_data_key(old)
                sealed = records_domain.seal(data_key.plaintext, content, record.record_id, version, patient)
                stored = records_storage.StoredVersion(
                    record.record_id, version, patient, old, data_key.wrapped, sealed, b"s" * 32, "0" * 64, "e"
                )
                await records_storage.insert_version(conn, stored, written_by="prc_1", organization_id="o", now=0.0)
                contents[(record.record_id, version)] = content
    c = records_storage.record_versions.c

    async def left() -> int:
        return await _count(db, select(func.count()).where(c.key_name == old))

    migration = records_owners.data_key_migration(db, keys.everyday, lambda: keys.legacy)
    await _crash_then_finish(migration, left, 6)
    owned = patient_key_name("records", patient)
    async with db.connect() as conn:
        rows = (await conn.execute(select(records_storage.record_versions))).all()
    assert len(rows) == 6 and {r.key_name for r in rows} == {owned}
    for r in rows:
        data_key = await keys.everyday.decrypt_data_key(owned, r.wrapped_key)
        opened = records_domain.unseal(data_key, bytes(r.ciphertext), r.record_id, r.version, patient)
        assert opened == contents[(r.record_id, r.version)]
    await db.close()


def _erased(patient: str) -> ConsumedMessage:
    certificate = records_events_pb2.ErasureCertificate(erasure_id=f"era_{uuid.uuid4().hex}", patient_id=patient)
    event = new_event(
        source="medledger.records",
        payload=records_events_pb2.PatientRecordsErased(certificate=certificate),
        aggregate_id=patient,
        version=1,
        subject=patient,
    )
    record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
        topic="medledger.records.v1",
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        key=patient.encode(),
        value=b"",
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=0,
        headers=(),
    )
    return ConsumedMessage(record, event)


async def test_the_backfill_destroys_what_an_earlier_erasure_left_in_consent_and_resumes_after_a_crash(
    postgres: Postgres, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = backend.services["consent"]
    db = await _database(postgres, "consent", consent_storage.MIGRATIONS)
    erased, kept = (f"pat_{uuid.uuid4().hex[:12]}" for _ in range(2))
    copies: dict[str, tuple[str, str]] = {}  # access id -> (patient, ciphertext), a copy from before
    async with db.transaction() as conn:
        for patient in (erased, erased, kept):
            access = _access(patient)
            # One of the erased patient's justifications not moved yet: under the old shared key.
            moved = patient == kept or any(p == erased for p, _ in copies.values())
            name = patient_key_name("consent", patient) if moved else legacy_patient_key_name(patient)
            writer = keys.everyday if moved else keys.old_world
            await writer.ensure_key(name, KeyType.AES256_GCM96)
            ciphertext = await writer.encrypt(name, b"why", associated_data=access.access_id.encode())
            await consent_break_glass_storage.insert_access(conn, access, ciphertext)
            copies[access.access_id] = (patient, ciphertext)
    handler = consent_owners.ErasedJustificationsHandler(db, KeyShredder(keys.erasure, reader=keys.everyday))
    message = _erased(erased)

    # The process dies after destroying the keys, before the rows: the event comes again.
    real = consent_break_glass_storage.forget_justifications

    async def killed(*args: Any) -> int:
        raise RuntimeError("killed mid-backfill")

    monkeypatch.setattr(consent_break_glass_storage, "forget_justifications", killed)
    with pytest.raises(RuntimeError, match="killed"):
        await handler(message)
    monkeypatch.setattr(consent_break_glass_storage, "forget_justifications", real)
    await handler(message)
    await handler(message)  # a duplicate: done is done

    async with db.connect() as conn:
        for access_id, (patient, ciphertext) in copies.items():
            found = await consent_break_glass_storage.get_access(conn, access_id)
            assert found is not None
            if patient == erased:
                assert found[1] == ""
            else:
                assert found[1] == ciphertext
    # Even the copy from before decrypts under neither key any more; the other patient's does.
    for access_id, (patient, ciphertext) in copies.items():
        ad = access_id.encode()
        if patient == erased:
            with pytest.raises(NotFound):
                await decrypt_owned(
                    keys.everyday, lambda: keys.legacy, "consent", patient, ciphertext, associated_data=ad
                )
            for name in (patient_key_name("consent", patient), legacy_patient_key_name(patient)):
                with pytest.raises(NotFound):
                    await keys.old_world.key_info(name)
        else:
            assert (
                await decrypt_owned(
                    keys.everyday, lambda: keys.legacy, "consent", patient, ciphertext, associated_data=ad
                )
                == b"why"
            )
    await db.close()
