"""The transparency log's tree, without I/O: RFC 6962 hashing, C2SP tlog-tiles, proofs.

The tree is RFC 6962's (RFC 9162 §2.1): leaf hash SHA-256(0x00 || entry), node hash
SHA-256(0x01 || left || right), the empty tree's root SHA-256(""). It is stored as C2SP
tlog-tiles: a tile at level L holds up to 256 consecutive hashes of complete subtrees of 256**L
leaves (level 0: leaf hashes). Every complete subtree of the tree is then one tile read away: a
subtree of height h = 8L + r is the hash of 2**r consecutive hashes of one level-L tile, so a
root, an inclusion proof or a consistency proof needs O(log n) tiles, read in one batch — the
approach of Go's golang.org/x/mod/sumdb/tlog.

Storage is reached through one async interface, :class:`TileReader`. Every async function here
plans which tiles it needs (pure), reads them in ONE ``read_tiles`` call, and computes (pure).
Async, because storage is PostgreSQL/SQLite through async drivers; one batch, so a proof is one
database round trip.

Tiles only ever grow by appending hashes (a hash of a complete subtree never changes), so a
narrower partial tile is always a prefix of every wider version of the same tile. Storage may
therefore keep one row per (level, index), the widest version, and serve any requested width
by truncation.

One module on purpose, though over 500 lines: hashing, tile addressing, proofs and append are one
algorithm over one geometry (which subtree lives in which tile), and RFC 9162's proof
definitions read best next to the tile plan that serves them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from medledger_verifier.errors import DataLoss, InvalidArgument

HASH_SIZE = 32
TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT  # 256 hashes in a full tile
FULL_TILE_BYTES = TILE_WIDTH * HASH_SIZE  # 8,192
MAX_TILE_LEVEL = 63
ENTRIES_LEVEL = -1
"""The level a :class:`Tile` has when it names an entry bundle (``tile/entries/<N>``)."""
MAX_ENTRY_BYTES = 0xFFFF
"""An entry bundle prefixes each entry with a uint16 length: 65,535 bytes at most."""
MAX_TREE_SIZE = 1 << 63

EMPTY_ROOT = hashlib.sha256(b"").digest()


# --- RFC 6962 hashing -------------------------------------------------------------------------


def leaf_hash(entry: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 || entry)."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _largest_power_of_two_below(n: int) -> int:
    """The k of RFC 6962's split: the largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _fold_right(hashes: Sequence[bytes]) -> bytes:
    """H(h0, H(h1, ... H(h[m-2], h[m-1]))): a range's root from its complete subtrees, biggest first."""
    out = hashes[-1]
    for h in reversed(hashes[:-1]):
        out = node_hash(h, out)
    return out


