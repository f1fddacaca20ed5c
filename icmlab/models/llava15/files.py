"""I/O edges of the LLaVA-v1.5 loaders: checkpoint locations, ``config.json`` and state dicts.

- :func:`resolve_source`: a local path wins; an ``owner/name`` hub id is read from the Hugging Face
  cache where the download stage placed it (no network at all, ``HF_HUB_OFFLINE=1`` works); only
  when it is missing or incomplete are the files a loader needs fetched (config, tokenizer and
  processor files, safetensors weights or else ``.bin``; never other frameworks' weights), through
  the configured endpoint (:func:`hub_options`, ``download.endpoint``), by one process per node at a
  time (a file lock in the hub cache: the other ranks wait and then read the cache);
- :func:`read_config`: a checkpoint directory's ``config.json``;
- :func:`read_state_dict`: one file or a checkpoint directory (single or sharded, safetensors or
  ``.bin``, the latter read with ``weights_only=True`` and memory-mapped).

Used by :mod:`icmlab.models.llava15.convert` (which re-exports these names),
:mod:`icmlab.models.llava15.adapter` and the mPLUG-Owl2 adapter::

    from icmlab.models.llava15.files import read_config, read_state_dict, resolve_source
    ckpt = resolve_source("liuhaotian/llava-v1.5-7b")
    cfg, sd = read_config(ckpt), read_state_dict(ckpt)
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import logging
import re
from pathlib import Path
from typing import Iterator

import torch

from icmlab.io import read_json

log = logging.getLogger(__name__)

#: What the loaders read from a hub checkpoint: config/tokenizer/processor files and the weights.
LOADER_PATTERNS = ("*.json", "*.model", "*.txt", "*.jinja", "*.safetensors", "*.bin")
#: Weights dropped when the repository has safetensors (transformers loads those; .bin would double it).
BIN_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth")

_HUB: contextvars.ContextVar[dict] = contextvars.ContextVar("icmlab_hub_options", default={})


@contextlib.contextmanager
def hub_options(endpoint: str | None = None) -> Iterator[None]:
    """Hub settings for every :func:`resolve_source` call inside the block (the adapters wrap their loads).

    Args:
        endpoint: hub URL or mirror (``download.endpoint``); None = ``HF_ENDPOINT`` or huggingface.co.
    """
    token = _HUB.set({"endpoint": endpoint})
    try:
        yield
    finally:
        _HUB.reset(token)


def _weights_complete(d: Path) -> bool:
    """A snapshot holds a loadable checkpoint: every shard of an index, or a single weights file."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).is_file():
            return all((d / shard).is_file() for shard in set(read_json(d / index)["weight_map"].values()))
    return any(p.suffix in (".safetensors", ".bin") for p in d.iterdir() if p.is_file())


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot of a hub model in the Hugging Face cache when it holds loadable weights, or None.

    Read from the cache layout (``refs/<revision>`` → ``snapshots/<commit>``), no network. Not
    ``snapshot_download(local_files_only=True)``: huggingface_hub 2 refuses a snapshot that a file
    filter left partial (the download stage skips ``.bin`` duplicates and other frameworks' weights).
    """
    from huggingface_hub import constants

    repo_dir = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    rev = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", rev):
        commit = rev
    else:
        ref = repo_dir / "refs" / rev
        if not ref.is_file():
            return None
        commit = ref.read_text(encoding="utf-8").strip()
    snap = repo_dir / "snapshots" / commit
    return snap if snap.is_dir() and _weights_complete(snap) else None


def _lock_path(repo_id: str) -> Path:
    from huggingface_hub import constants

    d = Path(constants.HF_HUB_CACHE) / ".locks"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"icmlab-load--{repo_id.replace('/', '--')}.lock"


def fetch_model_files(repo_id: str, *, revision: str | None = None, endpoint: str | None = None) -> Path:
    """Download what a loader reads from a hub model (see :data:`LOADER_PATTERNS`) into the hub cache."""
    from huggingface_hub import HfApi, snapshot_download

    files = HfApi(endpoint=endpoint).list_repo_files(repo_id, revision=revision)
    ignore = list(BIN_WEIGHTS) if any(f.endswith(".safetensors") for f in files) else []
    wanted = [
        f
        for f in files
        if any(fnmatch.fnmatch(f, p) for p in LOADER_PATTERNS) and not any(fnmatch.fnmatch(f, p) for p in ignore)
    ]
    log.info("fetching %d files of %s (%s)", len(wanted), repo_id, endpoint or "default endpoint")
    return Path(snapshot_download(repo_id, revision=revision, endpoint=endpoint, allow_patterns=wanted or None))


def resolve_source(name_or_path: str | Path, *, revision: str | None = None, endpoint: str | None = None) -> Path:
    """Return a local directory (or file) for a local path or a Hugging Face Hub id.

    Local paths win. A hub id (``owner/name``) is served from the Hugging Face cache when a complete
    snapshot is there (what ``icmlab download`` placed: no network, offline mode works). Otherwise
    the loader's files are fetched through ``endpoint`` (or the :func:`hub_options` one) under a
    file lock, so the ranks of a node fetch once and share it.

    Raises:
        FileNotFoundError: for a missing local path, a hub id absent from the cache while offline,
            or one that cannot be fetched (the message says to run the download stage).
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"{text}: no such file or directory (and not a hub id of the form owner/name)")
    snap = cached_snapshot(text, revision)
    if snap is not None:
        return snap
    import huggingface_hub  # imported lazily: reads HF_* env at import time
    from filelock import FileLock
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # no network: whatever huggingface_hub itself finds in the cache, or a clear error
        try:
            return Path(huggingface_hub.snapshot_download(text, revision=revision))
        except Exception as exc:  # noqa: BLE001
            raise FileNotFoundError(
                f"{text}: not a local path and the hub snapshot could not be fetched: it is not in the Hugging Face "
                f"cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set ({type(exc).__name__}); run "
                "`icmlab download <parameters file>` first (with network), or point the config at a local "
                "directory"
            ) from exc
    endpoint = endpoint or _HUB.get().get("endpoint")
    with FileLock(str(_lock_path(text))):
        snap = cached_snapshot(text, revision)  # another rank of this node may have fetched it meanwhile
        if snap is not None:
            return snap
        try:
            return fetch_model_files(text, revision=revision, endpoint=endpoint)
        except Exception as exc:  # network, auth, missing repo: all mean "not available here"
            raise FileNotFoundError(
                f"{text}: not a local path, not in the Hugging Face cache, and the hub snapshot could not be fetched "
                f"({type(exc).__name__}: {exc}); run `icmlab download <parameters file>` (it checks access and "
                "endpoint) or point the config at a local directory"
            ) from exc


def read_config(directory: Path) -> dict:
    """Read ``directory/config.json``.

    Raises:
        FileNotFoundError: if it is missing.
    """
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a Hugging Face style checkpoint directory")
    return read_json(path)


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only: a .bin is a pickle; never execute code from a downloaded checkpoint.
    try:  # mmap keeps 7B/13B shards out of RAM until used
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # pre-zipfile (legacy) serialization cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a file or a checkpoint directory (single file or sharded, safetensors or .bin).

    Raises:
        FileNotFoundError: if the directory holds no weights.
    """
    path = Path(path)
    if path.is_file():
        return _load_file(path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(read_json(index)["weight_map"].values())):
                out.update(_load_file(path / shard))
            return out
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return _load_file(path / name)
    raise FileNotFoundError(f"{path}: no model.safetensors, pytorch_model.bin or shard index found")
