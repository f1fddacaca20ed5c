"""The demo's tiny mPLUG-Owl2 checkpoint (``FOLDER_BUILDERS["mplug_owl2"]`` of :mod:`icmlab.demo.checkpoints`).

:func:`build_tiny_checkpoints` also writes ``<out_dir>/mplug_owl2/``: a random :class:`MPLUGOwl2ForCausalLM` in icmlab's native layout
(``vision_config``/``abstractor_config`` config, safetensors), written by the family adapter's
``save_bundle`` exactly as a fine-tuned model is. ``load_for_training`` with
``model.base_format: hf`` and ``load_for_inference`` read it; the download stage places it at
``models/mplug-owl2-tiny`` (``catalog.yaml``, ``demo.models.mplug_owl2_tiny``).

Sizes are the LLaVA demo's (``demo-learnability.md``): 64 px images, patch 8, ViT/abstractor
width 32, 2-layer LLM of width 64, ``initializer_range=0.1`` everywhere; the abstractor's 16
learnable queries plus the end token give 17 image tokens per image (65 at full size).

The tokenizer is the demo BPE with mPLUG-Owl2's ``<|image|>`` appended and NO pad token: upstream
``train.py`` pads with ``<unk>`` (id 0), which the adapter reproduces on load. The text's
``<|image|>`` expands into ``image_token_index`` placeholders, here the id of that token.

Usage::

    from icmlab.demo import build_tiny_checkpoints
    path = build_tiny_checkpoints("/tmp/ckpts", seed=0)["mplug_owl2"]
    bundle = icmlab.models.mplug_owl2.load_for_inference(path)
"""

from __future__ import annotations

from pathlib import Path

import torch

from .bundle import IMAGE_SIZE
from .tokenizer import demo_tokenizer

BUILDER_NAME = "mplug_owl2"
IMAGE_TOKEN = "<|image|>"
#: Offset added to the demo seed so this model's weights do not repeat the LLaVA parts' streams.
SEED_OFFSET = 4


def build_tiny_owl2(dest: Path, seed: int) -> Path:
    """Write the tiny mPLUG-Owl2 checkpoint (module docstring) into the new folder ``dest``.

    Args:
        dest: folder to create (a staging path of :func:`build_tiny_checkpoints`).
        seed: weight seed; the same seed gives byte-identical weights.

    Returns:
        ``dest``.

    Raises:
        FileExistsError: ``dest`` already exists (the builder never writes over anything).
    """
    # The model package imports transformers: only when a checkpoint is built.
    from icmlab.inputs.images import build_image_processor
    from icmlab.models import ModelBundle
    from icmlab.models import mplug_owl2 as owl

    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"build_tiny_owl2: {dest} already exists; pass a new folder")
    tok = demo_tokenizer(image_token=IMAGE_TOKEN, pad_token=None)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    config = owl.build_tiny_config(
        vocab_size=len(tok),
        image_token_index=image_token_id,
        image_size=IMAGE_SIZE,
        patch_size=8,
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.unk_token_id,
    )
    torch.manual_seed(seed + SEED_OFFSET)
    model = owl.MPLUGOwl2ForCausalLM(config).eval()
    bundle = ModelBundle(
        model=model,
        tokenizer=tok,
        image_processor=build_image_processor(IMAGE_SIZE),
        image_token_id=image_token_id,
        num_image_tokens=config.num_image_tokens,
        family=owl.FAMILY,
        extra={"source": "icmlab.demo.owl2", "format": "hf"},
    )
    return owl.save_bundle(bundle, dest)
