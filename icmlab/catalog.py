"""The source catalog (``catalog.yaml``) and which of its sources a recipe needs.

Pure functions, no I/O beyond reading the packaged YAML and checking local paths::

    from icmlab.catalog import load_catalog, needed_sources
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
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from icmlab.config import RunConfig

KINDS = ("file", "archive", "tree", "model", "model_file")
DATA_KINDS = ("file", "archive", "tree")
HIGH_LEVEL_IMAGES = ("coco_train2017", "gqa_images", "ocr_vqa_images", "textvqa_train_val_images",
                     "vg_images", "vg_images2")
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
        name=name, title=raw.pop("title", name), kind=raw.pop("kind", "file"),
        hf_repo=hf.get("repo"), hf_type=hf.get("type"), hf_file=hf.get("file"), revision=hf.get("revision"),
        alt_repos=tuple(hf.get("alt_repos", ())), allow=tuple(hf.get("allow", ())), expect=expect,
        requires=tuple(raw.pop("requires", ())), **raw)
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
        text = resources.files("icmlab").joinpath("catalog.yaml").read_text(encoding="utf-8")
        where = "icmlab/catalog.yaml"
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
            merged = {k: v for k, v in base.items() if k in ("title", "kind", "archive", "strip", "convert",
                                                              "target", "expect")}
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


def is_local(value: str, base: Path | None = None) -> bool:
    """A model key / location that names a local path rather than a hub id or URL."""
    if "://" in value:
        return value.startswith("file://")
    return value.startswith(("/", ".", "~")) or value.count("/") != 1 or (base is not None and (base / value).exists())


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
            raise ValueError(f"data.sources.{name}: {name} is a model checkpoint; point model.base / model.llm / "
                             "model.vision_tower / model.mm_projector at a local folder or file instead")
        if name in needs:
            loc, digest = split_location(str(value))
            needs[name].source = dataclasses.replace(src, location=loc, sha256=digest or src.sha256,
                                                     size=src.size if not digest else None)
    if catalog.demo:
        missing = [n for n, nd in needs.items() if nd.source.kind in DATA_KINDS and not nd.source.artifact
                   and not nd.source.location]
        if missing:
            raise ValueError(f"the demo has no synthetic stand-in for {', '.join(missing)} "
                             f"(asked for by {'; '.join(needs[m].reasons[0] for m in missing)}); "
                             "use eval.split: dev, or point data.sources at real files")
    return list(needs.values()), locals_


def _model_needs(cfg: RunConfig, catalog: Catalog, add, locals_: list[LocalModel]) -> None:
    m, t = cfg.model, cfg.train
    keys: list[tuple[str, str | None, str]] = []
    if t.strategy == "after" or m.family == "mplug_owl2":
        keys.append(("model.base", m.base, "starting checkpoint"))
    elif cfg.eval.baseline:
        keys.append(("model.base", m.base, "eval.baseline (the instruction-tuned reference)"))
    if m.family == "llava15" and t.strategy == "mix":
        keys += [("model.llm", m.llm, "LLM of the mix run"), ("model.vision_tower", m.vision_tower, "vision tower"),
                 ("model.mm_projector", m.mm_projector, "stage-1 projector")]
    elif m.family == "llava15" and m.base_format == "original" and m.vision_tower:
        keys.append(("model.vision_tower", m.vision_tower, "CLIP tower of the original-layout checkpoint"))
    for key, value, why in keys:
        if not value:
            continue
        reason = f"{key} ({why})"
        if is_local(value):
            path = Path(value).expanduser()
            demo_src = _demo_model_at(catalog, cfg.data.root, path)
            if demo_src is not None:
                add(demo_src.name, reason)
            else:
                locals_.append(LocalModel(key, path))
            continue
        src = catalog.by_repo(value)
        if src is None:  # a hub id the catalog does not list: fetch it all the same
            kind, file = ("model_file", "mm_projector.bin") if key == "model.mm_projector" else ("model", None)
            src = Source(name=f"hub:{value}", title=f"{value} (not in the catalog)", kind=kind, hf_repo=value,
                         hf_type="model", hf_file=file)
        if m.revision:
            src = dataclasses.replace(src, revision=m.revision)
        add(src.name, reason, src)


def _demo_model_at(catalog: Catalog, root: Path, path: Path) -> Source | None:
    for s in catalog.sources.values():
        if s.checkpoint and s.target and (root / s.target).resolve() == path.resolve():
            return s
    return None
