"""The source catalog (``catalog.yaml``) and which of its sources a recipe needs.

Pure functions, no I/O beyond reading the packaged YAML and checking local paths::

    from icmlab.download.catalog import load_catalog, needed_sources
    catalog = load_catalog(demo=cfg.demo.enabled)
    for need in needed_sources(cfg, catalog):
        print(need.source.name, need.reasons)

What a recipe needs follows from its config: ``data.datasets`` picks the low-level sets;
``train.strategy: mix`` adds ``llava_v1_5_mix665k.json`` and its six image sources (``after`` does
not); ``eval.benchmarks`` adds Q-Bench (the ``eval.split`` JSON + images) and/or the ICM
validation set; the model keys add checkpoints (the starting point, the baseline, and for a LLaVA
``mix`` run the LLM, CLIP tower and stage-1 projector). ``data.sources.<name>`` relocates any data
source (local path, ``file://`` or URL, optional ``#sha256=<hex>``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from icmlab.config import RunConfig
from icmlab.models.spec import family_spec

KINDS = ("file", "archive", "tree", "model", "model_file")
DATA_KINDS = ("file", "archive", "tree")
HIGH_LEVEL_IMAGES = (
    "coco_train2017",
    "gqa_images",
    "ocr_vqa_images",
    "textvqa_train_val_images",
    "vg_images",
    "vg_images2",
)
DATASET_SOURCES = {"icm_instruct": ("icm_instruct_train",), "q_instruct": ("q_instruct_labels", "q_instruct_images")}


@dataclass(frozen=True)
class Expect:
    """One row of the layout check.

    Attributes:
        path: relative to the data root.
        files: expected number of files under a folder (None: not known / a file).
        approx: the count is indicative (shown as ``≈``; fewer files is not flagged).
        note: shown in the table.
    """

    path: str
    files: int | None = None
    approx: bool = False
    note: str = ""


@dataclass(frozen=True)
class Source:
    """One catalog entry (see the field list at the top of ``catalog.yaml``)."""

    name: str
    title: str
    kind: str
    hf_repo: str | None = None
    hf_type: str | None = None
    hf_file: str | None = None
    revision: str | None = None
    alt_repos: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()
    url: str | None = None
    location: str | None = None
    """Local path / ``file://`` / URL replacing the catalog location (override or demo mirror)."""
    size: int | None = None
    approx_size: int | None = None
    sha256: str | None = None
    archive: str | None = None
    strip: int = 0
    convert: str | None = None
    target: str | None = None
    expect: tuple[Expect, ...] = ()
    gated: str | None = None
    requires: tuple[str, ...] = ()
    artifact: str | None = None
    checkpoint: str | None = None
    ref: str = ""

    @property
    def in_data_root(self) -> bool:
        """Whether the source lands under the data root (data, demo checkpoints) or in the hub cache."""
        return self.kind in DATA_KINDS or self.target is not None

    @property
    def origin(self) -> str:
        """Where it comes from, for tables and markers."""
        if self.location:
            return self.location
        if self.url:
            return self.url
        if self.hf_repo:
            prefix = "datasets/" if self.hf_type == "dataset" else ""
            rev = self.revision or "main"
            return f"hf://{prefix}{self.hf_repo}@{rev}" + (f"/{self.hf_file}" if self.hf_file else "")
        return "(demo generator)" if (self.artifact or self.checkpoint) else "?"

    @property
    def display_size(self) -> int | None:
        """Exact size when known, else the approximate one."""
        return self.size if self.size is not None else self.approx_size


@dataclass
class Need:
    """A source the recipe needs and why (config keys that ask for it)."""

    source: Source
    reasons: list[str] = field(default_factory=list)


@dataclass
class LocalModel:
    """A model key that points at a local path: nothing to fetch, checked by the layout table."""

    key: str
    path: Path


@dataclass
class Catalog:
    """All sources by name, plus hub-id lookup for model keys."""

    sources: dict[str, Source]
    model_ignore: tuple[str, ...] = ()
    demo: bool = False

    def by_repo(self, repo_id: str) -> Source | None:
        """The model / model_file source whose hub repository is ``repo_id``."""
        for s in self.sources.values():
            if s.kind in ("model", "model_file") and s.hf_repo == repo_id:
                return s
        return None


