"""The story's erasure chapter: the patient asks, the privacy officer approves, every service destroys
the patient's keys; the certificate verifies offline, the record no longer reads, and its proof
still verifies (the chain and the log keep hashes, never the record)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from medledger.consent.v1 import consent_service_pb2 as consent_pb
from medledger.records.v1 import records_service_pb2 as records_pb

from medledger_devstack.demo.proofs import report, verify
from medledger_devstack.demo.terms import TREAT, rid
from medledger_devstack.demo.waiting import eventually
from medledger_runtime.errors import InvalidArgument
from medledger_verifier.erasure_certificates import open_certificate

if TYPE_CHECKING:
    from medledger_devstack.demo.story import Story


async def erase(story: Story) -> None:
    story.say.step("The patient asks for their records to be erased; the privacy officer approves")
    requested = (
        await story.patient.records.RequestErasure(
            records_pb.RequestErasureRequest(
                request_id=rid(), patient_id=story.patient_id, reason="the patient withdraws from the hospital"
            )
        )
    ).erasure
    story.say.say(
        f"erasure {requested.erasure_id}: {records_pb.ErasureState.Name(requested.state)} until approved "
        f"or {requested.runs_after.ToDatetime():%Y-%m-%d}"
    )
    approved = (
        await story.officer.records.ApproveErasure(records_pb.ApproveErasureRequest(erasure_id=requested.erasure_id))
    ).erasure
    story.say.say(
        "approved: every service holding the patient's material destroys its keys and confirms"
        + (f" (awaiting {', '.join(approved.awaiting)})" if approved.awaiting else "")
    )

    async def completed() -> records_pb.Erasure | None:
        reply = await story.officer.records.GetErasure(records_pb.GetErasureRequest(erasure_id=requested.erasure_id))
        return reply.erasure if reply.erasure.state == records_pb.ErasureState.ERASURE_STATE_COMPLETED else None

    done = await eventually(
        completed, "every participant's confirmation of the erasure", story.config.anchor_wait_seconds, story.say
    )
    cert = done.certificate
    story.check(
        "erasure completed",
        bool(cert.participants) and all(p.outcome for p in cert.participants),
        f"the patient's keys destroyed in {len([p for p in cert.participants if p.keys])} services "
        f"(crypto-shredding); {cert.records_erased} record(s), {cert.versions_erased} version(s); no backup "
        f"can restore a key after {cert.unrecoverable_after.ToDatetime():%Y-%m-%d}",
    )
    story.result.erasure_certificate = done.signed_certificate
    try:
        certified = open_certificate(done.signed_certificate, story.config.trust_policy.erasure_certificate_keys)
    except InvalidArgument as exc:
        story.check("erasure certificate verified", False, f"refused: {exc.message}")
    else:
        story.check(
            "erasure certificate verified",
            certified.facts["erasure"] == requested.erasure_id,
            "the certificate is a signed note that verifies offline against the trust policy; it says:",
        )
        for line in certified.describe():
            story.say.say(line.strip())
    if story.break_glass_access_id:
        reply = await story.officer.consent.GetBreakGlassAccess(
            consent_pb.GetBreakGlassAccessRequest(access_id=story.break_glass_access_id)
        )
        story.check(
            "break-glass justification erased",
            reply.justification == "",
            "consent destroyed its key: the emergency's justification no longer decrypts; the access stays",
        )
    await story.expect(
        "erased record unreadable",
        story.patient.records.GetRecord(records_pb.GetRecordRequest(record_id=story.record_id, purpose=TREAT)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "reading it now fails",
    )
    assert story.result.record_proof is not None
    story.say.say("the proof still verifies: the chain and the log keep hashes, never the record")
    report(
        story,
        "proof verifies after erasure",
        await verify(
            story,
            story.result.record_proof,
            story.result.record_proof.entry,
            record=story.result.record,
            salt_hex=story.result.salt,
        ),
    )
