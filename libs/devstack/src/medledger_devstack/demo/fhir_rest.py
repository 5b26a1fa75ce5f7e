"""The story's FHIR chapter: the same platform through the door every EHR and integration engine
already knows. The hospital's integration engine (a SMART Backend Services client) gets a token
with its own key and loads the patient's synthetic record as a FHIR transaction; Dr. Grey's app
searches and reads it over FHIR; the patient asks FHIR who saw their data.

Every call goes through the gateway with the caller's own token, so consent decides each one and
the audit log holds each one, exactly as for the gRPC calls of the chapters before.
"""

from __future__ import annotations

import collections
import json
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

import aiohttp
from joserfc import jwk, jwt
from medledger.consent.v1 import consent_service_pb2 as consent_pb
from medledger.identity.v1 import identity_service_pb2 as identity_pb

from medledger_devstack.demo.terms import TREAT, WRITE, rid, timestamp
from medledger_devstack.demo.waiting import LEARN_WAIT_SECONDS, eventually, until_known
from medledger_devstack.synthetic import population

if TYPE_CHECKING:
    from medledger_devstack.demo.story import Story

FHIR_JSON = "application/fhir+json"
ENGINE_SCOPES = ("system/*.cruds",)


class FhirError(Exception):
    """A FHIR answer the story did not expect: its status and OperationOutcome."""


async def fhir(
    http: aiohttp.ClientSession, method: str, url: str, token: str, body: Any = None, **params: str
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}", "Accept": FHIR_JSON}
    if body is not None:
        headers["Content-Type"] = FHIR_JSON
    data = json.dumps(body) if body is not None else None
    async with http.request(method, url, headers=headers, data=data, params=params or None) as response:
        return response.status, await response.json(content_type=None)


def _expect(status: int, answer: dict[str, Any], wanted: int, what: str) -> dict[str, Any]:
    if status != wanted:
        raise FhirError(f"{what}: HTTP {status}: {json.dumps(answer)[:300]}")
    return answer


async def load_a_synthetic_patient(story: Story) -> None:
    story.say.step("St. Mary's integration engine loads the patient's record from a Synthea export (FHIR)")
    base = story.config.fhir_base_url
    # The engine: a SMART Backend Services client of the hospital, with its own ES384 key pair;
    # identity keeps only the public key.
    key = jwk.ECKey.generate_key("P-384", parameters={"kid": "engine-1"}, private=True)
    registered = await story.admin.identity.RegisterSmartClient(
        identity_pb.RegisterSmartClientRequest(
            request_id=rid(),
            organization_id=story.hospital_id,
            jwks_json=json.dumps({"keys": [key.as_dict(private=False)]}),
            allowed_scopes=list(ENGINE_SCOPES),
        )
    )
    engine_id = registered.principal.principal_id
    story.result.cast[engine_id] = "St. Mary's integration engine"
    story.say.say(
        f"the engine: SMART client {engine_id} of the hospital, public key registered, scopes {ENGINE_SCOPES}"
    )

    # The patient lets the hospital (any of its people and systems) file records for them; reading
    # stays with whom they chose (Dr. Grey, for Observations).
    now = time.time()
    await until_known(
        lambda: story.patient.consent.GrantConsent(
            consent_pb.GrantConsentRequest(
                request_id=rid(),
                patient_id=story.patient_id,
                grantee_id=story.hospital_id,
                provision=consent_pb.ProvisionType.PROVISION_TYPE_PERMIT,
                actions=[WRITE],
                purposes=[TREAT],
                period_start=timestamp(now),
                period_end=timestamp(now + 30 * 86400),
            )
        )
    )
    story.say.say("the patient lets St. Mary's file records for them (write, for treatment, 30 days)")

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/.well-known/smart-configuration") as response:
            token_endpoint = (await response.json(content_type=None))["token_endpoint"]
        claims = {
            "iss": engine_id,
            "sub": engine_id,
            "aud": token_endpoint,
            "exp": int(time.time()) + 300,
            "jti": uuid.uuid4().hex,
        }
        assertion = jwt.encode({"alg": "ES384", "kid": key.kid}, claims, key, algorithms=["ES384"])
        form = {
            "grant_type": "client_credentials",
            "scope": " ".join(ENGINE_SCOPES),
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        }
        async with http.post(token_endpoint, data=form) as response:
            granted = _expect(response.status, await response.json(content_type=None), 200, "the token endpoint")
        story.say.say(
            f"token by client_credentials with a signed assertion (private_key_jwt, ES384): "
            f"scope {granted['scope']}, {granted['expires_in']} s"
        )

        # A seeded synthetic patient's transaction Bundle, as the generator wrote it, its Patient
        # entry carrying our patient's identifier: the gateway matches it to the registered patient.
        bundle = population().bundles[0]
        for entry in bundle["entry"]:
            if entry["resource"]["resourceType"] == "Patient":
                entry["resource"]["identifier"] = [story.patient_identifier]
        kinds = collections.Counter(e["resource"]["resourceType"] for e in bundle["entry"])
        started = time.monotonic()
        status, answer = await fhir(http, "POST", base, granted["access_token"], bundle)
        took = time.monotonic() - started
        _expect(status, answer, 200, "the transaction")
    created = [e["response"] for e in answer["entry"] if e["response"]["status"].startswith("201")]
    story.fhir_observations = [
        r["location"].split("/_history")[0] for r in created if r.get("location", "").startswith("Observation/")
    ]
    story.say.say(
        f"POST [base] transaction of {len(bundle['entry'])} entries ({kinds['Observation']} Observations, "
        f"{kinds['Encounter']} Encounters, {kinds['Condition']} Conditions, …) in {took:.1f} s: "
        f"{len(created)} created, each encrypted under the patient's key and committed"
    )
    story.check(
        "the engine's transaction",
        answer.get("type") == "transaction-response" and len(story.fhir_observations) == kinds["Observation"],
        f"a transaction-response; all {kinds['Observation']} Observations stored as records of the patient",
    )
    # The search chapter looks for the code the patient has most Observations of.
    codes = collections.Counter(
        f"{c['system']}|{c['code']}"
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
        for c in e["resource"]["code"].get("coding", [])[:1]
    )
    story.fhir_code, story.fhir_code_count = codes.most_common(1)[0]


