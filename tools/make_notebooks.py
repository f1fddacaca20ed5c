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


def intro(does: str, time: str, look: str, good: str, next_: str, details: str) -> str:
    """A notebook's opening text for someone new: what it does in plain words, how long it takes on the
    demo and on a real recipe, what to look at and what a good result looks like, what to run next;
    the technical detail last."""
    return (
        f"{does}\n\n**How long.** {time}\n\n**What to look at.** {look}\n\n"
        f"**What good looks like.** {good}\n\n**Next.** {next_}\n\n**Details.** {details}"
    )


spec(
    "setup",
    "00 · Setup: environment check",
    intro(
        "Checks that this machine can run the chosen recipe, and lists what is missing before you spend "
        "time downloading or training.",
        "demo: a few seconds; a real recipe: the same.",
        "the last cell: either *Everything this recipe needs is here* or a short list of what is missing.",
        "the demo needs nothing beyond `make install`, so on any machine the last cell says everything is "
        "here. A real recipe wants the GPUs, bf16 and free disk its parameters file names (e.g. 8 GPUs "
        "with bf16 for `llava15-7b__q-instruct__mix`); flash-attn is optional (training falls back to "
        "PyTorch's sdpa attention).",
        "`01_download.ipynb`.",
        "Python and package versions, GPUs, CUDA, bf16, flash-attn, DeepSpeed and free disk at `data.root`.",
    ),
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
    intro(
        "Fetches the training data, benchmark and model weights the recipe needs and lays them out as "
        "training expects. Interrupted downloads resume; a second run does nothing.",
        "demo: about 30 s the first time (it builds its small synthetic data and tiny model locally), "
        "under a second after that. Real recipe: the dry-run table below gives the sizes, from a few "
        "GB (Q-Instruct images, *after*) to well over 100 GB with the mix665k images (*mix*); hours on an "
        "ordinary link.",
        "the dry-run table (what will be fetched and how big) and the layout check at the end.",
        "every source ends *ok*, and every row of the layout check is present.",
        "`02_merge.ipynb`.",
        "Fetches every source the recipe needs (derived from the config: *after* needs no 665k images) "
        "through huggingface_hub or a resumable HTTP downloader with size/sha256 checks, extracts archives "
        "safely into the exact upstream trees under `data.root`, converts OCR-VQA images to real JPEG, and "
        "checks the layout. A second run does no network work. The demo builds its packed sources locally "
        "and fetches them through the same code path.",
    ),
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
    intro(
        "Joins the recipe's training files into the one file the trainer reads, in the form the chosen "
        "model expects. Your input files are never changed.",
        "demo: a second or two. Real recipe: seconds (about 3 s for the 865k records of *mix*).",
        "the sources table (records per source, in merge order) and the duplicate ids.",
        "the record counts match the sources you expect; duplicate ids are listed for your information "
        "(upstream's own files have some, and training keeps them).",
        "`03_validate.ipynb`.",
        "Concatenates the recipe's LLaVA-format JSONs in its order (low-level data first, then "
        "llava_v1_5_mix665k for *mix*) with `jq -s add` semantics, applies per-source sampling ratios, keeps "
        "provenance in a sidecar (`train.provenance.jsonl`) so the file still loads in the original repos, "
        "reports duplicate ids, and writes the model's image token (`<image>` / `<|image|>`) into EVERY record. "
        "Inputs are never modified; outputs are written atomically under `runs/<run>/data/`.",
    ),
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
    intro(
        "Checks every training record and image before training starts, so that a broken file fails here "
        "in minutes rather than hours into a GPU run.",
        "demo: about 10 s. Real recipe: minutes (every image is opened; bars show records and images).",
        "the problems table: each kind of problem with its count, an example and the fix.",
        "no *error* rows (warnings are informational). The demo's data are built clean, so its table "
        "is empty or shows only warnings.",
        "`04_inspect.ipynb`.",
        "Checks the merged file: JSON/HTML/encoding at file level; ids, roles, empty turns, duplicate ids, "
        "image-token count and dialect per record; images (missing with exact case, unreadable, truncated, "
        "format different from the extension, degenerate sizes); token lengths with the model's real tokenizer "
        "and template, image tokens included (truncated samples, samples with no answer left). With "
        "`data.invalid_records: stop` problems stop the run here (the report is still written); with `drop` "
        "a cleaned file and a rejects file with reasons are written.",
    ),
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
    intro(
        "Shows what the model will be trained on: the mix of sources, conversation and token lengths, "
        "image sizes, a few samples, and exactly which tokens the training loss is computed on.",
        "demo: about 20 s. Real recipe: a minute or two.",
        "the token-length figure against `data.model_max_length`, the rendered model inputs (trained "
        "tokens highlighted, masked ones grey) and the browser at the end.",
        "almost no sample longer than `model_max_length`; in the rendered inputs only the assistant's "
        "answers are highlighted, the prompt and the image span are grey.",
        "`05_train.ipynb`.",
        "Figures of the merged data (source mix, turns per record, token lengths against `model_max_length`, "
        "image sizes, random samples per source), samples rendered as the trainer builds them (trained tokens "
        "highlighted, masked ones grey, the image-token span marked), and a live browser with filters (source, "
        "dataset, category, problem kind), text search and next/previous/random.",
    ),
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
    intro(
        "Fine-tunes the model on the validated data, with live curves. A finished run is not trained "
        "again: rerunning shows its result.",
        "demo: 3-7 min on a CPU (900 steps of a tiny model). Real recipe: what its parameters file says, "
        "e.g. about 18 h on 8 A100 for LLaVA-v1.5-7B *mix*.",
        "the live plot (loss, learning rate, grad norm, throughput, ETA in the title).",
        "the loss falls steadily and levels off; no spikes to NaN. If it stopped (pre-emption, `kill`), "
        "rerunning resumes from the last checkpoint. To train a finished run again: "
        "`icmlab train <params> --force` (old outputs moved to `runs/<run>/previous/`), a new "
        "`run_name`, or a higher `train.max_steps` to continue.",
        "`06_evaluate.ipynb`.",
        "Trains the run's model with the HF Trainer exactly as the upstream recipe does (templates, masking, "
        "frozen/trained parts, hyperparameters from the parameters file, DeepSpeed ZeRO on GPUs). On CPU or "
        "one GPU it trains in this kernel with live curves; with several GPUs or nodes it launches "
        "`deepspeed`/`torchrun` and streams its output. A rerun resumes from the last checkpoint in the run "
        "directory with the weights really restored. `train.packing: true` packs each micro-batch into rows of "
        "`data.model_max_length` tokens (same samples and loss per step, no padding; off upstream).",
    ),
    [
        """from icmlab import paths, train
from icmlab.display import show_figure
from icmlab.train.live import LiveMetricsPlot, plot_metrics

print(train.batch_message(cfg))""",
        "#md ## Training (live loss, learning rate, grad norm, throughput, ETA)",
        """result = train.run(cfg, callbacks=[LiveMetricsPlot(paths.metrics_jsonl(cfg), title=cfg.run_name)])
print(result.summary())""",
        "#md ## Curves of the whole run",
        "show_figure(plot_metrics(paths.metrics_jsonl(cfg), title=cfg.run_name))",
    ],
)

