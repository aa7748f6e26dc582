"""The teacher-feature cache: end-to-end extraction on ARC-AGI-1 with the tiny teacher, reading back,
resumption (including a real SIGKILL), shard k/n + merge, and refusal of mismatched caches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import run_main

import extract_groot_features
from sage.config import load_config
from sage.datasets import load_dataset
from sage.distill import prompts_for_dataset
from sage.errors import FeatureCacheError
from sage.extraction import merge, run_extraction, teacher_tasks
from sage.features import (
    SHARDS,
    CacheWriter,
    EntryFeatures,
    FeatureCache,
    build_spec,
    cache_path,
    example_roles,
    finalize,
    open_cache,
)
from sage.teacher.groot import load_teacher
from sage.teacher.prompt import Role, role_of

REPO = Path(__file__).resolve().parents[1]
LIMIT = 6  # tasks: enough for several shards, fast on 2 CPU cores


def assert_close16(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to fp16 storage of features computed in fp32 in different batches."""
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=2e-3)


def make_cfg(cache_dir: Path, *extra: str):
    return load_config(
        None,
        [
            f"teacher.cache_dir={cache_dir}",
            "teacher.max_demos=2",  # shorter prompts keep the tests fast; the code path is the same
            "teacher.batch_size=2",
            "teacher.shard_entries=2",
            "run.device=cpu",
            *extra,
        ],
    )


def prompts(cfg, limit: int = LIMIT):
    """The prompts a training run of `cfg` reads from its first `limit` tasks (one per example)."""
    return prompts_for_dataset(cfg, *teacher_tasks(cfg.teacher, cfg.data, limit))


@pytest.fixture(scope="module")
def arc_tasks():
    return load_dataset("arc-agi-1/training")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, arc_tasks):
    """One uninterrupted extraction of the first LIMIT tasks, shared by the tests below."""
    cfg = make_cfg(tmp_path_factory.mktemp("single"))
    result = run_extraction(cfg.teacher, cfg.data, prompts(cfg), limit=LIMIT, progress=False, log=lambda _: None)
    return cfg, result


