"""Starting identity (and the services that authenticate against it) as the platform runs them:
real Kafka (Tansu), a real PostgreSQL, a local keyring with its master key outside the keyring's
folder, and the secret files `make up` provisions."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from eth_account import Account
from medledger.audit.v1 import audit_service_pb2 as audit_pb
from medledger.audit.v1.audit_service_pb2_grpc import AuditServiceStub

from medledger_anchoring import main as anchoring_main
from medledger_anchoring import storage as anchoring_storage
from medledger_anchoring.config import AnchoringSettings
from medledger_audit import main as audit_main
from medledger_audit import storage as audit_storage
from medledger_audit.config import AuditSettings
from medledger_consent import main as consent_main
from medledger_consent import storage as consent_storage
from medledger_consent.config import ConsentSettings
from medledger_devstack import contracts, localstack
from medledger_devstack.testing import Kafka, OpenBaoServer, Postgres, running_service
from medledger_fhir import main as fhir_main
from medledger_fhir.config import FhirSettings
from medledger_identity import main as identity_main
from medledger_identity import storage as identity_storage
from medledger_identity.config import IdentitySettings
from medledger_records import main as records_main
from medledger_records import storage as records_storage
from medledger_records.config import RecordsSettings
from medledger_runtime.keys import create_master_key_file
from medledger_runtime.service import ServiceRuntime
from medledger_sdk.auth import TokenClient
from medledger_verifier import chain
from medledger_verifier.proof_files import TrustPolicy


@dataclass
class Stack:
    """identity (always) and consent (when asked), with the credentials to call them."""

    identity: ServiceRuntime[identity_main.IdentityParts]
    consent: ServiceRuntime[consent_main.ConsentParts] | None
    admin_secret: str
    secrets_dir: Path
    # Every consent replica, `consent` first; they share one database.
    consent_replicas: list[ServiceRuntime[consent_main.ConsentParts]] = field(default_factory=list)
    records: ServiceRuntime[records_main.RecordsParts] | None = None
    audit: ServiceRuntime[audit_main.AuditParts] | None = None
    anchoring: ServiceRuntime[anchoring_main.AnchoringParts] | None = None
    # The FHIR gateway, when asked: [base] is `fhir_base`.
    fhir: ServiceRuntime[fhir_main.FhirParts] | None = None
    # The registries anchoring writes to, when it runs.
    deployment: contracts.Deployment | None = None
    _clients: list[TokenClient] = field(default_factory=list)

    @property
    def identity_address(self) -> str:
        return f"127.0.0.1:{self.identity.grpc_port}"

    @property
    def consent_address(self) -> str:
        assert self.consent is not None
        return f"127.0.0.1:{self.consent.grpc_port}"

    @property
    def fhir_base(self) -> str:
        assert self.fhir is not None, "start the stack with fhir=True"
        return f"http://127.0.0.1:{self.fhir.http_port}/fhir/R4"

    def client(self, principal_id: str, secret: str) -> TokenClient:
        c = TokenClient(self.identity_address, principal_id, client_secret=secret)
        self._clients.append(c)
        return c

    def admin(self) -> TokenClient:
        return self.client(identity_main.BOOTSTRAP_ADMIN, self.admin_secret)

    async def known_to_consent(self, *principal_ids: str, within: float = 20.0) -> None:
        """Consent learns principals from identity's events; a grant naming one waits until it has."""
        assert self.consent is not None
        deadline = time.monotonic() + within
        while True:
            async with self.consent.db.connect() as conn:
                if all([await consent_storage.get_principal(conn, i) for i in principal_ids]):
                    return
            assert time.monotonic() < deadline, "consent did not learn the principals"
            await asyncio.sleep(0.05)

    async def close_clients(self) -> None:
        for c in self._clients:
            await c.aclose()


async def deploy_chain(
    tmp_path: Path, rpc_url: str, audit: ServiceRuntime
) -> tuple[contracts.Deployment, dict[str, Any]]:
    """What `medledger up` does for anchoring, on a fresh pair of registries: an anchorer key,
    the contracts, the audit log's P-256 key registered, a trust policy; returns the deployment
    and anchoring's chain settings."""
    account = Account.create()
    key_file = tmp_path / f"anchorer-{account.address}.key"
    key_file.write_text(account.key.hex())
    w3 = chain.connect(rpc_url)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{audit.grpc_port}") as channel:
        keys = await AuditServiceStub(channel).GetVerifierKeys(audit_pb.GetVerifierKeysRequest())
    deployment = await contracts.deploy_for_log(
        w3, (await w3.eth.accounts)[0], account.address, keys.origin, list(keys.verifier_keys)
    )
    policy_file = tmp_path / f"trust-policy-{deployment.anchor_registry}.json"
    policy_file.write_text(
        TrustPolicy(keys.origin, tuple(keys.verifier_keys), deployment.chain_id, deployment.anchor_registry).to_json()
    )
    return deployment, {
        "chain_rpc_url": rpc_url,
        "chain_id": deployment.chain_id,
        "anchor_registry_address": deployment.anchor_registry,
        "consent_registry_address": deployment.consent_registry,
        "anchorer_key_file": key_file,
        "trust_policy_file": policy_file,
    }


