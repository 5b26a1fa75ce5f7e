"""The gRPC API of identity: medledger.identity.v1.IdentityService.

Authorization: the interceptor applies the coarse table (ACCESS, the README's table); the finer
rules (an org-admin within their organization, a principal about itself) are the use cases'
(``principals.py``, ``tokens.py``, through ``domain.py``). Each RPC parses its request into a
command, calls the use case with the caller and maps the result to its response. Idempotency
stays here: a mutating use case's write runs in the transaction ``run_idempotent`` opens,
because what it fingerprints and replays is the wire's request and response.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf import message as pb_message
from medledger.identity.v1 import identity_service_pb2 as pb
from medledger.identity.v1 import identity_service_pb2_grpc as pb_grpc
from medledger.types.v1.vocabulary_pb2 import PrincipalKind
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_identity import storage
from medledger_identity.principal_commands import (
    ChangeRole,
    DeactivatePrincipal,
    FindPrincipals,
    GetPrincipal,
    ListPrincipals,
    Registered,
    RegisterPatient,
    RegisterPrincipal,
    RegisterSmartClient,
    UpdatePrincipalResource,
)
from medledger_identity.principals import Directory
from medledger_identity.tokens import IssueToken, TokenDesk
from medledger_runtime.auth import ANY_CALLER, Access, Caller, ScopeNeed, current_caller
from medledger_runtime.idempotency import once_per_request
from medledger_runtime.service import ServiceRuntime
from medledger_runtime.timestamps import timestamp

_SERVICE = "/medledger.identity.v1.IdentityService/"
PUBLIC_METHODS = tuple(_SERVICE + m for m in ("RegisterPatient", "IssueToken", "GetJwks"))
_ADMINS = Access.of(roles=["admin"])
_ORG_ADMINS = Access.of(roles=["admin", "org-admin"])
# The coarse table; keep it equal to services/identity/README.md (a test compares them).
ACCESS: dict[str, Access] = {
    _SERVICE + "RegisterPrincipal": Access.of(roles=["admin", "org-admin"], kinds=["smart-client"]),
    _SERVICE + "GetPrincipal": ANY_CALLER,
    _SERVICE + "FindPrincipals": Access.of(roles=["admin", "org-admin"], kinds=["practitioner", "smart-client"]),
    _SERVICE + "ListPrincipals": Access.of(roles=["admin", "org-admin", "auditor", "privacy-officer"]),
    _SERVICE + "UpdatePrincipalResource": ANY_CALLER,
    _SERVICE + "DeactivatePrincipal": ANY_CALLER,
    _SERVICE + "ListDeactivatedPrincipals": Access.of(roles=["admin"], kinds=["service"]),
    _SERVICE + "AssignRole": _ORG_ADMINS,
    _SERVICE + "RevokeRole": _ORG_ADMINS,
    _SERVICE + "RegisterSmartClient": _ORG_ADMINS,
    _SERVICE + "RotateSigningKey": _ADMINS,
}

# Responses that carry a new client secret; kept for retries with the secret encrypted.
_WithSecret = TypeVar("_WithSecret", pb.RegisterPatientResponse, pb.RegisterPrincipalResponse)
# Responses that carry the principal as changed.
_WithPrincipal = TypeVar(
    "_WithPrincipal",
    pb.UpdatePrincipalResourceResponse,
    pb.DeactivatePrincipalResponse,
    pb.AssignRoleResponse,
    pb.RevokeRoleResponse,
    pb.RegisterSmartClientResponse,
)
R = TypeVar("R", bound=pb_message.Message)
T = TypeVar("T")

# The FHIR resource type a principal is, for SMART scopes: by its kind, or by its id's prefix
# (domain's pseudonymous prefixes). Researchers and services are no FHIR resource here: only a
# `*` scope reaches them.
_FHIR_TYPE_OF_KIND: dict[int, str] = {
    PrincipalKind.PRINCIPAL_KIND_PATIENT: "Patient",
    PrincipalKind.PRINCIPAL_KIND_PRACTITIONER: "Practitioner",
    PrincipalKind.PRINCIPAL_KIND_ORGANIZATION: "Organization",
}
_FHIR_TYPE_OF_PREFIX = {"pat": "Patient", "prn": "Practitioner", "org": "Organization"}


def _principal_scope(interaction: str) -> Callable[[Caller, object], None]:
    """A scoped caller's check for an RPC about one principal (`principal_id`): `interaction` on
    its FHIR type, a patient's within its own compartment."""

    def check(caller: Caller, request: object) -> None:
        principal_id = str(getattr(request, "principal_id", ""))
        resource_type = _FHIR_TYPE_OF_PREFIX.get(principal_id.partition("_")[0], "*")
        caller.require_scope(resource_type, interaction, principal_id if resource_type == "Patient" else None)

    return check


