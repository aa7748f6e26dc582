"""The shape of the code: sage/ imports one way (down the layers below), never a top-level script,
and no function grows past what a reader holds in mind. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"train_sage", "evaluate", "extract_groot_features", "sage_student_model"}

# Bottom to top: a module imports only modules of earlier layers (names without the "sage." prefix).
LAYERS: list[tuple[str, ...]] = [
    ("errors", "files", "teacher.settings", "teacher.render"),  # leaves
    ("arc", "device", "recovery", "checkpoint", "metric_sinks", "pictures",
     "teacher.loading", "teacher.presets", "teacher.tokenizer"),
    ("encoding", "runlog", "synthetic", "overlap", "voting", "teacher.prompt", "teacher.backbone"),
    ("model", "losses", "metrics", "uncertainty", "distributed", "features", "teacher", "teacher.groot",
     "token_batches"),
    ("config", "teacher.oracle"),  # config checks values against the model's and the teacher's
    ("datasets", "step", "config_reference"),  # step: autocast, optimiser, schedule, loss and step, under training and inference
    ("extraction", "validation", "ttt"),
    ("distill", "task_batched_ttt"),
    ("memory_probe",),  # one probe step of training and validation before a run, of TTT before an evaluation
    ("splits",),  # what a run trained on and held out: training, evaluation and the benchmarks rebuild it here
    ("training", "predict"),
    ("speed", "student_vs_teacher", "ablate", "finished_tasks", "compare_reports"),
    ("evaluation",),
    ("report",),
]
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO / "sage").with_suffix("").parts)
    return "teacher" if name == "teacher.__init__" else name


def sage_modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p))
            for p in sorted((REPO / "sage").rglob("*.py")) if p.name != "__init__.py" or p.parent.name != "sage"}


def imports(tree: ast.Module) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_sage_imports_run_down_the_layers_and_never_reach_a_script():
    layer_of = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    problems = []
    for name, tree in sage_modules().items():
        if name not in layer_of:
            problems.append(f"sage/{name.replace('.', '/')}.py is in no layer: add it to LAYERS in {__file__}")
            continue
        for target in sorted(imports(tree)):
            if target.split(".")[0] in SCRIPTS:
                problems.append(f"sage.{name} imports the top-level script {target}")
            if not target.startswith("sage."):
                continue
            other = target.removeprefix("sage.")
            if other not in layer_of:
                continue  # reported as a module of its own
            if layer_of[other] >= layer_of[name]:
                problems.append(f"sage.{name} (layer {layer_of[name]}) imports sage.{other} "
                                f"(layer {layer_of[other]}): imports must run down the layers")
    assert not problems, "\n".join(problems)


def test_the_layers_name_only_modules_that_exist():
    names = set(sage_modules())
    listed = [name for layer in LAYERS for name in layer]
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert not set(listed) - names, f"LAYERS lists modules that do not exist: {sorted(set(listed) - names)}"


CODE = [*sorted((REPO / "sage").rglob("*.py")), *sorted((REPO / "benchmarks").rglob("*.py")),
        *(REPO / f"{script}.py" for script in sorted(SCRIPTS))]  # the package, the benchmarks, the entry scripts


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(REPO)))
def test_no_function_is_longer_than_a_reader_holds_in_mind(path):
    tree = ast.parse(path.read_text())
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(REPO)}: split into named phases: {', '.join(long)}"


def test_the_torch_floor_is_the_release_ci_tests():
    """requirements.txt's torch floor is what .ci/run and README's install command pin, and what runs."""
    import re

    import torch

    floor = re.search(r"^torch>=([\d.]+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
    pins = re.findall(r"torch==([\d.]+)", (REPO / ".ci" / "run").read_text() + (REPO / "README.md").read_text())
    assert pins and all(pin in (floor, floor + ".0") for pin in pins), (floor, pins)
    assert tuple(map(int, torch.__version__.split("+")[0].split(".")[:2])) >= tuple(map(int, floor.split(".")))
