"""Access control across the whole platform, against one live stack (identity, consent, records,
audit and anchoring on PostgreSQL, Tansu and Anvil):

- every service's README authorization table, parsed by one parser and held against its proto;
- every RPC of every service x every principal kind and role x (own patient, other patient) where
  the request names one: the interceptor refuses exactly whom the table leaves out, and the API's
  finer rules then tell the own patient from another, and the own organization from another;
- expired, other-audience, forged (another key, a flipped signature, alg none, HS256 keyed with
  the public key) and deactivated-principal tokens, on every service;
- a consent revoked while its grantee reads: no read started after the revocation answered
  succeeds; revoked by several callers at once, it is revoked once, and every one of them is
  answered.

A genuinely expired token is signed by identity's own signer (the service runs in this process;
its key manager signs, the key never leaves it): identity has no token-lifetime setting.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf import message as pb_message
from medledger.anchoring.v1 import anchoring_service_pb2 as an_pb
from medledger.anchoring.v1 import anchoring_service_pb2_grpc as an_grpc
from medledger.audit.v1 import audit_service_pb2 as au_pb
from medledger.audit.v1 import audit_service_pb2_grpc as au_grpc
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.consent.v1 import consent_service_pb2_grpc as co_grpc
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.identity.v1 import identity_service_pb2_grpc as id_grpc
from medledger.records.v1 import records_service_pb2 as rec_pb
from medledger.records.v1 import records_service_pb2_grpc as rec_grpc
from medledger.types.v1 import vocabulary_pb2 as vocab

from medledger_devstack import synthetic
from medledger_devstack.testing import Anvil, Postgres
from medledger_sdk.auth import TokenClient
from medledger_sdk.channels import make_channel

REPO = Path(__file__).resolve().parents[2]
CODE = grpc.StatusCode
Kind = vocab.PrincipalKind
Role = vocab.Role
OBS = vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS
TREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT
RESEARCH = vocab.PurposeOfUse.PURPOSE_OF_USE_HRESCH
READ, WRITE = vocab.Action.ACTION_READ, vocab.Action.ACTION_WRITE
PERMIT = co_pb.ProvisionType.PROVISION_TYPE_PERMIT

SERVICES = ("identity", "consent", "records", "audit", "anchoring")
ROLES = ("admin", "org-admin", "privacy-officer", "auditor", "guardian", "pdp-client")
KINDS = ("patient", "practitioner", "organization", "researcher", "service")
# SMART clients get tokens only at identity's OAuth endpoint, not by secret: a column of the
# tables, not a caller of the matrix.
COLUMNS = {"RPC", "public", "any caller", "finer rule", *ROLES, *KINDS, "smart-client"}

# How the interceptor (medledger_runtime.auth.AuthInterceptor) words its PERMISSION_DENIED; the
# API's finer rules word theirs otherwise, so a refusal tells which of the two made it.
INTERCEPTOR_DENIALS = frozenset({"the caller's roles do not allow this call", "no access rule for this call"})
NO_TOKEN = "this call needs an access token (authorization: Bearer …)"


def rid() -> str:
    return str(uuid.uuid4())


# -- the README tables ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """One service's authorization table: the columns ticked for each RPC."""

    service: str
    columns: tuple[str, ...]
    ticks: dict[str, frozenset[str]]
    finer: dict[str, str]

    def public(self, rpc: str) -> bool:
        return "public" in self.ticks[rpc]

    def allows(self, rpc: str, caller: Caller | None) -> bool:
        """What the table says of `rpc` for `caller` (None: no token at all)."""
        ticked = self.ticks[rpc]
        if "public" in ticked:
            return True
        if caller is None:
            return False
        return bool(ticked & ({"any caller", caller.kind} | caller.roles))


DESCRIPTORS = {
    "identity": id_pb.DESCRIPTOR.services_by_name["IdentityService"],
    "consent": co_pb.DESCRIPTOR.services_by_name["ConsentService"],
    "records": rec_pb.DESCRIPTOR.services_by_name["RecordsService"],
    "audit": au_pb.DESCRIPTOR.services_by_name["AuditService"],
    "anchoring": an_pb.DESCRIPTOR.services_by_name["AnchoringService"],
}
STUBS = {
    "identity": id_grpc.IdentityServiceStub,
    "consent": co_grpc.ConsentServiceStub,
    "records": rec_grpc.RecordsServiceStub,
    "audit": au_grpc.AuditServiceStub,
    "anchoring": an_grpc.AnchoringServiceStub,
}


def parse_table(service: str, readme: str, rpcs: set[str]) -> Table:
    """The table under `## Authorization` in a service README; fails, naming the problem, when a
    column is unknown, a cell is neither empty nor ✓, an RPC is missing, repeated or unknown."""
    lines = readme.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "## Authorization"]
    assert len(starts) == 1, f"services/{service}/README.md: expected one '## Authorization' section"
    columns: tuple[str, ...] = ()
    ticks: dict[str, frozenset[str]] = {}
    finer: dict[str, str] = {}
    for line in lines[starts[0] + 1 :]:
        if line.startswith("## "):
            break
        if not line.lstrip().startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "RPC":
            columns = tuple(cells)
            unknown = set(columns) - COLUMNS
            assert not unknown, f"services/{service}/README.md: unknown columns {sorted(unknown)}"
            assert columns[-1] == "finer rule", f"services/{service}/README.md: the last column is the finer rule"
            continue
        if set(cells[0]) <= {"-", ":"}:
            continue
        assert columns, f"services/{service}/README.md: a row before the table's header"
        assert len(cells) == len(columns), f"services/{service}/README.md: row {cells[0]} has {len(cells)} cells"
        rpc = cells[0]
        assert rpc not in ticks, f"services/{service}/README.md: {rpc} appears twice"
        for column, cell in zip(columns[1:-1], cells[1:-1], strict=True):
            assert cell in ("", "✓"), f"services/{service}/README.md: {rpc} x {column} holds {cell!r}"
        ticked = frozenset(c for c, cell in zip(columns, cells, strict=True) if cell == "✓")
        assert ticked, f"services/{service}/README.md: {rpc} allows nobody"
        assert "public" not in ticked or ticked == {"public"}, f"services/{service}/README.md: {rpc} is public and more"
        ticks[rpc] = ticked
        finer[rpc] = cells[-1]
    missing, unknown = rpcs - set(ticks), set(ticks) - rpcs
    assert not missing, f"services/{service}/README.md: the table lacks {sorted(missing)}, which the proto defines"
    assert not unknown, f"services/{service}/README.md: the table names {sorted(unknown)}, which the proto does not"
    return Table(service, columns, ticks, finer)


def authorization_table(service: str) -> Table:
    rpcs = {m.name for m in DESCRIPTORS[service].methods}
    return parse_table(service, (REPO / "services" / service / "README.md").read_text(), rpcs)


@pytest.mark.parametrize("service", SERVICES)
def test_every_readme_table_covers_exactly_the_rpcs_of_its_proto(service: str) -> None:
    table = authorization_table(service)  # it fails, naming the RPC, on a missing or unknown one
    assert set(table.ticks) == {m.name for m in DESCRIPTORS[service].methods}
    assert all(table.ticks.values()), "every RPC allows someone"


