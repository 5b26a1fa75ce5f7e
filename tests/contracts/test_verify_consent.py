"""`medledger verify consent` on a real Anvil: a consent's three versions (a grant, a change, a
revocation), made as consent makes them, written to a freshly deployed ConsentRegistry in the
anchoring service's order; the patient, holding the documents and salts, asks which version was
in force at several times. An independent check (plain hashlib, RFC 8785, a hand-encoded eth_call)
agrees on every commitment, status and answer, and the verifier's rule is the contract's."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from medledger_consent import domain, fhir
from medledger_devstack import contracts
from medledger_devstack.testing import Anvil
from medledger_sdk.cli import main
from medledger_verifier import chain
from medledger_verifier.consent_proofs import RegistryEntry
from medledger_verifier.proof_files import TrustPolicy

# The document says consent recorded version 1 this long before the chain could: a visible lag.
V1_RECORDED_EARLIER = 30


def _independent() -> ModuleType:
    """tests/integration/helpers/independent_verifier.py: no medledger code."""
    path = Path(__file__).parents[1] / "integration" / "helpers" / "independent_verifier.py"
    spec = importlib.util.spec_from_file_location("independent_verifier", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Version:
    path: Path
    salt: str
    commitment: str
    document: dict[str, Any]
    entry: RegistryEntry | None = None


@dataclass
class World:
    rpc_url: str
    registry: str
    chain_id: int
    folder: Path
    policy: Path
    consent_id: str
    versions: list[Version]  # 1: the grant, 2: the change, 3: the revocation
    mismatched: Version  # another consent, granted on chain with a window not its document's

    def version(self, n: int) -> Version:
        return self.versions[n - 1]

    def entry(self, n: int) -> RegistryEntry:
        found = self.version(n).entry
        assert found is not None
        return found


def consent_version(consent_id: str, n: int, *, recorded_at: float, start: float, revoked: bool = False) -> Any:
    return domain.ConsentVersion(
        consent_id=consent_id,
        version=n,
        patient_id="pat_chainproof",
        grantee_id="prn_chainproof",
        provision=domain.PERMIT,
        actions=frozenset(),
        categories=frozenset(),
        purposes=frozenset() if n == 1 else frozenset({1}),
        period_start=start,
        period_end=start + 86_400,
        status=domain.INACTIVE if revoked else domain.ACTIVE,
        recorded_by="pat_chainproof",
        recorded_at=recorded_at,
    )


def write_version(folder: Path, name: str, v: Any) -> Version:
    """The document as GetConsent returns it (``fhir_consent_json``) and its salt in hex."""
    document, salt = fhir.fhir_consent(v), domain.new_salt()
    path = folder / f"{name}.json"
    path.write_text(fhir.fhir_json(document))
    (folder / f"{name}.salt").write_text(salt.hex() + "\n")
    return Version(path, salt.hex(), fhir.commitment(document, salt), document)


async def build(rpc_url: str, folder: Path) -> World:
    w3 = chain.connect(rpc_url)
    try:
        accounts = await w3.eth.accounts
        deployment = await contracts.deploy_registries(w3, accounts[0], accounts[1])
        registry = chain.contract(w3, chain.CONSENT_REGISTRY, deployment.consent_registry)
        writer = deployment.anchorer

        async def write(call: Any) -> None:
            await contracts.transact_and_wait(w3, call, writer)

        def b(v: Version) -> bytes:
            return bytes.fromhex(v.commitment)

        consent_id = f"cns_chain{time.time_ns() % 10**9}"
        start = time.time() - 120
        valid = (int(start), int(start + 86_400))
        v1 = write_version(
            folder, "v1", consent_version(consent_id, 1, recorded_at=time.time() - V1_RECORDED_EARLIER, start=start)
        )
        # As anchoring writes them: grant; a change revokes its predecessor, then is granted; a
        # revocation only revokes.
        await write(registry.functions.grant(b(v1), *valid))
        v2 = write_version(folder, "v2", consent_version(consent_id, 2, recorded_at=time.time(), start=start))
        await write(registry.functions.revoke(b(v1), b(v2)))
        await write(registry.functions.grant(b(v2), *valid))
        v3 = write_version(
            folder, "v3", consent_version(consent_id, 3, recorded_at=time.time(), start=start, revoked=True)
        )
        await write(registry.functions.revoke(b(v2), b(v3)))
        other = write_version(folder, "other", consent_version("cns_other", 1, recorded_at=time.time(), start=start))
        await write(registry.functions.grant(b(other), valid[0] + 1, valid[1]))
        for v in (v1, v2, v3, other):
            v.entry = RegistryEntry.from_call(await registry.functions.statusOf(b(v)).call())
        policy = folder / "trust.json"
        policy.write_text(
            TrustPolicy(
                origin="medledger.test/consents",
                log_verifier_keys=("medledger.test/consents+00000000+AQ==",),
                chain_id=deployment.chain_id,
                anchor_registry=deployment.anchor_registry,
                consent_registry=deployment.consent_registry,
            ).to_json()
        )
        return World(rpc_url, deployment.consent_registry, deployment.chain_id, folder, policy, consent_id,
                     [v1, v2, v3], other)  # fmt: skip
    finally:
        await w3.provider.disconnect()


@pytest.fixture(scope="module")
def world(anvil: Anvil, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield asyncio.run(build(anvil.rpc_url, tmp_path_factory.mktemp("consents")))


def verify(world: World, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["verify", "consent", *args])
    out, err = capsys.readouterr()
    return code, out, err


def docs(world: World, *numbers: int) -> list[str]:
    return [str(world.version(n).path) for n in numbers]


def chain_args(world: World) -> list[str]:
    return ["--trust", str(world.policy), "--rpc", world.rpc_url]


def test_the_writes_came_in_the_anchoring_services_order(world: World) -> None:
    e1, e2, e3 = world.entry(1), world.entry(2), world.entry(3)
    assert (e1.status, e2.status, e3.status) == (2, 2, 0)
    assert e1.recorded_at < e1.revoked_at <= e2.recorded_at < e2.revoked_at
    assert e1.revoked_by.hex() == world.version(2).commitment
    assert e2.revoked_by.hex() == world.version(3).commitment


def test_the_patient_proves_which_version_was_in_force_at_each_time(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    e1, e2 = world.entry(1), world.entry(2)
    every = docs(world, 1, 2, 3)
    for when, version in ((e1.recorded_at, 1), (e1.revoked_at - 1, 1), (e2.recorded_at, 2), (e2.revoked_at - 1, 2)):
        code, out, err = verify(world, *every, *chain_args(world), "--at", str(when), capsys=capsys)
        assert code == 0, out + err
        assert f"IN FORCE: version {version} of consent {world.consent_id} was in force" in out, out
    # Every version's commitment and chain times are stated, and version 3 is known as the
    # revocation it is.
    for v in world.versions:
        assert f"commitment {v.commitment}" in out
    assert "on chain: revoked" in out and "on chain: unknown" in out
    assert "recorded on chain as the revocation of version 2" in out
    assert "revoked on chain at" in out and "by version 3" in out
    assert f"anchoring lag {e1.recorded_at - _recorded(world, 1):.1f} s after the document's dateTime" in out, out

    # Once version 2 is revoked, none is in force.
    code, out, _ = verify(world, *every, *chain_args(world), "--at", str(e2.revoked_at), capsys=capsys)
    assert code == 1 and "NOT IN FORCE: none of the versions given" in out, out
    assert "it is a revocation: it ended version 2" in out


def test_a_time_in_the_anchoring_lag_is_named_and_not_proved(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    e1 = world.entry(1)
    assert _recorded(world, 1) <= e1.recorded_at - 1
    code, out, _ = verify(world, *docs(world, 1), *chain_args(world), "--at", str(e1.recorded_at - 1), capsys=capsys)
    assert code == 1, out
    assert "the chain recorded it only at" in out and "falls in the anchoring lag" in out, out
    # Asked as an RFC 3339 time: the same second.
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e1.recorded_at))
    code, out, _ = verify(world, *docs(world, 1), *chain_args(world), "--at", at, capsys=capsys)
    assert code == 0 and "IN FORCE: version 1" in out, out


def test_now_a_revoked_version_is_not_in_force_and_its_revoker_is_named(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = verify(world, *docs(world, 1), *chain_args(world), capsys=capsys)
    assert code == 1, out
    assert f"by 0x{world.version(2).commitment} (a version not given)" in out
    assert "NOT IN FORCE" in out


def test_an_independent_check_agrees_on_commitments_statuses_and_answers(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    independent = _independent()
    e1, e2 = world.entry(1), world.entry(2)
    times = sorted(
        {e1.recorded_at - 1, e1.recorded_at, e1.revoked_at, e2.recorded_at, e2.revoked_at - 1, e2.revoked_at}
    )
    for n, v in enumerate(world.versions, start=1):
        on_chain = independent.consent_on_chain(world.rpc_url, world.registry, v.path.read_bytes(), v.salt)
        assert on_chain["commitment"] == v.commitment
        code, out, _ = verify(world, str(v.path), *chain_args(world), "--at", str(e1.recorded_at), capsys=capsys)
        assert f"commitment {on_chain['commitment']}" in out
        assert f"on chain: {on_chain['status']}" in out
        for when in times:
            code, out, _ = verify(world, str(v.path), *chain_args(world), "--at", str(when), capsys=capsys)
            assert (code == 0) == independent.in_force(on_chain, when), (n, when, out)


def test_the_verifiers_rule_is_the_contracts(world: World) -> None:
    independent = _independent()

    async def compare() -> None:
        w3 = chain.connect(world.rpc_url)
        try:
            registry = chain.contract(w3, chain.CONSENT_REGISTRY, world.registry)
            for v in [*world.versions, world.mismatched]:
                e = v.entry
                assert e is not None
                boundaries = {e.recorded_at, e.valid_from, e.valid_until, e.revoked_at} - {0}
                for when in sorted({t + d for t in boundaries for d in (-1, 0, 1)}):
                    contract = await registry.functions.isInForce(bytes.fromhex(v.commitment), when).call()
                    entry = independent.consent_on_chain(world.rpc_url, world.registry, v.path.read_bytes(), v.salt)
                    assert e.in_force(when) == contract == independent.in_force(entry, when), (v.path.name, when)
        finally:
            await w3.provider.disconnect()

    asyncio.run(compare())


def test_unknown_versions_other_chains_and_wrong_windows_are_not_proved(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    e1 = world.entry(1)
    at = ["--at", str(e1.recorded_at)]
    # Another salt: a commitment the chain never saw.
    code, out, _ = verify(world, *docs(world, 1), "--salt", "11" * 32, *chain_args(world), *at, capsys=capsys)
    assert code == 1 and "the registry has no record of this commitment" in out, out
    # A document changed by one character: the same.
    changed = tmp_path / "v1.json"
    changed.write_text(world.version(1).path.read_text().replace('"permit"', '"deny"'))
    code, out, _ = verify(world, str(changed), "--salt", world.version(1).salt, *chain_args(world), *at, capsys=capsys)
    assert code == 1 and "no record of this commitment" in out, out
    # The registry's window is not the document's period.
    mismatched = ["--salt", world.mismatched.salt, *chain_args(world), "--at", str(world.mismatched.entry.recorded_at)]  # type: ignore[union-attr]
    code, out, _ = verify(world, str(world.mismatched.path), *mismatched, capsys=capsys)
    assert code == 1 and "the window on chain is not the document's provision.period" in out and "NOT PROVED" in out
    # A policy naming another chain, or a registry address with no contract.
    policy = json.loads(world.policy.read_text())
    other_chain = tmp_path / "other-chain.json"
    other_chain.write_text(json.dumps({**policy, "chain_id": world.chain_id + 1}))
    code, out, _ = verify(
        world, *docs(world, 1), "--trust", str(other_chain), "--rpc", world.rpc_url, *at, capsys=capsys
    )
    assert code == 1 and f"serves chain {world.chain_id}" in out, out
    no_code = ["--consent-registry", "0x" + "12" * 20]
    code, out, _ = verify(world, *docs(world, 1), *chain_args(world), *no_code, *at, capsys=capsys)
    assert code == 1 and "there is no contract at" in out, out


def test_bad_input_exits_2_with_a_clear_message(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_json = tmp_path / "not-json.json"
    not_json.write_text('{"resourceType": "Consent", ')
    not_consent = tmp_path / "patient.json"
    not_consent.write_text('{"resourceType": "Patient", "status": "active"}')
    duplicate_key = tmp_path / "duplicate.json"
    duplicate_key.write_text('{"resourceType": "Consent", "status": "active", "status": "inactive"}')
    no_salt = tmp_path / "lonely.json"
    no_salt.write_bytes(world.version(1).path.read_bytes())
    other = str(world.mismatched.path)
    no_registry = tmp_path / "no-registry.json"
    no_registry.write_text(json.dumps({k: v for k, v in json.loads(world.policy.read_text()).items()
                                       if k != "consent_registry"}))  # fmt: skip
    v1, salt = docs(world, 1), ["--salt", world.version(1).salt]
    cases: list[tuple[list[str], str]] = [
        ([str(not_json), *salt, *chain_args(world)], "is not a consent document: consent: not JSON"),
        ([str(not_consent), *salt, *chain_args(world)], "not a FHIR Consent"),
        ([str(duplicate_key), *salt, *chain_args(world)], "duplicate JSON key"),
        ([*v1, "--salt", "abc", *chain_args(world)], "is not 32 bytes as 64 hex digits"),
        ([*v1, "--salt", "zz" * 32, *chain_args(world)], "is not 32 bytes as 64 hex digits"),
        ([*docs(world, 1, 2), *salt, *chain_args(world)], "2 consent document(s) but 1 --salt"),
        ([str(no_salt), *chain_args(world)], "no --salt given and no readable"),
        ([str(tmp_path / "missing.json"), *salt, *chain_args(world)], "cannot read the consent document"),
        ([*docs(world, 1), other, *chain_args(world)], "versions of different consents"),
        ([*docs(world, 1, 1), *chain_args(world)], "is the same version as"),
        ([*v1, *chain_args(world), "--at", "yesterday"], "--at is a time with its zone"),
        ([*v1, *chain_args(world), "--at", "2026-03-01T12:00:00"], "--at is a time with its zone"),
        ([*v1, "--trust", str(no_registry), "--rpc", world.rpc_url], "names no ConsentRegistry"),
        ([*v1, *chain_args(world), "--consent-registry", "0x1234"], "is not 20 bytes of 0x-hex"),
        ([*v1, "--trust", str(world.policy)], "needs --rpc URL"),
        ([*chain_args(world)], "usage: medledger verify consent DOCUMENT"),
    ]
    for args, message in cases:
        code, out, err = verify(world, *args, capsys=capsys)
        assert code == 2, (args, out, err)
        assert message in err and err.startswith("medledger: "), (args, err)
        assert "Traceback" not in out + err and out == "", (args, out)


def _recorded(world: World, n: int) -> float:
    """The version's own recorded time, from its document's dateTime."""
    return datetime.fromisoformat(world.version(n).document["dateTime"]).timestamp()