def test_extraction_end_to_end_and_reading(single_run, arc_tasks):
    cfg, result = single_run
    tasks = arc_tasks[:LIMIT]
    examples = prompts(cfg)
    n_prompts = len(examples)
    # One prompt per leave-one-out training example (held-out tasks: per test input), far more than
    # the tasks' test inputs.
    assert n_prompts > 2 * sum(len(t.test) for t in tasks)
    assert result.status["complete"] and result.computed == n_prompts == result.assigned
    cache = open_cache(cfg.teacher, "arc-agi-1/training", tasks, limit=LIMIT)
    assert len(cache) == n_prompts and cache.dim == 64 and not cache.leaks_answer
    manifest = json.loads((result.directory / "manifest.json").read_text())
    assert manifest["spec"]["identity"]["view"] == "task_context"
    assert manifest["spec"]["identity"]["teacher"]["weights"] == "random(seed=0)"
    assert manifest["stats"]["shards"] == -(-n_prompts // 2)  # shard_entries=2

    teacher = load_teacher(cfg.teacher, "cpu")
    direct = {f.key: f for f in teacher.features(examples[:3])}
    by_id = {t.id: t for t in tasks}
    for e in examples:
        n_train = len(by_id[e.task_id].train)
        pooled = cache.pooled(e.key)
        assert pooled.shape == (len(e.grids), 64) and pooled.dtype == torch.float16
        assert cache.roles(e.key) == e.roles
        entry = cache.entries[e.key]
        assert (entry["task"], entry["query"], tuple(entry["demos"])) == (e.task_id, e.query, e.demos)
        # The prompt ends with the query's input: its answer is never shown.
        assert e.roles[-1] == role_of(e.query, "input", n_train)
        assert role_of(e.query, "output", n_train) not in e.roles
        if e.key in direct:
            torch.testing.assert_close(pooled.float(), direct[e.key].pooled, rtol=2e-3, atol=2e-3)

    # Per-grid lookup in the student's slot order, with a mask for grids the teacher did not see.
    e = next(e for e in examples if len(by_id[e.task_id].train + by_id[e.task_id].test) >= 4)
    task = by_id[e.task_id]
    extra = next(i for i in range(len(task.train + task.test)) if i != e.query and i not in e.demos)
    roles = example_roles(demos=(*e.demos, extra), query=e.query, n_train=len(task.train))
    feats, mask = cache.lookup(e.key, roles)
    assert feats.shape == (7, 64)
    assert mask.tolist() == [True] * 4 + [False, False, True]  # the third demo is beyond teacher.max_demos=2
    assert torch.equal(feats[6], cache.pooled(e.key)[-1]) and not feats[4:6].any()

    # A second run finds everything stored and computes nothing.
    again = run_extraction(cfg.teacher, cfg.data, prompts(cfg), limit=LIMIT, progress=False, log=lambda _: None)
    assert again.computed == 0 and again.already_done == n_prompts and again.status["complete"]


def test_per_example_pooled_size_is_small(single_run):
    cfg, result = single_run
    manifest = json.loads((result.directory / "manifest.json").read_text())
    per_entry = manifest["stats"]["bytes"] / manifest["stats"]["entries"]
    # 64-d tiny features: at most 5 grids x 64 x 2 bytes = 640 B of data per prompt, plus header overhead.
    assert per_entry < 4096


def test_shards_k_of_n_and_merge_equal_a_single_run(tmp_path, single_run, arc_tasks):
    ref_cfg, _ = single_run
    cfg = make_cfg(tmp_path)
    tasks = arc_tasks[:LIMIT]
    first = run_extraction(cfg.teacher, cfg.data, prompts(cfg), part=0, parts=2, limit=LIMIT, progress=False, log=lambda _: None)
    assert not first.status["complete"]
    assert first.computed == sum(e.task_id in {t.id for t in tasks[0::2]} for e in prompts(cfg))
    with pytest.raises(FeatureCacheError, match="incomplete"):
        open_cache(cfg.teacher, "arc-agi-1/training", tasks, limit=LIMIT)
    second = run_extraction(cfg.teacher, cfg.data, prompts(cfg), part=1, parts=2, limit=LIMIT, progress=False, log=lambda _: None)
    assert second.status["complete"]  # the last part to finish writes the manifest
    assert merge(cfg.teacher, cfg.data, prompts(cfg), limit=LIMIT)["complete"]
    names = sorted(p.name for p in (second.directory / SHARDS).iterdir())
    assert names[0].startswith("part-000-of-002-") and names[-1].startswith("part-001-of-002-")

    sharded = open_cache(cfg.teacher, "arc-agi-1/training", tasks, limit=LIMIT)
    reference = open_cache(ref_cfg.teacher, "arc-agi-1/training", tasks, limit=LIMIT)
    assert sorted(sharded.keys()) == sorted(reference.keys())
    for key in reference.keys():
        assert_close16(sharded.pooled(key), reference.pooled(key))


@pytest.mark.slow
def test_torchrun_extraction_equals_a_single_run(tmp_path, single_run, arc_tasks):
    """Two processes under torchrun each extract their part; rank 0 reports the merged cache."""
    ref_cfg, _ = single_run
    settings = [f"teacher.cache_dir={tmp_path}", "teacher.max_demos=2", "teacher.batch_size=2",
                "teacher.shard_entries=2", "run.device=cpu"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "extract_groot_features.py"), "--limit", str(LIMIT), "--no-progress",
         *[a for s in settings for a in ("--set", s)]],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "part 0 of 2: computed" in result.stdout and "part 1 of 2: computed" in result.stdout
    assert "feature cache complete" in result.stdout
    tasks = arc_tasks[:LIMIT]
    sharded = open_cache(make_cfg(tmp_path).teacher, "arc-agi-1/training", tasks, limit=LIMIT)
    reference = open_cache(ref_cfg.teacher, "arc-agi-1/training", tasks, limit=LIMIT)
    assert sorted(sharded.keys()) == sorted(reference.keys())
    for key in reference.keys():
        assert_close16(sharded.pooled(key), reference.pooled(key))


