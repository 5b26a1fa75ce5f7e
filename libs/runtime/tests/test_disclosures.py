"""Disclosures (medledger_runtime.disclosures): which RPCs answer with personal data, read from the
services' protos; which answers are disclosures and whom they concern; and the interceptor, on
SQLite: the event is in the outbox when the answer comes back, and a refusal writes nothing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from medledger.audit.v1 import audit_service_pb2 as au_pb
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.events.v1.disclosure_events_pb2 import PersonalDataDisclosed
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.records.v1 import records_service_pb2 as rec_pb
from sqlalchemy import select

from medledger_runtime import disclosures
from medledger_runtime.auth.callers import Caller, acting_as
from medledger_runtime.db import Database
from medledger_runtime.errors import PermissionDenied
from medledger_runtime.events import decode, unpack
from medledger_runtime.group_commit import OutboxGroupCommit
from medledger_runtime.outbox import COMMON_MIGRATIONS, outbox

PATIENT = "pat_" + "1" * 32
OTHER = "pat_" + "2" * 32
DOCTOR = "prn_" + "3" * 32
GET_CONSENT = "/medledger.consent.v1.ConsentService/GetConsent"


def caller(principal_id: str) -> Caller:
    return Caller(principal_id, "practitioner", frozenset(), "", "tok", time.time() + 60)


def test_the_rpcs_answering_with_personal_data_are_read_from_the_protos() -> None:
    services = [
        id_pb.DESCRIPTOR.services_by_name["IdentityService"],
        co_pb.DESCRIPTOR.services_by_name["ConsentService"],
        rec_pb.DESCRIPTOR.services_by_name["RecordsService"],
        au_pb.DESCRIPTOR.services_by_name["AuditService"],
    ]
    assert set(disclosures.disclosing_methods(services)) == {
        "/medledger.identity.v1.IdentityService/GetPrincipal",
        GET_CONSENT,
        "/medledger.consent.v1.ConsentService/ListConsents",
        "/medledger.consent.v1.ConsentService/GetBreakGlassAccess",
        "/medledger.consent.v1.ConsentService/GetDecision",
        "/medledger.records.v1.RecordsService/GetRecord",
        "/medledger.records.v1.RecordsService/ExportRecords",
        # FoundRecord.content, one message down: the walk looks into nested messages.
        "/medledger.records.v1.RecordsService/SearchRecords",
        "/medledger.audit.v1.AuditService/ListEntries",
        "/medledger.audit.v1.AuditService/ExportAuditEvents",
    }
    # Pseudonymous ids alone are not content: a principal without its resource. A decision is,
    # as a consent's terms are: whose data, which category, for whom and why.
    assert not disclosures.carries_content(id_pb.ListPrincipalsResponse.DESCRIPTOR)
    assert disclosures.carries_content(co_pb.GetDecisionResponse.DESCRIPTOR)


def test_an_answer_is_a_disclosure_only_when_it_holds_personal_data() -> None:
    principal = id_pb.Principal(principal_id=PATIENT)
    assert not disclosures.discloses(id_pb.GetPrincipalResponse(principal=principal))
    assert disclosures.discloses(id_pb.GetPrincipalResponse(principal=principal, fhir_resource=b"{}"))
    assert not disclosures.discloses(co_pb.ListConsentsResponse(next_page_token="x"))
    assert disclosures.discloses(co_pb.ListConsentsResponse(consents=[co_pb.Consent(consent_id="c")]))


def test_the_patients_are_those_the_answer_names_then_the_request_then_a_patient_caller() -> None:
    listing = co_pb.ListConsentsResponse(
        consents=[co_pb.Consent(consent_id="c1", patient_id=PATIENT), co_pb.Consent(consent_id="c2", patient_id=OTHER)]
    )
    assert disclosures.patients_named(listing) == [PATIENT, OTHER]
    # A principal id is a patient's only when it is a patient's.
    assert disclosures.patients_named(id_pb.GetPrincipalResponse(principal=id_pb.Principal(principal_id=DOCTOR))) == []

    def events(actor: str, request: Any, response: Any) -> list[PersonalDataDisclosed]:
        made = disclosures.disclosure_events(
            source="medledger.test", method="/m", actor_id=actor, request=request, response=response
        )
        return [unpack(e, PersonalDataDisclosed) for _, e in made]  # type: ignore[misc]

    entries = au_pb.ListEntriesResponse(entries=[au_pb.LogEntry(entry=b"{}")])
    by_auditor = events("aud_1", au_pb.ListEntriesRequest(patient_id=PATIENT, actor_id=DOCTOR), entries)
    assert [(e.patient_id, list(e.resource_ids)) for e in by_auditor] == [(PATIENT, [DOCTOR])]
    assert [e.patient_id for e in events(PATIENT, au_pb.ListEntriesRequest(), entries)] == [PATIENT]
    assert [e.patient_id for e in events("aud_1", au_pb.ListEntriesRequest(), entries)] == [""]
    two = events(DOCTOR, co_pb.ListConsentsRequest(grantee_id=DOCTOR), listing)
    assert [e.patient_id for e in two] == [PATIENT, OTHER] and all(e.actor_id == DOCTOR for e in two)


def test_a_guardians_read_for_the_patient_names_the_patient_as_on_whose_behalf() -> None:
    listing = co_pb.ListConsentsResponse(
        consents=[co_pb.Consent(consent_id="c1", patient_id=PATIENT), co_pb.Consent(consent_id="c2", patient_id=OTHER)]
    )
    made = disclosures.disclosure_events(
        source="medledger.test",
        method="/m",
        actor_id="prn_guardian",
        request=co_pb.ListConsentsRequest(),
        response=listing,
        guardian_of=PATIENT,
    )
    read = [unpack(e, PersonalDataDisclosed) for _, e in made]  # type: ignore[misc]
    # Only for the patient the guardian acted for: another patient's data in the answer is not.
    assert [(e.patient_id, e.on_behalf_of) for e in read] == [(PATIENT, PATIENT), (OTHER, "")]
    plain = disclosures.disclosure_events(
        source="medledger.test", method="/m", actor_id=DOCTOR, request=co_pb.ListConsentsRequest(), response=listing
    )
    assert all(not unpack(e, PersonalDataDisclosed).on_behalf_of for _, e in plain)  # type: ignore[attr-defined]


def test_a_patients_id_is_never_a_resource_id() -> None:
    asked = id_pb.GetPrincipalRequest(principal_id=PATIENT, include_fhir_resource=True)
    assert disclosures.resources_asked(asked) == []
    assert disclosures.resources_asked(co_pb.ListConsentsRequest(patient_id=PATIENT)) == []
    assert disclosures.resources_asked(co_pb.GetConsentRequest(consent_id="con_1")) == ["con_1"]


@pytest.fixture
async def db(tmp_path: Path):  # type: ignore[no-untyped-def]
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/d.db")
    await database.migrate("common", COMMON_MIGRATIONS)
    yield database
    await database.close()


async def _outbox(db: Database) -> list[PersonalDataDisclosed]:
    async with db.connect() as conn:
        values = (await conn.execute(select(outbox.c.value).order_by(outbox.c.id))).scalars().all()
    return [unpack(decode(bytes(v)), PersonalDataDisclosed) for v in values]  # type: ignore[misc]


async def test_the_interceptor_answers_only_once_the_disclosure_is_in_the_outbox(db: Database) -> None:
    commit = OutboxGroupCommit(db, what="the disclosure")
    writer = asyncio.create_task(commit.run())
    interceptor = disclosures.DisclosureInterceptor(
        commit, source="medledger.consent", topic="medledger.consent.v1", methods=[GET_CONSENT]
    )
    answered: list[Any] = []

    async def get_consent(request: Any, context: Any) -> Any:
        if request.consent_id == "con_refused":
            raise PermissionDenied("not a party to this consent")
        return co_pb.GetConsentResponse(consent=co_pb.Consent(consent_id=request.consent_id, patient_id=PATIENT))

    behavior = interceptor.wrap(GET_CONSENT, get_consent)
    assert behavior is not None and interceptor.wrap("/other/Method", get_consent) is None
    try:
        with acting_as(caller(DOCTOR)):
            with pytest.raises(PermissionDenied):
                await behavior(co_pb.GetConsentRequest(consent_id="con_refused"), None)
            assert await _outbox(db) == []
            answered.append(await behavior(co_pb.GetConsentRequest(consent_id="con_1"), None))
            # Read straight after the answer: the event is already committed.
            [written] = await _outbox(db)
            assert (written.actor_id, written.patient_id, written.method) == (DOCTOR, PATIENT, GET_CONSENT)
            assert list(written.resource_ids) == ["con_1"]
    finally:
        writer.cancel()
        await commit.close()
    assert answered[0].consent.consent_id == "con_1"
