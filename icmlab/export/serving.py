"""Serving handoff: the ``vllm serve`` and SGLang commands for an exported llava-hf folder, and the
checks that the folder holds what those engines read.

vLLM and SGLang load a llava-hf folder as ``LlavaForConditionalGeneration``: ``config.json``
(``architectures``, ``model_type: llava``, ``image_token_index``, ``vision_feature_layer``,
``vision_feature_select_strategy``, the ``text_config``/``vision_config`` blocks), the weights under
the hub key names (``language_model.model.*``, ``vision_tower.vision_model.*``,
``multi_modal_projector.*``), the processor (``AutoProcessor`` -> ``LlavaProcessor`` with
``patch_size`` and the CLIP image processor), the chat template the OpenAI-compatible chat endpoint
renders, and ``generation_config.json`` (vLLM applies its defaults to every request).
:func:`serving_problems` checks each of these without a GPU; a live serve needs one.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from icmlab.io import read_json
from icmlab.models.spec import family_spec

#: Files the engines read from a llava-hf folder (weights aside).
SERVED_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer_config.json")
#: Where the processor keeps its chat template (transformers 5 writes the ``.jinja`` file).
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def serve_commands(folder: str | Path, *, family: str, name: str, max_model_len: int) -> str | None:
    """The shell commands that serve ``folder`` with vLLM and with SGLang (None: no engine serves the family).

    Args:
        folder: the exported ``hf`` folder (or a hub repo id it was pushed to).
        family: ``model.family``.
        name: the model name clients send (``--served-model-name``).
        max_model_len: context length to serve (the run's ``data.model_max_length``).
    """
    if family_spec(family).serving_architecture is None:
        return None
    path = shlex.quote(str(folder))
    template = shlex.quote(str(Path(folder) / CHAT_TEMPLATE_FILE))
    return "\n".join(
        [
            "# vLLM (OpenAI-compatible server on :8000)",
            f"vllm serve {path} --served-model-name {shlex.quote(name)} --dtype auto "
            f"--max-model-len {max_model_len} --limit-mm-per-prompt '{{\"image\": 1}}' --chat-template {template}",
            "# SGLang (OpenAI-compatible server on :30000)",
            f"python -m sglang.launch_server --model-path {path} --served-model-name {shlex.quote(name)} "
            f"--context-length {max_model_len} --chat-template {template} --port 30000",
        ]
    )


def serving_problems(folder: str | Path, family: str) -> list[str]:
    """What in ``folder`` a serving engine would not read as the family's served architecture.

    Returns:
        One message per problem (empty: the folder is servable as far as it can be checked on a CPU).
    """
    spec = family_spec(family)
    folder = Path(folder)
    if spec.serving_architecture is None:
        return [f"{spec.title}: no serving engine reads this family"]
    problems = [f"{folder / f}: missing" for f in (*SERVED_FILES, CHAT_TEMPLATE_FILE) if not (folder / f).is_file()]
    if problems:
        return problems
    config = read_json(folder / "config.json")
    if config.get("architectures") != [spec.serving_architecture]:
        problems.append(
            f"config.json: architectures={config.get('architectures')}, expected [{spec.serving_architecture}]"
        )
    if config.get("model_type") != "llava":
        problems.append(f"config.json: model_type={config.get('model_type')!r}, expected 'llava'")
    for block, model_type in (("text_config", "llama"), ("vision_config", "clip_vision_model")):
        if (config.get(block) or {}).get("model_type") != model_type:
            problems.append(f"config.json: {block}.model_type is not {model_type!r}")
    from transformers import AutoTokenizer

    image_id = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(spec.image_token)
    if image_id != config.get("image_token_index"):
        problems.append(
            f"config.json: image_token_index={config.get('image_token_index')} is not the tokenizer's "
            f"{spec.image_token!r} ({image_id})"
        )
    generation = read_json(folder / "generation_config.json")
    if generation.get("eos_token_id") is None:
        problems.append("generation_config.json: no eos_token_id (answers would not stop)")
    return problems
