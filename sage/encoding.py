"""Grids as tokens, and ARC tasks as padded, length-bucketed batches for the student.

Vocabulary (12 tokens, the HRM/TRM convention): PAD=0, EOS=1, colour c -> c + 2. A grid's size is
marked by EOS cells on the row just below it and the column just right of it (within its extent).

- The ANSWER is a canvas of cells starting from the test input's: the student predicts every cell,
  so it predicts the output size too. Decoding takes the largest top-left rectangle of colour
  tokens. With model.answer_canvas "fixed" every canvas is grid_size x grid_size (30x30 for ARC);
  with "batch" each example gets its own rows x columns, chosen WITHOUT its answer
  (`answer_shape`: the tallest and the widest among its demonstration outputs and its query input,
  plus the EOS border and CANVAS_MARGIN), a batch is as large as its largest example in each
  direction, and each example's answer cells attend only to its own canvas (`answer_mask`), so a
  prediction never depends on batch-mates. Most ARC outputs are 10x10 or smaller: the decoder
  stops spending most of its compute on padding.
- The CONTEXT (demonstration pairs and the test input) spends no tokens on padding: each grid is
  the top-left (h+1) x (w+1) corner of its canvas (the grid plus its EOS border), with explicit
  row/column positions, and a task's grids are packed one after another. Batches pad only to the
  longest context in the batch, and the sampler groups contexts of similar length.

Context cap policy: a task keeps at most `max_demos` demonstrations; if its context is still longer
than `max_context_tokens`, trailing demonstrations are dropped until it fits, always keeping one.
The config requires max_context_tokens >= 3 * (grid_size + 1)^2, so every task fits this way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch

from sage.arc import Augmentation, Pair, Task, fixed_view, random_augmentation

PAD, EOS, COLOUR_OFFSET = 0, 1, 2
VOCAB_SIZE = 12
# Per-token arrays of the packed context, and per-cell arrays of the answer canvas, in a batch.
CONTEXT_KEYS = ("tokens", "rows", "cols", "rows_from_end", "cols_from_end", "segments")
ANSWER_KEYS = ("query", "query_rows_from_end", "query_cols_from_end", "target")
ANSWER_CANVASES = ("fixed", "batch")
# Cells beyond the largest grid an example shows, so that an output a little larger still fits:
# with it the canvas holds the test output of 409/416 ARC-AGI-1 training and 410/419 evaluation test
# inputs (405 and 409 without).
CANVAS_MARGIN = 1
TEACHER_KEYS = ("teacher_features", "teacher_tokens", "teacher_mask")  # per grid slot, when training reads a teacher cache


def grid_to_canvas(grid: np.ndarray, size: int = 30) -> np.ndarray:
    """[size, size] int64 tokens: the grid's colours, its EOS border, PAD elsewhere."""
    h, w = grid.shape
    if h > size or w > size:
        raise ValueError(f"a {h}x{w} grid does not fit the {size}x{size} canvas (raise model.grid_size)")
    canvas = np.full((size + 1, size + 1), PAD, dtype=np.int64)  # one spare row/column for the border
    canvas[:h, :w] = grid.astype(np.int64) + COLOUR_OFFSET
    canvas[h, :w] = EOS
    canvas[:h, w] = EOS
    return canvas[:size, :size]


def canvas_to_grid(tokens: np.ndarray) -> np.ndarray:
    """Largest top-left rectangle of colour tokens in a [size, size] token canvas (may be 0x0)."""
    is_colour = (tokens >= COLOUR_OFFSET) & (tokens < VOCAB_SIZE)
    best_area, best_shape = 0, (0, 0)
    width = tokens.shape[1]
    for r in range(tokens.shape[0]):
        row = is_colour[r, :width]
        width = int(np.argmin(row)) if not row.all() else width  # first non-colour cell bounds the width
        if width == 0:
            break
        if (r + 1) * width > best_area:
            best_area, best_shape = (r + 1) * width, (r + 1, width)
    h, w = best_shape
    return (tokens[:h, :w] - COLOUR_OFFSET).astype(np.uint8)


def edge_distance(position: np.ndarray, extent: int) -> np.ndarray:
    """Position counted from the grid's far edge: extent - position + 1 inside the grid and on its
    EOS border (border = 1, last cell = 2, ...), 0 beyond it. Lets attention match "c" with
    "w - 1 - c" directly, which flips and rotations need."""
    return np.where(position <= extent, extent - position + 1, 0)


