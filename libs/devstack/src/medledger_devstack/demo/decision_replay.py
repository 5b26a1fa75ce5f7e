"""The story's decision chapter: the privacy officer fetches the decision that let Dr. Grey read
(GetDecision), its log entry and the patient's consent versions from the log, each proven in a
signed checkpoint, and replays it: the versions considered are the patient's versions the log
holds up to the decision, and the rule of its version gives the logged permit. A copy of the
entry with the consent version removed fails replay, named."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from medledger_devstack.demo.waiting import LEARN_WAIT_SECONDS
from medledger_sdk.decisions import fetch_decision_evidence
from medledger_verifier.decision_replay import DEFAULT_WINDOW_SECONDS, replay

if TYPE_CHECKING:
    from medledger_devstack.demo.story import Story


async def replay_the_read(story: Story) -> None:
    story.say.step("The privacy officer replays the decision that let Dr. Grey read")
    evidence = await fetch_decision_evidence(
        story.officer, story.read_decision_id, story.config.trust_policy, wait_seconds=LEARN_WAIT_SECONDS
    )
    story.say.say(
        f"decision {story.read_decision_id}: log entry {evidence.entry.index} and the patient's "
        f"{len(evidence.used)} consent and break-glass entries, proven in the checkpoint of size "
        f"{evidence.tree_size} signed by the log's keys"
    )
    story.result.decision_evidence = evidence.to_json().encode()
    report = evidence.replay(window_seconds=DEFAULT_WINDOW_SECONDS)
    differences = evidence.record_differences()
    failures = [f"{f.code}: {f.message}" for f in report.failures] + differences
    story.check(
        "decision replayed",
        report.valid and not differences,
        f"{report.considered} version(s) considered, as the log holds them; {report.rule_version} re-run gives "
        f"{report.replayed}, as logged"
        if report.valid and not differences
        else "; ".join(failures),
    )

    # A copy of the entry with a version taken out of what was considered.
    logged = evidence.logged
    tampered = {**logged, "considered": list(logged.get("considered", []))[1:]}
    story.say.say("a copy of the decision's entry with a considered consent version removed:")
    bad = replay(tampered, [json.loads(e.entry) for e in evidence.used])
    story.check(
        "tampered decision fails replay",
        not bad.valid,
        "; ".join(f"{f.code}: {f.message}" for f in bad.failures) or "it replayed valid",
    )
