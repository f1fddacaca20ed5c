"""Merge stage: concatenate the recipe's LLaVA-format JSON files into one training file.

What it does (``jq -s 'add'`` semantics, done the careful way):

- reads the recipe's sources in the recipe's order, the low-level data first as the upstream seeds
  do (``mix``: ``datasets...`` then ``llava_v1_5_mix665k.json``; ``after``: the low-level files only);
- optionally samples or repeats each source (``cfg.data.sampling``, seeded by ``cfg.seed``);
- rewrites the image token of EVERY record into the model's dialect (``<image>`` for LLaVA,
  ``<|image|>`` for mPLUG-Owl2, the "after"/CSFT file included, which upstream forgets);
- writes ``<run_dir>/data/train.json`` (a plain LLaVA list whose records are the input records'
  bytes, verbatim unless converted, so the original repos load it unchanged), the provenance
  sidecar ``train.provenance.jsonl`` (line i: source, file, index and copy of record i) and a
  summary ``merge.json`` with the duplicate ids;
- never touches its inputs; every output is written atomically.

The files are streamed and not parsed: a vectorised byte scan (:func:`iter_blocks`) finds the
exact record boundaries and ids, records are copied as bytes, and only records that carry the
other dialect's token are parsed and re-serialised. Memory stays at a few chunks whatever the file
size. The scan checks the array's structure (balanced braces outside strings, one comma between
records, nothing after the closing bracket); the validate stage parses every record.

Usage::

    from icmlab.merge import run
    result = run(cfg)          # notebook 02_merge / ``icmlab merge parameters/X.yaml``
    print(result.summary())
"""

from __future__ import annotations

import logging
import math
import os
import queue
import random
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import orjson

from icmlab import paths
from icmlab.config import RunConfig
from icmlab.conversation import DIALECTS
from icmlab.io import atomic_path, atomic_write_json, read_json

log = logging.getLogger("icmlab.merge")

DEFAULT_CHUNK_BYTES = 4 << 20  # measured fastest (cache-sized numpy temporaries)
MAX_DUPLICATE_EXAMPLES = 20
HIGH_LEVEL = "llava_v1_5_mix665k"

_WS = b" \t\r\n"
_QUOTE, _BSLASH, _LBRACE, _RBRACE, _COLON, _COMMA, _PIPE = 34, 92, 123, 125, 58, 44, 124
_WS_CODES = np.frombuffer(_WS, np.uint8)
_EVENTS = bytes(1 if c in (_QUOTE, _LBRACE, _RBRACE, _PIPE) else 0 for c in range(256))
_SCALAR = re.compile(rb"[^,}\]\s]+")


# --------------------------------------------------------------------------- streaming scanner
class _SplitFailed(Exception):
    """The byte scanner met a layout it does not handle; the caller falls back to a full parse."""


@dataclass
class RecordBlock:
    """Consecutive records of a JSON array, as bytes with their offsets (no Python objects built).

    Attributes:
        buf: bytes holding the records.
        starts: offset of each record's ``{`` in ``buf``.
        ends: offset just past each record's ``}``.
        id_hash: per record, a 64-bit hash of its top-level ``id`` (see :func:`id_hash`); 0 when
            the record has no ``id`` or an empty one.
        id_keys, id_offsets: the records' :func:`id_key` bytes, concatenated, and their offsets.
        first: index of the first record in the file.
        offset: file offset of ``buf[0]`` when ``buf`` is a verbatim slice of the file, else None.
        pipes: offsets of every ``|`` byte (records that may hold ``<|image|>``), None if unknown.
    """

    buf: bytes
    starts: np.ndarray
    ends: np.ndarray
    id_hash: np.ndarray
    first: int
    offset: int | None = None
    pipes: np.ndarray | None = None
    id_keys: np.ndarray | None = None
    id_offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.starts)

    def record(self, i: int) -> bytes:
        """JSON text of record ``i`` of the block."""
        return self.buf[self.starts[i] : self.ends[i]]

    def records(self) -> list[Any]:
        """Parse the block into Python objects (one orjson call)."""
        return orjson.loads(b"[" + self.buf[self.starts[0] : self.ends[-1]] + b"]") if len(self) else []


