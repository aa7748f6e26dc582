"""The oracle teacher: synthetic tasks' hidden rules as features, through the real cache and training path."""

import dataclasses

import numpy as np
import pytest
import torch
from tiny import ORACLE_TINY as TINY
from tiny import REPO

from sage.arc import Augmentation, fixed_view, random_augmentation
from sage.config import load_config
from sage.datasets import load_dataset
from sage.distill import ensure_teacher_cache, teacher_targets
from sage.encoding import collate
from sage.errors import ConfigError, FeatureCacheError, TeacherError
from sage.model import build_model
from sage.synthetic import TRANSFORMS, Rule, generate_tasks, generate_tasks_and_rules
from sage.teacher.oracle import OracleTeacher, load_oracle
from sage.teacher.prompt import view_example
from sage.teacher.settings import TeacherConfig
from sage.splits import load_splits, make_datasets

OPTIONS = dict(num_tasks=60, seed=3, transforms=list(TRANSFORMS), min_side=2, max_side=5, demos=3)  # ORACLE_TINY's


def test_rules_reproduce_the_generated_tasks_also_under_augmentation():
    grid = np.arange(12, dtype=np.uint8).reshape(3, 4) % 10
    numpy_names = {"flip_lr": np.fliplr, "flip_ud": np.flipud, "rot90": np.rot90,
                   "rot180": lambda g: np.rot90(g, 2), "transpose": np.transpose}
    for name, fn in numpy_names.items():
        assert np.array_equal(TRANSFORMS[name](None).apply(grid), fn(grid)), name
    rng = np.random.default_rng(0)
    seen = set()
    for task, rule in generate_tasks_and_rules(**OPTIONS):
        seen.add(task.id.rsplit("-", 1)[1])
        assert all(np.array_equal(rule.apply(p.input), p.output) for p in task.train + task.test), task.id
        aug = random_augmentation(rng)
        view, moved = aug.apply_task(task), rule.under(aug)
        assert all(np.array_equal(moved.apply(p.input), p.output) for p in view.train + view.test), (task.id, aug)
    assert seen == set(TRANSFORMS)  # every family drawn
    # Conjugating by a rotation turns a left-right flip into an up-down flip.
    assert TRANSFORMS["flip_lr"](None).under(Augmentation(1)) == TRANSFORMS["flip_ud"](None)
    swap = Rule(colours=(0, 2, 1, 3, 4, 5, 6, 7, 8, 9))
    assert swap.under(Augmentation(0, (0, 5, 6, 3, 4, 1, 2, 7, 8, 9))).colours == (0, 1, 2, 3, 4, 6, 5, 7, 8, 9)


def test_oracle_features_are_the_rule_plus_noise_never_the_grids():
    pairs = generate_tasks_and_rules(**OPTIONS)
    oracle = OracleTeacher({t.id: r for t, r in pairs}, noise=0.0, seed=0)
    prompts = [view_example(t, [0, 1], 2, "task_context", 3) for t, _ in pairs]
    features = {e.key: e.pooled.numpy() for e in oracle.features(prompts)}
    vectors = {}
    for (task, rule), prompt in zip(pairs, prompts):
        rows = features[prompt.key]
        assert rows.shape == (5, 64)  # 2 demonstrations x 2 grids + the query input
        assert np.allclose(rows, oracle.rule_vector(rule), atol=1e-5)  # every grid: the task's rule
        vectors[rule] = rows[0]
    distinct = np.stack(list(vectors.values()))
    assert len(distinct) > 20
    unit = distinct / np.linalg.norm(distinct, axis=1, keepdims=True)
    cosines = unit @ unit.T
    assert cosines[~np.eye(len(unit), dtype=bool)].max() < 0.99  # different rules, different features
    # Noise at level 0.5: per prompt and grid, with that standard deviation, reproducible.
    noisy = OracleTeacher({t.id: r for t, r in pairs}, noise=0.5, seed=0)
    first, again = noisy.features(prompts), noisy.features(prompts)
    residual = np.concatenate([e.pooled.numpy() - features[e.key] for e in first])
    assert residual.std() == pytest.approx(0.5, rel=0.05)
    assert all(np.array_equal(a.pooled, b.pooled) for a, b in zip(first, again))
    assert not np.allclose(first[0].pooled[0], first[0].pooled[1])  # each grid its own draw


