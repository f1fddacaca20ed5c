"""The playground: model choices, templates, streamed answers equal to evaluation's, the headless table
and the widgets (driven the way the inspect browser's test drives them).

The models are the tiny LLaVA of ``tiny_train_setup`` (baseline) and a shifted copy (fine-tuned),
the data the tiny training records with their PNG images.
"""

from __future__ import annotations

import datetime
import html
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_export import run_config, trained_run
from tiny_train_setup import build_llava_hf, build_records

from icmlab import paths, playground
from icmlab.evaluate.generation import generate_answers
from icmlab.evaluate.protocol import prepare_image, resolve_protocol
from icmlab.evaluate.stage import prompt_format
from icmlab.inputs.images import load_rgb
from icmlab.io import atomic_write_json
from icmlab.playground.stage import QBENCH_TEMPLATES, dataset_samples, template_question

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with a baseline, a fine-tuned model and its validated records (with images)."""
    tmp = tmp_path_factory.mktemp("playground")
    base = build_llava_hf(tmp / "base", seed=5)
    cfg = trained_run(tmp, base, **{"playground.max_new_tokens": "6"})
    records = build_records(cfg.data.root, n_image=4, n_text=2)
    atomic_write_json(paths.merged_json(cfg), records)
    return cfg


def test_model_choices_list_the_run_its_checkpoints_and_other_runs(tmp_path):
    cfg = run_config(tmp_path, tmp_path / "base")
    for d in (
        paths.final_model_dir(cfg),
        paths.checkpoints_dir(cfg) / "checkpoint-10",
        paths.checkpoints_dir(cfg) / "checkpoint-2",
        cfg.runs_root / "other-run" / "model",
    ):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    lora = paths.checkpoints_dir(cfg) / "checkpoint-30"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    (paths.checkpoints_dir(cfg) / "checkpoint-40").mkdir()  # killed mid-save: nothing loadable
    choices = playground.model_choices(cfg)
    assert list(choices) == [
        "baseline",
        "fine-tuned",
        "checkpoint-2",
        "checkpoint-10",
        "checkpoint-30",
        "run:other-run",
    ]
    assert choices["baseline"] == cfg.model.base
    with pytest.raises(FileNotFoundError, match="checkpoint-40"):
        playground.load_model(cfg, "checkpoint-40")


def test_templates_are_evaluation_questions(tmp_path):
    cfg = run_config(tmp_path, tmp_path / "base")
    from icmlab.evaluate.scoring import qbench_prompt

    for name, item in QBENCH_TEMPLATES.items():
        assert template_question(cfg, name) == qbench_prompt(item, cfg.eval.qbench_style)
        for c in item["candidates"]:
            assert c in template_question(cfg, name)
    cfg.eval.moderation_question = "Does this image break the rules?"
    assert template_question(cfg, "moderation") == "Does this image break the rules?"
    assert template_question(cfg, "Is it sharp?") == "Is it sharp?"


@pytest.mark.slow
def test_streamed_answer_is_the_evaluation_answer(run):
    cfg = run
    bundle = playground.load_model(cfg, "fine-tuned")
    sample = dataset_samples(cfg, 1)[0]
    pieces: list[str] = []
    streamed = playground.ask(cfg, bundle, sample.image, sample.question, on_token=pieces.append)
    protocol = resolve_protocol(cfg)
    images = [prepare_image(protocol, load_rgb(sample.image), bundle.image_processor)]
    (expected,) = generate_answers(
        bundle.model, bundle.tokenizer, bundle.image_processor, [sample.question], images,
        max_new_tokens=cfg.playground.max_new_tokens, prompt_format=prompt_format(protocol, bundle),
        image_token_id=bundle.image_token_id, num_image_tokens=bundle.num_image_tokens,
    )  # fmt: skip
    assert streamed == expected and pieces and pieces[-1] == expected
    assert playground.ask(cfg, bundle, sample.image, sample.question) == expected
    assert playground.ask(cfg, bundle, sample.image.read_bytes(), sample.question) == expected  # an upload


@pytest.mark.slow
def test_headless_run_writes_the_table(run, tmp_path):
    cfg = run
    res = playground.run(cfg)
    samples = dataset_samples(cfg, cfg.playground.samples)
    assert [r["truth"] for r in res.rows] == [s.truth for s in samples] and res.models == ["baseline", "fine-tuned"]
    saved = json.loads(res.json_path.read_text())
    assert saved["rows"] == res.rows
    page = res.html_path.read_text()
    assert page.count("<img") == len(samples) and "fine-tuned" in page and "ground truth" in page
    assert samples[0].truth in res.table()
    # fixed pairs from the parameters: a path under data.root and a template name
    img = Path(samples[0].image).relative_to(cfg.data.root)
    pairs = {"playground.pairs": [{"image": str(img), "question": "moderation"}], "playground.models": ["fine-tuned"]}
    fixed = playground.run(run_config_like(cfg, pairs))
    assert [r["question"] for r in fixed.rows] == [template_question(cfg, "moderation")]
    bundle = playground.load_model(cfg, "fine-tuned")
    assert fixed.rows[0]["answers"]["fine-tuned"] == playground.ask(
        cfg, bundle, samples[0].image, fixed.rows[0]["question"]
    )


def run_config_like(cfg, overrides: dict):
    """``cfg`` with ``overrides`` applied through the one loader (as ``--set`` / papermill would)."""
    from icmlab.config import config_from_dict

    return config_from_dict(cfg.to_dict(), overrides)


@pytest.mark.slow
def test_widgets_pick_image_template_models_and_stream_answers(run, tmp_path):
    cfg = run
    w = playground.playground(cfg)
    pickers, middle, answers, prompt_view = w.children
    models, (record, path, upload) = pickers.children[0], pickers.children[1].children
    image_view, (truth, template, question, ask, status) = middle.children[0], middle.children[1].children
    assert models.value == ("baseline", "fine-tuned") and "fine-tuned" in models.options
    ask.click()
    assert "pick an image" in status.value and answers.children == ()
    samples = dataset_samples(cfg)
    record.value = 1  # the second record: its image, its question, its ground truth
    assert bytes(image_view.value).startswith(b"\x89PNG") and samples[1].truth in truth.value
    assert question.value == samples[1].question
    ask.click()
    assert status.value == "done" and len(answers.children) == 2
    for label, box in zip(models.value, answers.children):
        bundle = playground.load_model(cfg, label)
        expected = playground.ask(cfg, bundle, samples[1].image, samples[1].question)
        assert box.value == f"<b>{label}</b><br>{html.escape(expected)}"
    assert "exact model input" in prompt_view.value and "&lt;image ×16&gt;" in prompt_view.value
    template.value = "qbench: blur"
    assert question.value == template_question(cfg, "qbench: blur")
    path.value = str(tmp_path / "missing.png")
    assert "no image at" in status.value
    buf = io.BytesIO()
    Image.new("RGB", (24, 12), (250, 10, 10)).save(buf, format="PNG")
    data = buf.getvalue()
    when = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)  # what the browser sends, deserialized
    upload.value = ({"name": "red.png", "type": "image/png", "size": len(data), "content": memoryview(data), "last_modified": when},)  # fmt: skip
    assert bytes(image_view.value).startswith(b"\x89PNG") and truth.value == ""
    models.value = ("fine-tuned",)
    ask.click()  # asks about the upload, the image chosen last
    bundle = playground.load_model(cfg, "fine-tuned")
    expected = playground.ask(cfg, bundle, data, question.value)
    assert [b.value for b in answers.children] == [f"<b>fine-tuned</b><br>{html.escape(expected)}"]