def service_settings(cls: type, kafka: Kafka, database_url: str, **extra: Any) -> Any:
    settings: dict[str, Any] = {
        "grpc_port": 0,
        "metrics_port": 0,
        "database_url": database_url,
        "kafka_bootstrap_servers": kafka.bootstrap_servers,
        "outbox_poll_seconds": 0.1,
    }
    return cls(**{**settings, **extra})


StackFactory = Callable[..., Any]


@pytest.fixture
def start_stack(postgres: Postgres, tmp_path: Path) -> StackFactory:
    """`async with start_stack(consent=True) as stack:` runs identity (and consent) on a Kafka
    broker of their own.

    Their own, because the services' consumer groups have fixed names: on a shared Tansu, a
    stack stopped by an earlier test leaves its group to a rebalance that can outlast the next
    test's waits (Tansu 0.6 does not always let a stopping member go at once).
    """

    @asynccontextmanager
    async def start(
        *,
        consent: bool = True,
        identity_db: str | None = None,
        identity_settings: dict[str, Any] | None = None,
        consent_replicas: int = 1,
        consent_settings: dict[str, Any] | None = None,
        kafka: Kafka | None = None,
        records: bool = False,
        records_db: str | None = None,
        records_settings: dict[str, Any] | None = None,
        audit: bool = False,
        anchoring: bool = False,
        chain_rpc_url: str | None = None,
        anchoring_settings: dict[str, Any] | None = None,
        openbao: OpenBaoServer | None = None,
        fhir: bool = False,
        fhir_settings: dict[str, Any] | None = None,
    ) -> AsyncIterator[Stack]:
        def keys_of(service: str, **local: Any) -> dict[str, Any]:
            """A service's key-manager settings: its local keyring, or its own tokens of OpenBao."""
            if openbao is None:
                return local
            return {
                "key_manager": "vault",
                "vault_addr": openbao.address,
                "vault_token_file": openbao.token_file(service),
                "erasure_vault_token_file": openbao.token_file(f"{service}-erasure"),
            }

        secrets_dir = tmp_path / "secrets"
        secrets_dir.mkdir(exist_ok=True)
        admin_secret = "mlsec_admin_" + secrets.token_urlsafe(24)
        (tmp_path / "admin.secret").write_text(admin_secret + "\n")
        (secrets_dir / "consent.secret").write_text("mlsec_consent_" + secrets.token_urlsafe(24))
        (secrets_dir / "records.secret").write_text("mlsec_records_" + secrets.token_urlsafe(24))
        (secrets_dir / "audit.secret").write_text("mlsec_audit_" + secrets.token_urlsafe(24))
        (secrets_dir / "anchoring.secret").write_text("mlsec_anchoring_" + secrets.token_urlsafe(24))
        (secrets_dir / "fhir.secret").write_text("mlsec_fhir_" + secrets.token_urlsafe(24))
        master = tmp_path / "master-identity.key"
        if not master.exists():
            create_master_key_file(master)
        async with contextlib.AsyncExitStack() as exits:
            if kafka is None:
                port = localstack.free_port()
                broker = localstack.start_tansu(port, tmp_path / f"tansu-{port}.log")
                exits.callback(broker.stop)
                kafka = Kafka(f"{localstack.HOST}:{port}", broker)
            # identity asks consent (a patient's resource to another reader) and consent starts
            # after identity: its first replica's port is chosen now.
            consent_port = localstack.free_port() if consent else 0
            id_settings = service_settings(
                IdentitySettings,
                kafka,
                identity_db or postgres.new_database("identity"),
                http_port=0,
                consent_address=f"127.0.0.1:{consent_port}",
                **keys_of("identity", master_key_file=master, keyring_file=tmp_path / "keyrings" / "identity.keyring"),
                bootstrap_admin_secret_file=tmp_path / "admin.secret",
                service_secrets_dir=secrets_dir,
                **(identity_settings or {}),
            )
            identity = await exits.enter_async_context(
                running_service("identity", id_settings, identity_storage.MIGRATIONS, identity_main.build)
            )
            replicas: list[ServiceRuntime[consent_main.ConsentParts]] = []
            if consent:
                consent_db = postgres.new_database("consent")
                consent_master = tmp_path / "master-consent.key"
                if not consent_master.exists():
                    create_master_key_file(consent_master)
                for replica in range(consent_replicas):
                    co_settings = service_settings(
                        ConsentSettings,
                        kafka,
                        consent_db,
                        grpc_port=consent_port if replica == 0 else 0,
                        identity_address=f"127.0.0.1:{identity.grpc_port}",
                        client_secret_file=secrets_dir / "consent.secret",
                        # A local keyring belongs to one process: a keyring per replica.
                        **keys_of(
                            "consent",
                            master_key_file=consent_master,
                            keyring_file=tmp_path / "keyrings" / f"consent-{replica}.keyring",
                        ),
                        **(consent_settings or {}),
                    )
                    replicas.append(
                        await exits.enter_async_context(
                            running_service("consent", co_settings, consent_storage.MIGRATIONS, consent_main.build)
                        )
                    )
            records_runtime = None
            if records:
                assert replicas, "records asks consent: start consent too"
                master_records = tmp_path / "master-records.key"
                if not master_records.exists():
                    create_master_key_file(master_records)
                records_runtime = await exits.enter_async_context(
                    running_service(
                        "records",
                        service_settings(
                            RecordsSettings,
                            kafka,
                            records_db or postgres.new_database("records"),
                            identity_address=f"127.0.0.1:{identity.grpc_port}",
                            consent_address=f"127.0.0.1:{replicas[0].grpc_port}",
                            client_secret_file=secrets_dir / "records.secret",
                            **keys_of(
                                "records",
                                master_key_file=master_records,
                                keyring_file=tmp_path / "keyrings" / "records.keyring",
                            ),
                            **(records_settings or {}),
                        ),
                        records_storage.MIGRATIONS,
                        records_main.build,
                    )
                )
            audit_runtime = None
            if audit:
                master_audit = tmp_path / "master-audit.key"
                if not master_audit.exists():
                    create_master_key_file(master_audit)
                audit_runtime = await exits.enter_async_context(
                    running_service(
                        "audit",
                        service_settings(
                            AuditSettings,
                            kafka,
                            postgres.new_database("audit"),
                            identity_address=f"127.0.0.1:{identity.grpc_port}",
                            client_secret_file=secrets_dir / "audit.secret",
                            master_key_file=master_audit,
                            keyring_file=tmp_path / "keyrings" / "audit.keyring",
                            last_checkpoint_file=tmp_path / "audit" / "last-checkpoint",
                            checkpoint_interval_seconds=0.5,
                            http_port=0,
                        ),
                        audit_storage.MIGRATIONS,
                        audit_main.build,
                    )
                )
            anchoring_runtime, deployment = None, None
            if anchoring:
                assert audit_runtime is not None and chain_rpc_url, "anchoring needs audit and a chain"
                deployment, chain_settings = await deploy_chain(tmp_path, chain_rpc_url, audit_runtime)
                anchoring_runtime = await exits.enter_async_context(
                    running_service(
                        "anchoring",
                        service_settings(
                            AnchoringSettings,
                            kafka,
                            postgres.new_database("anchoring"),
                            identity_address=f"127.0.0.1:{identity.grpc_port}",
                            client_secret_file=secrets_dir / "anchoring.secret",
                            audit_address=f"127.0.0.1:{audit_runtime.grpc_port}",
                            **{**chain_settings, **(anchoring_settings or {})},
                        ),
                        anchoring_storage.MIGRATIONS,
                        anchoring_main.build,
                    )
                )
            fhir_runtime = None
            if fhir:
                assert records_runtime is not None and audit_runtime is not None, "the gateway calls records and audit"
                fhir_runtime = await exits.enter_async_context(
                    running_service(
                        "fhir",
                        FhirSettings(
                            grpc_port=0,
                            metrics_port=0,
                            http_port=0,
                            identity_address=f"127.0.0.1:{identity.grpc_port}",
                            consent_address=f"127.0.0.1:{replicas[0].grpc_port}",
                            records_address=f"127.0.0.1:{records_runtime.grpc_port}",
                            audit_address=f"127.0.0.1:{audit_runtime.grpc_port}",
                            client_secret_file=secrets_dir / "fhir.secret",
                            token_endpoint_url=f"http://127.0.0.1:{identity.http_port}/oauth2/token",
                            **(fhir_settings or {}),
                        ),
                        (),
                        fhir_main.build,
                        stateless=True,
                    )
                )
            stack = Stack(identity, replicas[0] if replicas else None, admin_secret, secrets_dir, replicas)
            stack.fhir = fhir_runtime
            stack.records = records_runtime
            stack.audit = audit_runtime
            stack.anchoring = anchoring_runtime
            stack.deployment = deployment
            try:
                yield stack
            finally:
                await stack.close_clients()

    return start