def test_the_parser_names_a_missing_or_unknown_rpc() -> None:
    readme = (REPO / "services" / "audit" / "README.md").read_text()
    rpcs = {m.name for m in DESCRIPTORS["audit"].methods}
    without = re.sub(r"^\| RedactEntry .*\n", "", readme, flags=re.MULTILINE)
    with pytest.raises(AssertionError, match=r"lacks \['RedactEntry'\]"):
        parse_table("audit", without, rpcs)
    extra = readme.replace("| RedactEntry ", "| ForgetEverything |  | ✓ |  |  |  |  |  |  |  |  |  |\n| RedactEntry ")
    with pytest.raises(AssertionError, match=r"names \['ForgetEverything'\]"):
        parse_table("audit", extra, rpcs)
    with pytest.raises(AssertionError, match="unknown columns"):
        parse_table("audit", readme.replace("| auditor |", "| janitor |", 1), rpcs)


# -- the live stack ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """A principal calling as one column (or a few) of the tables."""

    name: str
    principal_id: str
    secret: str
    kind: str
    roles: frozenset[str] = frozenset()


@dataclass
class Side:
    """What the requests name about one patient: the patient, a record, consents, an erasure."""

    patient_id: str = ""
    record_id: str = ""
    consent_id: str = ""  # the consent the practitioner reads by (own); a consent of theirs (other)
    spare_consent_id: str = ""  # a consent any test may revoke
    erasure_id: str = ""
    decision_id: str = ""  # a decision about the patient, with the practitioner as the actor


@dataclass
class World:
    stack: Any
    callers: dict[str, Caller]
    own: Side
    other: Side
    org_id: str
    clients: dict[str, TokenClient] = field(default_factory=dict)
    stubs: dict[tuple[str, str], Any] = field(default_factory=dict)

    def address(self, service: str) -> str:
        runtime = getattr(self.stack, service)
        return f"127.0.0.1:{runtime.grpc_port}"

    def stub(self, service: str, caller: str | None) -> Any:
        """`service`'s stub for `caller` (None: no token)."""
        key = (service, caller or "")
        if key not in self.stubs:
            if caller is None:
                channel = make_channel(self.address(service))
            else:
                channel = self.clients[caller].channel(self.address(service), f"medledger.{service}")
            self.stubs[key] = STUBS[service](channel)
        return self.stubs[key]

    def raw(self, service: str) -> Any:
        """A stub whose calls carry only the metadata they are given."""
        return self.stub(service, None)

    @property
    def admin(self) -> Any:
        return self.stub("identity", "admin")


@functools.cache
def observation() -> bytes:
    """The first Observation of the seeded synthetic patients, as a put sends it."""
    return json.dumps(synthetic.population().first("Observation")).encode()


def _conftest_start_stack(config: pytest.Config) -> Callable[..., Any]:
    """The `start_stack` factory of tests/integration/conftest.py, for one stack for the module
    (the fixture itself is per test: its tmp_path)."""
    here = Path(__file__).with_name("conftest.py").resolve()
    for plugin in config.pluginmanager.get_plugins():
        if Path(getattr(plugin, "__file__", "") or "/").resolve() == here:
            return plugin.start_stack.__wrapped__  # type: ignore[no-any-return]
    raise AssertionError("tests/integration/conftest.py is not loaded")


@pytest.fixture(scope="module")
async def world(
    request: pytest.FixtureRequest, postgres: Postgres, anvil: Anvil, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    start = _conftest_start_stack(request.config)(postgres, tmp_path_factory.mktemp("access"))
    async with start(records=True, audit=True, anchoring=True, chain_rpc_url=anvil.rpc_url) as stack:
        yield await _populate(stack)


async def _populate(stack: Any) -> World:
    public = id_grpc.IdentityServiceStub(make_channel(stack.identity_address))
    admin = id_grpc.IdentityServiceStub(stack.admin().channel(stack.identity_address, "medledger.identity"))

    async def register(kind: int, organization_id: str = "", roles: tuple[int, ...] = ()) -> tuple[str, str]:
        fhir = b""
        if kind == Kind.PRINCIPAL_KIND_PRACTITIONER:
            fhir = json.dumps(
                {"resourceType": "Practitioner", "identifier": [{"system": "urn:npi", "value": uuid.uuid4().hex}]}
            ).encode()
        reply = await admin.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(
                request_id=rid(), kind=kind, organization_id=organization_id, fhir_resource=fhir
            )
        )
        for role in roles:
            await admin.AssignRole(
                id_pb.AssignRoleRequest(request_id=rid(), principal_id=reply.principal.principal_id, role=role)
            )
        return reply.principal.principal_id, reply.client_secret

    async def register_patient() -> tuple[str, str]:
        fhir = {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:oid:1.2.3", "value": uuid.uuid4().hex}],
            "name": [{"family": "Example"}],
        }
        reply = await public.RegisterPatient(
            id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=json.dumps(fhir).encode())
        )
        return reply.principal.principal_id, reply.client_secret

    org_id, org_secret = await register(Kind.PRINCIPAL_KIND_ORGANIZATION)
    specs: dict[str, tuple[str, Any]] = {
        "patient": ("patient", register_patient()),
        "other patient": ("patient", register_patient()),
        "practitioner": ("practitioner", register(Kind.PRINCIPAL_KIND_PRACTITIONER, org_id)),
        "researcher": ("researcher", register(Kind.PRINCIPAL_KIND_RESEARCHER)),
        "service": ("service", register(Kind.PRINCIPAL_KIND_SERVICE)),
        # A guardian the own patient appointed: a researcher holding the guardian role.
        "guardian of the patient": (
            "researcher",
            register(Kind.PRINCIPAL_KIND_RESEARCHER, roles=(Role.ROLE_GUARDIAN,)),
        ),
        # For the revocation and deactivation tests, so that they change nobody else's rights.
        "reader": ("practitioner", register(Kind.PRINCIPAL_KIND_PRACTITIONER, org_id)),
        "doomed": ("patient", register_patient()),
    }
    # One principal per role, of a kind no table has a column for: the role alone decides.
    for role in ROLES:
        value = vocab.Role.Value("ROLE_" + role.upper().replace("-", "_"))
        specs[role] = ("organization", register(Kind.PRINCIPAL_KIND_ORGANIZATION, roles=(value,)))
    made = await asyncio.gather(*(coro for _, coro in specs.values()))
    callers = {
        name: Caller(
            name,
            pid,
            secret,
            kind,
            frozenset({name} if name in ROLES else {"guardian"} if name == "guardian of the patient" else set()),
        )
        for (name, (kind, _)), (pid, secret) in zip(specs.items(), made, strict=True)
    }
    callers["organization"] = Caller("organization", org_id, org_secret, "organization")
    world = World(stack, callers, Side(), Side(), org_id)
    for name, caller in callers.items():
        world.clients[name] = stack.client(caller.principal_id, caller.secret)

    own, other = callers["patient"].principal_id, callers["other patient"].principal_id
    world.own.patient_id, world.other.patient_id = own, other
    await stack.known_to_consent(*(c.principal_id for c in callers.values()))

    def grant(patient: str, grantee: str, actions: list[int], purpose: int) -> co_pb.GrantConsentRequest:
        return co_pb.GrantConsentRequest(
            request_id=rid(),
            patient_id=patient,
            grantee_id=grantee,
            provision=PERMIT,
            actions=actions,
            categories=[OBS],
            purposes=[purpose],
        )

    consent_of = {side: world.stub("consent", name) for side, name in (("own", "patient"), ("other", "other patient"))}
    records_of = {side: world.stub("records", name) for side, name in (("own", "patient"), ("other", "other patient"))}
    guardian = callers["guardian of the patient"].principal_id
    await consent_of["own"].AppointGuardian(
        co_pb.AppointGuardianRequest(request_id=rid(), patient_id=own, guardian_id=guardian)
    )
    practitioner, researcher = callers["practitioner"].principal_id, callers["researcher"].principal_id
    service = callers["service"].principal_id
    by_practitioner = await consent_of["own"].GrantConsent(grant(own, practitioner, [READ, WRITE], TREAT))
    await consent_of["own"].GrantConsent(grant(own, researcher, [READ], RESEARCH))
    world.own.consent_id = by_practitioner.consent.consent_id
    for side, patient in (("own", own), ("other", other)):
        spare = await consent_of[side].GrantConsent(grant(patient, service, [READ], TREAT))
        getattr(world, side).spare_consent_id = spare.consent.consent_id
    world.other.consent_id = world.other.spare_consent_id
    for side, patient in (("own", own), ("other", other)):
        stored = await records_of[side].PutRecord(
            rec_pb.PutRecordRequest(
                request_id=rid(),
                patient_id=patient,
                category=OBS,
                content=observation(),
                media_type="application/fhir+json",
            )
        )
        getattr(world, side).record_id = stored.record_id
        erasure = await records_of[side].RequestErasure(
            rec_pb.RequestErasureRequest(request_id=rid(), patient_id=patient, reason="access-control test")
        )
        getattr(world, side).erasure_id = erasure.erasure.erasure_id
        # A legal hold keeps every erasure from running, whoever asks or approves.
        await world.stub("records", "privacy-officer").PlaceLegalHold(
            rec_pb.PlaceLegalHoldRequest(request_id=rid(), patient_id=patient, reason="access-control test")
        )
    for side, patient in (("own", own), ("other", other)):
        decided = await world.stub("consent", "pdp-client").CheckConsent(
            co_pb.CheckConsentRequest(
                patient_id=patient, actor_id=practitioner, action=READ, category=OBS, purpose=TREAT
            )
        )
        getattr(world, side).decision_id = decided.decision_id
    await _guardian_known(world)
    return world


