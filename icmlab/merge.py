"""Merge stage: concatenate the recipe's LLaVA-format JSON files into one training file.

What it does (``jq -s 'add'`` semantics, done the careful way):

- reads the recipe's sources in the recipe's order, the low-level data first as the upstream seeds
  do (``mix``: ``datasets...`` then ``llava_v1_5_mix665k.json``; ``after``: the low-level files only);
- optionally samples or repeats each source (``cfg.data.sampling``, seeded by ``cfg.seed``);
- rewrites the image token of EVERY record into the model's dialect (``<image>`` for LLaVA,
  ``<|image|>`` for mPLUG-Owl2, the "after"/CSFT file included, which upstream forgets);
- writes ``<run_dir>/data/train.json`` (a plain LLaVA list whose records are the input records'
  bytes, verbatim unless converted, loadable by the original repos unchanged), a provenance sidecar ``train.provenance.jsonl`` (source, file, index,
  copy of each output record, line for line) and a summary ``merge.json`` with duplicate ids;
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
import random
import re
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

DEFAULT_CHUNK_BYTES = 8 << 20
MAX_DUPLICATE_EXAMPLES = 20
HIGH_LEVEL = "llava_v1_5_mix665k"

_WS = b" \t\r\n"
_QUOTE, _BSLASH, _LBRACE, _RBRACE, _COLON, _COMMA = 34, 92, 123, 125, 58, 44
_WS_CODES = np.frombuffer(_WS, np.uint8)
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
        ids: per record, the ``id`` as a hashable key (str content as bytes, other JSON values
            prefixed with ``b"\\xff"``), or None when the record has no top-level ``id``.
        first: index of the first record in the file.
    """

    buf: bytes
    starts: np.ndarray
    ends: np.ndarray
    ids: list
    first: int

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
            ids = [_id_key(r.get("id")) if isinstance(r, dict) else None for r in data[i : i + 20_000]]
            yield RecordBlock(b",".join(texts) + b",", starts, ends, ids, i)


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
        buf, lead, first = head[1:], b"", 0  # lead: what may precede the first record ("" or ",")
        while True:
            more = f.read(chunk_bytes)
            buf += more
            block, end = _scan_buffer(buf, lead, first, final=not more)
            if block is not None:
                yield block
                first += len(block)
                buf, lead = buf[end:], b","
            if not more:
                if buf.strip(_WS) != b"]":
                    raise _SplitFailed  # truncated file or trailing garbage
                return


def _unescaped_quotes(a: np.ndarray) -> np.ndarray:
    q = np.flatnonzero(a == _QUOTE)
    qq = q[q > 0]
    cand = qq[a[qq - 1] == _BSLASH]
    if cand.size:  # a quote is escaped when an odd run of backslashes precedes it
        run, alive = np.ones(cand.size, np.int64), np.ones(cand.size, bool)
        while alive.any():
            pos = cand - run - 1
            alive &= pos >= 0
            alive[alive] = a[pos[alive]] == _BSLASH
            run += alive
        q = q[~np.isin(q, cand[(run & 1) == 1], assume_unique=True)]
    return q


def _scan_buffer(buf: bytes, lead: bytes, first: int, final: bool) -> tuple[RecordBlock | None, int]:
    """Find the complete records of ``buf`` (which starts outside any string, between records)."""
    a = np.frombuffer(buf, np.uint8)
    q = _unescaped_quotes(a)
    br = np.flatnonzero((a == _LBRACE) | (a == _RBRACE))
    br = br[(np.searchsorted(q, br) & 1) == 0]  # odd number of quotes before: inside a string
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
        if not np.all(comma | np.isin(gap, _WS_CODES)) or np.any(np.add.reduceat(comma, np.r_[0, np.cumsum(lens[:-1])]) != 1):
            raise _SplitFailed
    return RecordBlock(buf, starts, ends, _find_ids(buf, a, q[q < stop], br, depth, starts), first), stop


