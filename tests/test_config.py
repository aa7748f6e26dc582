"""Config schema: defaults, overrides, and errors that name the file and key."""

import re
from pathlib import Path

import pytest
import yaml

from sage.config import load_config
from sage.encoding import LengthBucketSampler
from sage.errors import ConfigError
from sage.training import load_splits, make_datasets

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.run.name == name


def test_full_recipe_matches_the_documented_values():
    cfg = load_config(REPO / "configs" / "sage_44m.yaml")
    assert (cfg.train.batch_size, cfg.val.batch_size, cfg.train.epochs) == (8, 4, 100)
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.weight_decay, cfg.train.grad_clip) == (1e-4, 1e-6, 0.01, 1.0)
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.encoder_layers) == (512, 8, 6)
    assert (cfg.teacher.preset, cfg.distill.weight, cfg.model.teacher_dim) == ("groot-n1.5", 0.5, 2048)


def test_overrides_and_run_name(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n")
    cfg = load_config(path, ["train.batch_size=2", "run.name=other", "data.augment=false", "train.lr=3e-4"])
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 2 and cfg.data.augment is False
    assert cfg.run.name == "other" and cfg.train.lr == pytest.approx(3e-4)
    assert load_config(path).run.name == "exp"


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("train:\n  batch_sise: 4\n", [], r"exp\.yaml: unknown key 'train\.batch_sise' \(known keys here: .*batch_size"),
        ("trian:\n  epochs: 1\n", [], r"unknown key 'trian'"),
        ("train:\n  epochs: many\n", [], r"'train\.epochs' must be an integer, got 'many'"),
        ("train:\n  epochs: 2.5\n", [], r"'train\.epochs' must be an integer"),
        ("train:\n  lr: fast\n", [], r"'train\.lr' must be a number"),
        ("data:\n  augment: 1\n", [], r"'data\.augment' must be true or false"),
        ("train:\n  betas: 0.9\n", [], r"'train\.betas' must be a list"),
        ("train: 5\n", [], r"'train' must be a mapping"),
        ("- a\n- b\n", [], r"the top level must be a mapping"),
        ("train: [unclosed\n", [], r"not valid YAML"),
        ("", ["train.epochz=3"], r"unknown key 'train\.epochz'"),
        ("", ["train.epochs"], r"expected key\.path=value"),
        ("", ["model.n_heads=5"], r"model\.d_model \(512\) must be divisible by model\.n_heads \(5\)"),
        ("", ["data.max_context_tokens=100"], r"data\.max_context_tokens must be >= 2883"),
        ("", ["train.batch_size=0"], r"train\.batch_size must be >= 1"),
        ("", ["train.min_lr=1.0"], r"train\.min_lr <= train\.lr"),
        ("", ["run.name=a/b"], r"run\.name must be a plain name"),
        ("", ["run.precision=fp16"], r"run\.precision must be one of auto, bf16, fp32, got 'fp16'"),
        ("", ["model.kind=probe", "distill.weight=0", "model.demo_views=true"], r"model\.demo_views is the student's"),
        ("", ["model.view_agreement=true"], r"model\.view_agreement starts the task token: set model\.task_slot=true"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path, text, overrides, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path, overrides)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["train.epochs=7"])
    path = write(tmp_path, yaml.safe_dump(cfg.to_dict()), "resolved.yaml")
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict()


def test_docs_config_md_is_the_schema_as_generated():
    """docs/config.md is generated from the schema's dataclasses and their comments; regenerate it
    after changing a key, a default or its comment."""
    from sage.config_reference import COMMAND, reference

    assert (REPO / "docs" / "config.md").read_text() == reference(), f"docs/config.md is stale: run `{COMMAND}`"


def test_every_config_key_is_documented_with_its_default():
    import dataclasses

    from sage.config_reference import field_comments, sections

    undocumented = [f"{name}.{f.name}" for name, cls in sections() for f in dataclasses.fields(cls)
                    if not dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING
                                                    else f.default)
                    and not field_comments(cls).get(f.name)]
    assert not undocumented, f"keys without a comment in the schema (the config reference): {undocumented}"
    text = (REPO / "docs" / "config.md").read_text()
    assert "| `train.warmup_steps` | `int` | `500` |" in text and "| `teacher.view` | `str` | `task_context` |" in text


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")
                                          if "steps/epoch" in p.read_text()))
def test_steps_per_epoch_stated_in_a_config_are_the_runs(config):
    """A config's header that promises N steps/epoch is what train_sage.py runs (data only, no model)."""
    stated = int(re.search(r"(\d+) steps/epoch", (REPO / "configs" / config).read_text()).group(1))
    cfg = load_config(REPO / "configs" / config, [])
    train_set, _ = make_datasets(cfg, load_splits(cfg))
    sampler = LengthBucketSampler(train_set.lengths, cfg.train.batch_size, shuffle=True, seed=cfg.run.seed,
                                  sides=train_set.sides)
    assert len(sampler) == stated