async def _guardian_known(world: World) -> None:
    """Records and audit learn the appointment from consent's event: wait until both serve the
    guardian for the patient."""
    records = world.stub("records", "guardian of the patient")
    audit = world.stub("audit", "guardian of the patient")
    patient = world.own.patient_id
    deadline = time.monotonic() + 30
    while True:
        served = [
            await outcome(records.ExportRecords(rec_pb.ExportRecordsRequest(patient_id=patient), timeout=10)),
            await outcome(audit.ListEntries(au_pb.ListEntriesRequest(patient_id=patient, page_size=1), timeout=10)),
        ]
        if all(o.code == CODE.OK for o in served):
            return
        assert time.monotonic() < deadline, f"records and audit did not learn the guardian: {served}"
        await asyncio.sleep(0.1)


# -- requests ---------------------------------------------------------------------------------------

INVALID_FHIR = b"{"
UNKNOWN_RESEARCHER = "rsr_" + "0" * 32


def _requests(w: World, s: Side) -> dict[str, dict[str, pb_message.Message]]:
    """A minimal request per RPC, naming side `s` where the RPC concerns a patient. None of them
    changes anything another test depends on: grants and guardians name nobody who exists, the
    erasures are held, revocations revoke spare consents."""
    practitioner = w.callers["practitioner"].principal_id
    return {
        "identity": {
            "RegisterPatient": id_pb.RegisterPatientRequest(request_id=rid()),
            "IssueToken": id_pb.IssueTokenRequest(),
            "GetJwks": id_pb.GetJwksRequest(),
            "RegisterPrincipal": id_pb.RegisterPrincipalRequest(request_id=rid()),
            "GetPrincipal": id_pb.GetPrincipalRequest(principal_id=s.patient_id, include_fhir_resource=True),
            "FindPrincipals": id_pb.FindPrincipalsRequest(
                kind=vocab.PrincipalKind.PRINCIPAL_KIND_PRACTITIONER, identifier="http://hl7.org/fhir/sid/us-npi|0"
            ),
            "RegisterSmartClient": id_pb.RegisterSmartClientRequest(request_id=rid()),
            "ListPrincipals": id_pb.ListPrincipalsRequest(page_size=1),
            "UpdatePrincipalResource": id_pb.UpdatePrincipalResourceRequest(
                request_id=rid(), principal_id=s.patient_id, fhir_resource=INVALID_FHIR
            ),
            "DeactivatePrincipal": id_pb.DeactivatePrincipalRequest(request_id=rid(), principal_id=UNKNOWN_RESEARCHER),
            "ListDeactivatedPrincipals": id_pb.ListDeactivatedPrincipalsRequest(),
            "AssignRole": id_pb.AssignRoleRequest(request_id=rid(), principal_id=UNKNOWN_RESEARCHER, role=0),
            "RevokeRole": id_pb.RevokeRoleRequest(request_id=rid(), principal_id=UNKNOWN_RESEARCHER, role=0),
            "RotateSigningKey": id_pb.RotateSigningKeyRequest(),
        },
        "consent": {
            "GrantConsent": co_pb.GrantConsentRequest(
                request_id=rid(),
                patient_id=s.patient_id,
                grantee_id=UNKNOWN_RESEARCHER,
                provision=PERMIT,
                actions=[READ],
                categories=[OBS],
                purposes=[TREAT],
            ),
            "RevokeConsent": co_pb.RevokeConsentRequest(request_id=rid(), consent_id=s.spare_consent_id),
            "GetConsent": co_pb.GetConsentRequest(consent_id=s.consent_id),
            "ListConsents": co_pb.ListConsentsRequest(patient_id=s.patient_id),
            "CheckConsent": co_pb.CheckConsentRequest(
                patient_id=s.patient_id, actor_id=practitioner, action=READ, category=OBS, purpose=TREAT
            ),
            "GetDecision": co_pb.GetDecisionRequest(decision_id=s.decision_id),
            "AppointGuardian": co_pb.AppointGuardianRequest(
                request_id=rid(), patient_id=s.patient_id, guardian_id=UNKNOWN_RESEARCHER
            ),
            "RemoveGuardian": co_pb.RemoveGuardianRequest(
                request_id=rid(), patient_id=s.patient_id, guardian_id=UNKNOWN_RESEARCHER
            ),
            "SetBreakGlassPolicy": co_pb.SetBreakGlassPolicyRequest(request_id=rid()),
            "GetBreakGlassPolicy": co_pb.GetBreakGlassPolicyRequest(),
            "BreakGlass": co_pb.BreakGlassRequest(request_id=rid(), patient_id=s.patient_id),
            "ListBreakGlassAccesses": co_pb.ListBreakGlassAccessesRequest(),
            "GetBreakGlassAccess": co_pb.GetBreakGlassAccessRequest(access_id="bga_" + "0" * 32),
            "ReviewBreakGlassAccess": co_pb.ReviewBreakGlassAccessRequest(request_id=rid()),
        },
        "records": {
            "PutRecord": rec_pb.PutRecordRequest(
                request_id=rid(),
                patient_id=s.patient_id,
                category=OBS,
                content=observation(),
                media_type="application/fhir+json",
            ),
            "PutRecords": rec_pb.PutRecordsRequest(
                request_id=rid(),
                patient_id=s.patient_id,
                records=[rec_pb.RecordWrite(category=OBS, content=observation(), media_type="application/fhir+json")],
            ),
            "GetRecord": rec_pb.GetRecordRequest(record_id=s.record_id, purpose=TREAT),
            "ListRecordVersions": rec_pb.ListRecordVersionsRequest(record_id=s.record_id, purpose=TREAT),
            "ListRecords": rec_pb.ListRecordsRequest(patient_id=s.patient_id, purpose=TREAT),
            "SearchRecords": rec_pb.SearchRecordsRequest(
                patient_id=s.patient_id, resource_type="Observation", purpose=TREAT
            ),
            "ExportRecords": rec_pb.ExportRecordsRequest(patient_id=s.patient_id),
            "RotatePatientKey": rec_pb.RotatePatientKeyRequest(patient_id=s.patient_id),
            "RequestErasure": rec_pb.RequestErasureRequest(request_id=rid(), patient_id=s.patient_id),
            "ApproveErasure": rec_pb.ApproveErasureRequest(erasure_id=s.erasure_id),
            "CancelErasure": rec_pb.CancelErasureRequest(erasure_id=s.erasure_id),
            "GetErasure": rec_pb.GetErasureRequest(erasure_id=s.erasure_id),
            "PlaceLegalHold": rec_pb.PlaceLegalHoldRequest(request_id=rid(), patient_id=s.patient_id, reason="test"),
            "ReleaseLegalHold": rec_pb.ReleaseLegalHoldRequest(hold_id="hold_" + "0" * 32),
            "GetErasureVerifierKey": rec_pb.GetErasureVerifierKeyRequest(),
        },
        "audit": {
            "GetLatestCheckpoint": au_pb.GetLatestCheckpointRequest(),
            "GetCheckpoint": au_pb.GetCheckpointRequest(tree_size=1),
            "GetVerifierKeys": au_pb.GetVerifierKeysRequest(),
            "GetInclusionProof": au_pb.GetInclusionProofRequest(index=0, tree_size=1),
            "GetConsistencyProof": au_pb.GetConsistencyProofRequest(old_size=1, new_size=1),
            "GetTlogProof": au_pb.GetTlogProofRequest(index=0),
            "FindCommitment": au_pb.FindCommitmentRequest(commitment="0" * 64),
            "ListEntries": au_pb.ListEntriesRequest(patient_id=s.patient_id, page_size=1),
            "ExportAuditEvents": au_pb.ExportAuditEventsRequest(patient_id=s.patient_id, page_size=1),
            "RedactEntry": au_pb.RedactEntryRequest(),
        },
        "anchoring": {
            "ListAnchoredCheckpoints": an_pb.ListAnchoredCheckpointsRequest(page_size=1),
            "GetLatestAnchor": an_pb.GetLatestAnchorRequest(),
            "GetAnchoredProof": an_pb.GetAnchoredProofRequest(commitment="0" * 64),
            "VerifyProof": an_pb.VerifyProofRequest(),
        },
    }


