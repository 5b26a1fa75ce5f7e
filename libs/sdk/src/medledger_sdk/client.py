"""The Python client of the platform: one typed async stub per service, for one principal.

    async with Medledger(Endpoints(), principal_id="prn_…", client_secret="mlsec_…") as ml:
        stored = await ml.records.PutRecord(PutRecordRequest(...))
        async for entry in pages(ml.audit.ListEntries, ListEntriesRequest(patient_id=...), "entries"):
            ...

Every call carries a token for the service it goes to (fetched with the principal's secret,
refreshed before it expires), has a deadline, is retried on UNAVAILABLE with the same request
(so the same ``request_id``), and fails with ``RpcError`` (status, message, field violations).
The stubs are the generated ones, so requests and replies are the typed protobuf messages.
Without a principal, only the public RPCs work (registering a patient, JWKS, checkpoints,
proofs' verification).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from medledger.anchoring.v1.anchoring_service_pb2_grpc import AnchoringServiceStub
from medledger.audit.v1.audit_service_pb2_grpc import AuditServiceStub
from medledger.consent.v1.consent_service_pb2_grpc import ConsentServiceStub
from medledger.identity.v1.identity_service_pb2_grpc import IdentityServiceStub
from medledger.records.v1.records_service_pb2_grpc import RecordsServiceStub

from medledger_sdk.calls import DEFAULT_ATTEMPTS, DEFAULT_DEADLINE_SECONDS, CallPolicy
from medledger_sdk.channels import make_channel
from medledger_sdk.identity_link import BearerTokenInterceptor, IdentityLink

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Endpoints:
    """Where each service answers; the defaults are the ports `medledger up` uses."""

    identity: str = f"{HOST}:50051"
    consent: str = f"{HOST}:50052"
    records: str = f"{HOST}:50053"
    anchoring: str = f"{HOST}:50054"
    audit: str = f"{HOST}:50055"


class Medledger:
    def __init__(
        self,
        endpoints: Endpoints | None = None,
        *,
        principal_id: str | None = None,
        client_secret: str | None = None,
        secret_file: Path | None = None,
        deadline_seconds: float = DEFAULT_DEADLINE_SECONDS,
        attempts: int = DEFAULT_ATTEMPTS,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> None:
        self.endpoints = endpoints or Endpoints()
        self.link = (
            IdentityLink(self.endpoints.identity, principal_id, secret=client_secret, secret_file=secret_file)
            if principal_id
            else None
        )
        self._policy = CallPolicy(deadline_seconds=deadline_seconds, attempts=attempts)
        self._tls: dict[str, Any] = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
        self._channels: list[grpc.aio.Channel] = []
        e = self.endpoints
        self.identity = IdentityServiceStub(self._channel(e.identity, "identity"))
        self.consent = ConsentServiceStub(self._channel(e.consent, "consent"))
        self.records = RecordsServiceStub(self._channel(e.records, "records"))
        self.audit = AuditServiceStub(self._channel(e.audit, "audit"))
        self.anchoring = AnchoringServiceStub(self._channel(e.anchoring, "anchoring"))

    @property
    def principal_id(self) -> str | None:
        return self.link.principal_id if self.link else None

    def _channel(self, address: str, service: str) -> grpc.aio.Channel:
        # The policy outermost, so that each retry asks for a current token again.
        interceptors: list[Any] = [self._policy]
        if self.link is not None:
            interceptors.append(BearerTokenInterceptor(self.link, f"medledger.{service}"))
        channel = make_channel(address, interceptors=interceptors, **self._tls)
        self._channels.append(channel)
        return channel

    async def token(self, service: str) -> str:
        """The principal's current token for ``service`` (e.g. "records")."""
        if self.link is None:
            raise RuntimeError("an anonymous client has no token")
        return await self.link.token(f"medledger.{service}")

    async def aclose(self) -> None:
        for channel in self._channels:
            await channel.close()
        if self.link is not None:
            await self.link.aclose()

    async def __aenter__(self) -> Medledger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
