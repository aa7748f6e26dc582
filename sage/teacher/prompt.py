"""What the teacher sees: the grids of a view, each with its role, and the chat prompt around them.

Prompt (GR00T N1.5 / Eagle 2.5 chat format, images first, then the instruction; GROOT_N15.md):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <image 1><img><IMG_CONTEXT> x 256</img> ... <image N><img><IMG_CONTEXT> x 256</img>
    {instruction}<|im_end|>\\n<|im_start|>assistant\\n

With the real tokenizer that is 19 + 263 x N + tokens(instruction) tokens for N <= 9 images ("<image
k>" is 5 tokens; from k = 10 on it is 6, Qwen splits digits).

One prompt per (task, test input): the student sees the demonstrations and ONE test input per
example, so the teacher sees exactly that too. Views (recorded in the cache):

    task_context  demo 0 input, demo 0 output, ..., demo K-1 output, test input   (the default)
    test_input    test input
    with_answer   task_context + the test output: the answer leaks into every feature;
                  privileged-information experiments only, and the cache says so

The test output is read only by `with_answer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from sage.arc import ARCDataError, Task
from sage.teacher.config import VIEWS

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


@dataclass(frozen=True)
class TeacherExample:
    """One prompt: the grids of `task`'s test input `test_index` under a view, in prompt order."""

    task_id: str
    test_index: int
    roles: tuple[Role, ...]
    grids: tuple[np.ndarray, ...]

    @property
    def key(self) -> str:
        return entry_key(self.task_id, self.test_index)


def entry_key(task_id: str, test_index: int) -> str:
    return f"{task_id}/{test_index}"


def view_example(task: Task, test_index: int, view: str, max_demos: int) -> TeacherExample:
    """The grids the teacher sees for one test input. Only `with_answer` reads the test output."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}: expected one of {', '.join(VIEWS)}")
    test = task.test[test_index]
    roles: list[Role] = []
    grids: list[np.ndarray] = []
    if view != "test_input":
        for k, pair in enumerate(task.train[:max_demos]):
            roles += [Role("train", k, "input"), Role("train", k, "output")]
            grids += [pair.input, pair.output]
    roles.append(Role("test", test_index, "input"))
    grids.append(test.input)
    if view == "with_answer":
        if test.output is None:
            raise ARCDataError(
                f"{task.source}: task '{task.id}', test pair {test_index} has no output, so the with_answer "
                "view cannot show it (use view task_context)"
            )
        roles.append(Role("test", test_index, "output"))
        grids.append(test.output)
    return TeacherExample(task.id, test_index, tuple(roles), tuple(grids))


def view_examples(tasks: Sequence[Task], view: str, max_demos: int) -> list[TeacherExample]:
    return [view_example(t, j, view, max_demos) for t in tasks for j in range(len(t.test))]


def instruction_for(view: str, instruction: str | None) -> str:
    return DEFAULT_INSTRUCTIONS[view] if instruction is None else instruction


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
