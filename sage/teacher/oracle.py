"""The oracle teacher (`teacher.preset: oracle`): a teacher whose knowledge is known.

It stands in for GR00T on synthetic tasks (sage/synthetic.py) to show that distillation moves a
teacher's knowledge into the student. Its feature for every grid of a prompt is the task's hidden
rule, which it is told, never reads from the grids:

    feature = code(rule) @ P + noise * N(0, 1)

`code` is the rule's one-hot dihedral transform and colour table (sage.synthetic.Rule.code), `P` a
fixed Gaussian projection to ORACLE_FEATURE_DIM dims scaled so that each dimension of the signal
has unit variance, and the noise is drawn per prompt and grid (teacher.noise, in those units).
It has the extraction interface of sage.teacher.groot.Teacher, so its features go through the
same cache (manifest, shards, spec checks) and the same training path as GR00T's.
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np
import torch

from sage.arc import NUM_COLOURS, fixed_view
from sage.errors import TeacherError
from sage.synthetic import RULE_CODE_DIM, Rule, generate_tasks_and_rules
from sage.teacher.presets import ORACLE_FEATURE_DIM, ORACLE_PRESET
from sage.teacher.prompt import EntryFeatures, TeacherExample
from sage.teacher.settings import TeacherConfig

# One 1 in the dihedral part of a rule's code and one in each of its colour-table rows.
_ONES_PER_CODE = 1 + NUM_COLOURS


class OracleTeacher:
    """Per-grid features that encode each task's hidden rule (module docstring)."""

    load_report = None
    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, rules: dict[str, Rule], noise: float = 0.0, seed: int = 0) -> None:
        self.rules, self.noise, self.seed = rules, noise, seed
        rng = np.random.default_rng([seed, 0x0AC1E])
        self.projection = rng.standard_normal((RULE_CODE_DIM, ORACLE_FEATURE_DIM)) / np.sqrt(_ONES_PER_CODE)

    def rule_vector(self, rule: Rule) -> np.ndarray:
        """[ORACLE_FEATURE_DIM]: the noiseless feature of every grid of a task with this rule."""
        return rule.code() @ self.projection

    def features(self, examples: Sequence[TeacherExample], token_features: bool = False) -> list[EntryFeatures]:
        if token_features:
            raise TeacherError("the oracle teacher has no image tokens: set teacher.token_features=false")
        out = []
        for example in examples:
            rule = self.rules.get(example.task_id)
            if rule is None:
                raise TeacherError(f"oracle teacher: task '{example.task_id}' is not one of the generated synthetic "
                                   "tasks whose rules it knows (data.synthetic must describe the dataset)")
            if example.augmented_view:  # the same task seen through the view's augmentation
                rule = rule.under(fixed_view(example.task_id, example.augmented_view))
            for role, grid, nxt in zip(example.roles, example.grids, example.grids[1:]):
                if role.side == "input" and not np.array_equal(rule.apply(grid), nxt):
                    raise TeacherError(f"oracle teacher: task '{example.task_id}', {role}: its output does not follow "
                                       "the rule the generator drew; the dataset is not the one data.synthetic makes")
            n = len(example.grids)
            noise = np.random.default_rng([self.seed, zlib.crc32(example.key.encode())]).standard_normal(
                (n, ORACLE_FEATURE_DIM))
            pooled = self.rule_vector(rule)[None, :] + self.noise * noise
            out.append(EntryFeatures(key=example.key, task_id=example.task_id, query=example.query,
                                     demos=example.demos, roles=example.roles,
                                     pooled=torch.from_numpy(pooled.astype(np.float32))))
        return out


def load_oracle(teacher: TeacherConfig, dataset: str, synthetic_options: dict[str, Any]) -> OracleTeacher:
    """The oracle for `dataset`, which must be the generated synthetic tasks (their rules are known)."""
    if dataset != "synthetic":
        raise TeacherError(f"teacher.preset {ORACLE_PRESET} knows the hidden rules of generated tasks only: the "
                           f"dataset must be 'synthetic' (data.train / teacher.dataset), got {dataset!r}")
    rules = {task.id: rule for task, rule in generate_tasks_and_rules(**synthetic_options)}
    return OracleTeacher(rules, teacher.noise, teacher.seed)
