"""The Vault key manager while its OpenBao node is not the active node for a moment (a restart,
or a step-down and re-election): OpenBao answers 500 "local node not active but active cluster
node not found" then, which is Vault being unavailable, not a missing key. (Read as NotFound, a
records read would answer "this patient's records were erased" during an OpenBao restart.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from medledger_devstack.openbao import OpenBao
from medledger_runtime.errors import Unavailable
from medledger_runtime.keys import KeyType, VaultKeyManager


async def test_a_node_stepping_down_is_unavailable_never_a_missing_key(tmp_path: Path) -> None:
    bao = OpenBao(tmp_path / "state", tmp_path / "secrets")
    await asyncio.to_thread(bao.start)
    keys = VaultKeyManager(bao.address, token=bao.root_token, timeout=5)
    try:
        await keys.ensure_key("failover-data", KeyType.AES256_GCM96)
        data_key = await keys.generate_data_key("failover-data")
        # The single node steps down and elects itself again; meanwhile it is not active.
        await asyncio.to_thread(bao.root_client().sys.step_down)
        refusals: list[Unavailable] = []
        deadline = time.monotonic() + 30
        while True:
            try:
                opened = await keys.decrypt_data_key("failover-data", data_key.wrapped)
                break
            except Unavailable as exc:  # anything else (NotFound, DataLoss) fails the test
                refusals.append(exc)
                assert time.monotonic() < deadline, f"OpenBao did not become active again: {exc}"
                await asyncio.sleep(0.01)
        assert opened == data_key.plaintext
        assert refusals, "the step-down was not met: no call reached the node while it was not active"
    finally:
        await keys.aclose()
        bao.kill()  # a stepped-down node takes seconds over a clean stop; its storage is thrown away
