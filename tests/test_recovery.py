"""Nothing lost, nothing misleading: out-of-memory and NaN recovery, kill -9 and resume, bad input
that fails cleanly without touching existing caches or checkpoints, and loading without pickle."""

import copy
import hashlib
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import DISTIL, DISTILLED, REPO, adam_steps, epoch_records, run_main, tiny_argv, tiny_command, tiny_config

import evaluate as evaluate_cli
import train_sage
from sage.datasets import training_dataset
from sage.encoding import ARCExamples, collate, training_examples
from sage.errors import TrainingError
from sage.features import cache_path
from sage.model import build_model
from sage.recovery import FaultInjection, MicroBatch
from sage.runlog import read_metrics
from sage.step import Autocast, read_steps, train_step
from sage.splits import load_splits
from sage.training import train


@pytest.mark.parametrize("normalization, slots", [("cell", "grids"), ("example", "grids"), ("cell", "task"),
                                                 ("example", "both")])
def test_pieces_add_up_to_the_whole_batch(normalization, slots):
    """Out-of-memory recovery pushes a batch through in pieces; the optimiser step must not change,
    whichever way the answer loss is averaged and whichever slots are distilled."""
    cfg = tiny_config(Path("/unused"), "pieces", "distill.weight=0.5", "model.teacher_dim=64", "train.lr=1e-2",
                      f"train.loss_normalization={normalization}", f"distill.slots={slots}",
                      f"model.task_slot={'false' if slots == 'grids' else 'true'}")
    tasks = load_splits(cfg).train
    data = ARCExamples(tasks, training_examples(tasks), cfg.model.grid_size, cfg.model.max_demos,
                       cfg.data.max_context_tokens)
    batch = collate([data[i] for i in range(8)])
    g = torch.Generator().manual_seed(0)
    slots = cfg.model.num_grid_slots
    batch["teacher_features"] = torch.randn(8, slots, cfg.model.teacher_dim, generator=g)
    batch["teacher_mask"] = (batch["segments"].unsqueeze(-1) == torch.arange(slots)).any(1)
    batch["teacher_mask"][:3] = False  # uneven teacher slots across pieces
    torch.manual_seed(0)
    whole = build_model(cfg.model)
    pieces = copy.deepcopy(whole)
    results = []
    for model, size in ((whole, 8), (pieces, 3)):  # 3 + 3 + 2 examples
        micro = MicroBatch("training", 8, size, log=print)
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is the gradient (Adam's first step is ~sign)
        results += read_steps([train_step(model, sgd, batch, cfg, Autocast(torch.device("cpu")), micro,
                                          FaultInjection(), step=1)])
    assert results[0].values.keys() == results[1].values.keys() >= {"loss", "task_loss", "distill_mse"}
    for k, v in results[0].values.items():
        assert results[1].values[k] == pytest.approx(v, rel=1e-5), k
    assert results[1].grad_norm == pytest.approx(results[0].grad_norm, rel=1e-4)
    for (name, a), b in zip(whole.named_parameters(), pieces.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture
def clean_run(tiny_run):
    """One epoch of the tiny run without faults (conftest.py's tiny_run, read only): the reference
    the recovered runs must match."""
    return {"root": tiny_run.root, "summary": tiny_run.summary, "checkpoints": tiny_run.checkpoints,
            "logs": tiny_run.logs}


def test_out_of_memory_halves_the_phase_and_the_run_finishes(tmp_path, clean_run):
    faults = FaultInjection.parse(["oom:train:3", "oom:train:4", "oom:val:1"])
    summary = train(tiny_config(tmp_path, "oom", "train.epochs=1"), echo=False, faults=faults)
    assert not summary["stopped_early"] and summary["epochs_done"] == 1
    # The batch went through in pieces of 4, then 2 (validation in 8s): the same run, to float rounding
    # (measured: losses within 1e-8 relative, weights within 5e-7).
    (oom,), (clean,) = epoch_records(tmp_path / "logs" / "oom"), epoch_records(clean_run["logs"])
    assert oom.keys() == clean.keys() and oom["step"] == clean["step"] == summary["step"] > 3
    for k in oom:
        assert oom[k] == (pytest.approx(clean[k], rel=1e-5, abs=1e-7) if isinstance(clean[k], float) else clean[k]), k
    weights = [load_file(run / "last" / "model.safetensors")
               for run in (tmp_path / "checkpoints" / "oom", clean_run["checkpoints"])]
    assert weights[0].keys() == weights[1].keys()
    for k in weights[1]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=0, atol=1e-5, msg=k)
    log = (tmp_path / "logs" / "oom" / "train.log").read_text()
    assert "out of memory in training at step 3: training now runs 4 examples per forward pass instead of 8 " \
           "(batch size 8 kept by accumulating gradients)" in log
    assert "out of memory in training at step 3: training now runs 2 examples per forward pass instead of 4" in log
    assert "out of memory in validation at a validation batch: validation now runs 8 examples per forward pass " \
           "instead of 16" in log
    state = json.loads((tmp_path / "checkpoints" / "oom" / "last" / "meta.json").read_text())["train_state"]
    assert (state["train_micro_batch"], state["val_micro_batch"]) == (2, 8)  # kept for the rest of the run


def test_out_of_memory_at_one_example_gives_up_clearly():
    micro = MicroBatch("training", 2, None, log=lambda _: None)
    micro.halve("step 1")
    with pytest.raises(TrainingError, match="with one example per forward pass: the model does not fit"):
        micro.halve("step 1")
    with pytest.raises(ValueError, match="expected oom:train:N"):
        FaultInjection.parse(["oom:test:1"])


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    summary = train(tiny_config(tmp_path, "one-nan", "train.epochs=1"), echo=False,
                    faults=FaultInjection.parse(["nan:train:2"]))
    records = read_metrics(tmp_path / "logs" / "one-nan" / "metrics.jsonl")
    assert [r["step"] for r in records if r["event"] == "skipped"] == [2]
    (epoch,) = [r for r in records if r["event"] == "epoch"]
    assert summary["epochs_done"] == 1 and summary["step"] == epoch["step"] > 2
    # The skipped step updated nothing (one optimiser step fewer) and is not in the epoch's means.
    best = tmp_path / "checkpoints" / "one-nan" / "best"
    assert adam_steps(best) == {summary["step"] - 1}
    assert all(math.isfinite(epoch[k]) for k in ("train_loss", "train_exact_match", "val_loss"))
    meta = json.loads((best / "meta.json").read_text())
    assert meta["train_state"]["skipped_steps"] == 1 and meta["train_state"]["nonfinite_in_row"] == 0
    assert (summary["best_epoch"], summary["best_exact_match"]) == (1, epoch["val_exact_match"])
    assert meta["val_metrics"] == {k[len("val_"):]: v for k, v in epoch.items() if k.startswith("val_")}
    weights = load_file(best / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())

    cfg = tiny_config(tmp_path, "diverged", "train.max_nonfinite_steps=3")
    with pytest.raises(TrainingError, match=r"3 steps in a row had a non-finite loss or gradient \(up to step 4"):
        train(cfg, echo=False, faults=FaultInjection.parse(["nan:train:2", "nan:train:3", "nan:train:4"]))
    run = tmp_path / "checkpoints" / "diverged"
    assert not (run / "best").exists()  # nothing validated, nothing called best
    weights = load_file(run / "last" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert adam_steps(run / "last") == {1}  # the weights of step 1, the last finite one
    state = json.loads((run / "last" / "meta.json").read_text())["train_state"]
    assert (state["step"], state["skipped_steps"], state["nonfinite_in_row"]) == (4, 3, 3)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    settings = ["train.epochs=4", "checkpoint.every_steps=3", "data.num_workers=0"]
    assert run_main(train_sage.main, tiny_argv(tmp_path, "straight", *settings)) == 0  # the reference, in-process

    victim = subprocess.Popen(tiny_command(tmp_path, "killed", *settings), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    meta = tmp_path / "checkpoints" / "killed" / "last" / "meta.json"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:  # kill once a mid-epoch checkpoint of epoch 2 exists
        try:
            state = json.loads(meta.read_text())["train_state"]
        except (OSError, ValueError, KeyError):
            state = None
        if state and state["epoch"] >= 1 and state["batch_in_epoch"] > 0:
            break
        time.sleep(0.01)
    assert victim.poll() is None, "training ended before it could be killed: " + victim.stderr.read().decode()[-500:]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = json.loads(meta.read_text())["train_state"]
    assert killed_at["epoch"] < 4

    resumed = subprocess.run(tiny_command(tmp_path, "killed", *settings) + ["--resume"], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in (tmp_path / "logs" / "killed" / "train.log").read_text()
    assert epoch_records(tmp_path / "logs" / "killed") == epoch_records(tmp_path / "logs" / "straight")
    final = [load_file(tmp_path / "checkpoints" / run / "last" / "model.safetensors") for run in ("straight", "killed")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


# ----------------------------------------------------------------------------- bad input


def write_task(directory: Path, name: str, content: str | dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(content if isinstance(content, str) else json.dumps(content))


GOOD_PAIR = {"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}

BAD_TASKS = {  # file content -> what the error must say
    "malformed_json": ('{"train": [', r"malformed_json.json: not valid JSON"),
    "ragged_rows": ({"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": [GOOD_PAIR]},
                    r"train pair 0, input: row 1 has 1 cells but row 0 has 2"),
    "colour_10": ({"train": [{"input": [[1, 10]], "output": [[1]]}], "test": [GOOD_PAIR]},
                  r"cell \(0, 1\) is 10, colours must be 0..9"),
    "negative_colour": ({"train": [GOOD_PAIR], "test": [{"input": [[-1]], "output": [[1]]}]},
                        r"test pair 0, input: cell \(0, 0\) is -1"),
    "too_big": ({"train": [{"input": [[0] * 31] * 31, "output": [[1]]}], "test": [GOOD_PAIR]},
                r"grid is 31x31, ARC grids are at most 30x30"),
    "empty_train": ({"train": [], "test": [GOOD_PAIR]}, r"'train' must be a non-empty list of pairs"),
    "empty_test": ({"train": [GOOD_PAIR], "test": []}, r"'test' must be a non-empty list of pairs"),
    "float_cell": ({"train": [{"input": [[1.5]], "output": [[1]]}], "test": [GOOD_PAIR]},
                   r"cell \(0, 0\) is 1.5, expected an integer 0..9"),
    "string_cell": ({"train": [GOOD_PAIR], "test": [{"input": [["3"]], "output": [[1]]}]},
                    r"cell \(0, 0\) is \"3\", expected an integer 0..9"),
}


def fingerprint_tree(root: Path) -> dict[str, str]:
    """Content hash of every file under root: a failed run must leave these alone."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "logs" not in p.relative_to(root).parts}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """train_sage.py's command line `argv` ([python, train_sage.py, ...]) run in this process."""
    code = run_main(train_sage.main, argv[2:])
    return code, capsys.readouterr().err


def test_malformed_inputs_fail_cleanly_and_touch_nothing(tmp_path, capsys, distilled_run):
    """Each mistake gets one "error: ..." message naming what and where, exit code 2, no traceback, and
    the existing checkpoints and teacher cache (a copy of conftest.py's distilled_run: a good run
    "distilled" and its teacher cache) are byte for byte the same afterwards."""
    distilled_run.copy_to(tmp_path)
    good = DISTILLED
    distil = [*DISTIL, f"teacher.cache_dir={tmp_path / 'features'}"]
    cache = next((tmp_path / "features").rglob("manifest.json")).parent
    before = fingerprint_tree(tmp_path)

    def fails(argv: list[str], pattern: str) -> None:
        code, err = run_cli(argv, capsys)
        assert code == 2 and re.search(pattern, err) and "Traceback" not in err, (pattern, code, err)
        assert err.startswith("error: ") and err.count("error: ") == 1, err

    for name, (content, message) in BAD_TASKS.items():
        data = tmp_path / "bad_data" / name
        write_task(data, "fine", {"train": [GOOD_PAIR], "test": [GOOD_PAIR]})
        write_task(data, name, content)
        fails(tiny_command(tmp_path, f"bad-{name}", f"data.train={data}"), message)
    fails(tiny_command(tmp_path, "typo", "train.bacth_size=4"), r"unknown key 'train.bacth_size'")
    bad_yaml = tmp_path / "typo.yaml"
    bad_yaml.write_text((REPO / "configs" / "smoke.yaml").read_text() + "\nvalidation:\n  batch_size: 2\n")
    fails([sys.executable, "train_sage.py", "--config", str(bad_yaml)], r"typo.yaml.*unknown key 'validation'")
    # A checkpoint from another model config, and a run name that already has checkpoints.
    fails(tiny_command(tmp_path, good, *distil, "model.d_model=64") + ["--resume"], r"model config differs")
    fails(tiny_command(tmp_path, good, *distil), r"already has checkpoints")

    # A cache made for other tasks (another generator setting) or by another teacher view, copied to
    # where this config looks.
    other = tiny_config(tmp_path, "dataset", *distil, "data.synthetic.num_tasks=30")
    other_cache = cache_path(other.teacher, "synthetic", training_dataset(other.data))
    shutil.copytree(cache, other_cache)
    fails(tiny_command(tmp_path, "dataset", *distil, "data.synthetic.num_tasks=30"), r"dataset")
    shutil.copytree(cache, cache.parent.parent / "with_answer" / cache.name)
    fails(tiny_command(tmp_path, "view", *distil, "teacher.view=with_answer", "teacher.allow_answer_view=true"),
          r"view.*task_context.*with_answer")

    # Truncated or corrupted files: the error names the file.
    shard = next(cache.rglob("*.safetensors"))
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "features", damaged)
    damaged_shard = damaged / shard.relative_to(tmp_path / "features")
    damaged_shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    fails(tiny_command(tmp_path, "shard", *DISTIL, f"teacher.cache_dir={damaged}"),
          re.escape(str(damaged_shard)) + r".*truncated or corrupted")
    damaged_shard.write_bytes(b"\xff" * 64)
    fails(tiny_command(tmp_path, "shard", *DISTIL, f"teacher.cache_dir={damaged}"), re.escape(str(damaged_shard)))

    for broken, what in (("model.safetensors", "cannot read weights"), ("training_state.pt", "cannot read training"),
                         ("meta.json", "corrupted")):
        run = tmp_path / "checkpoints" / f"broken-{broken}"
        shutil.copytree(tmp_path / "checkpoints" / good, run)
        path = run / "last" / broken
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        fails(tiny_command(tmp_path, f"broken-{broken}", *distil) + ["--resume"], re.escape(str(path)) + ".*" + what)
        shutil.rmtree(run)
    shutil.rmtree(damaged)
    shutil.rmtree(cache.parent.parent / "with_answer")
    shutil.rmtree(other_cache)
    after = fingerprint_tree(tmp_path)
    for key in set(before) | set(after):
        if key.startswith(("checkpoints", "features")):
            assert before.get(key) == after.get(key), key


def test_truncated_checkpoint_is_named_by_evaluate(tmp_path, clean_run, capsys):
    shutil.copytree(clean_run["checkpoints"], tmp_path / "checkpoints" / "eval")
    weights = tmp_path / "checkpoints" / "eval" / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code = run_main(evaluate_cli.main, ["--checkpoint", weights.parent, "--out", tmp_path / "report"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert str(weights) in err and "truncated or corrupted" in err


def test_interrupted_checkpoint_save_is_repaired(tmp_path):
    """kill -9 between moving the old checkpoint aside and renaming the new one in."""
    from sage.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    save_checkpoint(run / "last", {"w": torch.ones(2)}, {"step": 1}, {"step": 1})
    (run / "last").rename(run / ".last.old-999999999")  # as the killed save left it (that pid is not alive)
    (run / ".last.tmp-999999999").mkdir()
    restored = load_checkpoint(run / "last")
    assert restored.meta == {"step": 1} and sorted(p.name for p in run.iterdir()) == ["last"]


def test_loading_never_runs_pickled_code():
    """Weights via safetensors, training state with weights_only=True, YAML with the safe loader."""
    sources = [p for p in REPO.rglob("*.py") if ".venv" not in p.parts and "tests" not in p.parts]
    text = {p: p.read_text() for p in sources}
    for path, code in text.items():
        for call in re.findall(r"torch\.load\([^)]*\)", code):
            assert "weights_only=True" in call, (path, call)
        assert not re.search(r"yaml\.(load|unsafe_load|full_load)\(", code), path
        assert "trust_remote_code=True" not in code and not re.search(r"^import pickle|pickle\.load", code, re.M), path
