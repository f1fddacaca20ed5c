"""Regenerate notebooks/NN_<stage>.ipynb (without outputs) from the cell specs below.

Run: ``python tools/make_notebooks.py``. The notebooks are thin: a title, a ``parameters`` cell with
literal defaults that run the demo, one config cell, then one call per step into ``icmlab`` followed
by display cells. Edit the specs here, not the .ipynb files, so all notebooks keep the same shape.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent

PARAMETERS = """params_file: str = "parameters/demo.yaml"  # run definition: a file under parameters/
overrides: dict = {}  # dotted keys over the file, e.g. {"train.lr": 1e-5}"""

CONFIG = """from icmlab.config import load_notebook_config
from icmlab.display import show_config, show_html

cfg = load_notebook_config(params_file, overrides, globals())
show_config(cfg)"""

HOW = (
    "\n\nRun it top to bottom (defaults = the CPU demo), or headlessly: "
    "`icmlab run {params} --only {stage}` / `papermill notebooks/{name} out.ipynb -p params_file {params}`."
)

SPECS: dict[str, tuple[str, list[str]]] = {}


def spec(stage: str, title: str, purpose: str, cells: list[str]) -> None:
    """Register a notebook: markdown title + purpose, then code cells (strings starting with '#md' are markdown)."""
    SPECS[stage] = (f"# {title}\n\n{purpose}", cells)


spec(
    "setup",
    "00 · Setup: environment check",
    "Checks this machine against the chosen recipe: Python and package versions, GPUs, CUDA, bf16, "
    "flash-attn, DeepSpeed and free disk at the data root, and says what is missing.",
    [
        """from icmlab import envinfo

setup = envinfo.run(cfg)
print(setup.table())""",
        """if setup.problems:
    print("Missing for this recipe:")
    for row in setup.problems:
        print(f"  - {row.item}: {row.note or row.value}")
else:
    print("Everything this recipe needs is here.")""",
    ],
)


spec(
    "download",
    "01 · Download: data and weights, resumable and verified",
    "Fetches every source the recipe needs (derived from the config: *after* needs no 665k images) "
    "through huggingface_hub or a resumable HTTP downloader with size/sha256 checks, extracts archives "
    "safely into the exact upstream trees under `data.root`, converts OCR-VQA images to real JPEG, and "
    "checks the layout. A second run does no network work. The demo builds its packed sources locally "
    "and fetches them through the same code path.",
    [
        "#md ## What will be fetched (dry run)",
        """from icmlab import download

plan = download.plan(cfg)
show_html(download.plan_html(plan))""",
        "#md ## Download, verify, extract",
        """result = download.run(cfg)
print(result.summary())""",
        "#md ## Layout check: every expected folder and file of the recipe",
        "show_html(download.layout_html(result.layout))",
    ],
)

spec(
    "merge",
    "02 · Merge: one training JSON in the model's dialect",
    "Concatenates the recipe's LLaVA-format JSONs in its order (low-level data first, then "
    "llava_v1_5_mix665k for *mix*) with `jq -s add` semantics, applies per-source sampling ratios, keeps "
    "provenance in a sidecar (`train.provenance.jsonl`) so the file still loads in the original repos, "
    "reports duplicate ids, and writes the model's image token (`<image>` / `<|image|>`) into EVERY record. "
    "Inputs are never modified; outputs are written atomically under `runs/<run>/data/`.",
    [
        """from icmlab import merge
from icmlab.display import html_table

result = merge.run(cfg)
print(result.summary())""",
        "#md ## Sources, in merge order",
        "show_html(html_table(result.sources))",
        "#md ## Duplicate ids (first and repeated occurrence)",
        "show_html(html_table(result.duplicate_examples))",
    ],
)

spec(
    "validate",
    "03 · Validate: catch every data problem before any GPU time",
    "Checks the merged file: JSON/HTML/encoding at file level; ids, roles, empty turns, duplicate ids, "
    "image-token count and dialect per record; images (missing with exact case, unreadable, truncated, "
    "format different from the extension, degenerate sizes); token lengths with the model's real tokenizer "
    "and template, image tokens included (truncated samples, samples with no answer left). With "
    "`data.invalid_records: stop` problems stop the run here (the report is still written); with `drop` "
    "a cleaned file and a rejects file with reasons are written.",
    [
        """from icmlab import validate
from icmlab.display import html_table

result = validate.run(cfg)
print(result.summary())""",
        "#md ## Problems by kind (count, example, fix)",
        "show_html(html_table(result.table()))",
        "#md ## Per-source statistics",
        "show_html(html_table(result.per_source_table()))",
        "#md ## Lengths with the real tokenizer and template",
        "result.lengths",
    ],
)

spec(
    "inspect",
    "04 · Inspect: look at the data and the exact model input",
    "Figures of the merged data (source mix, turns per record, token lengths against `model_max_length`, "
    "image sizes, random samples per source), samples rendered as the trainer builds them (trained tokens "
    "highlighted, masked ones grey, the image-token span marked), and a live browser with filters (source, "
    "dataset, category, problem kind), text search and next/previous/random.",
    [
        """from icmlab import inspection
from icmlab.display import html_table

result = inspection.run(cfg)
print(result.summary())
show_html(html_table(result.table()))""",
        'result.figures["source_mix"]',
        'result.figures["turns"]',
        'result.figures["token_lengths"]',
        'result.figures["image_sizes"]',
        'result.figures["samples"]',
        "#md ## Model inputs: trained vs masked tokens",
        "show_html(inspection.samples_html(result, 3))",
        "show_html(inspection.samples_html(result, 3, problems=True))",
        "#md ## Browser (live in JupyterLab)",
        "inspection.browser(cfg, result)",
    ],
)

