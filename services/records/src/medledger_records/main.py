"""Wires records: settings, storage and the gRPC API."""

from __future__ import annotations

from medledger.consent.v1.consent_service_pb2_grpc import ConsentServiceStub
from medledger.records.v1 import records_service_pb2, records_service_pb2_grpc

from medledger_common.grpc_client import make_channel
from medledger_common.identity_link import BearerTokenInterceptor
from medledger_common.service import ServiceParts, ServiceRuntime, run_service
from medledger_common.settings import load_settings_or_exit
from medledger_records.api import ACCESS, PUBLIC_METHODS, RecordsApi
from medledger_records.config import RecordsSettings
from medledger_records.storage import MIGRATIONS

NAME = "records"


def build(runtime: ServiceRuntime) -> ServiceParts:
    settings: RecordsSettings = runtime.settings  # type: ignore[assignment]
    consent_channel = make_channel(
        settings.consent_address,
        max_message_bytes=settings.grpc_max_message_bytes,
        interceptors=[BearerTokenInterceptor(runtime.identity_link(), "medledger.consent")],
    )
    api = RecordsApi(runtime, runtime.require_keys(), ConsentServiceStub(consent_channel))
    return ServiceParts(
        service_descriptors=[records_service_pb2.DESCRIPTOR.services_by_name["RecordsService"]],
        register=lambda server: records_service_pb2_grpc.add_RecordsServiceServicer_to_server(api, server),
        access=ACCESS,
        public_methods=PUBLIC_METHODS,
        on_stop=[consent_channel.close],
    )


def main() -> None:
    run_service(NAME, load_settings_or_exit(RecordsSettings), MIGRATIONS, build)


if __name__ == "__main__":
    main()
