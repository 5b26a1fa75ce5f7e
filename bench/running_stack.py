"""identity and consent running in this process, as the benchmarks need them: Tansu from the
runner, a database each, a local keyring, the secret files `make up` would write, and an admin
token client. Logs at WARNING so that they do not weigh on the figures."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import chart_defaults
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.types.v1 import vocabulary_pb2

from medledger_consent import main as consent_main
from medledger_consent import storage as consent_storage
from medledger_consent.config import ConsentSettings
from medledger_devstack.testing import running_service
from medledger_identity import main as identity_main
from medledger_identity import storage as identity_storage
from medledger_identity.config import IdentitySettings
from medledger_records import main as records_main
from medledger_records import storage as records_storage
from medledger_records.config import RecordsSettings
from medledger_runtime.keys import create_master_key_file
from medledger_runtime.service import ServiceRuntime
from medledger_sdk.auth import TokenClient


@dataclass
class Platform:
    identity: ServiceRuntime
    consents: list[ServiceRuntime]
    admin: TokenClient
    admin_identity: id_grpc.IdentityServiceStub
    clients: list[TokenClient] = field(default_factory=list)
    records: ServiceRuntime | None = None

    @property
    def identity_address(self) -> str:
        return f"127.0.0.1:{self.identity.grpc_port}"

    async def principal(self, kind: int, *roles: int, **fields: Any) -> tuple[str, str]:
        """Register a principal holding `roles`; returns its id and client secret."""
        reply = await self.admin_identity.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(request_id=str(uuid.uuid4()), kind=kind, **fields)
        )
        for role in roles:
            await self.admin_identity.AssignRole(
                id_pb.AssignRoleRequest(
                    request_id=str(uuid.uuid4()), principal_id=reply.principal.principal_id, role=role
                )
            )
        return reply.principal.principal_id, reply.client_secret

    async def researcher_with_pdp_role(self) -> tuple[str, str]:
        return await self.principal(
            vocabulary_pb2.PrincipalKind.PRINCIPAL_KIND_RESEARCHER, vocabulary_pb2.Role.ROLE_PDP_CLIENT
        )

    def client(self, principal_id: str, secret: str) -> TokenClient:
        c = TokenClient(self.identity_address, principal_id, client_secret=secret)
        self.clients.append(c)
        return c


@asynccontextmanager
async def identity_and_consent(
    bootstrap: str,
    folder: Path,
    *,
    consent_database_url: str | None = None,
    consent_replicas: int = 1,
    records_database_url: str | None = None,
) -> AsyncIterator[Platform]:
    """identity and consent; records too when `records_database_url` is given."""
    secrets_dir = folder / "secrets"
    secrets_dir.mkdir(parents=True, exist_ok=True)
    admin_secret = "mlsec_" + secrets.token_urlsafe(24)
    (folder / "admin.secret").write_text(admin_secret)
    # Every component's secret, as `make up` writes them (a benchmark may run any of them).
    for name in ("consent", "records", "audit", "fhir"):
        (secrets_dir / f"{name}.secret").write_text("mlsec_" + secrets.token_urlsafe(24))
    common: dict[str, Any] = {
        "grpc_port": 0,
        "metrics_port": 0,
        "kafka_bootstrap_servers": bootstrap,
        "outbox_poll_seconds": 0.5,
        "log_level": "WARNING",
        # As the chart runs them: a fraction of calls traced (every call was, before; see bench/README).
        "trace_sampling_ratio": chart_defaults.TRACE_SAMPLING,
    }
    id_settings = IdentitySettings(
        **common,
        database_url=f"sqlite+aiosqlite:///{folder / 'identity.db'}",
        http_port=0,
        master_key_file=create_master_key_file(folder / "master.key"),
        keyring_file=folder / "keyrings" / "identity.keyring",
        bootstrap_admin_secret_file=folder / "admin.secret",
        service_secrets_dir=secrets_dir,
    )
    async with AsyncExitStack() as stack:
        identity = await stack.enter_async_context(
            running_service("identity", id_settings, identity_storage.MIGRATIONS, identity_main.build)
        )
        consent_master = create_master_key_file(folder / "master-consent.key")
        consents = []
        for replica in range(consent_replicas):
            co_settings = ConsentSettings(
                **common,
                database_url=consent_database_url or f"sqlite+aiosqlite:///{folder / 'consent.db'}",
                identity_address=f"127.0.0.1:{identity.grpc_port}",
                client_secret_file=secrets_dir / "consent.secret",
                master_key_file=consent_master,
                # A local keyring belongs to one process.
                keyring_file=folder / "keyrings" / f"consent-{replica}.keyring",
            )
            consents.append(
                await stack.enter_async_context(
                    running_service("consent", co_settings, consent_storage.MIGRATIONS, consent_main.build)
                )
            )
        if records_database_url is not None:
            records_settings = RecordsSettings(
                **common,
                database_url=records_database_url,
                identity_address=f"127.0.0.1:{identity.grpc_port}",
                consent_address=f"127.0.0.1:{consents[0].grpc_port}",
                client_secret_file=secrets_dir / "records.secret",
                master_key_file=create_master_key_file(folder / "master-records.key"),
                keyring_file=folder / "keyrings" / "records.keyring",
            )
            records = await stack.enter_async_context(
                running_service("records", records_settings, records_storage.MIGRATIONS, records_main.build)
            )
        address = f"127.0.0.1:{identity.grpc_port}"
        admin = TokenClient(address, identity_main.BOOTSTRAP_ADMIN, client_secret=admin_secret)
        platform = Platform(
            identity, consents, admin, id_grpc.IdentityServiceStub(admin.channel(address, "medledger.identity"))
        )
        if records_database_url is not None:
            platform.records = records
        try:
            yield platform
        finally:
            for c in [admin, *platform.clients]:
                await c.aclose()
