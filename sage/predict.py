"""A checkpoint's student answering ARC tasks: loading it, augmentation voting, and (with a ttt
config) the same again after test-time training on each task, in one process or several.

    load_model(path)          the network, built from the config saved with it, in eval mode
    blind(task)               the task with its test outputs removed: all a predictor ever sees
    Predictor.predict(task)   augmented views -> student -> decode -> undo each view -> vote -> 2 attempts
    TaskSolver.solve(task)    the checkpoint's answer, then (--ttt) the answer after sage/ttt.py tuned a
                              copy on the task's demonstrations (ttt.runs times: the run that fitted
                              them best answers); the original weights come back
    TaskSolver.solve_many     the same for many tasks; with ttt.tasks_in_flight > 1 their tuning runs
                              that many at once (sage/task_batched_ttt.py)
    solve_tasks(...)          every task, one at a time or spread over worker processes (a small model
                              on a CPU uses the cores better as 1-thread processes than as one
                              multi-thread process)

Scoring is not done here (sage/evaluation.py); nothing here reads a test output.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from sage.arc import Pair, Task
from sage.checkpoint import load_checkpoint, load_weights_into
from sage.config import ExperimentConfig, from_dict, without_removed_keys
from sage.distill import TeacherTargets
from sage.encoding import (
    COLOUR_OFFSET,
    EOS,
    ARCExamples,
    ExampleRef,
    answer_canvases,
    canvas_to_grid,
    collate,
    uses_shape_buckets,
)
from sage.model import PREDATING_DEFAULTS, build_model
from sage.step import Autocast, to_device
from sage.task_batched_ttt import TaskBatchedTrainer, plan_jobs
from sage.ttt import TestTimeTrainer, TTTStats, Tuning, pooled_stats
from sage.voting import Candidate, vote
from sage.voting import attempts as top_attempts
from sage.voting import views as make_views

# ----------------------------------------------------------------------------- the checkpoint


# Buffers added with feature distillation; checkpoints from before it lack them. Their defaults
# (mean 0, std 1: no standardisation) are exactly what those models were trained with.
STATISTICS_BUFFERS = ("teacher_mean", "teacher_std")


@dataclass
class LoadedModel:
    path: Path
    cfg: ExperimentConfig  # the config the checkpoint was trained with
    meta: dict[str, Any]
    model: torch.nn.Module
    parameters: int
    notes: list[str] = field(default_factory=list)


def load_model(path: str | Path, device: torch.device) -> LoadedModel:
    """A checkpoint's network in eval mode, built from the config saved inside it."""
    ckpt = load_checkpoint(path, with_training_state=False, meta_keys=("config",))
    saved, notes = without_removed_keys(ckpt.meta["config"], f"{ckpt.path}/meta.json")
    predated = {k: v for k, v in PREDATING_DEFAULTS.items() if k not in saved.get("model", {})}
    if predated:  # evaluated as it was trained
        saved = {**saved, "model": {**saved.get("model", {}), **predated}}
        notes.append(f"{ckpt.path} predates " + ", ".join(f"model.{k}" for k in predated) + ": evaluated with "
                     + ", ".join(f"{k}={v}" for k, v in predated.items()) + ", as it was trained")
    cfg = from_dict(ExperimentConfig, saved, f"{ckpt.path}/meta.json")
    model = build_model(cfg.model)
    defaults = model.state_dict()
    missing = [k for k in STATISTICS_BUFFERS if k in defaults and k not in ckpt.weights]
    if missing:
        ckpt.weights.update({k: defaults[k] for k in missing})
        notes.append(f"{ckpt.path} predates teacher-feature statistics ({', '.join(missing)}): "
                     "no standardisation assumed, as it was trained")
    load_weights_into(model, ckpt)
    model.to(device).eval()
    return LoadedModel(ckpt.path, cfg, ckpt.meta, model, sum(p.numel() for p in model.parameters()), notes)


def blind(task: Task) -> Task:
    """The task with its test outputs removed: what a predictor may see."""
    return replace(task, test=tuple(Pair(p.input, None) for p in task.test))


# ----------------------------------------------------------------------------- prediction


@dataclass
class OutputPrediction:
    """What the predictor made of one test input."""

    candidates: list[Candidate]  # distinct grids, best first
    attempts: list[np.ndarray]  # attempt 1 and attempt 2 (sage.voting.attempts)
    answerable: bool  # False when the test input does not fit the model's answer canvas
    views: int  # views that produced a non-empty grid
    # identity view only, for feature fidelity: distillation head output per context slot
    grid_features: torch.Tensor | None = None
    grid_mask: torch.Tensor | None = None
    kept_demos: tuple[int, ...] = ()


