"""Identity end to end: registration, FHIR checks, tokens and their refusal in another service,
the authorization tables, deactivation, signing-key rotation, and no personal data leaking.

Runs identity and consent as the platform does (real Kafka, real PostgreSQL, a local keyring),
through the SDK's token client.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jwt
import pytest
from aiokafka import AIOKafkaConsumer
from joserfc import jwk as jose_jwk
from joserfc import jwt as jose_jwt
from medledger.anchoring.v1 import anchoring_service_pb2
from medledger.audit.v1 import audit_service_pb2
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
from medledger.identity.v1 import identity_service_pb2 as pb
from medledger.identity.v1 import identity_service_pb2_grpc as pb_grpc
from medledger.records.v1 import records_service_pb2
from medledger.types.v1 import vocabulary_pb2
from sqlalchemy import func, select

from medledger_anchoring import api as anchoring_api
from medledger_audit import api as audit_api
from medledger_consent import api as consent_api
from medledger_devstack.testing import bad_request_fields, status_of
from medledger_identity import api as identity_api
from medledger_identity import domain
from medledger_identity import storage as identity_storage
from medledger_records import api as records_api
from medledger_runtime import events
from medledger_runtime.auth import Access
from medledger_runtime.logs import JsonFormatter
from medledger_runtime.outbox import outbox
from medledger_sdk.channels import make_channel

Kind = vocabulary_pb2.PrincipalKind
Role = vocabulary_pb2.Role
REPO = Path(__file__).resolve().parents[2]
CODE = grpc.StatusCode
# An empty CheckConsent that got past authentication: consent itself refuses the question.
PASSED_AUTH = grpc.StatusCode.INVALID_ARGUMENT
ROLES = ["admin", "org-admin", "privacy-officer", "auditor", "guardian", "pdp-client"]


def patient_json(mrn: str, family: str = "Example", birth_date: str = "1970-01-01") -> bytes:
    return json.dumps(
        {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:oid:2.16.840.1.113883.4.1", "value": mrn}],
            "name": [{"family": family, "given": ["Pat"]}],
            "gender": "female",
            "birthDate": birth_date,
        }
    ).encode()


def practitioner_json(npi: str) -> bytes:
    return json.dumps(
        {
            "resourceType": "Practitioner",
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": npi}],
            "name": [{"family": "Practitioner"}],
        }
    ).encode()


def rid() -> str:
    return str(uuid.uuid4())


class Platform:
    """Calls made the way a client makes them: the SDK token client, one principal at a time."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack
        self.public = pb_grpc.IdentityServiceStub(make_channel(stack.identity_address))
        self.admin = self.identity_as(stack.admin())

    def identity_as(self, client: Any) -> pb_grpc.IdentityServiceStub:
        return pb_grpc.IdentityServiceStub(client.channel(self.stack.identity_address, "medledger.identity"))

    def consent_as(self, client: Any) -> co_grpc.ConsentServiceStub:
        return co_grpc.ConsentServiceStub(client.channel(self.stack.consent_address, "medledger.consent"))

    async def register(self, kind: int, **fields: Any) -> pb.RegisterPrincipalResponse:
        return await self.admin.RegisterPrincipal(pb.RegisterPrincipalRequest(request_id=rid(), kind=kind, **fields))

    async def principal_with(self, *roles: int, kind: int = Kind.PRINCIPAL_KIND_RESEARCHER) -> Any:
        """A new principal holding `roles`, and a token client for it."""
        reply = await self.register(kind)
        for role in roles:
            await self.admin.AssignRole(
                pb.AssignRoleRequest(request_id=rid(), principal_id=reply.principal.principal_id, role=role)
            )
        return self.stack.client(reply.principal.principal_id, reply.client_secret)


async def count(runtime: Any, table: Any) -> int:
    async with runtime.db.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


# -- registration -------------------------------------------------------------------------------


