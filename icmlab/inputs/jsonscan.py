"""Exact, streaming byte scanner for top-level JSON arrays of objects (the LLaVA training files).

A vectorised scan (numpy) finds the unescaped quotes and the braces outside strings of each
chunk, so record boundaries and every record's top-level ``id`` are exact without building
Python objects; the chunks are scanned on several threads (:mod:`icmlab.inputs.jsonscan_parallel`).
Files the scan does not handle are parsed whole with orjson instead, which yields the same
records or raises the precise error. :class:`DuplicateIds` compares those ids across files of
any size.

Used by :mod:`icmlab.merge.stage` (records copied as bytes), :mod:`icmlab.validate.stage` (record spans for
the worker processes, duplicate ids) and :mod:`icmlab.inspection.stage` (sampling)::

    from icmlab.inputs.jsonscan import iter_blocks, count_records
    for block in iter_blocks("train.json"):     # RecordBlock: bytes + offsets + id hashes
        first = block.record(0)                 # the JSON text of one record
    n = count_records("train.json")
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import orjson

from icmlab.inputs.jsonscan_parallel import BlockParts, SplitFailed, scan_blocks
from icmlab.io import read_json

log = logging.getLogger("icmlab.inputs.jsonscan")

# Measured fastest (cache-sized numpy temporaries). It also fixes the block boundaries, and merge
# copies each block's records as one verbatim run: changing it changes merge's separators.
DEFAULT_CHUNK_BYTES = 4 << 20
MAX_DUPLICATE_EXAMPLES = 20

_WS = b" \t\r\n"
_BSLASH, _COLON, _COMMA = 92, 58, 44
_WS_CODES = np.frombuffer(_WS, np.uint8)
_IS_WS = np.isin(np.arange(256), _WS_CODES)  # lookup table: one gather instead of four comparisons
_JSON_KIND = {ord("["): "list", ord('"'): "string", ord("t"): "boolean", ord("f"): "boolean", ord("n"): "null"}
_SCALAR = re.compile(rb"[^,}\]\s]+")


# --------------------------------------------------------------------------- streaming scanner
_SplitFailed = SplitFailed  # the scan met a layout it does not handle: parse the file whole instead


@dataclass
class RecordBlock:
    """Consecutive records of a JSON array, as bytes with their offsets (no Python objects built).

    Attributes:
        buf: bytes holding the records (for a scanned file: the file's read-only memory map).
        starts: offset of each record's ``{`` in ``buf``.
        ends: offset just past each record's ``}``.
        id_hash: per record, a 64-bit hash of its top-level ``id`` (see :func:`id_hash`); 0 when
            the record has no ``id`` or an empty one.
        id_keys, id_offsets: the records' :func:`id_key` bytes, concatenated, and their offsets.
        first: index of the first record in the file.
        offset: file offset of ``buf[0]`` when ``buf`` is a verbatim slice of the file, else None.
        pipes: offsets of every ``|`` byte (records that may hold ``<|image|>``), None if unknown.
        extra: what the caller's ``extra`` function of :func:`iter_blocks` computed from the block's
            structure (None for blocks of the whole-file fallback parse).
    """

    buf: bytes | mmap.mmap
    starts: np.ndarray
    ends: np.ndarray
    id_hash: np.ndarray
    first: int
    offset: int | None = None
    pipes: np.ndarray | None = None
    id_keys: np.ndarray | None = None
    id_offsets: np.ndarray | None = None
    extra: Any = None

    def __len__(self) -> int:
        return len(self.starts)

    def record(self, i: int) -> bytes:
        """JSON text of record ``i`` of the block."""
        return self.buf[self.starts[i] : self.ends[i]]

    def non_objects(self) -> list[tuple[int, str]]:
        """``(index in the file, JSON kind)`` of the elements that are not objects (``[[...]]``, ``[1, "x"]``).

        The byte scan only yields objects; the whole-file fallback yields any element, and its text
        starts with the element's first byte, which names its kind.
        """
        if not len(self):
            return []
        first = np.frombuffer(self.buf, np.uint8)[self.starts]
        return [(self.first + int(i), _JSON_KIND.get(first[i], "number")) for i in np.flatnonzero(first != ord("{"))]

    def records(self) -> list[Any]:
        """Parse the block into Python objects (one orjson call)."""
        return orjson.loads(b"[" + self.buf[self.starts[0] : self.ends[-1]] + b"]") if len(self) else []


def iter_blocks(
    path: str | os.PathLike,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    workers: int | None = None,
    extra: Callable[[BlockParts], Any] | None = None,
) -> Iterator[RecordBlock]:
    """Stream a top-level JSON array of objects as :class:`RecordBlock` s, exactly and fast.

    A vectorised byte scan (numpy) finds unescaped quotes, the braces outside strings and their
    depth, so record boundaries and top-level ``id`` values are exact without parsing the records.
    Files that are not a plain array of objects, or that are structurally broken, are parsed whole
    with orjson instead, which yields the same records or raises the precise error.

    Args:
        path: JSON file.
        chunk_bytes: chunk size of the scan; blocks hold the records whose closing brace lies in
            one chunk (the first two chunks form the first block).
        workers: scan threads (default: the usable CPUs, at most 4); 0 scans in this thread.
        extra: optional function of a scanned block's :class:`BlockParts` (quotes, braces, depth),
            run on the scan threads; its result is the block's ``extra`` (e.g. the modality
            lengths of :class:`icmlab.inputs.recordstore.RecordStore`).

    Yields:
        Blocks in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not JSON (with the byte offset), an HTML page, or not a list.
    """
    path = Path(path)
    done = 0
    try:
        for block in scan_blocks(path, chunk_bytes, functools.partial(_finish_block, extra=extra), workers):
            done += len(block)
            yield block
    except _SplitFailed:
        log.debug("%s: falling back to a whole-file parse after %d records", path, done)
        data = read_json(path)
        if not isinstance(data, list):
            raise ValueError(_not_list_message(path, data)) from None
        for i in range(done, len(data), 20_000):
            texts = [orjson.dumps(r) for r in data[i : i + 20_000]]
            ends = np.cumsum([len(t) + 1 for t in texts]) - 1
            starts = ends - np.array([len(t) for t in texts])
            parts = [id_key(r.get("id")) if isinstance(r, dict) else b"" for r in data[i : i + 20_000]]
            keys, offsets = np.frombuffer(b"".join(parts), np.uint8), np.cumsum([0] + [len(p) for p in parts])
            yield RecordBlock(
                b",".join(texts) + b",", starts, ends, _hash_keys(keys, offsets), i, id_keys=keys, id_offsets=offsets
            )


def iter_record_chunks(path: str | os.PathLike, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[list[Any]]:
    """Yield the elements of a top-level JSON array as lists of parsed records, in file order.

    Raises:
        ValueError: as :func:`iter_blocks`.
    """
    for block in iter_blocks(path, chunk_bytes):
        yield block.records()


def count_records(path: str | os.PathLike) -> int:
    """Number of elements of a top-level JSON array (streamed, nothing parsed)."""
    return sum(len(b) for b in iter_blocks(path))


def _not_list_message(path: Path, data: Any) -> str:
    return (
        f"{path}: the top level is a JSON {type(data).__name__}, not a list of records; "
        "a LLaVA training file is a JSON array of {id, image, conversations} objects"
    )


def _finish_block(parts: BlockParts, extra: Callable[[BlockParts], Any] | None = None) -> RecordBlock:
    """Check the separators of a block of records and extract their ids (runs on a scan thread).

    Raises:
        _SplitFailed: anything but whitespace before the first record (one comma after an
            earlier block) or between two records (exactly one comma).
    """
    buf, a, starts, ends = parts.buf, parts.a, parts.starts, parts.ends
    lead = b"," if parts.first else b""
    if len(starts) != len(ends) or buf[parts.lead_lo : starts[0]].strip(_WS) != lead or np.any(starts[1:] <= ends[:-1]):
        raise _SplitFailed
    if ends.size > 1:
        lens = starts[1:] - ends[:-1]
        gap = a.take(_ranges(ends[:-1], starts[1:]))
        comma = gap == _COMMA
        commas = np.add.reduceat(comma, np.r_[0, np.cumsum(lens[:-1])])
        if not np.all(comma | _IS_WS.take(gap)) or np.any(commas != 1):
            raise _SplitFailed
    hashes, keys, offsets = _id_keys(buf, a, parts.q, parts.braces, parts.depth, starts)
    return RecordBlock(
        buf,
        starts,
        ends,
        hashes,
        parts.first,
        offset=0,
        pipes=parts.pipes,
        id_keys=keys,
        id_offsets=offsets,
        extra=extra(parts) if extra is not None else None,
    )


def _id_keys(
    buf: bytes, a: np.ndarray, q: np.ndarray, br: np.ndarray, depth: np.ndarray, starts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every record's top-level ``"id"`` (a string key followed by ``:`` at brace depth 1).

    Returns:
        ``(hashes, key bytes of all records concatenated, offsets)`` in :func:`id_key` form.
    """
    n = len(starts)
    op, cl = q[0::2], q[1::2]
    k = np.flatnonzero(cl - op == 3)  # two-byte strings first: few, so few bytes are gathered
    k = k[(a[op[k] + 1] == ord("i")) & (a[op[k] + 2] == ord("d"))]
    colon = cl[k] + 1
    for _ in range(8):  # skip whitespace between the key and the colon
        w = _IS_WS[a[np.minimum(colon, len(a) - 1)]]
        if not w.any():
            break
        colon = colon + w
    bi = np.searchsorted(br, op[k])
    keep = (a[np.minimum(colon, len(a) - 1)] == _COLON) & (np.where(bi > 0, depth[np.maximum(bi - 1, 0)], 0) == 1)
    k, colon = k[keep], colon[keep]
    rec = np.searchsorted(starts, op[k], side="right") - 1
    nxt = np.minimum(k + 1, len(op) - 1)
    vo, vc = op[nxt] + 1, cl[nxt]
    gap = vo - 1 - colon
    # A string value: only whitespace between the colon and its opening quote.
    simple = (k + 1 < len(op)) & ((gap == 1) | ((gap == 2) & _IS_WS[a[np.minimum(colon + 1, len(a) - 1)]]))
    rs, lo, hi = rec[simple], vo[simple], vc[simple]
    flat = a.take(_ranges(lo, hi))
    special: dict[int, bytes] = {}
    seg = np.cumsum(hi - lo) - (hi - lo)
    slashes = np.concatenate(([0], np.cumsum(flat == _BSLASH)))  # prefix sums: backslashes per id
    for i in np.flatnonzero(slashes[seg + hi - lo] > slashes[seg]).tolist():
        special[int(rs[i])] = id_key(orjson.loads(buf[lo[i] - 1 : hi[i] + 1]))  # JSON escapes: the decoded string
    for r, c in zip(rec[~simple].tolist(), colon[~simple].tolist()):  # numbers and other values
        m = _SCALAR.match(buf, c + 1 + _lead_ws(buf, c + 1))
        try:
            special[r] = id_key(orjson.loads(m.group(0))) if m else b""
        except orjson.JSONDecodeError:  # an object or array as id: its text
            special[r] = b"\xfe" + m.group(0)
    if not special and np.array_equal(rs, np.arange(n)):  # the usual layout: one plain string id per record
        keys, lens = flat, (hi - lo).astype(np.int64)
    else:
        parts = [b""] * n
        for i, r in enumerate(rs.tolist()):
            parts[r] = flat[seg[i] : seg[i] + hi[i] - lo[i]].tobytes()
        for r, key in special.items():
            parts[r] = key
        keys, lens = np.frombuffer(b"".join(parts), np.uint8), np.array([len(p) for p in parts], np.int64)
    offsets = np.concatenate(([0], np.cumsum(lens)))
    return _hash_keys(keys, offsets), keys, offsets


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(lo[i], hi[i])`` for all i (vectorised)."""
    lens = (hi - lo).astype(np.int64)
    return np.repeat(lo - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()), dtype=np.int64)


_P = 0x100000001B3  # FNV prime: odd, so it is invertible mod 2**64 and its powers never vanish
_powers = (np.ones(1, np.uint64), np.ones(1, np.uint64))  # (P**g, P**-g) mod 2**64 for g < len, grown on demand


_MAX_POWERS = 1 << 20  # table length cap (8 MiB each); blocks with more id bytes are hashed in parts


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``P**g`` and ``P**-g`` (mod 2**64) for ``g < n`` at least (``n <= _MAX_POWERS``)."""
    global _powers
    have = _powers  # one read: other threads may replace the tables meanwhile
    if len(have[0]) >= n:
        return have
    size = min(_MAX_POWERS, 1 << max(12, (n - 1).bit_length()))
    inv = pow(_P, -1, 1 << 64)
    with np.errstate(over="ignore"):  # uint64 products wrap: arithmetic mod 2**64, as intended
        fwd = np.cumprod(np.r_[1, np.full(size - 1, _P, np.uint64)].astype(np.uint64))
        back = np.cumprod(np.r_[1, np.full(size - 1, inv, np.uint64)].astype(np.uint64))
    _powers = (fwd, back)
    return _powers


