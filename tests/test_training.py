"""The training loop end to end on small real configs: artefacts, exact resume, CLI errors, learning."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sage.checkpoint import CheckpointError
from sage.config import load_config
from sage.runlog import read_metrics
from sage.training import lr_at, train

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "data.train=synthetic", "data.synthetic.num_tasks=60", "data.synthetic.max_side=5", "data.val_fraction=0.2",
    "data.max_context_tokens=108", "model.grid_size=5", "model.max_demos=3", "model.d_model=32", "model.n_heads=2",
    "model.encoder_layers=1", "model.decoder_layers=1", "model.teacher_dim=16", "model.distill_hidden=16",
    "train.epochs=2", "train.batch_size=8", "train.warmup_steps=3", "train.log_every=2", "train.lr=1e-3",
    "val.batch_size=16", "checkpoint.every_epochs=1", "run.device=cpu",
]


def tiny_config(tmp_path, name, *extra):
    overrides = TINY + [f"run.checkpoint_dir={tmp_path / 'checkpoints'}", f"run.log_dir={tmp_path / 'logs'}",
                        f"run.name={name}", *extra]
    return load_config(REPO / "configs" / "smoke.yaml", overrides)


def epoch_records(log_dir):
    return [{k: v for k, v in r.items() if k not in ("time", "seconds")}
            for r in read_metrics(Path(log_dir) / "metrics.jsonl") if r["event"] == "epoch"]


def test_short_run_writes_artefacts_and_resume_is_exact(tmp_path):
    straight = train(tiny_config(tmp_path, "straight"), echo=False)
    run = tmp_path / "checkpoints" / "straight"
    logs = tmp_path / "logs" / "straight"
    for name in ("best", "last", "epoch_1", "epoch_2"):
        assert {p.name for p in (run / name).iterdir()} == {"model.safetensors", "training_state.pt", "meta.json"}
    for name in ("train.log", "metrics.jsonl", "config.yaml", "curves.png"):
        assert (logs / name).is_file()
    log_text = (logs / "train.log").read_text()
    assert "epoch 2/2 done | train loss" in log_text and "val loss" in log_text and "lr " in log_text
    events = {r["event"] for r in read_metrics(logs / "metrics.jsonl")}
    assert events == {"start", "train", "epoch"}
    meta = json.loads((run / "last" / "meta.json").read_text())
    assert meta["train_state"]["step"] == straight["step"] and meta["config"]["run"]["name"] == "straight"
    assert set(meta["val_metrics"]) >= {"loss", "exact_match", "size_accuracy", "pixel_accuracy"}

    steps_per_epoch = straight["step"] // 2
    interrupted = train(tiny_config(tmp_path, "resumed"), stop_after_steps=steps_per_epoch // 2, echo=False)
    assert interrupted["stopped_early"] and interrupted["step"] == steps_per_epoch // 2
    resumed = train(tiny_config(tmp_path, "resumed"), resume=True, echo=False)
    assert resumed["step"] == straight["step"]
    assert epoch_records(tmp_path / "logs" / "resumed") == epoch_records(logs)
    a = load_file(run / "last" / "model.safetensors")
    b = load_file(tmp_path / "checkpoints" / "resumed" / "last" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert "resumed from" in (tmp_path / "logs" / "resumed" / "train.log").read_text()


def test_existing_run_needs_resume_and_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        train(tiny_config(tmp_path, "fresh"), resume=True, echo=False)
    train(tiny_config(tmp_path, "fresh", "train.epochs=1"), echo=False)
    with pytest.raises(CheckpointError, match="already has checkpoints. Continue it with --resume"):
        train(tiny_config(tmp_path, "fresh", "train.epochs=1"), echo=False)
    with pytest.raises(CheckpointError, match="model config differs from the checkpoint's"):
        train(tiny_config(tmp_path, "fresh", "model.d_model=64"), resume=True, echo=False)


def test_cli_reports_expected_mistakes_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 4\n")
    out = subprocess.run([sys.executable, "train_sage.py", "--config", str(bad)], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 2
    assert "error:" in out.stderr and "unknown key 'train.batch_sise'" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "train_sage.py", "--config", "configs/smoke.yaml",
                          "--set", f"data.train={tmp_path / 'missing'}"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "no such directory" in out.stderr and "Traceback" not in out.stderr


def test_learning_rate_warms_up_then_decays_to_the_floor(tmp_path):
    cfg = tiny_config(tmp_path, "lr", "train.warmup_steps=10", "train.lr=1e-3", "train.min_lr=1e-5")
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05)
