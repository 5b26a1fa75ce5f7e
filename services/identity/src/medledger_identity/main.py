"""Wires identity: settings, storage, the gRPC API and its events."""

from __future__ import annotations

from medledger.identity.v1 import identity_service_pb2, identity_service_pb2_grpc

from medledger_common.service import ServiceParts, ServiceRuntime, run_service
from medledger_common.settings import load_settings_or_exit
from medledger_identity.api import IdentityApi
from medledger_identity.config import IdentitySettings
from medledger_identity.storage import MIGRATIONS

NAME = "identity"


def build(runtime: ServiceRuntime) -> ServiceParts:
    api = IdentityApi(runtime)
    return ServiceParts(
        service_descriptors=[identity_service_pb2.DESCRIPTOR.services_by_name["IdentityService"]],
        register=lambda server: identity_service_pb2_grpc.add_IdentityServiceServicer_to_server(api, server),
    )


def main() -> None:
    run_service(NAME, load_settings_or_exit(IdentitySettings), MIGRATIONS, build)


if __name__ == "__main__":
    main()
