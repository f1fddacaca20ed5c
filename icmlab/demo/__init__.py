"""The embedded demo: synthetic datasets, a tiny tokenizer and tiny checkpoints, made in seconds.

Nothing here is committed as data; everything is generated deterministically from a seed:

- :func:`build_demo_sources` packs every dataset as its real source ships it (zips, tars, bare
  JSONs) with a sha256 manifest, so the download stage can run its real code path on a local
  folder (see :mod:`icmlab.demo.pack` for the artifact table);
- :func:`build_demo_tree` writes the same datasets already unpacked (LLaVA ``playground/data``
  layout, see :mod:`icmlab.demo.tree`);
- :func:`build_tiny_checkpoints` writes a llava-hf checkpoint and the MSFT parts (vicuna, CLIP,
  stage-1 projector) in their real on-disk layouts (see :mod:`icmlab.demo.checkpoints`);
- :func:`demo_tokenizer` is the byte-level BPE tokenizer those checkpoints carry.

The data are learnable from pixels: low-level distortions (blur, noise, over/underexposure) with
strengths from ``docs``' learnability study, and a moderation rule whose "forbidden symbol" is a
small red X; the decisive questions have one text for every class.

Usage::

    from icmlab.demo import build_demo_sources, build_tiny_checkpoints
    sources = build_demo_sources("runs/demo/sources", seed=0)          # ~6 s, ~29 MB
    ckpts = build_tiny_checkpoints("runs/demo/checkpoints", seed=0)    # a few s
"""

from __future__ import annotations

import importlib
from typing import Any

from .bundle import DEFAULT_COUNTS, DEMO_VERSION, DemoBundle, generate_bundle
from .pack import ARTIFACTS, build_demo_sources
from .tree import build_demo_tree

# The tokenizer and checkpoint builders import transformers/torch (~5 s); data building does not
# need them, so they load on first use.
_LAZY = {
    "build_tiny_checkpoints": "checkpoints",
    "demo_tokenizer": "tokenizer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ARTIFACTS",
    "DEFAULT_COUNTS",
    "DEMO_VERSION",
    "DemoBundle",
    "build_demo_sources",
    "build_demo_tree",
    "build_tiny_checkpoints",
    "demo_tokenizer",
    "generate_bundle",
]