async def search_and_read(story: Story) -> None:
    story.say.step("Dr. Grey's app searches the patient's Observations over FHIR and reads one")
    base = story.config.fhir_base_url
    token = await story.doctor.token("fhir")
    patient = f"Patient/{story.patient_id.replace('_', '-')}"
    async with aiohttp.ClientSession() as http:
        status, found = await fhir(
            http, "GET", f"{base}/Observation", token, patient=patient, code=story.fhir_code, _count="5"
        )
        _expect(status, found, 200, "the search")
        story.say.say(
            f"GET Observation?patient=…&code={story.fhir_code}: a searchset of {found['total']} "
            f"(the first {len(found.get('entry', []))}, a next link to the rest); the code was matched "
            "through a blind index under the patient's search key, never stored in plaintext"
        )
        story.check(
            "FHIR search",
            found["total"] == story.fhir_code_count,
            f"every Observation of the code is found ({story.fhir_code_count}), none other",
        )
        first = found["entry"][0]["resource"]
        status, read = await fhir(http, "GET", f"{base}/Observation/{first['id']}", token)
        _expect(status, read, 200, "the read")
        story.say.say(
            f"GET Observation/{first['id']}: version {read['meta']['versionId']}, "
            f"{read['code']['coding'][0].get('display', '')} — permitted by the patient's consent to Dr. Grey"
        )
        status, denied = await fhir(
            http, "GET", f"{base}/Observation/{first['id']}", await story.researcher.token("fhir")
        )
    story.check(
        "FHIR read denied to the researcher",
        status == 403 and denied.get("resourceType") == "OperationOutcome",
        f"the researcher's GET answers {status} OperationOutcome ({_reason(denied)})",
    )


async def who_read_over_fhir(story: Story) -> None:
    story.say.step("The patient asks FHIR who saw their data: GET AuditEvent?patient=…")
    base = story.config.fhir_base_url
    token = await story.patient.token("fhir")
    patient = f"Patient/{story.patient_id.replace('_', '-')}"

    async def events() -> list[dict[str, Any]] | None:
        async with aiohttp.ClientSession() as http:
            found: list[dict[str, Any]] = []
            url: str | None = f"{base}/AuditEvent"
            params: dict[str, str] = {"patient": patient, "_count": "200"}
            while url:
                status, page = await fhir(http, "GET", url, token, **params)
                _expect(status, page, 200, "the AuditEvent search")
                found += [e["resource"] for e in page.get("entry", [])]
                url = next((link["url"] for link in page.get("link", []) if link["relation"] == "next"), None)
                params = {}
        grey = [e for e in found if _names(e, story.doctor_id) and e.get("action") == "R"]
        return found if len(grey) >= 2 else None

    found = await eventually(events, "the log to hold Dr. Grey's FHIR reads", LEARN_WAIT_SECONDS, story.say)

    def who_read(succeeded: bool) -> collections.Counter[str]:
        return collections.Counter(
            story.name(who)
            for e in found
            if e.get("action") == "R" and (e.get("outcome", "0") == "0") == succeeded
            for who in _agents(e)
            if who != story.patient_id
        )

    readers, refused = who_read(True), who_read(False)
    story.say.say(
        f"{len(found)} AuditEvents; reads by "
        + ", ".join(f"{n} ({c})" for n, c in readers.items())
        + "; refused: "
        + (", ".join(f"{n} ({c})" for n, c in refused.items()) or "none")
    )
    story.check(
        "who saw my data, over FHIR",
        story.name(story.doctor_id) in readers,
        "the patient's AuditEvents name Dr. Grey's search and read",
    )


_PRINCIPAL = re.compile(r"[a-z]{3}[_-][0-9a-f]{32}")


def _agents(event: dict[str, Any]) -> list[str]:
    """The principals an AuditEvent's agents name (not the log's own placeholders)."""
    out = []
    for agent in event.get("agent", []):
        who = agent.get("who", {})
        value = who.get("identifier", {}).get("value") or who.get("reference", "").rpartition("/")[2]
        if _PRINCIPAL.fullmatch(value or ""):
            out.append(value.replace("-", "_"))
    return out


def _names(event: dict[str, Any], principal_id: str) -> bool:
    return principal_id in _agents(event)


def _reason(outcome: dict[str, Any]) -> str:
    issue = (outcome.get("issue") or [{}])[0]
    codes = [c.get("code", "") for c in issue.get("details", {}).get("coding", [])]
    return ", ".join(codes) or issue.get("code", "")
