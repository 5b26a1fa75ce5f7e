"""Wires anchoring: settings, storage, the chain account and sender, the anchorer and consent
writer, the event handlers, the queries (witness.Witness) and the gRPC API."""

from __future__ import annotations

from dataclasses import dataclass

from medledger.anchoring.v1 import anchoring_service_pb2, anchoring_service_pb2_grpc
from medledger.audit.v1.audit_service_pb2_grpc import AuditServiceStub

from medledger_anchoring import domain
from medledger_anchoring.anchorer import Anchorer, AuditLog
from medledger_anchoring.api import ACCESS, PUBLIC_METHODS, SCOPES, AnchoringApi, AuditProofs
from medledger_anchoring.config import AnchoringSettings
from medledger_anchoring.consents import ConsentWriter
from medledger_anchoring.handlers import (
    CHECKPOINTS_CONSUMER,
    CONSENTS_CONSUMER,
    CheckpointHandler,
    ConsentVersionHandler,
)
from medledger_anchoring.sender import Sender, load_account
from medledger_anchoring.storage import MIGRATIONS
from medledger_anchoring.witness import Witness
from medledger_runtime.events import TOPICS
from medledger_runtime.grpc_client import service_channel
from medledger_runtime.parts import ConsumerSpec, ServiceParts
from medledger_runtime.service import ServiceRuntime, run_service
from medledger_runtime.settings import ConfigError, load_settings_or_exit
from medledger_sdk.identity_link import BearerTokenInterceptor
from medledger_verifier import chain, notes, proof_files

NAME = "anchoring"


@dataclass(frozen=True)
class AnchoringParts:
    """anchoring's own objects, reachable from tests and benchmarks as ``runtime.handle``."""

    api: AnchoringApi
    anchorer: Anchorer
    witness: Witness


def build(runtime: ServiceRuntime[AnchoringParts]) -> ServiceParts[AnchoringParts]:
    settings: AnchoringSettings = runtime.settings  # type: ignore[assignment]
    if settings.anchorer_key_file is None or not settings.anchor_registry_address:
        raise ConfigError(
            "anchoring needs MEDLEDGER_ANCHORER_KEY_FILE and MEDLEDGER_ANCHOR_REGISTRY_ADDRESS "
            "(`medledger up` sets both)"
        )
    w3 = chain.connect(settings.chain_rpc_url)
    sender = Sender(
        w3,
        load_account(settings.anchorer_key_file),
        chain_id=settings.chain_id,
        confirmations=settings.confirmations,
        max_fee_per_gas_wei=int(settings.max_fee_per_gas_gwei * 10**9),
    )
    # Public audit RPCs (checkpoints, proofs) and FindCommitment, which any authenticated caller
    # may use: anchoring calls it as itself.
    audit_channel = service_channel(
        settings,
        settings.audit_address,
        interceptors=[BearerTokenInterceptor(runtime.identity_link(), "medledger.audit")],
    )
    audit = AuditServiceStub(audit_channel)
    anchorer = Anchorer(
        runtime.db,
        sender,
        AuditLog(audit),
        registry_address=settings.anchor_registry_address,
        origin=settings.log_origin,
        policy=domain.AnchorPolicy(settings.anchor_interval_seconds, settings.anchor_every_entries),
        source=runtime.source,
    )
    anchorer.after_commit = runtime.relay.notify
    if settings.consent_registry_address:
        anchorer.consents = ConsentWriter(runtime.db, sender, settings.consent_registry_address, source=runtime.source)
        anchorer.consents.after_commit = runtime.relay.notify
    policy = proof_files.TrustPolicy.read(settings.trust_policy_file) if settings.trust_policy_file else None
    witness = Witness(runtime.db, settings.log_origin, AuditProofs(audit), sender.w3, policy)
    api = AnchoringApi(witness)
    consumers = [
        ConsumerSpec(
            group_id=CHECKPOINTS_CONSUMER,
            handler=CheckpointHandler(
                runtime.db,
                settings.log_origin,
                anchorer.wake,
                # The log's keys as the trust policy publishes them: only checkpoints they signed.
                [notes.NoteVerifier.parse(k) for k in policy.log_verifier_keys] if policy else (),
            ),
            topics=[TOPICS["audit"]],
        )
    ]
    if settings.consent_registry_address:
        consumers.append(
            ConsumerSpec(
                group_id=CONSENTS_CONSUMER,
                handler=ConsentVersionHandler(runtime.db, anchorer.wake),
                topics=[TOPICS["consent"]],
            )
        )
    return ServiceParts(
        service_descriptors=[anchoring_service_pb2.DESCRIPTOR.services_by_name["AnchoringService"]],
        register=lambda server: anchoring_service_pb2_grpc.add_AnchoringServiceServicer_to_server(api, server),
        access=ACCESS,
        handle=AnchoringParts(api=api, anchorer=anchorer, witness=witness),
        public_methods=PUBLIC_METHODS,
        scopes=SCOPES,
        consumers=consumers,
        on_start=[sender.check_chain],
        background=[anchorer.run],
        on_stop=[audit_channel.close],
    )


def main() -> None:
    run_service(NAME, load_settings_or_exit(AnchoringSettings), MIGRATIONS, build)


if __name__ == "__main__":
    main()