def context_grid_tokens(grid: np.ndarray) -> dict[str, np.ndarray]:
    """Tokens and positions of the grid plus its EOS border: (h+1)*(w+1) entries, row-major."""
    h, w = grid.shape
    tokens = grid_to_canvas(grid, 31)[: h + 1, : w + 1]
    rows, cols = np.meshgrid(np.arange(h + 1), np.arange(w + 1), indexing="ij")
    return {
        "tokens": tokens.reshape(-1),
        "rows": rows.reshape(-1),
        "cols": cols.reshape(-1),
        "rows_from_end": edge_distance(rows, h).reshape(-1),
        "cols_from_end": edge_distance(cols, w).reshape(-1),
    }


def context_length(grid_shapes: Sequence[tuple[int, int]]) -> int:
    return sum((h + 1) * (w + 1) for h, w in grid_shapes)


def min_context_tokens(grid_size: int) -> int:
    """Smallest cap that fits one demonstration pair and the test input at the largest grid size."""
    return 3 * (grid_size + 1) ** 2


# ----------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class ExampleRef:
    """One prediction problem: `query` of `task` is answered from demonstrations `demos`.

    Indices count over task.train + task.test (so training can also use test pairs as queries).
    """

    task_index: int
    demos: tuple[int, ...]
    query: int
    test_index: int | None  # position in task.test when the query is a test pair, else None


def training_examples(tasks: Sequence[Task], use_test_pairs: bool = True) -> list[ExampleRef]:
    """Leave-one-out over each task's pairs: every pair with an output is a query once, the others
    are its demonstrations."""
    refs = []
    for ti, task in enumerate(tasks):
        pairs = task.train + task.test
        usable = [i for i, p in enumerate(pairs) if p.output is not None and (use_test_pairs or i < len(task.train))]
        for q in usable:
            demos = tuple(i for i in usable if i != q)
            if demos:
                test_index = q - len(task.train) if q >= len(task.train) else None
                refs.append(ExampleRef(ti, demos, q, test_index))
    return refs


def evaluation_examples(tasks: Sequence[Task]) -> list[ExampleRef]:
    """The official protocol: each test input is answered from the task's demonstration pairs."""
    refs = []
    for ti, task in enumerate(tasks):
        demos = tuple(range(len(task.train)))
        for j in range(len(task.test)):
            refs.append(ExampleRef(ti, demos, len(task.train) + j, j))
    return refs


def fit_demos(
    pairs: Sequence[Pair], demos: Sequence[int], query: int, max_demos: int, max_context_tokens: int
) -> tuple[int, ...]:
    """Apply the context cap policy (module docstring): the demonstrations that are kept."""
    kept = list(demos[:max_demos])
    shapes = [pairs[query].input.shape] + [s for d in kept for s in (pairs[d].input.shape, pairs[d].output.shape)]
    length = context_length(shapes)
    while length > max_context_tokens and len(kept) > 1:
        dropped = kept.pop()
        length -= context_length([pairs[dropped].input.shape, pairs[dropped].output.shape])
    return tuple(kept)


def answer_shape(pairs: Sequence[Pair], demos: Sequence[int], query: int, grid_size: int,
                 fit_answer: bool = False) -> tuple[int, int]:
    """(rows, columns) of an example's own answer canvas ("batch" canvases), from what the context
    shows: the tallest and the widest among its demonstration outputs and its query input, plus the
    EOS border and CANVAS_MARGIN, at most grid_size. `fit_answer` (training only) enlarges it to hold
    the answer too, for the ~2% of examples whose output is larger than anything their context shows."""
    grids = [pairs[d].output for d in demos] + [pairs[query].input]
    if fit_answer and pairs[query].output is not None:
        grids.append(pairs[query].output)
    rows, cols = (max(g.shape[axis] for g in grids) for axis in (0, 1))
    return min(rows + 1 + CANVAS_MARGIN, grid_size), min(cols + 1 + CANVAS_MARGIN, grid_size)


def answer_canvases(values: torch.Tensor, batch: dict[str, torch.Tensor], grid_size: int,
                    fill: float = PAD) -> np.ndarray:
    """Per-cell values [B, cells, ...] of a batch (argmax tokens, their log-probabilities, every
    token's) as [B, grid_size, grid_size, ...] canvases, `fill` outside each example's own canvas:
    what decoding and scoring read."""
    values = values.cpu().numpy()
    rows, cols = batch["answer_rows"].cpu().numpy(), batch["answer_cols"].cpu().numpy()
    own = batch["answer_mask"].cpu().numpy() if "answer_mask" in batch else np.ones(values.shape[:2], dtype=bool)
    out = np.full((len(values), grid_size, grid_size, *values.shape[2:]), fill, dtype=values.dtype)
    for b in range(len(values)):
        out[b, rows[b][own[b]], cols[b][own[b]]] = values[b][own[b]]
    return out