spec(
    "evaluate",
    "06 · Evaluate: baseline vs fine-tuned",
    intro(
        "Asks the starting model and the fine-tuned model the same held-out questions and compares their "
        "answers, with control runs that show whether the answers really come from the images.",
        "demo: 1-2 min. Real recipe: tens of minutes on one GPU (the Q-Bench A1 dev split, about 1,500 "
        "questions, twice).",
        "the Q-Bench and moderation tables (fine-tuned against the baseline), the controls figure, and "
        "the gallery of answers.",
        "the fine-tuned model well above the controls (blank or shuffled images), which stay near chance. "
        "The demo's untrained tiny model cannot produce the answer format at all, so its baseline is "
        "near 0 %: the controls, not the baseline, are the honest comparison. The demo's data are "
        "synthetic and its model is tiny; its numbers show that the pipeline learns, not what a real "
        "model scores.",
        "open `runs/<run>/report/report.html` (it opens inside Lab); then a real recipe: "
        "`icmlab run parameters/<model>__<dataset>__<strategy>.yaml`.",
        "Answers the held-out benchmarks greedily with the starting checkpoint (the paper's baseline) and the "
        "fine-tuned model, under a named evaluation protocol: `upstream` (the default for real recipes) feeds "
        "the model what Q-Instruct's eval scripts feed it (resize + centre crop, their prompt strings, 1024 / "
        "512 new tokens); `demo` keeps the embedded demo's own. Q-Bench A1 is scored three ways, each table "
        "naming its scorer: strict letter, Q-Instruct substring and VLMEvalKit-style exact; the `test` split "
        "writes the maintainers' submission file instead. ICM: ICM-Val and ICM-Test Yes/No (ICM-Test from the "
        "documented `test/<subset>/<sexy|not-sexy>/` layout), MQA accuracy, and MEQ judged by any "
        "OpenAI-compatible chat model (`eval.judge_url`, key from `$ICMLAB_JUDGE_KEY`, never recorded). Every "
        "accuracy carries its 95 % Wilson interval; the papers' numbers sit beside ours with Δ. Control runs "
        "(images blanked or shuffled) show whether the answers come from the pixels; they sit next to the "
        "baseline because an untrained baseline cannot produce the answer format. Several GPUs: "
        "`torchrun --nproc_per_node N -m icmlab evaluate <params>` shards the items (same answers as one). "
        "The same tables and figures are written to `runs/<run>/report/report.html`.",
    ),
    [
        """from icmlab import evaluate
from icmlab.evaluate import report
from icmlab.display import show_figure

result = evaluate.run(cfg)
print(result.summary())""",
        "#md ## The run: date, commit, parameters, recipe, protocol, data",
        """show_html(report.banner_html(result.context))
show_html(report.provenance_html(result.context))
q_refs, icm_refs, sources = report.context_references(result.context)""",
        "#md ## Q-Bench A1, one table per scorer (papers' rows and Δ where the paper has this model)",
        """for note in report.qbench_notes(result.evaluations):
    print(note)
for scorer in report.QBENCH_SCORERS:
    show_html(report.qbench_table_html(result.evaluations, scorer, q_refs, sources.get("qbench", "")))""",
        'show_figure(report.qbench_bar_figure(result.evaluations, "strict"))',
        "#md ## ICM moderation (ICM-Val; ICM-Test, MQA and MEQ when `eval.benchmarks` names them)",
        """val_refs = {k: (v or {}).get("val_r1") for k, v in icm_refs.items()}
show_html(report.moderation_table_html(result.evaluations, "moderation", val_refs, sources.get("icm", "")))
show_html(report.moderation_category_table_html(result.evaluations))
if any(r.icm_test for r in result.evaluations.values()):
    show_html(report.moderation_category_table_html(result.evaluations, "icm_test", icm_refs))
if any(r.mqa or r.meq for r in result.evaluations.values()):
    show_html(report.icm_extra_table_html(result.evaluations, icm_refs, sources.get("icm", "")))""",
        "show_figure(report.confusion_figure(result.evaluations))",
        "#md ## Controls: the fine-tuned model with blank or shuffled images",
        "show_figure(report.controls_figure(result.evaluations))",
        "#md ## Gallery: right and wrong answers, mixed",
        """show_html(report.gallery_html(result.gallery))
print("report:", result.report)""",
    ],
)

