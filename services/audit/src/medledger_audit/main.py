"""Wires audit: settings, storage and the gRPC API."""

from __future__ import annotations

from medledger.audit.v1 import audit_service_pb2, audit_service_pb2_grpc

from medledger_audit.api import ACCESS, PUBLIC_METHODS, AuditApi
from medledger_audit.config import AuditSettings
from medledger_audit.storage import MIGRATIONS
from medledger_common.service import ServiceParts, ServiceRuntime, run_service
from medledger_common.settings import load_settings_or_exit

NAME = "audit"


def build(runtime: ServiceRuntime) -> ServiceParts:
    # RPCs not built yet answer UNIMPLEMENTED (the generated base servicer) until their issue lands.
    api = AuditApi(runtime)  # type: ignore[abstract]
    return ServiceParts(
        service_descriptors=[audit_service_pb2.DESCRIPTOR.services_by_name["AuditService"]],
        register=lambda server: audit_service_pb2_grpc.add_AuditServiceServicer_to_server(api, server),
        access=ACCESS,
        public_methods=PUBLIC_METHODS,
    )


def main() -> None:
    run_service(NAME, load_settings_or_exit(AuditSettings), MIGRATIONS, build)


if __name__ == "__main__":
    main()