def encode_example(
    pairs: Sequence[Pair], demos: Sequence[int], query_index: int, max_demos: int, grid_size: int
) -> dict[str, np.ndarray]:
    """Pack the context grids and the answer canvas of one example as numpy arrays.

    Segment (and grid slot) ids: demo k input = 2k, demo k output = 2k + 1, test input = 2 * max_demos.
    The answer canvas uses segment 2 * max_demos + 1 inside the model.
    """
    grids, slots = [], []
    for k, d in enumerate(demos):
        grids += [pairs[d].input, pairs[d].output]
        slots += [2 * k, 2 * k + 1]
    grids.append(pairs[query_index].input)
    slots.append(2 * max_demos)
    parts = [context_grid_tokens(g) for g in grids]
    item = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    item["segments"] = np.concatenate([np.full(len(p["tokens"]), s, dtype=np.int64) for p, s in zip(parts, slots)])
    # The answer canvas starts from the test input's canvas: the decoder edits the input in place
    # (most ARC outputs share much with their input) instead of drawing from nothing.
    query = pairs[query_index].input
    item["query"] = grid_to_canvas(query, grid_size).reshape(-1)
    rows, cols = np.divmod(np.arange(grid_size * grid_size), grid_size)
    item["query_rows_from_end"] = edge_distance(rows, query.shape[0])
    item["query_cols_from_end"] = edge_distance(cols, query.shape[1])
    answer = pairs[query_index].output
    if answer is None:
        item["target"] = np.full(grid_size * grid_size, PAD, dtype=np.int64)
    else:
        item["target"] = grid_to_canvas(answer, grid_size).reshape(-1)
    return item


class ExampleTargets(Protocol):
    """Per-example teacher features (sage.distill.TeacherTargets implements it)."""

    field: str  # the batch key the features go under

    def key(self, task: Task, demos: Sequence[int], query: int, augmented_view: int = 0) -> str: ...

    def require(self, keys: Sequence[str]) -> None: ...

    def for_example(self, task: Task, demos: Sequence[int], query: int, max_demos: int,
                    augmented_view: int = 0) -> tuple[np.ndarray, np.ndarray]: ...

    def empty(self) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class DemonstrationCuts:
    """Demonstrations dropped from examples' contexts (the context cap policy above), counted so
    that a log or report can say how many examples answered from fewer than their task shows."""

    examples: int
    by_max_demos: int = 0  # examples that lost demonstrations to model.max_demos
    demos_by_max_demos: int = 0  # ... and how many they lost in all
    by_context_cap: int = 0  # examples that lost demonstrations to data.max_context_tokens
    demos_by_context_cap: int = 0
    left_with_one: int = 0  # examples the context cap cut down to a single demonstration

    def add(self, by_max_demos: int, by_context_cap: int, kept: int) -> None:
        self.by_max_demos += by_max_demos > 0
        self.demos_by_max_demos += by_max_demos
        self.by_context_cap += by_context_cap > 0
        self.demos_by_context_cap += by_context_cap
        self.left_with_one += by_context_cap > 0 and kept == 1

    def describe(self) -> str:
        if not (self.by_max_demos or self.by_context_cap):
            return f"every one of the {self.examples} examples keeps all its demonstrations"
        parts = []
        if self.by_context_cap:
            parts.append(f"{self.by_context_cap} of {self.examples} examples lose {self.demos_by_context_cap} "
                         f"demonstration(s) to data.max_context_tokens ({self.left_with_one} keep only one)")
        if self.by_max_demos:
            parts.append(f"{self.by_max_demos} of {self.examples} examples lose {self.demos_by_max_demos} "
                         "demonstration(s) to model.max_demos")
        return "; ".join(parts)