async def test_registration_of_every_kind_and_who_may_do_it(start_stack) -> None:
    async with start_stack(consent=False) as stack:
        p = Platform(stack)
        patient = await p.public.RegisterPatient(
            pb.RegisterPatientRequest(request_id=rid(), fhir_patient=patient_json(uuid.uuid4().hex))
        )
        assert patient.principal.kind == Kind.PRINCIPAL_KIND_PATIENT
        assert patient.principal.principal_id.startswith("pat_")
        assert patient.principal.did.startswith("did:key:z6Mk")
        assert patient.client_secret.startswith("mlsec_")

        org = await p.register(Kind.PRINCIPAL_KIND_ORGANIZATION)
        org_id = org.principal.principal_id
        practitioner = await p.register(
            Kind.PRINCIPAL_KIND_PRACTITIONER, organization_id=org_id, fhir_resource=practitioner_json("1234567893")
        )
        researcher = await p.register(Kind.PRINCIPAL_KIND_RESEARCHER)
        service = await p.register(Kind.PRINCIPAL_KIND_SERVICE)
        admin_patient = await p.register(
            Kind.PRINCIPAL_KIND_PATIENT, fhir_resource=patient_json(uuid.uuid4().hex, family="Other")
        )
        made = [patient, org, practitioner, researcher, service, admin_patient]
        dids = {r.principal.did for r in made}
        assert len(dids) == len(made), "every principal has a key pair of its own"
        for reply in made:
            got = await p.admin.GetPrincipal(pb.GetPrincipalRequest(principal_id=reply.principal.principal_id))
            assert got.principal == reply.principal

        # A practitioner needs a registered organization; other kinds take none.
        for bad in (
            pb.RegisterPrincipalRequest(request_id=rid(), kind=Kind.PRINCIPAL_KIND_PRACTITIONER),
            pb.RegisterPrincipalRequest(
                request_id=rid(),
                kind=Kind.PRINCIPAL_KIND_PRACTITIONER,
                organization_id=researcher.principal.principal_id,
                fhir_resource=practitioner_json(uuid.uuid4().hex),
            ),
            pb.RegisterPrincipalRequest(request_id=rid(), kind=Kind.PRINCIPAL_KIND_RESEARCHER, organization_id=org_id),
            pb.RegisterPrincipalRequest(request_id=rid(), kind=0),
        ):
            assert await status_of(p.admin.RegisterPrincipal(bad)) == CODE.INVALID_ARGUMENT

        # Listing by kind and by organization.
        listed = await p.admin.ListPrincipals(pb.ListPrincipalsRequest(kind=Kind.PRINCIPAL_KIND_PATIENT))
        assert {patient.principal.principal_id, admin_patient.principal.principal_id} <= {
            x.principal_id for x in listed.principals
        }
        assert all(x.kind == Kind.PRINCIPAL_KIND_PATIENT for x in listed.principals)
        in_org = await p.admin.ListPrincipals(pb.ListPrincipalsRequest(organization_id=org_id))
        assert [x.principal_id for x in in_org.principals] == [practitioner.principal.principal_id]
        page = await p.admin.ListPrincipals(pb.ListPrincipalsRequest(page_size=2))
        assert len(page.principals) == 2 and page.next_page_token
        rest = await p.admin.ListPrincipals(pb.ListPrincipalsRequest(page_token=page.next_page_token))
        assert not {x.principal_id for x in page.principals} & {x.principal_id for x in rest.principals}

        # An org-admin registers practitioners of their own organization only.
        await p.admin.AssignRole(
            pb.AssignRoleRequest(
                request_id=rid(), principal_id=practitioner.principal.principal_id, role=Role.ROLE_ORG_ADMIN
            )
        )
        org_admin = p.identity_as(stack.client(practitioner.principal.principal_id, practitioner.client_secret))
        colleague = await org_admin.RegisterPrincipal(
            pb.RegisterPrincipalRequest(
                request_id=rid(),
                kind=Kind.PRINCIPAL_KIND_PRACTITIONER,
                organization_id=org_id,
                fhir_resource=practitioner_json(uuid.uuid4().hex),
            )
        )
        assert colleague.principal.organization_id == org_id
        other_org = await p.register(Kind.PRINCIPAL_KIND_ORGANIZATION)
        for request in (
            pb.RegisterPrincipalRequest(
                request_id=rid(),
                kind=Kind.PRINCIPAL_KIND_PRACTITIONER,
                organization_id=other_org.principal.principal_id,
                fhir_resource=practitioner_json(uuid.uuid4().hex),
            ),
            pb.RegisterPrincipalRequest(request_id=rid(), kind=Kind.PRINCIPAL_KIND_RESEARCHER),
        ):
            assert await status_of(org_admin.RegisterPrincipal(request)) == CODE.PERMISSION_DENIED
        # ...and cannot make anyone an admin.
        grant_admin = pb.AssignRoleRequest(
            request_id=rid(), principal_id=colleague.principal.principal_id, role=Role.ROLE_ADMIN
        )
        assert await status_of(org_admin.AssignRole(grant_admin)) == CODE.PERMISSION_DENIED

        # A FHIR resource is shown to its principal and admins, not to another patient.
        own = p.identity_as(stack.client(patient.principal.principal_id, patient.client_secret))
        mine = await own.GetPrincipal(
            pb.GetPrincipalRequest(principal_id=patient.principal.principal_id, include_fhir_resource=True)
        )
        assert json.loads(mine.fhir_resource)["name"][0]["family"] == "Example"
        theirs = pb.GetPrincipalRequest(principal_id=admin_patient.principal.principal_id, include_fhir_resource=True)
        assert await status_of(own.GetPrincipal(theirs)) == CODE.PERMISSION_DENIED
        assert (await p.admin.GetPrincipal(theirs)).fhir_resource


