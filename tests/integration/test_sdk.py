"""The SDK's Medledger client against running identity and consent: each stub carries a token for
its own service, a patient registers anonymously, invalid FHIR is an RpcError naming the field,
a retried registration (the same request id) is one principal, and pages reach every principal."""

from __future__ import annotations

import json
import uuid
from typing import Any

import grpc
import pytest
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.identity.v1 import identity_service_pb2 as pb
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_identity import main as identity_main
from medledger_sdk.calls import RpcError, pages
from medledger_sdk.client import Endpoints, Medledger


def patient_json(**extra: Any) -> bytes:
    return json.dumps(
        {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": uuid.uuid4().hex}], **extra}
    ).encode()


async def test_the_sdk_client_calls_identity_and_consent_as_a_principal(start_stack: Any) -> None:
    async with start_stack() as stack:
        endpoints = Endpoints(identity=stack.identity_address, consent=stack.consent_address)
        async with Medledger(endpoints) as anonymous:
            request = pb.RegisterPatientRequest(request_id=str(uuid.uuid4()), fhir_patient=patient_json())
            patient = await anonymous.identity.RegisterPatient(request)
            again = await anonymous.identity.RegisterPatient(request)
            assert again.principal.principal_id == patient.principal.principal_id, "a retry is the first result"
            with pytest.raises(RpcError) as raised:
                await anonymous.identity.RegisterPatient(
                    pb.RegisterPatientRequest(request_id=str(uuid.uuid4()), fhir_patient=patient_json(gender="banana"))
                )
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert [v.field for v in raised.value.field_violations] == ["fhir_patient.gender"]
            with pytest.raises(RpcError) as raised:
                await anonymous.identity.ListPrincipals(pb.ListPrincipalsRequest())
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED

        async with Medledger(
            endpoints, principal_id=identity_main.BOOTSTRAP_ADMIN, client_secret=stack.admin_secret
        ) as admin:
            made = []
            for _ in range(5):
                reply = await admin.identity.RegisterPrincipal(
                    pb.RegisterPrincipalRequest(
                        request_id=str(uuid.uuid4()), kind=vocab.PrincipalKind.PRINCIPAL_KIND_RESEARCHER
                    )
                )
                made.append(reply.principal.principal_id)
            researchers = pb.ListPrincipalsRequest(kind=vocab.PrincipalKind.PRINCIPAL_KIND_RESEARCHER)
            listed = [p.principal_id async for p in pages(admin.identity.ListPrincipals, researchers, "principals",
                                                          page_size=2)]  # fmt: skip
            assert sorted(listed) == sorted(made)
            # The consent stub's token is for consent: the admin reads the patient's (empty) consents.
            await stack.known_to_consent(patient.principal.principal_id)
            consents = await admin.consent.ListConsents(
                co_pb.ListConsentsRequest(patient_id=patient.principal.principal_id)
            )
            assert list(consents.consents) == []
            assert (await admin.token("consent")) != (await admin.token("identity"))
