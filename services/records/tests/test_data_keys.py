"""The data-key cache against a real local keyring: what it reuses, when it stops, what it forgets."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from medledger_records import domain
from medledger_records.data_keys import CacheLimits, DataKeyCache
from medledger_runtime.errors import DataLoss, FailedPrecondition, NotFound
from medledger_runtime.keys import KeyManager, KeyType, LocalKeyring, create_master_key_file
from medledger_runtime.keys.shredder import KeyShredder
from medledger_runtime.keys.wire import (
    parse_versioned,
)

NAME = "records-patient-p1"


class Counted:
    """A real key manager whose calls are counted (it forwards every call)."""

    def __init__(self, keys: KeyManager) -> None:
        self.keys = keys
        self.calls: Counter[str] = Counter()

    def __getattr__(self, operation: str) -> Any:
        method = getattr(self.keys, operation)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[operation] += 1
            return await method(*args, **kwargs)

        return counted


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def keyring(tmp_path: Path) -> Counted:
    master = tmp_path / "master.key"
    create_master_key_file(master)
    keys = await LocalKeyring.open(tmp_path / "ring" / "records.keyring", master)
    await keys.ensure_key(NAME, KeyType.AES256_GCM96)
    return Counted(keys)


def cache(keyring: Counted, clock: Clock | None = None, **limits: Any) -> DataKeyCache:
    return DataKeyCache(keyring, CacheLimits(**limits), clock or Clock())  # type: ignore[arg-type]


async def test_puts_share_a_data_key_until_max_uses(keyring: Counted) -> None:
    keys = cache(keyring, max_uses=3)
    wrapped = [(await keys.data_key_for(NAME, 100)).wrapped for _ in range(7)]
    assert len(set(wrapped[:3])) == 1 and len(set(wrapped[3:6])) == 1 and wrapped[0] != wrapped[3] != wrapped[6]
    assert keyring.calls["generate_data_key"] == 3


async def test_a_data_key_is_not_reused_past_max_age_or_max_bytes(keyring: Counted) -> None:
    clock = Clock()
    keys = cache(keyring, clock, max_age_seconds=60, max_bytes=1000)
    first = await keys.data_key_for(NAME, 600)
    assert (await keys.data_key_for(NAME, 400)).wrapped == first.wrapped  # 1,000 bytes: at the bound
    second = await keys.data_key_for(NAME, 1)
    assert second.wrapped != first.wrapped
    clock.now += 60
    assert (await keys.data_key_for(NAME, 1)).wrapped != second.wrapped
    assert keyring.calls["generate_data_key"] == 3


async def test_gets_reuse_what_was_unwrapped_or_made_within_max_age(keyring: Counted) -> None:
    clock = Clock()
    writer = cache(keyring, clock, max_age_seconds=60)
    made = await writer.data_key_for(NAME, 10)
    assert await writer.decrypt_data_key(NAME, made.wrapped) == made.plaintext
    assert keyring.calls["decrypt_data_key"] == 0  # the writer's own key: no unwrap

    reader = cache(keyring, clock, max_age_seconds=60)  # another process
    for _ in range(5):
        assert await reader.decrypt_data_key(NAME, made.wrapped) == made.plaintext
    assert keyring.calls["decrypt_data_key"] == 1
    clock.now += 61
    assert await reader.decrypt_data_key(NAME, made.wrapped) == made.plaintext
    assert keyring.calls["decrypt_data_key"] == 2


async def test_versions_sealed_under_a_shared_data_key_stay_bound_to_their_own_record(keyring: Counted) -> None:
    keys = cache(keyring)
    key = await keys.data_key_for(NAME, 10)
    one = domain.seal(key.plaintext, b"one", "rec_1", 1, "p1")
    two = domain.seal((await keys.data_key_for(NAME, 10)).plaintext, b"two", "rec_2", 1, "p1")
    assert domain.unseal(key.plaintext, one, "rec_1", 1, "p1") == b"one"
    with pytest.raises(DataLoss):
        domain.unseal(key.plaintext, two, "rec_1", 1, "p1")  # another record's ciphertext


async def test_no_cache_asks_every_time(keyring: Counted) -> None:
    keys = cache(keyring, max_age_seconds=0)
    made = [await keys.data_key_for(NAME, 10) for _ in range(3)]
    for key in made:
        await keys.decrypt_data_key(NAME, key.wrapped)
        await keys.ensure_key(NAME, KeyType.AES256_GCM96)
    assert len({k.wrapped for k in made}) == 3
    assert keyring.calls == Counter(generate_data_key=3, decrypt_data_key=3, ensure_key=3)


async def test_ensure_key_asks_once_per_patient(keyring: Counted) -> None:
    keys = cache(keyring)
    for _ in range(4):
        await keys.ensure_key(NAME, KeyType.AES256_GCM96)
    assert keyring.calls["ensure_key"] == 1


async def test_the_cache_holds_at_most_max_entries(keyring: Counted) -> None:
    keys = cache(keyring, max_entries=2)
    names = [f"records-patient-p{i}" for i in range(3)]
    for name in names:
        await keyring.keys.ensure_key(name, KeyType.AES256_GCM96)
        await keys.data_key_for(name, 10)
    await keys.data_key_for(names[0], 10)  # the oldest was dropped: a new key
    assert keyring.calls["generate_data_key"] == 4


async def test_rotation_forgets_the_data_keys_of_older_versions(keyring: Counted) -> None:
    keys = cache(keyring)
    before = await keys.data_key_for(NAME, 10)
    await keys.rotate(NAME)
    after = await keys.data_key_for(NAME, 10)
    assert parse_versioned(before.wrapped)[0] == 1 and parse_versioned(after.wrapped)[0] == 2
    await keys.set_min_decryption_version(NAME, 2)
    with pytest.raises(FailedPrecondition):
        await keys.decrypt_data_key(NAME, before.wrapped)  # not from the cache: the floor holds


async def test_an_erased_key_opens_nothing_from_the_cache(keyring: Counted) -> None:
    keys = cache(keyring)
    made = await keys.data_key_for(NAME, 10)
    shredder = KeyShredder(keyring.keys)
    shredder.also_forget(keys.purge)
    await shredder.shred(NAME)
    with pytest.raises(NotFound):
        await keys.decrypt_data_key(NAME, made.wrapped)
    with pytest.raises(NotFound):
        await keys.data_key_for(NAME, 10)


async def test_a_tampered_wrapped_key_is_data_loss_and_not_remembered(keyring: Counted) -> None:
    keys = cache(keyring)
    made = await keys.data_key_for(NAME, 10)
    version, body = parse_versioned(made.wrapped)
    tampered = f"vault:v{version}:{body[:-6]}AAAAA="
    for _ in range(2):
        with pytest.raises(DataLoss):
            await keys.decrypt_data_key(NAME, tampered)
    assert keyring.calls["decrypt_data_key"] == 2


async def test_the_search_index_key_is_kept_within_max_age_and_only_for_a_pinned_version(keyring: Counted) -> None:
    clock = Clock()
    keys = cache(keyring, clock, max_age_seconds=300)
    await keyring.keys.ensure_key("records-search-p1", KeyType.HMAC)
    first = await keys.hmac("records-search-p1", b"index-key", key_version=1)
    assert await keys.hmac("records-search-p1", b"index-key", key_version=1) == first
    assert keyring.calls["hmac"] == 1
    # Another input is another value; the latest version (unpinned) may change: never kept.
    await keys.hmac("records-search-p1", b"other", key_version=1)
    await keys.hmac("records-search-p1", b"index-key")
    await keys.hmac("records-search-p1", b"index-key")
    assert keyring.calls["hmac"] == 4
    clock.now += 300
    assert await keys.hmac("records-search-p1", b"index-key", key_version=1) == first
    assert keyring.calls["hmac"] == 5  # past max_age: asked again
    keys.purge("records-search-p1")
    await keys.hmac("records-search-p1", b"index-key", key_version=1)
    assert keyring.calls["hmac"] == 6
    # No cache: every time.
    off = cache(keyring, max_age_seconds=0)
    await off.hmac("records-search-p1", b"index-key", key_version=1)
    await off.hmac("records-search-p1", b"index-key", key_version=1)
    assert keyring.calls["hmac"] == 8
