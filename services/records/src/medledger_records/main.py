"""Wires records: settings, storage and the gRPC API."""

from __future__ import annotations

from medledger.consent.v1.consent_service_pb2_grpc import ConsentServiceStub
from medledger.records.v1 import records_service_pb2, records_service_pb2_grpc

from medledger_common.events import TOPICS
from medledger_common.group_commit import OutboxGroupCommit
from medledger_common.grpc_client import service_channel
from medledger_common.identity_link import BearerTokenInterceptor
from medledger_common.keys import KeyManager, VaultKeyManager
from medledger_common.service import ConsumerSpec, ServiceParts, ServiceRuntime, run_service
from medledger_common.settings import ConfigError, load_settings_or_exit
from medledger_records.api import ACCESS, PUBLIC_METHODS, RecordsApi
from medledger_records.blobs import FilesystemBlobStore
from medledger_records.config import RecordsSettings
from medledger_records.erasure import ErasureDesk, KeyShredder
from medledger_records.handlers import CONFIRMATION_CONSUMER, ErasureConfirmationHandler
from medledger_records.storage import MIGRATIONS

NAME = "records"


def build(runtime: ServiceRuntime) -> ServiceParts:
    settings: RecordsSettings = runtime.settings  # type: ignore[assignment]
    consent_channel = service_channel(
        settings,
        settings.consent_address,
        interceptors=[BearerTokenInterceptor(runtime.identity_link(), "medledger.consent")],
    )
    keys = runtime.require_keys()
    blobs = FilesystemBlobStore(settings.blob_dir) if settings.blob_store == "filesystem" else None
    erasure_keys = _erasure_key_manager(settings, keys)
    erasures = ErasureDesk(
        runtime,
        KeyShredder(erasure_keys),
        blobs,
        grace_seconds=settings.erasure_grace_seconds,
        check_interval=settings.erasure_check_interval_seconds,
        backup_retention_seconds=settings.key_backup_retention_seconds,
        participants=settings.participants,
        cache_max_age_seconds=settings.data_key_cache_max_age_seconds,
        signing_keys=keys,
    )
    disclosures = OutboxGroupCommit(runtime.db, what="the disclosure")
    disclosures.after_commit = runtime.relay.notify
    api = RecordsApi(runtime, keys, ConsentServiceStub(consent_channel), erasures, disclosures, blobs)
    runtime.extras["erasures"] = erasures
    on_stop = [consent_channel.close, disclosures.close]
    if erasure_keys is not keys:
        on_stop.append(erasure_keys.aclose)
    return ServiceParts(
        service_descriptors=[records_service_pb2.DESCRIPTOR.services_by_name["RecordsService"]],
        register=lambda server: records_service_pb2_grpc.add_RecordsServiceServicer_to_server(api, server),
        access=ACCESS,
        public_methods=PUBLIC_METHODS,
        # The participants that confirm by event emit on their own topics.
        consumers=[
            ConsumerSpec(
                group_id=CONFIRMATION_CONSUMER,
                handler=ErasureConfirmationHandler(erasures),
                topics=[TOPICS["identity"], TOPICS["consent"]],
            )
        ],
        on_start=[erasures.start],
        background=[erasures.run, disclosures.run],
        on_stop=on_stop,
    )


def _erasure_key_manager(settings: RecordsSettings, keys: KeyManager) -> KeyManager:
    """The credential approved erasures delete keys with. Vault: a token of its own (the
    everyday token has no delete right). The local keyring is one file without access control,
    so there it is the same keyring."""
    if settings.key_manager != "vault":
        return keys
    if settings.erasure_vault_token_file is None:
        raise ConfigError("records with MEDLEDGER_KEY_MANAGER=vault needs MEDLEDGER_ERASURE_VAULT_TOKEN_FILE")
    return VaultKeyManager(
        settings.vault_addr, token_file=settings.erasure_vault_token_file, mount_point=settings.vault_transit_mount
    )


def main() -> None:
    run_service(NAME, load_settings_or_exit(RecordsSettings), MIGRATIONS, build)


if __name__ == "__main__":
    main()
