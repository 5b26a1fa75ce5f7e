"""The story as a whole: what it is told against, the state its chapters share, and the order in
which they are told."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from medledger.records.v1 import records_service_pb2 as records_pb

from medledger_devstack.demo import care, consent_proof, decision_replay, erasure, evidence, fhir_rest, proofs
from medledger_devstack.demo.narrator import Narrator, Outcome, StoryResult
from medledger_devstack.demo.waiting import ANCHOR_WAIT_SECONDS, code_of
from medledger_sdk.calls import RpcError
from medledger_sdk.client import Endpoints, Medledger
from medledger_verifier.proof_files import TrustPolicy


@dataclass
class StoryConfig:
    endpoints: Endpoints
    admin_id: str
    admin_secret: str
    trust_policy: TrustPolicy
    rpc_url: str
    # [base] of the FHIR gateway (`medledger up` prints it).
    fhir_base_url: str
    out_dir: Path | None = None
    anchor_wait_seconds: float = ANCHOR_WAIT_SECONDS


class Story:
    """The state the chapters share: the cast's ids and clients (set as the chapters make them),
    the record, and the result so far."""

    # Set by the care chapters.
    admin: Medledger
    hospital_id: str
    doctor_id: str
    doctor: Medledger
    emergency_id: str
    emergency: Medledger
    officer_id: str
    officer: Medledger
    researcher_id: str
    researcher: Medledger
    patient_id: str
    patient: Medledger
    # The patient's FHIR identifier (system and value), by which a bundle's Patient entry matches.
    patient_identifier: dict[str, str]
    consent_id: str
    record_id: str
    receipt: records_pb.Receipt
    # The decision that let the doctor read (``care.store_and_read``).
    read_decision_id: str
    # Set by the FHIR chapter: the Observations the engine loaded, and the code searched for.
    fhir_observations: list[str]
    fhir_code: str
    fhir_code_count: int
    # Set by ``proofs.list_who_saw``: the patient's first disclosure, as the log holds it.
    access_index: int
    access_bytes: bytes

    def __init__(self, config: StoryConfig, narrator: Narrator) -> None:
        self.config = config
        self.say = narrator
        self.result = StoryResult()
        self._clients: list[Medledger] = []
        self.break_glass_access_id = ""

    # --- helpers ------------------------------------------------------------------------------

    def client(self, principal_id: str | None = None, secret: str | None = None) -> Medledger:
        ml = Medledger(self.config.endpoints, principal_id=principal_id, client_secret=secret)
        self._clients.append(ml)
        return ml

    def check(self, name: str, passed: bool, detail: str) -> bool:
        outcome = Outcome(name, passed, detail)
        self.result.outcomes.append(outcome)
        self.say.checked(outcome)
        return passed

    async def expect(self, name: str, call: Awaitable[Any], code: grpc.StatusCode, saying: str) -> None:
        got, message = await code_of(call)
        detail = f"{saying}: {got.name}" + (f" ({message})" if message else "")
        self.check(name, got == code, detail if got == code else f"{detail}; expected {code.name}")

    def name(self, principal_id: str) -> str:
        return self.result.cast.get(principal_id, principal_id)

    async def close(self) -> None:
        for ml in self._clients:
            await ml.aclose()

    # --- the story ----------------------------------------------------------------------------

    async def run(self) -> StoryResult:
        steps = (
            care.register_everyone,
            care.grant_consent,
            care.store_and_read,
            care.deny_the_researcher,
            care.break_the_glass,
            fhir_rest.load_a_synthetic_patient,
            fhir_rest.search_and_read,
            fhir_rest.who_read_over_fhir,
            care.revoke,
            proofs.list_who_saw,
            decision_replay.replay_the_read,
            proofs.prove_the_record,
            proofs.show_the_latest_anchor,
            consent_proof.verify_the_consent,
            erasure.erase,
            evidence.write_files,
        )
        try:
            for step in steps:
                try:
                    await step(self)
                except (RpcError, TimeoutError, OSError, fhir_rest.FhirError) as exc:
                    # The story cannot go on without this step: say which failed and why.
                    self.check(step.__name__.replace("_", " "), False, f"failed: {type(exc).__name__}: {exc}")
                    break
        finally:
            await self.close()
        return self.result


async def run_story(config: StoryConfig, narrator: Narrator | None = None) -> StoryResult:
    return await Story(config, narrator or Narrator()).run()
