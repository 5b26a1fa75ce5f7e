"""The services behind the gateway, called with the caller's own token.

The gateway holds no credential of its own for data: every call carries the `Authorization`
header the FHIR client sent (a token whose audiences include the services), so each service
decides, logs and enforces scopes exactly as for a gRPC client. Calls go through the SDK's
CallPolicy: a deadline, retries of UNAVAILABLE with the same request, errors with their details.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from aiohttp import web
from medledger.audit.v1.audit_service_pb2_grpc import AuditServiceStub
from medledger.consent.v1.consent_service_pb2_grpc import ConsentServiceStub
from medledger.identity.v1.identity_service_pb2_grpc import IdentityServiceStub
from medledger.records.v1.records_service_pb2_grpc import RecordsServiceStub

from medledger_fhir.config import FhirSettings
from medledger_runtime.grpc_client import service_channel
from medledger_sdk.calls import CallPolicy

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Backends:
    identity: IdentityServiceStub
    consent: ConsentServiceStub
    records: RecordsServiceStub
    audit: AuditServiceStub
    channels: tuple[grpc.aio.Channel, ...]

    @classmethod
    def connect(cls, settings: FhirSettings) -> Backends:
        def channel(target: str) -> grpc.aio.Channel:
            return service_channel(settings, target, interceptors=[CallPolicy()])

        identity, consent, records, audit = (
            channel(settings.identity_address),
            channel(settings.consent_address),
            channel(settings.records_address),
            channel(settings.audit_address),
        )
        return cls(
            IdentityServiceStub(identity),
            ConsentServiceStub(consent),
            RecordsServiceStub(records),
            AuditServiceStub(audit),
            (identity, consent, records, audit),
        )

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def caller_metadata(request: web.Request) -> Metadata:
    """The metadata that makes a call the caller's own: their bearer token, as they sent it
    (the runtime has already verified it for this request)."""
    return (("authorization", request.headers["Authorization"]),)