async def test_duplicate_identifier_is_already_exists(start_stack) -> None:
    async with start_stack(consent=False) as stack:
        p = Platform(stack)
        mrn = uuid.uuid4().hex
        await p.public.RegisterPatient(pb.RegisterPatientRequest(request_id=rid(), fhir_patient=patient_json(mrn)))
        before = await count(stack.identity, identity_storage.principals)
        again = pb.RegisterPatientRequest(request_id=rid(), fhir_patient=patient_json(mrn, family="Someone Else"))
        assert await status_of(p.public.RegisterPatient(again)) == CODE.ALREADY_EXISTS
        by_admin = pb.RegisterPrincipalRequest(
            request_id=rid(), kind=Kind.PRINCIPAL_KIND_PATIENT, fhir_resource=patient_json(mrn)
        )
        assert await status_of(p.admin.RegisterPrincipal(by_admin)) == CODE.ALREADY_EXISTS
        assert await count(stack.identity, identity_storage.principals) == before


async def test_invalid_fhir_is_invalid_argument_with_the_field_and_changes_nothing(start_stack) -> None:
    async with start_stack(consent=False) as stack:
        p = Platform(stack)
        principals = await count(stack.identity, identity_storage.principals)
        rows = await count(stack.identity, outbox)
        resource = json.loads(patient_json("x-1"))
        cases = {
            "fhir_patient.birthDate": {**resource, "birthDate": "1980-02-30"},
            "fhir_patient.gender": {**resource, "gender": "banana"},
            "fhir_patient.identifier": {**resource, "identifier": []},
            "fhir_patient.resourceType": {**resource, "resourceType": "Practitioner"},
            "fhir_patient.colour": {**resource, "colour": "blue"},
        }
        for field, document in cases.items():
            request = pb.RegisterPatientRequest(request_id=rid(), fhir_patient=json.dumps(document).encode())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await p.public.RegisterPatient(request)
            assert err.value.code() == CODE.INVALID_ARGUMENT, field
            assert any(f.startswith(field) for f in bad_request_fields(err.value)), (field, err.value.details())
        for raw in (b"{not json", b"", b" " * (domain.MAX_FHIR_BYTES + 1)):
            request = pb.RegisterPatientRequest(request_id=rid(), fhir_patient=raw)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await p.public.RegisterPatient(request)
            assert err.value.code() == CODE.INVALID_ARGUMENT
            assert "fhir_patient" in bad_request_fields(err.value)
        assert await count(stack.identity, identity_storage.principals) == principals
        assert await count(stack.identity, outbox) == rows, "no event for a refused registration"


