"""Wires anchoring: settings, storage and the gRPC API."""

from __future__ import annotations

from medledger.anchoring.v1 import anchoring_service_pb2, anchoring_service_pb2_grpc

from medledger_anchoring.api import ACCESS, PUBLIC_METHODS, AnchoringApi
from medledger_anchoring.config import AnchoringSettings
from medledger_anchoring.storage import MIGRATIONS
from medledger_common.service import ServiceParts, ServiceRuntime, run_service
from medledger_common.settings import load_settings_or_exit

NAME = "anchoring"


def build(runtime: ServiceRuntime) -> ServiceParts:
    # RPCs not built yet answer UNIMPLEMENTED (the generated base servicer) until their issue lands.
    api = AnchoringApi(runtime)  # type: ignore[abstract]
    return ServiceParts(
        service_descriptors=[anchoring_service_pb2.DESCRIPTOR.services_by_name["AnchoringService"]],
        register=lambda server: anchoring_service_pb2_grpc.add_AnchoringServiceServicer_to_server(api, server),
        access=ACCESS,
        public_methods=PUBLIC_METHODS,
    )


def main() -> None:
    run_service(NAME, load_settings_or_exit(AnchoringSettings), MIGRATIONS, build)


if __name__ == "__main__":
    main()
