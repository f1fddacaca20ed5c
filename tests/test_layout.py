"""The package layout holds: stages meet only through shared lower packages, no import cycles, and
model-family facts live in ``icmlab/models/spec.py`` alone.

The import graph is read from the source with :mod:`ast` (every ``import``, top-level or inside a
function), so a lazy import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "icmlab"
STAGES = ("download", "merge", "validate", "inspection", "train", "evaluate", "export", "playground")
# Lower layers: a stage may import them, they never import a stage.
LOWER = ("inputs", "models", "demo", "config", "typed_yaml", "paths", "io", "display", "notebook", "progress")
# The one public cross-stage read: validate and inspect read merge's provenance sidecar.
ALLOWED_CROSS = {("validate", "icmlab.merge.provenance"), ("inspection", "icmlab.merge.provenance")}
# The playground asks exactly as evaluation does (its prompt encoder, padding, decoding, templates);
# the model card reads evaluation's scores.
ALLOWED_CROSS |= {
    ("playground", f"icmlab.evaluate.{m}")
    for m in ("generation", "generation.generate_answers", "generation.pixel_values", "icm_val",
              "icm_val.UPSTREAM_QUESTION", "report", "report.thumbnail_data_uri", "scoring",
              "scoring.qbench_prompt", "stage", "stage.prompt_format", "protocol",
              "protocol.prepare_image", "protocol.resolve_protocol")
} | {("export", m) for m in ("icmlab.evaluate.scoring", "icmlab.evaluate.scoring.EvaluationResult",
                              "icmlab.evaluate.stage", "icmlab.evaluate.stage.EvaluateResult")}  # fmt: skip
# train.push_to_hub pushes through the export's one hub upload.
ALLOWED_CROSS |= {("train", "icmlab.export.hub"), ("train", "icmlab.export.hub.push_folder")}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never imported at run time
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("icmlab"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("icmlab"):
                out.add(name)
                out.update(f"{name}.{a.name}" for a in node.names)  # "from icmlab import train"
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {i for i in _imports(path) if i in modules and i != name}
    return graph


def _top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_module_of_the_package_sits_flat_with_a_stage_prefix():
    flat = sorted(p.name for p in PKG.glob("*.py"))
    for stage in STAGES:
        assert not [f for f in flat if f.startswith(f"{stage}_") or f == f"{stage}.py"], flat
    for stage in (*STAGES, "inputs"):
        init = PKG / stage / "__init__.py"
        assert init.is_file(), f"icmlab/{stage}/ is not a package"


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_package_exports_run(stage):
    import importlib

    pkg = importlib.import_module(f"icmlab.{stage}")
    assert callable(pkg.run) and pkg.run.__module__ == f"icmlab.{stage}.stage"


def test_lower_layers_never_import_a_stage():
    bad = []
    for mod, deps in _graph().items():
        if _top(mod) in LOWER:
            bad += [(mod, d) for d in deps if _top(d) in STAGES]
    assert not bad, bad


def test_stages_do_not_reach_into_each_other():
    bad = []
    for mod, deps in _graph().items():
        src = _top(mod)
        if src in STAGES:
            bad += [(mod, d) for d in deps if _top(d) in STAGES and _top(d) != src and (src, d) not in ALLOWED_CROSS]
    assert not bad, bad


def test_no_import_cycles():
    graph = _graph()

    # Package __init__ files re-export their children; an edge child -> parent package is the normal
    # way Python imports a submodule and does not form a real cycle.
    def deps(m: str) -> set[str]:
        return {d for d in graph[m] if not m.startswith(d + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(deps(m)):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, cycles


def test_family_facts_live_only_in_the_spec():
    """No module outside models/spec.py spells a family's image token, image size or token count in a
    family-keyed table (a third family must not touch these files)."""
    table = re.compile(r"""\{\s*["'](llava15|mplug_owl2)["']\s*:""")
    literal = re.compile(r"""["']<\|image\|>["']|["']<image>["']""")
    offenders = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        if rel == "models/spec.py" or rel.startswith("demo/"):
            continue
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        tree = ast.parse(code)
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                seg = ast.get_source_segment(code, node) or ""
                if table.match(seg):
                    offenders.append(f"{rel}:{node.lineno} family-keyed table")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if literal.fullmatch(repr(node.value)) or node.value in ("<image>", "<|image|>"):
                    offenders.append(f"{rel}:{node.lineno} image token literal {node.value!r}")
    assert not offenders, offenders
