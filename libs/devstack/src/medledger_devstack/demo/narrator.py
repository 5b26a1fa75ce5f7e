"""What the story tells and what it keeps: each verification's outcome, the story's result, and the
narrator that says it all in words."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medledger.anchoring.v1 import anchoring_service_pb2 as anchoring_pb


@dataclass(frozen=True)
class Outcome:
    """One verification of the story: what was checked, whether it held, what was seen."""

    name: str
    passed: bool
    detail: str


@dataclass
class StoryResult:
    outcomes: list[Outcome] = field(default_factory=list)
    # Who is who: principal id -> the name the story gives them.
    cast: dict[str, str] = field(default_factory=dict)
    patient_id: str = ""
    record_id: str = ""
    record: bytes = b""
    salt: str = ""
    record_proof: anchoring_pb.GetAnchoredProofResponse | None = None
    access_proof: anchoring_pb.GetAnchoredProofResponse | None = None
    # The consent versions the patient holds: (file stem, FHIR Consent JSON, salt in hex).
    consent_documents: list[tuple[str, bytes, str]] = field(default_factory=list)
    # The decision that let the doctor read, with the log entries its replay used and their
    # tlog-proofs (``medledger_sdk.decisions.DecisionEvidence.to_json``).
    decision_evidence: bytes = b""
    # The erasure certificate, a C2SP signed note.
    erasure_certificate: str = ""
    written: list[Path] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.outcomes) and all(o.passed for o in self.outcomes)


class Narrator:
    """Says what the story does, in words; the default prints, a test may collect."""

    def __init__(self, write: Callable[[str], None] = print) -> None:
        self._write = write
        self._step = 0

    def step(self, text: str) -> None:
        self._step += 1
        self._write(f"\n{self._step:>2}. {text}")

    def say(self, text: str) -> None:
        self._write(f"    {text}")

    def checked(self, outcome: Outcome) -> None:
        self._write(f"    {'✓' if outcome.passed else '✗'} {outcome.detail}")
