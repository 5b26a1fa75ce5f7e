"""The gRPC API of identity: medledger.identity.v1.IdentityService."""

from __future__ import annotations

import grpc
from medledger.events.v1 import identity_events_pb2
from medledger.identity.v1 import identity_service_pb2 as pb
from medledger.identity.v1 import identity_service_pb2_grpc as pb_grpc
from medledger.types.v1 import vocabulary_pb2
from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_common.errors import NotFound
from medledger_common.events import TOPICS, new_event
from medledger_common.idempotency import run_idempotent
from medledger_common.outbox import enqueue
from medledger_common.service import ServiceRuntime
from medledger_identity import domain, storage

ACTIVE = vocabulary_pb2.PrincipalStatus.PRINCIPAL_STATUS_ACTIVE


def _to_proto(row: storage.PrincipalRow) -> pb.Principal:
    return pb.Principal(
        principal_id=row.principal_id,
        kind=row.kind,
        status=row.status,
        organization_id=row.organization_id,
    )


class IdentityApi(pb_grpc.IdentityServiceServicer):
    def __init__(self, runtime: ServiceRuntime) -> None:
        self.rt = runtime

    async def RegisterPrincipal(
        self, request: pb.RegisterPrincipalRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterPrincipalResponse:
        domain.check_registration(request.kind, request.organization_id)

        async def work(conn: AsyncConnection) -> pb.RegisterPrincipalResponse:
            row = storage.PrincipalRow(
                principal_id=domain.new_principal_id(request.kind),
                kind=request.kind,
                status=ACTIVE,
                organization_id=request.organization_id,
                version=1,
            )
            await storage.insert_principal(conn, row)
            event = new_event(
                source=self.rt.source,
                payload=identity_events_pb2.PrincipalRegistered(
                    principal_id=row.principal_id,
                    kind=row.kind,
                    organization_id=row.organization_id,
                ),
                aggregate_id=row.principal_id,
                version=row.version,
                subject=row.principal_id,
            )
            await enqueue(conn, TOPICS["identity"], event, key=row.principal_id.encode())
            return pb.RegisterPrincipalResponse(principal=_to_proto(row))

        return await run_idempotent(
            self.rt.db,
            scope="identity.RegisterPrincipal",
            request_id=request.request_id,
            request=request,
            response_cls=pb.RegisterPrincipalResponse,
            work=work,
            after_commit=self.rt.relay.notify,
        )

    async def GetPrincipal(
        self, request: pb.GetPrincipalRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPrincipalResponse:
        async with self.rt.db.connect() as conn:
            row = await storage.get_principal(conn, request.principal_id)
        if row is None:
            raise NotFound("no such principal")
        return pb.GetPrincipalResponse(principal=_to_proto(row))