@dataclass
class TaskPrediction:
    task_id: str
    tests: list[OutputPrediction]
    seconds: float  # encode + forward + decode + vote, all views


@dataclass
class ViewAnswers:
    """One model's answers to every view of a task's test inputs, before the vote (per test index)."""

    grids: dict[int, list[tuple[np.ndarray, float]]]  # (grid in the task's frame, confidence) per view
    canvases: dict[int, list[tuple[int, np.ndarray]]]  # (view index, log-probability canvas) per view
    features: dict[int, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]  # identity view: for feature fidelity
    seconds: float = 0.0


class Predictor:
    """Runs a model over the augmented views of one task at a time and votes."""

    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device,
        n_views: int,
        seed: int,
        batch_size: int,
        teacher: TeacherTargets | None = None,
    ) -> None:
        self.loaded, self.device = loaded, device
        self.model = loaded.model
        m, d = loaded.cfg.model, loaded.cfg.data
        self.grid_size, self.max_demos, self.max_context_tokens = m.grid_size, m.max_demos, d.max_context_tokens
        self.n_views, self.seed, self.batch_size = n_views, seed, batch_size
        # Teacher features of the task as given, for a model that reads them (the probe): one view only.
        self.teacher = teacher
        if teacher is not None and n_views != 1:
            raise ValueError("a model that reads teacher features answers the task as given only (n_views=1)")
        self.autocast = Autocast(device, loaded.cfg.run.precision)

    def fits(self, grid: np.ndarray) -> bool:
        return max(grid.shape) <= self.grid_size  # every dihedral view must fit the square canvas

    @torch.inference_mode()
    def forward(self, items: list[dict[str, np.ndarray]]) -> tuple[Any, ...]:
        """(argmax tokens [B, S, S], every token's log-probability [B, S, S, vocab], grid features,
        grid mask), with S = model.grid_size: cells outside an example's own canvas are PAD, and
        -inf log-probabilities."""
        batch = to_device(collate(items, shape_buckets=uses_shape_buckets(self.device)), self.device)
        with self.autocast():
            out = self.model(batch)
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        s = self.grid_size
        features = None if out.grid_features is None else out.grid_features.float().cpu()  # None: a probe
        return (answer_canvases(logp.argmax(dim=-1), batch, s), answer_canvases(logp, batch, s, fill=-math.inf),
                features, out.grid_mask.cpu())

    def encode(self, task: Task, views: Sequence) -> tuple[ARCExamples, list[tuple[int, int]]]:
        """All (view, test input) examples of a task: the dataset and (view, test index) per item."""
        answerable = [j for j, p in enumerate(task.test) if self.fits(p.input)]
        view_tasks = [aug.apply_task(task) for aug in views]
        n = len(task.train)
        refs, where = [], []
        for v in range(len(view_tasks)):
            for j in answerable:
                refs.append(ExampleRef(v, tuple(range(n)), n + j, j))
                where.append((v, j))
        data = ARCExamples(view_tasks, refs, self.grid_size, self.max_demos, self.max_context_tokens,
                           teacher=self.teacher, answer_canvas=self.loaded.cfg.model.answer_canvas)
        return data, where

    def predict(self, task: Task) -> TaskPrediction:
        """The task's two attempts per test input, voted over the views."""
        return self.decide(task, self.answer_views(task))

    def answer_views(self, task: Task) -> ViewAnswers:
        """The model's answer to every augmented view of every test input, undone to the task's frame."""
        started = time.perf_counter()
        task = blind(task)
        views = make_views(task.id, self.n_views, self.seed)
        data, where = self.encode(task, views)
        answers = ViewAnswers({j: [] for j in range(len(task.test))}, {j: [] for j in range(len(task.test))}, {})
        for start in range(0, len(data), self.batch_size):
            idx = list(range(start, min(start + self.batch_size, len(data))))
            items = [data[i] for i in idx]
            tokens, logp, grid_features, grid_mask = self.forward(items)
            for b, i in enumerate(idx):
                v, j = where[i]
                answers.canvases[j].append((v, logp[b]))
                if v == 0 and grid_features is not None:
                    answers.features[j] = (grid_features[b], grid_mask[b], data.kept_demos[i])
                grid = canvas_to_grid(tokens[b])
                if grid.size == 0:  # no answer from this view; sage.voting ignores it
                    answers.grids[j].append((grid, -math.inf))
                    continue
                h, w = grid.shape
                confidence = float(logp[b, :h, :w].max(-1).mean())  # mean log-probability of the grid's cells
                answers.grids[j].append((views[v].invert(grid), confidence))
        answers.seconds = time.perf_counter() - started
        return answers

    def decide(self, task: Task, answers: ViewAnswers) -> TaskPrediction:
        """Two attempts per test input from the model's view answers: every view's grid votes, and a
        candidate's likelihood sums over every view's canvas."""
        started = time.perf_counter()
        views = make_views(task.id, self.n_views, self.seed)
        tests = []
        for j, pair in enumerate(task.test):
            grids, canvases = answers.grids[j], answers.canvases[j]
            ranked = [replace(c, likelihood=likelihood_over_views(c.grid, views, canvases)) for c in vote(grids)]
            feats = answers.features.get(j)  # for feature fidelity
            tests.append(OutputPrediction(
                candidates=ranked,
                attempts=top_attempts(ranked),
                answerable=self.fits(pair.input),
                views=sum(g.size > 0 for g, _ in grids),
                grid_features=None if feats is None else feats[0],
                grid_mask=None if feats is None else feats[1],
                kept_demos=() if feats is None else feats[2],
            ))
        seconds = time.perf_counter() - started + answers.seconds
        return TaskPrediction(task.id, tests, seconds)


