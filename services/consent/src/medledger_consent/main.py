"""Wires consent: settings, storage, the gRPC API and its event handlers."""

from __future__ import annotations

from dataclasses import dataclass

from medledger.consent.v1 import consent_service_pb2, consent_service_pb2_grpc

from medledger_consent.api import ACCESS, PUBLIC_METHODS, SCOPES, ConsentApi
from medledger_consent.break_glass import BreakGlassDesk
from medledger_consent.checks import ConsentChecks
from medledger_consent.config import ConsentSettings
from medledger_consent.consents import ConsentDesk
from medledger_consent.domain import ConsentIndex
from medledger_consent.handlers import (
    DIRECTORY_CONSUMER,
    ERASURE_CONSUMER,
    INDEX_CONSUMER,
    ConsentIndexHandler,
    PatientErasureHandler,
    PrincipalDirectoryHandler,
)
from medledger_consent.key_owners import (
    ERASURE_BACKFILL_CONSUMER,
    ErasedJustificationsHandler,
    justification_migration,
)
from medledger_consent.storage import MIGRATIONS, DecisionLog
from medledger_runtime.events import TOPICS
from medledger_runtime.parts import ConsumerSpec, ServiceParts
from medledger_runtime.service import ServiceRuntime, run_service
from medledger_runtime.settings import load_settings_or_exit

NAME = "consent"


@dataclass(frozen=True)
class ConsentParts:
    """consent's own objects, reachable from tests and benchmarks as ``runtime.handle``."""

    api: ConsentApi
    consents: ConsentDesk
    checks: ConsentChecks
    break_glass: BreakGlassDesk


def build(runtime: ServiceRuntime[ConsentParts]) -> ServiceParts[ConsentParts]:
    # RPCs not built yet answer UNIMPLEMENTED (the generated base servicer) until their issue lands.
    index = ConsentIndex()
    settings: ConsentSettings = runtime.settings  # type: ignore[assignment]
    decisions = DecisionLog(
        runtime.db, TOPICS["consent.decisions"], commit_interval=settings.decision_commit_interval_seconds
    )
    decisions.after_commit = runtime.relay.notify
    keys = runtime.require_keys()
    notify = runtime.relay.notify
    consents = ConsentDesk(runtime.db, index, notify, source=runtime.source)
    checks = ConsentChecks(runtime.db, index, decisions, source=runtime.source)
    desk = BreakGlassDesk(runtime.db, keys, index, notify, legacy_keys=runtime.legacy_keys, source=runtime.source)
    api = ConsentApi(runtime, consents, checks, desk)
    return ServiceParts(
        service_descriptors=[consent_service_pb2.DESCRIPTOR.services_by_name["ConsentService"]],
        register=lambda server: consent_service_pb2_grpc.add_ConsentServiceServicer_to_server(api, server),
        access=ACCESS,
        handle=ConsentParts(api=api, consents=consents, checks=checks, break_glass=desk),
        public_methods=PUBLIC_METHODS,
        scopes=SCOPES,
        consumers=[
            ConsumerSpec(
                group_id=DIRECTORY_CONSUMER,
                handler=PrincipalDirectoryHandler(runtime.db),
                topics=[TOPICS["identity"]],
            ),
            # Per replica, from the end; the index is then loaded in full before serving.
            ConsumerSpec(
                group_id=None,
                name=INDEX_CONSUMER,
                handler=ConsentIndexHandler(runtime.db, index),
                topics=[TOPICS["consent"]],
                fetch_max_wait_ms=50,
            ),
            ConsumerSpec(
                group_id=ERASURE_CONSUMER,
                handler=PatientErasureHandler(runtime.db, runtime.key_shredder(), runtime.source, runtime.relay.notify),
                topics=[TOPICS["records"]],
            ),
            # Erasures that completed before consent took part in them (key_owners.py).
            ConsumerSpec(
                group_id=ERASURE_BACKFILL_CONSUMER,
                handler=ErasedJustificationsHandler(runtime.db, runtime.key_shredder()),
                topics=[TOPICS["records"]],
            ),
        ],
        on_start=[checks.load_index],
        background=[
            decisions.run,
            checks.reconcile_index,
            desk.watch_pending_reviews,
            justification_migration(runtime.db, keys, runtime.legacy_keys).keep_running,
        ],
        on_stop=[decisions.close],
    )


def main() -> None:
    run_service(NAME, load_settings_or_exit(ConsentSettings), MIGRATIONS, build)


if __name__ == "__main__":
    main()
