"""The tree core (medledger_verifier.tlog) against an independent reading of the RFCs.

The reference hasher, PATH/PROOF and the two verifiers below are written in this file from
RFC 6962 §2.1 and RFC 9162 §2.1.3.2 / §2.1.4.2; they import nothing from the production code.
The expected roots and proofs of the 8 well-known leaves are carried in as data from
transparency-dev/merkle (testonly/constants.go and testonly/reference_test.go).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from functools import lru_cache

import pytest

from medledger_runtime.errors import DataLoss, InvalidArgument
from medledger_verifier import tlog

# --- transparency-dev/merkle test vectors -----------------------------------------------------

LEAF_INPUTS = [
    bytes.fromhex(h)
    for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f")
]
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
# (index, size) -> proof, from reference_test.go TestRefInclusionProof.
INCLUSION_VECTORS = {
    (0, 1): [],
    (0, 2): ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"],
    (1, 2): ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"],
    (2, 3): ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    (1, 5): [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}
# (size1, size2) -> proof, from reference_test.go TestRefConsistencyProof.
CONSISTENCY_VECTORS = {
    (1, 1): [],
    (1, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}


# --- the independent reference (RFC 6962 §2.1, RFC 9162 §2.1.3.2 and §2.1.4.2) ----------------


def ref_leaf(entry: bytes) -> bytes:
    return hashlib.sha256(bytes([0]) + entry).digest()


def ref_node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(bytes([1]) + left + right).digest()


def ref_split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


class RefTree:
    """MTH, PATH and PROOF of RFC 6962 §2.1, recursively over a list of leaf hashes."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        self.leaves = list(leaves)
        self.mth = lru_cache(maxsize=None)(self._mth)

    def _mth(self, lo: int, hi: int) -> bytes:
        if hi - lo == 0:
            return hashlib.sha256(b"").digest()
        if hi - lo == 1:
            return self.leaves[lo]
        k = ref_split(hi - lo)
        return ref_node(self.mth(lo, lo + k), self.mth(lo + k, hi))

    def root(self, n: int) -> bytes:
        return self.mth(0, n)

    def path(self, m: int, lo: int, hi: int) -> list[bytes]:
        if hi - lo == 1:
            return []
        k = ref_split(hi - lo)
        if m < k:
            return [*self.path(m, lo, lo + k), self.mth(lo + k, hi)]
        return [*self.path(m - k, lo + k, hi), self.mth(lo, lo + k)]

    def subproof(self, m: int, lo: int, hi: int, b: bool) -> list[bytes]:
        n = hi - lo
        if m == n:
            return [] if b else [self.mth(lo, hi)]
        k = ref_split(n)
        if m <= k:
            return [*self.subproof(m, lo, lo + k, b), self.mth(lo + k, hi)]
        return [*self.subproof(m - k, lo + k, hi, False), self.mth(lo, lo + k)]

    def consistency(self, m: int, n: int) -> list[bytes]:
        return [] if m in (0, n) else self.subproof(m, 0, n, True)


def ref_verify_inclusion(leaf_index: int, tree_size: int, leaf_hash: bytes, path: Sequence[bytes], root: bytes) -> bool:
    # RFC 9162 §2.1.3.2, step by step.
    if leaf_index >= tree_size:
        return False
    fn, sn, r = leaf_index, tree_size - 1, leaf_hash
    for p in path:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            r = ref_node(p, r)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn, sn = fn // 2, sn // 2
        else:
            r = ref_node(r, p)
        fn, sn = fn // 2, sn // 2
    return sn == 0 and r == root