def test_mismatched_cache_is_refused(single_run, arc_tasks):
    cfg, result = single_run
    tasks = arc_tasks[:LIMIT]
    for override, field in [
        ("teacher.seed=1", "teacher.weights"),
        ("teacher.max_demos=3", "prompt.max_demos"),
        ("teacher.feature_dtype=bfloat16", "features.dtype"),
    ]:
        other = make_cfg(Path(cfg.teacher.cache_dir), override)
        want = build_spec(other.teacher, "arc-agi-1/training", tasks)
        with pytest.raises(FeatureCacheError, match=rf"made for something else[\s\S]*{field}: cache has"):
            FeatureCache(result.directory, expected_spec=want)
        assert cache_path(other.teacher, "arc-agi-1/training", tasks, LIMIT) == result.directory  # same place, refused
        with pytest.raises(FeatureCacheError, match=field):  # extraction refuses to mix, too
            run_extraction(other.teacher, other.data, prompts(other), limit=LIMIT, progress=False, log=lambda _: None)
    # Same name, different content (one task changed): the dataset fingerprint differs.
    changed = list(tasks)
    changed[0] = changed[1].__class__(changed[0].id, changed[1].train, changed[1].test, changed[0].source)
    with pytest.raises(FeatureCacheError, match="dataset.fingerprint"):
        FeatureCache(result.directory, expected_spec=build_spec(cfg.teacher, "arc-agi-1/training", changed))
    with pytest.raises(FeatureCacheError, match="no feature cache here"):
        FeatureCache(result.directory.parent / "nothing")


def test_token_features_and_leaking_view(tmp_path, arc_tasks):
    cfg = make_cfg(tmp_path, "teacher.token_features=true", "teacher.view=with_answer")
    result = run_extraction(cfg.teacher, cfg.data, prompts(cfg, 2), limit=2, progress=False, log=lambda _: None)
    assert result.status["complete"] and result.directory.name.endswith("+tokens")
    cache = open_cache(cfg.teacher, "arc-agi-1/training", arc_tasks[:2], limit=2)
    e = prompts(cfg, 2)[0]
    n_train = len(arc_tasks[0].train)
    assert e.task_id == arc_tasks[0].id
    assert cache.leaks_answer and cache.roles(e.key)[-1] == role_of(e.query, "output", n_train)
    tokens, images = cache.tokens(e.key), cache.image_tokens(e.key)
    pooled = cache.pooled(e.key)
    assert images.shape == (pooled.shape[0], 256, 64) and tokens.shape[0] > 256 * pooled.shape[0]
    torch.testing.assert_close(images.float().mean(1), pooled.float(), rtol=1e-2, atol=1e-2)
    # The token probe's input: each image's 16x16 tokens pooled to 2x2 (quadrant means), in role order.
    roles = [role_of(e.query, "input", n_train), Role("train", 99, "input"), role_of(e.demos[0], "output", n_train)]
    quadrants, seen = cache.lookup_tokens(e.key, roles, side=2)
    assert quadrants.shape == (3, 4, 64) and seen.tolist() == [True, False, True]
    query = cache.roles(e.key).index(roles[0])
    top_left = images[query].float().reshape(16, 16, 64)[:8, :8].mean((0, 1))
    torch.testing.assert_close(quadrants[0, 0], top_left)
    assert quadrants[1].abs().sum() == 0
    torch.testing.assert_close(quadrants[0].mean(0), images[query].float().mean(0))
    with pytest.raises(FeatureCacheError, match="cannot pool 256 image tokens to 17x17"):
        cache.lookup_tokens(e.key, roles, side=17)
    with pytest.raises(FeatureCacheError, match="shows the teacher the answer"):
        open_cache(cfg.teacher, "arc-agi-1/training", arc_tasks[:2], limit=2, allow_leaking=False)


