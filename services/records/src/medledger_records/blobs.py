"""Where ciphertexts live when not in the database row: a blob store.

Only sealed bytes (AES-256-GCM under a data key the database holds wrapped) ever reach it, so a
blob store needs no access control of its own to keep records confidential; it is for size.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Protocol

from medledger_runtime.errors import DataLoss
from medledger_runtime.files import write_atomically

_KEY = re.compile(r"^rec_[0-9a-f]{32}/[1-9][0-9]{0,9}$")


def blob_key(record_id: str, version: int) -> str:
    return f"{record_id}/{version}"


class BlobStore(Protocol):
    async def put(self, key: str, data: bytes) -> None: ...

    async def get(self, key: str) -> bytes:
        """The bytes stored under `key`; DataLoss if they are gone."""
        ...

    async def delete(self, key: str) -> None:
        """Remove `key`; nothing happens when it is already gone."""
        ...


class FilesystemBlobStore:
    """One file per record version under `root`: `<record id>/<version>`, written atomically
    (medledger_runtime.files), so a crash leaves the old state or the new one. A put whose
    database transaction then fails leaves an orphan file: sealed under a data key that was never
    stored, it can never be decrypted."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"not a blob key: {key[:80]!r}")
        return self.root / key

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._write, self._path(key), data)

    async def get(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self._path(key).read_bytes)
        except FileNotFoundError:
            raise DataLoss("a stored record version's ciphertext is missing from the blob store") from None

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await asyncio.to_thread(path.unlink, missing_ok=True)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomically(path, data)