def ref_verify_consistency(
    first: int, second: int, first_hash: bytes, second_hash: bytes, path: Sequence[bytes]
) -> bool:
    # RFC 9162 §2.1.4.2, step by step (first == second and first == 0 handled as the RFC's
    # callers do: equal trees need no proof, anything extends the empty tree).
    if first > second:
        return False
    if first == second:
        return len(path) == 0 and first_hash == second_hash
    if first == 0:
        return len(path) == 0
    if len(path) == 0:
        return False
    path = list(path)
    if first & (first - 1) == 0:
        path = [first_hash, *path]
    fn, sn = first - 1, second - 1
    if fn % 2 == 1:
        while fn % 2 == 1:
            fn, sn = fn // 2, sn // 2
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            fr, sr = ref_node(c, fr), ref_node(c, sr)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn, sn = fn // 2, sn // 2
        else:
            sr = ref_node(sr, c)
        fn, sn = fn // 2, sn // 2
    return sn == 0 and fr == first_hash and sr == second_hash


# --- building trees with the production code --------------------------------------------------


def entry(i: int) -> bytes:
    return f"entry {i}".encode()


async def build(leaves: Sequence[bytes], batches: Sequence[int] = (1,)) -> tlog.MemoryTiles:
    """Append ``leaves`` in batches of the given sizes (cycled), checking each root on the way."""
    store, size, turn = tlog.MemoryTiles(), 0, 0
    while size < len(leaves):
        batch = batches[turn % len(batches)]
        turn += 1
        result = await tlog.append(store, size, leaves[size : size + batch])
        store.write(result.tiles)
        size = result.tree_size
        assert result.root == await tlog.tree_root(store, size)
    return store


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


# --- test vectors -----------------------------------------------------------------------------


def test_hashing_and_roots_reproduce_the_reference_vectors() -> None:
    async def go() -> None:
        store, size = tlog.MemoryTiles(), 0
        assert await tlog.tree_root(store, 0) == bytes.fromhex(ROOTS[0]) == tlog.EMPTY_ROOT
        for data in LEAF_INPUTS:
            result = await tlog.append(store, size, [tlog.leaf_hash(data)])
            store.write(result.tiles)
            size = result.tree_size
            assert result.root.hex() == ROOTS[size]
        for n in range(9):  # every earlier size from the same tiles
            assert (await tlog.tree_root(store, n)).hex() == ROOTS[n]
        for (index, n), want in INCLUSION_VECTORS.items():
            assert [p.hex() for p in await tlog.inclusion_proof(store, index, n)] == want
        for (m, n), want in CONSISTENCY_VECTORS.items():
            assert [p.hex() for p in await tlog.consistency_proof(store, m, n)] == want

    run(go())
    # the independent reference agrees with the same data
    ref = RefTree([ref_leaf(d) for d in LEAF_INPUTS])
    assert [ref.root(n).hex() for n in range(9)] == ROOTS
    assert tlog.node_hash(b"a" * 32, b"b" * 32) == ref_node(b"a" * 32, b"b" * 32)


# --- every proof of small trees ---------------------------------------------------------------


def test_every_proof_up_to_70_leaves_matches_the_reference_and_verifies() -> None:
    leaves = [tlog.leaf_hash(entry(i)) for i in range(70)]
    ref = RefTree([ref_leaf(entry(i)) for i in range(70)])
    assert leaves == ref.leaves

    async def go() -> None:
        store = await build(leaves, batches=(1, 3, 7))
        for n in range(1, 71):
            root = ref.root(n)
            assert await tlog.tree_root(store, n) == root
            for i in range(n):
                proof = await tlog.inclusion_proof(store, i, n)
                assert proof == ref.path(i, 0, n)
                assert ref_verify_inclusion(i, n, leaves[i], proof, root)
                assert tlog.verify_inclusion(i, n, leaves[i], proof, root)
            for m in range(0, n + 1):
                proof = await tlog.consistency_proof(store, m, n)
                assert proof == ref.consistency(m, n)
                assert ref_verify_consistency(m, n, ref.root(m), root, proof)
                assert tlog.verify_consistency(m, n, ref.root(m), root, proof)

    run(go())


# --- larger trees: partial and full tiles at levels 0, 1 and 2 --------------------------------