def _hash_keys(keys: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """64-bit polynomial hash of each key ``keys[offsets[i]:offsets[i+1]]``; 0 for empty keys.

    ``h = sum((byte_j + 1) * P**j) ^ (len * C) | 1`` (mod 2**64, j counted from the key's start).
    The sum is taken with powers of the position in ``keys`` and shifted back by ``P**-offset``,
    which needs no per-byte position array.
    """
    lens = np.diff(offsets)
    nz = lens > 0
    sums = np.zeros(len(lens), np.uint64)
    with np.errstate(over="ignore"):
        if offsets[-1] - offsets[0] >= _MAX_POWERS:  # huge ids (rare): one key or a few at a time
            i = 0
            while i < len(lens):
                j = max(i + 1, int(np.searchsorted(offsets, offsets[i] + _MAX_POWERS - 1, side="right")) - 1)
                sums[i:j] = _power_sums(keys[offsets[i] : offsets[j]], offsets[i : j + 1] - offsets[i])
                i = j
        elif nz.any():
            sums = _power_sums(keys[offsets[0] : offsets[-1]], offsets - offsets[0])
        h = (sums ^ (lens.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))) | np.uint64(1)
    h[~nz] = 0
    return h


def _power_sums(keys: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``sum((byte_j + 1) * P**j)`` mod 2**64 of each key; a key longer than the tables goes window by window."""
    lens = np.diff(offsets)
    sums = np.zeros(len(lens), np.uint64)
    if len(keys) >= _MAX_POWERS:  # a single huge key: windows of the table length, shifted by P**start
        total, step = 0, _MAX_POWERS - 1
        for lo in range(0, len(keys), step):
            part = _power_sums(keys[lo : lo + step], np.array([0, len(keys[lo : lo + step])]))
            total = (total + int(part[0]) * pow(_P, lo, 1 << 64)) % (1 << 64)
        sums[0] = total
        return sums
    fwd, back = _power_tables(len(keys) + 1)
    nz = lens > 0
    if nz.any():
        terms = np.multiply(keys, fwd[: len(keys)], dtype=np.uint64)
        terms += fwd[: len(keys)]  # (byte + 1) * P**g
        sums[nz] = np.add.reduceat(terms, offsets[:-1][nz]) * back[offsets[:-1][nz]]
    return sums


def id_key(value: Any) -> bytes:
    """Bytes identifying an ``id`` value: UTF-8 of a string, ``b"\\xff" + JSON`` otherwise (``1`` != ``"1"``);
    empty for a missing or empty id."""
    if value is None or value == "":
        return b""
    return value.encode() if isinstance(value, str) else b"\xff" + orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def id_hash(value: Any) -> int:
    """The scanner's 64-bit hash of an ``id`` value (0 when missing or empty)."""
    key = id_key(value)
    return int(_hash_keys(np.frombuffer(key, np.uint8), np.array([0, len(key)]))[0])


def _lead_ws(buf: bytes, pos: int) -> int:
    n = 0
    while pos + n < len(buf) and buf[pos + n] in _WS:
        n += 1
    return n


# --------------------------------------------------------------------------- duplicate ids
class DuplicateIds:
    """Duplicate-id detector for files of any size (used by merge and validate).

    Feed it blocks with each selected record's location (e.g. ``(source number << 40) | index``);
    ids are compared by hash and equal hashes are confirmed on the exact id bytes kept per block.
    """

    def __init__(self) -> None:
        self.hashes: list[np.ndarray] = []
        self.locs: list[np.ndarray] = []
        self.where: list[np.ndarray] = []  # (block number, position in block) of each stored record
        self.keys: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, block: RecordBlock, positions: np.ndarray, locs: np.ndarray) -> None:
        """Register the block's records at ``positions`` (missing/empty ids are skipped)."""
        keep = block.id_hash[positions] != 0  # no id / empty id: the validate stage reports those
        self.hashes.append(block.id_hash[positions][keep])
        self.locs.append(np.asarray(locs, np.int64)[keep])
        self.where.append(np.stack([np.full(int(keep.sum()), len(self.keys)), np.asarray(positions)[keep]], 1))
        self.keys.append((block.id_keys, block.id_offsets))

    def confirm(self, with_ids: int = MAX_DUPLICATE_EXAMPLES) -> tuple[np.ndarray, list[Any]]:
        """Records that reuse an earlier record's id.

        Equal hashes are checked on the exact id bytes, vectorised (a hash collision between
        different ids falls back to an exact per-group comparison).

        Args:
            with_ids: how many of the pairs get their id value decoded (for reports).

        Returns:
            ``(pairs, ids)``: ``pairs[k] = (location of the first record with that id, location of
            the later one)`` in file order, and the id values of the first ``with_ids`` pairs.
        """
        if not sum(len(h) for h in self.hashes):  # nothing registered, or no record has an id
            return np.zeros((0, 2), np.int64), []
        h, loc, where = np.concatenate(self.hashes), np.concatenate(self.locs), np.concatenate(self.where)
        keys = np.concatenate([k for k, _ in self.keys])
        kbase = np.concatenate(([0], np.cumsum([len(k) for k, _ in self.keys])))
        rbase = np.concatenate(([0], np.cumsum([len(o) for _, o in self.keys])))
        offs = np.concatenate([o + kbase[b] for b, (_, o) in enumerate(self.keys)])
        start = offs[rbase[where[:, 0]] + where[:, 1]]
        size = offs[rbase[where[:, 0]] + where[:, 1] + 1] - start
        order = np.lexsort((loc, h))
        hs = h[order]
        head = np.r_[True, hs[1:] != hs[:-1]]
        first = order[np.flatnonzero(head)[np.cumsum(head) - 1]]  # smallest location of each hash group
        later = order[~head]
        first = first[~head]
        same = size[later] == size[first]
        same[same] = _equal_keys(keys, start[later[same]], start[first[same]], size[later[same]])
        pairs = [np.stack([loc[first[same]], loc[later[same]]], 1)]
        if not same.all():  # a hash collision: regroup those hash groups by their exact bytes
            key_of = lambda i: keys[start[i] : start[i] + size[i]].tobytes()  # noqa: E731
            bad = np.isin(h, h[later[~same]])
            seen: dict[bytes, int] = {}
            extra = []
            for i in sorted(np.flatnonzero(bad).tolist(), key=lambda i: loc[i]):
                f = seen.setdefault(key_of(i), int(loc[i]))
                if f != loc[i]:
                    extra.append((f, int(loc[i])))
            pairs = [
                np.stack(
                    [loc[first[same & ~np.isin(h[later], h[bad])]], loc[later[same & ~np.isin(h[later], h[bad])]]], 1
                ),
                np.array(extra, np.int64).reshape(-1, 2),
            ]
        out = np.concatenate(pairs)
        out = out[np.argsort(out[:, 1], kind="stable")]
        ids = []
        for _, b in out[:with_ids].tolist():
            i = int(np.flatnonzero(loc == b)[0])
            ids.append(id_value(keys[start[i] : start[i] + size[i]].tobytes()))
        return out, ids


