"""Training throughput of two or more variants of one config, in one run on this machine: by default
the fixed 30x30 answer canvas against canvases sized per example (model.answer_canvas: fixed vs batch).

    python -m benchmarks.compare                                      # sage-44m (configs/sage_44m.yaml)
    python -m benchmarks.compare --config configs/quickstart.yaml --steps 20
    python -m benchmarks.compare --config configs/quickstart.yaml --arm train.compile=false --arm train.compile=true

Every arm runs benchmarks.bench's training section (sage.step.train_step on real ARC-AGI-1
training batches, random init) with the same config plus its override, on the same batches of the
same examples: epoch 0's batches as the last arm's sampler draws them (with the default arms: grouped
by canvas side, as training with per-example canvases draws them). So the ratio compares the arms'
work on identical inputs, not two draws of batches whose context lengths differ several-fold.
Printed: examples/s of each arm and its ratio to the first, and the useful-cell fraction (answer
cells that carry a loss / answer cells computed). `--epoch-flops` also counts each arm's forward
FLOPs over the whole of epoch 0 (torch.utils.flop_counter on meta tensors: shapes only, no
arithmetic, a few minutes for sage-44m): the ratio the timed steps sample, free of timing noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench import REPO, Data, build_data, epoch_batches, train_section
from sage.config import ExperimentConfig, load_config
from sage.device import resolve_device
from sage.encoding import PAD, collate
from sage.model import build_model

DEFAULT_ARMS = ["model.answer_canvas=fixed", "model.answer_canvas=batch"]


def epoch_forward_flops(cfg: ExperimentConfig, data: Data, batches: list[list[int]],
                        log: Callable[[str], None]) -> dict[str, float]:
    """Forward FLOPs of the model over `batches` of the training set, counted on meta tensors
    (FlopCounterMode reads shapes; nothing is computed), split into the encoder, the decoder's
    keys and values of the context (every decoder layer projects the whole context: work that no
    answer canvas can save) and the rest; and the useful-cell fraction over the batches."""
    with torch.device("meta"):
        model = build_model(cfg.model)
    name = type(model).__name__
    decoder_context = [f"{name}.decoder.{i}.cross_attn.kv" for i in range(cfg.model.decoder_layers)]
    parts = dict.fromkeys(["encoder", "decoder_context_keys_values", "decoder_rest", "heads"], 0)
    flops = cells = loss_cells = 0
    for i, indices in enumerate(batches):
        batch = collate([data.train_set[j] for j in indices])
        cells += batch["query"].numel()
        loss_cells += int((batch["target"] != PAD).sum())
        with FlopCounterMode(display=False) as counter:
            model({k: v.to("meta") for k, v in batch.items()})
        counts = {module: sum(ops.values()) for module, ops in counter.get_flop_counts().items()}
        total = counter.get_total_flops()
        encoder = sum(counts.get(f"{name}.encoder.{j}", 0) for j in range(cfg.model.encoder_layers))
        decoder = sum(counts.get(f"{name}.decoder.{j}", 0) for j in range(cfg.model.decoder_layers))
        context = sum(counts.get(m, 0) for m in decoder_context)
        parts["encoder"] += encoder
        parts["decoder_context_keys_values"] += context
        parts["decoder_rest"] += decoder - context
        parts["heads"] += total - encoder - decoder
        flops += total
        if (i + 1) % 50 == 0:
            log(f"epoch FLOPs: {i + 1}/{len(batches)} batches")
    return {"batches": len(batches), "forward_flops": flops, "forward_flops_by_part": parts,
            "answer_cells_with_loss_share": loss_cells / cells}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/sage_44m.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="applied to every arm")
    parser.add_argument("--arm", dest="arms", action="append", default=None, metavar="KEY=VALUE",
                        help="one variant (repeat for each; default: " + " vs ".join(DEFAULT_ARMS) + ")")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per arm")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per arm (>= 1; more for train.compile)")
    parser.add_argument("--epoch-flops", action="store_true",
                        help="also count each arm's forward FLOPs over all of epoch 0 (meta tensors)")
    parser.add_argument("--json", default=None, help="output JSON (default benchmarks/results/compare-<config>.json)")
    args = parser.parse_args(argv)
    arm_overrides = args.arms or DEFAULT_ARMS
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    configs = [load_config(args.config, [*args.overrides, arm]) for arm in arm_overrides]
    data = [build_data(cfg) for cfg in configs]
    sizes = {len(d.train_set) for d in data}
    if len(sizes) > 1:
        raise SystemExit(f"error: the arms build different training sets ({sorted(sizes)} examples), so they "
                         "cannot run on the same batches; compare arms that change the model or the training step")
    batches = epoch_batches(configs[-1], data[-1])  # the same example indices for every arm
    arms = {}
    for arm, cfg, arm_data in zip(arm_overrides, configs, data):
        log(f"{arm}: {args.warmup} warm-up + {args.steps} timed steps of {args.config} (shared batches)")
        arms[arm] = train_section(cfg, resolve_device(cfg.run.device), arm_data, args.steps, args.warmup, log, batches)
        if args.epoch_flops:
            log(f"{arm}: counting forward FLOPs over epoch 0 ({len(batches)} batches, meta tensors)")
            arms[arm]["epoch"] = epoch_forward_flops(cfg, arm_data, batches, log)
    first = arms[arm_overrides[0]]
    print(f"training throughput: {args.config} {' '.join(args.overrides)} "
          f"({args.steps} timed steps per arm, the same batches of the same examples in every arm)")
    for name, arm in arms.items():
        arm["ratio_to_first"] = arm["examples_per_second"] / first["examples_per_second"]
        print(f"  {name:<32} {arm['examples_per_second']:8.2f} examples/s ({arm['ratio_to_first']:.2f}x)   "
              f"useful cells {arm['answer_cells_with_loss_share']:6.1%}   step {arm['step_seconds_mean']:.2f} s")
    if args.epoch_flops:
        print(f"whole epoch 0 ({len(batches)} batches), forward FLOPs counted on meta tensors:")
        for name, arm in arms.items():
            epoch = arm["epoch"]
            epoch["flops_ratio_first_to_this"] = first["epoch"]["forward_flops"] / epoch["forward_flops"]
            print(f"  {name:<32} {epoch['forward_flops'] / 1e12:8.1f} TFLOP (first arm / this: "
                  f"{epoch['flops_ratio_first_to_this']:.2f}x)   useful cells {epoch['answer_cells_with_loss_share']:6.1%}")
            shares = "  ".join(f"{part} {n / epoch['forward_flops']:.1%}" for part, n in epoch["forward_flops_by_part"].items())
            print(f"  {'':<32} {shares}")
    path = Path(args.json) if args.json else REPO / "benchmarks" / "results" / f"compare-{Path(args.config).stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "arms": arms},
                               indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
