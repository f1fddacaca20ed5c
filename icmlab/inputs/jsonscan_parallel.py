"""Parallel engine of :mod:`icmlab.inputs.jsonscan`: the exact structure of a top-level JSON array, on threads.

The file is memory-mapped and cut into fixed chunks of ``chunk_bytes``. Worker threads scan the
chunks independently (numpy releases the GIL): the unescaped quotes, the braces, the ``|`` bytes
and, for every brace, the parity of the quotes before it *within its chunk*. Whether a chunk starts
inside a string is only known once every chunk before it is scanned; instead of scanning again,
both answers are kept: a brace lies outside strings exactly when its in-chunk parity equals the
chunk's starting string state. A short sequential pass then resolves each chunk in O(braces)
(string state, brace depth, record starts and ends), cuts the records into blocks, and hands each
block back to the workers to be finished (separators checked, ids extracted) by the caller's
``finish`` function. Blocks come out in file order.

A block holds the records whose closing brace lies in chunk ``k`` (chunks 0 and 1 form the first
block). That is the grouping of the earlier one-thread reader, which read ``chunk_bytes`` at a
time: merge copies each block's records verbatim as one run, so its output stays byte-identical.

The blocks point into the memory map (no copies). Pages of blocks handed out a while ago are
unmapped again (they stay in the page cache), so resident memory stays a few chunks. A mapped
file must not be truncated while it is read (the process would get SIGBUS); icmlab never
rewrites a file in place, it writes a new one and renames it.

Used only through :func:`icmlab.inputs.jsonscan.iter_blocks`::

    for block in scan_blocks(path, 4 << 20, finish=my_finish):   # my_finish(BlockParts) -> block
        ...
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np

T = TypeVar("T")

_WS = b" \t\r\n"
_QUOTE, _BSLASH, _LBRACE, _PIPE = 34, 92, 123, 124
MAX_WORKERS = 4  # the scan streams at memory speed; more threads mostly add memory in flight


class SplitFailed(Exception):
    """The byte scanner met a layout it does not handle; the caller falls back to a full parse."""


@dataclass
class ChunkEvents:
    """What one chunk holds, independent of whether the chunk starts inside a string.

    Attributes:
        q: file offsets of the unescaped ``"``.
        braces: file offsets of every ``{`` and ``}`` (inside strings or not).
        opening: per brace, True for ``{``.
        odd: per brace, whether an odd number of unescaped quotes precede it within the chunk.
        pipes: file offsets of every ``|``.
        odd_quotes: the chunk holds an odd number of unescaped quotes.
    """

    q: np.ndarray
    braces: np.ndarray
    opening: np.ndarray
    odd: np.ndarray
    pipes: np.ndarray
    odd_quotes: bool


@dataclass
class BlockParts:
    """The structure of one block of records, for the caller's ``finish`` function.

    Attributes:
        buf: the memory-mapped file (offsets below are file offsets).
        a: ``buf`` as a uint8 array.
        lead_lo: where the bytes before the first record start (after ``[`` or the previous block).
        first: index of the block's first record in the file.
        starts, ends: each record's ``{`` offset and the offset just past its ``}``.
        q: unescaped quotes in ``[lead_lo, ends[-1])``.
        braces, depth: braces outside strings in that range and the depth after each.
        pipes: ``|`` bytes in that range.
    """

    buf: mmap.mmap
    a: np.ndarray
    lead_lo: int
    first: int
    starts: np.ndarray
    ends: np.ndarray
    q: np.ndarray
    braces: np.ndarray
    depth: np.ndarray
    pipes: np.ndarray


_EMPTY = np.zeros(0, np.int64)
_EMPTY.flags.writeable = False  # shared by every empty result


def chunk_events(a: np.ndarray, lo: int, hi: int) -> ChunkEvents:
    """Scan ``a[lo:hi]`` (``lo >= 1``) for quotes, braces and pipes; see :class:`ChunkEvents`."""
    if hi <= lo:
        return ChunkEvents(_EMPTY, _EMPTY, np.zeros(0, bool), np.zeros(0, bool), _EMPTY, False)
    seg = a[lo:hi]
    byte, mask = _scratch(hi - lo)
    # '{' '|' '}' are 123, 124, 125: one wrapping subtraction and one comparison find all three.
    np.subtract(seg, np.uint8(_LBRACE), out=byte)
    np.less(byte, 3, out=mask)
    np.equal(seg, _QUOTE, out=byte.view(np.bool_))
    mask |= byte.view(np.bool_)
    ev = np.flatnonzero(mask)
    cls = seg.take(ev)  # take: faster than fancy indexing for 1-D gathers
    is_q = cls == _QUOTE
    q = ev[is_q]
    # A quote is escaped when an odd run of backslashes precedes it; the run may begin in an
    # earlier chunk, so it is followed in the whole file (a[lo - 1] exists: the body follows "[").
    cand = np.flatnonzero(a[lo - 1 : hi].take(q) == _BSLASH)
    esc_ev = _EMPTY
    if cand.size:
        escaped = cand[_odd_backslash_runs(a, q[cand] + lo)]
        if escaped.size:
            esc_ev = np.flatnonzero(is_q)[escaped]  # event indices of the escaped quotes
            is_q[esc_ev] = False
            q = ev[is_q]
    q += lo
    other = np.flatnonzero(cls != _QUOTE)
    before = other - np.arange(other.size)  # quote events before each brace or pipe
    if esc_ev.size:
        before -= np.searchsorted(esc_ev, other)
    pos = ev.take(other)
    pos += lo
    kind = cls.take(other)
    odd = (before & 1).astype(bool)
    pipe = kind == _PIPE
    if pipe.any():
        keep = ~pipe
        return ChunkEvents(q, pos[keep], kind[keep] == _LBRACE, odd[keep], pos[pipe], bool(q.size & 1))
    return ChunkEvents(q, pos, kind == _LBRACE, odd, _EMPTY, bool(q.size & 1))


_local = threading.local()


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two chunk-sized work arrays of this thread, reused: fresh ones cost a page fault per 4 KiB."""
    have = getattr(_local, "arrays", None)
    if have is None or have[0].size < n:
        have = _local.arrays = (np.empty(n, np.uint8), np.empty(n, np.bool_))
    return have[0][:n], have[1][:n]


def _odd_backslash_runs(a: np.ndarray, quotes: np.ndarray) -> np.ndarray:
    """For quotes preceded by a backslash: whether the run of backslashes before each is odd."""
    run, alive = np.ones(quotes.size, np.int64), np.ones(quotes.size, bool)
    while alive.any():
        pos = quotes - run - 1
        alive &= pos >= 0
        alive[alive] = a[pos[alive]] == _BSLASH
        run += alive
    return (run & 1) == 1


class _Structure:
    """The sequential pass: string state and brace depth carried from chunk to chunk."""

    def __init__(self) -> None:
        self.in_string, self.depth = False, 0

    def resolve(self, ev: ChunkEvents) -> tuple[np.ndarray, ...]:
        """``(q, braces, depth, pipes, starts, ends)`` of a chunk, braces inside strings dropped.

        Raises:
            SplitFailed: a ``}`` closes more than was opened.
        """
        outside = ev.odd if self.in_string else ~ev.odd
        br, opening = ev.braces[outside], ev.opening[outside]
        depth = np.cumsum(np.where(opening, 1, -1)) + self.depth
        if depth.size:
            if depth.min() < 0:
                raise SplitFailed
            self.depth = int(depth[-1])
        self.in_string ^= ev.odd_quotes
        starts = br[opening & (depth == 1)]
        ends = br[~opening & (depth == 0)] + 1
        return ev.q, br, depth, ev.pipes, starts, ends


def _split(pieces: list[tuple[np.ndarray, ...]], stop: int) -> tuple[list, list]:
    """Cut every piece's arrays at file offset ``stop``: (before, from stop on).

    The part from ``stop`` on (an unfinished record) is copied, so that it does not keep its
    whole chunk's arrays alive.
    """
    head, tail = [], []
    for q, br, depth, pipes, starts, ends in pieces:
        i, j, k, m = (int(np.searchsorted(x, stop)) for x in (q, br, pipes, starts))
        head.append((q[:i], br[:j], depth[:j], pipes[:k], starts[:m], ends))
        if i < q.size or j < br.size or k < pipes.size:
            tail.append((q[i:].copy(), br[j:].copy(), depth[j:].copy(), pipes[k:].copy(), starts[m:].copy(), ends[:0]))
    return head, tail


def _assemble(buf: mmap.mmap, a: np.ndarray, lead_lo: int, first: int, pieces: list) -> BlockParts:
    """Join a block's pieces (one per chunk it spans) into one :class:`BlockParts` (on a worker)."""
    cols = [np.concatenate(c) if len(c) > 1 else c[0] for c in zip(*pieces)]
    q, br, depth, pipes, starts, ends = cols
    return BlockParts(buf, a, lead_lo, first, starts, ends, q, br, depth, pipes)


def default_workers() -> int:
    """Scan threads: the CPUs this process may use, at most :data:`MAX_WORKERS`."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, n))


def _done(fn: Callable[..., Any], *args: Any) -> Future:
    """Run ``fn`` now and wrap the outcome in a Future (the single-thread path)."""
    fut: Future = Future()
    try:
        fut.set_result(fn(*args))
    except BaseException as e:  # noqa: BLE001 - re-raised by fut.result() in file order
        fut.set_exception(e)
    return fut


def scan_blocks(
    path: str | os.PathLike, chunk_bytes: int, finish: Callable[[BlockParts], T], workers: int | None = None
) -> Iterator[T]:
    """Yield ``finish(parts)`` for every block of records of a JSON array file, in file order.

    Args:
        path: the JSON file.
        chunk_bytes: chunk size (also fixes the block boundaries, see the module docstring).
        finish: turns a :class:`BlockParts` into the caller's block; runs on the worker threads and
            may raise :class:`SplitFailed` (blocks before the failing one are yielded first).
        workers: scan threads (default :func:`default_workers`); 0 scans in the calling thread.

    Raises:
        SplitFailed: the file is not a plain array of objects as far as the structure shows (not
            a list, unbalanced braces, anything but whitespace and one comma between records,
            anything after the closing bracket); the caller parses it whole instead.
    """
    with open(Path(path), "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # an empty file or one that cannot be mapped
            raise SplitFailed from None
    n, size = len(buf), max(1, int(chunk_bytes))
    head = buf[:size]
    body = len(head) - len(head.lstrip(_WS)) + 1  # offset just past "["
    if head[body - 1 : body] != b"[":
        raise SplitFailed  # not a list, HTML, BOM: the caller's full parse names the problem
    a = np.frombuffer(buf, np.uint8)
    nchunks = -(-n // size)
    workers = default_workers() if workers is None else workers
    pool = ThreadPoolExecutor(workers, thread_name_prefix="jsonscan") if workers and nchunks > 2 else None
    submit = pool.submit if pool else _done
    ahead, max_blocks = workers + 2, workers + 1  # chunks and blocks in flight: enough to keep the threads busy
    chunks: deque[Future] = deque()
    blocks: deque[tuple[Future, int]] = deque()  # with the file offset where each block begins
    structure, pending, n_ends = _Structure(), [], 0
    lead_lo, first, k_next, k, dropped = body, 0, 0, -1, 0
    failed: SplitFailed | None = None
    try:
        while True:
            while failed is None and k_next < nchunks and len(chunks) < ahead:
                chunks.append(submit(chunk_events, a, max(k_next * size, body), min((k_next + 1) * size, n)))
                k_next += 1
            if blocks and (len(blocks) >= max_blocks or not chunks or failed is not None):
                fut, begin = blocks.popleft()
                yield fut.result()
                # Unmap the pages before the block just handed out: consumers go through the
                # blocks in order (a page read again faults in from the page cache), and resident
                # memory stays the chunks in flight instead of growing to the file size.
                upto = begin // mmap.PAGESIZE * mmap.PAGESIZE
                if upto > dropped and hasattr(buf, "madvise"):
                    buf.madvise(mmap.MADV_DONTNEED, dropped, upto - dropped)
                    dropped = upto
                continue
            if failed is not None:
                raise failed
            if not chunks:
                break
            ev = chunks.popleft().result()
            k += 1
            try:
                piece = structure.resolve(ev)
            except SplitFailed as e:
                failed = e
                continue
            pending.append(piece)
            n_ends += piece[5].size
            if n_ends and (k >= 1 or k == nchunks - 1):
                stop = int(next(p[5][-1] for p in reversed(pending) if p[5].size))
                done, pending = _split(pending, stop)
                task = submit(lambda lo=lead_lo, f=first, d=done: finish(_assemble(buf, a, lo, f, d)))
                blocks.append((task, lead_lo))
                lead_lo, first, n_ends = stop, first + n_ends, 0
        if buf[lead_lo:].strip(_WS) != b"]":
            raise SplitFailed  # truncated file, unterminated record or trailing garbage
    finally:
        for fut in (*chunks, *(b for b, _ in blocks)):
            fut.cancel()
        if pool is not None:  # waits for the running tasks (a chunk each): no thread outlives the scan
            pool.shutdown(wait=True, cancel_futures=True)
