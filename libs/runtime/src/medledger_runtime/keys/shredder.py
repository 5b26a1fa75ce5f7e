"""The one way a service destroys its keys: a key manager opened with the service's erasure
credential (Vault: a token of the policy ``<service>-erasure``, which may mark a key deletable
and delete it; the everyday token may not). Only a service's erasure path holds one."""

from __future__ import annotations

from collections.abc import Callable

from medledger_runtime.errors import NotFound
from medledger_runtime.keys.base import (
    KeyManager,
)
from medledger_runtime.keys.names import (
    LEGACY_PATIENT_KEY_PREFIX,
    LEGACY_TWIN_OWNERS,
    PATIENT_KEY_PREFIXES,
    validate_key_name,
)


def legacy_twin(name: str) -> str | None:
    """``patient-<pseudonym>`` for an owner's patient key ``<owner>-patient-<pseudonym>`` (the
    shared name its ciphertexts had before the key-owner migration); None for any other key."""
    for owner, prefix in PATIENT_KEY_PREFIXES.items():
        if owner in LEGACY_TWIN_OWNERS and name.startswith(prefix):
            return validate_key_name(LEGACY_PATIENT_KEY_PREFIX + name.removeprefix(prefix))
    return None


class KeyShredder:
    """Crypto-shredding through the erasure credential. ``reader`` reads key versions for a
    certificate: the erasure token may only mark deletable and delete (its policy requires
    ``deletion_allowed`` on every request, reads included), so reads go through the everyday key
    manager; by default ``keys`` itself (the local keyring)."""

    def __init__(self, keys: KeyManager, reader: KeyManager | None = None) -> None:
        self._keys = keys
        self._reader = reader or keys
        self._forget: list[Callable[[str], None]] = []

    def also_forget(self, forget: Callable[[str], None]) -> None:
        """Have `forget(name)` called before and after a key is shredded: a cache of what the
        key protects (records' data keys) must not outlive it in this process."""
        self._forget.append(forget)

    async def key_versions(self, name: str) -> list[int]:
        """The key's versions, read before it goes (for a certificate); [] when it never existed
        or is gone already."""
        try:
            info = await self._reader.key_info(name)
        except NotFound:
            return []
        return list(range(1, info.latest_version + 1))

    async def shred(self, name: str) -> None:
        """Delete every version of the key; done already is done. An owner's patient key takes
        its legacy twin ``patient-<pseudonym>`` with it: ciphertexts from before the key-owner
        migration (in backups, or not migrated yet) were made under that name."""
        names = [name] + [twin for twin in (legacy_twin(name),) if twin is not None]
        for each in names:
            for forget in self._forget:
                forget(each)
            await self._keys.erase_key(each)
            for forget in self._forget:
                forget(each)  # a put racing the erasure cached a key meanwhile

    async def aclose(self) -> None:
        await self._keys.aclose()
