"""Wires records: settings, storage, the use cases (records.RecordDesk, erasure.ErasureDesk), the
erasure runner (erasure_runner.ErasureRunner) and the gRPC API, each given its dependencies
through its constructor."""

from __future__ import annotations

from dataclasses import dataclass

from medledger.consent.v1.consent_service_pb2_grpc import ConsentServiceStub
from medledger.records.v1 import records_service_pb2, records_service_pb2_grpc

from medledger_records.api import ACCESS, PUBLIC_METHODS, SCOPES, RecordsApi
from medledger_records.blobs import FilesystemBlobStore
from medledger_records.config import RecordsSettings
from medledger_records.data_keys import CacheLimits, DataKeyCache
from medledger_records.erasure import ErasureDesk
from medledger_records.erasure_certificates import Certifier
from medledger_records.erasure_runner import ErasureRunner
from medledger_records.handlers import CONFIRMATION_CONSUMER, ErasureConfirmationHandler
from medledger_records.key_owners import data_key_migration
from medledger_records.records import RecordDesk
from medledger_records.search import SearchBackfill, SearchDesk, SearchIndex
from medledger_records.storage import MIGRATIONS
from medledger_runtime.consent_checks import ConsentClient
from medledger_runtime.events import TOPICS
from medledger_runtime.group_commit import OutboxGroupCommit
from medledger_runtime.grpc_client import service_channel
from medledger_runtime.guardians import Guardians, GuardianshipProjection
from medledger_runtime.parts import ConsumerSpec, ServiceParts
from medledger_runtime.service import ServiceRuntime, run_service
from medledger_runtime.settings import load_settings_or_exit
from medledger_sdk.identity_link import BearerTokenInterceptor

NAME = "records"
GUARDIANSHIP_CONSUMER = "records.guardianships"
_SERVICE = records_service_pb2.DESCRIPTOR.services_by_name["RecordsService"].full_name


@dataclass(frozen=True)
class RecordsParts:
    """records' own objects, reachable from tests and benchmarks as ``runtime.handle``."""

    api: RecordsApi
    records: RecordDesk
    search: SearchDesk
    erasures: ErasureDesk
    erasure_runner: ErasureRunner


def build(runtime: ServiceRuntime[RecordsParts]) -> ServiceParts[RecordsParts]:
    settings: RecordsSettings = runtime.settings  # type: ignore[assignment]
    consent_channel = service_channel(
        settings,
        settings.consent_address,
        interceptors=[BearerTokenInterceptor(runtime.identity_link(), "medledger.consent")],
    )
    everyday_keys = runtime.require_keys()
    keys = DataKeyCache(
        everyday_keys,
        CacheLimits(
            max_age_seconds=settings.data_key_cache_max_age_seconds,
            max_uses=settings.data_key_cache_max_uses,
            max_bytes=settings.data_key_cache_max_bytes,
        ),
    )
    shredder = runtime.key_shredder()
    shredder.also_forget(keys.purge)  # a shredded key's cached data keys go with it
    blobs = FilesystemBlobStore(settings.blob_dir) if settings.blob_store == "filesystem" else None
    certifier = Certifier(
        # The everyday key manager holds the certificate's signing key.
        everyday_keys,
        backup_retention_seconds=settings.key_backup_retention_seconds,
        # A data key cached in another records process outlives the erasure by at most its age.
        cache_max_age_seconds=settings.data_key_cache_max_age_seconds,
    )
    runner = ErasureRunner(
        runtime.db,
        shredder,
        blobs,
        certifier,
        runtime.relay.notify,
        check_interval=settings.erasure_check_interval_seconds,
        participants=settings.participants,
        source=runtime.source,
    )
    # Guardians act for the patient: consent's guardianships, kept here by their events.
    guardians = Guardians(runtime.db)
    erasures = ErasureDesk(
        runtime.db,
        runner,
        runtime.relay.notify,
        grace_seconds=settings.erasure_grace_seconds,
        source=runtime.source,
        guardians=guardians,
    )
    disclosures = OutboxGroupCommit(runtime.db, what="the disclosure")
    disclosures.after_commit = runtime.relay.notify
    # FHIR search's blind index, written with every FHIR version (search.py).
    search_index = SearchIndex(keys)
    records = RecordDesk(
        runtime.db,
        keys,
        ConsentClient(ConsentServiceStub(consent_channel)),
        disclosures,
        blobs,
        runtime.relay.notify,
        source=runtime.source,
        legacy_keys=runtime.legacy_keys,
        guardians=guardians,
        search_index=search_index,
    )
    search = SearchDesk(runtime.db, records, search_index)
    api = RecordsApi(runtime, keys, records, erasures, search)
    on_stop = [consent_channel.close, disclosures.close]
    return ServiceParts(
        service_descriptors=[records_service_pb2.DESCRIPTOR.services_by_name["RecordsService"]],
        register=lambda server: records_service_pb2_grpc.add_RecordsServiceServicer_to_server(api, server),
        access=ACCESS,
        handle=RecordsParts(api=api, records=records, search=search, erasures=erasures, erasure_runner=runner),
        public_methods=PUBLIC_METHODS,
        scopes=SCOPES,
        # Their use cases write RecordDisclosed and RecordsListed themselves, before answering.
        discloses_itself=[f"/{_SERVICE}/GetRecord", f"/{_SERVICE}/ExportRecords", f"/{_SERVICE}/SearchRecords"],
        # The participants that confirm by event emit on their own topics.
        consumers=[
            ConsumerSpec(
                group_id=CONFIRMATION_CONSUMER,
                handler=ErasureConfirmationHandler(runner),
                topics=[TOPICS["identity"], TOPICS["consent"]],
            ),
            GuardianshipProjection(runtime.db, GUARDIANSHIP_CONSUMER).consumer(),
        ],
        on_start=[runner.start],
        background=[
            runner.run,
            disclosures.run,
            api.finish_rotations,
            data_key_migration(runtime.db, everyday_keys, runtime.legacy_keys).keep_running,
            # Records written before the search index existed get their terms.
            SearchBackfill(runtime.db, records, search_index).keep_running,
        ],
        on_stop=on_stop,
    )


def main() -> None:
    run_service(NAME, load_settings_or_exit(RecordsSettings), MIGRATIONS, build)


if __name__ == "__main__":
    main()
