"""The gRPC API of identity: medledger.identity.v1.IdentityService.

Authorization: the interceptor applies the coarse table (ACCESS, the README's table); the
finer rules (an org-admin within their organization, a principal about itself) are checked
here through the domain module.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf import message as pb_message
from medledger.events.v1 import identity_events_pb2
from medledger.identity.v1 import identity_service_pb2 as pb
from medledger.identity.v1 import identity_service_pb2_grpc as pb_grpc
from medledger.types.v1 import vocabulary_pb2
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_identity import domain, storage
from medledger_identity.credentials import SecretHasher
from medledger_identity.tokens import TokenSigner
from medledger_runtime.auth import ANY_CALLER, Access, Caller, current_caller
from medledger_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from medledger_runtime.events import TOPICS, new_event
from medledger_runtime.idempotency import run_idempotent
from medledger_runtime.key_owners import decrypt_owned
from medledger_runtime.keys import KeyManager, KeyType, patient_key_name
from medledger_runtime.outbox import enqueue
from medledger_runtime.service import ServiceRuntime
from medledger_runtime.timestamps import timestamp

Kind = vocabulary_pb2.PrincipalKind
ACTIVE = vocabulary_pb2.PrincipalStatus.PRINCIPAL_STATUS_ACTIVE
DEACTIVATED = vocabulary_pb2.PrincipalStatus.PRINCIPAL_STATUS_DEACTIVATED

# Key-manager keys identity keeps (see README): blind indexes, practitioners' resources, and
# client secrets of responses kept for retries. Patients' resources use each patient's own key.
BLIND_INDEX_KEY = "identity-blind-index"
# The blind index must not change when its key rotates: always this version.
BLIND_INDEX_VERSION = 1
RESOURCE_KEY = "identity-resources"
REPLAY_KEY = "identity-secret-replay"

_SERVICE = "/medledger.identity.v1.IdentityService/"
PUBLIC_METHODS = tuple(_SERVICE + m for m in ("RegisterPatient", "IssueToken", "GetJwks"))
_ADMINS = Access.of(roles=["admin"])
_ORG_ADMINS = Access.of(roles=["admin", "org-admin"])
# The coarse table; keep it equal to services/identity/README.md (a test compares them).
ACCESS: dict[str, Access] = {
    _SERVICE + "RegisterPrincipal": _ORG_ADMINS,
    _SERVICE + "GetPrincipal": ANY_CALLER,
    _SERVICE + "ListPrincipals": Access.of(roles=["admin", "org-admin", "auditor", "privacy-officer"]),
    _SERVICE + "UpdatePrincipalResource": ANY_CALLER,
    _SERVICE + "DeactivatePrincipal": ANY_CALLER,
    _SERVICE + "ListDeactivatedPrincipals": Access.of(roles=["admin"], kinds=["service"]),
    _SERVICE + "AssignRole": _ORG_ADMINS,
    _SERVICE + "RevokeRole": _ORG_ADMINS,
    _SERVICE + "RotateSigningKey": _ADMINS,
}
MAX_PAGE_SIZE = 1000

# Responses that carry a new client secret; kept for retries with the secret encrypted.
_WithSecret = TypeVar("_WithSecret", pb.RegisterPatientResponse, pb.RegisterPrincipalResponse)
# A well-formed hash of a random secret: unknown principals cost the same time as known ones.
_DUMMY_SECRET = domain.new_client_secret()


def to_proto(row: storage.PrincipalRow) -> pb.Principal:
    return pb.Principal(
        principal_id=row.principal_id,
        kind=row.kind,  # type: ignore[arg-type]
        status=row.status,  # type: ignore[arg-type]
        organization_id=row.organization_id,
        roles=list(row.roles),  # type: ignore[arg-type]
        did=row.did,
        created_at=timestamp(row.created_at),
        version=row.version,
    )


def resource_key(principal_id: str, kind: int) -> str:
    """A patient's resource is under the patient's own key: deleting it erases the resource."""
    return patient_key_name("identity", principal_id) if kind == Kind.PRINCIPAL_KIND_PATIENT else RESOURCE_KEY


class IdentityApi(pb_grpc.IdentityServiceServicer):
    def __init__(self, runtime: ServiceRuntime, keys: KeyManager, signer: TokenSigner, hasher: SecretHasher) -> None:
        self.rt = runtime
        self.keys = keys
        self.signer = signer
        self.hasher = hasher
        self._dummy_hash = ""

    async def start(self) -> None:
        await self.keys.ensure_key(BLIND_INDEX_KEY, KeyType.HMAC)
        await self.keys.ensure_key(RESOURCE_KEY, KeyType.AES256_GCM96)
        await self.keys.ensure_key(REPLAY_KEY, KeyType.AES256_GCM96)
        await self.signer.start()
        self._dummy_hash = await self.hasher.hash(_DUMMY_SECRET)

    # -- helpers -------------------------------------------------------------------------------

    async def _decrypt_resource(self, row: storage.PrincipalRow) -> bytes:
        assert row.fhir_resource
        principal = row.principal_id.encode()
        if row.kind != Kind.PRINCIPAL_KIND_PATIENT:
            return await self.keys.decrypt(RESOURCE_KEY, row.fhir_resource, associated_data=principal)
        # A patient's may still be under the old shared key until the key-owner migration moves it.
        return await decrypt_owned(
            self.keys, self.rt.legacy_keys, "identity", row.principal_id, row.fhir_resource, associated_data=principal
        )

    async def _blind_indexes(self, resource: domain.FhirResource) -> list[str]:
        return [
            await self.keys.hmac(
                BLIND_INDEX_KEY, domain.identifier_index_input(system, value), key_version=BLIND_INDEX_VERSION
            )
            for system, value in resource.identifiers
        ]

    async def _emit(self, conn: AsyncConnection, row: storage.PrincipalRow, payload: pb_message.Message) -> None:
        event = new_event(
            source=self.rt.source,
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
    ) -> tuple[storage.PrincipalRow, str]:
        """Insert a principal with its key pair, encrypted resource, identifiers and secret."""
        principal_id = principal_id or domain.new_principal_id(kind)
        key_name = f"principal-{principal_id}"
        await self.keys.ensure_key(key_name, KeyType.ED25519)
        public = await self.keys.public_key(key_name)
        ciphertext = None
        if resource is not None:
            await storage.claim_identifiers(conn, principal_id, await self._blind_indexes(resource))
            key = resource_key(principal_id, kind)
            await self.keys.ensure_key(key, KeyType.AES256_GCM96)
            ciphertext = await self.keys.encrypt(key, resource.json, associated_data=principal_id.encode())
        secret = client_secret or domain.new_client_secret()
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
        )
        await storage.insert_principal(conn, row, secret_hash=await self.hasher.hash(secret))
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

    async def _seal_secret(self, response: _WithSecret) -> _WithSecret:
        sealed = type(response)()
        sealed.CopyFrom(response)
        sealed.client_secret = await self.keys.encrypt(REPLAY_KEY, response.client_secret.encode())
        return sealed

    async def _unseal_secret(self, response: _WithSecret) -> _WithSecret:
        response.client_secret = (await self.keys.decrypt(REPLAY_KEY, response.client_secret)).decode()
        return response

    async def _register(
        self,
        scope: str,
        request: pb.RegisterPatientRequest | pb.RegisterPrincipalRequest,
        response_cls: type[_WithSecret],
        work: Callable[[AsyncConnection], Awaitable[_WithSecret]],
    ) -> _WithSecret:
        """A registration, once per request id; its new client secret is kept encrypted so that
        a retrying client still receives it."""
        return await run_idempotent(
            self.rt.db,
            scope=scope,
            request_id=request.request_id,
            request=request,
            response_cls=response_cls,
            work=work,
            after_commit=self.rt.relay.notify,
            seal=self._seal_secret,
            unseal=self._unseal_secret,
        )

    async def _change(
        self,
        *,
        scope: str,
        request: pb_message.Message,
        request_id: str,
        principal_id: str,
        apply: Callable[[AsyncConnection, Caller, storage.PrincipalRow], Awaitable[storage.PrincipalRow | None]],
        event: Callable[[storage.PrincipalRow], pb_message.Message],
        response_cls: type[pb_message.Message],
    ) -> pb_message.Message:
        """Load a principal, let `apply` check and change it, save, emit; idempotent by request id.

        `apply` returns None when nothing changes (then no version bump and no event)."""
        caller = current_caller()

        async def work(conn: AsyncConnection) -> pb_message.Message:
            before = await storage.get_principal(conn, principal_id, for_update=True)
            if before is None:
                raise NotFound("no such principal")
            after = await apply(conn, caller, before)
            if after is None:
                return response_cls(principal=to_proto(before))
            saved = await storage.save_changes(conn, before, after)
            await self._emit(conn, saved, event(saved))
            return response_cls(principal=to_proto(saved))

        return await run_idempotent(
            self.rt.db,
            scope=scope,
            request_id=request_id,
            request=request,
            response_cls=response_cls,
            work=work,
            after_commit=self.rt.relay.notify,
        )

    # -- registration --------------------------------------------------------------------------

    async def RegisterPatient(
        self, request: pb.RegisterPatientRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterPatientResponse:
        resource = domain.validate_fhir(Kind.PRINCIPAL_KIND_PATIENT, request.fhir_patient, "fhir_patient")

        async def work(conn: AsyncConnection) -> pb.RegisterPatientResponse:
            row, secret = await self._create(
                conn, kind=Kind.PRINCIPAL_KIND_PATIENT, organization_id="", resource=resource
            )
            return pb.RegisterPatientResponse(principal=to_proto(row), client_secret=secret)

        return await self._register("identity.RegisterPatient", request, pb.RegisterPatientResponse, work)

    async def RegisterPrincipal(
        self, request: pb.RegisterPrincipalRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterPrincipalResponse:
        domain.check_kind(request.kind)
        domain.check_organization(request.kind, request.organization_id)
        domain.check_may_register(current_caller(), request.kind, request.organization_id)
        resource = domain.validate_fhir(request.kind, request.fhir_resource, "fhir_resource")

        async def work(conn: AsyncConnection) -> pb.RegisterPrincipalResponse:
            if request.organization_id:
                org = await storage.get_principal(conn, request.organization_id)
                if org is None or org.kind != Kind.PRINCIPAL_KIND_ORGANIZATION:
                    raise InvalidArgument.field("organization_id", "not a registered organization")
                if org.status != ACTIVE:
                    raise FailedPrecondition("the organization is deactivated")
            row, secret = await self._create(
                conn, kind=request.kind, organization_id=request.organization_id, resource=resource
            )
            return pb.RegisterPrincipalResponse(principal=to_proto(row), client_secret=secret)

        return await self._register("identity.RegisterPrincipal", request, pb.RegisterPrincipalResponse, work)

    async def ensure_platform_principal(
        self, principal_id: str, secret: str, roles: tuple[int, ...], kind: int = Kind.PRINCIPAL_KIND_SERVICE
    ) -> None:
        """Create a service or the bootstrap admin at start, or update its secret to the file's."""
        async with self.rt.db.transaction() as conn:
            stored = await storage.get_secret_hash(conn, principal_id)
            if stored is None:
                await self._create(
                    conn, kind=kind, organization_id="", resource=None, roles=roles,
                    principal_id=principal_id, client_secret=secret,
                )  # fmt: skip
            elif not await self.hasher.verify(stored, secret):
                await storage.set_secret_hash(conn, principal_id, await self.hasher.hash(secret))
        self.rt.relay.notify()

    # -- reading -------------------------------------------------------------------------------

    async def GetPrincipal(
        self, request: pb.GetPrincipalRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPrincipalResponse:
        caller = current_caller()
        async with self.rt.db.connect() as conn:
            row = await storage.get_principal(conn, request.principal_id)
        if row is None:
            raise NotFound("no such principal")
        response = pb.GetPrincipalResponse(principal=to_proto(row))
        if request.include_fhir_resource:
            if not domain.may_read_resource(caller, row.principal_id, row.organization_id):
                raise PermissionDenied("only the principal, admins and its org-admins may read its resource")
            if row.fhir_resource:
                # NotFound: the patient's key was deleted (their records were erased) and the
                # ciphertext is about to go too: there is no resource any more.
                with contextlib.suppress(NotFound):
                    response.fhir_resource = await self._decrypt_resource(row)
        return response

    async def ListPrincipals(
        self, request: pb.ListPrincipalsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPrincipalsResponse:
        caller = current_caller()
        organization_id = request.organization_id
        if not (domain.is_admin(caller) or caller.has_role("auditor") or caller.has_role("privacy-officer")):
            # An org-admin lists their own organization only.
            if organization_id and organization_id != caller.organization_id:
                raise PermissionDenied("org-admins list their own organization only")
            organization_id = caller.organization_id
        if request.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        size = min(request.page_size or 100, MAX_PAGE_SIZE)
        if request.kind and request.kind not in domain._ID_PREFIX:
            raise InvalidArgument.field("kind", "unknown principal kind")
        async with self.rt.db.connect() as conn:
            rows = await storage.list_principals(
                conn, kind=request.kind, organization_id=organization_id, after=request.page_token, limit=size + 1
            )
        more = len(rows) > size
        rows = rows[:size]
        return pb.ListPrincipalsResponse(
            principals=[to_proto(r) for r in rows], next_page_token=rows[-1].principal_id if more else ""
        )

    async def ListDeactivatedPrincipals(
        self, request: pb.ListDeactivatedPrincipalsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDeactivatedPrincipalsResponse:
        return pb.ListDeactivatedPrincipalsResponse(principal_ids=await self.deactivated_ids())

    async def deactivated_ids(self) -> list[str]:
        async with self.rt.db.connect() as conn:
            return await storage.deactivated_ids(conn, DEACTIVATED)

    # -- changes -------------------------------------------------------------------------------

    async def UpdatePrincipalResource(
        self, request: pb.UpdatePrincipalResourceRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdatePrincipalResourceResponse:
        async def apply(conn: AsyncConnection, caller: Caller, row: storage.PrincipalRow) -> storage.PrincipalRow:
            domain.check_may_manage(caller, row.principal_id, row.organization_id)
            resource = domain.validate_fhir(row.kind, request.fhir_resource, "fhir_resource")
            if resource is None:
                raise FailedPrecondition("this principal's kind carries no FHIR resource")
            await storage.replace_identifiers(conn, row.principal_id, await self._blind_indexes(resource))
            key = resource_key(row.principal_id, row.kind)
            ciphertext = await self.keys.encrypt(key, resource.json, associated_data=row.principal_id.encode())
            await storage.off_old_keys(conn, row.principal_id)  # under identity's own key now
            return storage.PrincipalRow(**{**row.__dict__, "fhir_resource": ciphertext})

        return await self._change(  # type: ignore[return-value]
            scope="identity.UpdatePrincipalResource",
            request=request,
            request_id=request.request_id,
            principal_id=request.principal_id,
            apply=apply,
            event=lambda row: identity_events_pb2.PrincipalUpdated(principal_id=row.principal_id),
            response_cls=pb.UpdatePrincipalResourceResponse,
        )

    async def DeactivatePrincipal(
        self, request: pb.DeactivatePrincipalRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeactivatePrincipalResponse:
        async def apply(
            conn: AsyncConnection, caller: Caller, row: storage.PrincipalRow
        ) -> storage.PrincipalRow | None:
            domain.check_may_manage(caller, row.principal_id, row.organization_id)
            if row.status == DEACTIVATED:
                return None
            return storage.PrincipalRow(**{**row.__dict__, "status": DEACTIVATED})

        response = await self._change(
            scope="identity.DeactivatePrincipal",
            request=request,
            request_id=request.request_id,
            principal_id=request.principal_id,
            apply=apply,
            event=lambda row: identity_events_pb2.PrincipalDeactivated(principal_id=row.principal_id),
            response_cls=pb.DeactivatePrincipalResponse,
        )
        # This replica refuses the principal at once; the others when the event reaches them.
        self.rt.deactivated.add(request.principal_id)
        return response  # type: ignore[return-value]

    async def _role_change(
        self, request: pb.AssignRoleRequest | pb.RevokeRoleRequest, grant: bool
    ) -> pb_message.Message:
        async def apply(
            conn: AsyncConnection, caller: Caller, row: storage.PrincipalRow
        ) -> storage.PrincipalRow | None:
            domain.check_may_change_role(caller, request.role, row.organization_id)
            if row.status != ACTIVE:
                raise FailedPrecondition("the principal is deactivated")
            roles = set(row.roles)
            if (request.role in roles) == grant:
                return None
            roles = roles | {request.role} if grant else roles - {request.role}
            return storage.PrincipalRow(**{**row.__dict__, "roles": tuple(sorted(roles))})

        caller_id = current_caller().principal_id
        return await self._change(
            scope="identity.AssignRole" if grant else "identity.RevokeRole",
            request=request,
            request_id=request.request_id,
            principal_id=request.principal_id,
            apply=apply,
            event=lambda row: identity_events_pb2.PrincipalRoleChanged(
                principal_id=row.principal_id, role=request.role, granted=grant, changed_by=caller_id
            ),
            response_cls=pb.AssignRoleResponse if grant else pb.RevokeRoleResponse,
        )

    async def AssignRole(
        self, request: pb.AssignRoleRequest, context: grpc.aio.ServicerContext
    ) -> pb.AssignRoleResponse:
        return await self._role_change(request, grant=True)  # type: ignore[return-value]

    async def RevokeRole(
        self, request: pb.RevokeRoleRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeRoleResponse:
        return await self._role_change(request, grant=False)  # type: ignore[return-value]

    # -- tokens --------------------------------------------------------------------------------

    async def IssueToken(
        self, request: pb.IssueTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.IssueTokenResponse:
        domain.check_audience(request.audience)
        if not request.principal_id or not request.client_secret or len(request.client_secret) > 256:
            raise Unauthenticated("invalid credentials")
        async with self.rt.db.connect() as conn:
            row = await storage.get_principal(conn, request.principal_id)
            stored = await storage.get_secret_hash(conn, request.principal_id) if row else None
        # The same work, and the same answer, for an unknown principal and a wrong secret.
        ok = await self.hasher.verify(stored or self._dummy_hash, request.client_secret)
        if row is None or stored is None or not ok:
            raise Unauthenticated("invalid credentials")
        if row.status != ACTIVE:
            raise Unauthenticated("the principal is deactivated")
        if self.hasher.needs_rehash(stored):
            async with self.rt.db.transaction() as conn:
                await storage.set_secret_hash(conn, row.principal_id, await self.hasher.hash(request.client_secret))
        claims = domain.token_claims(
            principal_id=row.principal_id,
            kind=row.kind,
            roles=row.roles,
            organization_id=row.organization_id,
            audience=request.audience,
            now=int(time.time()),
        )
        token = await self.signer.sign(claims)
        return pb.IssueTokenResponse(access_token=token, expires_at=timestamp(claims["exp"]), token_type="Bearer")  # noqa: S106

    async def GetJwks(self, request: pb.GetJwksRequest, context: grpc.aio.ServicerContext) -> pb.GetJwksResponse:
        return pb.GetJwksResponse(jwks_json=await self.signer.jwks_json())

    async def RotateSigningKey(
        self, request: pb.RotateSigningKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RotateSigningKeyResponse:
        async def work(conn: AsyncConnection) -> pb.RotateSigningKeyResponse:
            kid = await self.signer.rotate()
            event = new_event(
                source=self.rt.source,
                payload=identity_events_pb2.SigningKeyRotated(kid=kid),
                aggregate_id=self.signer.key_name,
                version=int(kid.rsplit(".v", 1)[1]),
            )
            await enqueue(conn, TOPICS["identity"], event, key=self.signer.key_name.encode())
            return pb.RotateSigningKeyResponse(kid=kid)

        response = await run_idempotent(
            self.rt.db,
            scope="identity.RotateSigningKey",
            request_id=request.request_id,
            request=request,
            response_cls=pb.RotateSigningKeyResponse,
            work=work,
            after_commit=self.rt.relay.notify,
        )
        # This replica verifies the new key's tokens at once; the others on the event.
        await self.rt.token_keys_changed()
        return response
