"""I/O edges of the LLaVA-v1.5 loaders: checkpoint locations, ``config.json`` and state dicts.

- :func:`resolve_source`: a local path wins; an ``owner/name`` hub id is fetched with
  ``huggingface_hub.snapshot_download`` (the local cache when offline);
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

from pathlib import Path

import torch

from icmlab.io import read_json


def resolve_source(name_or_path: str | Path, *, revision: str | None = None) -> Path:
    """Return a local directory (or file) for a local path or a Hugging Face Hub id.

    Local paths win. A string that is not an existing path and looks like ``owner/name`` is fetched
    with ``huggingface_hub.snapshot_download`` (which serves the local cache when offline).

    Raises:
        FileNotFoundError: for a missing local path, or a hub id that cannot be fetched.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"{text}: no such file or directory (and not a hub id of the form owner/name)")
    from huggingface_hub import snapshot_download  # imported lazily: reads HF_* env at import time

    try:
        return Path(snapshot_download(text, revision=revision))
    except Exception as exc:  # network, auth, missing repo: all mean "not available here"
        raise FileNotFoundError(
            f"{text}: not a local path and the hub snapshot could not be fetched ({type(exc).__name__}: {exc}); "
            "download it first or point the config at a local directory"
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
