"""Compact, shareable training records: byte offsets into the memory-mapped merged JSON.

A list of dicts of the 865k-record merged file takes ~5 GB per rank, and forked data-loader
workers turn those pages into private copies as they touch the objects' refcounts
(pytorch#13246). :class:`RecordStore` keeps instead two int64 arrays (each record's ``{`` and
``}`` offsets, found by the byte scanner of :mod:`icmlab.inputs.jsonscan`) and the read-only
memory map of the file; one record is decoded (orjson) per access. Ranks and workers on a node
share the file's page cache and nothing else grows.

The grouped sampler's modality lengths (:func:`modality_length`: words of all turns, signed by
the presence of ``image``) come from the same scan (:func:`scan_modality_lengths`), vectorised
over the block's bytes; only records the byte rules cannot settle exactly (``\\\\`` or ``\\u``
escapes, non-string values, a ``conversations`` that is not an array, duplicate keys) are
decoded, so the values equal those of the Python function on every record.

The scan costs seconds per GB (most of it the word count); its result is kept beside the file
(``<file>.offsets.npz``: offsets and lengths, keyed by the file's size and mtime), so every later
open (the other runs, resumes, a rank that comes second) loads ~20 MB instead.

Usage::

    from icmlab.inputs.recordstore import RecordStore
    store = RecordStore.open("runs/demo/data/train.json")   # ~1 s per GB, a few MB of arrays
    len(store), store[0]["conversations"], store.modality_lengths[:5]
    RecordStore.from_records([{...}, ...])                   # in memory (dry start, tests)
"""

from __future__ import annotations

import io
import logging
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import orjson

from icmlab.inputs.jsonscan import iter_blocks
from icmlab.inputs.jsonscan_parallel import BlockParts
from icmlab.io import atomic_write_bytes

log = logging.getLogger(__name__)
CHECKED_RECORDS = 256  # records whose bytes are checked when offsets are loaded: first, last and a stride

_WS_CODES = np.frombuffer(b" \t\r\n", np.uint8)
_IS_WS = np.isin(np.arange(256), _WS_CODES)
_ESC_WS = np.isin(np.arange(256), np.frombuffer(b"ntrf", np.uint8))  # \n \t \r \f: whitespace escapes
# Third bytes of the UTF-8 whitespace characters E2 80 xx (U+2000..U+200A, U+2028, U+2029, U+202F).
_E280_WS = np.isin(np.arange(256), np.r_[np.arange(0x80, 0x8B), 0xA8, 0xA9, 0xAF])


def modality_length(record: Mapping[str, Any]) -> int:
    """LLaVA's ``modality_lengths`` entry: words of all turns, positive with an image, negative without.

    A record without any word still counts as 1 (the grouped sampler needs a sign).
    """
    words = sum(len(str(turn.get("value", "")).split()) for turn in record.get("conversations", []))
    words = max(words, 1)
    return words if "image" in record else -words