# --------------------------------------------------------------------------- loading
def _source(name: str, raw: dict[str, Any], where: str) -> Source:
    raw = dict(raw)
    hf = raw.pop("hf", None) or {}
    expect = tuple(Expect(**e) for e in raw.pop("expect", []) or [])
    known = {f.name for f in dataclasses.fields(Source)}
    bad = set(raw) - known
    if bad:
        raise ValueError(f"{where}: source {name!r} has unknown fields {sorted(bad)}")
    src = Source(
        name=name,
        title=raw.pop("title", name),
        kind=raw.pop("kind", "file"),
        hf_repo=hf.get("repo"),
        hf_type=hf.get("type"),
        hf_file=hf.get("file"),
        revision=hf.get("revision"),
        alt_repos=tuple(hf.get("alt_repos", ())),
        allow=tuple(hf.get("allow", ())),
        expect=expect,
        requires=tuple(raw.pop("requires", ())),
        **raw,
    )
    if src.kind not in KINDS:
        raise ValueError(f"{where}: source {name!r}: kind {src.kind!r} not in {KINDS}")
    if src.kind == "archive" and src.archive not in ("zip", "tar"):
        raise ValueError(f"{where}: source {name!r}: archive must be zip or tar")
    return src


def load_catalog(demo: bool = False, path: Path | None = None) -> Catalog:
    """Load the packaged catalog (or ``path``).

    Args:
        demo: apply the ``demo:`` section: the data sources come from the demo's local mirror
            (``artifact``), real expected counts are dropped (the archive's own counts are used),
            and the tiny checkpoints are added.
        path: another catalog file (tests).

    Returns:
        The :class:`Catalog`.

    Raises:
        ValueError: malformed entries (naming the source and field).
    """
    if path is None:
        text = resources.files("icmlab.download").joinpath("catalog.yaml").read_text(encoding="utf-8")
        where = "icmlab/download/catalog.yaml"
    else:
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    raw = yaml.safe_load(text)
    sources = {name: _source(name, entry, where) for name, entry in raw["sources"].items()}
    if demo:
        section = raw.get("demo", {})
        for name, over in (section.get("sources") or {}).items():
            if name not in sources:
                raise ValueError(f"{where}: demo source {name!r} has no real entry")
            base = dataclasses.asdict(sources[name])
            base["expect"] = [dataclasses.asdict(e) | {"files": None, "approx": False} for e in sources[name].expect]
            merged = {
                k: v
                for k, v in base.items()
                if k in ("title", "kind", "archive", "strip", "convert", "target", "expect")
            }
            merged.update(over)
            sources[name] = _source(name, merged, where)
        for name, entry in (section.get("models") or {}).items():
            sources[name] = _source(name, entry, where)
    return Catalog(sources, tuple(raw.get("model_ignore", ())), demo)


# --------------------------------------------------------------------------- what a recipe needs
def split_location(value: str) -> tuple[str, str | None]:
    """``"path#sha256=<hex>"`` → (location, sha256)."""
    if "#sha256=" in value:
        loc, digest = value.rsplit("#sha256=", 1)
        return loc, digest.strip().lower()
    return value, None


def is_local(value: str) -> bool:
    """A model key naming a local path rather than a hub id (``org/name``); the config made local paths absolute."""
    if "://" in value:
        return value.startswith("file://")
    return value.startswith(("/", ".", "~")) or value.count("/") != 1 or Path(value).exists()