def _kind_scope(interaction: str) -> Callable[[Caller, object], None]:
    """A scoped caller's check for an RPC about principals of one `kind`."""

    def check(caller: Caller, request: object) -> None:
        caller.require_scope(_FHIR_TYPE_OF_KIND.get(int(getattr(request, "kind", 0)), "*"), interaction)

    return check


# What a token with SMART scopes needs (medledger_runtime.auth.scopes); any RPC not here refuses
# such a token: roles, deactivation, listings and keys are administration, not FHIR. IssueToken,
# GetJwks and RegisterPatient are public. Keep it equal to the README's scopes table.
SCOPES: dict[str, ScopeNeed] = {
    _SERVICE + "GetPrincipal": ScopeNeed.by(_principal_scope("r")),
    _SERVICE + "UpdatePrincipalResource": ScopeNeed.by(_principal_scope("u")),
    _SERVICE + "FindPrincipals": ScopeNeed.by(_kind_scope("s")),
    # An integration engine registering the practitioners and organizations of its bundles.
    _SERVICE + "RegisterPrincipal": ScopeNeed.by(_kind_scope("c")),
}


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


class IdentityApi(pb_grpc.IdentityServiceServicer):
    def __init__(self, runtime: ServiceRuntime, principals: Directory, tokens: TokenDesk) -> None:
        self.rt = runtime
        self.principals = principals
        self.tokens = tokens

    # -- idempotency ---------------------------------------------------------------------------

    def _once(
        self,
        scope: str,
        request: pb_message.Message,
        request_id: str,
        response_cls: type[R],
        respond: Callable[[T], R],
        *,
        seal: Callable[[R], Awaitable[R]] | None = None,
        unseal: Callable[[R], Awaitable[R]] | None = None,
    ) -> Callable[[Callable[[AsyncConnection], Awaitable[T]]], Awaitable[R]]:
        """The transaction a use case's write runs in: once per request id (see
        ``idempotency.once_per_request``)."""
        return once_per_request(
            self.rt.db,
            scope=scope,
            request=request,
            request_id=request_id,
            response_cls=response_cls,
            respond=respond,
            after_commit=self.rt.relay.notify,
            seal=seal,
            unseal=unseal,
        )

    def _registration(
        self,
        scope: str,
        request: pb.RegisterPatientRequest | pb.RegisterPrincipalRequest,
        response_cls: type[_WithSecret],
    ) -> Callable[[Callable[[AsyncConnection], Awaitable[Registered]]], Awaitable[_WithSecret]]:
        """A registration, once per request id; its new client secret is kept encrypted so that
        a retrying client still receives it."""

        # A principal a SMART client registers has no secret: nothing to seal.
        async def seal(response: _WithSecret) -> _WithSecret:
            sealed = type(response)()
            sealed.CopyFrom(response)
            if response.client_secret:
                sealed.client_secret = await self.principals.seal_secret(response.client_secret)
            return sealed

        async def unseal(response: _WithSecret) -> _WithSecret:
            if response.client_secret:
                response.client_secret = await self.principals.unseal_secret(response.client_secret)
            return response

        def respond(registered: Registered) -> _WithSecret:
            return response_cls(principal=to_proto(registered.principal), client_secret=registered.client_secret)

        return self._once(scope, request, request.request_id, response_cls, respond, seal=seal, unseal=unseal)

    def _changed(
        self, scope: str, request: pb_message.Message, request_id: str, response_cls: type[_WithPrincipal]
    ) -> Callable[[Callable[[AsyncConnection], Awaitable[storage.PrincipalRow]]], Awaitable[_WithPrincipal]]:
        return self._once(scope, request, request_id, response_cls, lambda row: response_cls(principal=to_proto(row)))

    # -- registration --------------------------------------------------------------------------

    async def RegisterPatient(
        self, request: pb.RegisterPatientRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterPatientResponse:
        once = self._registration("identity.RegisterPatient", request, pb.RegisterPatientResponse)
        response: pb.RegisterPatientResponse = await self.principals.register_patient(
            RegisterPatient(fhir_patient=request.fhir_patient), once
        )
        return response

    async def RegisterPrincipal(
        self, request: pb.RegisterPrincipalRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterPrincipalResponse:
        command = RegisterPrincipal(
            kind=request.kind, organization_id=request.organization_id, fhir_resource=request.fhir_resource
        )
        once = self._registration("identity.RegisterPrincipal", request, pb.RegisterPrincipalResponse)
        response: pb.RegisterPrincipalResponse = await self.principals.register_principal(
            current_caller(), command, once
        )
        return response

    # -- reading -------------------------------------------------------------------------------

    async def GetPrincipal(
        self, request: pb.GetPrincipalRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPrincipalResponse:
        command = GetPrincipal(
            principal_id=request.principal_id,
            include_fhir_resource=request.include_fhir_resource,
            purpose=request.purpose,
        )
        found = await self.principals.get(current_caller(), command)
        return pb.GetPrincipalResponse(principal=to_proto(found.principal), fhir_resource=found.fhir_resource)

    async def FindPrincipals(
        self, request: pb.FindPrincipalsRequest, context: grpc.aio.ServicerContext
    ) -> pb.FindPrincipalsResponse:
        found = await self.principals.find(
            current_caller(), FindPrincipals(kind=request.kind, identifier=request.identifier)
        )
        return pb.FindPrincipalsResponse(principals=[to_proto(r) for r in found])

    async def ListPrincipals(
        self, request: pb.ListPrincipalsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPrincipalsResponse:
        command = ListPrincipals(
            kind=request.kind,
            organization_id=request.organization_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        page = await self.principals.list(current_caller(), command)
        return pb.ListPrincipalsResponse(
            principals=[to_proto(r) for r in page.principals], next_page_token=page.next_page_token
        )

    async def ListDeactivatedPrincipals(
        self, request: pb.ListDeactivatedPrincipalsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDeactivatedPrincipalsResponse:
        return pb.ListDeactivatedPrincipalsResponse(principal_ids=await self.principals.deactivated_ids())

    # -- changes -------------------------------------------------------------------------------

    async def UpdatePrincipalResource(
        self, request: pb.UpdatePrincipalResourceRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdatePrincipalResourceResponse:
        command = UpdatePrincipalResource(principal_id=request.principal_id, fhir_resource=request.fhir_resource)
        once = self._changed(
            "identity.UpdatePrincipalResource", request, request.request_id, pb.UpdatePrincipalResourceResponse
        )
        response: pb.UpdatePrincipalResourceResponse = await self.principals.update_resource(
            current_caller(), command, once
        )
        return response

    async def DeactivatePrincipal(
        self, request: pb.DeactivatePrincipalRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeactivatePrincipalResponse:
        command = DeactivatePrincipal(principal_id=request.principal_id)
        once = self._changed(
            "identity.DeactivatePrincipal", request, request.request_id, pb.DeactivatePrincipalResponse
        )
        response: pb.DeactivatePrincipalResponse = await self.principals.deactivate(current_caller(), command, once)
        return response

    async def AssignRole(
        self, request: pb.AssignRoleRequest, context: grpc.aio.ServicerContext
    ) -> pb.AssignRoleResponse:
        command = ChangeRole(principal_id=request.principal_id, role=request.role, grant=True)
        once = self._changed("identity.AssignRole", request, request.request_id, pb.AssignRoleResponse)
        response: pb.AssignRoleResponse = await self.principals.change_role(current_caller(), command, once)
        return response

    async def RevokeRole(
        self, request: pb.RevokeRoleRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeRoleResponse:
        command = ChangeRole(principal_id=request.principal_id, role=request.role, grant=False)
        once = self._changed("identity.RevokeRole", request, request.request_id, pb.RevokeRoleResponse)
        response: pb.RevokeRoleResponse = await self.principals.change_role(current_caller(), command, once)
        return response

    # -- tokens --------------------------------------------------------------------------------

    async def IssueToken(
        self, request: pb.IssueTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.IssueTokenResponse:
        command = IssueToken(
            principal_id=request.principal_id,
            client_secret=request.client_secret,
            audience=request.audience,
            scope=request.scope,
        )
        issued = await self.tokens.issue(command)
        return pb.IssueTokenResponse(
            access_token=issued.access_token,
            expires_at=timestamp(issued.expires_at),
            token_type="Bearer",  # noqa: S106
            scope=issued.scope,
            patient=issued.patient,
        )

    async def RegisterSmartClient(
        self, request: pb.RegisterSmartClientRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterSmartClientResponse:
        command = RegisterSmartClient(
            organization_id=request.organization_id,
            jwks_json=request.jwks_json,
            allowed_scopes=tuple(request.allowed_scopes),
        )
        once = self._changed(
            "identity.RegisterSmartClient", request, request.request_id, pb.RegisterSmartClientResponse
        )
        response: pb.RegisterSmartClientResponse = await self.principals.register_smart_client(
            current_caller(), command, once
        )
        return response

    async def GetJwks(self, request: pb.GetJwksRequest, context: grpc.aio.ServicerContext) -> pb.GetJwksResponse:
        return pb.GetJwksResponse(jwks_json=await self.tokens.jwks_json())

    async def RotateSigningKey(
        self, request: pb.RotateSigningKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RotateSigningKeyResponse:
        def respond(kid: str) -> pb.RotateSigningKeyResponse:
            return pb.RotateSigningKeyResponse(kid=kid)

        once = self._once(
            "identity.RotateSigningKey", request, request.request_id, pb.RotateSigningKeyResponse, respond
        )
        response: pb.RotateSigningKeyResponse = await self.tokens.rotate(once)
        return response