# The RPCs whose request names a patient (or a patient's record, consent or erasure): called for
# the own patient and for the other one.
NAMES_A_PATIENT = {
    "identity": {"GetPrincipal", "UpdatePrincipalResource"},
    "consent": {
        "GrantConsent",
        "RevokeConsent",
        "GetConsent",
        "ListConsents",
        "CheckConsent",
        "GetDecision",
        "AppointGuardian",
        "RemoveGuardian",
        "BreakGlass",
    },
    "records": {
        "PutRecord",
        "PutRecords",
        "GetRecord",
        "ListRecordVersions",
        "ListRecords",
        "SearchRecords",
        "ExportRecords",
        "RotatePatientKey",
        "RequestErasure",
        "ApproveErasure",
        "CancelErasure",
        "GetErasure",
        "PlaceLegalHold",
    },
    "audit": {"ListEntries", "ExportAuditEvents"},
    "anchoring": set(),
}


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    reply: Any = None

    @property
    def verdict(self) -> str:
        """The interceptor's decision as the caller sees it."""
        if self.code == CODE.UNAUTHENTICATED:
            return "unauthenticated"
        if self.code == CODE.PERMISSION_DENIED and self.details in INTERCEPTOR_DENIALS:
            return "refused by the table"
        return "passed"


async def outcome(call: Any) -> Outcome:
    try:
        reply = await call
    except grpc.aio.AioRpcError as exc:
        return Outcome(exc.code(), exc.details() or "")
    return Outcome(CODE.OK, "", reply)


async def bounded(calls: list[Any], limit: int = 12) -> list[Outcome]:
    gate = asyncio.Semaphore(limit)

    async def one(make: Any) -> Outcome:
        async with gate:
            return await outcome(make())

    return await asyncio.gather(*(one(c) for c in calls))


# -- the matrix -------------------------------------------------------------------------------------

MATRIX_CALLERS = (None, *KINDS, *ROLES, "guardian of the patient")


async def test_every_rpc_of_every_service_for_every_kind_and_role_follows_its_table(world: World) -> None:
    """Every RPC x every principal kind, every role and no token x (own patient, other patient):
    the interceptor refuses exactly the callers the README table leaves out (UNAUTHENTICATED
    without a token), and lets the others through to the API (whose finer rules may refuse
    them, in their own words)."""
    tables = {s: authorization_table(s) for s in SERVICES}
    cases: list[tuple[str, str, str | None, str]] = []
    calls: list[Any] = []
    for service in SERVICES:
        for rpc in tables[service].ticks:
            sides = ("own", "other") if rpc in NAMES_A_PATIENT[service] else ("own",)
            for who in MATRIX_CALLERS:
                for side in sides:
                    target = world.own if side == "own" else world.other
                    stub = world.stub(service, who)

                    def call(stub: Any = stub, rpc: str = rpc, service: str = service, target: Side = target) -> Any:
                        return getattr(stub, rpc)(_requests(world, target)[service][rpc], timeout=30)

                    cases.append((service, rpc, who, side))
                    calls.append(call)
    started = time.monotonic()
    outcomes = await bounded(calls)
    print(f"{len(calls)} calls in {time.monotonic() - started:.1f} s")
    wrong = []
    for (service, rpc, who, side), got in zip(cases, outcomes, strict=True):
        caller = world.callers[who] if who else None
        if tables[service].allows(rpc, caller):
            expected = "passed"
        else:
            expected = "unauthenticated" if caller is None else "refused by the table"
        if got.verdict != expected or (expected == "unauthenticated" and got.details != NO_TOKEN):
            wrong.append(f"{service}.{rpc} as {who or 'no token'} ({side}): {got.code.name} {got.details!r}")
    assert not wrong, f"{len(wrong)} calls disagree with the README tables:\n" + "\n".join(wrong)


