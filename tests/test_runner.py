"""The papermill runner: order, skip-when-unchanged markers, failure naming notebook and cell, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from icmlab.config import load_run_config
from icmlab.runner import STAGES, StageFailed, run_pipeline, select_stages


def _nb(path, body: str) -> None:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        new_code_cell('params_file = "x"\noverrides = {}', metadata={"tags": ["parameters"]}),
        new_code_cell(body),
    ]
    nbformat.write(nb, path)


@pytest.fixture
def mini_project(tmp_path):
    """A project whose stage notebooks append their name to a log (merge can be told to fail)."""
    (tmp_path / "parameters").mkdir()
    (tmp_path / "notebooks").mkdir()
    for i, stage in enumerate(STAGES):
        body = (
            f"from pathlib import Path\nimport os\n"
            f"log = Path(params_file).parent / 'stages.log'\n"
            f"assert not (Path(params_file).parent / 'fail_{stage}').exists(), 'told to fail'\n"
            f"log.write_text((log.read_text() if log.exists() else '') + '{stage}\\n')"
        )
        _nb(tmp_path / "notebooks" / f"{i:02d}_{stage}.ipynb", body)
    (tmp_path / "parameters" / "p.yaml").write_text(
        "run_name: r\nhardware: {device: cpu}\ntrain: {bf16: false, global_batch_size: 16}\n"
    )
    return tmp_path


def test_select_stages():
    assert select_stages(None, "train") == ["train", "evaluate", "playground"]
    assert select_stages(["merge", "setup"], None) == ["setup", "merge"]
    with pytest.raises(ValueError, match="unknown stage 'trian'"):
        select_stages(["trian"], None)


def test_runs_in_order_skips_when_unchanged_and_names_failures(mini_project):
    cfg = load_run_config(mini_project / "parameters" / "p.yaml")
    run_dir = cfg.run_dir
    log = run_dir / "stages.log"
    res = run_pipeline(cfg, only=["setup", "download", "merge"], root=mini_project)
    assert [s.status for s in res.stages] == ["ran"] * 3
    assert log.read_text().split() == ["setup", "download", "merge"]
    assert (run_dir / "config.resolved.yaml").exists() and json.loads((run_dir / "env.json").read_text())["packages"]
    assert (run_dir / "02_merge.ipynb").exists() and (run_dir / ".markers" / "merge.json").exists()
    # second run: nothing changed -> every stage skipped, no notebook executed
    res = run_pipeline(cfg, only=["setup", "download", "merge"], root=mini_project)
    assert [s.status for s in res.stages] == ["skipped"] * 3
    assert log.read_text().split() == ["setup", "download", "merge"]
    # a changed notebook re-runs that stage and the ones after it
    _nb(
        mini_project / "notebooks" / "01_download.ipynb",
        "from pathlib import Path\nlog = Path(params_file).parent / 'stages.log'\n"
        "log.write_text(log.read_text() + 'download2\\n')",
    )
    res = run_pipeline(cfg, only=["setup", "download", "merge"], root=mini_project)
    assert [s.status for s in res.stages] == ["skipped", "ran", "ran"]
    # a failure stops the run, names notebook and cell, keeps the executed notebook, writes no marker
    (run_dir / "fail_validate").write_text("")
    with pytest.raises(StageFailed) as e:
        run_pipeline(cfg, root=mini_project)
    msg = str(e.value)
    assert (
        "stage 'validate' failed in 03_validate.ipynb, cell [3] ('from pathlib import Path'): AssertionError: told to fail"
        in msg
    )
    assert str(run_dir / "03_validate.ipynb") in msg
    assert nbformat.read(run_dir / "03_validate.ipynb", as_version=4).metadata.papermill.exception is True
    assert not (run_dir / ".markers" / "validate.json").exists()
    assert "inspect" not in log.read_text().split()


def test_cli_reports_bad_key_and_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr_schedular: cosine\n")
    proc = subprocess.run([sys.executable, "-m", "icmlab", "setup", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.lr_schedular: unknown key (did you mean train.lr_scheduler?)" in proc.stderr


def test_cli_setup_prints_environment_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "icmlab", "setup", "parameters/demo.yaml", "--set", f"data.root={tmp_path}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "torch" in proc.stdout and "disk free at data root" in proc.stdout