class ARCExamples(torch.utils.data.Dataset):
    """Encoded examples of a task list, optionally under a fresh random augmentation (and a shuffled
    demonstration order) per item.

    The augmentation and order of item i in epoch e depend only on (seed, e, i): a resumed run sees
    exactly the data the uninterrupted run would have seen.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        refs: Sequence[ExampleRef],
        grid_size: int,
        max_demos: int,
        max_context_tokens: int,
        augment: bool = False,
        seed: int = 0,
        augment_probability: float = 1.0,
        teacher: "ExampleTargets | None" = None,
        answer_canvas: str = "fixed",
        fit_answer: bool = False,
        shuffle_demos: bool = False,
        teacher_views: int = 0,
        resample_demos: bool = False,
        context_demos: int | None = None,
    ) -> None:
        if answer_canvas not in ANSWER_CANVASES:
            raise ValueError(f"answer_canvas must be one of {', '.join(ANSWER_CANVASES)}, got {answer_canvas!r}")
        self.tasks, self.refs = list(tasks), list(refs)
        self.grid_size, self.max_demos, self.augment, self.seed = grid_size, max_demos, augment, seed
        self.augment_probability = augment_probability if augment else 0.0
        self.teacher = teacher  # per-slot teacher features for un-augmented items (sage/distill.py)
        # With teacher features of K fixed augmented views per task (sage.arc.fixed_view), augmented
        # items draw among those views and keep their targets.
        self.teacher_views = teacher_views if teacher is not None else 0
        # Demonstrations in a random order per item, except where teacher targets fix the order.
        self.shuffle_demos = shuffle_demos
        # Examples with more demonstrations than the caps keep show another subset each epoch (demos_in_epoch).
        self.resample_demos, self.max_context_tokens = resample_demos, max_context_tokens
        # At most this many demonstrations per context (None: as many as max_demos allows). Segment
        # ids still count up to max_demos, so a shorter context reads as one the model was trained on.
        self.demos_kept = max_demos if context_demos is None else min(context_demos, max_demos)
        self.epoch = 0
        # Caps depend only on grid shapes, which augmentations may transpose but never resize in area.
        self.kept_demos = [
            fit_demos(self._pairs(r.task_index), r.demos, r.query, self.demos_kept, max_context_tokens)
            for r in self.refs
        ]
        self.lengths = np.array([self._length(i) for i in range(len(self.refs))], dtype=np.int64)
        # Answer canvas shapes of the tasks as given (an augmentation may transpose one).
        self.answer_canvas, self.fit_answer = answer_canvas, fit_answer
        self.shapes = np.array([self._answer_shape(self._pairs(r.task_index), i, self.kept_demos[i])
                                for i, r in enumerate(self.refs)], dtype=np.int64).reshape(-1, 2)
        self.sides = self.shapes.max(1)  # what the sampler groups by: the same for a transposed view
        if teacher is not None:
            teacher.require(self.teacher_keys())

    def demonstration_cuts(self) -> "DemonstrationCuts":
        """How many examples lost demonstrations to model.max_demos and to data.max_context_tokens."""
        cuts = DemonstrationCuts(examples=len(self.refs))
        for ref, kept in zip(self.refs, self.kept_demos):
            capped = min(len(ref.demos), self.demos_kept)
            cuts.add(by_max_demos=len(ref.demos) - capped, by_context_cap=capped - len(kept), kept=len(kept))
        return cuts

    def teacher_keys(self) -> list[str]:
        """Every teacher prompt the examples may read (sage.distill.TeacherTargets.key): each example's,
        in order, then those of its augmented views."""
        assert self.teacher is not None
        return [self.teacher.key(self.tasks[r.task_index], self.kept_demos[i], r.query, k)
                for k in range(self.teacher_views + 1) for i, r in enumerate(self.refs)]

    def _pairs(self, task_index: int) -> tuple[Pair, ...]:
        task = self.tasks[task_index]
        return task.train + task.test

    def _answer_shape(self, pairs: Sequence[Pair], i: int, demos: Sequence[int]) -> tuple[int, int]:
        if self.answer_canvas == "fixed":
            return self.grid_size, self.grid_size
        return answer_shape(pairs, demos, self.refs[i].query, self.grid_size, self.fit_answer)

    def _length(self, i: int) -> int:
        pairs, ref = self._pairs(self.refs[i].task_index), self.refs[i]
        shapes = [pairs[ref.query].input.shape]
        shapes += [s for d in self.kept_demos[i] for s in (pairs[d].input.shape, pairs[d].output.shape)]
        return context_length(shapes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def demos_in_epoch(self, i: int, epoch: int) -> tuple[int, ...]:
        """The demonstrations item i shows in `epoch`: with resample_demos, an example that has more than
        the caps keep draws them in an order fixed by (seed, epoch, index) before the cap policy drops the
        trailing ones, so each epoch keeps another subset (the sampler's lengths stay those of the first
        subset: a resampled context is as capped, only grouped a little less tightly); otherwise always
        the first ones (`kept_demos`)."""
        ref, kept = self.refs[i], self.kept_demos[i]
        if not self.resample_demos or len(kept) == len(ref.demos):
            return kept
        order = np.random.default_rng([self.seed, epoch, i, 2]).permutation(len(ref.demos))
        return fit_demos(self._pairs(ref.task_index), tuple(ref.demos[k] for k in order), ref.query, self.demos_kept,
                         self.max_context_tokens)

    def augmentation(self, i: int, epoch: int | None = None) -> tuple[Augmentation, int | None]:
        """Item i's augmentation in `epoch` (default: the current one), and which of the teacher's
        views it is: 0 the task as given, k >= 1 its augmented view k (sage.arc.fixed_view), None a
        fresh random augmentation the teacher never saw (no targets)."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, i])
        if self.augment_probability == 0.0 or rng.random() >= self.augment_probability:
            return Augmentation(), 0
        if self.teacher_views:
            k = int(rng.integers(1, self.teacher_views + 1))
            return fixed_view(self.tasks[self.refs[i].task_index].id, k), k
        return random_augmentation(rng), None

    def with_teacher_view_in_epoch(self, epoch: int) -> int:
        """How many items epoch `epoch` serves in a view the teacher saw (those carry teacher targets)."""
        return sum(self.augmentation(i, epoch)[1] is not None for i in range(len(self.refs)))

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, np.ndarray]:
        """Item i in the current epoch (key i), or in a given one (key (epoch, i): what
        EpochTaggedBatches hands DataLoader workers, whose copy of the dataset never sees set_epoch)."""
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        ref = self.refs[i]
        task = self.tasks[ref.task_index]
        aug, view = self.augmentation(i, epoch)
        if not aug.is_identity:
            task = aug.apply_task(task)
        free = self.teacher is None or view is None  # no teacher targets fix which demonstrations, in what order
        demos = self.demos_in_epoch(i, epoch) if free else self.kept_demos[i]
        if self.shuffle_demos and free:
            order = np.random.default_rng([self.seed, epoch, i, 1]).permutation(len(demos))
            demos = tuple(demos[k] for k in order)
        item = encode_example(task.train + task.test, demos, ref.query, self.max_demos, self.grid_size)
        item["index"] = np.int64(i)
        item["answer_shape"] = np.array(self._answer_shape(task.train + task.test, i, demos), dtype=np.int64)
        if self.teacher is not None:
            if view is not None:
                item[self.teacher.field], item["teacher_mask"] = self.teacher.for_example(
                    task, self.kept_demos[i], ref.query, self.max_demos, view)
            else:  # the teacher never saw this view of the task
                item[self.teacher.field], item["teacher_mask"] = self.teacher.empty()
        return item


