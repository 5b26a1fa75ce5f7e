"""The story's consent chapter: the patient takes the consent they granted and its revocation as
consent hands them over (the FHIR Consent documents and their salts, from `GetConsent`), and proves
from ConsentRegistry, trusting only the trust policy and the chain, that the grant was in force
until they revoked it and is not since; and what the chain says of the moment Dr. Grey read."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import TYPE_CHECKING

from medledger.consent.v1 import consent_service_pb2 as consent_pb

from medledger_devstack.demo.waiting import eventually
from medledger_verifier import chain
from medledger_verifier.consent_documents import ConsentDocument, whole_seconds
from medledger_verifier.consent_proofs import REVOKED, ConsentProof, prove_in_force, when_text

if TYPE_CHECKING:
    from medledger_devstack.demo.story import Story

# The evidence's names for the two versions (`<stem>.json` and `<stem>.salt`).
GRANT_STEM, REVOCATION_STEM = "consent", "consent-revocation"


async def _prove(story: Story, documents: list[ConsentDocument], when: int) -> ConsentProof:
    policy = story.config.trust_policy
    w3 = chain.connect(story.config.rpc_url)
    try:
        return await prove_in_force(
            w3,
            policy.consent_registry,
            documents,
            when,
            chain_id=policy.chain_id,
            min_confirmations=policy.min_confirmations,
        )
    finally:
        await w3.provider.disconnect()


async def verify_the_consent(story: Story) -> None:
    story.say.step("The patient verifies the consent they granted against the chain")
    policy = story.config.trust_policy
    if not policy.consent_registry:
        story.check("consent proof", False, "the trust policy names no ConsentRegistry (restart `medledger up`)")
        return
    held: list[ConsentDocument] = []
    for stem, version in ((GRANT_STEM, 1), (REVOCATION_STEM, 0)):  # 0: the latest, the revocation
        got = await story.patient.consent.GetConsent(
            consent_pb.GetConsentRequest(consent_id=story.consent_id, version=version)
        )
        data = got.fhir_consent_json.encode()
        story.result.consent_documents.append((stem, data, got.salt.hex()))
        held.append(ConsentDocument.parse(data, got.salt, source=f"{stem}.json"))
    grant, revocation = held
    story.say.say(
        f"holding {grant.label} (commitment {grant.commitment[:16]}…) and {revocation.label}, the revocation "
        f"(commitment {revocation.commitment[:16]}…), each with its salt; the chain holds only commitments"
    )

    # Anchoring writes consent versions in its rounds: wait until the chain has the revocation too.
    async def revoked_on_chain() -> ConsentProof | None:
        proof = await _prove(story, held, int(time.time()))
        first = proof.findings[0]
        return proof if first.entry.status == REVOKED and first.revoked_by == revocation else None

    now = await eventually(revoked_on_chain, "the revocation on chain", story.config.anchor_wait_seconds, story.say)
    first = now.findings[0]
    story.say.say(
        f"on chain: granted at {when_text(first.entry.recorded_at)} (anchoring lag {first.anchoring_lag or 0:.1f} s), "
        f"window {first.entry.window_text()}, revoked at {when_text(first.entry.revoked_at)} by {revocation.label} "
        f"(anchoring lag {first.revocation_lag or 0:.1f} s)"
    )
    before = await _prove(story, held, first.entry.revoked_at - 1)
    story.check(
        "consent in force until revoked",
        before.verified and before.in_force[0].document == grant,
        f"{before.verdict()} (just before the revocation's block)",
    )
    story.check(
        "consent revoked on chain",
        not now.in_force and now.block_time >= first.entry.revoked_at,
        f"{now.verdict()} (now; it was revoked by {revocation.label})",
    )

    # The moment of the doctor's read, as the log dates it: what the chain can say of it.
    read_at = json.loads(story.access_bytes)["event_time"]
    at_read = await _prove(story, held, whole_seconds(datetime.fromisoformat(read_at)))
    if at_read.verified:
        story.say.say(f"when Dr. Grey read the record ({read_at}): {at_read.verdict()}")
    else:
        reasons = "; ".join(at_read.findings[0].reasons(at_read.when))
        story.say.say(f"when Dr. Grey read the record ({read_at}), the chain cannot yet say: {reasons}")
