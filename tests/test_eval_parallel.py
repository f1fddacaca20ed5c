"""Data-parallel evaluation: ``torchrun --nproc_per_node 2 -m icmlab evaluate`` on 2 CPU gloo ranks gives
the answers and scores of the 1-rank in-process run, controls included (icmlab.evaluate.parallel).

A tiny (untrained) LLaVA plays both baseline and fine-tuned model; its greedy answers are arbitrary
but deterministic, which is all the equality needs. 7 Q-Bench items and 5 moderation items do not
divide evenly by 2, so the strided shards differ in size. About 40-60 s on the shared 2-core machine
(two ranks importing torch and transformers).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_eval_setup import eval_run

from icmlab import paths
from icmlab.config import save_resolved
from icmlab.evaluate import stage
from icmlab.io import read_json
from icmlab.train.launch import free_port

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
ROOT = Path(__file__).resolve().parent.parent


def _outputs(scores: dict) -> dict:
    """model/control -> benchmark -> answers, from a scores.json."""
    out = {}
    for label, res in scores.items():
        if label.startswith("_"):
            continue
        for name, r in [(label, res), *((f"{label}·{c}", v) for c, v in res["controls"].items())]:
            out[name] = {b: [x["output"] for x in r[b]["records"]] for b in ("qbench", "moderation")}
    return out


def test_two_gloo_ranks_answer_and_score_as_one(tmp_path):
    cfg = eval_run(tmp_path, controls=["blank", "shuffled"])
    one = stage.run(cfg)
    single = read_json(one.scores_json)
    shutil.move(str(paths.eval_dir(cfg)), str(tmp_path / "eval-1rank"))
    config = save_resolved(cfg, tmp_path / "par.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run(
        [*cmd, "-m", "icmlab", "evaluate", str(config)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "evaluation rank 0 of 2" in proc.stderr and "evaluation rank 1 of 2" in proc.stderr  # really sharded
    double = read_json(paths.eval_dir(cfg) / "scores.json")
    assert _outputs(double) == _outputs(single)
    for label in ("baseline", "fine-tuned"):
        assert double[label]["qbench"]["strict"] == single[label]["qbench"]["strict"]
        assert double[label]["moderation"]["accuracy"] == single[label]["moderation"]["accuracy"]
    assert len(_outputs(single)["fine-tuned·shuffled"]["qbench"]) == 7