# -- tokens in another service --------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_tokens_round_trip_and_bad_tokens_are_unauthenticated_in_another_service(start_stack) -> None:
    async with start_stack() as stack:
        p = Platform(stack)
        client = await p.principal_with(Role.ROLE_PDP_CLIENT)
        consent = p.consent_as(client)
        # Authenticated and allowed: the call reaches consent, which refuses the empty question.
        assert await status_of(consent.CheckConsent(co_pb.CheckConsentRequest())) == PASSED_AUTH
        token = await client.token("medledger.consent")
        header = jwt.get_unverified_header(token)
        assert header["alg"] == "EdDSA" and header["kid"].startswith("identity-token-signing.v")
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["iss"] == "medledger.identity" and claims["aud"] == "medledger.consent"
        assert claims["roles"] == ["pdp-client"] and claims["kind"] == "researcher"
        assert claims["exp"] - claims["iat"] <= 15 * 60

        no_role = p.consent_as(await p.principal_with())
        assert await status_of(no_role.CheckConsent(co_pb.CheckConsentRequest())) == CODE.PERMISSION_DENIED
        async with make_channel(stack.consent_address) as channel:
            bare = co_grpc.ConsentServiceStub(channel)
            assert await status_of(bare.CheckConsent(co_pb.CheckConsentRequest())) == CODE.UNAUTHENTICATED

        signer = stack.identity.handle.tokens.signer
        now = int(time.time())
        good = {**claims, "iat": now, "nbf": now, "exp": now + 600, "jti": uuid.uuid4().hex}
        public_jwk = (await signer.jwks())["keys"][-1]
        public_raw = base64.urlsafe_b64decode(public_jwk["x"] + "==")
        signing_input, _, signature = token.rpartition(".")
        tampered_claims = {**claims, "roles": ["admin", "pdp-client"]}
        bad_tokens = {
            "expired": await signer.sign({**good, "iat": now - 3600, "nbf": now - 3600, "exp": now - 120}),
            "not yet valid": await signer.sign({**good, "nbf": now + 300}),
            "wrong issuer": await signer.sign({**good, "iss": "https://evil.example"}),
            "wrong audience": await signer.sign({**good, "aud": "medledger.records"}),
            "alg none": f"{_b64url(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}."
            f"{_b64url(json.dumps(good).encode())}.",
            "HS256 keyed with the public key": jwt.encode(
                good, public_raw, algorithm="HS256", headers={"kid": header["kid"]}
            ),
            "forged signature": f"{signing_input}.{_b64url(bytes(64))}",
            "tampered claims": signing_input.split(".")[0]
            + "."
            + _b64url(json.dumps(tampered_claims).encode())
            + "."
            + signature,
            "unknown kid": await _with_header(signer, good, kid="identity-token-signing.v99"),
            "garbage": "not.a.token",
        }
        # The genuine token signed the same way is accepted: the refusals are about the flaw.
        assert await consent_answer(stack, await signer.sign(good)) == PASSED_AUTH
        for what, bad in bad_tokens.items():
            assert await consent_answer(stack, bad) == CODE.UNAUTHENTICATED, what


async def _with_header(signer: Any, claims: dict, kid: str) -> str:
    signing_input = domain.jws_signing_input({"alg": "EdDSA", "typ": "JWT", "kid": kid}, claims)
    signature = await signer.keys.sign(signer.key_name, signing_input, marshaling="jws")
    return domain.jws_compact(signing_input, signature.jws())


async def consent_answer(stack: Any, token: str) -> grpc.StatusCode:
    """The status consent answers a call that carries `token`."""
    async with make_channel(stack.consent_address) as channel:
        stub = co_grpc.ConsentServiceStub(channel)
        return await status_of(
            stub.CheckConsent(co_pb.CheckConsentRequest(), metadata=(("authorization", f"Bearer {token}"),))
        )


async def test_issue_token_refuses_wrong_secrets_and_unknown_audiences(start_stack) -> None:
    async with start_stack(consent=False) as stack:
        p = Platform(stack)
        reply = await p.register(Kind.PRINCIPAL_KIND_RESEARCHER)
        pid, secret = reply.principal.principal_id, reply.client_secret
        issue = p.public.IssueToken
        ok = await issue(pb.IssueTokenRequest(principal_id=pid, client_secret=secret, audience="medledger.records"))
        assert ok.token_type == "Bearer" and ok.expires_at.seconds - time.time() <= 15 * 60 + 5
        for request, code in (
            (pb.IssueTokenRequest(principal_id=pid, client_secret=secret + "x", audience="medledger.records"),
             CODE.UNAUTHENTICATED),
            (pb.IssueTokenRequest(principal_id="rsr_" + "0" * 32, client_secret=secret, audience="medledger.records"),
             CODE.UNAUTHENTICATED),
            (pb.IssueTokenRequest(principal_id=pid, client_secret=secret, audience="medledger.elsewhere"),
             CODE.INVALID_ARGUMENT),
        ):  # fmt: skip
            assert await status_of(issue(request)) == code


# -- the authorization tables -----------------------------------------------------------------------

_TABLE_ROW = re.compile(r"^\|\s*([A-Z][A-Za-z]+)\s*\|(.*)\|\s*$")