# -- the finer rules: own patient and another ---------------------------------------------------------

# (service, rpc, caller): (status for the own patient, status for the other patient). "Own" is the
# caller's own patient: themselves, the patient who appointed them guardian, or who consented.
_OK, _PD, _NF, _IA, _FP = (
    CODE.OK,
    CODE.PERMISSION_DENIED,
    CODE.NOT_FOUND,
    CODE.INVALID_ARGUMENT,
    CODE.FAILED_PRECONDITION,
)
FINER: dict[tuple[str, str, str], tuple[grpc.StatusCode, grpc.StatusCode]] = {
    # identity: a principal's FHIR resource is its own, its admins' and its org-admins'.
    ("identity", "GetPrincipal", "patient"): (_OK, _PD),
    ("identity", "GetPrincipal", "admin"): (_OK, _OK),
    ("identity", "GetPrincipal", "practitioner"): (_PD, _PD),
    ("identity", "UpdatePrincipalResource", "patient"): (_IA, _PD),  # past the rule, the FHIR is refused
    ("identity", "UpdatePrincipalResource", "admin"): (_IA, _IA),
    ("identity", "UpdatePrincipalResource", "guardian of the patient"): (_PD, _PD),
    # consent: the patient, their guardian, an admin for them.
    ("consent", "GrantConsent", "patient"): (_IA, _PD),  # past the rule, the unknown grantee is refused
    ("consent", "GrantConsent", "guardian of the patient"): (_IA, _PD),
    ("consent", "GrantConsent", "admin"): (_IA, _IA),
    ("consent", "GrantConsent", "practitioner"): (_PD, _PD),
    ("consent", "GrantConsent", "guardian"): (_PD, _PD),  # a guardian, but not the patient's
    ("consent", "RevokeConsent", "patient"): (_OK, _PD),
    ("consent", "RevokeConsent", "guardian of the patient"): (_OK, _PD),
    ("consent", "RevokeConsent", "admin"): (_OK, _OK),
    ("consent", "RevokeConsent", "service"): (_PD, _PD),  # the grantee does not revoke
    ("consent", "GetConsent", "patient"): (_OK, _NF),
    ("consent", "GetConsent", "practitioner"): (_OK, _NF),  # the grantee of the own patient's consent
    ("consent", "GetConsent", "auditor"): (_OK, _OK),
    ("consent", "GetConsent", "privacy-officer"): (_OK, _OK),
    ("consent", "GetConsent", "researcher"): (_NF, _NF),
    ("consent", "ListConsents", "patient"): (_OK, _PD),
    ("consent", "ListConsents", "auditor"): (_OK, _OK),
    ("consent", "ListConsents", "practitioner"): (_PD, _PD),
    ("consent", "CheckConsent", "patient"): (_OK, _PD),
    ("consent", "CheckConsent", "guardian of the patient"): (_OK, _PD),
    ("consent", "CheckConsent", "guardian"): (_PD, _PD),
    ("consent", "CheckConsent", "pdp-client"): (_OK, _OK),
    # A decision: the patient's side, the actor it was about (the practitioner, in both), overseers.
    ("consent", "GetDecision", "patient"): (_OK, _NF),
    ("consent", "GetDecision", "guardian of the patient"): (_OK, _NF),
    ("consent", "GetDecision", "practitioner"): (_OK, _OK),
    ("consent", "GetDecision", "privacy-officer"): (_OK, _OK),
    ("consent", "GetDecision", "auditor"): (_OK, _OK),
    ("consent", "GetDecision", "admin"): (_OK, _OK),
    ("consent", "GetDecision", "researcher"): (_NF, _NF),
    ("consent", "GetDecision", "guardian"): (_NF, _NF),
    ("consent", "AppointGuardian", "patient"): (_IA, _PD),  # past the rule, the unknown guardian is refused
    ("consent", "AppointGuardian", "admin"): (_IA, _IA),
    ("consent", "AppointGuardian", "guardian of the patient"): (_PD, _PD),
    ("consent", "RemoveGuardian", "patient"): (_IA, _PD),
    # records: a patient their own; others as consent permits.
    ("records", "PutRecord", "patient"): (_OK, _PD),
    ("records", "PutRecord", "practitioner"): (_OK, _PD),
    ("records", "GetRecord", "patient"): (_OK, _NF),  # another's record looks missing
    ("records", "GetRecord", "practitioner"): (_OK, _PD),
    ("records", "GetRecord", "researcher"): (_PD, _PD),  # consent is for research, not treatment
    # A guardian acts for the patient who appointed them (no consent asked); for another patient
    # they are whoever they are (here a researcher without that patient's consent).
    ("records", "GetRecord", "guardian of the patient"): (_OK, _PD),
    ("records", "PutRecords", "patient"): (_OK, _PD),
    ("records", "PutRecords", "practitioner"): (_OK, _PD),
    # A record's history is decided as a read of it.
    ("records", "ListRecordVersions", "patient"): (_OK, _NF),
    ("records", "ListRecordVersions", "practitioner"): (_OK, _PD),
    ("records", "ListRecordVersions", "researcher"): (_PD, _PD),
    ("records", "ListRecordVersions", "guardian of the patient"): (_OK, _PD),
    ("records", "ListRecords", "patient"): (_OK, _PD),
    ("records", "ListRecords", "guardian of the patient"): (_OK, _OK),  # the other's: an empty list
    ("records", "SearchRecords", "patient"): (_OK, _PD),
    ("records", "SearchRecords", "guardian of the patient"): (_OK, _OK),  # the other's: nothing found
    ("records", "ExportRecords", "patient"): (_OK, _PD),
    ("records", "ExportRecords", "guardian of the patient"): (_OK, _PD),
    ("records", "ExportRecords", "guardian"): (_PD, _PD),  # the role, but nobody's guardian
    ("records", "RequestErasure", "patient"): (_FP, _PD),  # past the rule, the legal hold refuses
    ("records", "RequestErasure", "guardian of the patient"): (_FP, _PD),
    ("records", "RequestErasure", "guardian"): (_PD, _PD),
    ("records", "RequestErasure", "admin"): (_FP, _FP),
    ("records", "GetErasure", "patient"): (_OK, _NF),
    ("records", "GetErasure", "guardian of the patient"): (_OK, _NF),
    ("records", "GetErasure", "guardian"): (_NF, _NF),
    ("records", "GetErasure", "privacy-officer"): (_OK, _OK),
    ("records", "CancelErasure", "patient"): (_OK, _NF),
    ("records", "CancelErasure", "guardian of the patient"): (_OK, _NF),  # cancelled already: as it is
    ("records", "ApproveErasure", "privacy-officer"): (_FP, _FP),  # held
    # audit: a patient their own entries; privacy officers one patient's; auditors all.
    ("audit", "ListEntries", "patient"): (_OK, _PD),
    ("audit", "ListEntries", "guardian of the patient"): (_OK, _PD),
    ("audit", "ListEntries", "guardian"): (_PD, _PD),
    ("audit", "ListEntries", "auditor"): (_OK, _OK),
    # A privacy officer lists any one patient's entries (to replay a decision); see the test below.
    ("audit", "ListEntries", "privacy-officer"): (_OK, _OK),
    ("audit", "ExportAuditEvents", "patient"): (_OK, _PD),
    ("audit", "ExportAuditEvents", "guardian of the patient"): (_OK, _PD),
    ("audit", "ExportAuditEvents", "auditor"): (_OK, _OK),
    ("audit", "ExportAuditEvents", "privacy-officer"): (_OK, _OK),
}