def test_real_tokenizer_prompt_lengths_in_the_cache(tmp_path, arc_tasks):
    tokenizer_dir = REPO.parent / "shared" / "groot_n15_tokenizer"
    if not (tokenizer_dir / "vocab.json").is_file():
        pytest.skip(f"GR00T N1.5 tokenizer data not found at {tokenizer_dir}")
    cfg = make_cfg(tmp_path, f"teacher.tokenizer_dir={tokenizer_dir}")
    result = run_extraction(cfg.teacher, cfg.data, prompts(cfg, 2), limit=2, progress=False, log=lambda _: None)
    manifest = json.loads((result.directory / "manifest.json").read_text())
    assert manifest["spec"]["identity"]["teacher"]["tokenizer"].startswith("sha256:")
    teacher = load_teacher(cfg.teacher, "cpu")
    n_instr = len(teacher.tokenizer.encode(teacher.instruction))
    for entry in manifest["entries"].values():
        n_images = len(entry["roles"])
        assert entry["n_tokens"] == 19 + 263 * n_images + n_instr
        assert entry["image_starts"] == [14 + 5 + 1 + 263 * k for k in range(n_images)]  # after "<image k><img>"
    # The built-in tokenizer's cache in the same place would be a different teacher: refused.
    builtin = make_cfg(tmp_path)
    with pytest.raises(FeatureCacheError, match="teacher.tokenizer: cache has"):
        run_extraction(builtin.teacher, builtin.data, prompts(builtin, 2), limit=2, progress=False, log=lambda _: None)


# ----------------------------------------------------------------------------- writer mechanics (no model)


def fake_entry(i: int, dim: int = 8, scale: float = 1.0) -> EntryFeatures:
    roles = (Role("train", 0, "input"), Role("train", 0, "output"), Role("test", 0, "input"))
    pooled = torch.full((3, dim), float(i) * scale)
    return EntryFeatures(f"task{i}/q1/d0", f"task{i}", 1, (0,), roles, pooled, n_tokens=10, image_starts=(1, 4, 7))


@pytest.fixture
def spec(arc_tasks, tmp_path):
    cfg = make_cfg(tmp_path)
    return build_spec(cfg.teacher, "arc-agi-1/training", arc_tasks[:5])