def readme_table(service: str) -> tuple[dict[str, Access], set[str]]:
    """The authorization table of services/<service>/README.md, as Access rules and public RPCs."""
    lines = (REPO / "services" / service / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "## Authorization")
    header: list[str] = []
    access: dict[str, Access] = {}
    public: set[str] = set()
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break  # the next section: its tables are not the authorization table
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "RPC":
            header = cells
            continue
        if set(cells[0]) <= {"-"}:
            continue
        marked = {header[i] for i, c in enumerate(cells) if c == "✓"}
        rpc = cells[0]
        if "public" in marked:
            public.add(rpc)
            continue
        kinds = {
            m
            for m in marked
            if m in ("service", "practitioner", "patient", "researcher", "organization", "smart-client")
        }
        roles = marked - kinds - {"any caller"}
        access[rpc] = Access() if "any caller" in marked else Access.of(roles=roles, kinds=kinds)
    return access, public


@pytest.mark.parametrize(
    ("service", "module", "descriptor"),
    [
        ("identity", identity_api, pb.DESCRIPTOR.services_by_name["IdentityService"]),
        ("consent", consent_api, co_pb.DESCRIPTOR.services_by_name["ConsentService"]),
        ("records", records_api, records_service_pb2.DESCRIPTOR.services_by_name["RecordsService"]),
        ("audit", audit_api, audit_service_pb2.DESCRIPTOR.services_by_name["AuditService"]),
        ("anchoring", anchoring_api, anchoring_service_pb2.DESCRIPTOR.services_by_name["AnchoringService"]),
    ],
)
def test_the_code_applies_the_readme_authorization_table(service: str, module: Any, descriptor: Any) -> None:
    table, public = readme_table(service)
    prefix = f"/{descriptor.full_name}/"
    assert {m.name for m in descriptor.methods} == set(table) | public, "every RPC is in the README table"
    assert {prefix + m for m in public} == set(module.PUBLIC_METHODS)
    assert {prefix + rpc: rule for rpc, rule in table.items()} == module.ACCESS


# Requests that get past the interceptor for every RPC that has an access rule.
def _requests(target: str) -> dict[str, Any]:
    return {
        "RegisterPrincipal": pb.RegisterPrincipalRequest(request_id=rid(), kind=Kind.PRINCIPAL_KIND_RESEARCHER),
        "GetPrincipal": pb.GetPrincipalRequest(principal_id=target),
        "FindPrincipals": pb.FindPrincipalsRequest(
            kind=Kind.PRINCIPAL_KIND_PRACTITIONER, identifier="http://hl7.org/fhir/sid/us-npi|0"
        ),
        "ListPrincipals": pb.ListPrincipalsRequest(),
        "UpdatePrincipalResource": pb.UpdatePrincipalResourceRequest(request_id=rid(), principal_id=target),
        "DeactivatePrincipal": pb.DeactivatePrincipalRequest(request_id=rid(), principal_id="rsr_" + "0" * 32),
        "ListDeactivatedPrincipals": pb.ListDeactivatedPrincipalsRequest(),
        "AssignRole": pb.AssignRoleRequest(request_id=rid(), principal_id=target, role=Role.ROLE_GUARDIAN),
        "RevokeRole": pb.RevokeRoleRequest(request_id=rid(), principal_id=target, role=Role.ROLE_GUARDIAN),
        "RegisterSmartClient": pb.RegisterSmartClientRequest(request_id=rid()),
        "RotateSigningKey": pb.RotateSigningKeyRequest(request_id=rid()),
    }


async def test_the_identity_authorization_table_holds_for_every_rpc(start_stack) -> None:
    table, _ = readme_table("identity")
    async with start_stack(consent=False) as stack:
        p = Platform(stack)
        target = (await p.register(Kind.PRINCIPAL_KIND_RESEARCHER)).principal.principal_id
        callers: dict[str, Any] = {"no role": await p.principal_with()}
        for name in ROLES:
            callers[name] = await p.principal_with(vocabulary_pb2.Role.Value("ROLE_" + name.upper().replace("-", "_")))
        callers["service"] = await p.principal_with(kind=Kind.PRINCIPAL_KIND_SERVICE)
        kinds = {"service": "service"}
        for who, client in callers.items():
            stub = p.identity_as(client)
            for rpc, request in _requests(target).items():
                rule = table[rpc]
                roles = {who} if who in ROLES else set()
                allowed = (
                    (not rule.roles and not rule.kinds) or bool(roles & rule.roles) or kinds.get(who) in rule.kinds
                )
                try:
                    await getattr(stub, rpc)(request)
                    refused_by_table = False
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() != CODE.UNAUTHENTICATED, (who, rpc, exc.details())
                    refused_by_table = exc.details() == "the caller's roles do not allow this call"
                assert refused_by_table != allowed, (who, rpc)
        # Public RPCs answer without a token.
        assert (await p.public.GetJwks(pb.GetJwksRequest())).jwks_json


