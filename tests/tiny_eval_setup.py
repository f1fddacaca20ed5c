"""A tiny evaluation run on disk for the evaluate-stage tests: an untrained tiny LLaVA as baseline and
"fine-tuned" model, 7 Q-Bench items (dev, and a test split without answers), 5 ICM-Val questions, an
ICM-Test folder tree, an MQA list and 3 MEQ explanation items. The model's greedy answers are arbitrary
but deterministic, which is what equality and plumbing tests need."""

from __future__ import annotations

import shutil
from pathlib import Path

import tiny_train_setup as T
from PIL import Image

from icmlab import paths
from icmlab.config import RunConfig, config_from_dict
from icmlab.io import atomic_write_json


def eval_run(tmp: Path, benchmarks=("qbench_a1", "moderation"), controls=(), **eval_keys) -> RunConfig:
    """Write the data and models under ``tmp`` and return the run's config (CPU, upstream protocol)."""
    model = T.build_llava_hf(tmp / "base")
    raw = T.make_config(tmp, model, run_name="ev").to_dict()
    raw["eval"] = {
        "benchmarks": list(benchmarks),
        "batch_size": 2,
        "max_new_tokens": 3,
        "controls": list(controls),
        "protocol": "upstream",
        "explanation_max_new_tokens": 6,
        **eval_keys,
    }
    cfg = config_from_dict(raw, base_dir=tmp)
    shutil.copytree(model, paths.final_model_dir(cfg))
    qdir = paths.qbench_images(cfg)
    qdir.mkdir(parents=True)
    items = []
    for i in range(7):
        Image.new("RGB", (40 + 3 * i, 32), (30 * i, 200 - 20 * i, 90)).save(qdir / f"{i}.png")
        items.append(
            {
                "img_path": f"{i}.png",
                "question": "Is this image bright?",
                "candidates": ["Yes", "No"],
                "correct_ans": "Yes" if i % 2 else "No",
                "type": 0,
                "concern": i % 4,
            }
        )
    atomic_write_json(paths.qbench_json(cfg, "dev"), items)
    atomic_write_json(
        paths.qbench_json(cfg, "test"), [{k: v for k, v in it.items() if k != "correct_ans"} for it in items]
    )
    icm = paths.icm_eval_dir(cfg)
    questions = []
    for i in range(5):
        (icm / "val" / "c").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 36), (200, 30 * i, 30)).save(icm / "val" / "c" / f"{i}.png")
        questions.append(
            {
                "id": str(i),
                "kind": "yes_no",
                "image": f"val/c/{i}.png",
                "category": "c",
                "question": "Is the picture dark?",
                "answer": "Yes" if i % 2 else "No",
            }
        )
    for i in range(3):
        questions.append(
            {
                "id": f"meq{i}",
                "kind": "explanation",
                "image": f"val/c/{i}.png",
                "category": "c",
                "question": "Is the picture dark? Explain why.",
                "reference": "The picture is bright, so it is not dark.",
            }
        )
    atomic_write_json(icm / "icm_val_questions.json", questions)
    for subset, label, n in (("UGC", "sexy", 2), ("UGC", "not-sexy", 1), ("AIGC", "not-sexy", 2)):
        folder = icm / "test" / subset / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (30, 30), (10 * i, 80, 160)).save(folder / f"{i}.png")
    atomic_write_json(
        icm / "mqa.json",
        [
            {"image": "val/c/0.png", "question": "Is it dark?", "answer": "No.", "kind": "open"},
            {"image": "val/c/1.png", "question": "Which?\nA. dark\nB. bright", "answer": "B.", "kind": "mc"},
        ],
    )
    return cfg