spec(
    "playground",
    "07 · Playground: try the model, then ship it",
    intro(
        "Ask the models of the run about one image and read their answers side by side, then export the "
        "fine-tuned model so other tools can load and serve it.",
        "demo: about a minute (headless: a few answers per model, then the export). Real recipe: a few "
        "minutes to load a 7B model, seconds per answer on a GPU; the export writes about 14 GB.",
        "the answers table (baseline against fine-tuned on the same images) and, at the end, the export "
        "folder with its model card and the printed `vllm serve` / SGLang commands.",
        "the fine-tuned model answers in the benchmark's format (a letter, Yes/No) and mostly agrees with "
        "the ground truth shown; the demo's untrained baseline answers gibberish.",
        "share the export (`export.repo_id` pushes it to the Hub) or serve it with the printed command.",
        "Ask the baseline, the fine-tuned model, any checkpoint of the run or another run's model about one "
        "image: a record of the validated dataset (its ground truth is shown), an image path, or an upload. "
        "Type a question or pick a Q-Bench-style / moderation template; the answers stream in side by side "
        "under the image. The prompt, the image preprocessing and greedy decoding are the eval protocol's, and "
        "the exact model input is shown. Headless (papermill, `icmlab run`), the `playground.pairs` of the "
        "parameters (or the first `playground.samples` validated records) are answered by every model of "
        "`playground.models` and written to `runs/<run>/playground/answers.html`. The last section exports "
        "the model (llava-hf / PEFT adapter / original mPLUG-Owl2 layout, model card, serve commands, "
        "hub push with `export.repo_id`); `icmlab export` does the same from the command line.",
    ),
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
    # ipykernel's own display name: Lab writes it into the notebook on save otherwise (a dirty git)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
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