async def test_the_consent_authorization_table_holds_for_every_rpc(start_stack) -> None:
    """Every consent RPC, called by each role and each principal kind with an empty request: the
    interceptor refuses exactly whom the README table leaves out (a handler may refuse too, but
    with its own reason, never the table's)."""
    table, _ = readme_table("consent")
    descriptor = co_pb.DESCRIPTOR.services_by_name["ConsentService"]
    async with start_stack() as stack:
        p = Platform(stack)
        callers: dict[str, Any] = {"no role": await p.principal_with()}
        for name in ROLES:
            callers[name] = await p.principal_with(vocabulary_pb2.Role.Value("ROLE_" + name.upper().replace("-", "_")))
        callers["service"] = await p.principal_with(kind=Kind.PRINCIPAL_KIND_SERVICE)
        org_id = (await p.register(Kind.PRINCIPAL_KIND_ORGANIZATION)).principal.principal_id
        practitioner = await p.register(
            Kind.PRINCIPAL_KIND_PRACTITIONER, organization_id=org_id, fhir_resource=practitioner_json("1234567893")
        )
        callers["practitioner"] = stack.client(practitioner.principal.principal_id, practitioner.client_secret)
        patient = await p.public.RegisterPatient(
            pb.RegisterPatientRequest(request_id=rid(), fhir_patient=patient_json(uuid.uuid4().hex))
        )
        callers["patient"] = stack.client(patient.principal.principal_id, patient.client_secret)
        kinds = {"service": "service", "practitioner": "practitioner", "patient": "patient"}
        for who, client in callers.items():
            stub = p.consent_as(client)
            for method in descriptor.methods:
                rule = table[method.name]
                roles = {who} if who in ROLES else set()
                allowed = (
                    (not rule.roles and not rule.kinds) or bool(roles & rule.roles) or kinds.get(who) in rule.kinds
                )
                request = getattr(co_pb, method.input_type.name)()
                try:
                    await getattr(stub, method.name)(request)
                    refused_by_table = False
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() != CODE.UNAUTHENTICATED, (who, method.name, exc.details())
                    refused_by_table = exc.details() == "the caller's roles do not allow this call"
                assert refused_by_table != allowed, (who, method.name)


# -- deactivation and rotation ----------------------------------------------------------------------


async def test_a_deactivated_principals_token_is_refused_by_another_service(start_stack) -> None:
    async with start_stack() as stack:
        p = Platform(stack)
        client = await p.principal_with(Role.ROLE_PDP_CLIENT)
        consent = p.consent_as(client)
        assert await status_of(consent.CheckConsent(co_pb.CheckConsentRequest())) == PASSED_AUTH
        token = await client.token("medledger.consent")
        started = time.monotonic()
        await p.admin.DeactivatePrincipal(
            pb.DeactivatePrincipalRequest(request_id=rid(), principal_id=client.principal_id)
        )
        while await consent_answer(stack, token) != CODE.UNAUTHENTICATED:
            assert time.monotonic() - started < 10, "consent still accepts the token after 10 s"
            await asyncio.sleep(0.02)
        print(f"deactivation reached consent in {time.monotonic() - started:.3f} s")
        issue = pb.IssueTokenRequest(principal_id=client.principal_id, client_secret="x", audience="medledger.consent")
        assert await status_of(p.public.IssueToken(issue)) == CODE.UNAUTHENTICATED
        # A service started later loads the deactivation before it serves.
        assert (
            client.principal_id
            in (await p.admin.ListDeactivatedPrincipals(pb.ListDeactivatedPrincipalsRequest())).principal_ids
        )