def needed_sources(cfg: RunConfig, catalog: Catalog) -> tuple[list[Need], list[LocalModel]]:
    """The sources the recipe in ``cfg`` needs, in a stable order, with the config keys asking for each.

    Args:
        cfg: the run config.
        catalog: from :func:`load_catalog` (``demo=cfg.demo.enabled``).

    Returns:
        (needs, local models): sources to fetch or check, and model keys that are local paths
        outside the catalog (checked only).

    Raises:
        ValueError: ``data.sources`` names an unknown source or a model source, or the demo lacks
            a data source the recipe asks for.
    """
    needs: dict[str, Need] = {}
    locals_: list[LocalModel] = []

    def add(name: str, reason: str, source: Source | None = None) -> None:
        src = source or catalog.sources[name]
        if name not in needs:
            needs[name] = Need(src, [])
        if reason not in needs[name].reasons:
            needs[name].reasons.append(reason)
        for dep in src.requires:
            add(dep, f"needed by {name}")

    for ds in cfg.data.datasets:
        for name in DATASET_SOURCES.get(ds, ()):
            add(name, f"data.datasets: {ds}")
    if cfg.train.strategy == "mix" and cfg.data.high_level == "llava_v1_5_mix665k":
        for name in ("llava_mix665k", *HIGH_LEVEL_IMAGES):
            add(name, "train.strategy: mix (+ llava_v1_5_mix665k)")
    for bench in cfg.eval.benchmarks:
        if bench == "qbench_a1":
            add(f"qbench_{cfg.eval.split}_json", f"eval.benchmarks: qbench_a1 (split {cfg.eval.split})")
            add("qbench_images", "eval.benchmarks: qbench_a1")
        elif bench == "moderation":
            add("icm_val", "eval.benchmarks: moderation")
    _model_needs(cfg, catalog, add, locals_)

    for name, value in cfg.data.sources.items():
        if name not in catalog.sources:
            raise ValueError(f"data.sources.{name}: unknown source; known: {', '.join(sorted(catalog.sources))}")
        src = catalog.sources[name]
        if src.kind not in DATA_KINDS:
            raise ValueError(
                f"data.sources.{name}: {name} is a model checkpoint; point model.base / model.llm / "
                "model.vision_tower / model.mm_projector at a local folder or file instead"
            )
        if name in needs:
            loc, digest = split_location(str(value))
            needs[name].source = dataclasses.replace(
                src, location=loc, sha256=digest or src.sha256, size=src.size if not digest else None
            )
    if catalog.demo:
        missing = [
            n
            for n, nd in needs.items()
            if nd.source.kind in DATA_KINDS and not nd.source.artifact and not nd.source.location
        ]
        if missing:
            raise ValueError(
                f"the demo has no synthetic stand-in for {', '.join(missing)} "
                f"(asked for by {'; '.join(needs[m].reasons[0] for m in missing)}); "
                "use eval.split: dev, or point data.sources at real files"
            )
    return list(needs.values()), locals_


# What each assembled part is, for the dry run's "why" column.
_PART_ROLES = {"llm": "LLM of the mix run", "vision_tower": "vision tower", "mm_projector": "stage-1 projector"}


def _model_needs(cfg: RunConfig, catalog: Catalog, add, locals_: list[LocalModel]) -> None:
    m, t = cfg.model, cfg.train
    spec = family_spec(m.family)
    keys: list[tuple[str, str | None, str]] = []
    assembled = spec.assembles(t.strategy)
    if not assembled or spec.always_needs_base:
        keys.append(("model.base", m.base, "starting checkpoint"))
    elif cfg.eval.baseline:
        keys.append(("model.base", m.base, "eval.baseline (the instruction-tuned reference)"))
    if assembled:
        keys += [
            (f"model.{p}", getattr(m, p), _PART_ROLES.get(p, f"part of the {t.strategy} run"))
            for p in spec.required_parts(t.strategy)
        ]
    elif m.base_format == "original" and m.vision_tower:  # an original LLaVA checkpoint names its CLIP apart
        keys.append(("model.vision_tower", m.vision_tower, "CLIP tower of the original-layout checkpoint"))
    for key, value, why in keys:
        if not value:
            continue
        reason = f"{key}: {why}"
        if is_local(value):
            path = Path(value).expanduser()
            demo_src = _demo_model_at(catalog, cfg.data.root, path)
            if demo_src is not None:
                add(demo_src.name, reason, demo_src)
            else:
                locals_.append(LocalModel(key, path))
            continue
        src = catalog.by_repo(value)
        if src is None:  # a hub id the catalog does not list: fetch it all the same
            kind, file = ("model_file", "mm_projector.bin") if key == "model.mm_projector" else ("model", None)
            src = Source(
                name=f"hub:{value}",
                title=f"{value} (not in the catalog)",
                kind=kind,
                hf_repo=value,
                hf_type="model",
                hf_file=file,
            )
        if m.revision:
            src = dataclasses.replace(src, revision=m.revision)
        add(src.name, reason, src)


def _demo_model_at(catalog: Catalog, root: Path, path: Path) -> Source | None:
    """The demo checkpoint a local model path asks for: its catalog target under the data root, or a
    path ending like it (``data.root`` overridden alone): then it is placed where the config reads it."""
    for s in catalog.sources.values():
        if not (s.checkpoint and s.target):
            continue
        if (root / s.target).resolve() == path.resolve():
            return s
        tail = Path(s.target).parts[1:] if Path(s.target).parts[0] == "models" else Path(s.target).parts
        if path.parts[-len(tail) :] == tail:
            return dataclasses.replace(s, target=str(path.resolve()))
    return None


