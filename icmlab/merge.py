"""Merge stage: concatenate the recipe's LLaVA-format JSON files into one training file.

What it does (``jq -s 'add'`` semantics, done the careful way):

- reads the recipe's sources in the recipe's order, the low-level data first as the upstream seeds
  do (``mix``: ``datasets...`` then ``llava_v1_5_mix665k.json``; ``after``: the low-level files only);
- optionally samples or repeats each source (``cfg.data.sampling``, seeded by ``cfg.seed``);
- rewrites the image token of EVERY record into the model's dialect (``<image>`` for LLaVA,
  ``<|image|>`` for mPLUG-Owl2, the "after"/CSFT file included, which upstream forgets);
- writes ``<run_dir>/data/train.json`` (a plain LLaVA list, one record per line, loadable by the
  original repos unchanged), a provenance sidecar ``train.provenance.jsonl`` (source, file, index,
  copy of each output record, line for line) and a summary ``merge.json`` with duplicate ids;
- never touches its inputs; every output is written atomically.

The files are streamed: records are parsed chunk by chunk with orjson (see
:func:`iter_record_chunks`), so memory stays at a few chunks whatever the file size.

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

import orjson

from icmlab import paths
from icmlab.config import RunConfig
from icmlab.conversation import DIALECTS
from icmlab.io import atomic_path, atomic_write_json, read_json

log = logging.getLogger("icmlab.merge")

DEFAULT_CHUNK_BYTES = 8 << 20
MAX_DUPLICATE_EXAMPLES = 20
HIGH_LEVEL = "llava_v1_5_mix665k"

# A top-level record boundary candidate: "}" "," "{" followed by a key. Turn objects inside
# "conversations" start with "from"/"value", so candidates with those keys are skipped; every
# candidate is then verified by parsing everything before it (see _parse_prefix).
_BOUNDARY = re.compile(rb'\}[ \t\r\n]*,[ \t\r\n]*\{[ \t\r\n]*"([^"\\]{0,64})"')
_TURN_KEYS = {b"from", b"value"}
_WS = b" \t\r\n"
_SEARCH_WINDOW = 1 << 18


# --------------------------------------------------------------------------- streaming reader
class _SplitFailed(Exception):
    """The fast chunk splitter could not find a verified boundary; the caller falls back."""


def iter_record_chunks(path: str | os.PathLike, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[list[Any]]:
    """Yield the elements of a top-level JSON array, a list of consecutive elements at a time.

    The file is read ``chunk_bytes`` at a time. Each chunk is cut at a record boundary that is
    *verified* by parsing the whole prefix with orjson, so the split is exact; when no boundary
    can be verified (unusual layouts, invalid JSON) the file is parsed whole instead, which either
    yields the same records or raises the precise error.

    Args:
        path: JSON file whose top level is a list.
        chunk_bytes: bytes read per step (memory stays at a few chunks).

    Yields:
        Lists of elements in file order (their concatenation is the whole array).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not JSON (byte offset given), is an HTML page, or is not a list.
    """
    path = Path(path)
    done = 0
    try:
        for chunk in _split_chunks(path, chunk_bytes):
            done += len(chunk)
            yield chunk
    except _SplitFailed:
        log.debug("%s: falling back to a whole-file parse after %d records", path, done)
        data = read_json(path)
        if not isinstance(data, list):
            raise ValueError(_not_list_message(path, data)) from None
        for i in range(done, len(data), 50_000):
            yield data[i : i + 50_000]


def count_records(path: str | os.PathLike) -> int:
    """Number of elements of a top-level JSON array (streamed)."""
    return sum(len(c) for c in iter_record_chunks(path))


def _not_list_message(path: Path, data: Any) -> str:
    return (f"{path}: the top level is a JSON {type(data).__name__}, not a list of records; "
            "a LLaVA training file is a JSON array of {id, image, conversations} objects")


def _split_chunks(path: Path, chunk_bytes: int) -> Iterator[list[Any]]:
    with open(path, "rb") as f:
        buf = f.read(chunk_bytes)
        i = 0
        while i < len(buf) and buf[i] in _WS:
            i += 1
        if i >= len(buf) or buf[i] != ord("["):
            raise _SplitFailed  # not a list (or empty / HTML / BOM): the fallback raises the exact error
        buf = buf[i + 1 :]
        while True:
            more = f.read(chunk_bytes)
            if not more:
                if not buf.strip(_WS).startswith(b"]"):
                    try:
                        yield orjson.loads(b"[" + buf)
                    except orjson.JSONDecodeError:
                        raise _SplitFailed from None
                elif buf.strip(_WS) != b"]":
                    raise _SplitFailed  # something after the closing bracket
                return
            buf += more
            cut = _parse_prefix(buf)
            if cut is None:
                if len(buf) > 64 * chunk_bytes:
                    raise _SplitFailed  # a single huge record or an odd layout: parse whole
                continue
            records, end = cut
            yield records
            buf = buf[end:]


def _parse_prefix(buf: bytes) -> tuple[list[Any], int] | None:
    """Parse ``buf`` up to its last verified record boundary: ``(records, index after the comma)``."""
    for window in (_SEARCH_WINDOW, len(buf)):
        lo = max(0, len(buf) - window)
        matches = [m for m in _BOUNDARY.finditer(buf, lo) if m.group(1) not in _TURN_KEYS]
        for m in reversed(matches[-4:]):
            try:
                records = orjson.loads(b"[" + buf[: m.start() + 1] + b"]")
            except orjson.JSONDecodeError:
                continue
            comma = buf.index(b",", m.start())
            return records, comma + 1
        if lo == 0:
            break
    return None


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
    seen: dict[Any, int] = {}  # id -> (source number << 40 | index) of its first occurrence
    dups: list[tuple[Any, int, int]] = []
    n_dups = 0
    stats: list[dict] = []
    written = 0
    with atomic_path(output) as tmp_out, atomic_path(provenance) as tmp_prov:
        with open(tmp_out, "wb") as fo, open(tmp_prov, "wb") as fp:
            fo.write(b"[")
            for si, src in enumerate(sources):
                rel = _relative(src.path, root)
                rng = random.Random(f"{seed}/{src.name}/{rel}")
                n_in = count_records(src.path) if src.ratio != 1.0 else -1
                copies, extra = sampling_plan(n_in, src.ratio, rng) if n_in >= 0 else (1, [])
                passes = [(c, None) for c in range(copies)] + ([(copies, set(extra))] if extra else [])
                st = {"name": src.name, "path": str(src.path), "file": rel, "ratio": src.ratio,
                      "records_in": n_in, "records_out": 0, "tokens_converted": 0, "copies": copies,
                      "sampled": len(extra)}
                for copy, keep in passes:
                    first_pass = copy == 0  # ids of repeated copies are intentional repeats
                    index = 0
                    for chunk in iter_record_chunks(src.path, chunk_bytes):
                        base = index
                        index += len(chunk)
                        if keep is not None:
                            picked = [(base + j, r) for j, r in enumerate(chunk) if base + j in keep]
                        else:
                            picked = list(enumerate(chunk, base))
                        if not picked:
                            continue
                        out_recs = []
                        for i, rec in picked:
                            rec, n = convert_dialect(rec, image_token)
                            st["tokens_converted"] += n
                            out_recs.append(rec)
                            if first_pass and isinstance(rec, dict):
                                key = _id_key(rec.get("id"))
                                if key is not None:
                                    loc = seen.setdefault(key, (si << 40) | i)
                                    if loc != ((si << 40) | i):
                                        n_dups += 1
                                        if len(dups) < MAX_DUPLICATE_EXAMPLES:
                                            dups.append((rec.get("id"), loc, (si << 40) | i))
                        fo.write((b",\n" if written else b"\n") + b",\n".join(map(orjson.dumps, out_recs)))
                        prefix = (b'{"source":' + orjson.dumps(src.name) + b',"file":' + orjson.dumps(rel)
                                  + b',"copy":%d,"index":' % copy)
                        fp.write(b"".join(prefix + b"%d}\n" % i for i, _ in picked))
                        written += len(out_recs)
                        st["records_out"] += len(out_recs)
                    if st["records_in"] < 0:
                        st["records_in"] = index
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
        duplicate_examples=[{"id": i, "first": where(a), "again": where(b)} for i, a, b in dups],
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


def _id_key(rid: Any) -> Any:
    if rid is None or rid == "":
        return None
    if isinstance(rid, (str, int, float, bool)):
        return (type(rid).__name__, rid) if not isinstance(rid, str) else rid
    return orjson.dumps(rid, option=orjson.OPT_SORT_KEYS)