async def test_rotation_keeps_older_tokens_valid_until_they_expire(start_stack) -> None:
    async with start_stack() as stack:
        p = Platform(stack)
        client = await p.principal_with(Role.ROLE_PDP_CLIENT)
        before = await client.token("medledger.consent")
        assert await consent_answer(stack, before) == PASSED_AUTH
        kid = (await p.admin.RotateSigningKey(pb.RotateSigningKeyRequest(request_id=rid()))).kid
        assert kid.endswith(".v2")
        reply = await p.public.IssueToken(
            pb.IssueTokenRequest(
                principal_id=client.principal_id,
                client_secret=(await _secret_of(p, client)),
                audience="medledger.consent",
            )
        )
        after = reply.access_token
        assert jwt.get_unverified_header(after)["kid"] == kid
        started = time.monotonic()
        while await consent_answer(stack, after) != PASSED_AUTH:
            assert time.monotonic() - started < 10, "consent does not accept tokens of the new key"
            await asyncio.sleep(0.05)
        assert await consent_answer(stack, before) == PASSED_AUTH
        kids = [k["kid"] for k in json.loads((await p.public.GetJwks(pb.GetJwksRequest())).jwks_json)["keys"]]
        assert kids == ["identity-token-signing.v1", "identity-token-signing.v2"]
        port = stack.identity.http_port
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/.well-known/jwks.json") as response,
        ):
            assert response.status == 200
            assert [k["kid"] for k in json.loads(await response.text())["keys"]] == kids


async def _secret_of(p: Platform, client: Any) -> str:
    return client.link._secret


# -- no personal data -------------------------------------------------------------------------------