# --------------------------------------------------------------------------- layout check
@dataclass
class LayoutRow:
    """One expected folder/file/checkpoint of the recipe and what is on disk.

    Attributes:
        source: catalog source (or config key) it belongs to.
        path: relative to the data root, ``HF cache: <repo>``, or an absolute local path.
        status: ``ok``, ``missing``, ``empty``, ``fewer files``, ``HTML page``, ``not downloaded``.
        found / expected: file counts for folders (expected from the catalog, else from the archive).
        approx: the expected count is indicative (fewer files is not flagged).
        note: explanation shown in the table.
    """

    source: str
    path: str
    status: str
    found: int | None = None
    expected: int | None = None
    approx: bool = False
    note: str = ""

    @property
    def ok(self) -> bool:
        """Present, and not short of files when the expected count is exact."""
        return self.status == "ok"


def count_files(folder: Path) -> int:
    """Non-hidden files under ``folder``, recursively (a scandir walk: ~0.1 s per 100k files)."""
    n, stack = 0, [str(folder)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                stack.append(e.path)
            else:
                n += 1
    return n


def check_layout(
    root: Path,
    needs: list[Need],
    locals_: list[LocalModel],
    records: dict[str, dict],
    notes: dict[str, str] | None = None,
    extra_files: list[Path] | None = None,
) -> list[LayoutRow]:
    """Compare every expected path of the needed sources with the disk.

    Args:
        root: the data root.
        needs, locals_: from :func:`needed_sources`.
        records: source name → its completion record (``counts`` per expected path, ``path`` for
            checkpoints); sources without one are reported from the disk alone.
        notes: extra note per source (e.g. the OCR-VQA report).
        extra_files: other files the recipe reads (``data.custom_json``), checked for presence.

    Returns:
        One :class:`LayoutRow` per expected path, then local checkpoints and extra files.
    """
    rows: list[LayoutRow] = []
    notes = notes or {}
    for need in needs:
        src, rec = need.source, records.get(need.source.name) or {}
        if src.kind in ("model", "model_file") and not src.target:
            rows.append(_hub_row(src, rec))
            continue
        expects = src.expect or (Expect(src.target),) if src.target else src.expect
        for e in expects:
            rows.append(_path_row(root, src.name, e, (rec.get("counts") or {}).get(e.path), notes.get(src.name, "")))
    for lm in locals_:
        rows.append(LayoutRow(lm.key, str(lm.path), "ok" if lm.path.exists() else "missing", note="local checkpoint"))
    for f in extra_files or []:
        rows.append(LayoutRow("data.custom_json", str(f), "ok" if f.is_file() else "missing"))
    return rows


def _path_row(root: Path, name: str, e: Expect, archive_count: int | None, extra: str) -> LayoutRow:
    p = root / e.path
    expected = e.files if e.files is not None else archive_count
    note = "; ".join(x for x in (e.note, extra) if x)
    if not p.exists():
        return LayoutRow(name, e.path, "missing", None, expected, e.approx, note)
    if p.is_file():
        with open(p, "rb") as f:
            head = f.read(2048)
        if head.lstrip()[:1] == b"<" and b"html" in head.lower():
            return LayoutRow(
                name,
                e.path,
                "HTML page",
                None,
                None,
                False,
                "an HTML page saved instead of the data (a '/blob/' link?); delete it and run again",
            )
        return LayoutRow(name, e.path, "ok", None, None, False, note)
    found = count_files(p)
    status = "ok"
    if found == 0:
        status = "empty"
    elif expected is not None and not e.approx and found < expected:
        status = "fewer files"
    return LayoutRow(name, e.path, status, found, expected, e.approx, note)


def _hub_row(src: Source, rec: dict) -> LayoutRow:
    from huggingface_hub import try_to_load_from_cache

    label = f"HF cache: {src.hf_repo}" + (f"/{src.hf_file}" if src.hf_file else "")
    got = try_to_load_from_cache(
        src.hf_repo, src.hf_file or "config.json", revision=src.revision, repo_type=src.hf_type
    )
    present = isinstance(got, str) or bool(rec.get("path") and Path(rec["path"]).exists())
    note = "complete" if rec else ("partly cached: run the download step" if present else "")
    return LayoutRow(
        src.name, label, "ok" if present and rec else ("not downloaded" if not present else "partial"), note=note
    )