spec(
    "train",
    "05 · Train",
    "Trains the run's model with the HF Trainer exactly as the upstream recipe does (templates, masking, "
    "frozen/trained parts, hyperparameters from the parameters file, DeepSpeed ZeRO on GPUs). On CPU or "
    "one GPU it trains in this kernel with live curves; with several GPUs or nodes it launches "
    "`deepspeed`/`torchrun` and streams its output. A rerun resumes from the last checkpoint in the run "
    "directory with the weights really restored. `train.packing: true` packs each micro-batch into rows of "
    "`data.model_max_length` tokens (same samples and loss per step, no padding; off upstream).",
    [
        """from icmlab import paths, train
from icmlab.display import show_figure
from icmlab.train.live import LiveMetricsPlot, plot_metrics

print(train.batch_message(cfg))""",
        "#md ## Training (live loss, learning rate, grad norm, throughput, ETA)",
        """result = train.run(cfg, callbacks=[LiveMetricsPlot(paths.metrics_jsonl(cfg), every=10, title=cfg.run_name)])
print(result.summary())""",
        "#md ## Curves of the whole run",
        "show_figure(plot_metrics(paths.metrics_jsonl(cfg), title=cfg.run_name))",
    ],
)

spec(
    "evaluate",
    "06 · Evaluate: baseline vs fine-tuned",
    "Answers the held-out benchmarks greedily with the starting checkpoint (the paper's baseline) and the "
    "fine-tuned model: Q-Bench A1 scored strictly by the chosen letter and by upstream's substring rule, "
    "and Yes/No moderation with precision/recall of 'violating'. Control runs on the fine-tuned model "
    "(images blanked, or shuffled between questions) show whether the answers come from the pixels. "
    "The real ICM validation set (`val/<category>/` folders only) gets its Yes/No questions built from the "
    "folders with upstream's ground truth (`*normal*` categories are harmless), saved in `runs/<run>/eval/`. "
    "The same figures are written to `runs/<run>/report/report.html`.",
    [
        """from icmlab import evaluate
from icmlab.evaluate import report
from icmlab.display import show_figure

result = evaluate.run(cfg)
print(result.summary())""",
        "#md ## Q-Bench A1 (strict letter match, then upstream substring rule)",
        """show_html(report.qbench_table_html(result.evaluations, "strict"))
show_html(report.qbench_table_html(result.evaluations, "substring"))""",
        'show_figure(report.qbench_bar_figure(result.evaluations, "strict"))',
        "#md ## Moderation",
        """show_html(report.moderation_table_html(result.evaluations))
show_html(report.moderation_category_table_html(result.evaluations))""",
        "show_figure(report.confusion_figure(result.evaluations))",
        "#md ## Controls: the fine-tuned model with blank or shuffled images",
        "show_figure(report.controls_figure(result.evaluations))",
        "#md ## Gallery",
        """show_html(report.gallery_html(result.gallery))
print("report:", result.report)""",
    ],
)

spec(
    "playground",
    "07 · Playground: try the model, then ship it",
    "Ask the baseline, the fine-tuned model, any checkpoint of the run or another run's model about one "
    "image: a record of the validated dataset (its ground truth is shown), an image path, or an upload. "
    "Type a question or pick a Q-Bench-style / moderation template; the answers stream in side by side "
    "under the image. The prompt template, the square padding and greedy decoding are evaluation's, and "
    "the exact model input is shown. Headless (papermill, `icmlab run`), the `playground.pairs` of the "
    "parameters (or the first `playground.samples` validated records) are answered by every model of "
    "`playground.models` and written to `runs/<run>/playground/answers.html`. The last section exports "
    "the model (llava-hf / PEFT adapter / original mPLUG-Owl2 layout, model card, serve commands, "
    "hub push with `export.repo_id`); `icmlab export` does the same from the command line.",
    [
        """from icmlab import playground

result = playground.run(cfg)
print(result.table())""",
        "show_html(playground.answers_html(result))",
        "#md ## Ask your own question (run the notebook in Jupyter for the widgets)",
        "playground.playground(cfg)",
        "#md ## Ship it: export, model card, serving handoff, hub push",
        """from icmlab import export

if cfg.export.enabled:
    shipped = export.run(cfg)
    print(shipped.summary())
else:
    print("export.enabled is false: run `icmlab export` to export")""",
    ],
)


def build(stage: str) -> nbformat.NotebookNode:
    """Build one notebook from its spec."""
    from icmlab.runner import STAGES

    head, cells = SPECS[stage]
    name = f"{STAGES.index(stage):02d}_{stage}.ipynb"
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells.append(new_markdown_cell(head + HOW.format(params="parameters/demo.yaml", stage=stage, name=name)))
    nb.cells.append(new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}))
    nb.cells.append(new_code_cell(CONFIG))
    for c in cells:
        nb.cells.append(new_markdown_cell(c[3:].strip()) if c.startswith("#md") else new_code_cell(c))
    for i, c in enumerate(nb.cells):  # stable ids keep diffs small
        c["id"] = f"{stage}-{i:02d}"
    return nb


def main() -> None:
    """Write every registered notebook."""
    from icmlab.runner import STAGES

    for stage in SPECS:
        path = ROOT / "notebooks" / f"{STAGES.index(stage):02d}_{stage}.ipynb"
        nbformat.write(build(stage), path)
        print("wrote", path.relative_to(ROOT))


if __name__ == "__main__":
    main()
