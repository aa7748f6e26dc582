"""Config schema: defaults, overrides, and errors that name the file and key."""

import re
from pathlib import Path

import pytest
import yaml

from sage.config import load_config
from sage.encoding import LengthBucketSampler
from sage.errors import ConfigError
from sage.splits import load_splits, make_datasets

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
    assert (cfg.train.tokens_per_step, cfg.val.batch_size, cfg.train.epochs) == (32768, 4, 100)
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.weight_decay, cfg.train.grad_clip) == (1.6e-4, 1e-6, 0.01, 1.0)
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
        ("", ["run.precision=fp8"], r"run\.precision must be one of auto, bf16, fp16, fp32, got 'fp8'"),
        ("", ["model.demo_views=true"], r"'model\.demo_views' was removed after commit 702e718"),
        ("", ["data.demonstrations_of=holdout*0"], r"expected <tasks> or <tasks>\*<times> with times >= 1"),
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


def test_a_saved_config_with_removed_options_loads_as_it_behaved_or_is_refused():
    """A checkpoint written before an option was removed (sage.config.REMOVED_KEYS) still loads: a
    removed key at its old default is dropped silently, data.demonstrations_repeat becomes the "*k"
    of data.demonstrations_of, another ttt value is dropped with a note, and a model that needs a
    removed option is refused with the commit that can still build it."""
    from sage.config import REMOVED_KEYS, ExperimentConfig, from_dict, without_removed_keys

    saved = ExperimentConfig().to_dict()
    for key, default in REMOVED_KEYS.items():
        section, name = key.split(".")
        saved[section][name] = default
    with pytest.raises(ConfigError, match="'data.demonstrations_repeat' was removed after commit 702e718"):
        from_dict(ExperimentConfig, saved, "meta.json")
    cleaned, notes = without_removed_keys(saved, "meta.json")
    assert from_dict(ExperimentConfig, cleaned, "meta.json") == ExperimentConfig() and notes == []
    assert "demo_views" in saved["model"]  # the saved record itself is left as it was

    saved["data"].update(demonstrations_of="holdout", demonstrations_repeat=8)
    saved["ttt"]["seconds"] = 55.0
    cleaned, notes = without_removed_keys(saved, "meta.json")
    assert from_dict(ExperimentConfig, cleaned, "meta.json").data.demonstrations_of == "holdout*8"
    assert notes == ["meta.json: saved ttt.seconds=55.0 ignored (option removed after commit 702e718)"]

    saved["model"]["demo_views"] = True
    with pytest.raises(ConfigError, match="trained with model.demo_views=True, an option removed after commit "
                                          "702e718; check out that commit"):
        without_removed_keys(saved, "meta.json")


# Keys no shipped config sets, and why each stays (issue #40: a knob stays only if a config uses it,
# a documented protocol needs it, or a benchmark in README compares it). Adding a key to the schema
# means using it in configs/ or saying here why not.
KEYS_NO_CONFIG_SETS = {
    "run.name": "named by the config file's stem, or --set run.name for a second run of one config",
    "run.checkpoint_dir": "where outputs go: tests and users redirect them",
    "run.log_dir": "where outputs go: tests and users redirect them",
    "run.collective_timeout_s": "torchrun's failure detection (docs/training.md, torchrun)",
    "data.demonstrations_of": "the HRM/TRM protocol, an explicit option (DESIGN 2.1; docs/training.md)",
    "train.compile": "compared by benchmarks/gpu_check.sh's compile stage (README's GPU table)",
    "train.max_nonfinite_steps": "when a run with NaN/inf losses stops (docs/training.md, when things go wrong)",
    "checkpoint.last_every_epochs": "thins checkpoint writes where an epoch takes seconds (docs/training.md)",
    "teacher.seed": "the tiny random-weight teacher's weights: another seed, another cache (tests)",
    "teacher.allow_answer_view": "privileged-information experiments must say so (DESIGN 2.2; docs/teacher.md)",
    "teacher.dataset": "extract_groot_features.py for the evaluation split (docs/evaluation.md)",
    "teacher.augmented_views": "distillation targets for augmented examples (the config check asks for it)",
    "teacher.shard_entries": "the feature cache's unit of resumption (docs/teacher.md)",
    "logging.tensorboard": "an optional metric sink (docs/training.md)",
    "logging.curves_every_epochs": "thins curve drawing where an epoch takes seconds (docs/training.md)",
    "logging.wandb": "an optional metric sink (docs/training.md)",
    "logging.wandb_project": "an optional metric sink (docs/training.md)",
    "logging.wandb_mode": "an optional metric sink (docs/training.md)",
    "ttt.runs": "several TTT runs per task, the best-fitting one answers "
                "(docs/results/ttt.md; benchmarks/early_choice.py)",
}


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    return [key for f in dataclasses.fields(cls) for key in (
        schema_keys(hints[f.name], prefix + f.name + ".") if dataclasses.is_dataclass(hints[f.name])
        else [prefix + f.name])]


def config_keys(raw: dict, prefix: str = "") -> set[str]:
    return {key for k, v in raw.items()
            for key in (config_keys(v, prefix + k + ".") if isinstance(v, dict) else {prefix + k})}


def test_every_config_key_is_used_by_a_shipped_config_or_says_why_it_stays():
    from sage.config import ExperimentConfig

    used = set().union(*(config_keys(yaml.safe_load(p.read_text())) for p in (REPO / "configs").glob("*.yaml")))
    schema = set(schema_keys(ExperimentConfig))
    unused = schema - used
    assert unused - set(KEYS_NO_CONFIG_SETS) == set(), "keys no config uses: use them in configs/ or remove them"
    assert set(KEYS_NO_CONFIG_SETS) - unused == set(), "allow-listed keys a config now uses (or gone): drop them"
    assert used <= schema  # (loading refuses unknown keys; here as a reminder)
