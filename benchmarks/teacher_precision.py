"""The teacher's features in fp16 (or bf16) against fp32, prompt by prompt: on GPUs without native
bf16 `teacher.dtype: auto` runs GR00T in fp16, and its features must be fp32's.

    python -m benchmarks.teacher_precision                          # the tiny backbone on the CPU
    python -m benchmarks.teacher_precision --preset groot-n1.5 --device cuda \
        --tokenizer-dir ../shared/groot_n15_tokenizer               # full size, random weights
    ... --checkpoint-dir ~/models/GR00T-N1.5-3B                     # the real weights

The same weights (random, or --checkpoint-dir's) are built in fp32 and in --dtype, and both extract
the evaluation prompts of --tasks ARC-AGI-1 evaluation tasks (spread by size). Per prompt: the lowest
cosine between a grid's pooled feature in --dtype and in fp32, and the largest absolute difference.
Per layer of SigLIP and Qwen3: the largest activation of the fp32 run (fp16 overflows beyond 65,504)
and whether the --dtype run's output stayed finite; a layer that overflows is named, to be kept in
fp32. Random weights cannot show the activation outliers trained weights have: run it on the real
checkpoint before trusting fp16 with it. On a CPU without fp16 hardware fp16 matmuls are emulated
(this project's AMD EPYC: 0.4 GFLOP/s against 179 in fp32): the full-size backbone needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sage.arc import tasks_up_to_side  # noqa: E402
from sage.datasets import load_dataset  # noqa: E402
from sage.device import resolve_device  # noqa: E402
from sage.speed import speed_sample  # noqa: E402
from sage.teacher.backbone import build_backbone  # noqa: E402
from sage.teacher.groot import Teacher  # noqa: E402
from sage.teacher.presets import get_preset  # noqa: E402
from sage.teacher.prompt import evaluation_prompts, instruction_for  # noqa: E402
from sage.teacher.tokenizer import load_tokenizer  # noqa: E402

FP16_MAX = 65504.0
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="groot-n1.5-tiny", help="groot-n1.5-tiny (default) or groot-n1.5")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="compared with fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", type=int, default=3, help="ARC-AGI-1 evaluation tasks, spread by size")
    parser.add_argument("--max-grid-side", type=int, default=10)
    parser.add_argument("--view", default="task_context", help="the prompts' teacher.view (default task_context)")
    parser.add_argument("--checkpoint-dir", default=None, help="GR00T N1.5 weights (default: random weights)")
    parser.add_argument("--tokenizer-dir", default=None, help="GR00T's tokenizer (the tiny preset has its own)")
    parser.add_argument("--json", default=None, help="where to write the figures")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    arch = get_preset(args.preset)
    tasks = speed_sample(tasks_up_to_side(load_dataset("arc-agi-1/evaluation"), args.max_grid_side), args.tasks)
    prompts = evaluation_prompts(tasks, args.view, max_demos=10)
    # Without --tokenizer-dir the built-in one (the tiny preset's: the same special tokens, a smaller
    # vocabulary for the instruction text): enough to compare dtypes, not for real features.
    tokenizer = load_tokenizer(args.tokenizer_dir, allow_builtin=True)
    runs = {name: run_backbone(arch, device, dtype, args.checkpoint_dir, tokenizer, args.view, prompts)
            for name, dtype in (("float32", torch.float32), (args.dtype, DTYPES[args.dtype]))}
    report = compare(runs["float32"], runs[args.dtype], prompts)
    report.update(preset=args.preset, dtype=args.dtype, device=str(device), tasks=[t.id for t in tasks],
                  weights=args.checkpoint_dir or "random (seed 0)", tokenizer=args.tokenizer_dir or "built-in")
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def run_backbone(arch: Any, device: torch.device, dtype: torch.dtype, checkpoint_dir: str | None, tokenizer: Any,
                 view: str, prompts: list) -> dict[str, Any]:
    """Every prompt's pooled features [grids, dim] in fp32 on the CPU, and each layer's largest
    absolute output and whether all of it was finite, over all prompts."""
    model = build_backbone(arch, device, dtype, checkpoint_dir)[0]
    teacher = Teacher(arch, model, tokenizer, instruction_for(view), device)
    layers: dict[str, dict[str, Any]] = {}

    def watch(name: str):  # noqa: ANN202 - a forward hook
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            out = (output[0] if isinstance(output, tuple) else output).detach()
            seen = layers.setdefault(name, {"max_abs": 0.0, "finite": True})
            seen["finite"] &= bool(torch.isfinite(out).all())
            seen["max_abs"] = max(seen["max_abs"], float(out.float().abs().nan_to_num(posinf=float("inf")).max()))
        return hook

    handles = [module.register_forward_hook(watch(name)) for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1].isdigit() and ("encoder.layers." in name or "language_model.layers." in name)]
    try:
        features = [entry.pooled.float() for p in prompts for entry in teacher.features([p])]
    finally:
        for handle in handles:
            handle.remove()
    return {"features": features, "layers": layers}


def compare(reference: dict[str, Any], other: dict[str, Any], prompts: list) -> dict[str, Any]:
    rows = []
    for prompt, a, b in zip(prompts, reference["features"], other["features"]):
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        rows.append({"prompt": prompt.key, "grids": len(a), "min_cosine": float(cosine.min()),
                     "max_abs_difference": float((a - b).abs().max()), "fp32_max_abs": float(a.abs().max())})
    layers = {name: {"fp32_max_abs": seen["max_abs"], "finite": other["layers"][name]["finite"]}
              for name, seen in reference["layers"].items()}
    overflowing = [name for name, layer in layers.items() if not layer["finite"] or layer["fp32_max_abs"] > FP16_MAX]
    return {"prompts": rows, "min_cosine": min(r["min_cosine"] for r in rows),
            "max_abs_difference": max(r["max_abs_difference"] for r in rows), "layers": layers,
            "largest_activation": max(layer["fp32_max_abs"] for layer in layers.values()),
            "overflowing_layers": overflowing}


def print_report(report: dict[str, Any]) -> None:
    print(f"{report['preset']} ({report['weights']}) on {report['device']}: {report['dtype']} against float32, "
          f"{len(report['prompts'])} prompts of {len(report['tasks'])} tasks")
    for row in report["prompts"]:
        print(f"  {row['prompt']:<40} {row['grids']:>2} grids  min cosine {row['min_cosine']:.6f}  "
              f"max |diff| {row['max_abs_difference']:.3g} (features up to {row['fp32_max_abs']:.3g})")
    print(f"lowest cosine {report['min_cosine']:.6f}; largest |diff| {report['max_abs_difference']:.3g}; "
          f"largest activation in any layer {report['largest_activation']:.4g} (fp16 holds up to {FP16_MAX:g}); "
          f"layers that overflow: {', '.join(report['overflowing_layers']) or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