def test_oracle_refuses_what_it_cannot_know():
    with pytest.raises(TeacherError, match="hidden rules of generated tasks only.*'arc-agi-1/training'"):
        load_oracle(TeacherConfig(preset="oracle"), "arc-agi-1/training", {})
    pairs = generate_tasks_and_rules(**OPTIONS)
    (task, rule), (other, _) = pairs[0], next(p for p in pairs if p[1] != pairs[0][1])
    oracle = OracleTeacher({task.id: rule})
    with pytest.raises(TeacherError, match="not one of the generated synthetic tasks"):
        oracle.features([view_example(other, [0], 1, "task_context", 3)])
    impostor = type(other)(task.id, other.train, other.test, other.source)  # same id, other rule's grids
    with pytest.raises(TeacherError, match="does not follow the rule"):
        oracle.features([view_example(impostor, [0, 1], 2, "task_context", 3)])
    for bad, message in [("teacher.noise=0.1", "teacher.noise is the oracle teacher's"),
                         ("teacher.preset=oracle", "model.teacher_dim .* must equal .* oracle's features \\(64\\)")]:
        with pytest.raises(ConfigError, match=message):
            load_config(REPO / "configs" / "smoke.yaml", ["distill.weight=1", "model.teacher_dim=32", bad])


def test_oracle_features_reach_training_through_the_cache(tmp_path):
    cfg = load_config(REPO / "configs" / "kd_oracle.yaml", TINY + [f"teacher.cache_dir={tmp_path}"])
    splits = load_splits(cfg)
    cache = ensure_teacher_cache(cfg, "synthetic", splits.train_dataset, lambda _: None)
    assert cache.identity["teacher"]["preset"] == "oracle" and (cache.directory / "manifest.json").is_file()
    assert cache.directory.parent == tmp_path / "oracle" / "task_context"
    rules = {t.id: r for t, r in generate_tasks_and_rules(**OPTIONS)}
    assert set(rules) == {t.id for t in splits.train_dataset}
    oracle = OracleTeacher(rules, noise=0.0, seed=cfg.teacher.seed)
    targets = teacher_targets(cache, cfg.model)
    train_set, val_set = make_datasets(cfg, splits, targets, targets)
    for data in (train_set, val_set):
        for i in range(0, len(data), 7):
            item = data[i]
            task = data.tasks[data.refs[i].task_index]
            slots = np.flatnonzero(item["teacher_mask"])
            # Every grid the example shows, at its slot (demo k: 2k, 2k+1; query: 2 * max_demos), is the rule.
            assert list(slots) == [s for k in range(len(data.kept_demos[i])) for s in (2 * k, 2 * k + 1)] + [8]
            assert np.allclose(item["teacher_features"][slots], oracle.rule_vector(rules[task.id]), atol=2e-2)
    # The student never reads them: scrambled features leave its answers and statements bit for bit.
    torch.manual_seed(0)
    student = build_model(dataclasses.replace(cfg.model, task_slot=True)).eval()
    batch = collate([val_set[i] for i in range(8)])
    scrambled = {**batch, "teacher_features": torch.randn_like(batch["teacher_features"]),
                 "teacher_mask": ~batch["teacher_mask"]}
    with torch.no_grad():
        plain, other = student(batch), student(scrambled)
    assert torch.equal(plain.logits, other.logits) and torch.equal(plain.task_features, other.task_features)
    # Another noise level is another teacher: its cache is refused, not mixed in.
    noisy = load_config(REPO / "configs" / "kd_oracle.yaml", TINY + [f"teacher.cache_dir={tmp_path}",
                                                                     "teacher.noise=0.5"])
    with pytest.raises(FeatureCacheError, match="teacher.noise: cache has 0.0, config asks for 0.5"):
        ensure_teacher_cache(noisy, "synthetic", splits.train_dataset, lambda _: None)
    # Other generator settings are another dataset, in its own directory.
    other = load_config(REPO / "configs" / "kd_oracle.yaml", TINY + [f"teacher.cache_dir={tmp_path}",
                                                                     "data.synthetic.seed=4"])
    other_cache = ensure_teacher_cache(other, "synthetic", load_splits(other).train_dataset, lambda _: None)
    assert other_cache.directory != cache.directory
    assert generate_tasks(**{**OPTIONS, "seed": 4})[0].id.startswith("syn4-")


