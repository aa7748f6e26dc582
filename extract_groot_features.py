"""Cache GR00T N1.5 backbone features of ARC tasks (see sage/teacher/ and sage/features.py).

    python extract_groot_features.py --config configs/X.yaml            # extract or resume
    python extract_groot_features.py --config configs/X.yaml --shard 0/4  # part 1 of 4 (one per GPU)
    python extract_groot_features.py --config configs/X.yaml --merge      # after all parts finished
    torchrun --nproc_per_node=4 extract_groot_features.py --config configs/X.yaml  # one part per GPU, merged
    python extract_groot_features.py --describe groot-n1.5                # architecture + parameters

Without --config the defaults apply: the tiny random-weight teacher on ARC-AGI-1 training (CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys


def parse_shard(text: str) -> tuple[int, int]:
    k, sep, n = text.partition("/")
    if not sep or not k.isdigit() or not n.isdigit() or not 0 <= int(k) < int(n):
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected k/n with 0 <= k < n, e.g. 0/4")
    return int(k), int(n)


def describe(preset_name: str) -> None:
    from sage.teacher.backbone import count_parameters
    from sage.teacher.presets import get_preset

    arch = get_preset(preset_name)
    c = count_parameters(arch, with_pooling_head=True)
    print(f"{arch.name}: GR00T N1.5 backbone rebuilt from transformers classes (built on the meta device, no weights)")
    print(f"  SigLIP vision tower     {c.vision_tower:>15,}  ({arch.vision_layers} layers, {arch.vision_hidden} wide; "
          f"incl. its unused pooling head {c.pooling_head:,})")
    print(f"  mlp1 projector          {c.projector:>15,}  (Linear {arch.vision_hidden} -> {arch.llm_hidden})")
    print(f"  Qwen3 language model    {c.language_model:>15,}  ({arch.llm_layers} layers, {arch.llm_hidden} wide, "
          f"vocab {arch.vocab_size:,})")
    print(f"  backbone parameters     {c.total:>15,}")
    print(f"  run without the pooling head: {c.total - c.pooling_head:,}; "
          f"{arch.tokens_per_image} tokens per {arch.image_size}x{arch.image_size} image; "
          f"features {arch.feature_dim}-d")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML (its teacher: section); default: built-in defaults")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set teacher.batch_size=8 (repeatable)")
    parser.add_argument("--describe", metavar="PRESET",
                        help="print a preset's architecture and parameter count, then exit")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="K/N",
                        help="process part K of N (0-based) of the tasks; run N of these, then --merge")
    parser.add_argument("--merge", action="store_true", help="check all parts are stored and write the manifest")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N tasks (a separate cache)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from sage.config import load_config
    from sage.errors import INPUT_ERRORS, ConfigError

    try:
        if args.describe:
            describe(args.describe)
            return 0
        if args.limit is not None and args.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {args.limit}")
        cfg = load_config(args.config, args.set)
        import torch

        from sage.distill import prompts_for_dataset
        from sage.distributed import EXTRACTION_WAIT, init_distributed, shutdown_distributed
        from sage.extraction import merge, run_extraction, teacher_tasks

        # The prompts a training run of this config reads (one per student example).
        prompts = prompts_for_dataset(cfg, *teacher_tasks(cfg.teacher, cfg.data, args.limit))
        if args.merge:
            status = merge(cfg.teacher, cfg.data, prompts, args.limit)
            return _report_status(status["directory"], status)
        part, parts = args.shard
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # under torchrun: this process is part RANK of WORLD, on its own GPU
            if parts != 1:
                raise ConfigError("--shard and torchrun both split the work: use one of them")
            part, parts = int(os.environ["RANK"]), world
            if cfg.run.device in ("auto", "cuda") and torch.cuda.is_available():
                cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, device=f"cuda:{os.environ['LOCAL_RANK']}"))
        result = run_extraction(cfg.teacher, cfg.data, prompts, part, parts, args.limit,
                                progress=not args.no_progress and part == 0, device=cfg.run.device)
        if result.computed:
            print(f"part {part} of {parts}: " if parts > 1 else "", end="")
            print(f"computed {result.computed} prompts ({result.images} images) in {result.seconds:.1f} s: "
                  f"{result.prompts_per_second:.2f} prompts/s, {result.images / result.seconds:.1f} images/s")
        if world > 1:  # wait for every part, then one process checks the whole cache and says so
            # gloo, only for this barrier; the parts may end hours apart, so nothing times out.
            ctx = init_distributed("cpu", timeout_s=EXTRACTION_WAIT.total_seconds())
            ctx.wait_for_all()
            shutdown_distributed(ctx)
            return _report_status(result.directory, merge(cfg.teacher, cfg.data, prompts, args.limit)) if part == 0 else 0
        return _report_status(result.directory, result.status)
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _report_status(directory: object, status: dict) -> int:
    if status["complete"]:
        dup = f" ({status['duplicates']} duplicate copies ignored)" if status["duplicates"] else ""
        print(f"feature cache complete: {status['expected']} prompts in {directory}{dup}")
        return 0
    print(f"feature cache {directory}: {status['present']} of {status['expected']} prompts stored so far "
          f"(e.g. missing {', '.join(status['missing'][:3])}); finish the other --shard parts, then run --merge")
    return 0


if __name__ == "__main__":
    sys.exit(main())