async def test_finer_rules_allow_the_own_patient_and_refuse_another(world: World) -> None:
    """Past the interceptor, the APIs' finer rules: a patient (or their guardian, or whom they
    consented to) is served about the own patient and refused about the other, in the finer
    rule's words, never the table's."""
    keys = list(FINER)
    calls = []
    for service, rpc, who in keys:
        for target in (world.own, world.other):

            def call(service: str = service, rpc: str = rpc, who: str = who, target: Side = target) -> Any:
                return getattr(world.stub(service, who), rpc)(_requests(world, target)[service][rpc], timeout=30)

            calls.append(call)
    # One at a time: some of these change what the next sees (a cancelled erasure, a revoked
    # spare consent), and each expectation holds whichever comes first.
    outcomes = [await outcome(c()) for c in calls]
    wrong = []
    for i, (service, rpc, who) in enumerate(keys):
        wanted = FINER[service, rpc, who]
        for side, got, want in zip(("own", "other"), outcomes[2 * i : 2 * i + 2], wanted, strict=True):
            # A finer rule's refusal, never the table's (the interceptor words its own).
            if got.code != want or got.verdict != "passed":
                wrong.append(f"{service}.{rpc} as {who} ({side}): {got.code.name} {got.details!r}, want {want.name}")
    assert not wrong, "finer rules:\n" + "\n".join(wrong)


async def test_listings_hold_only_what_the_caller_may_see(world: World) -> None:
    """A practitioner lists the own patient's records consent lets them read, and none of the
    other patient's; a patient's audit entries are their own."""
    practitioner = world.stub("records", "practitioner")
    own = await practitioner.ListRecords(rec_pb.ListRecordsRequest(patient_id=world.own.patient_id, purpose=TREAT))
    assert world.own.record_id in {r.record_id for r in own.records} and own.decision_ids
    other = await practitioner.ListRecords(rec_pb.ListRecordsRequest(patient_id=world.other.patient_id, purpose=TREAT))
    assert list(other.records) == [] and list(other.decision_ids) == []
    patient = world.stub("records", "patient")
    mine = await patient.ListRecords(rec_pb.ListRecordsRequest(patient_id=world.own.patient_id))
    assert {r.patient_id for r in mine.records} == {world.own.patient_id}
    # The patient's guardian lists what the patient does, without a purpose or consent; for the
    # other patient, only what consent lets them (nothing).
    guardian = world.stub("records", "guardian of the patient")
    theirs = await guardian.ListRecords(rec_pb.ListRecordsRequest(patient_id=world.own.patient_id))
    assert {r.record_id for r in theirs.records} == {r.record_id for r in mine.records} and not theirs.decision_ids
    other = await guardian.ListRecords(rec_pb.ListRecordsRequest(patient_id=world.other.patient_id, purpose=TREAT))
    assert list(other.records) == []


async def test_a_privacy_officer_lists_one_patients_entries_never_the_whole_log(world: World) -> None:
    """A privacy officer replaying a decision, or answering a patient's access request, reads the
    patient's entries (and exports them as AuditEvents); the log at large, or entries by actor or
    record, stay the auditors'."""
    officer = world.stub("audit", "privacy-officer")
    wanted = {"consent.version_recorded", "consent.decision"}
    types: set[str] = set()
    deadline = time.monotonic() + 30
    while not wanted <= types and time.monotonic() < deadline:  # the log takes events in shortly after
        own = await officer.ListEntries(au_pb.ListEntriesRequest(patient_id=world.own.patient_id, page_size=1000))
        types = {json.loads(e.entry)["type"] for e in own.entries if e.entry}
        await asyncio.sleep(0.5)
    assert wanted <= types, types
    for request in (
        au_pb.ListEntriesRequest(page_size=1),
        au_pb.ListEntriesRequest(actor_id=world.own.patient_id, page_size=1),
        au_pb.ListEntriesRequest(patient_id=world.own.patient_id, actor_id=world.own.patient_id, page_size=1),
    ):
        got = await outcome(officer.ListEntries(request, timeout=30))
        assert got.code == grpc.StatusCode.INVALID_ARGUMENT and "patient_id" in got.details, got
    # The same trail as FHIR AuditEvents, to answer the patient's access request; one patient's only.
    exported = await officer.ExportAuditEvents(
        au_pb.ExportAuditEventsRequest(patient_id=world.own.patient_id, page_size=1000)
    )
    bundle = json.loads(exported.fhir_bundle_json)
    assert exported.entries == len(bundle["entry"])
    assert {e["resource"]["resourceType"] for e in bundle["entry"]} == {"AuditEvent"}
    # Every entry listed above, and since then the log of the officer's own reads of them.
    listed = {f"entry-{e.index}" for e in own.entries if e.entry}
    assert listed and listed <= {e["resource"]["id"] for e in bundle["entry"]}
    got = await outcome(officer.ExportAuditEvents(au_pb.ExportAuditEventsRequest(page_size=1), timeout=30))
    assert got.code == grpc.StatusCode.INVALID_ARGUMENT and "patient_id" in got.details, got


