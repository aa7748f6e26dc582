"""Distillation from the tiny GR00T teacher, and the probe that reads teacher features."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import check_best_and_epoch_checkpoints, write_tasks

from sage.arc import Pair, Task
from sage.config import load_config
from sage.datasets import load_dataset
from sage.distill import ensure_teacher_cache, teacher_targets
from sage.encoding import collate
from sage.errors import ConfigError
from sage.evaluation import load_model
from sage.losses import distillation_losses
from sage.model import SageStudent
from sage.runlog import read_metrics
from sage.step import Autocast
from sage.splits import load_splits, make_datasets
from sage.training import train
from sage.validation import validate

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "data.train=synthetic", "data.synthetic.num_tasks=40", "data.val_fraction=0.25", "data.max_context_tokens=108",
    "model.grid_size=5", "model.max_demos=3", "model.d_model=32", "model.encoder_layers=1", "model.decoder_layers=1",
    "model.teacher_dim=64", "model.distill_hidden=32", "train.batch_size=8", "train.warmup_steps=3",
    "train.log_every=2", "val.batch_size=16", "run.device=cpu", "teacher.batch_size=8",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("features")  # shared: the tiny teacher extracts once per module


def config(tmp_path, cache_dir, name, *extra):
    return load_config(REPO / "configs" / "smoke.yaml", TINY + [
        f"run.checkpoint_dir={tmp_path / 'checkpoints'}", f"run.log_dir={tmp_path / 'logs'}", f"run.name={name}",
        f"teacher.cache_dir={cache_dir}", *extra])


def fingerprint(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def records(tmp_path, name, event):
    return [r for r in read_metrics(tmp_path / "logs" / name / "metrics.jsonl") if r["event"] == event]


def test_distillation_losses_are_masked_means():
    target = torch.randn(2, 3, 8)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    mse, cosine, count = distillation_losses(target.clone(), target, mask)
    assert mse.item() == 0 and cosine.item() == pytest.approx(1.0) and count == 2
    garbage = target.clone()
    garbage[0, 1] = 1e6  # a masked slot must not count
    assert distillation_losses(garbage, target, mask)[0].item() == 0
    mse, cosine, _ = distillation_losses(-target, target, mask)
    assert cosine.item() == pytest.approx(-1.0) and mse.item() == pytest.approx(4 * (target[mask] ** 2).mean().item())
    mse, cosine, count = distillation_losses(target, target, torch.zeros(2, 3, dtype=torch.bool))
    assert mse.item() == 0 and cosine.item() == 0 and count == 0


@pytest.mark.slow
def test_distillation_learns_the_teacher_and_the_task_and_resumes(tmp_path, cache_dir):
    cfg = config(tmp_path, cache_dir, "distil", "distill.weight=1.0", "train.epochs=6", "train.lr=3e-3")
    train(cfg, echo=False)
    log = (tmp_path / "logs" / "distil" / "train.log").read_text()
    assert "teacher: groot-n1.5-tiny (random weights), view task_context; distillation weight 1.0" in log
    assert "extracting with groot-n1.5-tiny" in log
    untrained = records(tmp_path, "distil", "start")[0]["val_feature_cosine"]
    epochs = records(tmp_path, "distil", "epoch")
    trained = epochs[-1]["val_feature_cosine"]
    assert trained > untrained + 0.3 and trained > 0.5, (untrained, trained)
    assert epochs[-1]["train_task_loss"] < epochs[0]["train_task_loss"]
    assert {"train_distill_mse", "train_distill_cosine", "val_feature_cosine"} <= set(epochs[-1])
    assert "distill_mse" in records(tmp_path, "distil", "train")[0]

    weights = load_file(tmp_path / "checkpoints" / "distil" / "last" / "model.safetensors")
    torch.manual_seed(cfg.run.seed)
    fresh = SageStudent(cfg.model).state_dict()
    assert not torch.equal(weights["distill_head.1.weight"], fresh["distill_head.1.weight"])
    assert not torch.equal(weights["teacher_mean"], fresh["teacher_mean"])  # statistics saved with the model

    # Interrupt mid-run and resume: the same weights, distillation head and statistics included.
    cache_files = fingerprint(cache_dir)
    assert any(name.endswith("manifest.json") for name in cache_files)
    train(config(tmp_path, cache_dir, "again", "distill.weight=1.0", "train.epochs=6", "train.lr=3e-3"),
          stop_after_steps=7, echo=False)
    train(config(tmp_path, cache_dir, "again", "distill.weight=1.0", "train.epochs=6", "train.lr=3e-3"),
          resume=True, echo=False)
    resumed = load_file(tmp_path / "checkpoints" / "again" / "last" / "model.safetensors")
    for key in weights:
        assert torch.equal(weights[key], resumed[key]), key
    assert "extracting" not in (tmp_path / "logs" / "again" / "train.log").read_text()  # the cache was reused
    assert fingerprint(cache_dir) == cache_files  # ... and left byte for byte as it was


def test_probe_trains_on_teacher_features_and_refuses_leaking_views(tmp_path, cache_dir):
    cfg = config(tmp_path, cache_dir, "probe", "model.kind=probe", "data.augment=false", "train.epochs=2",
                 "checkpoint.every_epochs=1")
    summary = train(cfg, echo=False)
    epochs = records(tmp_path, "probe", "epoch")
    assert len(epochs) == 2 and epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    check_best_and_epoch_checkpoints(tmp_path / "checkpoints" / "probe", tmp_path / "logs" / "probe", summary)
    check_probe_reads_its_features(cfg, tmp_path / "checkpoints" / "probe" / "last", epochs[-1], "teacher_features")
    # The probe can read the teacher's image tokens (pooled to 2x2 per grid) instead of one vector per grid.
    tokens = config(tmp_path, cache_dir, "probe-tokens", "model.kind=probe", "data.augment=false", "train.epochs=2",
                    "model.probe_input=tokens", "model.probe_token_side=2", "teacher.token_features=true")
    train(tokens, echo=False)
    epochs = records(tmp_path, "probe-tokens", "epoch")
    assert len(epochs) == 2 and epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert "probe input: tokens" in (tmp_path / "logs" / "probe-tokens" / "train.log").read_text()
    weights = load_file(tmp_path / "checkpoints" / "probe-tokens" / "last" / "model.safetensors")
    assert weights["image_pos_emb.weight"].shape[0] == 4  # 2x2 tokens per grid, each with its own position
    check_probe_reads_its_features(tokens, tmp_path / "checkpoints" / "probe-tokens" / "last", epochs[-1],
                                   "teacher_tokens")


def check_probe_reads_its_features(cfg, checkpoint: Path, last_epoch: dict, field: str) -> None:
    """The probe's last checkpoint, fed the validation examples with their teacher features, scores
    what training logged for its last epoch; with each example given another example's features
    (or their negation) its answer logits change: the probe answers from the features."""
    loaded = load_model(checkpoint, torch.device("cpu"))
    splits = load_splits(cfg)
    cache = ensure_teacher_cache(cfg, cfg.data.train, splits.train_dataset, lambda _: None)
    targets = teacher_targets(cache, cfg.model)
    assert targets.field == field
    _, val_set = make_datasets(cfg, splits, targets, targets)
    loader = torch.utils.data.DataLoader(val_set, batch_size=1, collate_fn=collate)  # no padding, no batch-mates
    again = validate(loaded.model, loader, torch.device("cpu"), Autocast(torch.device("cpu")), cfg.model.grid_size)
    assert again["count"] == last_epoch["val_count"] == len(val_set)
    for k in ("exact_match", "size_accuracy", "pixel_accuracy"):
        assert again[k] == last_epoch[f"val_{k}"], k
    assert again["loss"] == pytest.approx(last_epoch["val_loss"], rel=1e-5)
    batch = collate([val_set[i] for i in range(min(len(val_set), 8))])
    assert batch[field][batch["teacher_mask"]].abs().sum() > 0
    with torch.no_grad():
        logits = loaded.model(batch).logits
        assert torch.equal(loaded.model(batch).logits, logits)  # deterministic: a change below is the features'
        for altered in (batch[field].roll(1, dims=0), -batch[field]):  # (a scale would not do: the probe layer-norms)
            changed = loaded.model({**batch, field: altered}).logits
            assert (changed - logits).abs().max() > 1e-3, "the probe's answers ignore its teacher features"


def test_config_checks_for_teacher_use(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=r"model.teacher_dim \(2048\) must equal the width of teacher "
                                          r"groot-n1.5-tiny's features \(64\): set model.teacher_dim=64"):
        config(tmp_path, cache_dir, "x", "distill.weight=0.5", "model.teacher_dim=2048")
    with pytest.raises(ConfigError, match="set data.augment=false"):
        config(tmp_path, cache_dir, "x", "model.kind=probe", "data.augment=true")
    with pytest.raises(ConfigError, match="set teacher.token_features=true"):
        config(tmp_path, cache_dir, "x", "model.kind=probe", "data.augment=false", "model.probe_input=tokens")
    with pytest.raises(ConfigError, match=r"model.probe_token_side must be 1..16"):
        config(tmp_path, cache_dir, "x", "model.kind=probe", "data.augment=false", "model.probe_input=tokens",
               "teacher.token_features=true", "model.probe_token_side=17")
    with pytest.raises(ConfigError, match="model.kind must be 'student' or 'probe'"):
        config(tmp_path, cache_dir, "x", "model.kind=teacher")
    # A probe never reads the answer view; a student distils from it only when the config says so.
    with pytest.raises(ConfigError, match="with_answer shows the teacher the answer: a probe may not read it"):
        config(tmp_path, cache_dir, "x", "model.kind=probe", "data.augment=false", "teacher.view=with_answer")
    with pytest.raises(ConfigError, match="privileged information.*teacher.allow_answer_view=true"):
        config(tmp_path, cache_dir, "x", "distill.weight=0.5", "teacher.view=with_answer")
    assert config(tmp_path, cache_dir, "x", "distill.weight=0.5", "teacher.view=with_answer",
                  "teacher.allow_answer_view=true").teacher.allow_answer_view
    # Distillation with every example augmented would distil nothing (no example carries targets).
    with pytest.raises(ConfigError, match=r"distill.weight=0.5 with data.augment=true and "
                                          r"data.augment_probability=1.0 distils nothing"):
        config(tmp_path, cache_dir, "x", "distill.weight=0.5", "data.augment=true", "data.augment_probability=1.0")
    # The teacher shows the student's demonstrations: by default as many, and never a different number.
    assert config(tmp_path, cache_dir, "x", "distill.weight=0.5").teacher.max_demos == 3
    with pytest.raises(ConfigError, match=r"teacher.max_demos \(2\) must equal model.max_demos \(3\)"):
        config(tmp_path, cache_dir, "x", "distill.weight=0.5", "teacher.max_demos=2")


def training_targets(tmp_path: Path, data_dir: Path, name: str):
    """The training and validation sets of a distillation run on `data_dir`, with their teacher targets, as
    training builds them, and the teacher cache."""
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        f"data.train={data_dir}", "data.val_fraction=0.34", f"teacher.cache_dir={tmp_path / 'features'}",
        "teacher.batch_size=2", "run.device=cpu", f"run.name={name}"])
    splits = load_splits(cfg)
    cache = ensure_teacher_cache(cfg, cfg.data.train, splits.train_dataset, lambda _: None)
    targets = teacher_targets(cache, cfg.model)
    train_set, val_set = make_datasets(cfg, splits, targets, targets)
    return train_set, val_set, cache


def test_no_training_example_shows_the_teacher_its_own_answer(tmp_path):
    """Change one demonstration's answer: every teacher feature read by the training examples that
    ask for that answer is bit-identical (GR00T's language model is causal and the prompt ends with
    the query input), while examples that show it as a demonstration do change. Every example's
    targets are its prompt's rows, slot by slot, also with fewer demonstrations than model.max_demos."""
    tasks = [t for t in load_dataset("arc-agi-1/training") if len(t.train) >= 3][:3]
    short = Task("short", tasks[0].train[:1], tasks[0].test[:1], "one demonstration")  # examples with 1 demo of 2
    tasks.append(short)
    write_tasks(tasks, tmp_path / "given")
    changed = list(tasks)
    split_train = {t.id for t in training_targets(tmp_path, tmp_path / "given", "given")[0].tasks}
    target = next(i for i, t in enumerate(tasks) if t.id in split_train)
    task = tasks[target]
    answer = task.train[0].output
    other = np.arange(answer.size, dtype=np.uint8).reshape(answer.shape) % 9 + 1  # same shape, new content
    assert not np.array_equal(other, answer)
    changed[target] = Task(task.id, (Pair(task.train[0].input, other),) + task.train[1:], task.test, task.source)
    write_tasks(changed, tmp_path / "changed")

    before, before_val, cache_before = training_targets(tmp_path, tmp_path / "given", "given")
    after, _, cache_after = training_targets(tmp_path, tmp_path / "changed", "changed")
    assert cache_before.directory != cache_after.directory  # two datasets, two caches, same teacher
    fewer = 0
    for data in (before, before_val):
        for i, ref in enumerate(data.refs):
            kept = data.kept_demos[i]
            task_of = data.tasks[ref.task_index]
            got = data.teacher.for_example(task_of, kept, ref.query, 2)
            check_slots_hold_the_prompts_rows(data.teacher, cache_before, task_of, kept, ref.query, got)
            fewer += len(kept) < 2
    assert fewer >= 1  # the short task's
    asks, shows = 0, 0
    for i, ref in enumerate(before.refs):
        if before.tasks[ref.task_index].id != task.id:
            continue
        a, b = before.teacher.for_example(before.tasks[ref.task_index], before.kept_demos[i], ref.query, 2), \
            after.teacher.for_example(after.tasks[ref.task_index], after.kept_demos[i], ref.query, 2)
        assert a[1].any() and np.array_equal(a[1], b[1])
        if ref.query == 0:  # this example's answer is the changed grid
            asks += 1
            assert np.array_equal(a[0], b[0]), "the teacher saw the example's answer"
        elif 0 in before.kept_demos[i]:  # the changed pair is a demonstration the student sees too
            shows += 1
            assert not np.array_equal(a[0], b[0])
    assert asks == 1 and shows >= 1


def check_slots_hold_the_prompts_rows(teacher, cache, task: Task, kept: tuple, query: int, got) -> None:
    """The student's slot of demonstration k's input is 2k, of its output 2k + 1, of the query input
    2 * max_demos (sage/encoding.py); the prompt made for this example stores its grids' rows in
    prompt order (demo 0 input, demo 0 output, ..., query input). Checked here by position, without
    the roles that TeacherTargets.for_example maps through."""
    features, mask = got
    max_demos = (teacher.num_slots - 1) // 2
    shown = kept[:cache.identity["prompt"]["max_demos"]]
    rows = cache.pooled(f"{task.id}/q{query}/d{'.'.join(map(str, shown))}").float().numpy()
    assert len(rows) == 2 * len(shown) + 1
    expected = np.zeros_like(features)
    for k in range(len(shown)):
        expected[2 * k], expected[2 * k + 1] = rows[2 * k], rows[2 * k + 1]
    expected[2 * max_demos] = rows[-1]
    assert np.array_equal(features, expected), (task.id, query, kept)
    seen = {2 * k + side for k in range(len(shown)) for side in (0, 1)} | {2 * max_demos}
    assert mask.tolist() == [s in seen for s in range(teacher.num_slots)]