class RecordStore(Sequence):
    """The records of a JSON array file as offsets into its memory map, one decoded per access.

    Args:
        buf: the file's read-only memory map (or bytes holding the records).
        starts, ends: offset of each record's ``{`` and just past its ``}``.
        modality_lengths: :func:`modality_length` of each record (int64).
        path: the file (None for an in-memory store); reopened by workers started with ``spawn``.

    Raises:
        ValueError: offsets out of order or out of range, or not pointing at ``{``/``}``.
    """

    def __init__(
        self,
        buf: mmap.mmap | bytes,
        starts: np.ndarray,
        ends: np.ndarray,
        modality_lengths: np.ndarray,
        path: Path | None = None,
    ) -> None:
        self.buf, self.path = buf, path
        self.starts = np.ascontiguousarray(starts, np.int64)
        self.ends = np.ascontiguousarray(ends, np.int64)
        self.modality_lengths = np.ascontiguousarray(modality_lengths, np.int64)
        self._stat = _stat(path) if path is not None else None
        self._check()

    def _check(self) -> None:
        where = self.path or "in-memory records"
        n = len(self.starts)
        if len(self.ends) != n or len(self.modality_lengths) != n:
            raise ValueError(
                f"{where}: {n} starts, {len(self.ends)} ends, {len(self.modality_lengths)} lengths (must be equal)"
            )
        if not n:
            return
        a = np.frombuffer(self.buf, np.uint8)
        bad = (self.starts < 0) | (self.ends > len(a)) | (self.ends <= self.starts)
        bad[1:] |= self.starts[1:] < self.ends[:-1]
        if not bad.any():
            # The bytes of a sample of records (all of them would fault the whole mapped file in).
            pick = np.unique(np.r_[np.linspace(0, n - 1, min(n, CHECKED_RECORDS)).astype(np.int64), n - 1])
            wrong = (a[self.starts[pick]] != ord("{")) | (a[self.ends[pick] - 1] != ord("}"))
            bad[pick[wrong]] = True
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{where}: record {i} has bad offsets [{self.starts[i]}, {self.ends[i]}) in {len(a)} bytes "
                "(the file changed after it was scanned? reopen it with RecordStore.open)"
            )

    @classmethod
    def open(cls, path: str | os.PathLike, workers: int | None = None, cache: bool = True) -> "RecordStore":
        """Scan a top-level JSON array of records and map it (nothing is parsed but odd records).

        Args:
            path: the merged training JSON.
            workers: scan threads (see :func:`icmlab.inputs.jsonscan.iter_blocks`).
            cache: reuse ``<file>.offsets.npz`` when it belongs to this exact file (size, mtime),
                and write it after a scan (skipped silently where the folder is read-only).

        Raises:
            FileNotFoundError: no such file.
            ValueError: not JSON / not a list (as :func:`icmlab.inputs.jsonscan.iter_blocks`).
        """
        path = Path(path)
        sidecar = path.with_name(path.name + ".offsets.npz")
        stamp = np.array(_stat(path), np.int64)
        if cache and sidecar.is_file():
            try:
                with np.load(sidecar) as z:
                    if np.array_equal(z["stamp"], stamp):
                        return cls._mapped(path, z["starts"], z["ends"], z["lengths"])
            except (OSError, ValueError, KeyError) as e:
                log.warning("%s: unreadable (%s); scanning %s again", sidecar, e, path.name)
        store = cls._scan(path, workers)
        if cache and store.path is not None:
            out = io.BytesIO()
            np.savez(out, stamp=stamp, starts=store.starts, ends=store.ends, lengths=store.modality_lengths)
            try:
                atomic_write_bytes(sidecar, out.getvalue())
            except OSError as e:
                log.debug("cannot keep the record offsets beside %s: %s", path, e)
        return store

    @classmethod
    def _mapped(cls, path: Path, starts: np.ndarray, ends: np.ndarray, lengths: np.ndarray) -> "RecordStore":
        if not len(starts):
            return cls(b"", starts, ends, lengths, path)
        store = cls(_map(path), starts, ends, lengths, path)
        # The check faulted pages in: drop them from this process (they stay in the page cache).
        store.buf.madvise(mmap.MADV_DONTNEED)
        return store

    @classmethod
    def _scan(cls, path: Path, workers: int | None) -> "RecordStore":
        blocks = list(iter_blocks(path, workers=workers, extra=scan_modality_lengths))
        if any(b.offset is None for b in blocks):
            # A layout the byte scan does not handle (rare): the whole-file parse re-serialised the
            # records from where the scan stopped; keep every record's text in memory.
            return cls._from_blocks(blocks)
        if not blocks:
            return cls._mapped(path, *(np.zeros(0, np.int64),) * 3)
        cat = [np.concatenate([getattr(b, k) for b in blocks]) for k in ("starts", "ends", "extra")]
        return cls._mapped(path, *cat)

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]]) -> "RecordStore":
        """An in-memory store of ``records`` (serialised once with orjson).

        Raises:
            ValueError: ``records`` is not a list of mappings.
        """
        if not isinstance(records, (list, tuple)) or not all(isinstance(r, Mapping) for r in records):
            raise ValueError("training data must be a JSON list of records {id, image?, conversations}")
        texts = [orjson.dumps(dict(r)) for r in records]
        lens = np.array([len(t) for t in texts], np.int64)
        ends = np.cumsum(lens + 1) - 1
        return cls(b",".join(texts), ends - lens, ends, np.array([modality_length(r) for r in records], np.int64))

    @classmethod
    def _from_blocks(cls, blocks: list) -> "RecordStore":
        texts = [b.buf[s:e] for b in blocks for s, e in zip(b.starts.tolist(), b.ends.tolist())]
        records = [orjson.loads(t) for t in texts]
        if not all(isinstance(r, dict) for r in records):
            bad = next(i for i, r in enumerate(records) if not isinstance(r, dict))
            raise ValueError(
                f"record {bad} is a JSON {type(records[bad]).__name__}, not an object {{id, conversations}}"
            )
        return cls.from_records(records)

    def __len__(self) -> int:
        return len(self.starts)

    def record_bytes(self, index: int) -> bytes:
        """The JSON text of record ``index``."""
        i = self._index(index)
        return self.buf[int(self.starts[i]) : int(self.ends[i])]

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        return orjson.loads(self.record_bytes(index))

    def _index(self, index: int) -> int:
        n = len(self.starts)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record {index} out of range ({n} records)")
        return i

    def __getstate__(self) -> dict:
        """Pickle the offsets and the path; a worker started with ``spawn`` maps the file again."""
        state = dict(self.__dict__)
        if self.path is not None:
            state["buf"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.buf is None:
            if _stat(self.path) != self._stat:
                raise ValueError(f"{self.path} changed since the training dataset was built; restart the train stage")
            self.buf = _map(self.path)


def _map(path: Path) -> mmap.mmap:
    """Read-only map of the file, advised for random access: a record read faults in its own pages,
    not a read-ahead window (samples are read in sampler order)."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    buf.madvise(mmap.MADV_RANDOM)
    return buf


def _stat(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


# --------------------------------------------------------------------------- modality lengths
def _next_non_ws(a: np.ndarray, pos: np.ndarray, steps: int = 16) -> np.ndarray:
    """First offset at or after each ``pos`` that is not JSON whitespace (at most ``steps`` ahead)."""
    last = len(a) - 1
    pos = np.minimum(pos, last)
    for _ in range(steps):
        w = _IS_WS[a[pos]]
        if not w.any():
            break
        pos = np.minimum(pos + w, last)
    return pos


def _named(a: np.ndarray, op: np.ndarray, cl: np.ndarray, name: bytes) -> np.ndarray:
    """Which strings ``a[op+1:cl]`` spell exactly ``name`` (ASCII, no escapes)."""
    idx = np.flatnonzero((cl - op - 1) == len(name))
    for j, c in enumerate(name):  # each byte narrows the candidates: few are left after the first
        idx = idx[a[op[idx] + 1 + j] == c]
    hit = np.zeros(len(op), bool)
    hit[idx] = True
    return hit


def _count_words(b: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``len(text.split())`` of the JSON string bodies ``b[lo[i]:hi[i]]`` (sorted, disjoint), and which of
    them hold a ``\\\\`` or ``\\u`` escape (not counted here: the caller decodes those records).

    Dense passes over the bytes find spaces; escapes and non-ASCII bytes are few and handled at their
    positions: ``\\n \\t \\r \\f`` and the UTF-8 encodings of Unicode whitespace are whitespace,
    an escape's second byte and UTF-8 continuation bytes belong to the character before them.
    """
    size = len(b)
    ws = b == 32
    bs = np.flatnonzero(b == 92)
    nxt = b[np.minimum(bs + 1, size - 1)]
    bad_at = bs[(nxt == 92) | (nxt == ord("u"))]
    follows = [np.minimum(bs + 1, size - 1)]  # positions that continue the character before them
    esc = bs[_ESC_WS[nxt]]
    ws[esc] = True
    ws[np.minimum(esc + 1, size - 1)] = True
    high = np.flatnonzero(b >= 0x80)
    if len(high):
        hb = b[high]
        follows.append(high[(hb & 0xC0) == 0x80])
        n1 = b[np.minimum(high + 1, size - 1)]
        n2 = b[np.minimum(high + 2, size - 1)]
        two = high[(hb == 0xC2) & ((n1 == 0x85) | (n1 == 0xA0))]
        three = high[
            ((hb == 0xE1) & (n1 == 0x9A) & (n2 == 0x80))
            | ((hb == 0xE2) & (n1 == 0x80) & _E280_WS[n2])
            | ((hb == 0xE2) & (n1 == 0x81) & (n2 == 0x9F))
            | ((hb == 0xE3) & (n1 == 0x80) & (n2 == 0x80))
        ]
        for k, starts in ((2, two), (3, three)):
            for d in range(k):
                ws[np.minimum(starts + d, size - 1)] = True
    begin = np.zeros(size, bool)
    np.greater(ws[:-1], ws[1:], out=begin[1:])  # whitespace, then not
    begin[np.concatenate(follows)] = False
    # A word at a string's first byte follows the opening quote (not whitespace): counted apart. (The
    # first byte never continues a character: the quote before it is no escape, and UTF-8 is valid.)
    first = lo < hi
    first[first] = ~ws[lo[first]]
    at = np.flatnonzero(begin)
    inner = np.searchsorted(at, hi) - np.searchsorted(at, lo)
    inner[first] -= begin[lo[first]]  # the first byte was counted with the global rule (never a start)
    words = inner + first
    if len(bad_at):
        j = np.searchsorted(lo, bad_at, side="right") - 1
        inside = (j >= 0) & (bad_at < hi[np.maximum(j, 0)])
        bad = np.zeros(len(lo), bool)
        bad[j[inside]] = True
    else:
        bad = np.zeros(len(lo), bool)
    return words, bad


def scan_modality_lengths(parts: BlockParts) -> np.ndarray:
    """:func:`modality_length` of every record of a scanned block, from its bytes.

    Keys are the strings followed by ``:``; their depth is the brace depth around them. ``image``
    and ``conversations`` are keys at depth 1, the turns' ``value`` keys lie at depth 2 after a
    ``conversations`` key of the same record. Words are counted as ``str.split()`` does: a word
    starts at a character that is not whitespace and follows whitespace or the string's start;
    whitespace is the space, the escapes ``\\n \\t \\r \\f`` and the UTF-8 encodings of Unicode's
    whitespace characters. Records outside these rules are decoded and measured in Python.
    """
    a, q, br, depth, starts = parts.a, parts.q, parts.braces, parts.depth, parts.starts
    n = len(starts)
    op_all, cl_all = q[0::2], q[1::2]
    colon = _next_non_ws(a, cl_all + 1)
    keys = np.flatnonzero(a[colon] == ord(":"))  # strings followed by a colon: the keys
    op, cl, colon = op_all[keys], cl_all[keys], colon[keys]
    bi = np.searchsorted(br, op)
    sdepth = np.where(bi > 0, depth[np.maximum(bi - 1, 0)], 0)  # brace depth around each key
    rec = np.searchsorted(starts, op, side="right") - 1
    slow = np.zeros(n, bool)

    top = sdepth == 1
    has_image = np.zeros(n, bool)
    has_image[rec[top & _named(a, op, cl, b"image")]] = True
    conv = np.flatnonzero(top & _named(a, op, cl, b"conversations"))
    conv_counts = np.bincount(rec[conv], minlength=n)
    slow |= conv_counts > 1  # duplicate key: the parser keeps the last one
    slow[rec[conv[a[_next_non_ws(a, colon[conv] + 1)] != ord("[")]]] = True  # not an array

    vk = np.flatnonzero((sdepth == 2) & _named(a, op, cl, b"value"))
    tops = np.flatnonzero(top)
    if len(tops):  # a turn's value: the last top-level key before it is the record's "conversations"
        owner = tops[np.maximum(np.searchsorted(tops, vk) - 1, 0)]
        vk = vk[(owner < vk) & (rec[owner] == rec[vk]) & np.isin(owner, conv)]
    else:
        vk = vk[:0]
    # The value must be a string: the next string opens right after the colon.
    val = keys[vk] + 1  # the string after each key
    simple = val < len(op_all)
    simple[simple] = _next_non_ws(a, colon[vk[simple]] + 1) == op_all[val[simple]]
    slow[rec[vk[~simple]]] = True
    vk, val = vk[simple], val[simple]
    # Duplicate "value" keys in one turn: the parser keeps the last one.
    opens = br[(a[br] == ord("{")) & (depth == 2)]
    turn = np.searchsorted(opens, op[vk]) - 1
    dup = np.flatnonzero(turn[1:] == turn[:-1])
    slow[rec[vk[dup]]] = True

    words = np.zeros(n, np.int64)
    if len(vk):
        lo0 = int(parts.lead_lo)
        lo, hi = op_all[val] + 1 - lo0, cl_all[val] - lo0  # each value's text, relative to the block
        per_value, bad = _count_words(a[lo0 : int(parts.ends[-1])], lo, hi)
        words = np.bincount(rec[vk], weights=per_value, minlength=n).astype(np.int64)
        slow[rec[vk[bad]]] = True

    out = np.where(has_image, 1, -1) * np.maximum(words, 1)
    for i in np.flatnonzero(slow).tolist():
        out[i] = modality_length(orjson.loads(parts.buf[starts[i] : parts.ends[i]]))
    return out.astype(np.int64)
