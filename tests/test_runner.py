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


@pytest.mark.slow  # starts a kernel per stage (15 s): kept out of make test-fast
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


def test_fingerprint_ignores_outputs_and_metadata_not_sources(mini_project):
    """Lab's autosave (outputs, execution counts, widget metadata) must not re-run a stage."""
    from nbformat.v4 import new_output

    from icmlab.runner import fingerprint

    cfg = load_run_config(mini_project / "parameters" / "p.yaml")
    path = mini_project / "notebooks" / "02_merge.ipynb"
    before = fingerprint(cfg, "merge", path, "")
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].outputs = [new_output("stream", name="stdout", text="x" * 1000)]
    nb.cells[1].execution_count = 7
    nb.cells[1].metadata["collapsed"] = True
    nb.metadata["widgets"] = {"state": {}}
    nbformat.write(nb, path)
    assert fingerprint(cfg, "merge", path, "") == before
    nb.cells[1].source += "\nprint('changed')"
    nbformat.write(nb, path)
    assert fingerprint(cfg, "merge", path, "") != before


@pytest.mark.slow
def test_cli_run_streams_stage_progress_and_is_quiet_otherwise(mini_project):
    """``icmlab run`` shows the stage's tqdm bar (here: the periodic lines of a non-terminal log) and
    neither papermill's INFO lines nor the kernel's TCP warning; an INFO log goes to the notebook's stdout."""
    import os

    _nb(
        mini_project / "notebooks" / "00_setup.ipynb",
        "import logging, time\nfrom tqdm.auto import tqdm\nfrom icmlab.notebook import prepare\nprepare()\n"
        "logging.getLogger('icmlab.demo').info('hello from the stage')\n"
        "for _ in tqdm(range(8), desc='counting'):\n    time.sleep(0.5)",
    )
    env = dict(os.environ, ICMLAB_PROGRESS_INTERVAL="1")
    cmd = [sys.executable, "-m", "icmlab", "run", "parameters/p.yaml", "--only", "setup"]
    proc = subprocess.run(cmd, cwd=mini_project, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("setup: counting:")]
    assert len(lines) >= 2 and lines[-1] != lines[0], proc.stderr  # it moved while the stage ran
    assert "/8 [" in lines[-1]
    assert "without encryption" not in proc.stderr and "Executing Cell" not in proc.stderr
    cfg = load_run_config(mini_project / "parameters" / "p.yaml")
    cell = nbformat.read(cfg.run_dir / "00_setup.ipynb", as_version=4).cells[-1]
    streams = {o.name: o.text for o in cell.outputs if o.output_type == "stream"}
    assert "hello from the stage" in streams.get("stdout", "") and "hello" not in streams.get("stderr", "")


def test_terminal_progress_redraws_one_line_on_a_terminal(tmp_path):
    """On a terminal the bars are redrawn in place (carriage return, line cleared), one line at the end."""
    import io
    import time

    from icmlab.progress import TerminalProgress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream, path = Tty(), tmp_path / "progress.txt"
    with TerminalProgress(path, "train", stream=stream) as shown:
        path.write_text("train:  10%|#         | 1/10 [loss 2.1]\n")
        time.sleep(0.7)
        path.write_text("train:  20%|##        | 2/10 [loss 1.9]\nsamples: 3/9\n")
    assert shown.shown == [
        "train:  10%|#         | 1/10 [loss 2.1]",
        "train:  20%|##        | 2/10 [loss 1.9] | samples: 3/9",
    ]
    assert stream.getvalue().count("\r\x1b[K") == 2 and stream.getvalue().endswith("samples: 3/9\n")


def test_batch_starts_shows_a_live_bar_counting_items():
    """The evaluate stage's batches are counted in items by a bar that the progress tee can read."""
    from icmlab.progress import bar_lines, batch_starts

    seen = [(start, bar_lines()) for start in batch_starts(10, 4, "evaluate")]
    assert [s for s, _ in seen] == [0, 4, 8]
    assert seen[1][1][0].startswith("evaluate:") and "4/10" in seen[1][1][0] and "8/10" in seen[2][1][0]
    assert bar_lines() == []  # closed with the loop
