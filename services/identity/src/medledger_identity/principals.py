"""Identity's principals, apart from any transport (the gRPC API in ``api.py`` is one caller of
these): registering patients and other principals, reading and listing them, replacing a FHIR
resource, deactivating, assigning and revoking roles, and the platform's own principals at start.

Each use case takes the caller and a command of plain values and returns plain results or raises
the errors of ``medledger_runtime.errors``. A change and its event commit together; a mutating
use case takes an optional ``transaction`` that runs its write (the API passes one that runs it
once per request id, :func:`medledger_runtime.idempotency.run_idempotent`). Who may do what is
decided in ``domain.py``; tokens are in ``tokens.py``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import message as pb_message
from medledger.events.v1 import identity_events_pb2
from medledger.types.v1 import vocabulary_pb2
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_identity import domain, scopes, storage
from medledger_identity.credentials import SecretHasher
from medledger_identity.principal_commands import (
    ChangeRole,
    DeactivatePrincipal,
    FindPrincipals,
    Found,
    GetPrincipal,
    ListPrincipals,
    PrincipalPage,
    Registered,
    RegisterPatient,
    RegisterPrincipal,
    RegisterSmartClient,
    UpdatePrincipalResource,
)
from medledger_identity.resources import Resources
from medledger_runtime.auth import Caller
from medledger_runtime.consent_checks import ConsentService
from medledger_runtime.db import Database
from medledger_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from medledger_runtime.events import TOPICS, new_event
from medledger_runtime.keys import KeyManager, KeyType
from medledger_runtime.outbox import enqueue
from medledger_runtime.vocabulary import PRINCIPAL_ID_PREFIX

Kind = vocabulary_pb2.PrincipalKind
ACTIVE = vocabulary_pb2.PrincipalStatus.PRINCIPAL_STATUS_ACTIVE
DEACTIVATED = vocabulary_pb2.PrincipalStatus.PRINCIPAL_STATUS_DEACTIVATED

# Client secrets of registration responses kept for retries are encrypted under this key (the
# resources' and blind indexes' keys are in resources.py).
REPLAY_KEY = "identity-secret-replay"
MAX_PAGE_SIZE = 1000


Registration = Callable[[AsyncConnection], Awaitable[Registered]]
Change = Callable[[AsyncConnection], Awaitable[storage.PrincipalRow]]
Apply = Callable[[AsyncConnection, storage.PrincipalRow], Awaitable[storage.PrincipalRow | None]]


class Directory:
    """Identity's principal use cases; its dependencies come through the constructor."""

    def __init__(
        self,
        db: Database,
        keys: KeyManager,
        hasher: SecretHasher,
        notify: Callable[[], None],
        *,
        source: str = "medledger.identity",
        legacy_keys: Callable[[], KeyManager] | None = None,
        deactivated: Callable[[str], None] = lambda principal_id: None,
        consent: ConsentService | None = None,
    ) -> None:
        self.db = db
        self.keys = keys
        self.resources = Resources(keys, legacy_keys)
        self.hasher = hasher
        # Wakes the outbox relay after a change's transaction commits.
        self.notify = notify
        self.source = source
        # Told of each deactivation at once: this replica refuses the principal's tokens then.
        self.deactivated = deactivated
        # Asked before a patient's resource goes to another reader; None: nobody else gets it.
        self.consent = consent

    async def start(self) -> None:
        await self.resources.start()
        await self.keys.ensure_key(REPLAY_KEY, KeyType.AES256_GCM96)

    # -- registration --------------------------------------------------------------------------

    async def register_patient(
        self, command: RegisterPatient, transaction: Callable[[Registration], Awaitable[Any]] | None = None
    ) -> Any:
        """A patient registers themself (no caller). Returns what the transaction returns (by
        default the Registered)."""
        resource = domain.validate_fhir(Kind.PRINCIPAL_KIND_PATIENT, command.fhir_patient, "fhir_patient")

        async def write(conn: AsyncConnection) -> Registered:
            row, secret = await self._create(
                conn, kind=Kind.PRINCIPAL_KIND_PATIENT, organization_id="", resource=resource
            )
            return Registered(row, secret)

        return await (transaction or self._transaction)(write)

    async def register_principal(
        self,
        caller: Caller,
        command: RegisterPrincipal,
        transaction: Callable[[Registration], Awaitable[Any]] | None = None,
    ) -> Any:
        """An admin registers any principal, an org-admin practitioners of their organization, a
        SMART client patients, practitioners (of its organization or one it registered) and
        organizations, without a client secret (``domain.issues_secret``)."""
        domain.check_kind(command.kind)
        domain.check_organization(command.kind, command.organization_id)
        domain.check_may_register(caller, command.kind, command.organization_id)
        resource = domain.validate_fhir(command.kind, command.fhir_resource, "fhir_resource")

        async def write(conn: AsyncConnection) -> Registered:
            if command.organization_id:
                org = await self._check_organization(conn, command.organization_id)
                domain.check_may_staff(caller, org.principal_id, org.registered_by)
            row, secret = await self._create(
                conn,
                kind=command.kind,
                organization_id=command.organization_id,
                resource=resource,
                with_secret=domain.issues_secret(caller),
                registered_by=caller.principal_id,
            )
            return Registered(row, secret)

        return await (transaction or self._transaction)(write)

    async def register_smart_client(
        self,
        caller: Caller,
        command: RegisterSmartClient,
        transaction: Callable[[Change], Awaitable[Any]] | None = None,
    ) -> Any:
        """An admin, or an org-admin for their organization, registers a SMART Backend Services
        client: a principal of kind smart-client of the organization, with no secret, its public
        JWKS and its allowed system/ scopes. Returns what the transaction returns (by default the
        principal's row)."""
        domain.check_may_register_client(caller, command.organization_id)
        if not command.organization_id:
            raise InvalidArgument.field("organization_id", "required: the organization the client acts for")
        jwks_json = domain.validate_client_jwks(command.jwks_json)
        allowed = scopes.parse_scopes(" ".join(command.allowed_scopes), "allowed_scopes")
        if not allowed:
            raise InvalidArgument.field("allowed_scopes", "at least one system/ scope")
        scopes.check_context(allowed, "system", "allowed_scopes")

        async def write(conn: AsyncConnection) -> storage.PrincipalRow:
            await self._check_organization(conn, command.organization_id)
            row, _ = await self._create(
                conn,
                kind=Kind.PRINCIPAL_KIND_SMART_CLIENT,
                organization_id=command.organization_id,
                resource=None,
                with_secret=False,
                registered_by=caller.principal_id,
            )
            await storage.insert_smart_client(
                conn, storage.SmartClientRow(row.principal_id, jwks_json, scopes.scope_string(allowed))
            )
            return row

        return await (transaction or self._transaction)(write)

    async def _check_organization(self, conn: AsyncConnection, organization_id: str) -> storage.PrincipalRow:
        org = await storage.get_principal(conn, organization_id)
        if org is None or org.kind != Kind.PRINCIPAL_KIND_ORGANIZATION:
            raise InvalidArgument.field("organization_id", "not a registered organization")
        if org.status != ACTIVE:
            raise FailedPrecondition("the organization is deactivated")
        return org

    async def ensure_platform_principal(
        self, principal_id: str, secret: str, roles: tuple[int, ...], kind: int = Kind.PRINCIPAL_KIND_SERVICE
    ) -> None:
        """Create a service or the bootstrap admin at start, or update its secret to the file's."""
        async with self.db.transaction() as conn:
            exists = await storage.get_principal(conn, principal_id) is not None
            stored = await storage.get_secret_hash(conn, principal_id)
            if not exists:
                await self._create(
                    conn, kind=kind, organization_id="", resource=None, roles=roles,
                    principal_id=principal_id, client_secret=secret,
                )  # fmt: skip
            elif stored is None or not await self.hasher.verify(stored, secret):
                await storage.set_secret_hash(conn, principal_id, await self.hasher.hash(secret))
        self.notify()

    async def ensure_own_principal(self, principal_id: str, roles: tuple[int, ...]) -> None:
        """identity's own service principal, which signs its own tokens (no secret needed), with
        at least `roles`: created at start if missing, granted a missing role (with its event)."""
        async with self.db.transaction() as conn:
            row = await storage.get_principal(conn, principal_id, for_update=True)
            if row is None:
                await self._create(
                    conn, kind=Kind.PRINCIPAL_KIND_SERVICE, organization_id="", resource=None, roles=roles,
                    principal_id=principal_id, with_secret=False,
                )  # fmt: skip
            else:
                for role in sorted(set(roles) - set(row.roles)):
                    granted = storage.PrincipalRow(**{**row.__dict__, "roles": tuple(sorted({*row.roles, role}))})
                    row = await storage.save_changes(conn, row, granted)
                    await self._emit(
                        conn,
                        row,
                        identity_events_pb2.PrincipalRoleChanged(
                            principal_id=principal_id,
                            role=role,  # type: ignore[arg-type]
                            granted=True,
                            changed_by=principal_id,
                        ),
                    )
        self.notify()

    async def seal_secret(self, secret: str) -> str:
        """A new client secret as kept for a retried registration: encrypted."""
        return await self.keys.encrypt(REPLAY_KEY, secret.encode())

    async def unseal_secret(self, sealed: str) -> str:
        return (await self.keys.decrypt(REPLAY_KEY, sealed)).decode()

    # -- reading -------------------------------------------------------------------------------

    async def get(self, caller: Caller, command: GetPrincipal) -> Found:
        """Anyone signed in reads a principal; its FHIR resource the principal, admins and its
        org-admins, and a patient's a reader whom consent permits the demographics for
        `command.purpose` (PERMISSION_DENIED with consent's reason otherwise)."""
        async with self.db.connect() as conn:
            row = await storage.get_principal(conn, command.principal_id)
        if row is None:
            raise NotFound("no such principal")
        resource = b""
        if command.include_fhir_resource:
            if not domain.may_read_resource(caller, row.principal_id, row.organization_id):
                await self._ask_consent(caller, row, command.purpose)
            if row.fhir_resource:
                # NotFound: the patient's key was deleted (their records were erased) and the
                # ciphertext is about to go too: there is no resource any more.
                with contextlib.suppress(NotFound):
                    resource = await self.resources.decrypt(row)
        return Found(row, resource)

    async def _ask_consent(self, caller: Caller, row: storage.PrincipalRow, purpose: int) -> None:
        """A patient's resource to another reader: as consent decides, as records asks it."""
        if row.kind != Kind.PRINCIPAL_KIND_PATIENT or self.consent is None:
            raise PermissionDenied("only the principal, admins and its org-admins may read its resource")
        if purpose == vocabulary_pb2.PurposeOfUse.PURPOSE_OF_USE_UNSPECIFIED:
            # No purpose, nothing for consent to permit: refused as before consent was asked.
            raise PermissionDenied(
                "only the principal, admins and its org-admins may read its resource, or a reader consent "
                "permits for a purpose (give purpose)"
            )
        answer = await self.consent.check(
            caller,
            row.principal_id,
            vocabulary_pb2.Action.ACTION_READ,
            vocabulary_pb2.DataCategory.DATA_CATEGORY_DEMOGRAPHICS,
            purpose,
        )
        if not answer.permit:
            raise PermissionDenied(f"consent denies it: {answer.reason or answer.reason_code}")

    async def find(self, caller: Caller, command: FindPrincipals) -> tuple[storage.PrincipalRow, ...]:
        """Principals of a kind by FHIR identifier, through the identifiers' blind index (the
        identifier itself is never stored). Who may: ``domain.check_may_find``."""
        domain.check_may_find(caller, command.kind)
        system, value = domain.parse_identifier(command.identifier)
        index = await self.resources.blind_index(system, value)
        async with self.db.connect() as conn:
            return tuple(await storage.principals_by_blind_index(conn, index, command.kind))

    # Before `list`, whose name would shadow the builtin in this annotation.
    async def deactivated_ids(self) -> list[str]:
        async with self.db.connect() as conn:
            return await storage.deactivated_ids(conn, DEACTIVATED)

    async def list(self, caller: Caller, command: ListPrincipals) -> PrincipalPage:
        organization_id = command.organization_id
        if not (domain.is_admin(caller) or caller.has_role("auditor") or caller.has_role("privacy-officer")):
            # An org-admin lists their own organization only.
            if organization_id and organization_id != caller.organization_id:
                raise PermissionDenied("org-admins list their own organization only")
            organization_id = caller.organization_id
        if command.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        size = min(command.page_size or 100, MAX_PAGE_SIZE)
        if command.kind and command.kind not in PRINCIPAL_ID_PREFIX:
            raise InvalidArgument.field("kind", "unknown principal kind")
        async with self.db.connect() as conn:
            rows = await storage.list_principals(
                conn, kind=command.kind, organization_id=organization_id, after=command.page_token, limit=size + 1
            )
        more = len(rows) > size
        rows = rows[:size]
        return PrincipalPage(rows, rows[-1].principal_id if more else "")

    # -- changes -------------------------------------------------------------------------------

    async def update_resource(
        self,
        caller: Caller,
        command: UpdatePrincipalResource,
        transaction: Callable[[Change], Awaitable[Any]] | None = None,
    ) -> Any:
        """Replace the FHIR resource (the principal, admins, its org-admins)."""

        async def apply(conn: AsyncConnection, row: storage.PrincipalRow) -> storage.PrincipalRow:
            domain.check_may_manage(caller, row.principal_id, row.organization_id)
            resource = domain.validate_fhir(row.kind, command.fhir_resource, "fhir_resource", required=True)
            if resource is None:
                raise FailedPrecondition("this principal's kind carries no FHIR resource")
            await storage.replace_identifiers(conn, row.principal_id, await self.resources.blind_indexes(resource))
            ciphertext = await self.resources.encrypt(row.principal_id, row.kind, resource)
            await storage.off_old_keys(conn, row.principal_id)  # under identity's own key now
            return storage.PrincipalRow(**{**row.__dict__, "fhir_resource": ciphertext})

        return await self._change(
            command.principal_id,
            apply,
            lambda row: identity_events_pb2.PrincipalUpdated(principal_id=row.principal_id),
            transaction,
        )

    async def deactivate(
        self,
        caller: Caller,
        command: DeactivatePrincipal,
        transaction: Callable[[Change], Awaitable[Any]] | None = None,
    ) -> Any:
        """Deactivate (the principal, admins, its org-admins); deactivating again changes nothing."""

        async def apply(conn: AsyncConnection, row: storage.PrincipalRow) -> storage.PrincipalRow | None:
            domain.check_may_manage(caller, row.principal_id, row.organization_id)
            if row.status == DEACTIVATED:
                return None
            return storage.PrincipalRow(**{**row.__dict__, "status": DEACTIVATED})

        result = await self._change(
            command.principal_id,
            apply,
            lambda row: identity_events_pb2.PrincipalDeactivated(principal_id=row.principal_id),
            transaction,
        )
        # This replica refuses the principal at once; the others when the event reaches them.
        self.deactivated(command.principal_id)
        return result

    async def change_role(
        self, caller: Caller, command: ChangeRole, transaction: Callable[[Change], Awaitable[Any]] | None = None
    ) -> Any:
        """Assign or revoke a role (admins; org-admins within their organization, never admin);
        a role already so changes nothing."""

        async def apply(conn: AsyncConnection, row: storage.PrincipalRow) -> storage.PrincipalRow | None:
            domain.check_may_change_role(caller, command.role, row.organization_id)
            if row.status != ACTIVE:
                raise FailedPrecondition("the principal is deactivated")
            roles = set(row.roles)
            if (command.role in roles) == command.grant:
                return None
            roles = roles | {command.role} if command.grant else roles - {command.role}
            return storage.PrincipalRow(**{**row.__dict__, "roles": tuple(sorted(roles))})

        return await self._change(
            command.principal_id,
            apply,
            lambda row: identity_events_pb2.PrincipalRoleChanged(
                principal_id=row.principal_id,
                role=command.role,  # type: ignore[arg-type]
                granted=command.grant,
                changed_by=caller.principal_id,
            ),
            transaction,
        )

    # -- helpers -------------------------------------------------------------------------------

    async def _transaction(self, write: Callable[[AsyncConnection], Awaitable[Any]]) -> Any:
        async with self.db.transaction() as conn:
            result = await write(conn)
        self.notify()
        return result

    async def _change(
        self,
        principal_id: str,
        apply: Apply,
        event: Callable[[storage.PrincipalRow], pb_message.Message],
        transaction: Callable[[Change], Awaitable[Any]] | None,
    ) -> Any:
        """Load a principal, let `apply` check and change it, save, emit, in one transaction.

        `apply` returns None when nothing changes (then no version bump and no event)."""

        async def write(conn: AsyncConnection) -> storage.PrincipalRow:
            before = await storage.get_principal(conn, principal_id, for_update=True)
            if before is None:
                raise NotFound("no such principal")
            after = await apply(conn, before)
            if after is None:
                return before
            saved = await storage.save_changes(conn, before, after)
            await self._emit(conn, saved, event(saved))
            return saved

        return await (transaction or self._transaction)(write)

    async def _emit(self, conn: AsyncConnection, row: storage.PrincipalRow, payload: pb_message.Message) -> None:
        event = new_event(
            source=self.source,
            payload=payload,
            aggregate_id=row.principal_id,
            version=row.version,
            subject=row.principal_id,
        )
        await enqueue(conn, TOPICS["identity"], event, key=row.principal_id.encode())

    async def _create(
        self,
        conn: AsyncConnection,
        *,
        kind: int,
        organization_id: str,
        resource: domain.FhirResource | None,
        roles: tuple[int, ...] = (),
        principal_id: str | None = None,
        client_secret: str | None = None,
        with_secret: bool = True,
        registered_by: str = "",
    ) -> tuple[storage.PrincipalRow, str]:
        """Insert a principal with its key pair, encrypted resource, identifiers and secret (none
        `with_secret` False: a SMART client authenticates with its keys)."""
        principal_id = principal_id or domain.new_principal_id(kind)
        key_name = f"principal-{principal_id}"
        await self.keys.ensure_key(key_name, KeyType.ED25519)
        public = await self.keys.public_key(key_name)
        ciphertext = None
        if resource is not None:
            await storage.claim_identifiers(conn, principal_id, await self.resources.blind_indexes(resource))
            ciphertext = await self.resources.encrypt(principal_id, kind, resource, new=True)
        secret = (client_secret or domain.new_client_secret()) if with_secret else ""
        row = storage.PrincipalRow(
            principal_id=principal_id,
            kind=kind,
            status=ACTIVE,
            organization_id=organization_id,
            version=1,
            did=domain.did_key(public.current.raw()),
            roles=roles,
            created_at=time.time(),
            fhir_resource=ciphertext,
            registered_by=registered_by,
        )
        await storage.insert_principal(conn, row, secret_hash=await self.hasher.hash(secret) if secret else None)
        await self._emit(
            conn,
            row,
            identity_events_pb2.PrincipalRegistered(
                principal_id=row.principal_id,
                kind=row.kind,  # type: ignore[arg-type]
                organization_id=row.organization_id,
            ),
        )
        return row, secret