def iter_blocks(path: str | os.PathLike, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[RecordBlock]:
    """Stream a top-level JSON array of objects as :class:`RecordBlock` s, exactly and fast.

    A vectorised byte scan (numpy) finds unescaped quotes, the braces outside strings and their
    depth, so record boundaries and top-level ``id`` values are exact without parsing the records.
    Files that are not a plain array of objects, or that are structurally broken, are parsed whole
    with orjson instead, which yields the same records or raises the precise error.

    Args:
        path: JSON file.
        chunk_bytes: bytes read per step.

    Yields:
        Blocks in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not JSON (with the byte offset), an HTML page, or not a list.
    """
    path = Path(path)
    done = 0
    try:
        for block in _scan_file(path, chunk_bytes):
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
            yield RecordBlock(b",".join(texts) + b",", starts, ends, _hash_keys(keys, offsets), i, id_keys=keys,
                              id_offsets=offsets)


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
    return (f"{path}: the top level is a JSON {type(data).__name__}, not a list of records; "
            "a LLaVA training file is a JSON array of {id, image, conversations} objects")


def _scan_file(path: Path, chunk_bytes: int) -> Iterator[RecordBlock]:
    with open(path, "rb") as f:
        buf = f.read(chunk_bytes)
        head = buf.lstrip(_WS)
        if not head.startswith(b"["):
            raise _SplitFailed  # not a list, empty, HTML, BOM: the fallback raises the exact error
        offset = len(buf) - len(head) + 1  # file offset of buf[0]
        buf, lead, first = head[1:], b"", 0  # lead: what may precede the first record ("" or ",")
        while True:
            more = f.read(chunk_bytes)
            buf += more
            block, end = _scan_buffer(buf, lead, first, final=not more)
            if block is not None:
                block.offset = offset
                yield block
                first += len(block)
                buf, lead, offset = buf[end:], b",", offset + end
            if not more:
                if buf.strip(_WS) != b"]":
                    raise _SplitFailed  # truncated file or trailing garbage
                return


def _structure(buf: bytes, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unescaped quotes and the braces outside strings of a buffer that starts outside any string.

    One pass collects every ``"``, ``{`` and ``}``; a quote is escaped when an odd run of
    backslashes precedes it; a brace lies inside a string when an odd number of unescaped quotes
    precedes it.

    Returns:
        ``(quote positions, brace positions, "|" positions)``.
    """
    # One C pass marks the four bytes of interest ("|" is rare; it flags records that may hold
    # "<|image|>"); measured faster than four vectorised comparisons.
    ev = np.flatnonzero(np.frombuffer(buf.translate(_EVENTS), np.bool_))
    cls = a[ev]
    is_q = cls == _QUOTE
    q = ev[is_q]
    if q.size:
        cand = np.flatnonzero(a[q - 1] == _BSLASH)  # q[0] > 0: a buffer starts with "," "[" or space
        if cand.size:
            pos0 = q[cand]
            run, alive = np.ones(cand.size, np.int64), np.ones(cand.size, bool)
            while alive.any():
                pos = pos0 - run - 1
                alive &= pos >= 0
                alive[alive] = a[pos[alive]] == _BSLASH
                run += alive
            escaped = cand[(run & 1) == 1]
            if escaped.size:
                qi = np.flatnonzero(is_q)
                is_q[qi[escaped]] = False
                q = ev[is_q]
    parity = np.cumsum(is_q, dtype=np.int64) & 1  # quotes up to each event; 0 at a brace = outside
    br = ev[(parity == 0) & (cls != _QUOTE)]
    return q, br, ev[cls == _PIPE]


def _scan_buffer(buf: bytes, lead: bytes, first: int, final: bool) -> tuple[RecordBlock | None, int]:
    """Find the complete records of ``buf`` (which starts outside any string, between records)."""
    a = np.frombuffer(buf, np.uint8)
    q, br, pipes = _structure(buf, a)
    opening = a[br] == _LBRACE
    depth = np.cumsum(np.where(opening, 1, -1))
    if depth.size and depth.min() < 0:
        raise _SplitFailed
    ends = br[~opening & (depth == 0)] + 1
    if not ends.size:
        if final and br.size:
            raise _SplitFailed  # an unterminated record
        return None, 0
    starts = br[opening & (depth == 1)][: ends.size]
    stop = int(ends[-1])
    # Between records only whitespace and exactly one comma are allowed (else: not an array of objects).
    if buf[: starts[0]].strip(_WS) != lead or np.any(starts[1:] <= ends[:-1]):
        raise _SplitFailed
    if ends.size > 1:
        lens = starts[1:] - ends[:-1]
        offs = np.repeat(ends[:-1] - np.cumsum(np.r_[0, lens[:-1]]), lens) + np.arange(lens.sum())
        gap = a[offs]
        comma = gap == _COMMA
        commas = np.add.reduceat(comma, np.r_[0, np.cumsum(lens[:-1])])
        if not np.all(comma | np.isin(gap, _WS_CODES)) or np.any(commas != 1):
            raise _SplitFailed
    hashes, keys, offsets = _id_keys(buf, a, q[q < stop], br, depth, starts)
    block = RecordBlock(buf, starts, ends, hashes, first, pipes=pipes[pipes < stop], id_keys=keys, id_offsets=offsets)
    return block, stop


def _id_keys(buf: bytes, a: np.ndarray, q: np.ndarray, br: np.ndarray, depth: np.ndarray,
             starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every record's top-level ``"id"`` (a string key followed by ``:`` at brace depth 1).

    Returns:
        ``(hashes, key bytes of all records concatenated, offsets)`` in :func:`id_key` form.
    """
    n = len(starts)
    op, cl = q[0::2], q[1::2]
    k = np.flatnonzero((cl - op == 3) & (a[op + 1] == ord("i")) & (a[op + 2] == ord("d")))
    colon = cl[k] + 1
    for _ in range(8):  # skip whitespace between the key and the colon
        w = np.isin(a[np.minimum(colon, len(a) - 1)], _WS_CODES)
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
    simple = (k + 1 < len(op)) & ((gap == 1) | ((gap == 2) & np.isin(a[np.minimum(colon + 1, len(a) - 1)], _WS_CODES)))
    rs, lo, hi = rec[simple], vo[simple], vc[simple]
    flat = a[_ranges(lo, hi)]
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


_P = np.uint64(0x100000001B3)  # FNV prime: odd, so its powers never vanish mod 2**64
_POW = np.cumprod(np.full(4096, _P, np.uint64)) // _P  # P**0, P**1, ...
_POW[0] = 1


def _hash_keys(keys: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """64-bit polynomial hash of each key ``keys[offsets[i]:offsets[i+1]]``; 0 for empty keys."""
    lens = np.diff(offsets)
    pos = np.arange(len(keys), dtype=np.int64) - np.repeat(offsets[:-1], lens)
    terms = (keys.astype(np.uint64) + np.uint64(1)) * _POW[pos % len(_POW)]
    nz = lens > 0
    sums = np.zeros(len(lens), np.uint64)
    if nz.any():
        sums[nz] = np.add.reduceat(terms, offsets[:-1][nz])
    with np.errstate(over="ignore"):
        h = (sums ^ (lens.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))) | np.uint64(1)
    h[~nz] = 0
    return h


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


# --------------------------------------------------------------------------- pure transforms
@dataclass
class MergeSource:
    """One input file of the merge.

    Attributes:
        name: dataset key (``q_instruct``, ``icm_instruct``, ``custom``, ``llava_v1_5_mix665k``).
        path: the LLaVA-format JSON file.
        ratio: sampling/repetition ratio (``2.0`` = every record twice, ``0.5`` = a seeded half).
    """

    name: str
    path: Path
    ratio: float = 1.0


def merge_sources(cfg: RunConfig) -> list[MergeSource]:
    """The recipe's input files in merge order: low-level datasets first, then (``mix``) the high-level set.

    Raises:
        FileNotFoundError: a source file is missing (the message names the dataset and the fix).
    """
    root = cfg.data.root
    out: list[MergeSource] = []
    for name in cfg.data.datasets:
        if name == "custom":
            files = [Path(p) if Path(p).is_absolute() else root / p for p in cfg.data.custom_json]
        else:
            files = [paths.dataset_json(cfg, name)]
        out += [MergeSource(name, p, float(cfg.data.sampling.get(name, 1.0))) for p in files]
    if cfg.train.strategy == "mix" and cfg.data.high_level:
        out.append(MergeSource(HIGH_LEVEL, paths.dataset_json(cfg, HIGH_LEVEL),
                               float(cfg.data.sampling.get(HIGH_LEVEL, 1.0))))
    for src in out:
        if not src.path.is_file():
            raise FileNotFoundError(
                f"merge: {src.name} file {src.path} not found; run the download stage "
                f"(`icmlab download`) or fix data.root / data.custom_json")
    return out


def convert_dialect(record: Any, token: str) -> tuple[Any, int]:
    """Rewrite the other dialect's image token into ``token`` in every conversation value.

    Args:
        record: a LLaVA record (anything else is returned unchanged).
        token: the target image token (``<image>`` or ``<|image|>``).

    Returns:
        ``(record, replacements)``; a changed record is a new object, the input is never mutated.
    """
    others = [t for t in DIALECTS.values() if t != token]
    convs = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(convs, list):
        return record, 0
    n = 0
    new_convs = []
    for turn in convs:
        value = turn.get("value") if isinstance(turn, dict) else None
        if isinstance(value, str) and any(o in value for o in others):
            for o in others:
                n += value.count(o)
                value = value.replace(o, token)
            turn = {**turn, "value": value}
        new_convs.append(turn)
    return ({**record, "conversations": new_convs}, n) if n else (record, 0)


def sampling_plan(n: int, ratio: float, rng: random.Random) -> tuple[int, list[int]]:
    """How a source of ``n`` records is repeated/sampled: ``(full copies, sorted extra indices)``.

    ``ratio = 2.5`` gives two full copies plus a seeded half; ``ratio = 0.3`` gives 30 % of the
    records (rounded), kept in file order.
    """
    copies = int(math.floor(ratio))
    k = round((ratio - copies) * n)
    return copies, sorted(rng.sample(range(n), k)) if k else []


# --------------------------------------------------------------------------- result
@dataclass
class MergeResult:
    """Outputs and numbers of the merge stage.

    Attributes:
        output: the merged training JSON (``<run_dir>/data/train.json``).
        provenance: the sidecar JSONL, line i describing record i of ``output``.
        summary_file: ``merge.json`` (this result as JSON).
        image_token: dialect written into every record.
        num_records: records written.
        sources: per input file: name, path, ratio, records in/out, tokens converted.
        tokens_converted: image tokens rewritten into the model's dialect (all sources).
        duplicate_ids: records whose id was already used by another (non-repeated) record.
        duplicate_examples: up to 20 ``{id, first, again}`` with source/index of both occurrences.
        seconds: wall time.
    """

    output: Path
    provenance: Path
    summary_file: Path
    image_token: str
    num_records: int
    sources: list[dict] = field(default_factory=list)
    tokens_converted: int = 0
    duplicate_ids: int = 0
    duplicate_examples: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """A few lines for the terminal and the notebook."""
        lines = [f"merged {self.num_records:,} records into {self.output} ({self.seconds:.1f} s), "
                 f"image token {self.image_token!r}, {self.tokens_converted:,} tokens converted"]
        for s in self.sources:
            lines.append(f"  {s['name']:<20} {s['records_in']:>9,} -> {s['records_out']:>9,}  "
                         f"x{s['ratio']:g}  converted {s['tokens_converted']:,}  {s['path']}")
        if self.duplicate_ids:
            ex = ", ".join(repr(e["id"]) for e in self.duplicate_examples[:5])
            lines.append(f"  WARNING: {self.duplicate_ids:,} records reuse an id (e.g. {ex}); see {self.summary_file}")
        else:
            lines.append("  no duplicate ids")
        return "\n".join(lines)


# --------------------------------------------------------------------------- I/O edge
def merge_files(
    sources: list[MergeSource],
    output: Path,
    provenance: Path,
    *,
    image_token: str,
    seed: int = 0,
    root: Path | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    durable: bool = False,
) -> MergeResult:
    """Merge ``sources`` into ``output`` (+ ``provenance`` sidecar); see the module docstring.

    Args:
        sources: input files in merge order.
        output: merged JSON to write (atomically).
        provenance: sidecar JSONL to write (atomically).
        image_token: the model's image token; the other dialect's token is rewritten into it.
        seed: seed of the per-source sampling (only used for ratios that are not whole numbers).
        root: data root; provenance stores file paths relative to it when they lie below it.
        chunk_bytes: streaming chunk size.
        durable: fsync both outputs before they are renamed into place. The rename alone already
            guarantees that no reader ever sees a half-written file (an interrupted merge leaves the
            old file or none); fsync adds survival of a machine crash at ~1.5 s per GB written.

    Returns:
        The :class:`MergeResult` (``summary_file`` is ``output``'s sibling ``merge.json``, not yet written).

    Raises:
        ValueError: an output path is also an input (never merge in place), or an input is not a
            JSON list (the message names the file).
    """
    t0 = time.perf_counter()
    inputs = {s.path.resolve() for s in sources}
    for out in (output, provenance):
        if Path(out).resolve() in inputs:
            raise ValueError(f"merge: output {out} is also an input; outputs must go to a new file (run_dir/data)")
    needles = _needles(image_token)
    dup = DuplicateIds()
    written, stats = 0, []
    with atomic_path(output) as tmp_out, atomic_path(provenance) as tmp_prov:
        with open(tmp_out, "wb", buffering=0) as fo, open(tmp_prov, "wb") as fp:
            sink = _Sink(fo.fileno())
            sink.write(b"[")
            for si, src in enumerate(sources):
                rel = _relative(src.path, root)
                n_in = count_records(src.path) if src.ratio != 1.0 else -1
                copies, extra = (sampling_plan(n_in, src.ratio, random.Random(f"{seed}/{src.name}/{rel}"))
                                 if n_in >= 0 else (1, []))
                passes = [(c, None) for c in range(copies)] + ([(copies, np.array(extra, np.int64))] if extra else [])
                st = {"name": src.name, "path": str(src.path), "file": rel, "ratio": src.ratio, "records_in": n_in,
                      "records_out": 0, "tokens_converted": 0, "copies": copies, "sampled": len(extra)}
                with open(src.path, "rb") as fsrc:
                    for copy, keep in passes:
                        line = (b'{"source":' + orjson.dumps(src.name) + b',"file":' + orjson.dumps(rel)
                                + b',"copy":%d,"index":%%d}\n' % copy)
                        for block in _prefetch(iter_blocks(src.path, chunk_bytes)):
                            idx = np.arange(len(block))
                            if keep is not None:
                                idx = np.flatnonzero(np.isin(block.first + idx, keep))
                            if not idx.size:
                                continue
                            pieces, converted = _emit(block, idx, needles, image_token)
                            for k, piece in enumerate(pieces):
                                sink.write(b",\n" if written or k else b"\n")
                                if isinstance(piece, bytes):
                                    sink.write(piece)
                                else:
                                    sink.copy(block, *piece, fsrc.fileno())
                            if copy == 0:  # later copies repeat the same records on purpose: not duplicates
                                dup.add(block, idx, (si << 40) | (block.first + idx))
                            fp.write(b"".join(map(line.__mod__, (block.first + idx).tolist())))
                            written += idx.size
                            st["records_out"] += idx.size
                            st["tokens_converted"] += converted
                            if n_in < 0:
                                st["records_in"] = block.first + len(block)
                st["records_in"] = max(st["records_in"], 0)
                stats.append(st)
            sink.write(b"\n]\n")
            sink.flush()
            fp.flush()
            if durable:  # off by default: a derived file that merge re-creates; rename keeps it atomic
                for fh in (fo, fp):
                    os.fsync(fh.fileno())

    pairs, ids = dup.confirm()

    def where(loc: int) -> dict:
        s = sources[loc >> 40]
        return {"source": s.name, "file": _relative(s.path, root), "index": loc & ((1 << 40) - 1)}

    return MergeResult(
        output=Path(output), provenance=Path(provenance), summary_file=Path(output).parent / "merge.json",
        image_token=image_token, num_records=written, sources=stats,
        tokens_converted=sum(s["tokens_converted"] for s in stats), duplicate_ids=len(pairs),
        duplicate_examples=[{"id": i, "first": where(a), "again": where(b)} for i, (a, b) in zip(ids, pairs.tolist())],
        seconds=time.perf_counter() - t0,
    )


def run(cfg: RunConfig) -> MergeResult:
    """Merge stage entry point: the recipe's sources into ``paths.merged_json(cfg)``.

    Returns:
        The :class:`MergeResult`; its JSON form is also written to ``<run_dir>/data/merge.json``.

    Raises:
        FileNotFoundError: a source file is missing.
        ValueError: a source is not a JSON list of records.
    """
    token = DIALECTS[cfg.model.family]
    result = merge_files(merge_sources(cfg), paths.merged_json(cfg), paths.provenance_jsonl(cfg),
                         image_token=token, seed=cfg.seed, root=cfg.data.root)
    atomic_write_json(result.summary_file, {k: (str(v) if isinstance(v, Path) else v)
                                            for k, v in asdict(result).items()})
    log.info("%s", result.summary())
    return result


def _relative(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return str(Path(path).resolve().relative_to(Path(root).resolve()))
        except ValueError:
            pass
    return str(Path(path).resolve())


def _prefetch(blocks: Iterator[RecordBlock], depth: int = 2) -> Iterator[RecordBlock]:
    """Run the reader/scanner in a thread (numpy and file reads release the GIL) ahead of the writer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for b in blocks:
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put(None)
        except BaseException as e:  # handed to the consumer, which re-raises it
            q.put(e)

    t = threading.Thread(target=work, name="merge-reader", daemon=True)
    t.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _needles(token: str) -> list[bytes]:
    """Byte strings that flag a record for conversion into ``token``'s dialect (then verified on
    the parsed record). They also catch a ``<`` written as the JSON escape ``\\u003c``."""
    out = []
    for other in (t for t in DIALECTS.values() if t != token):
        inner = other.strip("<>")
        # "|image|" has no "<": one needle covers both spellings; "image>" would be too common a tail.
        out += [inner.encode()] if inner.startswith("|") else [other.encode(), b"\\u003c" + inner.encode(),
                                                               b"\\u003C" + inner.encode()]
    return out


def _find_all(buf: bytes, needles: list[bytes], lo: int, hi: int) -> list[int]:
    """Offsets of every occurrence of any needle in ``buf[lo:hi]`` (bytes.find is memchr-fast)."""
    out = []
    for needle in needles:
        i = buf.find(needle, lo, hi)
        while i >= 0:
            out.append(i)
            i = buf.find(needle, i + 1, hi)
    return out


def _emit(block: RecordBlock, idx: np.ndarray, needles: list[bytes], token: str) -> tuple[list, int]:
    """Output pieces for the block's records ``idx`` (sorted) and the number of tokens converted.

    A piece is either ``(start, end)``, a verbatim run of consecutive records of ``block.buf``
    (separators included), or the bytes of one converted record. Only records holding the other
    dialect's token (or a ``\\u003c`` escape) are parsed, converted and re-serialised.
    """
    buf, starts, ends = block.buf, block.starts, block.ends
    lo, hi = int(starts[idx[0]]), int(ends[idx[-1]])
    if needles == [b"|image|"] and block.pipes is not None:  # the scan already located every "|"
        hits = block.pipes[(block.pipes >= lo) & (block.pipes < hi)].tolist()
    else:
        hits = _find_all(buf, needles, lo, hi)
    fix, n = {}, 0
    wanted = set(idx.tolist())
    for r in sorted(set((np.searchsorted(starts, hits, side="right") - 1).tolist()) & wanted) if hits else []:
        text = block.record(r)
        if not any(x in text for x in needles):
            continue
        rec, k = convert_dialect(orjson.loads(text), token)
        if k:
            fix[r] = orjson.dumps(rec)
            n += k
    if len(idx) == len(block) and not fix:  # the common case: the whole block verbatim
        return [(int(starts[0]), int(ends[-1]))], 0
    pieces: list = []
    run: list[int] = []  # [first, last] record of the current verbatim run
    for r in idx.tolist():
        if r not in fix and run and r == run[1] + 1:
            run[1] = r
            continue
        if run:
            pieces.append((int(starts[run[0]]), int(ends[run[1]])))
        run = [] if r in fix else [r, r]
        if r in fix:
            pieces.append(fix[r])
    if run:
        pieces.append((int(starts[run[0]]), int(ends[run[1]])))
    return pieces, n


class _Sink:
    """Output file: small writes are buffered; verbatim runs are copied file-to-file in the kernel."""

    def __init__(self, fd: int) -> None:
        self.fd, self.pending, self.size = fd, [], 0

    def write(self, data: bytes) -> None:
        self.pending.append(data)
        self.size += len(data)
        if self.size > 1 << 20:
            self.flush()

    def flush(self) -> None:
        _write_all(self.fd, b"".join(self.pending))
        self.pending, self.size = [], 0

    def copy(self, block: RecordBlock, start: int, end: int, src_fd: int) -> None:
        """Append ``block.buf[start:end]``, via ``copy_file_range`` when the block is a file slice."""
        if block.offset is None or end - start < 1 << 16:
            self.write(block.buf[start:end])
            return
        self.flush()
        done = 0
        try:
            while done < end - start:
                k = os.copy_file_range(src_fd, self.fd, end - start - done, block.offset + start + done)
                if k <= 0:
                    raise OSError("copy_file_range made no progress")
                done += k
        except OSError:  # other filesystem, old kernel...: write the rest from memory
            _write_all(self.fd, memoryview(block.buf)[start + done : end])


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


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
        if not self.hashes:
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
        cand = np.flatnonzero(same)
        diff = keys[_ranges(start[later[cand]], start[later[cand]] + size[later[cand]])] != \
            keys[_ranges(start[first[cand]], start[first[cand]] + size[first[cand]])]
        mism = np.concatenate(([0], np.cumsum(diff)))
        seg = np.cumsum(size[later[cand]]) - size[later[cand]]
        same[cand] = mism[seg + size[later[cand]]] == mism[seg]
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
            pairs = [np.stack([loc[first[same & ~np.isin(h[later], h[bad])]],
                               loc[later[same & ~np.isin(h[later], h[bad])]]], 1), np.array(extra, np.int64).reshape(-1, 2)]
        out = np.concatenate(pairs)
        out = out[np.argsort(out[:, 1], kind="stable")]
        ids = []
        for _, b in out[:with_ids].tolist():
            i = int(np.flatnonzero(loc == b)[0])
            ids.append(id_value(keys[start[i] : start[i] + size[i]].tobytes()))
        return out, ids


def id_value(key: bytes) -> Any:
    """The id value of an :func:`id_key` (for reports)."""
    if key[:1] == b"\xff":
        return orjson.loads(key[1:])
    return key[1:].decode("utf-8", "replace") if key[:1] == b"\xfe" else key.decode("utf-8", "replace")
