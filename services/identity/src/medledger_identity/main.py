"""Wires identity: settings, key manager, storage, the use cases (principals.Directory,
tokens.TokenDesk), the gRPC API, the JWKS over HTTP, and the platform principals (services and
the bootstrap admin) provisioned from secret files."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from medledger.consent.v1.consent_service_pb2_grpc import ConsentServiceStub
from medledger.identity.v1 import identity_service_pb2, identity_service_pb2_grpc
from medledger.types.v1 import vocabulary_pb2

from medledger_identity.api import ACCESS, PUBLIC_METHODS, SCOPES, IdentityApi
from medledger_identity.config import IdentitySettings
from medledger_identity.consent_client import OwnTokenInterceptor
from medledger_identity.credentials import SecretHasher
from medledger_identity.handlers import ERASURE_CONSUMER, PatientErasureHandler
from medledger_identity.key_owners import resource_migration
from medledger_identity.oauth import PATH as TOKEN_PATH
from medledger_identity.oauth import ClientCredentials, token_route
from medledger_identity.principals import Directory
from medledger_identity.storage import MIGRATIONS
from medledger_identity.tokens import OwnTokens, TokenDesk, TokenSigner
from medledger_runtime.consent_checks import CONSENT_AUDIENCE, ConsentClient
from medledger_runtime.events import SERVICES, STATELESS_COMPONENTS, TOPICS
from medledger_runtime.grpc_client import service_channel
from medledger_runtime.http_server import HttpRoute
from medledger_runtime.parts import AuthSources, ConsumerSpec, ServiceParts
from medledger_runtime.service import ServiceRuntime, run_service
from medledger_runtime.settings import ConfigError, load_settings_or_exit, read_secret_file
from medledger_runtime.vocabulary import service_principal_id

NAME = "identity"
BOOTSTRAP_ADMIN = "svc_admin"
Role = vocabulary_pb2.Role
# Roles the platform's own services hold: records asks consent for decisions, and so does
# identity before a patient's FHIR resource goes to another reader.
SERVICE_ROLES: dict[str, tuple[int, ...]] = {
    "records": (Role.ROLE_PDP_CLIENT,),
    NAME: (Role.ROLE_PDP_CLIENT,),
}


def jwks_route(signer: TokenSigner) -> HttpRoute:
    """GET /.well-known/jwks.json (public): the token-verification keys for HTTP clients."""

    async def jwks(request: web.Request) -> web.Response:
        return web.Response(
            text=await signer.jwks_json(),
            content_type="application/jwk-set+json",
            headers={"Cache-Control": "public, max-age=60"},
        )

    return HttpRoute.get("/.well-known/jwks.json", jwks, public=True)


@dataclass(frozen=True)
class IdentityParts:
    """identity's own objects, reachable from tests and benchmarks as ``runtime.handle``."""

    api: IdentityApi
    principals: Directory
    tokens: TokenDesk


def build(runtime: ServiceRuntime[IdentityParts]) -> ServiceParts[IdentityParts]:
    settings = runtime.settings
    assert isinstance(settings, IdentitySettings)
    keys = runtime.require_keys()
    signer = TokenSigner(keys)
    hasher = SecretHasher(settings.max_concurrent_hashing)
    tokens = TokenDesk(
        runtime.db, signer, hasher, runtime.relay.notify, source=runtime.source, keys_changed=runtime.token_keys_changed
    )
    # identity asks consent as its own principal, with tokens it signs itself.
    own_tokens = OwnTokens(runtime.db, tokens, service_principal_id(NAME))
    consent_channel = service_channel(
        settings,
        settings.consent_address,
        interceptors=[OwnTokenInterceptor(own_tokens.token, own_tokens.forget, CONSENT_AUDIENCE)],
    )
    principals = Directory(
        runtime.db,
        keys,
        hasher,
        runtime.relay.notify,
        source=runtime.source,
        legacy_keys=runtime.legacy_keys,
        deactivated=runtime.deactivated.add,
        consent=ConsentClient(ConsentServiceStub(consent_channel)),
    )
    api = IdentityApi(runtime, principals, tokens)
    client_credentials = ClientCredentials(
        runtime.db,
        tokens,
        lambda: settings.token_endpoint_url or f"http://127.0.0.1:{runtime.http_port}{TOKEN_PATH}",
    )

    async def provision() -> None:
        if settings.bootstrap_admin_secret_file is not None:
            secret = read_secret_file(settings.bootstrap_admin_secret_file).decode()
            await principals.ensure_platform_principal(BOOTSTRAP_ADMIN, secret, (Role.ROLE_ADMIN,))
        if settings.service_secrets_dir is not None:
            for path in sorted(settings.service_secrets_dir.glob("*.secret")):
                service = path.stem
                if service not in SERVICES and service not in STATELESS_COMPONENTS:
                    raise ConfigError(f"{path}: {service} is not a medledger service")
                secret = read_secret_file(path).decode()
                await principals.ensure_platform_principal(
                    service_principal_id(service), secret, SERVICE_ROLES.get(service, ())
                )
        # identity's own principal, whose tokens it signs itself: needs no secret file.
        await principals.ensure_own_principal(service_principal_id(NAME), SERVICE_ROLES[NAME])

    return ServiceParts(
        service_descriptors=[identity_service_pb2.DESCRIPTOR.services_by_name["IdentityService"]],
        register=lambda server: identity_service_pb2_grpc.add_IdentityServiceServicer_to_server(api, server),
        access=ACCESS,
        handle=IdentityParts(api=api, principals=principals, tokens=tokens),
        public_methods=PUBLIC_METHODS,
        scopes=SCOPES,
        auth=AuthSources(fetch_jwks=signer.jwks, load_deactivated=principals.deactivated_ids),
        consumers=[
            ConsumerSpec(
                group_id=ERASURE_CONSUMER,
                handler=PatientErasureHandler(runtime.db, runtime.key_shredder(), runtime.relay.notify),
                topics=[TOPICS["records"]],
            )
        ],
        http_routes=[jwks_route(signer), token_route(client_credentials)],
        on_start=[principals.start, tokens.start, provision],
        background=[resource_migration(runtime.db, keys, runtime.legacy_keys).keep_running],
        on_stop=[consent_channel.close],
    )


def main() -> None:
    run_service(NAME, load_settings_or_exit(IdentitySettings), MIGRATIONS, build)


if __name__ == "__main__":
    main()