def _perfect_root(hashes: Sequence[bytes]) -> bytes:
    """The root of 2**r hashes that are the leaves of a perfect subtree."""
    level = list(hashes)
    while len(level) > 1:
        level = [node_hash(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


def _split_hashes(data: bytes) -> list[bytes]:
    return [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]


# --- tiles and their paths --------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Tile:
    """A tile: ``level`` 0..63 for hash tiles (``ENTRIES_LEVEL`` for an entry bundle), ``index``
    within the level, ``width`` 1..256 (256: a full tile, fewer: partial)."""

    level: int
    index: int
    width: int

    def __post_init__(self) -> None:
        if not (ENTRIES_LEVEL <= self.level <= MAX_TILE_LEVEL) or self.index < 0 or not 1 <= self.width <= TILE_WIDTH:
            raise ValueError(f"not a tile: level {self.level}, index {self.index}, width {self.width}")

    @property
    def is_full(self) -> bool:
        return self.width == TILE_WIDTH

    @property
    def is_entries(self) -> bool:
        return self.level == ENTRIES_LEVEL

    @property
    def byte_length(self) -> int:
        """A hash tile's size in bytes (entry bundles have no fixed size)."""
        return self.width * HASH_SIZE

    def path(self) -> str:
        """The C2SP tlog-tiles path under the log's prefix: ``tile/<L>/<N>[.p/<W>]`` or
        ``tile/entries/<N>[.p/<W>]``."""
        level = "entries" if self.is_entries else str(self.level)
        partial = "" if self.is_full else f".p/{self.width}"
        return f"tile/{level}/{encode_tile_index(self.index)}{partial}"


def encode_tile_index(n: int) -> str:
    """C2SP's ``<N>``: 3-digit zero-padded elements, all but the last prefixed with ``x``
    (1234067 -> ``x001/x234/067``, 5 -> ``005``)."""
    if n < 0:
        raise ValueError("a tile index is not negative")
    groups = []
    while True:
        n, rest = divmod(n, 1000)
        groups.append(f"{rest:03d}")
        if n == 0:
            break
    groups.reverse()
    return "/".join([*("x" + g for g in groups[:-1]), groups[-1]])


_TILE_PATH = re.compile(r"tile/(entries|0|[1-9][0-9]?)/((?:x[0-9]{3}/)*[0-9]{3})(?:\.p/([1-9][0-9]{0,2}))?")


def parse_tile_path(path: str) -> Tile:
    """A tile or entry bundle from its C2SP path (after the prefix); InvalidArgument unless the
    path is exactly the canonical encoding (no leading zeros, no empty group, width 1..255)."""
    match = _TILE_PATH.fullmatch(path)
    if match is None:
        raise InvalidArgument.field("path", "not a C2SP tlog-tiles path")
    level_text, index_text, width_text = match.groups()
    level = ENTRIES_LEVEL if level_text == "entries" else int(level_text)
    index = int(index_text.replace("x", "").replace("/", ""))
    width = int(width_text) if width_text is not None else TILE_WIDTH
    if level > MAX_TILE_LEVEL or (width_text is not None and width >= TILE_WIDTH):
        raise InvalidArgument.field("path", "tile level or width out of range")
    tile = Tile(level, index, width)
    if tile.path() != path:  # e.g. "x000/005" for 5: only the canonical form names a tile
        raise InvalidArgument.field("path", "not the canonical encoding of a tile index")
    return tile


def tile_width_at(level: int, index: int, tree_size: int) -> int:
    """How many hashes (or entries, at ``ENTRIES_LEVEL``) tile (level, index) holds when the tree
    has ``tree_size`` leaves: 256 if full, 0 if it does not exist yet."""
    hashes_at_level = tree_size >> (TILE_HEIGHT * max(level, 0))
    return max(0, min(TILE_WIDTH, hashes_at_level - index * TILE_WIDTH))


def tiles_at(tree_size: int, level: int) -> Iterable[Tile]:
    """Every tile of a level for a tree of ``tree_size`` leaves, the last one possibly partial."""
    hashes_at_level = tree_size >> (TILE_HEIGHT * max(level, 0))
    for index in range((hashes_at_level + TILE_WIDTH - 1) // TILE_WIDTH):
        yield Tile(level, index, tile_width_at(level, index, tree_size))


def changed_tiles(old_size: int, new_size: int, level: int) -> list[Tile]:
    """The tiles of a level (as of ``new_size``) that differ from those of ``old_size``: what to
    write after growing the tree. ``level=ENTRIES_LEVEL`` gives the entry bundles to write."""
    if not 0 <= old_size <= new_size:
        raise ValueError("sizes must satisfy 0 <= old_size <= new_size")
    shift = TILE_HEIGHT * max(level, 0)
    old_count, new_count = old_size >> shift, new_size >> shift
    if old_count == new_count:
        return []
    first = old_count // TILE_WIDTH
    last = (new_count - 1) // TILE_WIDTH
    return [Tile(level, n, tile_width_at(level, n, new_size)) for n in range(first, last + 1)]


def tile_levels(tree_size: int) -> int:
    """How many hash-tile levels a tree of this size has (0 for the empty tree)."""
    levels = 0
    while tree_size >> (TILE_HEIGHT * levels):
        levels += 1
    return levels


# --- entry bundles ----------------------------------------------------------------------------


def encode_entry_bundle(entries: Sequence[bytes]) -> bytes:
    """C2SP entry bundle: each entry prefixed with its length as a big-endian uint16."""
    if not 1 <= len(entries) <= TILE_WIDTH:
        raise ValueError("an entry bundle holds 1 to 256 entries")
    out = bytearray()
    for entry in entries:
        if len(entry) > MAX_ENTRY_BYTES:
            raise InvalidArgument.field("entry", f"an entry is at most {MAX_ENTRY_BYTES} bytes")
        out += len(entry).to_bytes(2, "big") + entry
    return bytes(out)


def decode_entry_bundle(data: bytes, width: int | None = None) -> list[bytes]:
    """The entries of a bundle; DataLoss if it is truncated, has trailing bytes, or does not hold
    exactly ``width`` entries (when given)."""
    entries: list[bytes] = []
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise DataLoss("entry bundle: truncated length prefix")
        length = int.from_bytes(data[pos : pos + 2], "big")
        pos += 2
        if pos + length > len(data):
            raise DataLoss("entry bundle: truncated entry")
        entries.append(data[pos : pos + length])
        pos += length
    if len(entries) > TILE_WIDTH or (width is not None and len(entries) != width):
        raise DataLoss(f"entry bundle: {len(entries)} entries, expected {width}")
    return entries


# --- reading tiles ----------------------------------------------------------------------------


class TileReader(Protocol):
    """What storage implements for the tree.

    ``read_tiles`` returns, for each requested hash tile, exactly ``tile.width * 32`` bytes: the
    tile's hashes in order. A requested width may be narrower than what storage holds (a proof at
    an older tree size); storage answers with the prefix. It raises if a tile is missing. It is
    called once per root, proof or append, with every tile that operation needs.
    """

    async def read_tiles(self, tiles: Sequence[Tile]) -> Sequence[bytes]: ...


@dataclass(frozen=True)
class _Subtree:
    """A complete subtree: 2**height leaves starting at leaf index * 2**height."""

    height: int
    index: int


def _check_size(tree_size: int) -> None:
    if not 0 <= tree_size < MAX_TREE_SIZE:
        raise InvalidArgument.field("tree_size", "out of range")


def _range_subtrees(lo: int, hi: int) -> list[_Subtree]:
    """The complete subtrees that make up leaves [lo, hi), biggest first, as RFC 6962's MTH splits
    them (every range a proof names starts at a multiple of a power of two >= its length)."""
    out = []
    while lo < hi:
        height = (hi - lo).bit_length() - 1
        while lo & ((1 << height) - 1):  # not aligned: take a smaller subtree
            height -= 1
        out.append(_Subtree(height, lo >> height))
        lo += 1 << height
    return out


def _tile_of(subtree: _Subtree, tree_size: int) -> tuple[Tile, int, int]:
    """The tile holding a complete subtree's hashes, the first hash's position in it, and how
    many of its hashes make up the subtree."""
    level, rest = divmod(subtree.height, TILE_HEIGHT)
    first = subtree.index << rest  # the subtree's first hash in level `level`
    index, start = divmod(first, TILE_WIDTH)
    return Tile(level, index, tile_width_at(level, index, tree_size)), start, 1 << rest


class _HashSource:
    """Complete-subtree hashes computed from a set of tiles already read (pure)."""

    def __init__(self, tiles: Mapping[Tile, bytes], tree_size: int) -> None:
        self._tiles = tiles
        self._size = tree_size

    def subtree(self, subtree: _Subtree) -> bytes:
        tile, start, count = _tile_of(subtree, self._size)
        data = self._tiles[tile]
        return _perfect_root(_split_hashes(data[start * HASH_SIZE : (start + count) * HASH_SIZE]))

    def range(self, lo: int, hi: int) -> bytes:
        return _fold_right([self.subtree(s) for s in _range_subtrees(lo, hi)])


def tiles_for_ranges(ranges: Iterable[tuple[int, int]], tree_size: int) -> list[Tile]:
    """The tiles needed to hash these leaf ranges of a tree of ``tree_size`` leaves."""
    needed = {_tile_of(s, tree_size)[0] for lo, hi in ranges for s in _range_subtrees(lo, hi)}
    return sorted(needed)


async def _read(reader: TileReader, tiles: Sequence[Tile]) -> dict[Tile, bytes]:
    if not tiles:
        return {}
    datas = await reader.read_tiles(tiles)
    if len(datas) != len(tiles):
        raise DataLoss(f"tile storage answered {len(datas)} tiles for {len(tiles)} asked")
    for tile, data in zip(tiles, datas, strict=True):
        if len(data) != tile.byte_length:
            raise DataLoss(f"tile {tile.path()} has {len(data)} bytes, expected {tile.byte_length}")
    return dict(zip(tiles, (bytes(d) for d in datas), strict=True))


async def _hash_ranges(reader: TileReader, ranges: Sequence[tuple[int, int]], tree_size: int) -> list[bytes]:
    tiles = await _read(reader, tiles_for_ranges(ranges, tree_size))
    source = _HashSource(tiles, tree_size)
    return [source.range(lo, hi) for lo, hi in ranges]


# --- tree heads and proofs --------------------------------------------------------------------


async def tree_root(reader: TileReader, tree_size: int) -> bytes:
    """The root hash of the tree's first ``tree_size`` leaves (any size up to the current one)."""
    _check_size(tree_size)
    if tree_size == 0:
        return EMPTY_ROOT
    (root,) = await _hash_ranges(reader, [(0, tree_size)], tree_size)
    return root


def inclusion_proof_ranges(index: int, tree_size: int) -> list[tuple[int, int]]:
    """The leaf ranges whose hashes make RFC 9162 §2.1.3.1's PATH(index, D[0:tree_size]), leaf's
    sibling first."""
    if not 0 <= index < tree_size:
        raise InvalidArgument.field("index", "must be below the tree size")
    out: list[tuple[int, int]] = []
    lo, hi = 0, tree_size
    while hi - lo > 1:  # walk down from the root; the siblings come out root-side first
        k = _largest_power_of_two_below(hi - lo)
        if index < lo + k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo = lo + k
    out.reverse()
    return out


def consistency_proof_ranges(old_size: int, new_size: int) -> list[tuple[int, int]]:
    """The leaf ranges whose hashes make RFC 9162 §2.1.4.1's PROOF(old_size, D[0:new_size]).
    Empty when ``old_size`` is 0 or equal to ``new_size``."""
    if not 0 <= old_size <= new_size:
        raise InvalidArgument.field("old_size", "must be between 0 and the new size")
    if old_size in (0, new_size):
        return []
    out: list[tuple[int, int]] = []
    m, lo, hi, whole = old_size, 0, new_size, True  # SUBPROOF(m, D[lo:hi], whole)
    while m != hi - lo:
        k = _largest_power_of_two_below(hi - lo)
        if m <= k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            m -= k
            lo += k
            whole = False
    if not whole:
        out.append((lo, hi))
    out.reverse()
    return out


async def inclusion_proof(reader: TileReader, index: int, tree_size: int) -> list[bytes]:
    """The inclusion proof of leaf ``index`` in the tree of ``tree_size`` leaves."""
    _check_size(tree_size)
    return await _hash_ranges(reader, inclusion_proof_ranges(index, tree_size), tree_size)


async def consistency_proof(reader: TileReader, old_size: int, new_size: int) -> list[bytes]:
    """The proof that the tree of ``new_size`` leaves extends the one of ``old_size`` leaves."""
    _check_size(new_size)
    return await _hash_ranges(reader, consistency_proof_ranges(old_size, new_size), new_size)


async def leaf_hashes(reader: TileReader, start: int, end: int, tree_size: int) -> list[bytes]:
    """The leaf hashes of [start, end) as stored in level-0 tiles (e.g. to match entries)."""
    _check_size(tree_size)
    if not 0 <= start <= end <= tree_size:
        raise InvalidArgument.field("end", "range must lie within the tree")
    return await _hash_ranges(reader, [(i, i + 1) for i in range(start, end)], tree_size)


# --- verification (RFC 9162 §2.1.3.2 and §2.1.4.2) --------------------------------------------


def verify_inclusion(index: int, tree_size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2: does ``proof`` show leaf hash ``leaf`` at ``index`` under ``root``?

    Take ``tree_size`` and ``root`` together from one verified checkpoint: the algorithm does not
    bind a size to a root by itself (some proofs pass for a neighbouring size with the same root).
    """
    if not 0 <= index < tree_size or any(len(p) != HASH_SIZE for p in proof):
        return False
    fn, sn, r = index, tree_size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.4.2: does ``proof`` show the tree (new_size, new_root) extends (old_size,
    old_root)? Equal sizes need equal roots and no proof; any tree extends the empty one."""
    if not 0 <= old_size <= new_size or any(len(p) != HASH_SIZE for p in proof):
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is a node of the new tree
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


# --- appending --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppendResult:
    """What an append changes: the new size and root, and the hash tiles to write.

    ``tiles`` maps each new or grown tile (every level) to its complete bytes as of ``tree_size``.
    Write them in one transaction with the entries; each replaces the stored version of the same
    (level, index), of which it is an extension.
    """

    tree_size: int
    root: bytes
    tiles: dict[Tile, bytes] = field(default_factory=dict)


class _Overlay:
    """A reader that answers from tiles just computed, and asks storage for the rest."""

    def __init__(self, written: Mapping[Tile, bytes], reader: TileReader) -> None:
        self._by_position = {(t.level, t.index): data for t, data in written.items()}
        self._reader = reader

    async def read_tiles(self, tiles: Sequence[Tile]) -> Sequence[bytes]:
        missing = [t for t in tiles if (t.level, t.index) not in self._by_position]
        found = dict(zip(missing, await self._reader.read_tiles(missing), strict=True)) if missing else {}
        out = []
        for t in tiles:
            data = self._by_position.get((t.level, t.index))
            out.append(data[: t.byte_length] if data is not None else found[t])
        return out


async def append(reader: TileReader, tree_size: int, new_leaf_hashes: Sequence[bytes]) -> AppendResult:
    """Append leaves (their RFC 6962 leaf hashes) to a tree of ``tree_size`` leaves.

    Reads only the partial tile of each level that grows (one batch), plus at most one partial
    tile per level for the root; returns the tiles to write. Pure apart from those reads: nothing
    is written here, so a failed transaction leaves storage as it was.
    """
    _check_size(tree_size)
    if any(len(h) != HASH_SIZE for h in new_leaf_hashes):
        raise InvalidArgument.field("leaf_hashes", "each leaf hash is 32 bytes")
    new_size = tree_size + len(new_leaf_hashes)
    _check_size(new_size)
    if new_size == tree_size:
        return AppendResult(tree_size, await tree_root(reader, tree_size), {})

    # The partial tile of every level that grows, as it is now (its full tiles never change).
    to_read = []
    for level in range(tile_levels(new_size)):
        grows = changed_tiles(tree_size, new_size, level)
        width = tile_width_at(level, grows[0].index, tree_size) if grows else 0
        if width:
            to_read.append(Tile(level, grows[0].index, width))
    existing = await _read(reader, to_read)
    partial_at = {t.level: data for t, data in existing.items()}

    written: dict[Tile, bytes] = {}
    incoming = list(new_leaf_hashes)  # the hashes this level gains
    level = 0
    while incoming:
        shift = TILE_HEIGHT * level
        old_count = tree_size >> shift
        index = old_count // TILE_WIDTH
        data = bytearray(partial_at.get(level, b""))
        completed = []  # roots of tiles of this level that became full: the next level's hashes
        for h in incoming:
            data += h
            if len(data) == FULL_TILE_BYTES:
                written[Tile(level, index, TILE_WIDTH)] = bytes(data)
                completed.append(_perfect_root(_split_hashes(bytes(data))))
                index += 1
                data = bytearray()
        if data:
            written[Tile(level, index, len(data) // HASH_SIZE)] = bytes(data)
        incoming = completed
        level += 1

    root = await tree_root(_Overlay(written, reader), new_size)
    return AppendResult(new_size, root, written)


class MemoryTiles:
    """An in-memory tile store: the reference :class:`TileReader` (tests, `verify` recomputing
    the tree from entries). Keeps the widest version of each tile and answers prefixes."""

    def __init__(self) -> None:
        self.tiles: dict[tuple[int, int], bytes] = {}
        self.reads = 0
        """How many ``read_tiles`` calls were answered (tests count round trips)."""
        self.tiles_read = 0

    def write(self, tiles: Mapping[Tile, bytes]) -> None:
        for tile, data in tiles.items():
            stored = self.tiles.get((tile.level, tile.index), b"")
            if not data.startswith(stored):  # tiles only grow: anything else is a bug or tampering
                raise DataLoss(f"tile {tile.path()} would change hashes already written")
            self.tiles[(tile.level, tile.index)] = data

    async def read_tiles(self, tiles: Sequence[Tile]) -> Sequence[bytes]:
        self.reads += 1
        self.tiles_read += len(tiles)
        out = []
        for tile in tiles:
            data = self.tiles.get((tile.level, tile.index), b"")
            if len(data) < tile.byte_length:
                raise DataLoss(f"tile {tile.path()} is missing")
            out.append(data[: tile.byte_length])
        return out
