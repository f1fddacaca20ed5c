"""Compact, shareable training records: byte offsets into the memory-mapped merged JSON.

A list of dicts of the 865k-record merged file takes ~5 GB per rank, and forked data-loader
workers turn those pages into private copies as they touch the objects' refcounts
(pytorch#13246). :class:`RecordStore` keeps instead two int64 arrays (each record's ``{`` and
``}`` offsets, found by the byte scanner of :mod:`icmlab.inputs.jsonscan`) and the read-only
memory map of the file; one record is decoded (orjson) per access. Ranks and workers on a node
share the file's page cache and nothing else grows.

The grouped sampler's modality lengths (:func:`modality_length`: words of all turns, signed by
the presence of ``image``) come from the same scan (:func:`scan_modality_lengths`): one compiled
(numba) walk over each block's strings finds the keys and counts the words of the turns' values,
8 bytes at a time; only records the byte rules cannot settle exactly (``\\\\`` or ``\\u``
escapes, non-string values, a ``conversations`` that is not an array, duplicate or escaped keys)
are decoded, so the values equal those of the Python function on every record.

The first scan of a 1.06 GB file takes ~2 s on two cores: ~1.5 CPU-seconds of byte scan, ~0.4 of
key walk and word count, and ~1 s once per process for numba's import and start-up (the kernels
are compiled once, ~2.3 s, and cached beside their module). Its result is kept beside the file
(``<file>.offsets.npz``: offsets and lengths, keyed by the file's size and mtime), so every later
open (the other runs, resumes, a rank that comes second) loads ~20 MB instead.

Usage::

    from icmlab.inputs.recordstore import RecordStore
    store = RecordStore.open("runs/demo/data/train.json")   # ~2 s per GB the first time, a few MB of arrays
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
def scan_modality_lengths(parts: BlockParts) -> np.ndarray:
    """:func:`modality_length` of every record of a scanned block, from its bytes.

    Keys are the strings followed by ``:``; their depth is the brace depth around them. ``image``
    and ``conversations`` are keys at depth 1, the turns' ``value`` keys lie at depth 2 after a
    ``conversations`` key of the same record. Words are counted as ``str.split()`` does: a word
    starts at a character that is not whitespace and follows whitespace or the string's start;
    whitespace is the space, the escapes ``\\n \\t \\r \\f`` and the UTF-8 encodings of Unicode's
    whitespace characters. One compiled walk over the block's strings does all of it
    (:func:`icmlab.inputs.recordstore_kernels.modality_words`, imported here on first use: numba's
    import and start-up take ~1 s per process). Records outside these rules (see there) are decoded
    and measured in Python.
    """
    from icmlab.inputs import recordstore_kernels as K

    n = len(parts.starts)
    words, flags = np.zeros(n, np.int64), np.zeros(n, np.uint8)
    w = parts.a[: len(parts.a) // 8 * 8].view(np.uint64)
    K.modality_words(parts.a, w, parts.q, parts.braces, parts.depth, parts.starts, words, flags)
    out = np.where(flags & K.HAS_IMAGE, 1, -1) * np.maximum(words, 1)
    for i in np.flatnonzero(flags & K.SLOW).tolist():
        out[i] = modality_length(orjson.loads(parts.buf[parts.starts[i] : parts.ends[i]]))
    return out.astype(np.int64)