def _find_ids(buf: bytes, a: np.ndarray, q: np.ndarray, br: np.ndarray, depth: np.ndarray, starts: np.ndarray) -> list:
    """Top-level ``"id"`` value of every record: keys are strings followed by ``:`` at brace depth 1."""
    ids: list = [None] * len(starts)
    op, cl = q[0::2], q[1::2]
    k = np.flatnonzero((cl - op == 3) & (a[op + 1] == ord("i")) & (a[op + 2] == ord("d")))
    if not k.size:
        return ids
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
    for r, c, j, vo, vc in zip(rec.tolist(), colon.tolist(), k.tolist(), op[nxt].tolist(), cl[nxt].tolist()):
        if j + 1 < len(op) and not buf[c + 1 : vo].strip(_WS):
            raw = buf[vo + 1 : vc]
            ids[r] = orjson.loads(buf[vo : vc + 1]).encode() if b"\\" in raw else raw
        else:
            m = _SCALAR.match(buf, c + 1 + len(buf[c + 1 : c + 64]) - len(buf[c + 1 : c + 64].lstrip(_WS)))
            ids[r] = b"\xff" + m.group(0) if m else None
    return ids


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
    others = [t.encode() for t in DIALECTS.values() if t != image_token]
    # A token may hide behind a JSON escape of "<" (\u003c); such records are converted too.
    needs_parse = re.compile(b"|".join([re.escape(o) for o in others] + [rb"\\u003[cC]"]))
    seen: dict[Any, int] = {}  # id -> (source number << 40 | index) of its first occurrence
    dups: list[tuple[Any, int, int]] = []
    n_dups, written, stats = 0, 0, []
    with atomic_path(output) as tmp_out, atomic_path(provenance) as tmp_prov:
        with open(tmp_out, "wb") as fo, open(tmp_prov, "wb") as fp:
            fo.write(b"[")
            for si, src in enumerate(sources):
                rel = _relative(src.path, root)
                n_in = count_records(src.path) if src.ratio != 1.0 else -1
                copies, extra = (sampling_plan(n_in, src.ratio, random.Random(f"{seed}/{src.name}/{rel}"))
                                 if n_in >= 0 else (1, []))
                passes = [(c, None) for c in range(copies)] + ([(copies, np.array(extra, np.int64))] if extra else [])
                st = {"name": src.name, "path": str(src.path), "file": rel, "ratio": src.ratio, "records_in": n_in,
                      "records_out": 0, "tokens_converted": 0, "copies": copies, "sampled": len(extra)}
                for copy, keep in passes:
                    n_seen = 0
                    for block in iter_blocks(src.path, chunk_bytes):
                        n_seen = block.first + len(block)
                        idx = np.arange(len(block))
                        if keep is not None:
                            idx = np.flatnonzero(np.isin(block.first + idx, keep))
                        if not idx.size:
                            continue
                        text, converted = _emit(block, idx, needs_parse, image_token)
                        fo.write((b",\n" if written else b"\n") + text)
                        st["tokens_converted"] += converted
                        if copy == 0:  # later copies repeat the same records on purpose: not duplicates
                            for j in idx.tolist():
                                key = block.ids[j]
                                if key:
                                    loc = (si << 40) | (block.first + j)
                                    if seen.setdefault(key, loc) != loc:
                                        n_dups += 1
                                        if len(dups) < MAX_DUPLICATE_EXAMPLES:
                                            dups.append((key, seen[key], loc))
                        prefix = (b'{"source":' + orjson.dumps(src.name) + b',"file":' + orjson.dumps(rel)
                                  + b',"copy":%d,"index":' % copy)
                        fp.write(b"".join([prefix + b"%d}\n" % i for i in (block.first + idx).tolist()]))
                        written += idx.size
                        st["records_out"] += idx.size
                    if st["records_in"] < 0:
                        st["records_in"] = n_seen
                stats.append(st)
            fo.write(b"\n]\n")
            for fh in (fo, fp):
                fh.flush()
                os.fsync(fh.fileno())

    def where(loc: int) -> dict:
        s = sources[loc >> 40]
        return {"source": s.name, "file": _relative(s.path, root), "index": loc & ((1 << 40) - 1)}

    return MergeResult(
        output=Path(output), provenance=Path(provenance), summary_file=Path(output).parent / "merge.json",
        image_token=image_token, num_records=written, sources=stats,
        tokens_converted=sum(s["tokens_converted"] for s in stats), duplicate_ids=n_dups,
        duplicate_examples=[{"id": _key_value(k), "first": where(a), "again": where(b)} for k, a, b in dups],
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


def _emit(block: RecordBlock, idx: np.ndarray, needs_parse: re.Pattern, token: str) -> tuple[bytes, int]:
    """JSON text of the block's records ``idx`` (sorted): verbatim bytes, except records holding
    the other dialect's token, which are parsed, converted and re-serialised. Returns (text, tokens converted)."""
    buf, starts, ends = block.buf, block.starts, block.ends
    hits = [m.start() for m in needs_parse.finditer(buf, int(starts[idx[0]]), int(ends[idx[-1]]))]
    fix = {}
    for r in sorted(set((np.searchsorted(starts, hits, side="right") - 1).tolist())) if hits else []:
        rec, n = convert_dialect(orjson.loads(block.record(r)), token)
        fix[r] = (orjson.dumps(rec), n)
    if len(idx) == len(block) and not fix:  # the common case: copy the whole run verbatim
        return buf[starts[0] : ends[-1]], 0
    parts = [fix[r][0] if r in fix else buf[starts[r] : ends[r]] for r in idx.tolist()]
    return b",\n".join(parts), sum(fix[r][1] for r in idx.tolist() if r in fix)


def _key_value(key: bytes) -> Any:
    """The JSON value of an id key (for reports)."""
    return orjson.loads(key[1:]) if key[:1] == b"\xff" else key.decode("utf-8", "replace")


def _id_key(rid: Any) -> bytes | None:
    """Hashable key of an id value, in the scanner's form (string content as UTF-8, others b"\xff" + JSON)."""
    if rid is None or rid == "":
        return None
    return rid.encode() if isinstance(rid, str) else b"\xff" + orjson.dumps(rid, option=orjson.OPT_SORT_KEYS)