def grid_log_likelihood(grid: np.ndarray, logp: np.ndarray) -> float:
    """Log-probability that one view's answer canvas `logp` [S, S, vocab] (-inf outside the
    example's own canvas) gives `grid`, in that view's frame: its cells' colours and the EOS border
    that fixes its size (sage.encoding.grid_to_canvas), border cells beyond the canvas implied.
    -inf when the grid does not fit the canvas."""
    h, w = grid.shape
    own = np.isfinite(logp[..., 0])
    rows, cols = int(own[:, 0].sum()), int(own[0].sum())
    if h > rows or w > cols:
        return -math.inf
    total = float(logp[np.arange(h)[:, None], np.arange(w), grid.astype(np.int64) + COLOUR_OFFSET].sum())
    if h < rows:
        total += float(logp[h, :w, EOS].sum())
    if w < cols:
        total += float(logp[:h, w, EOS].sum())
    return total


def likelihood_over_views(grid: np.ndarray, views: Sequence, canvases: Sequence[tuple[int, np.ndarray]]) -> float:
    """A candidate's log-likelihood summed over the views: each view's canvas (view index, logp)
    scores the grid as that view shows it (its dihedral transform and colour permutation)."""
    return sum(grid_log_likelihood(views[v].apply(grid), logp) for v, logp in canvases)


# ----------------------------------------------------------------------------- every task


@dataclass
class TaskOutcome:
    """One task answered by the checkpoint as it is and, with test-time training, after it."""

    plain: TaskPrediction
    tuned: TaskPrediction | None = None
    ttt: TTTStats | None = None


class TaskSolver:
    """Answers tasks (see the module docstring): with ttt.tasks_in_flight > 1 their test-time
    training runs several tasks at once (sage/task_batched_ttt.py), else one task at a time."""

    def __init__(self, loaded: LoadedModel, device: torch.device, n_views: int, seed: int, batch_size: int,
                 tuning: Tuning | None = None) -> None:
        self.predictor = Predictor(loaded, device, n_views, seed, batch_size)
        self.trainer, self.batched = None, None
        if tuning is not None and tuning.ttt.tasks_in_flight > 1:
            self.batched = TaskBatchedTrainer(loaded.model, tuning, device)
            # Answers after tuning come from the trainer's copy, which holds one task's tuned weights at a time.
            self.tuned_predictor = Predictor(replace(loaded, model=self.batched.answering), device, n_views, seed,
                                             batch_size)
        elif tuning is not None:
            self.trainer = TestTimeTrainer(loaded.model, tuning, device)

    def solve(self, task: Task) -> TaskOutcome:
        """One task's outcome, its tuning one task at a time."""
        plain = self.predictor.predict(task)
        if self.trainer is None:
            return TaskOutcome(plain)
        answers, stats = [], []
        for run in range(self.trainer.tuning.ttt.runs):
            with self.trainer.tuned(blind(task), run) as run_stats:
                answers.append(self.predictor.answer_views(task))
            stats.append(run_stats)
            if not run_stats.steps:
                break  # nothing tuned: another run would answer exactly as this one did
        return self._outcome(task, plain, answers, stats)

    def solve_many(self, tasks: Sequence[Task]) -> Iterator[tuple[int, TaskOutcome]]:
        """Each task's (index in `tasks`, outcome), as it finishes."""
        if self.batched is None:
            for i, task in enumerate(tasks):
                yield i, self.solve(task)
            return
        index = {task.id: i for i, task in enumerate(tasks)}
        jobs = plan_jobs([blind(t) for t in tasks], self.batched.tuning)
        runs_left = Counter(job.task.id for job in jobs)
        done: dict[str, list[tuple[int, ViewAnswers, TTTStats]]] = {task.id: [] for task in tasks}
        for job, stats in self.batched.tune(jobs):
            task = tasks[index[job.task.id]]
            done[task.id].append((job.run, self.tuned_predictor.answer_views(task), stats))
            runs_left[task.id] -= 1
            if not runs_left[task.id]:
                runs = sorted(done.pop(task.id), key=lambda r: r[0])
                yield index[task.id], self._outcome(task, self.predictor.predict(task), [r[1] for r in runs],
                                                    [r[2] for r in runs])

    def _outcome(self, task: Task, plain: TaskPrediction, answers: list[ViewAnswers],
                 stats: list[TTTStats]) -> TaskOutcome:
        """The run that fitted the demonstrations best answers; nan (no steps) never wins over a loss."""
        best = min(range(len(stats)), key=lambda r: (math.isnan(stats[r].last_loss), stats[r].last_loss))
        return TaskOutcome(plain, self.predictor.decide(task, answers[best]), pooled_stats(stats))