def test_writer_resumes_after_a_crash(tmp_path, spec):
    directory = tmp_path / "cache"
    writer = CacheWriter(directory, spec, shard_entries=2)
    for i in range(5):
        writer.add(fake_entry(i))  # flushes after entries 1 and 3; entry 4 stays in memory
    (directory / SHARDS / ".part-000-of-001-00002.tmp").write_bytes(b"half a shard")  # as a kill mid-write leaves it
    del writer  # "crash": the pending entry is lost, the two shards are whole

    resumed = CacheWriter(directory, spec, shard_entries=2)
    assert sorted(resumed.done) == ["task0/q1/d0", "task1/q1/d0", "task2/q1/d0", "task3/q1/d0"]
    assert not list((directory / SHARDS).glob(".*.tmp")) and resumed.next_seq == 2
    with pytest.raises(FeatureCacheError, match="task3/q1/d0 is already stored"):
        resumed.add(fake_entry(3))
    resumed.add(fake_entry(4))
    resumed.flush()
    status = finalize(directory, spec, [f"task{i}/q1/d0" for i in range(5)])
    assert status["complete"] and status["duplicates"] == 0
    cache = FeatureCache(directory, expected_spec=spec)
    assert [float(cache.pooled(f"task{i}/q1/d0")[0, 0]) for i in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_overlapping_parts_are_recorded_once(tmp_path, spec):
    directory = tmp_path / "cache"
    a = CacheWriter(directory, spec, part=0, parts=1, shard_entries=10)
    b = CacheWriter(directory, spec, part=1, parts=2, shard_entries=10)  # started before a wrote anything
    for i in range(3):
        a.add(fake_entry(i))
    b.add(fake_entry(2))
    a.flush(), b.flush()
    status = finalize(directory, spec, [f"task{i}/q1/d0" for i in range(3)])
    assert status["complete"] and status["duplicates"] == 1
    manifest = json.loads((directory / "manifest.json").read_text())
    assert sorted(manifest["entries"]) == ["task0/q1/d0", "task1/q1/d0", "task2/q1/d0"]


def test_incomplete_cache_and_foreign_shards_are_refused(tmp_path, spec, arc_tasks):
    directory = tmp_path / "cache"
    writer = CacheWriter(directory, spec, shard_entries=1)
    writer.add(fake_entry(0))
    assert not finalize(directory, spec, ["task0/q1/d0", "task1/q1/d0"])["complete"]
    with pytest.raises(FeatureCacheError, match="incomplete"):
        FeatureCache(directory)
    other = build_spec(make_cfg(tmp_path, "teacher.seed=5").teacher, "arc-agi-1/training", arc_tasks[:5])
    foreign = CacheWriter(tmp_path / "other", other, shard_entries=1)
    foreign.add(fake_entry(1))
    os.replace(foreign.shards_written[0], directory / SHARDS / "part-000-of-001-00099.safetensors")
    with pytest.raises(FeatureCacheError, match="written for another spec"):
        finalize(directory, spec, ["task0/q1/d0", "task1/q1/d0"])


def test_fp16_overflow_is_an_error(tmp_path, spec):
    writer = CacheWriter(tmp_path / "cache", spec)
    with pytest.raises(FeatureCacheError, match="overflow .*teacher.feature_dtype=bfloat16"):
        writer.add(fake_entry(1, scale=1e6))


# ----------------------------------------------------------------------------- kill and resume, for real


def test_killed_extraction_resumes_with_every_task_exactly_once(tmp_path, single_run, arc_tasks, capsys):
    """A real SIGKILL of extract_groot_features.py after its third one-prompt shard; the same command
    run again (in this process: main(), no second start-up) computes only the rest, each prompt once."""
    limit = LIMIT  # 24 prompts: the kill comes after 3
    args = [
        "--limit", str(limit), "--no-progress",
        "--set", f"teacher.cache_dir={tmp_path}", "--set", "teacher.max_demos=2",
        "--set", "teacher.batch_size=1", "--set", "teacher.shard_entries=1", "--set", "run.device=cpu",
    ]
    shard_dir = tmp_path / "groot-n1.5-tiny" / "task_context" / f"arc-agi-1_training-first{limit}" / SHARDS
    proc = subprocess.Popen([sys.executable, str(REPO / "extract_groot_features.py"), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if shard_dir.is_dir() and len(list(shard_dir.glob("part-*.safetensors"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"extraction ended before it could be killed:\n{proc.stdout.read().decode()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(shard_dir.glob("part-*.safetensors")))
    cfg = make_cfg(tmp_path)
    expected = sorted(e.key for e in prompts(cfg, limit))
    n_prompts = len(expected)
    assert 3 <= done_before < n_prompts
    assert not (shard_dir.parent / "manifest.json").is_file() or not json.loads(
        (shard_dir.parent / "manifest.json").read_text()
    )["complete"]

    capsys.readouterr()
    assert run_main(extract_groot_features.main, args) == 0
    rerun = capsys.readouterr()
    assert f"{done_before} already stored, {n_prompts - done_before} to compute" in rerun.out, rerun
    assert f"feature cache complete: {n_prompts} prompts" in rerun.out

    # Every prompt exactly once across all shards, and the manifest lists each once.
    stored = []
    from safetensors import safe_open

    for path in sorted(shard_dir.glob("part-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            stored += [json.loads(f.metadata()["entries"])[0]["key"]]
    assert sorted(stored) == expected
    cache = open_cache(cfg.teacher, "arc-agi-1/training", arc_tasks[:limit], limit=limit)
    assert sorted(cache.keys()) == expected
    # The interrupted-and-resumed features equal an uninterrupted run's.
    ref_cfg, _ = single_run
    reference = open_cache(ref_cfg.teacher, "arc-agi-1/training", arc_tasks[:LIMIT], limit=LIMIT)
    for key in reference.keys():
        assert_close16(cache.pooled(key), reference.pooled(key))