def test_augmented_views_are_cached_and_give_augmented_examples_their_own_targets(tmp_path):
    views = TINY + ["data.augment=true", "data.augment_probability=1.0", f"teacher.cache_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="distils nothing.*teacher.augmented_views"):
        load_config(REPO / "configs" / "kd_oracle.yaml", views)
    cfg = load_config(REPO / "configs" / "kd_oracle.yaml", views + ["teacher.augmented_views=3"])
    splits = load_splits(cfg)
    cache = ensure_teacher_cache(cfg, "synthetic", splits.train_dataset, lambda _: None)
    val_ids = {t.id for t in splits.val}
    viewed = {k.split("/")[0] for k in cache.keys() if "/a" in k}
    assert viewed == {t.id for t in splits.train}  # views of every training task, none of validation's
    assert {k.split("/")[1] for k in cache.keys() if "/a" in k} == {"a1", "a2", "a3"}
    assert all("/a" not in k for k in cache.keys() if k.split("/")[0] in val_ids)

    rules = {t.id: r for t, r in generate_tasks_and_rules(**OPTIONS)}
    oracle = OracleTeacher(rules, noise=0.0, seed=cfg.teacher.seed)
    targets = teacher_targets(cache, cfg.model)
    train_set, _ = make_datasets(cfg, splits, targets, targets)
    assert train_set.with_teacher_view_in_epoch(0) == len(train_set)  # every example keeps its targets
    changed = 0
    for i in range(0, len(train_set), 5):
        aug, view = train_set.augmentation(i)
        assert 1 <= view <= 3 and aug == fixed_view(train_set.tasks[train_set.refs[i].task_index].id, view)
        task = train_set.tasks[train_set.refs[i].task_index]
        item = train_set[i]
        query = aug.apply_task(task).train[train_set.refs[i].query].input if train_set.refs[i].query < len(
            task.train) else aug.apply_task(task).test[0].input
        h, w = query.shape
        assert np.array_equal(item["query"].reshape(6, 6)[:h, :w], query.astype(np.int64) + 2)  # the view's grids
        slots = np.flatnonzero(item["teacher_mask"])
        seen = oracle.rule_vector(rules[task.id].under(aug))  # the rule as this view shows it
        assert np.allclose(item["teacher_features"][slots], seen, atol=2e-2)
        changed += not np.allclose(seen, oracle.rule_vector(rules[task.id]), atol=2e-2)
    assert changed > 0  # ... which is not the rule of the task as given

    # Any teacher's view prompt shows the same roles, each grid through the view's augmentation.
    arc = load_dataset("arc-agi-1/training")[5]
    plain, second = (view_example(arc, [0, 1], 2, "task_context", 3, augmented_view=k) for k in (0, 2))
    assert second.roles == plain.roles and second.key == plain.key.replace("/q", "/a2/q", 1)
    assert all(np.array_equal(g, fixed_view(arc.id, 2).apply(p)) for g, p in zip(second.grids, plain.grids))


def test_a_run_that_keeps_only_small_tasks_extracts_and_reads_the_same_cache(tmp_path):
    """data.max_grid_side filters the training dataset; extraction must cover the same task list,
    or the cache it writes is not the one training opens."""
    cfg = load_config(REPO / "configs" / "kd_oracle.yaml", TINY + [f"teacher.cache_dir={tmp_path}",
                                                                   "data.max_grid_side=4"])
    splits = load_splits(cfg)
    assert 0 < len(splits.train_dataset) < OPTIONS["num_tasks"]
    cache = ensure_teacher_cache(cfg, "synthetic", splits.train_dataset, lambda _: None)
    assert cache.identity["dataset"]["num_tasks"] == len(splits.train_dataset)
    assert {e["task"] for e in cache.entries.values()} == {t.id for t in splits.train_dataset}
