"""End to end: `icmlab run parameters/demo.yaml` through every notebook, and the demo really learns.

This is what `make demo` does, in a temporary data root and runs folder. It proves the whole chain
(download from local packed sources -> merge -> validate -> inspect -> train -> evaluate) and the
claim of the demo: held-out image-only questions go from about chance to well above it after
training, while the controls (images blanked or shuffled between questions) stay near chance.
Measured with parameters/demo.yaml (900 steps, deterministic on CPU for the seed): Q-Bench strict
0.0 -> 0.915, moderation 0.0 -> 0.965, controls 0.355 / 0.50 (blank) and 0.36 / 0.495 (shuffled);
the whole run took 275 s on two cores. The thresholds below are the issue's claim (>= 0.90 on both).
"""

from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import pytest

from icmlab.runner import STAGES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    cmd = [
        sys.executable,
        "-m",
        "icmlab",
        "run",
        "parameters/demo.yaml",
        "--set",
        f"runs_root={base / 'runs'}",
        "--set",
        f"data.root={base / 'data'}",
        "--set",
        f"demo.source_dir={base / 'sources'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return base / "runs" / "demo", proc


def test_every_stage_ran_and_left_its_executed_notebook(demo_run):
    run_dir, proc = demo_run
    for i, stage in enumerate(STAGES):
        nb = nbformat.read(run_dir / f"{i:02d}_{stage}.ipynb", as_version=4)
        assert not nb.metadata.papermill.get("exception"), stage
        assert (run_dir / ".markers" / f"{stage}.json").exists()
    assert (run_dir / "config.resolved.yaml").exists() and (run_dir / "env.json").exists()
    assert "report:" in proc.stdout and (run_dir / "report" / "report.html").exists()
    # the final model loads with plain transformers
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(run_dir / "model")
    AutoProcessor.from_pretrained(run_dir / "model")


def test_demo_learns_from_pixels(demo_run):
    run_dir, _ = demo_run
    scores = json.loads((run_dir / "eval" / "scores.json").read_text())
    base, tuned = scores["baseline"], scores["fine-tuned"]
    assert tuned["qbench"]["strict"]["overall"] >= 0.90
    assert tuned["moderation"]["accuracy"] >= 0.90
    assert base["qbench"]["strict"]["overall"] <= 0.5
    assert base["moderation"]["accuracy"] <= 0.6
    for control in ("blank", "shuffled"):
        c = tuned["controls"][control]
        # only the pixels can answer: without them the model falls back to chance
        assert c["qbench"]["strict"]["overall"] <= tuned["qbench"]["strict"]["overall"] - 0.2, control
        assert c["moderation"]["accuracy"] <= 0.6, control


def test_second_run_skips_every_stage(demo_run, tmp_path):
    run_dir, _ = demo_run
    base = run_dir.parent.parent
    cmd = [
        sys.executable,
        "-m",
        "icmlab",
        "run",
        "parameters/demo.yaml",
        "--set",
        f"runs_root={base / 'runs'}",
        "--set",
        f"data.root={base / 'data'}",
        "--set",
        f"demo.source_dir={base / 'sources'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split()[1] for line in proc.stdout.splitlines()[: len(STAGES)]] == ["skipped"] * len(STAGES)
