"""Notebook structure: one per stage, thin, parameterized, committed without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import papermill as pm
import pytest

from icmlab.runner import STAGES, notebook_for

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_one_notebook_per_stage_in_order():
    assert [p.name for p in NOTEBOOKS] == [notebook_for(s, ROOT).name for s in STAGES]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_shape(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    # the opening says, for a newcomer, how long, what to look at, what good looks like, what next
    for part in ("**How long.** demo", "**What to look at.**", "**What good looks like.**", "**Next.**"):
        assert part in nb.cells[0].source, (path.name, part)
    # committed without outputs
    assert all(not c.outputs and c.execution_count is None for c in code)
    # parameters cell: literal demo defaults, documented for --help-notebook
    params = pm.inspect_notebook(str(path))
    assert set(params) == {"params_file", "overrides"}
    assert params["params_file"]["default"] == '"parameters/demo.yaml"'
    assert params["overrides"]["default"] == "{}"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and code.index(tagged[0]) == 0
    # the next cell loads and prints the resolved config through the one loader
    assert "load_notebook_config(params_file, overrides, globals())" in code[1].source
    assert "show_config(cfg)" in code[1].source
    # thin: no definitions, short cells
    for c in code:
        lines = c.source.splitlines()
        assert not any(l.startswith(("def ", "class ", "async def ", "lambda")) for l in lines), c.source
        assert len(lines) <= 12, f"cell too long; move logic into icmlab:\n{c.source}"


def test_show_config_is_a_short_summary_with_the_full_yaml_folded():
    """A notebook opens with a few lines on what the run is; the resolved YAML sits in a <details>."""
    import html

    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    from icmlab.config import load_run_config
    from icmlab.display import config_summary, config_text, show_config

    cfg = load_run_config(ROOT / "parameters" / "demo.yaml")
    InteractiveShell.instance()
    try:
        with capture_output() as cap:
            show_config(cfg)
    finally:
        InteractiveShell.clear_instance()
    (out,) = cap.outputs
    markup = out.data["text/html"]
    shown, folded = markup.split("<details>")
    assert all(html.escape(v) in shown for _, v in config_summary(cfg)) and len(config_summary(cfg)) <= 8
    assert html.escape(config_text(cfg)) in folded and "embedded demo data" in shown
    assert cap.stdout == ""


def test_lab_saves_committed_notebooks_without_outputs_and_runs_as_they_are(tmp_path):
    """The repository's jupyter_server_config.py, loaded by traitlets as Lab loads it, into Lab's own
    FileContentsManager: a save under notebooks/ drops outputs and Lab's metadata, one under runs/ keeps them."""
    import copy

    from jupyter_server.services.contents.filemanager import FileContentsManager
    from nbformat.v4 import new_output
    from traitlets.config import PyFileConfigLoader

    config = PyFileConfigLoader("jupyter_server_config.py", path=str(ROOT)).load_config()
    assert config.ServerApp.root_dir == str(ROOT) and config.ServerApp.default_url == "/lab/tree/notebooks"
    manager = FileContentsManager(config=config, root_dir=str(tmp_path))
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    code[1].outputs, code[1].execution_count = [new_output("stream", name="stdout", text="x" * 500)], 3
    code[1].metadata["execution"] = {"iopub.status.busy": "2026-12-02T15:00:00"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.5", "mimetype": "text/x-python"}
    for folder in ("notebooks", "runs"):
        (tmp_path / folder).mkdir()
        model = {"type": "notebook", "format": "json", "content": copy.deepcopy(nb)}  # the hook edits it in place
        manager.save(model, f"{folder}/{NOTEBOOKS[0].name}")
    saved = nbformat.read(tmp_path / "notebooks" / NOTEBOOKS[0].name, as_version=4)
    assert saved == nbformat.read(NOTEBOOKS[0], as_version=4)  # byte-for-byte what the generator wrote
    kept = nbformat.read(tmp_path / "runs" / NOTEBOOKS[0].name, as_version=4)
    assert [c for c in kept.cells if c.cell_type == "code"][1].outputs and "widgets" in kept.metadata
