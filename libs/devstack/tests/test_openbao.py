"""The OpenBao server the local stack and the tests run: a real ``bao server`` on raft storage,
initialized once, unsealed at every start, its keys kept across restarts, one token per policy."""

from __future__ import annotations

import json
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import hvac
import hvac.exceptions
import pytest

from medledger_devstack.localstack import HOST, free_port, repo_root
from medledger_devstack.openbao import OpenBao, bao_bin, bao_version
from medledger_devstack.testing import OpenBaoServer
from medledger_runtime.errors import PermissionDenied, Unavailable
from medledger_runtime.keys import KeyType, VaultKeyManager
from medledger_runtime.settings import ConfigError

# Two policies of the test's own, so these tests do not depend on what deploy/vault/ grants.
KEEPER = """
path "transit/keys/kept-*"    { capabilities = ["create", "read", "update"] }
path "transit/encrypt/kept-*" { capabilities = ["update"] }
path "transit/decrypt/kept-*" { capabilities = ["update"] }
"""
READER = """
path "transit/keys/kept-*" { capabilities = ["read"] }
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("policies")
    (folder / "keeper.hcl").write_text(KEEPER)
    (folder / "reader.hcl").write_text(READER)
    (folder / "README.md").write_text("not a policy")
    return folder


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory, policies: Path) -> Iterator[OpenBao]:
    """This module's own server: its tests restart and seal it (and leave it running, unsealed)."""
    folder = tmp_path_factory.mktemp("bao")
    server = OpenBao(folder / "state", folder / "secrets", policies)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_binary_is_the_pinned_version() -> None:
    assert bao_bin().is_file()
    assert bao_version() == "2.7.2"


def test_first_start_initializes_and_sets_up(bao: OpenBao) -> None:
    assert bao.alive() and bao.address == f"http://{HOST}:{bao.api_port}"
    init = json.loads(bao.init_path.read_text())
    assert set(init) == {"unseal_key", "root_token"}
    assert _mode(bao.init_path) == 0o600 and _mode(bao.state_dir) == 0o700
    root = bao.root_client()
    assert root.is_authenticated() and root.sys.is_initialized() and not root.sys.is_sealed()
    assert "transit/" in root.sys.list_mounted_secrets_engines()["data"]
    assert root.read("transit/config/keys")["data"] == {"disable_upsert": True}
    assert bao.policies == ["medledger-keeper", "medledger-reader"]
    assert {"medledger-keeper", "medledger-reader"} <= set(root.sys.list_policies()["data"]["policies"])
    assert root.sys.read_policy("medledger-keeper")["data"]["rules"] == KEEPER
    for name, path in bao.token_files.items():
        assert path == bao.secrets_dir / f"{name}.token" and _mode(path) == 0o600
        data = root.auth.token.lookup(path.read_text().strip())["data"]
        # Only its policy (not even "default"), orphan, renewable and periodic.
        assert data["policies"] == [name] and data["orphan"] and data["renewable"] and data["period"] > 0
    # Neither the unseal key nor the root token reaches the server's log.
    log = bao.log_path.read_text()
    assert init["unseal_key"] not in log and init["root_token"] not in log


async def test_restart_keeps_keys_and_tokens(bao: OpenBao) -> None:
    keeper = bao.token_file("keeper")
    before = {name: path.read_text() for name, path in bao.token_files.items()}
    init_before = bao.init_path.read_text()
    async with VaultKeyManager(bao.address, token_file=keeper, timeout=10) as km:
        await km.ensure_key("kept-restart", KeyType.AES256_GCM96)
        ciphertext = await km.encrypt("kept-restart", b"survives a restart")
    bao.stop()
    assert not bao.alive()
    bao.start()
    assert bao.init_path.read_text() == init_before  # initialized once, not again
    assert {name: path.read_text() for name, path in bao.token_files.items()} == before
    async with VaultKeyManager(bao.address, token_file=keeper, timeout=10) as km:
        assert await km.decrypt("kept-restart", ciphertext) == b"survives a restart"
    # A crash (SIGKILL) and a new object on the same folders, on other ports: still the same keys.
    bao.kill()
    again = OpenBao(bao.state_dir, bao.secrets_dir, bao.policies_dir)
    assert again.api_port != bao.api_port
    again.start()
    try:
        async with VaultKeyManager(again.address, token_file=keeper, timeout=10) as km:
            assert await km.decrypt("kept-restart", ciphertext) == b"survives a restart"
    finally:
        again.stop()
    bao.start()


def test_revoked_or_lost_tokens_are_minted_again(bao: OpenBao) -> None:
    keeper, reader = bao.token_file("keeper"), bao.token_file("reader")
    old_keeper, old_reader = keeper.read_text().strip(), reader.read_text().strip()
    root = bao.root_client()
    root.auth.token.revoke(old_keeper)
    reader.unlink()
    bao.stop()
    bao.start()
    new_keeper, new_reader = keeper.read_text().strip(), reader.read_text().strip()
    assert new_keeper != old_keeper and new_reader != old_reader
    assert _mode(keeper) == 0o600 and _mode(reader) == 0o600
    assert root.auth.token.lookup(new_keeper)["data"]["policies"] == ["medledger-keeper"]


