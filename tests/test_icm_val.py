"""Moderation questions built from an ICM-Val-style imagefolder (the real set ships no JSON)."""

import json

import pytest
from PIL import Image

from icmlab.config import load_run_config
from icmlab.evaluate.icm_val import UPSTREAM_QUESTION, is_violating, questions_from_folders
from icmlab.evaluate.stage import moderation_items

# A few of the 35 real category names, harmless ones included.
TREE = {"lower_hips": 2, "lower_normal": 1, "upper_bust": 1, "whole_normal": 2, "sexy_kiss": 1}


def _make_tree(root, tree=TREE, split="val"):
    for cat, n in tree.items():
        d = root / split / cat
        d.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / f"{i:03d}{'.JPG' if i % 2 else '.png'}")
    (root / split / "lower_hips" / "notes.txt").write_text("not an image")


def test_upstream_ground_truth_rule():
    assert not is_violating("whole_normal") and not is_violating("middle_normal")
    assert is_violating("lower_hips") and is_violating("sexy_implicit") and is_violating("wearing_bras")


def test_questions_from_folders(tmp_path):
    _make_tree(tmp_path)
    items = questions_from_folders(tmp_path)
    assert len(items) == sum(TREE.values())  # the .txt file is not an image
    by_cat = {}
    for it in items:
        by_cat.setdefault(it["category"], []).append(it)
        assert (tmp_path / it["image"]).is_file() and it["image"].startswith(f"val/{it['category']}/")
        assert it["question"] == UPSTREAM_QUESTION and it["kind"] == "yes_no"
    assert {c: len(v) for c, v in by_cat.items()} == TREE
    assert {it["answer"] for it in by_cat["whole_normal"] + by_cat["lower_normal"]} == {"No"}
    assert {it["answer"] for c in ("lower_hips", "upper_bust", "sexy_kiss") for it in by_cat[c]} == {"Yes"}
    assert [it["image"] for it in items] == sorted(it["image"] for it in items)  # deterministic order


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="download"):
        questions_from_folders(tmp_path)
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match="no images in category folders"):
        questions_from_folders(tmp_path)
    Image.new("RGB", (4, 4)).save(tmp_path / "val" / "stray.jpg")
    with pytest.raises(ValueError, match=r"stray\.jpg.*category folder"):
        questions_from_folders(tmp_path)


def test_evaluate_builds_and_records_the_questions(tmp_path):
    cfg = load_run_config(
        "parameters/demo.yaml",
        {
            "data.root": str(tmp_path / "data"),
            "run_name": "run",
            "runs_root": str(tmp_path),
            "eval.moderation_question": "Does this image break the rule?",
        },
    )
    with pytest.raises(FileNotFoundError, match="ICM moderation validation set"):
        moderation_items(cfg)
    _make_tree(tmp_path / "data" / "eval" / "icm")
    items = moderation_items(cfg)
    assert len(items) == sum(TREE.values()) and items[0]["question"] == "Does this image break the rule?"
    saved = json.loads((cfg.run_dir / "eval" / "icm_val_questions.json").read_text())
    assert saved == items
    assert not (tmp_path / "data" / "eval" / "icm" / "icm_val_questions.json").exists()  # input left alone
    # A questions JSON in the data root (the demo's) wins over the folders.
    own = [
        {
            "id": "x",
            "kind": "yes_no",
            "image": "val/lower_hips/000.png",
            "category": "lower_hips",
            "question": "q",
            "answer": "Yes",
        }
    ]
    (tmp_path / "data" / "eval" / "icm" / "icm_val_questions.json").write_text(json.dumps(own))
    assert moderation_items(cfg) == own
