"""Wires audit: settings, storage, the log's consumer, sequencer and checkpointer, the gRPC API."""

from __future__ import annotations

from dataclasses import dataclass

from medledger.audit.v1 import audit_service_pb2, audit_service_pb2_grpc

from medledger_audit.api import ACCESS, PUBLIC_METHODS, SCOPES, AuditApi
from medledger_audit.checkpoints import Checkpointer
from medledger_audit.config import AuditSettings
from medledger_audit.handlers import LogConsumer
from medledger_audit.http import TilesHttp
from medledger_audit.sequencer import Sequencer
from medledger_audit.storage import MIGRATIONS
from medledger_audit.verify import IncrementalVerifier
from medledger_runtime.guardians import Guardians, GuardianshipProjection
from medledger_runtime.parts import ServiceParts
from medledger_runtime.service import ServiceRuntime, run_service
from medledger_runtime.settings import load_settings_or_exit

NAME = "audit"
GUARDIANSHIP_CONSUMER = "audit.guardianships"


@dataclass(frozen=True)
class AuditParts:
    """audit's own objects, reachable from tests and benchmarks as ``runtime.handle``."""

    api: AuditApi
    sequencer: Sequencer
    checkpointer: Checkpointer
    consumer: LogConsumer
    verifier: IncrementalVerifier


def build(runtime: ServiceRuntime[AuditParts]) -> ServiceParts[AuditParts]:
    settings: AuditSettings = runtime.settings  # type: ignore[assignment]
    keys = runtime.require_keys()
    sequencer = Sequencer(runtime.db, keys, max_batch=settings.append_batch_max, shredder=runtime.key_shredder())
    checkpointer = Checkpointer(
        runtime.db,
        keys,
        origin=settings.log_origin,
        last_checkpoint_file=settings.last_checkpoint_file,
        source=runtime.source,
        every_entries=settings.checkpoint_every_entries,
        interval_seconds=settings.checkpoint_interval_seconds,
    )
    sequencer.after_append = checkpointer.tree_grew
    checkpointer.after_commit = runtime.relay.notify
    # Not a ConsumerSpec: the runtime's consumers call a handler per message, and the log
    # appends whole polls (see handlers.py). It runs as a background task instead.
    consumer = LogConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        sequencer=sequencer,
        producer=runtime.producer,
        batch_max=settings.append_batch_max,
    )
    # Guardians read the patient's trail: consent's guardianships, kept here by their events.
    api = AuditApi(runtime, checkpointer, sequencer, Guardians(runtime.db))
    tiles_http = TilesHttp(runtime, checkpointer)
    verifier = IncrementalVerifier(
        runtime.db, checkpointer, interval=settings.verify_interval_seconds, origin=settings.log_origin
    )
    return ServiceParts(
        service_descriptors=[audit_service_pb2.DESCRIPTOR.services_by_name["AuditService"]],
        register=lambda server: audit_service_pb2_grpc.add_AuditServiceServicer_to_server(api, server),
        access=ACCESS,
        handle=AuditParts(
            api=api, sequencer=sequencer, checkpointer=checkpointer, consumer=consumer, verifier=verifier
        ),
        public_methods=PUBLIC_METHODS,
        scopes=SCOPES,
        http_routes=tiles_http.routes(),
        consumers=[GuardianshipProjection(runtime.db, GUARDIANSHIP_CONSUMER).consumer()],
        # The signing keys and the last signed checkpoint, before anything is appended or served.
        on_start=[checkpointer.start],
        background=[consumer.run_until_cancelled, checkpointer.run, verifier.run],
        on_stop=[sequencer.close],
    )


def main() -> None:
    run_service(NAME, load_settings_or_exit(AuditSettings), MIGRATIONS, build)


if __name__ == "__main__":
    main()
