"""The GPU check: one command that proves SAGE's GPU path in minutes whenever a GPU is at hand.

    bash benchmarks/gpu_check.sh                       # on one GPU: at most ~9 minutes (--budget-s)
    bash benchmarks/gpu_check.sh --cpu-smoke           # every stage at toy sizes on a CPU (in the tests)
    bash benchmarks/gpu_check.sh --out DIR --only device,train
    bash benchmarks/gpu_check.sh --only recipe --budget-s 600   # the one-GPU recipe, a loan of its own

Stages, in order, each in its own process with a time limit (one failing does not stop the others;
--cpu-smoke runs extraction, train, ttt and recipe beside the other five, two stages at a time):

  device         the card, its memory and capability, native bf16, driver, torch/CUDA/transformers
  throughput     sage_44m training throughput and MFU against the measured matmul peak and the
                 card's spec-sheet peak (benchmarks/bench.py --only train: the real step, random
                 teacher targets), as configured and at 8k, 32k and 128k tokens a step
  attention      the same steps with torch's attention free to pick cuDNN's kernel and kept off it:
                 the kernel each picked, the cost of a step with a new shape and of a repeated one
  extraction     the tiny GR00T teacher (real architecture, random weights) extracting ARC-AGI-1
                 training's features on the device (extract_groot_features.py; prompts/s)
  train          two real sage_44m epochs distilling those features (train_sage.py)
  ttt            evaluate.py --ttt on a handful of ARC-AGI-1 evaluation tasks: one task at a time,
                 several processes (--workers), several tasks in one pass (ttt.tasks_in_flight);
                 tuning examples/s and whether the answers match one task at a time
  teacher_speed  the full-size GR00T N1.5 backbone (random weights) against the student, time per
                 task (benchmarks/bench.py --only speed)
  teacher_precision  the full-size backbone (random weights) in fp16 against fp32: features per
                 prompt (cosine, largest difference) and any layer that overflows fp16
                 (benchmarks/teacher_precision.py)
  oom            a real CUDA out-of-memory error (memory fraction capped below a measured step's
                 peak) recovered by halving; on a CPU an injected one
  compile        train.compile's recompilations over the first batches of an epoch, with and
                 without the shape buckets training uses (sage.encoding.bucketed_length)
  memory_caps    only when named (--only memory_caps): the recipe on smaller cards, this process capped
                 to 16 and to 8 GB in fp16 and in bf16 (one task tuned at a time; on 8 GB in passes of
                 8 examples): two epochs and TTT of 16 tasks each, out-of-memory halvings (none
                 expected), peaks; the CPU's live-tensor count against CUDA's for the same steps; and
                 fp16 against bf16 training throughput (bench.py --only train)
  recipe         only when named (--only recipe --budget-s 600): configs/sage_44m_1gpu.yaml end to end,
                 pretraining then TTT and scoring of all 400 ARC-AGI-1 evaluation tasks

Writes OUT/summary.md and OUT/summary.json (default benchmarks/results/gpu_check-<device>/), and
each stage's command output in OUT/<stage>.log. Exit code 1 when a stage failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Dense bf16 tensor-core peaks from the vendors' spec sheets (no sparsity), FLOP/s, by name fragment.
SPEC_BF16_PEAK = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                  "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12}

TINY_TEACHER = ["teacher.preset=groot-n1.5-tiny", "model.teacher_dim=64"]
# The smoke trains on the 15 ARC-AGI-1 training tasks whose grids are at most 3x3 (80 teacher prompts).
SMOKE_MODEL = ["model.d_model=32", "model.n_heads=2", "model.encoder_layers=1", "model.decoder_layers=1",
               "model.distill_hidden=32", "data.max_grid_side=3", "data.num_workers=0", "run.device=cpu",
               "run.precision=fp32"]


@dataclass(frozen=True)
class Sizes:
    """How big each stage runs: on a GPU, or as the CPU smoke test."""

    config: str
    model: list[str]  # overrides of the config's model and data for every stage
    bench_steps: tuple[int, int]  # warm-up, timed
    peak_seconds: float  # of matmuls per peak measurement
    compile_batches: int
    compile_backend: str
    oom_batch: int
    ttt: list[str]  # evaluate.py arguments
    # One evaluation per arm, on the same tasks: (name, evaluate.py arguments); the first is one task at a time.
    ttt_arms: tuple[tuple[str, tuple[str, ...]], ...]
    speed_teacher: str
    speed_tasks: int
    step_tokens: tuple[int, ...]  # train.tokens_per_step values the throughput stage also measures
    recipe_train: list[str]  # overrides of configs/sage_44m_1gpu.yaml's pretraining (none on a GPU)
    recipe_evaluate: list[str]  # evaluate.py arguments of the recipe's scoring


GPU = Sizes("configs/sage_44m.yaml", TINY_TEACHER, (5, 120), 4.0, 12, "inductor", 32,
            ["--limit", "8", "--set", "ttt.steps=100"],
            (("one_at_a_time", ()), ("workers_4", ("--workers", "4")),
             ("in_flight_8", ("--set", "ttt.tasks_in_flight=8"))),
            "groot-n1.5", 3, (8192, 32768, 131072),
            [], [])
SMOKE = Sizes("configs/quickstart.yaml", SMOKE_MODEL, (1, 2), 0.05, 4, "eager", 8,
              ["--limit", "2", "--max-grid-side", "5", "--set", "ttt.steps=3", "--set", "ttt.batch_size=2"],
              (("one_at_a_time", ()), ("workers_2", ("--workers", "2")),
               ("in_flight_2", ("--set", "ttt.tasks_in_flight=2"))),
              "groot-n1.5-tiny", 1, (2048,),
              [*SMOKE_MODEL, "train.epochs=1", "train.tokens_per_step=2048", "data.num_workers=0"],
              ["--limit", "2", "--max-grid-side", "5", "--set", "ttt.steps=2", "--device", "cpu"])
# Seconds a stage's command may take at most (on the H200 the first seven stages took 311 s in all).
LIMITS = {"device": 60, "throughput": 600, "attention": 240, "extraction": 150, "train": 300, "ttt": 240,
          "teacher_speed": 180, "teacher_precision": 180, "oom": 150, "compile": 300, "recipe": 420,
          "memory_caps": 540}


class StageFailed(Exception):
    pass


@dataclass
class Check:
    out: Path
    sizes: Sizes
    smoke: bool
    deadline: float  # time.time() by which every stage must be done
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        """--set overrides that keep every artefact of the check inside OUT."""
        return [f"run.checkpoint_dir={self.out / 'checkpoints'}", f"run.log_dir={self.out / 'logs'}",
                f"teacher.cache_dir={self.out / 'features'}"]

    @property
    def run_args(self) -> list[str]:
        """The paths and the sizes' model and data overrides, as most stages run their config."""
        return [*self.paths, *self.sizes.model]

    def sets(self, *extra: str) -> list[str]:
        return [a for o in [*self.run_args, *extra] for a in ("--set", o)]

    def run(self, stage: str, command: list[str]) -> str:
        """Run a command of the stage (its output appended to OUT/<stage>.log); its stdout."""
        limit = min(LIMITS[stage], self.deadline - time.time())
        if limit < 10:
            raise StageFailed("no time left in --budget-s")
        with open(self.out / f"{stage}.log", "a") as log:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            try:
                done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit)
            except subprocess.TimeoutExpired as timeout:  # keep what it printed before the limit
                for part in (timeout.stdout, timeout.stderr):
                    log.write(part.decode(errors="replace") if isinstance(part, bytes) else part or "")
                raise StageFailed(f"timed out after {limit:.0f} s") from None
            log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise StageFailed(f"exit code {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}")
        return done.stdout

    def child(self, stage: str, *args: str) -> dict[str, Any]:
        """Run one of this file's in-process stages in a fresh process; the JSON it prints last."""
        stdout = self.run(stage, [sys.executable, "-m", "benchmarks.gpu_check", "child", stage, "--out",
                                  str(self.out), *(["--cpu-smoke"] if self.smoke else []), *args])
        return json.loads(stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- stages


def stage_device(check: Check) -> dict[str, Any]:
    return check.child("device")


def stage_throughput(check: Check) -> dict[str, Any]:
    """Training throughput and MFU of the config as it is, then at each of the sizes' tokens a step."""
    figures = bench_train(check, "throughput")
    kept = ("examples_per_second", "tokens_per_second", "step_seconds", "achieved_tflops", "mfu_vs_measured_peak",
            "new_shape_steps")
    figures["by_tokens_per_step"] = {}
    for tokens in check.sizes.step_tokens:
        at = bench_train(check, f"throughput-{tokens}", f"train.tokens_per_step={tokens}")
        figures["by_tokens_per_step"][str(tokens)] = {k: at[k] for k in kept}
    return figures


def stage_attention(check: Check) -> dict[str, Any]:
    """The same training steps with torch's attention free to pick cuDNN's kernel (which builds a
    plan per new shape) and kept off it: the kernel each picked, new-shape and repeated-shape steps."""
    kept = ("attention_kernel", "step_seconds", "new_shape_steps", "new_shape_step_seconds",
            "repeated_shape_step_seconds", "examples_per_second")
    figures = {}
    for arm, flags in (("default", ()), ("no_cudnn", ("--no-cudnn-attention",))):
        at = bench_train(check, f"attention-{arm}", stage="attention", flags=flags)
        figures[arm] = {k: at[k] for k in kept}
    return figures


def bench_train(check: Check, name: str, *sets: str, stage: str = "throughput",
                flags: tuple[str, ...] = ()) -> dict[str, Any]:
    """benchmarks/bench.py's train section (and the matmul peak) with `sets`, in OUT/<name>.json."""
    warmup, steps = check.sizes.bench_steps
    path = check.out / f"{name}.json"
    check.run(stage, [sys.executable, "-m", "benchmarks.bench", "--config", check.sizes.config, "--only",
                      "train", "--warmup", str(warmup), "--steps", str(steps), "--json", str(path),
                      "--peak-seconds", str(check.sizes.peak_seconds), *flags,
                      *check.sets(*sets)])
    bench = json.loads(path.read_text())
    train, peak = bench["sections"]["train"], bench["sections"]["peak"]
    gpu = bench["machine"].get("gpu") or ""
    spec = next((v for k, v in SPEC_BF16_PEAK.items() if k in gpu), None)
    return {"device": gpu or bench["machine"]["cpu"], "precision": peak["dtype"],
            "step_seconds": train["step_seconds_mean"], "examples_per_second": train["examples_per_second"],
            "tokens_per_second": train["tokens_per_second"],
            "achieved_tflops": train["achieved_flops_per_second"] / 1e12,
            "measured_peak_tflops": peak["flops_per_second"] / 1e12, "mfu_vs_measured_peak": train["mfu"],
            "spec_peak_tflops": spec / 1e12 if spec else None,
            "mfu_vs_spec_peak": train["achieved_flops_per_second"] / spec if spec else None,
            "data_wait_share": train["data_wait_share"], "timed_steps": train["steps"],
            "new_shape_steps": train["new_shape_steps"], "attention_kernel": train["attention_kernel"],
            "new_shape_step_seconds": train["new_shape_step_seconds_mean"],
            "repeated_shape_step_seconds": train["repeated_shape_step_seconds_mean"],
            "repeated_shape_tflops": (train["repeated_shape_flops_per_second"] / 1e12
                                      if train["repeated_shape_flops_per_second"] is not None else None)}


def stage_compile(check: Check) -> dict[str, Any]:
    return check.child("compile")


def stage_extraction(check: Check) -> dict[str, Any]:
    stdout = check.run("extraction", [sys.executable, "extract_groot_features.py", "--config", check.sizes.config,
                                      "--no-progress", *check.sets(*TINY_TEACHER)])
    found = re.search(r"computed (\d+) prompts \((\d+) images\) in ([\d.]+) s: ([\d.]+) prompts/s", stdout)
    if not found:
        raise StageFailed(f"no throughput line in the output: {stdout[-300:]}")
    prompts, images, seconds, rate = found.groups()
    return {"prompts": int(prompts), "images": int(images), "seconds": float(seconds),
            "prompts_per_second": float(rate), "teacher": "groot-n1.5-tiny (random weights)"}


def stage_train(check: Check) -> dict[str, Any]:
    check.run("train", [sys.executable, "train_sage.py", "--config", check.sizes.config,
                        *check.sets(*TINY_TEACHER, "train.epochs=2", "run.name=gpu_check", "checkpoint.every_steps=0")])
    epochs = [r for r in map(json.loads, (check.out / "logs" / "gpu_check" / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "epoch"]
    last = epochs[-1]
    from sage.device import MEMORY_LINE

    log = (check.out / "logs" / "gpu_check" / "train.log").read_text()
    released = [{"after": after, "reserved_gib": float(before), "then_gib": float(now)}  # CUDA only
                for after, before, now in MEMORY_LINE.findall(log)]
    return {"epochs": len(epochs), "steps": last["step"], "seconds_per_epoch": [r["seconds"] for r in epochs],
            "train_loss": last["train_loss"], "val_loss": last["val_loss"],
            "val_exact_match": last["val_exact_match"], "val_feature_cosine": last.get("val_feature_cosine"),
            "memory_released": released}



def stage_oom(check: Check) -> dict[str, Any]:
    return check.child("oom")


def stage_memory_caps(check: Check) -> dict[str, Any]:
    """fp16 against bf16 training throughput on this card (bench_train, one run each), then the
    small-card recipe under capped memory (child_memory_caps)."""
    kept = ("precision", "examples_per_second", "step_seconds", "achieved_tflops")
    throughput = {}
    for precision in ("bf16", "fp16"):
        figures = bench_train(check, f"memory_caps-{precision}", f"run.precision={precision}", stage="memory_caps")
        throughput[precision] = {k: figures[k] for k in kept}
    return {"throughput_by_precision": throughput, **check.child("memory_caps")}


def stage_ttt(check: Check) -> dict[str, Any]:
    checkpoint = check.out / "checkpoints" / "gpu_check" / "last"
    if not checkpoint.is_dir():
        raise StageFailed(f"needs the train stage's checkpoint {checkpoint}")
    figures = {}
    first = None
    for name, arm in check.sizes.ttt_arms:
        report_dir = check.out / f"ttt_{name}"
        started = time.time()
        check.run("ttt", [sys.executable, "evaluate.py", "--checkpoint", str(checkpoint), "--ttt", "--views", "2",
                          "--speed-tasks", "0", "--pictures", "0", "--no-progress", "--out", str(report_dir),
                          *check.sizes.ttt, *arm, *(["--device", "cpu"] if check.smoke else [])])
        wall = time.time() - started
        report = json.loads((report_dir / "report.json").read_text())
        with open(report_dir / "per_task.csv", newline="") as f:
            steps = sum(int(row["ttt_steps"]) for row in csv.DictReader(f))
        # Tuning examples a second over the whole command (start-up and answering included: the same in every arm).
        examples = steps * report["settings"]["ttt_config"]["batch_size"]
        submission = (report_dir / "submission.json").read_bytes()
        first = first or submission
        figures[name] = {"tasks": report["protocol"]["tasks_scored"], "wall_seconds": round(wall, 1),
                         "ttt_examples_per_second": round(examples / wall, 1),
                         "score_with_ttt": report["scores"]["student_ttt"]["arc_prize_score"],
                         "same_answers_as_one_at_a_time": submission == first}
    return figures


def stage_teacher_speed(check: Check) -> dict[str, Any]:
    path = check.out / "teacher_speed.json"
    check.run("teacher_speed", [sys.executable, "-m", "benchmarks.bench", "--config", check.sizes.config, "--only",
                                "speed", "--speed-tasks", str(check.sizes.speed_tasks), "--speed-teacher",
                                check.sizes.speed_teacher, "--json", str(path), *check.sets()])
    speed = json.loads(path.read_text())["sections"]["speed"]
    keys = ("student_seconds_per_task", "teacher_seconds_per_task", "speedup", "teacher")
    return {k: speed[k] for k in keys if k in speed}


def stage_teacher_precision(check: Check) -> dict[str, Any]:
    """The teacher's features in fp16 (what teacher.dtype auto picks on GPUs without native bf16)
    against fp32: the full-size backbone with random weights on the GPU, the tiny one in the smoke."""
    path = check.out / "teacher_precision.json"
    preset = "groot-n1.5-tiny" if check.smoke else "groot-n1.5"
    check.run("teacher_precision", [sys.executable, "-m", "benchmarks.teacher_precision", "--preset", preset,
                                    "--device", "cpu" if check.smoke else "cuda",
                                    "--tasks", "2" if check.smoke else "4", "--json", str(path)])
    report = json.loads(path.read_text())
    keys = ("preset", "min_cosine", "max_abs_difference", "largest_activation", "overflowing_layers")
    return {k: report[k] for k in keys}


RECIPE = "configs/sage_44m_1gpu.yaml"


def stage_recipe(check: Check) -> dict[str, Any]:
    """configs/sage_44m_1gpu.yaml end to end: pretraining, then TTT and scoring of all 400 ARC-AGI-1
    evaluation tasks, report.md and submission.json in OUT/recipe_report. On a GPU it runs alone
    (`--only recipe --budget-s 600`): the plan is 5 + 4 minutes."""
    started = time.time()
    sets = [a for o in [*check.paths, "run.name=recipe", *check.sizes.recipe_train] for a in ("--set", o)]
    check.run("recipe", [sys.executable, "train_sage.py", "--config", RECIPE, *sets])
    trained = time.time()
    report_dir = check.out / "recipe_report"
    checkpoint = check.out / "checkpoints" / "recipe" / "best"
    check.run("recipe", [sys.executable, "evaluate.py", "--checkpoint", str(checkpoint), "--ttt", "--speed-tasks", "0",
                         "--no-progress", "--out", str(report_dir), *check.sizes.recipe_evaluate])
    report = json.loads((report_dir / "report.json").read_text())
    scores = report["scores"]
    return {"pretraining_seconds": round(trained - started, 1),
            "ttt_and_scoring_seconds": round(time.time() - trained, 1), "tasks": report["protocol"]["tasks_scored"],
            **{f"{system}_{figure}": scores[system][figure] for system in ("student", "student_ttt")
               for figure in ("arc_prize_score", "pass_at_1")},
            "submission": str(report_dir / "submission.json")}


# Compile runs last: inductor's compilations are the least predictable (on the H200 it outran 180 s).
# The recipe runs only when named on a GPU (its 9 planned minutes are a loan of their own).
STAGES: dict[str, Callable[[Check], dict[str, Any]]] = {
    "device": stage_device, "throughput": stage_throughput, "attention": stage_attention,
    "extraction": stage_extraction, "train": stage_train,
    "ttt": stage_ttt, "teacher_speed": stage_teacher_speed, "teacher_precision": stage_teacher_precision,
    "oom": stage_oom, "compile": stage_compile, "memory_caps": stage_memory_caps,
    "recipe": stage_recipe,
}
ON_REQUEST = ("recipe", "memory_caps")  # stages a GPU check runs only when --only names them


# ----------------------------------------------------------------------------- in-process stages (children)


def child_device(smoke: bool) -> dict[str, Any]:
    import torch
    import transformers

    from sage.step import has_native_bf16

    figures: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                               "transformers": transformers.__version__, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        figures.update(gpu=props.name, gpus=torch.cuda.device_count(), memory_gib=round(props.total_memory / 2**30, 1),
                       capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                       native_bf16=has_native_bf16(torch.device("cuda")))
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        figures["driver"] = smi.stdout.strip() if smi.returncode == 0 else None
    elif not smoke:
        raise SystemExit("error: no CUDA device visible; run with --cpu-smoke on a machine without a GPU")
    return figures


def child_compile(smoke: bool, out: Path) -> dict[str, Any]:
    """Count graph compilations of the student over an epoch's first batches, as training feeds them."""
    import torch
    import torch._dynamo

    from sage.config import load_config
    from sage.encoding import collate
    from sage.losses import answer_cross_entropy
    from sage.model import build_model
    from sage.step import Autocast, to_device
    from sage.splits import load_splits, make_datasets
    from sage.token_batches import training_sampler

    sizes = SMOKE if smoke else GPU
    cfg = load_config(sizes.config, [*sizes.model, "distill.weight=0"])
    device = torch.device("cpu" if smoke else "cuda")
    train_set, _ = make_datasets(cfg, load_splits(cfg))
    sampler = training_sampler(train_set.lengths, train_set.sides, cfg.train.batch_size, cfg.train.tokens_per_step, 0)
    batches = list(sampler)[: sizes.compile_batches]
    figures = {}
    for buckets in (True, False):  # buckets first: what training uses on a GPU, and free shapes may time out
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = build_model(cfg.model).to(device)
        net = torch.compile(model, dynamic=True, backend=sizes.compile_backend)
        autocast, shapes, started = Autocast(device, cfg.run.precision), set(), time.time()
        for indices in batches:
            batch = to_device(collate([train_set[i] for i in indices], shape_buckets=buckets), device)
            shapes.add((batch["tokens"].shape[1], batch["target"].shape[1]))
            with autocast():
                loss = answer_cross_entropy(net(batch).logits, batch["target"])
            loss.backward()
        graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        figures["shape_buckets" if buckets else "free_shapes"] = {
            "batches": len(batches), "distinct_shapes": len(shapes), "graphs_compiled": graphs,
            "seconds": round(time.time() - started, 1)}
        print(json.dumps(figures), file=sys.stderr, flush=True)  # in the stage's log even if the next arm times out
    figures["backend"] = sizes.compile_backend
    return figures


def child_oom(smoke: bool, out: Path) -> dict[str, Any]:
    """Measure a few steps' peak memory, then cap the process below it and run them again: the real
    out-of-memory error must be recovered by halving (on a CPU: an injected error)."""
    import torch

    from sage.config import load_config
    from sage.recovery import FaultInjection
    from sage.training import train

    sizes = SMOKE if smoke else GPU
    base = [*sizes.model, f"run.checkpoint_dir={out / 'checkpoints'}", f"run.log_dir={out / 'logs'}",
            f"train.batch_size={sizes.oom_batch}", "train.tokens_per_step=0", "distill.weight=0", "data.num_workers=0"]
    train(load_config(sizes.config, [*base, "run.name=oom_uncapped"]), stop_after_steps=3, echo=False)
    figures: dict[str, Any] = {"batch_size": sizes.oom_batch}
    faults = FaultInjection.parse(["oom:train:2"]) if smoke else None
    if not smoke:
        peak = torch.cuda.max_memory_allocated()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.set_per_process_memory_fraction(0.6 * peak / total)
        figures.update(uncapped_peak_gib=round(peak / 2**30, 2), cap_gib=round(0.6 * peak / 2**30, 2))
    train(load_config(sizes.config, [*base, "run.name=oom_capped"]), stop_after_steps=3, echo=False, faults=faults)
    log = (out / "logs" / "oom_capped" / "train.log").read_text()
    figures["halvings"] = re.findall(r"out of memory in training at [^:]*: training now runs (\d+) examples", log)
    figures["oom"] = "injected (no CUDA)" if smoke else "real CUDA out-of-memory error"
    if not figures["halvings"]:
        raise SystemExit(f"error: no out-of-memory error happened under the cap: {figures}")
    return figures


# The one-GPU recipe on smaller cards, as its config states them: one task tuned at a time (8 in
# flight multiply TTT's activations), and on 8 GB each TTT step in two passes of 8 examples (the same
# steps). Training's 32,768 tokens a step fit both (docs/results/fp16.md: planned from CPU counts).
SMALL_CARDS = {8: ["ttt.tasks_in_flight=1", "ttt.examples_per_pass=8"], 16: ["ttt.tasks_in_flight=1"]}  # tightest first


def counted_against_allocated(smoke: bool) -> dict[str, Any]:
    """One step of each phase on its largest batch (benchmarks/bench.py's memory phases) in bf16
    with the 8 GB settings, uncapped: the live-tensor count small cards' recipes were planned by on a
    CPU (sage.memory_probe.TensorPeakMeter) against CUDA's max_memory_allocated for the same step."""
    import torch

    from benchmarks.bench import memory_phase
    from sage.config import load_config

    cfg = load_config(RECIPE, [*(SMOKE.recipe_train if smoke else []), "run.precision=bf16", *SMALL_CARDS[8]])
    figures = {}
    for phase in ("train", "val", "ttt"):
        r = memory_phase(cfg.to_dict(), phase, torch.get_num_threads())
        allocated = r.get("cuda_max_allocated_bytes")
        figures[phase] = {"batch": r["batch"], "counted_mib": round(r["tensor_peak_bytes"] / 2**20, 1),
                          "cuda_allocated_mib": None if allocated is None else round(allocated / 2**20, 1)}
    return figures


def child_memory_caps(smoke: bool, out: Path) -> dict[str, Any]:
    """configs/sage_44m_1gpu.yaml with SMALL_CARDS' settings, this process capped to 8 and then 16 GB
    of the card (torch.cuda.set_per_process_memory_fraction), in fp16 and in bf16: two epochs of
    training with their validations, then TTT and scoring of 16 ARC-AGI-1 evaluation tasks. Each
    run's memory probe line, its out-of-memory halvings (none expected) and its peak; first, the
    CPU-side count against CUDA's figure (`counted_against_allocated`). On a CPU (the smoke) nothing
    is capped: toy sizes, the same path."""
    import torch

    from sage.config import load_config
    from sage.evaluation import EvalSettings, evaluate
    from sage.training import train

    figures: dict[str, Any] = {"counted_against_allocated": counted_against_allocated(smoke)}
    print(json.dumps(figures), file=sys.stderr, flush=True)
    for cap, settings in SMALL_CARDS.items():
        for precision in ("fp16", "bf16"):
            name = f"cap{cap}_{precision}"
            if not smoke:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                total = torch.cuda.get_device_properties(0).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total))
            sets = [f"run.checkpoint_dir={out / 'checkpoints'}", f"run.log_dir={out / 'logs'}", f"run.name={name}",
                    *(SMOKE.recipe_train if smoke else ["train.epochs=2"]), f"run.precision={precision}", *settings]
            train(load_config(RECIPE, sets), echo=False)
            lines: list[str] = []
            result = evaluate(out / "checkpoints" / name / "last", EvalSettings(
                split="arc-agi-1/evaluation", views=2, limit=2 if smoke else 16, speed_tasks=0, ttt=True,
                precision=precision, max_grid_side=5 if smoke else None, device="cpu" if smoke else "auto"),
                progress=False, log=lines.append)
            log = (out / "logs" / name / "train.log").read_text()
            figures[name] = {
                "cap_gib": None if smoke else cap,
                "memory_probe": next((x.split(" | ", 1)[-1] for x in log.splitlines() if "memory probe" in x), None),
                "out_of_memory_halvings": log.count("out of memory in ") + sum("out of memory" in x for x in lines),
                "ttt_steps": sum(s.steps for s in result.ttt_stats.values()),
                "score_with_ttt": result.systems["student_ttt"].summary["arc_prize_score"],
                "peak_gib": None if smoke else round(torch.cuda.max_memory_allocated() / 2**30, 2)}
            print(json.dumps(figures), file=sys.stderr, flush=True)  # in the stage's log if the next run times out
    return figures


CHILDREN = {"device": lambda smoke, out: child_device(smoke), "compile": child_compile, "oom": child_oom,
            "memory_caps": child_memory_caps}


# ----------------------------------------------------------------------------- summary and main


def rounded(value: Any) -> Any:
    """Figures to 4 significant digits, for reading."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return [rounded(v) for v in value] if isinstance(value, list) else value


def write_summary(check: Check) -> None:
    (check.out / "summary.json").write_text(json.dumps(check.results, indent=1, default=str))
    lines = [f"# GPU check{' (CPU smoke: toy sizes, not GPU figures)' if check.smoke else ''}", "",
             "| stage | status | seconds | figures |", "|---|---|---|---|"]
    for name, result in check.results.items():
        figures = {k: rounded(v) for k, v in result.items() if k not in ("status", "seconds", "error")}
        shown = result.get("error") or json.dumps(figures, default=str)
        lines.append(f"| {name} | {result['status']} | {result['seconds']:.0f} | {shown.replace('|', '/')} |")
    (check.out / "summary.md").write_text("\n".join(lines) + "\n")


# Stages that read an earlier stage's output: the extraction's cache feeds train, whose checkpoint feeds ttt.
# The smoke's recipe (two processes of its own) runs after them, balancing the two lanes.
CHAIN = ("extraction", "train", "ttt", "recipe")


def lanes(names: list[str], smoke: bool) -> list[list[str]]:
    """The stages each lane runs, in order. On a GPU one lane: one stage at a time, since the figures
    are timings. The CPU smoke runs the chain extraction -> train -> ttt in one lane and the other
    stages in another, side by side: its stages are mostly process start-ups (imports), one core each."""
    if not smoke:
        return [names]
    return [lane for lane in ([n for n in names if n in CHAIN], [n for n in names if n not in CHAIN]) if lane]


def run_check(args: argparse.Namespace) -> int:
    smoke = args.cpu_smoke
    out = Path(args.out or REPO / "benchmarks" / "results" / f"gpu_check-{'cpu_smoke' if smoke else 'gpu'}")
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, SMOKE if smoke else GPU, smoke, time.time() + args.budget_s)
    names = ([n.strip() for n in args.only.split(",")] if args.only else
             [n for n in STAGES if smoke or n not in ON_REQUEST])
    done = threading.Lock()

    def run_lane(lane: list[str]) -> None:
        for name in lane:
            started = time.time()
            print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
            try:
                result = {"status": "ok", **STAGES[name](check)}
            except (StageFailed, OSError, KeyError, ValueError) as e:
                result = {"status": "FAILED", "error": f"{type(e).__name__}: {e}"}
            with done:
                check.results[name] = {**result, "seconds": round(time.time() - started, 1)}
                print(f"[gpu_check] {name}: {check.results[name]['status']} in {check.results[name]['seconds']} s",
                      file=sys.stderr, flush=True)
                write_summary(check)

    first, *others = lanes(names, smoke)
    with ThreadPoolExecutor(max_workers=1) as pool:
        beside = [pool.submit(run_lane, lane) for lane in others]
        run_lane(first)  # in this thread: on a GPU (a single lane) as if there were no pool
        for lane in beside:
            lane.result()
    check.results = {name: check.results[name] for name in names}  # the stages' order, whichever ended first
    write_summary(check)
    print((out / "summary.md").read_text())
    return 0 if all(r["status"] == "ok" for r in check.results.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every stage at toy sizes on the CPU")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/gpu_check-<kind>)")
    parser.add_argument("--only", default=None, help=f"comma-separated stages of {', '.join(STAGES)}")
    parser.add_argument("--budget-s", type=float, default=540, help="seconds all stages together may take")
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["child"]:  # one in-process stage, run by the parent: prints its figures as JSON
        child = argparse.ArgumentParser()
        child.add_argument("stage", choices=list(CHILDREN))
        child.add_argument("--out", required=True)
        child.add_argument("--cpu-smoke", action="store_true")
        a = child.parse_args(argv[1:])
        print(json.dumps(CHILDREN[a.stage](a.cpu_smoke, Path(a.out)), default=str))
        return 0
    args = parser.parse_args(argv)
    if args.only and (unknown := set(n.strip() for n in args.only.split(",")) - set(STAGES)):
        parser.error(f"--only: unknown stage(s) {', '.join(sorted(unknown))}")
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
