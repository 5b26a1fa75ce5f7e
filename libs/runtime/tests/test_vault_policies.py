"""The policy matrix: every transit operation, with every token of deploy/vault/*.hcl, on every key
family, against a real OpenBao with those policy files loaded; each answer (403 or not) must be
what libs/runtime/KEYS.md's "Who may do what" table says."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from medledger_devstack.localstack import repo_root
from medledger_devstack.openbao import OpenBao
from medledger_runtime.errors import NotFound, PermissionDenied
from medledger_runtime.keys import (
    KeyShredder,
    KeyType,
    VaultKeyManager,
    legacy_patient_key_name,
    patient_key_name,
)

POLICIES = repo_root() / "deploy" / "vault"
KEYS_MD = repo_root() / "libs" / "runtime" / "KEYS.md"
TICK = "✓"
OPERATIONS = (
    "create",
    "read",
    "encrypt",
    "decrypt",
    "rewrap",
    "datakey",
    "hmac",
    "sign",
    "verify",
    "rotate",
    "config",
    "allow deletion",
    "trim",
    "delete",
    "export",
    "backup",
    "restore",
)
PSEUDONYM = f"pat_{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Family:
    """A key family as the table names it: its keys (by use) and how to make a new one."""

    label: str
    prefix: str  # a new key of the family is prefix + something; "" for a family of one key
    key_type: str
    keys: dict[str, str]  # use -> existing key name: "default", and "sign"/"hmac" where they differ

    def key_for(self, operation: str) -> str:
        return self.keys.get(operation, self.keys["default"])


FAMILIES = [
    Family(
        "`identity-patient-<id>`", "identity-patient-", "aes256-gcm96", {"default": f"identity-patient-{PSEUDONYM}"}
    ),
    Family(
        "`identity-*` service keys",
        "identity-",
        "aes256-gcm96",
        {
            "default": "identity-resources",
            "sign": "identity-token-signing",
            "verify": "identity-token-signing",
            "hmac": "identity-blind-index",
        },
    ),
    Family("`principal-<id>`", "principal-", "ed25519", {"default": f"principal-{PSEUDONYM}"}),
    Family("`consent-patient-<id>`", "consent-patient-", "aes256-gcm96", {"default": f"consent-patient-{PSEUDONYM}"}),
    Family("`records-patient-<id>`", "records-patient-", "aes256-gcm96", {"default": f"records-patient-{PSEUDONYM}"}),
    Family("`records-search-<id>`", "records-search-", "hmac", {"default": f"records-search-{PSEUDONYM}"}),
    Family(
        "`records-erasure-certificate`",
        "",
        "ed25519",
        {"default": "records-erasure-certificate"},
    ),
    Family("`audit-checkpoint-*`", "audit-checkpoint-", "ed25519", {"default": "audit-checkpoint-ed25519"}),
    Family("`audit-subject-<id>`", "audit-subject-", "hmac", {"default": f"audit-subject-{PSEUDONYM}"}),
    Family("`patient-<id>` (old, shared)", "patient-", "aes256-gcm96", {"default": f"patient-{PSEUDONYM}"}),
]
_KEY_TYPES = {
    "identity-token-signing": "ed25519",
    "identity-blind-index": "hmac",
}


def authorization_table() -> dict[tuple[str, str], set[str]]:
    """(token, family label) -> allowed operations, from KEYS.md's table."""
    text = KEYS_MD.read_text(encoding="utf-8")
    section = text.split("## Who may do what", 1)[1]
    lines = [line.strip() for line in section.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("| token | key family |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    assert tuple(header[2:]) == OPERATIONS, "KEYS.md's table has other columns than the test runs"
    table: dict[tuple[str, str], set[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        token = cells[0].strip("`")
        allowed = {op for op, cell in zip(OPERATIONS, cells[2:], strict=True) if cell == TICK}
        assert all(cell in ("", TICK) for cell in cells[2:]), line
        table[(token, cells[1])] = allowed
    return table


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """A server of this module's own: the matrix deletes and trims keys wherever a policy lets it."""
    folder = tmp_path_factory.mktemp("bao-policies")
    server = OpenBao(folder / "state", folder / "secrets", POLICIES)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Material:
    """What root made under each key, so that an allowed request is a well-formed one."""

    ciphertexts: dict[str, str]
    signatures: dict[str, str]
    backup: str


def _make_keys(bao: OpenBao) -> Material:
    root = bao.root_client()
    names = {name for f in FAMILIES for name in f.keys.values()}
    ciphertexts: dict[str, str] = {}
    signatures: dict[str, str] = {}
    for name in sorted(names):
        family = next(f for f in FAMILIES if name in f.keys.values())
        key_type = _KEY_TYPES.get(name, family.key_type)
        body: dict[str, Any] = {"type": key_type}
        if key_type == "hmac":
            body["key_size"] = 32
        root.adapter.post(f"/v1/transit/keys/{name}", json=body)
        root.adapter.post(f"/v1/transit/keys/{name}/rotate")  # two versions, so trim has one to drop
        if key_type == "aes256-gcm96":
            answer = root.adapter.post(f"/v1/transit/encrypt/{name}", json={"plaintext": _b64(b"x")})
            ciphertexts[name] = answer["data"]["ciphertext"]
        if key_type == "ed25519":
            answer = root.adapter.post(f"/v1/transit/sign/{name}", json={"input": _b64(b"x")})
            signatures[name] = answer["data"]["signature"]
    # A backup to restore: only a key made exportable with plaintext backups has one.
    spare = f"t-{uuid.uuid4().hex[:8]}-spare"
    root.adapter.post(f"/v1/transit/keys/{spare}", json={"exportable": True, "allow_plaintext_backup": True})
    backup = root.adapter.get(f"/v1/transit/backup/{spare}")["data"]["backup"]
    return Material(ciphertexts, signatures, backup)


def _new_name(family: Family) -> str:
    """A key of the family to create: a new one, or the family's only key (creating it again is
    what ensure_key does)."""
    return f"{family.prefix}mtx-{uuid.uuid4().hex[:8]}" if family.prefix else family.keys["default"]


def _requests(family: Family, material: Material) -> dict[str, Callable[[str, str], requests.Response]]:
    """Each column's request, as KEYS.md describes it, for (address, token)."""

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> Callable[[str, str], requests.Response]:
        def send(address: str, token: str) -> requests.Response:
            return requests.request(
                method, f"{address}/v1/transit/{path}", json=body, headers={"X-Vault-Token": token}, timeout=30
            )

        return send

    def key(op: str) -> str:
        return family.key_for(op)

    ciphertext = material.ciphertexts.get(key("decrypt"), "vault:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    signature = material.signatures.get(key("verify"), "vault:v1:AAAA")
    create_body: dict[str, Any] = {"type": family.key_type}
    if family.key_type == "hmac":
        create_body["key_size"] = 32
    return {
        "create": call("POST", f"keys/{_new_name(family)}", create_body),
        "read": call("GET", f"keys/{key('read')}"),
        "encrypt": call("POST", f"encrypt/{key('encrypt')}", {"plaintext": _b64(b"y")}),
        "decrypt": call("POST", f"decrypt/{key('decrypt')}", {"ciphertext": ciphertext}),
        "rewrap": call("POST", f"rewrap/{key('rewrap')}", {"ciphertext": ciphertext}),
        "datakey": call("POST", f"datakey/plaintext/{key('datakey')}", {"bits": 256}),
        "hmac": call("POST", f"hmac/{key('hmac')}", {"input": _b64(b"y")}),
        "sign": call("POST", f"sign/{key('sign')}", {"input": _b64(b"y")}),
        "verify": call("POST", f"verify/{key('verify')}", {"input": _b64(b"x"), "signature": signature}),
        "rotate": call("POST", f"keys/{key('rotate')}/rotate"),
        "config": call("POST", f"keys/{key('config')}/config", {"min_decryption_version": 1}),
        "allow deletion": call("POST", f"keys/{key('allow deletion')}/config", {"deletion_allowed": True}),
        "trim": call("POST", f"keys/{key('trim')}/trim", {"min_available_version": 1}),
        "delete": call("DELETE", f"keys/{key('delete')}"),
        "export": call("GET", f"export/encryption-key/{key('export')}"),
        "backup": call("GET", f"backup/{key('backup')}"),
        "restore": call("POST", f"restore/{_new_name(family)}", {"backup": material.backup}),
    }


def test_the_table_names_every_policy_and_family() -> None:
    table = authorization_table()
    tokens = {token for token, _ in table}
    assert tokens == {p.stem for p in POLICIES.glob("*.hcl")}, "a policy without a row in KEYS.md, or the reverse"
    labels = {f.label for f in FAMILIES}
    assert {label for _, label in table if table[(_, label)]} <= labels


def test_every_token_on_every_family_gets_what_keys_md_says(bao: OpenBao) -> None:
    table = authorization_table()
    tokens = {p.stem: bao.token_file(p.stem).read_text().strip() for p in sorted(POLICIES.glob("*.hcl"))}
    wrong: list[str] = []
    answered = 0
    for token_name, token in tokens.items():
        # Each token finds every key there (an erasure token before it may have deleted some:
        # then encrypt would be a "create", which no token has), with root's fresh ciphertexts.
        material = _make_keys(bao)
        for family in FAMILIES:
            expected = table.get((token_name, family.label), set())
            for operation, send in _requests(family, material).items():
                status = send(bao.address, token).status_code
                answered += 1
                assert status < 500, f"{token_name} {operation} on {family.label}: {status}"
                if (status != 403) != (operation in expected):
                    verdict = "allowed" if status != 403 else "refused"
                    wrong.append(f"{token_name} / {family.label} / {operation}: {verdict} ({status})")
    assert answered == len(tokens) * len(FAMILIES) * len(OPERATIONS)
    assert not wrong, "OpenBao and KEYS.md disagree:\n" + "\n".join(wrong)


def test_no_everyday_token_may_destroy_or_take_a_key_out() -> None:
    """What the issue asks of the table itself: no everyday token deletes, trims, exports, backs
    up or restores, or sets deletion_allowed; erasure tokens only mark deletable and delete."""
    destroying = {"trim", "delete", "export", "backup", "restore", "allow deletion"}
    for (token, family), allowed in authorization_table().items():
        if token.endswith("-erasure"):
            assert allowed <= {"allow deletion", "delete"}, (token, family)
        else:
            assert not allowed & destroying, (token, family)
    for owner in ("identity", "consent", "records", "audit"):
        assert (POLICIES / f"{owner}-erasure.hcl").is_file()


def _read_policy(path: Path) -> str:
    return "\n".join(line.split("#")[0] for line in path.read_text().splitlines())


def test_no_policy_reaches_into_another_services_keys() -> None:
    owners = {"identity": ("identity-", "principal-"), "consent": ("consent-",), "records": ("records-",)}
    owners["audit"] = ("audit-",)
    for path in POLICIES.glob("*.hcl"):
        owner = path.stem.split("-")[0]
        if owner not in owners:
            continue
        paths = re.findall(
            r'path\s+"transit/(?:keys|encrypt|decrypt|rewrap|datakey/plaintext|hmac|sign|verify)/([^"/]+)',
            _read_policy(path),
        )
        for target in paths:
            legacy = target == "patient-*" and path.stem.endswith("-erasure")
            assert legacy or target.startswith(owners[owner]), (path.name, target)


# -- what each service does, through VaultKeyManager, with its own tokens --------------------------


def _km(bao: OpenBao, policy: str) -> VaultKeyManager:
    return VaultKeyManager(bao.address, token_file=bao.token_file(policy))


async def test_each_service_does_its_everyday_work_and_erasure_with_its_own_tokens(bao: OpenBao) -> None:
    patient = f"pat_{uuid.uuid4().hex[:10]}"
    async with (
        _km(bao, "identity") as identity,
        _km(bao, "consent") as consent,
        _km(bao, "records") as records,
        _km(bao, "audit") as audit,
    ):
        # identity: the patient's resource with associated data, its signing key, blind index,
        # a principal's key pair.
        name = patient_key_name("identity", patient)
        await identity.ensure_key(name, KeyType.AES256_GCM96)
        await identity.ensure_key(name, KeyType.AES256_GCM96)  # again: ensure is idempotent
        resource = await identity.encrypt(name, b"{}", associated_data=patient.encode())
        assert await identity.decrypt(name, resource, associated_data=patient.encode()) == b"{}"
        await identity.ensure_key("identity-token-signing", KeyType.ED25519)
        await identity.rotate("identity-token-signing")
        signature = await identity.sign("identity-token-signing", b"jwt", marshaling="jws")
        assert await identity.verify("identity-token-signing", b"jwt", signature)
        assert 2 in (await identity.public_key("identity-token-signing")).versions
        await identity.ensure_key("identity-blind-index", KeyType.HMAC)
        await identity.hmac("identity-blind-index", b"urn:x|1", key_version=1)
        await identity.ensure_key(f"principal-{patient}", KeyType.ED25519)
        await identity.public_key(f"principal-{patient}")

        # consent: a justification under its own key.
        name = patient_key_name("consent", patient)
        await consent.ensure_key(name, KeyType.AES256_GCM96)
        justification = await consent.encrypt(name, b"why", associated_data=b"bg_1")
        assert await consent.decrypt(name, justification, associated_data=b"bg_1") == b"why"

        # records: data keys, and a whole rotation.
        name = patient_key_name("records", patient)
        await records.ensure_key(name, KeyType.AES256_GCM96)
        data_key = await records.generate_data_key(name)
        await records.rotate(name)
        wrapped = await records.rewrap(name, data_key.wrapped)
        await records.set_min_decryption_version(name, 2)
        assert await records.decrypt_data_key(name, wrapped) == data_key.plaintext

        # audit: subject HMACs and checkpoint signatures.
        subject = patient_key_name("audit", patient)
        await audit.ensure_key(subject, KeyType.HMAC)
        await audit.ensure_key(subject, KeyType.HMAC)
        assert len(await audit.hmac_many([(subject, patient.encode())])) == 1
        for checkpoint, key_type in (
            ("audit-checkpoint-ed25519", KeyType.ED25519),
            ("audit-checkpoint-p256", KeyType.ECDSA_P256),
        ):
            await audit.ensure_key(checkpoint, key_type)
            signed = await audit.sign(checkpoint, b"note")
            assert await audit.verify(checkpoint, b"note", signed)
            await audit.public_key(checkpoint)

        # Nobody's everyday token destroys, or touches another's keys.
        with pytest.raises(PermissionDenied):
            await records.erase_key(patient_key_name("records", patient))
        with pytest.raises(PermissionDenied):
            await audit.rotate(subject)
        with pytest.raises(PermissionDenied):
            await identity.decrypt_data_key(patient_key_name("records", patient), wrapped)
        with pytest.raises(PermissionDenied):
            await consent.decrypt(patient_key_name("identity", patient), resource, associated_data=patient.encode())

        # Each erasure token destroys its own keys, and the old shared one with it.
        root = bao.root_client()
        root.adapter.post(f"/v1/transit/keys/{legacy_patient_key_name(patient)}", json={"type": "aes256-gcm96"})
        for owner, everyday in (("identity", identity), ("consent", consent), ("records", records), ("audit", audit)):
            async with _km(bao, f"{owner}-erasure") as erasure_keys:
                shredder = KeyShredder(erasure_keys, reader=everyday)
                name = patient_key_name(owner, patient)  # type: ignore[arg-type]
                if owner == "records":
                    assert await shredder.key_versions(name) == [1, 2]
                await shredder.shred(name)
                await shredder.shred(name)  # again: done is done
                with pytest.raises(PermissionDenied):  # and nothing of another owner's
                    other = "records" if owner != "records" else "identity"
                    await erasure_keys.erase_key(patient_key_name(other, f"{patient}x"))
            with pytest.raises(NotFound):
                await _read_as_root(bao, name)
        with pytest.raises(NotFound):
            await _read_as_root(bao, legacy_patient_key_name(patient))


async def _read_as_root(bao: OpenBao, name: str) -> None:
    async with VaultKeyManager(bao.address, token=bao.root_token) as root:
        await root.key_info(name)
