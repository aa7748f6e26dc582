"""What the teacher sees: the grids of a view, each with its role, and the chat prompt around them.

Prompt (GR00T N1.5 / Eagle 2.5 chat format, images first, then the instruction; GROOT_N15.md):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <image 1><img><IMG_CONTEXT> x 256</img> ... <image N><img><IMG_CONTEXT> x 256</img>
    {instruction}<|im_end|>\\n<|im_start|>assistant\\n

With the real tokenizer that is 19 + 263 x N + tokens(instruction) tokens for N <= 9 images ("<image
k>" is 5 tokens; from k = 10 on it is 6, Qwen splits digits).

One prompt per student example: the demonstrations that example shows the student, in the order it
shows them, then its query input, and nothing after it (unless the view says so). A training example
whose query is demonstration q therefore gets a prompt without q's output: its own answer never
reaches the teacher. Evaluation's examples (all demonstrations, then test input j) are built the
same way. Views (recorded in the cache):

    task_context  demo input, demo output, ..., query input           (the default)
    test_input    query input
    with_answer   task_context + the query's output. GR00T's language model is causal, so only
                  what comes after the answer in the prompt (the answer's own image and the
                  instruction's tokens) is computed with it in view; the rows of the grids before
                  it are those of task_context. Privileged-information experiments only: the cache
                  says so, and training refuses it unless teacher.allow_answer_view is set.

Only `with_answer` reads the query's output.

`TeacherExample` is one prompt going in; `EntryFeatures` is what a teacher (GR00T or the oracle)
returns for it, as the feature cache stores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

from sage.arc import Task, fixed_view
from sage.errors import ARCDataError
from sage.teacher.settings import VIEWS

if TYPE_CHECKING:
    import torch  # EntryFeatures holds tensors; this module needs no torch itself

SYSTEM_PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"

DEFAULT_INSTRUCTIONS = {
    "task_context": (
        "The images show a puzzle: pairs of input and output grids that follow one rule, then a test input grid. "
        "What is the output grid for the test input?"
    ),
    "test_input": "The image shows the input grid of a puzzle. What is its output grid?",
    "with_answer": (
        "The images show a puzzle: pairs of input and output grids that follow one rule, then a test input grid "
        "and its output grid."
    ),
}


class Role(NamedTuple):
    """Which grid of a task an image shows: ('train', k, 'input'), ('test', j, 'output'), ..."""

    part: str  # 'train' or 'test'
    index: int  # pair index within task.train or task.test
    side: str  # 'input' or 'output'

    def __str__(self) -> str:
        return f"{self.part}/{self.index}/{self.side}"

    @classmethod
    def parse(cls, text: str) -> "Role":
        part, index, side = text.split("/")
        return cls(part, int(index), side)


def role_of(index: int, side: str, n_train: int) -> Role:
    """The role of pair `index`, counted over task.train + task.test (sage.encoding's indices)."""
    return Role("train", index, side) if index < n_train else Role("test", index - n_train, side)


def example_key(task_id: str, demos: Sequence[int], query: int, augmented_view: int = 0) -> str:
    """The cache key of the prompt that shows pairs `demos` (in order) and then pair `query`'s
    input, e.g. 'a85d4709/q4/d0.1.2' (indices over task.train + task.test), of the task as given or
    of its augmented view k (sage.arc.fixed_view), e.g. 'a85d4709/a3/q4/d0.1.2'."""
    view = f"/a{augmented_view}" if augmented_view else ""
    return f"{task_id}{view}/q{query}/d{'.'.join(str(d) for d in demos)}"


def shown_demos(view: str, demos: Sequence[int], max_demos: int) -> tuple[int, ...]:
    """The demonstrations a view's prompt shows, of a student example with demonstrations `demos`."""
    return () if view == "test_input" else tuple(demos[:max_demos])


@dataclass(frozen=True)
class TeacherExample:
    """One prompt: pairs `demos` of task `task_id` (in this order), then pair `query`'s input (and
    its output for with_answer); `roles` and `grids` in prompt order."""

    task_id: str
    demos: tuple[int, ...]
    query: int
    roles: tuple[Role, ...]
    grids: tuple[np.ndarray, ...]
    augmented_view: int = 0  # 0: the task as given; k: its augmented view k (sage.arc.fixed_view)

    @property
    def key(self) -> str:
        return example_key(self.task_id, self.demos, self.query, self.augmented_view)


def view_example(task: Task, demos: Sequence[int], query: int, view: str, max_demos: int,
                 augmented_view: int = 0) -> TeacherExample:
    """The prompt for the student example that answers pair `query` of `task` from pairs `demos`
    (indices over task.train + task.test), of the task as given or (augmented_view k >= 1) of its
    augmented view k, whose roles are the same grids transformed. Only `with_answer` reads the
    query's output."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}: expected one of {', '.join(VIEWS)}")
    if augmented_view:
        task = fixed_view(task.id, augmented_view).apply_task(task)
    pairs, n_train = task.train + task.test, len(task.train)
    if query in demos:
        raise ValueError(f"task '{task.id}': pair {query} cannot be both the query and a demonstration")
    shown = shown_demos(view, demos, max_demos)
    roles: list[Role] = []
    grids: list[np.ndarray] = []
    for d in shown:
        roles += [role_of(d, "input", n_train), role_of(d, "output", n_train)]
        grids += [pairs[d].input, pairs[d].output]
    roles.append(role_of(query, "input", n_train))
    grids.append(pairs[query].input)
    if view == "with_answer":
        if pairs[query].output is None:
            raise ARCDataError(
                f"{task.source}: task '{task.id}', {role_of(query, 'output', n_train)} is missing, so the "
                "with_answer view cannot show it (use view task_context)"
            )
        roles.append(role_of(query, "output", n_train))
        grids.append(pairs[query].output)
    return TeacherExample(task.id, shown, query, tuple(roles), tuple(grids), augmented_view)


def evaluation_prompts(tasks: Sequence[Task], view: str, max_demos: int) -> list[TeacherExample]:
    """Evaluation's prompts: every test input of every task, after all its demonstrations."""
    return [
        view_example(t, range(len(t.train)), len(t.train) + j, view, max_demos)
        for t in tasks
        for j in range(len(t.test))
    ]


def instruction_for(view: str) -> str:
    """The text after the images: the view's instruction."""
    return DEFAULT_INSTRUCTIONS[view]


def build_prompt(n_images: int, instruction: str, tokens_per_image: int = 256) -> str:
    """The prompt text; special tokens are written literally and the tokenizer recognises them."""
    images = "".join(
        f"<image {k}><img>{'<IMG_CONTEXT>' * tokens_per_image}</img>" for k in range(1, n_images + 1)
    )
    return SYSTEM_PREFIX + images + instruction + SUFFIX


def prompt_template(instruction: str, tokens_per_image: int = 256) -> str:
    """A readable form of the prompt for manifests and reports."""
    one = f"<image k><img><IMG_CONTEXT>x{tokens_per_image}</img>"
    return SYSTEM_PREFIX + f"[{one} for k = 1..N]" + instruction + SUFFIX


@dataclass
class EntryFeatures:
    """The teacher's output for one prompt, ready to store."""

    key: str  # sage.teacher.prompt.example_key
    task_id: str
    query: int
    demos: tuple[int, ...]
    roles: tuple[Role, ...]
    pooled: torch.Tensor  # [n_grids, dim]
    tokens: torch.Tensor | None = None  # [n_tokens, dim] (unpadded prompt), when token features are on
    image_starts: tuple[int, ...] = ()  # position of each image's first <IMG_CONTEXT> in the prompt
    n_tokens: int = 0