async def test_sealed_is_unavailable_until_unsealed(bao: OpenBao) -> None:
    async with VaultKeyManager(bao.address, token_file=bao.token_file("keeper"), timeout=10) as km:
        await km.ensure_key("kept-sealed", KeyType.AES256_GCM96)
        ciphertext = await km.encrypt("kept-sealed", b"behind the seal")
        bao.seal()
        try:
            for call in (km.decrypt("kept-sealed", ciphertext), km.encrypt("kept-sealed", b"x")):
                with pytest.raises(Unavailable, match="sealed"):
                    await call
        finally:
            bao.unseal()
        assert await km.decrypt("kept-sealed", ciphertext) == b"behind the seal"


async def test_a_policy_token_is_refused_outside_its_policy(bao: OpenBao) -> None:
    async with VaultKeyManager(bao.address, token_file=bao.token_file("keeper"), timeout=10) as keeper:
        await keeper.ensure_key("kept-policy", KeyType.AES256_GCM96)
        ciphertext = await keeper.encrypt("kept-policy", b"x")
        with pytest.raises(PermissionDenied, match="permission denied"):
            await keeper.ensure_key("other-policy", KeyType.AES256_GCM96)
    # Straight to the server: a 403, not a mapping of ours.
    client = hvac.Client(url=bao.address, token=bao.token_file("keeper").read_text().strip())
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.transit.create_key("other-policy")
    async with VaultKeyManager(bao.address, token_file=bao.token_file("reader"), timeout=10) as reader:
        assert (await reader.key_info("kept-policy")).latest_version == 1
        for call in (reader.decrypt("kept-policy", ciphertext), reader.rotate("kept-policy")):
            with pytest.raises(PermissionDenied, match="permission denied"):
                await call


def test_missing_binary_is_a_config_error(tmp_path: Path) -> None:
    server = OpenBao(tmp_path / "state", tmp_path / "secrets", binary=tmp_path / "no-bao")
    with pytest.raises(ConfigError, match="no-bao does not exist"):
        server.start()


def test_a_server_that_does_not_come_up_names_its_log(tmp_path: Path) -> None:
    broken = tmp_path / "bao-that-fails"
    broken.write_text("#!/bin/sh\necho 'cannot start' >&2\nexit 3\n")
    broken.chmod(0o755)
    server = OpenBao(tmp_path / "state", tmp_path / "secrets", binary=broken)
    with pytest.raises(ConfigError, match="did not come up") as err:
        server.start(timeout=10)
    assert str(server.log_path) in str(err.value) and "exited with code 3" in str(err.value)
    assert "cannot start" in server.log_path.read_text()
    assert not server.alive()


def test_a_port_in_use_is_a_config_error(bao: OpenBao, tmp_path: Path) -> None:
    # Never talk to another server on our port as if it were ours.
    other = OpenBao(tmp_path / "state", tmp_path / "secrets", api_port=bao.api_port)
    with pytest.raises(ConfigError, match=f"API port {HOST}:{bao.api_port} is already in use"):
        other.start()
    assert other.process is None and not other.init_path.exists()


def test_storage_without_its_unseal_key_is_a_config_error(bao: OpenBao, tmp_path: Path) -> None:
    # Storage initialized elsewhere whose key file is gone: refuse rather than re-initialize.
    moved = tmp_path / "init.json"
    bao.stop()
    bao.init_path.rename(moved)
    try:
        with pytest.raises(ConfigError, match=r"unseal key file .* is missing") as err:
            bao.start()
        assert str(bao.init_path) in str(err.value)
        assert not bao.alive()
    finally:
        moved.rename(bao.init_path)
        bao.start()
    assert bao.root_client().is_authenticated()


def test_ports_given_are_used(tmp_path: Path) -> None:
    api, cluster = free_port(), free_port()
    server = OpenBao(tmp_path / "state", tmp_path / "secrets", api_port=api, cluster_port=cluster)
    assert server.address == f"http://{HOST}:{api}"
    config = server.config_path
    server._write_config()
    text = config.read_text()
    assert f'cluster_addr = "http://{HOST}:{cluster}"' in text and 'storage "raft"' in text
    assert "-dev" not in text and str(tmp_path / "state" / "raft") in text


def test_session_fixture_loads_the_repository_policies(openbao: OpenBaoServer) -> None:
    stems = sorted(p.stem for p in (repo_root() / "deploy" / "vault").glob("*.hcl"))
    assert stems and sorted(openbao.token_files) == [f"medledger-{s}" for s in stems]
    root = hvac.Client(url=openbao.address, token=openbao.root_token)
    for name, path in openbao.token_files.items():
        assert _mode(path) == 0o600
        assert root.auth.token.lookup(path.read_text().strip())["data"]["policies"] == [name]
        assert root.sys.read_policy(name)["data"]["rules"]
    # Everyday tokens are not root: creating a key under another service's name is refused.
    token = openbao.token_file("records").read_text().strip()
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=openbao.address, token=token).secrets.transit.create_key(f"t-{uuid.uuid4().hex[:8]}")