def expected_tile(ref: RefTree, tile: tlog.Tile) -> bytes:
    """C2SP: hash i of tile n at level l is MTH(D[(n*256+i)*256**l : (n*256+i+1)*256**l])."""
    span = 256**tile.level
    return b"".join(
        ref.mth((tile.index * 256 + i) * span, (tile.index * 256 + i + 1) * span) for i in range(tile.width)
    )


@pytest.fixture(scope="module")
def big() -> tuple[tlog.MemoryTiles, RefTree]:
    count = 70_000  # the tlog-tiles spec's example size: tiles at levels 0, 1 and 2
    leaves = [tlog.leaf_hash(entry(i)) for i in range(count)]
    store = run(build(leaves, batches=(1, 255, 1000, 2, 4096, 17)))
    return store, RefTree(leaves)


def test_tiles_of_70000_leaves_are_laid_out_as_the_spec_says(big: tuple[tlog.MemoryTiles, RefTree]) -> None:
    store, ref = big
    # "273 full level 0 tiles, one partial level 0 tile of width 112, one full level 1 tile, one
    # partial level 1 tile of width 17, and one partial level 2 tile of width 1"
    level0, level1, level2 = (list(tlog.tiles_at(70_000, level)) for level in range(3))
    assert sum(t.is_full for t in level0) == 273 and level0[-1].width == 112 and len(level0) == 274
    assert [t.width for t in level1] == [256, 17]
    assert [t.width for t in level2] == [1]
    assert tlog.tile_levels(70_000) == 3 and tlog.tile_levels(256) == 2 and tlog.tile_levels(255) == 1
    assert set(store.tiles) == {(t.level, t.index) for t in level0 + level1 + level2}
    for tile in level0[:3] + level0[-2:] + level1 + level2:
        assert store.tiles[(tile.level, tile.index)] == expected_tile(ref, tile), tile


