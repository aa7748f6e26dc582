"""Where does a synthetic run's knowledge stop? Held-out exact match per rule family, and how well
the distillation head states each family's rule (its cosine to the oracle's feature).

    python -m benchmarks.rule_families --checkpoint checkpoints/kd_oracle-distill.weight=1-s0/last [more ...]

For each checkpoint of a run on synthetic tasks: its held-out validation tasks (the run's own split),
scored as validation scores them (one forward pass, argmax decoding), grouped by the family in the
task id (flip_lr, colour_swap, ...). "rule cosine" is the cosine between what the student's
distillation head says about the test input's grid (or, with model.task_slot, about the task) and
the oracle teacher's feature of the task's rule, in the standardised units the head is trained in:
1 means the student states the rule exactly, about 0 that it states nothing about it. It is shown
for runs that distilled from the oracle (for the others the head was never trained). A probe
(model.kind: probe) reads the oracle's features: its row is what knowing the rule exactly buys.
"""

from __future__ import annotations

import argparse
import collections
from typing import Any

import torch

from sage.distill import ensure_teacher_cache, teacher_targets
from sage.encoding import collate
from sage.losses import distillation_slots
from sage.predict import load_model
from sage.step import score_batch
from sage.teacher.presets import ORACLE_PRESET
from sage.splits import load_splits, make_datasets


def family_scores(checkpoint: str, batch_size: int = 64) -> dict[str, dict[str, Any]]:
    loaded = load_model(checkpoint, torch.device("cpu"))
    cfg, model = loaded.cfg, loaded.model
    if cfg.data.train != "synthetic":
        raise SystemExit(f"{checkpoint}: trained on {cfg.data.train!r}; rule families exist for synthetic tasks only")
    splits = load_splits(cfg)
    distilled = cfg.distills and cfg.teacher.preset == ORACLE_PRESET
    targets = None
    if cfg.uses_teacher:  # a probe reads the features; a distilled head is compared with them
        cache = ensure_teacher_cache(cfg, cfg.data.train, splits.train_dataset, lambda _: None)
        targets = teacher_targets(cache, cfg.model)
    _, val_set = make_datasets(cfg, splits, None, targets)
    query_slot = 2 * cfg.model.max_demos
    sums: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with torch.inference_mode():
        for start in range(0, len(val_set), batch_size):
            items = [val_set[i] for i in range(start, min(start + batch_size, len(val_set)))]
            batch = collate(items)
            out = model(batch)
            scores = score_batch(out.logits, batch, cfg.model.grid_size)
            cosines = None
            if distilled:
                standardised = model.standardise(batch["teacher_features"])
                if cfg.model.task_slot and cfg.distill.slots != "grids":
                    predicted, target, _ = distillation_slots(out.grid_features, standardised,
                                                              batch["teacher_mask"] & out.grid_mask,
                                                              out.task_features, "task")
                    predicted, target = predicted[:, 0], target[:, 0]
                else:
                    predicted, target = out.grid_features[:, query_slot], standardised[:, query_slot]
                cosines = torch.nn.functional.cosine_similarity(predicted.float(), target, dim=-1, eps=1e-6)
            for b, (item, score) in enumerate(zip(items, scores)):
                task = val_set.tasks[val_set.refs[int(item["index"])].task_index]
                family = sums[task.id.rsplit("-", 1)[1]]
                family["n"] += 1
                family["exact"] += score.exact
                if cosines is not None:
                    family["cosine"] += float(cosines[b])
    return {name: {"n": c["n"], "exact": c["exact"] / c["n"],
                   "rule_cosine": c["cosine"] / c["n"] if distilled else None}
            for name, c in sorted(sums.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--checkpoint", nargs="+", required=True, help="checkpoint directories of synthetic runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    results = {path: family_scores(path) for path in args.checkpoint}
    families = sorted({f for r in results.values() for f in r})
    print("| checkpoint | " + " | ".join(families) + " |")
    print("|---|" + "---|" * len(families))
    for path, result in results.items():
        cells = []
        for f in families:
            r = result.get(f)
            if r is None:
                cells.append("-")
                continue
            cosine = "" if r["rule_cosine"] is None else f" (rule cos {r['rule_cosine']:.2f})"
            cells.append(f"{r['exact']:.2f} of {r['n']}{cosine}")
        print(f"| `{path}` | " + " | ".join(cells) + " |")
    print("cells: held-out exact match of N test outputs of the family (and the head's rule cosine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