async def test_finer_rules_keep_organization_roles_to_their_own_organization(world: World) -> None:
    """Roles held within an organization (org-admin, privacy officer) and its practitioners act
    for their own organization and are refused for another; the same roles held outside any
    organization are refused for both, admins and auditors are not."""
    stack = world.stack
    admin = world.admin

    def fhir() -> bytes:
        return json.dumps(
            {"resourceType": "Practitioner", "identifier": [{"system": "urn:npi", "value": uuid.uuid4().hex}]}
        ).encode()

    async def register(kind: int, organization_id: str = "", *roles: int) -> tuple[str, str]:
        reply = await admin.RegisterPrincipal(
            id_pb.RegisterPrincipalRequest(
                request_id=rid(),
                kind=kind,
                organization_id=organization_id,
                fhir_resource=fhir() if kind == Kind.PRINCIPAL_KIND_PRACTITIONER else b"",
            )
        )
        for role in roles:
            await admin.AssignRole(
                id_pb.AssignRoleRequest(request_id=rid(), principal_id=reply.principal.principal_id, role=role)
            )
        return reply.principal.principal_id, reply.client_secret

    other_org, _ = await register(Kind.PRINCIPAL_KIND_ORGANIZATION)
    ours, theirs = world.org_id, other_org
    colleague, _ = await register(Kind.PRINCIPAL_KIND_PRACTITIONER, ours)
    stranger, _ = await register(Kind.PRINCIPAL_KIND_PRACTITIONER, theirs)
    org_admin = stack.client(*await register(Kind.PRINCIPAL_KIND_PRACTITIONER, ours, Role.ROLE_ORG_ADMIN))
    officer = stack.client(*await register(Kind.PRINCIPAL_KIND_PRACTITIONER, ours, Role.ROLE_PRIVACY_OFFICER))
    as_ = {
        "org-admin of the organization": org_admin,
        "privacy officer of the organization": officer,
        **{who: world.clients[who] for who in ("practitioner", "org-admin", "privacy-officer", "admin", "auditor")},
    }

    def stub(service: str, who: str) -> Any:
        return STUBS[service](as_[who].channel(world.address(service), f"medledger.{service}"))

    requests: dict[str, Callable[[str, str], tuple[str, pb_message.Message]]] = {
        "ListPrincipals": lambda org, _: ("identity", id_pb.ListPrincipalsRequest(organization_id=org)),
        "RegisterPrincipal": lambda org, _: (
            "identity",
            id_pb.RegisterPrincipalRequest(
                request_id=rid(), kind=Kind.PRINCIPAL_KIND_PRACTITIONER, organization_id=org, fhir_resource=fhir()
            ),
        ),
        "AssignRole": lambda _, member: (
            "identity",
            id_pb.AssignRoleRequest(request_id=rid(), principal_id=member, role=Role.ROLE_AUDITOR),
        ),
        "GetPrincipal": lambda _, member: (
            "identity",
            id_pb.GetPrincipalRequest(principal_id=member, include_fhir_resource=True),
        ),
        "SetBreakGlassPolicy": lambda org, _: (
            "consent",
            co_pb.SetBreakGlassPolicyRequest(
                request_id=rid(), policy=co_pb.BreakGlassPolicy(organization_id=org, enabled=False)
            ),
        ),
        "GetBreakGlassPolicy": lambda org, _: ("consent", co_pb.GetBreakGlassPolicyRequest(organization_id=org)),
        "ListBreakGlassAccesses": lambda org, _: (
            "consent",
            co_pb.ListBreakGlassAccessesRequest(organization_id=org),
        ),
    }
    # (rpc, caller): (status for their own organization, status for another).
    expected = {
        ("ListPrincipals", "org-admin of the organization"): (_OK, _PD),
        ("ListPrincipals", "privacy-officer"): (_OK, _OK),
        ("RegisterPrincipal", "org-admin of the organization"): (_OK, _PD),
        ("RegisterPrincipal", "org-admin"): (_PD, _PD),
        ("RegisterPrincipal", "admin"): (_OK, _OK),
        ("AssignRole", "org-admin of the organization"): (_OK, _PD),
        ("AssignRole", "org-admin"): (_PD, _PD),
        ("GetPrincipal", "org-admin of the organization"): (_OK, _PD),
        ("SetBreakGlassPolicy", "org-admin of the organization"): (_OK, _PD),
        ("SetBreakGlassPolicy", "org-admin"): (_PD, _PD),
        ("SetBreakGlassPolicy", "admin"): (_OK, _OK),
        ("GetBreakGlassPolicy", "practitioner"): (_OK, _PD),
        ("GetBreakGlassPolicy", "admin"): (_OK, _OK),
        ("ListBreakGlassAccesses", "privacy officer of the organization"): (_OK, _PD),
        ("ListBreakGlassAccesses", "privacy-officer"): (_PD, _PD),
        ("ListBreakGlassAccesses", "auditor"): (_OK, _OK),
    }
    await stack.known_to_consent(other_org)
    wrong = []
    for (rpc, who), wanted in expected.items():
        for side, org, member, want in (("own", ours, colleague, wanted[0]), ("other", theirs, stranger, wanted[1])):
            service, request = requests[rpc](org, member)
            got = await outcome(getattr(stub(service, who), rpc)(request, timeout=30))
            if got.code != want or got.verdict != "passed":
                wrong.append(f"{service}.{rpc} as {who} ({side}): {got.code.name} {got.details!r}, want {want.name}")
    assert not wrong, "organization rules:\n" + "\n".join(wrong)


# -- tokens -----------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _flip(segment: str, at: int) -> str:
    """`segment` with its character at `at` changed to another of the base64url alphabet whose
    6 bits all count (so the bytes differ and the encoding stays canonical)."""
    return segment[:at] + ("A" if segment[at] != "A" else "B") + segment[at + 1 :]


def _probe(world: World, service: str) -> tuple[str, pb_message.Message]:
    """A call the own patient may make on `service`: (rpc, request)."""
    own = world.own
    return {
        "identity": ("GetPrincipal", id_pb.GetPrincipalRequest(principal_id=own.patient_id)),
        "consent": ("ListConsents", co_pb.ListConsentsRequest(patient_id=own.patient_id)),
        "records": ("ListRecords", rec_pb.ListRecordsRequest(patient_id=own.patient_id)),
        "audit": ("ListEntries", au_pb.ListEntriesRequest(patient_id=own.patient_id, page_size=1)),
        "anchoring": ("GetAnchoredProof", an_pb.GetAnchoredProofRequest(commitment="0" * 64)),
    }[service]


async def _with_token(world: World, service: str, token: str) -> Outcome:
    rpc, request = _probe(world, service)
    stub = world.raw(service)
    return await outcome(getattr(stub, rpc)(request, metadata=(("authorization", f"Bearer {token}"),), timeout=30))


async def test_expired_foreign_and_forged_tokens_are_unauthenticated_by_every_service(world: World) -> None:
    signer = world.stack.identity.handle.tokens.signer
    client = world.clients["patient"]
    own_key = ed25519.Ed25519PrivateKey.generate()
    for service in SERVICES:
        audience = f"medledger.{service}"
        token = await client.token(audience)
        good = await _with_token(world, service, token)
        assert good.verdict == "passed" and good.code != CODE.PERMISSION_DENIED, (service, good)
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
        now = int(time.time())
        head, body, signature = token.split(".")
        public_jwk = next(k for k in (await signer.jwks())["keys"] if k["kid"] == header["kid"])
        public_raw = base64.urlsafe_b64decode(public_jwk["x"] + "==")
        past = {**claims, "iat": now - 3600, "nbf": now - 3600, "exp": now - 120, "jti": uuid.uuid4().hex}
        other_audience = "medledger.consent" if service != "consent" else "medledger.records"
        bad = {
            # Identity's own key (in this process: its key manager signs), past exp and leeway.
            "expired": await signer.sign(past),
            "expired, signed by another key": jwt.encode(
                past, own_key, algorithm="EdDSA", headers={"kid": header["kid"]}
            ),
            "valid, signed by another key": jwt.encode(
                {**claims, "jti": uuid.uuid4().hex}, own_key, algorithm="EdDSA", headers={"kid": header["kid"]}
            ),
            "a real token for another audience": await client.token(other_audience),
            "one character of the signature flipped": f"{head}.{body}.{_flip(signature, 5)}",
            "alg none": f"{_b64url(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{body}.",
            "alg none, the signature kept": f"{_b64url(json.dumps({'alg': 'none', 'kid': header['kid']}).encode())}"
            f".{body}.{signature}",
            "HS256 keyed with the public key": jwt.encode(
                claims, public_raw, algorithm="HS256", headers={"kid": header["kid"]}
            ),
            "roles added to a real token": f"{head}."
            f"{_b64url(json.dumps({**claims, 'roles': ['admin', 'auditor']}).encode())}.{signature}",
        }
        for what, forged in bad.items():
            got = await _with_token(world, service, forged)
            assert got.code == CODE.UNAUTHENTICATED, (service, what, got)
        # Within the 30 s leeway an expired token still passes; the refusal above is its expiry.
        recent = await signer.sign({**past, "exp": now - 5, "jti": uuid.uuid4().hex})
        assert (await _with_token(world, service, recent)).verdict == "passed", service