def test_roots_and_proofs_across_tile_boundaries(big: tuple[tlog.MemoryTiles, RefTree]) -> None:
    store, ref = big
    sizes = [1, 255, 256, 257, 511, 512, 513, 4096, 5000, 65_535, 65_536, 65_537, 65_792, 69_999, 70_000]

    async def go() -> None:
        for n in sizes:
            root = ref.root(n)
            assert await tlog.tree_root(store, n) == root
            for i in {0, 1, 254, 255, 256, 257, 4095, 65_535, 65_536, n // 2, n - 2, n - 1}:
                if not 0 <= i < n:
                    continue
                before = store.reads
                proof = await tlog.inclusion_proof(store, i, n)
                assert store.reads - before <= 1  # one batch read per proof
                assert proof == ref.path(i, 0, n)
                assert ref_verify_inclusion(i, n, ref.leaves[i], proof, root)
            for m in sizes:
                if m <= n:
                    proof = await tlog.consistency_proof(store, m, n)
                    assert proof == ref.consistency(m, n)
                    assert ref_verify_consistency(m, n, ref.root(m), root, proof)

    run(go())


def test_a_proof_reads_few_tiles(big: tuple[tlog.MemoryTiles, RefTree]) -> None:
    store, _ = big

    async def go() -> None:
        for n in (65_537, 70_000):
            for i in (0, 300, 65_536, n - 1):
                before = store.tiles_read
                await tlog.inclusion_proof(store, i, n)
                # at most a few tiles per level (3 levels here), never the whole tree
                assert store.tiles_read - before <= 2 * tlog.tile_levels(n) + 1
            before = store.tiles_read
            await tlog.consistency_proof(store, 1000, n)
            assert store.tiles_read - before <= 3 * tlog.tile_levels(n)

    run(go())


def test_append_in_any_batches_gives_the_same_tiles() -> None:
    leaves = [tlog.leaf_hash(entry(i)) for i in range(1300)]
    one_by_one = run(build(leaves, batches=(1,)))
    in_batches = run(build(leaves, batches=(700, 600)))
    assert one_by_one.tiles == in_batches.tiles


def test_append_reads_only_partial_tiles_and_writes_only_what_changed() -> None:
    leaves = [tlog.leaf_hash(entry(i)) for i in range(600)]

    async def go() -> None:
        store = await build(leaves[:300])
        result = await tlog.append(store, 300, leaves[300:600])
        # level 0: tile 1 (width 44) grows to full, tile 2 appears (width 88); level 1 grows to 2
        assert sorted(result.tiles) == [tlog.Tile(0, 1, 256), tlog.Tile(0, 2, 88), tlog.Tile(1, 0, 2)]
        assert [t.path() for t in sorted(result.tiles)] == ["tile/0/001", "tile/0/002.p/88", "tile/1/000.p/2"]
        assert tlog.changed_tiles(300, 600, 0) == [tlog.Tile(0, 1, 256), tlog.Tile(0, 2, 88)]
        assert tlog.changed_tiles(300, 600, tlog.ENTRIES_LEVEL) == [
            tlog.Tile(tlog.ENTRIES_LEVEL, 1, 256),
            tlog.Tile(tlog.ENTRIES_LEVEL, 2, 88),
        ]
        empty = await tlog.append(store, 300, [])
        assert empty.tiles == {} and empty.root == await tlog.tree_root(store, 300)
        with pytest.raises(InvalidArgument):
            await tlog.append(store, 300, [b"short"])

    run(go())


def test_storage_answering_wrong_tiles_is_data_loss() -> None:
    class Broken:
        async def read_tiles(self, tiles: Sequence[tlog.Tile]) -> Sequence[bytes]:
            return [b"\x00" * 31 for _ in tiles]

    async def go() -> None:
        with pytest.raises(DataLoss):
            await tlog.tree_root(Broken(), 5)
        with pytest.raises(DataLoss):
            await tlog.tree_root(tlog.MemoryTiles(), 5)  # missing tiles
        store = await build([tlog.leaf_hash(b"x")] * 3)
        with pytest.raises(DataLoss):  # tiles only grow: rewriting a hash is refused
            store.write({tlog.Tile(0, 0, 1): b"\x01" * 32})

    run(go())


# --- adversarial proofs -----------------------------------------------------------------------


def flips(proof: Sequence[bytes]) -> list[list[bytes]]:
    out = []
    for i, h in enumerate(proof):
        for byte in (0, 31):
            changed = bytearray(h)
            changed[byte] ^= 0x01
            out.append([*proof[:i], bytes(changed), *proof[i + 1 :]])
    return out


def test_forged_inclusion_proofs_are_refused() -> None:
    # A proof is always checked against a checkpoint's (size, root) pair: RFC 9162's verifier
    # does not bind the size to the root by itself (leaf 5's proof in a tree of 8 also passes
    # "size 7" with the root of 8), so a wrong size is presented with that size's own root.
    leaves = [tlog.leaf_hash(entry(i)) for i in range(310)]
    other = [tlog.leaf_hash(b"other " + entry(i)) for i in range(310)]
    ref, ref_other = RefTree(leaves), RefTree(other)

    async def go() -> None:
        store = await build(leaves, batches=(50,))
        other_store = await build(other, batches=(50,))
        for i, n in [(0, 1), (0, 2), (5, 8), (6, 7), (0, 256), (255, 256), (256, 257), (123, 300), (299, 300)]:
            root = ref.root(n)
            proof = await tlog.inclusion_proof(store, i, n)
            assert tlog.verify_inclusion(i, n, leaves[i], proof, root)
            forged: list[tuple[int, int, bytes, list[bytes], bytes]] = []
            forged += [(i, n, leaves[i], p, root) for p in flips(proof)]
            forged.append((i + 1, n, leaves[i], proof, root))  # wrong index
            if i > 0:
                forged.append((i - 1, n, leaves[i], proof, root))
            forged.append((i, n + 1, leaves[i], proof, ref.root(n + 1)))  # wrong size
            forged.append((i, n + 2, leaves[i], proof, ref.root(n + 2)))
            if i < n - 1:
                forged.append((i, n - 1, leaves[i], proof, ref.root(n - 1)))
            if n > 1:
                forged.append((i, n, leaves[(i + 1) % n], proof, root))  # another leaf
            forged.append((i, n, other[i], await tlog.inclusion_proof(other_store, i, n), root))  # another tree
            forged.append((i, n, leaves[i], proof, ref_other.root(n)))  # another tree's root
            if proof:
                forged.append((i, n, leaves[i], proof[:-1], root))  # truncated
                forged.append((i, n, leaves[i], proof[1:], root))
            forged.append((i, n, leaves[i], [*proof, root], root))  # extended
            forged.append((i, n, leaves[i], [leaves[0], *proof], root))
            for args in forged:
                assert not tlog.verify_inclusion(*args), args[:2]
                assert not ref_verify_inclusion(*args), args[:2]
        assert not tlog.verify_inclusion(0, 0, leaves[0], [], tlog.EMPTY_ROOT)
        assert not tlog.verify_inclusion(0, 1, leaves[0], [b"short"], leaves[0])

    run(go())


def test_forged_consistency_proofs_are_refused() -> None:
    leaves = [tlog.leaf_hash(entry(i)) for i in range(310)]
    other = [tlog.leaf_hash(b"other " + entry(i)) for i in range(310)]
    ref, ref_other = RefTree(leaves), RefTree(other)

    async def go() -> None:
        store = await build(leaves, batches=(64,))
        other_store = await build(other, batches=(64,))
        for m, n in [(1, 2), (1, 8), (2, 5), (3, 7), (6, 8), (4, 8), (255, 256), (256, 257), (100, 300), (256, 300)]:
            old, new = ref.root(m), ref.root(n)
            proof = await tlog.consistency_proof(store, m, n)
            assert tlog.verify_consistency(m, n, old, new, proof)
            forged: list[tuple[int, int, bytes, bytes, list[bytes]]] = [(m, n, old, new, p) for p in flips(proof)]
            forged += [
                (m + 1, n, ref.root(m + 1), new, proof),  # wrong sizes, each with its own root
                (m - 1, n, ref.root(m - 1), new, proof),
                (m, n + 1, old, ref.root(n + 1), proof),
                (m, n - 1, old, ref.root(n - 1), proof),
                (m + 1, n, old, new, proof),  # a size that does not go with the root
                (n, m, new, old, proof),  # swapped
                (m, n, ref_other.root(m), ref_other.root(n), proof),  # another tree
                (m, n, old, new, await tlog.consistency_proof(other_store, m, n)),
                (m, n, old, ref_other.root(n), proof),  # a fork after m
                (m, n, old, new, proof[:-1]),  # truncated
                (m, n, old, new, proof[1:]),
                (m, n, old, new, [*proof, new]),  # extended
                (m, n, old, new, []),
            ]
            for args in forged:
                if args[0] == args[1] and args[2] == args[3] and not args[4]:
                    continue
                assert not tlog.verify_consistency(*args), args[:2]
                assert not ref_verify_consistency(*args), args[:2]
        # equal sizes need equal roots; nothing but an empty proof extends the empty tree
        assert tlog.verify_consistency(5, 5, ref.root(5), ref.root(5), [])
        assert not tlog.verify_consistency(5, 5, ref.root(5), ref_other.root(5), [])
        assert not tlog.verify_consistency(5, 5, ref.root(5), ref.root(5), [ref.root(5)])
        assert tlog.verify_consistency(0, 5, tlog.EMPTY_ROOT, ref.root(5), [])
        assert not tlog.verify_consistency(0, 5, tlog.EMPTY_ROOT, ref.root(5), [ref.root(5)])

    run(go())


def test_bad_proof_requests_are_invalid_arguments() -> None:
    async def go() -> None:
        store = await build([tlog.leaf_hash(entry(i)) for i in range(10)])
        for call in (
            tlog.inclusion_proof(store, 10, 10),
            tlog.inclusion_proof(store, -1, 10),
            tlog.consistency_proof(store, 11, 10),
            tlog.tree_root(store, -1),
        ):
            with pytest.raises(InvalidArgument):
                await call
        assert await tlog.leaf_hashes(store, 3, 5, 10) == [tlog.leaf_hash(entry(3)), tlog.leaf_hash(entry(4))]

    run(go())


# --- tile paths and entry bundles -------------------------------------------------------------


def test_tile_paths_follow_the_spec() -> None:
    assert tlog.encode_tile_index(1234067) == "x001/x234/067"
    assert tlog.encode_tile_index(0) == "000"
    assert tlog.encode_tile_index(5) == "005"
    assert tlog.encode_tile_index(1000) == "x001/000"
    assert tlog.Tile(0, 1234067, 256).path() == "tile/0/x001/x234/067"
    assert tlog.Tile(1, 3, 17).path() == "tile/1/003.p/17"
    assert tlog.Tile(tlog.ENTRIES_LEVEL, 1234067, 256).path() == "tile/entries/x001/x234/067"
    assert tlog.Tile(tlog.ENTRIES_LEVEL, 0, 5).path() == "tile/entries/000.p/5"
    for path in ("tile/0/x001/x234/067", "tile/63/000", "tile/2/000.p/1", "tile/entries/x001/000.p/255", "tile/12/999"):
        assert tlog.parse_tile_path(path).path() == path
    assert tlog.parse_tile_path("tile/entries/x001/x234/067.p/3") == tlog.Tile(tlog.ENTRIES_LEVEL, 1234067, 3)
    for bad in (
        "tile/0/1234067",
        "tile/0/x000/005",  # not canonical
        "tile/00/000",
        "tile/64/000",
        "tile/0/000.p/256",
        "tile/0/000.p/0",
        "tile/0/000.p/05",
        "tile/0/x001",
        "tile/0/01",
        "tile/data/000",
        "/tile/0/000",
        "tile/0/000/",
    ):
        with pytest.raises(InvalidArgument):
            tlog.parse_tile_path(bad)


def test_entry_bundles_round_trip() -> None:
    entries = [b"", b"a", bytes(range(256)) * 10, b"\xff" * tlog.MAX_ENTRY_BYTES]
    bundle = tlog.encode_entry_bundle(entries)
    assert bundle[:2] == b"\x00\x00" and bundle[2:5] == b"\x00\x01a"
    assert tlog.decode_entry_bundle(bundle) == entries
    assert tlog.decode_entry_bundle(bundle, width=4) == entries
    with pytest.raises(DataLoss):
        tlog.decode_entry_bundle(bundle, width=3)
    with pytest.raises(DataLoss):
        tlog.decode_entry_bundle(bundle[:-1])
    with pytest.raises(DataLoss):
        tlog.decode_entry_bundle(bundle + b"\x00")
    with pytest.raises(InvalidArgument):
        tlog.encode_entry_bundle([b"x" * (tlog.MAX_ENTRY_BYTES + 1)])
    with pytest.raises(ValueError):
        tlog.encode_entry_bundle([b"x"] * 257)
    # each entry of a bundle hashes to the matching hash of the level-0 tile
    leaves = [entry(i) for i in range(300)]
    store = run(build([tlog.leaf_hash(e) for e in leaves], batches=(300,)))
    for tile in tlog.changed_tiles(0, 300, tlog.ENTRIES_LEVEL):
        bundle = tlog.encode_entry_bundle(leaves[tile.index * 256 : tile.index * 256 + tile.width])
        hashes = b"".join(tlog.leaf_hash(e) for e in tlog.decode_entry_bundle(bundle, tile.width))
        assert hashes == store.tiles[(0, tile.index)][: tile.width * 32]
