"""Identity's principal and token use cases (principals.Directory, tokens.TokenDesk) without gRPC:
on SQLite with identity's migrations, a real local keyring, the real Argon2id hasher and the
outbox. The gRPC API over them (idempotency, the coarse access table) is exercised in
tests/integration/test_identity.py."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from medledger.events.v1 import identity_events_pb2 as ev
from medledger.types.v1 import vocabulary_pb2 as v
from sqlalchemy import func, select

from medledger_identity import storage
from medledger_identity.credentials import SecretHasher
from medledger_identity.principal_commands import (
    ChangeRole,
    DeactivatePrincipal,
    GetPrincipal,
    ListPrincipals,
    Registered,
    RegisterPatient,
    RegisterPrincipal,
    UpdatePrincipalResource,
)
from medledger_identity.principals import ACTIVE, DEACTIVATED, Directory
from medledger_identity.tokens import IssueToken, TokenDesk, TokenSigner
from medledger_runtime.auth import Caller
from medledger_runtime.db import Database
from medledger_runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from medledger_runtime.events import decode, unpack
from medledger_runtime.keys import LocalKeyring, create_master_key_file
from medledger_runtime.outbox import COMMON_MIGRATIONS, outbox

Kind = v.PrincipalKind
Role = v.Role
ADMIN = Caller("svc_admin", "service", frozenset({"admin"}), "", "tok_admin", 0.0)
SSN = "urn:oid:2.16.840.1.113883.4.1"


def patient(mrn: str = "123-45-6789", **extra: object) -> bytes:
    return json.dumps({"resourceType": "Patient", "identifier": [{"system": SSN, "value": mrn}], **extra}).encode()


def practitioner(npi: str) -> bytes:
    return json.dumps(
        {"resourceType": "Practitioner", "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": npi}]}
    ).encode()


def as_caller(principal: storage.PrincipalRow, *roles: str) -> Caller:
    kind = v.PrincipalKind.Name(principal.kind).removeprefix("PRINCIPAL_KIND_").lower()  # type: ignore[arg-type]
    return Caller(principal.principal_id, kind, frozenset(roles), principal.organization_id, "tok", 0.0)


@dataclass
class Desk:
    principals: Directory
    tokens: TokenDesk
    db: Database
    notified: list[int]
    deactivated: list[str] = field(default_factory=list)

    async def events(self) -> list[tuple[str, object]]:
        """(type, payload) of every event in the outbox, in order."""
        async with self.db.connect() as conn:
            rows = (await conn.execute(select(outbox.c.value).order_by(outbox.c.id))).all()
        kinds = (
            ev.PrincipalRegistered,
            ev.PrincipalUpdated,
            ev.PrincipalDeactivated,
            ev.PrincipalRoleChanged,
            ev.SigningKeyRotated,
        )
        out: list[tuple[str, object]] = []
        for (raw,) in rows:
            event = decode(raw)
            cls = next(c for c in kinds if event.type == c.DESCRIPTOR.full_name)
            out.append((cls.DESCRIPTOR.name, unpack(event, cls)))
        return out

    async def count(self, table: object) -> int:
        async with self.db.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())  # type: ignore[arg-type]

    async def stored(self, principal_id: str) -> storage.PrincipalRow:
        async with self.db.connect() as conn:
            row = await storage.get_principal(conn, principal_id)
        assert row is not None
        return row


@pytest.fixture
async def desk(tmp_path: Path) -> AsyncIterator[Desk]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/identity.db")
    await db.migrate("common", COMMON_MIGRATIONS)
    await db.migrate("identity", storage.MIGRATIONS)
    master = create_master_key_file(tmp_path / "secrets" / "master.key")
    keys = await LocalKeyring.open(tmp_path / "keys" / "identity.keyring", master)
    hasher = SecretHasher()
    notified: list[int] = []
    deactivated: list[str] = []
    principals = Directory(db, keys, hasher, lambda: notified.append(1), deactivated=deactivated.append)
    tokens = TokenDesk(db, TokenSigner(keys), hasher, lambda: notified.append(1))
    await principals.start()
    await tokens.start()
    try:
        yield Desk(principals, tokens, db, notified, deactivated)
    finally:
        await db.close()
        await keys.aclose()


async def register(desk: Desk, mrn: str = "123-45-6789") -> Registered:
    registered: Registered = await desk.principals.register_patient(RegisterPatient(fhir_patient=patient(mrn)))
    return registered


async def test_a_registered_patient_reads_their_own_resource(desk: Desk) -> None:
    registered = await register(desk)
    row = registered.principal
    assert row.principal_id.startswith("pat_") and row.did.startswith("did:key:z")
    assert (row.kind, row.status, row.version) == (Kind.PRINCIPAL_KIND_PATIENT, ACTIVE, 1)
    assert len(registered.client_secret) >= 32
    assert desk.notified == [1]
    [(name, payload)] = await desk.events()
    assert name == "PrincipalRegistered"
    assert payload == ev.PrincipalRegistered(principal_id=row.principal_id, kind=Kind.PRINCIPAL_KIND_PATIENT)

    found = await desk.principals.get(as_caller(row), GetPrincipal(row.principal_id, include_fhir_resource=True))
    assert found.principal == row
    assert json.loads(found.fhir_resource)["identifier"] == [{"system": SSN, "value": "123-45-6789"}]
    # Without asking for it, no resource.
    assert (await desk.principals.get(as_caller(row), GetPrincipal(row.principal_id))).fhir_resource == b""


async def test_a_second_patient_with_the_same_identifier_is_refused(desk: Desk) -> None:
    await register(desk)
    with pytest.raises(AlreadyExists):
        await register(desk)
    assert await desk.count(storage.principals) == 1


async def test_a_stranger_is_refused_the_resource_but_sees_the_pseudonym(desk: Desk) -> None:
    mine = (await register(desk, "111-11-1111")).principal
    stranger = as_caller((await register(desk, "222-22-2222")).principal)
    with pytest.raises(PermissionDenied):
        await desk.principals.get(stranger, GetPrincipal(mine.principal_id, include_fhir_resource=True))
    assert (await desk.principals.get(stranger, GetPrincipal(mine.principal_id))).principal == mine
    with pytest.raises(PermissionDenied):
        await desk.principals.update_resource(stranger, UpdatePrincipalResource(mine.principal_id, patient("9")))
    with pytest.raises(PermissionDenied):
        await desk.principals.deactivate(stranger, DeactivatePrincipal(mine.principal_id))
    assert await desk.stored(mine.principal_id) == mine
    assert desk.deactivated == []
    with pytest.raises(NotFound):
        await desk.principals.get(stranger, GetPrincipal("pat_nobody"))


@pytest.mark.parametrize(
    ("resource", "field"),
    [
        (b"not json", "fhir_patient"),
        (json.dumps({"resourceType": "Patient"}).encode(), "fhir_patient"),  # no identifier
        (patient(gender="robot"), "fhir_patient"),
        (practitioner("1234567893"), "fhir_patient"),  # not a Patient
        # FHIR strings hold no control characters but tab, CR and LF: named by their path.
        (patient(name=[{"family": "Doe\x1b[2J"}]), "fhir_patient.name[0].family"),
        (patient(mrn="123\x00"), "fhir_patient.identifier[0].value"),
    ],
)
async def test_an_invalid_registration_is_invalid_argument_and_changes_nothing(
    desk: Desk, resource: bytes, field: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await desk.principals.register_patient(RegisterPatient(fhir_patient=resource))
    assert raised.value.violations[0].field.startswith(field)
    assert await desk.count(storage.principals) == 0
    assert await desk.count(storage.principal_identifiers) == 0
    assert await desk.events() == []
    assert desk.notified == []


async def test_an_invalid_update_is_invalid_argument_and_changes_nothing(desk: Desk) -> None:
    row = (await register(desk)).principal
    with pytest.raises(InvalidArgument):
        await desk.principals.update_resource(as_caller(row), UpdatePrincipalResource(row.principal_id, b"{"))
    assert await desk.stored(row.principal_id) == row
    assert [name for name, _ in await desk.events()] == ["PrincipalRegistered"]


async def test_an_update_replaces_the_resource_and_bumps_the_version(desk: Desk) -> None:
    row = (await register(desk)).principal
    updated = await desk.principals.update_resource(
        as_caller(row), UpdatePrincipalResource(row.principal_id, patient("123-45-6789", gender="female"))
    )
    assert updated.version == 2
    found = await desk.principals.get(as_caller(row), GetPrincipal(row.principal_id, include_fhir_resource=True))
    assert json.loads(found.fhir_resource)["gender"] == "female"
    assert [name for name, _ in await desk.events()] == ["PrincipalRegistered", "PrincipalUpdated"]


async def test_a_patient_deactivates_themself_once(desk: Desk) -> None:
    registered = await register(desk)
    row = registered.principal
    deactivated = await desk.principals.deactivate(as_caller(row), DeactivatePrincipal(row.principal_id))
    assert (deactivated.status, deactivated.version) == (DEACTIVATED, 2)
    assert await desk.stored(row.principal_id) == deactivated
    assert desk.deactivated == [row.principal_id]
    assert await desk.principals.deactivated_ids() == [row.principal_id]
    assert (await desk.events())[-1] == ("PrincipalDeactivated", ev.PrincipalDeactivated(principal_id=row.principal_id))

    # Again: nothing changes, no event (the replica is told again, which changes nothing either).
    again = await desk.principals.deactivate(ADMIN, DeactivatePrincipal(row.principal_id))
    assert again == deactivated
    assert len(await desk.events()) == 2

    # A deactivated principal gets no token and no role.
    with pytest.raises(Unauthenticated, match="deactivated"):
        await desk.tokens.issue(IssueToken(row.principal_id, registered.client_secret, "medledger.records"))
    with pytest.raises(FailedPrecondition):
        await desk.principals.change_role(ADMIN, ChangeRole(row.principal_id, Role.ROLE_AUDITOR, grant=True))


async def test_an_org_admin_registers_practitioners_of_their_organization_only(desk: Desk) -> None:
    org = (
        await desk.principals.register_principal(ADMIN, RegisterPrincipal(Kind.PRINCIPAL_KIND_ORGANIZATION, "", b""))
    ).principal
    other = (
        await desk.principals.register_principal(ADMIN, RegisterPrincipal(Kind.PRINCIPAL_KIND_ORGANIZATION, "", b""))
    ).principal
    org_admin = Caller("prn_oa", "practitioner", frozenset({"org-admin"}), org.principal_id, "tok", 0.0)
    doctor = (
        await desk.principals.register_principal(
            org_admin, RegisterPrincipal(Kind.PRINCIPAL_KIND_PRACTITIONER, org.principal_id, practitioner("1"))
        )
    ).principal
    assert (doctor.kind, doctor.organization_id) == (Kind.PRINCIPAL_KIND_PRACTITIONER, org.principal_id)
    before = await desk.count(storage.principals)
    with pytest.raises(PermissionDenied):
        await desk.principals.register_principal(
            org_admin, RegisterPrincipal(Kind.PRINCIPAL_KIND_PRACTITIONER, other.principal_id, practitioner("2"))
        )
    with pytest.raises(InvalidArgument):
        await desk.principals.register_principal(
            ADMIN, RegisterPrincipal(Kind.PRINCIPAL_KIND_PRACTITIONER, "org_nonexistent", practitioner("3"))
        )
    assert await desk.count(storage.principals) == before

    # The org-admin lists their own organization, whatever they ask for.
    page = await desk.principals.list(org_admin, ListPrincipals())
    assert [p.principal_id for p in page.principals] == [doctor.principal_id]
    with pytest.raises(PermissionDenied):
        await desk.principals.list(org_admin, ListPrincipals(organization_id=other.principal_id))

    # Roles: within their organization, never admin.
    changed = await desk.principals.change_role(
        org_admin, ChangeRole(doctor.principal_id, Role.ROLE_PRIVACY_OFFICER, grant=True)
    )
    assert changed.roles == (Role.ROLE_PRIVACY_OFFICER,)
    with pytest.raises(PermissionDenied):
        await desk.principals.change_role(org_admin, ChangeRole(doctor.principal_id, Role.ROLE_ADMIN, grant=True))
    role_events = [p for name, p in await desk.events() if name == "PrincipalRoleChanged"]
    assert role_events == [
        ev.PrincipalRoleChanged(
            principal_id=doctor.principal_id, role=Role.ROLE_PRIVACY_OFFICER, granted=True, changed_by="prn_oa"
        )
    ]


async def test_a_secret_is_exchanged_for_a_token_and_nothing_else_is(desk: Desk) -> None:
    registered = await register(desk)
    row = registered.principal
    issued = await desk.tokens.issue(IssueToken(row.principal_id, registered.client_secret, "medledger.records"))
    decoded = [json.loads(base64.urlsafe_b64decode(p + "==")) for p in issued.access_token.split(".")[:2]]
    assert decoded[0]["alg"] == "EdDSA"
    assert decoded[1]["sub"] == row.principal_id and decoded[1]["aud"] == "medledger.records"
    assert issued.expires_at == decoded[1]["exp"] == decoded[1]["iat"] + 15 * 60
    for principal_id, secret in [(row.principal_id, "wrong"), ("pat_nobody", registered.client_secret)]:
        with pytest.raises(Unauthenticated, match="invalid credentials"):
            await desk.tokens.issue(IssueToken(principal_id, secret, "medledger.records"))
    with pytest.raises(InvalidArgument):
        await desk.tokens.issue(IssueToken(row.principal_id, registered.client_secret, "medledger.elsewhere"))


async def test_a_rotation_adds_a_key_version_to_the_jwks(desk: Desk) -> None:
    before = json.loads(await desk.tokens.jwks_json())["keys"]
    kid = await desk.tokens.rotate()
    after = json.loads(await desk.tokens.jwks_json())["keys"]
    assert kid.endswith(".v2") and len(after) == len(before) + 1 and after[-1]["kid"] == kid
    assert (await desk.events())[-1] == ("SigningKeyRotated", ev.SigningKeyRotated(kid=kid))