async def test_no_personal_data_or_secret_in_logs_or_events(start_stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    family, birth, mrn = "Zyxwvutsrq", "1951-07-13", "MRN-" + uuid.uuid4().hex
    async with start_stack() as stack:
        p = Platform(stack)
        reply = await p.public.RegisterPatient(
            pb.RegisterPatientRequest(request_id=rid(), fhir_patient=patient_json(mrn, family=family, birth_date=birth))
        )
        client = stack.client(reply.principal.principal_id, reply.client_secret)
        token = await client.token("medledger.consent")
        await status_of(
            p.public.RegisterPatient(pb.RegisterPatientRequest(request_id=rid(), fhir_patient=patient_json(mrn)))
        )
        bad = json.loads(patient_json(mrn, family=family, birth_date="1951-02-30"))
        await status_of(
            p.public.RegisterPatient(pb.RegisterPatientRequest(request_id=rid(), fhir_patient=json.dumps(bad).encode()))
        )
        await consent_answer(stack, token + "x")
        await p.admin.UpdatePrincipalResource(
            pb.UpdatePrincipalResourceRequest(
                request_id=rid(),
                principal_id=reply.principal.principal_id,
                fhir_resource=patient_json(mrn, family=family, birth_date=birth),
            )
        )
        await asyncio.sleep(1.0)  # let the relay publish
        consumer = AIOKafkaConsumer(
            events.TOPICS["identity"], bootstrap_servers=stack.identity.settings.kafka_bootstrap_servers,
            auto_offset_reset="earliest", group_id=None,
        )  # fmt: skip
        await consumer.start()
        published = []
        try:
            for records in (await consumer.getmany(timeout_ms=2000)).values():
                published += [r.value for r in records]
        finally:
            await consumer.stop()
    assert published, "the scan needs events to look at"
    formatter = JsonFormatter("tests")
    logs = "\n".join(formatter.format(r) for r in caplog.records)
    assert logs, "the scan needs logs to look at"
    forbidden = {
        "family name": family,
        "birth date": birth,
        "identifier": mrn,
        "client secret": reply.client_secret,
        "admin secret": stack.admin_secret,
        "token": token,
        "token signature": token.rsplit(".", 1)[1],
    }
    haystacks = {"logs": logs.encode(), "events": b"\n".join(published)}
    for where, data in haystacks.items():
        for what, needle in forbidden.items():
            assert needle.encode() not in data, f"{what} found in {where}"
    async with stack.identity.db.connect() as conn:
        stored = (await conn.execute(select(identity_storage.P.fhir_resource))).scalars().all()
    assert all(family not in (s or "") for s in stored), "FHIR resources are stored encrypted"


# -- SMART on FHIR ----------------------------------------------------------------------------------


async def test_a_smart_client_gets_a_token_at_the_running_token_endpoint_and_uses_it(start_stack) -> None:
    """RegisterSmartClient, then POST /oauth2/token on identity's HTTP port with an ES384
    assertion addressed to the default endpoint URL; the scoped token is accepted by identity
    (one of its audiences), and the assertion cannot be used twice."""
    async with start_stack(consent=False) as stack:
        p = Platform(stack)
        org_id = (await p.register(Kind.PRINCIPAL_KIND_ORGANIZATION)).principal.principal_id
        npi = uuid.uuid4().hex
        doctor = await p.register(
            Kind.PRINCIPAL_KIND_PRACTITIONER, organization_id=org_id, fhir_resource=practitioner_json(npi)
        )
        key = jose_jwk.ECKey.generate_key("P-384", parameters={"kid": "k1"}, private=True)
        client = (
            await p.admin.RegisterSmartClient(
                pb.RegisterSmartClientRequest(
                    request_id=rid(),
                    organization_id=org_id,
                    jwks_json=json.dumps({"keys": [key.as_dict(private=False)]}),
                    allowed_scopes=["system/Practitioner.rs"],
                )
            )
        ).principal
        assert client.kind == Kind.PRINCIPAL_KIND_SMART_CLIENT and client.principal_id.startswith("cli_")

        url = f"http://127.0.0.1:{stack.identity.http_port}/oauth2/token"
        now = int(time.time())
        claims = {"iss": client.principal_id, "sub": client.principal_id, "aud": url, "exp": now + 120,
                  "jti": uuid.uuid4().hex}  # fmt: skip
        form = {
            "grant_type": "client_credentials",
            "scope": "system/Practitioner.cruds system/Observation.rs",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": jose_jwt.encode({"alg": "ES384", "kid": "k1"}, claims, key, algorithms=["ES384"]),
        }
        async with aiohttp.ClientSession() as http:
            async with http.post(url, data=form) as response:
                assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
                body = await response.json()
            async with http.post(url, data=form) as replay:
                assert replay.status == 401 and (await replay.json())["error"] == "invalid_client"
        assert body["scope"] == "system/Practitioner.rs" and body["expires_in"] == 300

        identity = pb_grpc.IdentityServiceStub(make_channel(stack.identity_address))
        found = await identity.FindPrincipals(
            pb.FindPrincipalsRequest(
                kind=Kind.PRINCIPAL_KIND_PRACTITIONER, identifier=f"http://hl7.org/fhir/sid/us-npi|{npi}"
            ),
            metadata=(("authorization", f"Bearer {body['access_token']}"),),
        )
        assert [f.principal_id for f in found.principals] == [doctor.principal.principal_id]


async def test_a_patients_demographics_go_to_a_practitioner_consent_permits(start_stack) -> None:
    """GetPrincipal asks the running consent service, as identity's own principal (pdp-client)."""
    async with start_stack() as stack:
        p = Platform(stack)
        patient = await p.public.RegisterPatient(
            pb.RegisterPatientRequest(request_id=rid(), fhir_patient=patient_json(uuid.uuid4().hex))
        )
        patient_id = patient.principal.principal_id
        org_id = (await p.register(Kind.PRINCIPAL_KIND_ORGANIZATION)).principal.principal_id
        doctors = [
            await p.register(
                Kind.PRINCIPAL_KIND_PRACTITIONER,
                organization_id=org_id,
                fhir_resource=practitioner_json(uuid.uuid4().hex),
            )
            for _ in range(2)
        ]
        await stack.known_to_consent(patient_id, org_id, *(d.principal.principal_id for d in doctors))
        treat = vocabulary_pb2.PurposeOfUse.PURPOSE_OF_USE_TREAT
        await p.consent_as(stack.client(patient_id, patient.client_secret)).GrantConsent(
            co_pb.GrantConsentRequest(
                request_id=rid(),
                patient_id=patient_id,
                grantee_id=doctors[0].principal.principal_id,
                provision=co_pb.ProvisionType.PROVISION_TYPE_PERMIT,
                actions=[vocabulary_pb2.Action.ACTION_READ],
                categories=[vocabulary_pb2.DataCategory.DATA_CATEGORY_DEMOGRAPHICS],
                purposes=[treat],
            )
        )
        read = pb.GetPrincipalRequest(principal_id=patient_id, include_fhir_resource=True, purpose=treat)
        permitted = p.identity_as(stack.client(doctors[0].principal.principal_id, doctors[0].client_secret))
        got = await permitted.GetPrincipal(read)
        assert json.loads(got.fhir_resource)["name"][0]["family"] == "Example"
        refused = p.identity_as(stack.client(doctors[1].principal.principal_id, doctors[1].client_secret))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await refused.GetPrincipal(read)
        assert raised.value.code() == CODE.PERMISSION_DENIED and "consent denies it" in (raised.value.details() or "")