async def test_a_deactivated_principals_tokens_are_refused_by_every_service_within_seconds(world: World) -> None:
    doomed = world.callers["doomed"]
    client = world.clients["doomed"]
    tokens = {s: await client.token(f"medledger.{s}") for s in SERVICES}
    probes = {
        "identity": ("GetPrincipal", id_pb.GetPrincipalRequest(principal_id=doomed.principal_id)),
        "consent": ("ListConsents", co_pb.ListConsentsRequest(patient_id=doomed.principal_id)),
        "records": ("ListRecords", rec_pb.ListRecordsRequest(patient_id=doomed.principal_id)),
        "audit": ("ListEntries", au_pb.ListEntriesRequest(page_size=1)),
        "anchoring": ("GetAnchoredProof", an_pb.GetAnchoredProofRequest(commitment="0" * 64)),
    }

    async def answer(service: str) -> Outcome:
        rpc, request = probes[service]
        metadata = (("authorization", f"Bearer {tokens[service]}"),)
        return await outcome(getattr(world.raw(service), rpc)(request, metadata=metadata, timeout=30))

    for service in SERVICES:
        got = await answer(service)
        assert got.verdict == "passed" and got.code != CODE.PERMISSION_DENIED, (service, got)
    await world.admin.DeactivatePrincipal(
        id_pb.DeactivatePrincipalRequest(request_id=rid(), principal_id=doomed.principal_id)
    )
    started = time.monotonic()

    async def refused(service: str) -> float:
        while True:
            got = await answer(service)
            if got.code == CODE.UNAUTHENTICATED:
                assert got.details == "the principal is deactivated", (service, got)
                return time.monotonic() - started
            assert time.monotonic() - started < 5, f"{service} still accepts a deactivated principal's token"
            await asyncio.sleep(0.05)

    took = dict(zip(SERVICES, await asyncio.gather(*(refused(s) for s in SERVICES)), strict=True))
    print("deactivation refused after", {s: f"{t:.2f} s" for s, t in took.items()})
    # And it stays refused: no service lets it back in.
    await asyncio.sleep(0.2)
    for service in SERVICES:
        assert (await answer(service)).code == CODE.UNAUTHENTICATED, service
    reissue = id_pb.IssueTokenRequest(
        principal_id=doomed.principal_id, client_secret=doomed.secret, audience="medledger.records"
    )
    assert (await outcome(world.raw("identity").IssueToken(reissue))).code == CODE.UNAUTHENTICATED


# -- a consent revoked mid-use ----------------------------------------------------------------------


async def test_a_consent_revoked_while_its_grantee_reads_stops_every_later_read(world: World) -> None:
    """Readers read the own patient's record in a loop while the patient revokes the reader's
    consent: no read started after the revocation answered is served."""
    reader = world.callers["reader"]
    consent = world.stub("consent", "patient")
    granted = await consent.GrantConsent(
        co_pb.GrantConsentRequest(
            request_id=rid(),
            patient_id=world.own.patient_id,
            grantee_id=reader.principal_id,
            provision=PERMIT,
            actions=[READ],
            categories=[OBS],
            purposes=[TREAT],
        )
    )
    records = world.stub("records", "reader")
    get = rec_pb.GetRecordRequest(record_id=world.own.record_id, purpose=TREAT)
    await records.GetRecord(get, timeout=30)  # permitted, and the reader's token is fetched
    reads: list[tuple[float, float, Outcome]] = []
    revoked_at: list[float] = []
    stop = asyncio.Event()

    async def read_loop() -> None:
        while not stop.is_set():
            begun = time.monotonic()
            got = await outcome(records.GetRecord(get, timeout=30))
            reads.append((begun, time.monotonic(), got))

    async def revoke() -> None:
        await asyncio.sleep(0.5)
        await consent.RevokeConsent(
            co_pb.RevokeConsentRequest(request_id=rid(), consent_id=granted.consent.consent_id), timeout=30
        )
        revoked_at.append(time.monotonic())
        await asyncio.sleep(1.0)
        stop.set()

    await asyncio.gather(revoke(), *(read_loop() for _ in range(4)))
    (revoked,) = revoked_at
    before = [r for r in reads if r[1] < revoked]
    after = [r for r in reads if r[0] > revoked]
    assert any(o.code == CODE.OK for _, _, o in before), "no read was served before the revocation"
    assert len(after) >= 4, f"too few reads after the revocation ({len(after)}) to tell"
    served = [(b - revoked, o.code.name) for b, _, o in after if o.code != CODE.PERMISSION_DENIED]
    assert not served, f"reads started after the revocation answered were not refused: {served}"
    assert all(o.details not in INTERCEPTOR_DENIALS and "consent" in o.details for _, _, o in after)
    print(f"{len(before)} reads before, {len(after)} after, {len(reads) - len(before) - len(after)} across")


async def test_a_consent_revoked_by_several_callers_at_once_is_revoked_once_for_each_of_them(world: World) -> None:
    """The patient, their guardian and an admin revoke one consent at the same moment: each is
    answered with the revoked consent, and it has one revoking version. (Each revocation locked
    the latest version it saw, so the later ones, once let in, wrote the same version again and
    the database refused it: INTERNAL.)"""
    patient = world.stub("consent", "patient")
    revokers = [world.stub("consent", who) for who in ("patient", "guardian of the patient", "admin")] * 2
    for _ in range(3):
        granted = await patient.GrantConsent(
            co_pb.GrantConsentRequest(
                request_id=rid(),
                patient_id=world.own.patient_id,
                grantee_id=world.callers["service"].principal_id,
                provision=PERMIT,
                actions=[READ],
                categories=[OBS],
                purposes=[TREAT],
            )
        )
        consent_id = granted.consent.consent_id
        got = await asyncio.gather(
            *(
                outcome(r.RevokeConsent(co_pb.RevokeConsentRequest(request_id=rid(), consent_id=consent_id)))
                for r in revokers
            )
        )
        assert [o.code for o in got] == [CODE.OK] * len(revokers), [(o.code.name, o.details) for o in got]
        assert {(o.reply.consent.version, o.reply.consent.status) for o in got} == {
            (2, co_pb.ConsentStatus.CONSENT_STATUS_INACTIVE)
        }
        latest = await patient.GetConsent(co_pb.GetConsentRequest(consent_id=consent_id))
        assert latest.consent.version == 2