CANVAS_BUCKET = 10  # with shape buckets, answer canvases grow in steps of this many rows and columns


def bucketed_length(n: int) -> int:
    """`n` rounded up to one of a few context lengths: 64 x 2^(k/4), itself rounded up to a multiple
    of 64 (at most ~19% padding beyond 64 tokens; 25 lengths cover everything up to 8,704 tokens)."""
    k = max(0, math.ceil(4 * math.log2(max(n, 1) / 64) - 1e-9))
    return -(-math.ceil(64 * 2 ** (k / 4)) // 64) * 64


def uses_shape_buckets(device: torch.device) -> bool:
    """Batches are padded to a few shapes (`bucketed_length`, CANVAS_BUCKET) on CUDA, in training,
    validation, prediction and test-time training: there each new (context, canvas) shape cost
    0.2-0.4 s once and a repeated one ran 5-10x faster (the H200 GPU check,
    docs/results/gpu_check_h200.md), and a compiled model recompiles for new shapes. On the CPU no
    such cost was seen, and the padding would add work."""
    return device.type == "cuda"


def collate(items: Sequence[dict[str, np.ndarray]], pad_to_multiple: int = 8,
            shape_buckets: bool = False) -> dict[str, torch.Tensor]:
    """Stack examples, padding contexts to the longest one (rounded up; `context_mask` marks real tokens).
    `shape_buckets` pads contexts to `bucketed_length` and answer canvases to multiples of
    CANVAS_BUCKET, so that a compiled model sees a few shapes (padding is masked: the same losses)."""
    longest = max(len(it["tokens"]) for it in items)
    length = bucketed_length(longest) if shape_buckets else -(-longest // pad_to_multiple) * pad_to_multiple
    batch = {}
    for key in CONTEXT_KEYS:
        out = np.zeros((len(items), length), dtype=np.int64)
        for b, it in enumerate(items):
            out[b, : len(it[key])] = it[key]
        batch[key] = torch.from_numpy(out)
    mask = np.zeros((len(items), length), dtype=bool)
    for b, it in enumerate(items):
        mask[b, : len(it["tokens"])] = True
    batch["context_mask"] = torch.from_numpy(mask)
    for key in TEACHER_KEYS:
        if key in items[0]:
            batch[key] = torch.from_numpy(np.stack([it[key] for it in items]))
    # The answer canvas: as large as the batch's largest example in each direction; each example's
    # cells beyond its own shape are masked (keys of the decoder's self-attention) and carry no target.
    grid_size = math.isqrt(len(items[0]["query"]))
    B = len(items)
    shapes = np.stack([it.get("answer_shape", np.array([grid_size, grid_size])) for it in items])
    R, C = (int(x) for x in shapes.max(0))
    if shape_buckets:
        R, C = (min(grid_size, -(-x // CANVAS_BUCKET) * CANVAS_BUCKET) for x in (R, C))
    for key in ANSWER_KEYS:
        full = np.stack([it[key] for it in items]).reshape(B, grid_size, grid_size)
        batch[key] = torch.from_numpy(np.ascontiguousarray(full[:, :R, :C]).reshape(B, R * C))
    rows, cols = np.divmod(np.arange(R * C), C)
    batch["answer_rows"] = torch.from_numpy(np.broadcast_to(rows, (B, R * C)).copy())
    batch["answer_cols"] = torch.from_numpy(np.broadcast_to(cols, (B, R * C)).copy())
    own = (rows[None, :] < shapes[:, :1]) & (cols[None, :] < shapes[:, 1:])
    # A compiled model guards on which keys the batch has: with shape buckets the mask is always
    # there (all true where every canvas is full), else each mix of full and partial canvases
    # recompiles (the GPU check hit dynamo's recompile limit on batch['answer_mask']).
    if shape_buckets or not own.all():
        batch["answer_mask"] = torch.from_numpy(own)
        batch["target"][~batch["answer_mask"]] = PAD
    if (R, C) != (grid_size, grid_size):  # scoring needs the whole target, also where it does not fit
        batch["target_full"] = torch.from_numpy(np.stack([it["target"] for it in items]))
    batch["index"] = torch.tensor([int(it["index"]) for it in items])
    return batch


class LengthBucketSampler(torch.utils.data.Sampler):
    """Batches of examples with similar context length, in a shuffled order fixed by (seed, epoch).

    Examples are shuffled, cut into windows of `bucket_batches` batches, sorted by answer canvas side
    and then length inside a window and batched; the batch order is then shuffled. Padding stays
    small and every epoch still mixes lengths. `skip_batches` lets a resumed run start mid-epoch.
    """

    def __init__(
        self, lengths: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0, bucket_batches: int = 50,
        sides: np.ndarray | None = None,
    ) -> None:
        self.lengths, self.batch_size, self.shuffle = np.asarray(lengths), batch_size, shuffle
        # Answer canvas sides: batches group examples of one side first, then of similar length.
        self.sides = np.zeros_like(self.lengths) if sides is None else np.asarray(sides)
        self.seed, self.bucket_batches = seed, bucket_batches
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def batches(self) -> list[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:  # deterministic order sorted by length: least padding for validation
            order = np.lexsort((self.lengths, self.sides))
            return [order[i : i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        window = self.batch_size * self.bucket_batches
        batches = []
        for start in range(0, n, window):
            chunk = order[start : start + window]
            chunk = chunk[np.lexsort((self.lengths[chunk], self.sides[chunk]))]
            batches += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.skip_batches :]

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size) - self.skip_batches


class EpochTaggedBatches(torch.utils.data.Sampler):
    """The batches of `sampler` (a LengthBucketSampler, or a rank's slice of one) with every index
    tagged by the sampler's epoch: (epoch, i). DataLoader workers that persist across epochs keep
    the dataset as it was when they started; the epoch travels with each index instead, so
    persistent workers serve each epoch's own augmentations."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield [(epoch, i) for i in batch]

    def __len__(self) -> int:
        return len(self.sampler)
