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

The files are streamed and not parsed: the exact byte scan of :mod:`icmlab.inputs.jsonscan`
(:func:`~icmlab.inputs.jsonscan.iter_blocks`) finds the record boundaries and ids, records are copied as
bytes, and only records that carry the other dialect's token are parsed and re-serialised. Memory
stays at a few chunks whatever the file size. The scan checks the array's structure (balanced
braces outside strings, one comma between records, nothing after the closing bracket); the
validate stage parses every record.

Usage::

    from icmlab.merge.stage import run
    result = run(cfg)          # notebook 02_merge / ``icmlab merge parameters/X.yaml``
    print(result.summary())
"""

from __future__ import annotations

import logging
import math
import os
import queue
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import orjson

from icmlab import paths
from icmlab.config import RunConfig
from icmlab.inputs.jsonscan import DEFAULT_CHUNK_BYTES, DuplicateIds, RecordBlock, count_records, iter_blocks
from icmlab.io import atomic_path, atomic_write_json, write_inputs_stamp
from icmlab.merge.provenance import ProvenanceLines
from icmlab.models.spec import DIALECTS
from icmlab.rundir import run_dir_lock

log = logging.getLogger("icmlab.merge.stage")

HIGH_LEVEL = "llava_v1_5_mix665k"


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
        out.append(
            MergeSource(HIGH_LEVEL, paths.dataset_json(cfg, HIGH_LEVEL), float(cfg.data.sampling.get(HIGH_LEVEL, 1.0)))
        )
    for src in out:
        if not src.path.is_file():
            raise FileNotFoundError(
                f"merge: {src.name} file {src.path} not found; run the download stage "
                f"(`icmlab download`) or fix data.root / data.custom_json"
            )
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
        lines = [
            f"merged {self.num_records:,} records into {self.output} ({self.seconds:.1f} s), "
            f"image token {self.image_token!r}, {self.tokens_converted:,} tokens converted"
        ]
        for s in self.sources:
            lines.append(
                f"  {s['name']:<20} {s['records_in']:>9,} -> {s['records_out']:>9,}  "
                f"x{s['ratio']:g}  converted {s['tokens_converted']:,}  {s['path']}"
            )
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
    dup, lines = DuplicateIds(), ProvenanceLines()
    written, stats = 0, []
    with atomic_path(output) as tmp_out, atomic_path(provenance) as tmp_prov:
        # The temporary files exist (empty): "wb" would truncate them, and on ext4 (auto_da_alloc)
        # closing a truncated file forces its whole content to disk, ~1 s per GB written.
        with open(tmp_out, "r+b", buffering=0) as fo, open(tmp_prov, "r+b") as fp:
            sink = _Sink(fo.fileno())
            sink.write(b"[")
            for si, src in enumerate(sources):
                rel = _relative(src.path, root)
                n_in = count_records(src.path) if src.ratio != 1.0 else -1
                copies, extra = (
                    sampling_plan(n_in, src.ratio, random.Random(f"{seed}/{src.name}/{rel}")) if n_in >= 0 else (1, [])
                )
                passes = [(c, None) for c in range(copies)] + ([(copies, np.array(extra, np.int64))] if extra else [])
                st = {
                    "name": src.name,
                    "path": str(src.path),
                    "file": rel,
                    "ratio": src.ratio,
                    "records_in": n_in,
                    "records_out": 0,
                    "tokens_converted": 0,
                    "copies": copies,
                    "sampled": len(extra),
                }
                with open(src.path, "rb") as fsrc:
                    for copy, keep in passes:
                        line = b'{"source":%b,"file":%b,"copy":%d,"index":' % (
                            orjson.dumps(src.name),
                            orjson.dumps(rel),
                            copy,
                        )
                        for block in _prefetch(iter_blocks(src.path, chunk_bytes)):
                            _refuse_non_objects(src.path, block)
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
                            for table in lines.build(line, block.first + idx):
                                fp.write(table)
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
        # Every check runs before the outputs are renamed into place: a failed merge keeps the previous ones.
        if not written:
            counts = ", ".join(f"{s['file']}: {s['records_in']}" for s in stats)
            raise ValueError(
                f"merge: no records to train on ({counts}); a source file is an empty list, or every "
                "data.sampling ratio sampled nothing: check the files and data.datasets"
            )
        pairs, ids = dup.confirm()

    def where(loc: int) -> dict:
        s = sources[loc >> 40]
        return {"source": s.name, "file": _relative(s.path, root), "index": loc & ((1 << 40) - 1)}

    return MergeResult(
        output=Path(output),
        provenance=Path(provenance),
        summary_file=Path(output).parent / "merge.json",
        image_token=image_token,
        num_records=written,
        sources=stats,
        tokens_converted=sum(s["tokens_converted"] for s in stats),
        duplicate_ids=len(pairs),
        duplicate_examples=[
            {"id": i, "first": where(a), "again": where(b)} for i, (a, b) in zip(ids, pairs[: len(ids)].tolist())
        ],
        seconds=time.perf_counter() - t0,
    )


def run(cfg: RunConfig) -> MergeResult:
    """Merge stage entry point: the recipe's sources into ``paths.merged_json(cfg)``.

    Returns:
        The :class:`MergeResult`; its JSON form is also written to ``<run_dir>/data/merge.json``.

    Raises:
        FileNotFoundError: a source file is missing.
        ValueError: a source is not a JSON list of records.
        RunDirBusy: another process is writing into the run directory.
    """
    with run_dir_lock(cfg, "merge"):
        return _run(cfg)


def _run(cfg: RunConfig) -> MergeResult:
    token = DIALECTS[cfg.model.family]
    srcs = merge_sources(cfg)
    result = merge_files(
        srcs,
        paths.merged_json(cfg),
        paths.provenance_jsonl(cfg),
        image_token=token,
        seed=cfg.seed,
        root=cfg.data.root,
    )
    write_inputs_stamp(result.output, [s.path for s in srcs])  # train refuses it once a source changes
    atomic_write_json(
        result.summary_file, {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
    )
    log.info("%s", result.summary())
    return result


def _refuse_non_objects(path: Path, block: RecordBlock) -> None:
    """Raise naming the file and index of the first element that is not a JSON object."""
    bad = block.non_objects()
    if bad:
        index, kind = bad[0]
        more = f" ({len(bad)} such elements in this part of the file)" if len(bad) > 1 else ""
        raise ValueError(
            f"{path}: record {index} is a JSON {kind}, not an object{more}; a LLaVA training file is one "
            "JSON array of {id, image, conversations} objects (a nested list must be flattened)"
        )


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
        out += (
            [inner.encode()]
            if inner.startswith("|")
            else [other.encode(), b"\\u003c" + inner.encode(), b"\\u003C" + inner.encode()]
        )
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
    candidates = set((np.searchsorted(starts, hits, side="right") - 1).tolist()) & set(idx.tolist()) if hits else ()
    for r in sorted(candidates):
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