def _equal_keys(keys: np.ndarray, a: np.ndarray, b: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Whether ``keys[a[i]:a[i]+size[i]] == keys[b[i]:b[i]+size[i]]`` for every i (vectorised).

    Keys up to 16 bytes (most ids) are compared as two 64-bit words each; longer ones byte by byte.
    """
    out = np.ones(len(size), bool)
    short = np.flatnonzero(size <= 16)
    if short.size:
        padded = np.concatenate((keys, np.zeros(16, np.uint8)))
        # word[i] = the 8 bytes from byte i (overlapping, unaligned view; little-endian order)
        word = np.ndarray((len(padded) - 7,), "<u8", padded, 0, (1,))
        n = size[short].astype(np.uint64)
        with np.errstate(over="ignore"):
            low = np.where(n >= 8, ~np.uint64(0), (np.uint64(1) << (n * np.uint64(8))) - np.uint64(1))
            high = np.where(
                n >= 16,
                ~np.uint64(0),
                (np.uint64(1) << (np.maximum(n, 8) - np.uint64(8)) * np.uint64(8)) - np.uint64(1),
            )
        sa, sb = a[short], b[short]
        out[short] = (((word[sa] ^ word[sb]) & low) | ((word[sa + 8] ^ word[sb + 8]) & high)) == 0
    long_ = np.flatnonzero(size > 16)
    if long_.size:
        la, lb, ls = a[long_], b[long_], size[long_]
        diff = keys[_ranges(la, la + ls)] != keys[_ranges(lb, lb + ls)]
        mism = np.concatenate(([0], np.cumsum(diff)))
        seg = np.cumsum(ls) - ls
        out[long_] = mism[seg + ls] == mism[seg]
    return out


def id_value(key: bytes) -> Any:
    """The id value of an :func:`id_key` (for reports)."""
    if key[:1] == b"\xff":
        return orjson.loads(key[1:])
    return key[1:].decode("utf-8", "replace") if key[:1] == b"\xfe" else key.decode("utf-8", "replace")