_worker_solver: TaskSolver | None = None  # each worker process's own


def worker_devices(device: torch.device, workers: int, gpus: int) -> list[str]:
    """Each worker's device: a plain "cuda" spreads the workers over the visible GPUs in turn
    (worker i on cuda:i mod n, several tasks in flight per GPU when workers > n); an explicit
    device (cpu, cuda:N) takes them all."""
    if device.type == "cuda" and device.index is None and gpus > 0:
        return [f"cuda:{i % gpus}" for i in range(workers)]
    return [str(device)] * workers


def _start_worker(checkpoint: str, devices: Any, n_views: int, seed: int, batch_size: int,
                  tuning: Tuning | None, threads: int, precision: str) -> None:
    global _worker_solver
    device = devices.get()  # this worker's own (worker_devices)
    torch.set_num_threads(threads)
    loaded = load_model(checkpoint, torch.device(device))
    loaded.cfg.run.precision = precision  # the parent's, which an evaluation may have changed
    _worker_solver = TaskSolver(loaded, torch.device(device), n_views, seed, batch_size, tuning)


def _solve_in_worker(chunk: list[tuple[int, Task]]) -> list[tuple[int, TaskOutcome]]:
    assert _worker_solver is not None
    return [(chunk[i][0], outcome) for i, outcome in _worker_solver.solve_many([task for _, task in chunk])]


def worker_chunks(tasks: Sequence[Task], tuning: Tuning | None) -> list[list[tuple[int, Task]]]:
    """What a worker takes at a time: one task, or with ttt.tasks_in_flight = K, 4K tasks, so that
    its K slots stay full for most of a chunk (they drain at its end) and a kill loses little."""
    size = 1 if tuning is None or tuning.ttt.tasks_in_flight == 1 else 4 * tuning.ttt.tasks_in_flight
    numbered = list(enumerate(tasks))
    return [numbered[i:i + size] for i in range(0, len(numbered), size)]


def solve_tasks(loaded: LoadedModel, device: torch.device, tasks: Sequence[Task], n_views: int, seed: int,
                batch_size: int, tuning: Tuning | None = None, workers: int = 1,
                on_done: Callable[[Task, TaskOutcome], None] = lambda task, outcome: None) -> list[TaskOutcome]:
    """Every task's outcome, in task order. With workers > 1, tasks are spread over that many
    processes (each loads the checkpoint on its device, `worker_devices`, and uses its share of the
    CPU threads); `on_done` is called as each task finishes, in whatever order they finish."""
    outcomes: list[TaskOutcome | None] = [None] * len(tasks)
    if workers <= 1:
        for i, outcome in TaskSolver(loaded, device, n_views, seed, batch_size, tuning).solve_many(tasks):
            outcomes[i] = outcome
            on_done(tasks[i], outcome)
        return outcomes  # type: ignore[return-value]
    threads = max(1, torch.get_num_threads() // workers)
    # spawn, not fork: a forked child of a process that already ran OpenMP threads can hang.
    context = multiprocessing.get_context("spawn")
    devices = context.Queue()
    for name in worker_devices(device, workers, torch.cuda.device_count() if device.type == "cuda" else 0):
        devices.put(name)
    args = (str(loaded.path), devices, n_views, seed, batch_size, tuning, threads, loaded.cfg.run.precision)
    with context.Pool(workers, initializer=_start_worker, initargs=args) as pool:
        for chunk in pool.imap_unordered(_solve_in_worker, worker_chunks(tasks, tuning)):
            for i, outcome in chunk:
                outcomes[i] = outcome
                on_done(tasks[i], outcome)
    return outcomes  # type: ignore[return-value]
