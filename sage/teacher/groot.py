"""GR00T N1.5 as a teacher: prompts in, per-grid features out.

    a prompt (sage/teacher/prompt.py: the grids it shows, its chat text) -> render each grid
          (224x224) -> tokenise the prompt -> left-pad a batch -> GrootBackbone -> per-grid mean
          over each image's <IMG_CONTEXT> outputs (+ all tokens on request) -> EntryFeatures

Each distinct grid of a batch goes through the vision tower once. sage/extraction.py runs a teacher
(this one or the oracle) over a dataset into the feature cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from sage.device import has_native_bf16, resolve_device
from sage.teacher.backbone import GrootBackbone, build_backbone
from sage.teacher.loading import LoadReport
from sage.teacher.presets import GrootArch, get_preset, require_real_files
from sage.teacher.prompt import EntryFeatures, TeacherExample, build_prompt, instruction_for
from sage.teacher.render import render_grid, to_pixel_values
from sage.teacher.settings import TeacherConfig
from sage.teacher.tokenizer import IMG_CONTEXT_ID, PAD_ID, GrootTokenizer, load_tokenizer


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """teacher.dtype as a torch dtype. auto: bf16 on GPUs with native bf16, as NVIDIA runs GR00T;
    fp16 on older GPUs, where bf16 is emulated (features checked against fp32:
    benchmarks/teacher_precision.py); fp32 on CPUs."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if has_native_bf16(device) else torch.float16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] left-padded with <|endoftext|>
    attention_mask: torch.Tensor  # [B, L] 1 for real tokens
    pixel_values: torch.Tensor  # [sum of images, 3, 224, 224], prompt by prompt


class Teacher:
    """The backbone with its tokenizer and prompt: examples in, per-grid features out."""

    def __init__(
        self,
        arch: GrootArch,
        model: GrootBackbone,
        tokenizer: GrootTokenizer,
        instruction: str,
        device: torch.device,
        load_report: LoadReport | None = None,
    ) -> None:
        self.arch, self.model, self.tokenizer, self.instruction = arch, model, tokenizer, instruction
        self.device, self.load_report = device, load_report
        self._prompt_ids: dict[int, list[int]] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.model.mlp1.weight.dtype

    def prompt_ids(self, n_images: int) -> list[int]:
        """Token ids of the prompt with `n_images` images (memoised: it depends on nothing else)."""
        if n_images not in self._prompt_ids:
            ids = self.tokenizer.encode(build_prompt(n_images, self.instruction, self.arch.tokens_per_image))
            n_slots = sum(i == IMG_CONTEXT_ID for i in ids)
            if n_slots != n_images * self.arch.tokens_per_image:
                raise ValueError(
                    f"the instruction text must not contain <IMG_CONTEXT>: the prompt has {n_slots} image slots "
                    f"for {n_images} images"
                )
            self._prompt_ids[n_images] = ids
        return self._prompt_ids[n_images]

    def encode(self, examples: Sequence[TeacherExample]) -> Batch:
        """The batch as the backbone's inputs: left-padded token ids, their mask, every image."""
        input_ids, mask = self.encode_text(examples)
        pixel_values = to_pixel_values([render_grid(g) for e in examples for g in e.grids])
        return Batch(input_ids, mask, pixel_values)

    def encode_text(self, examples: Sequence[TeacherExample]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [self.prompt_ids(len(e.grids)) for e in examples]
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), length), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for b, ids in enumerate(prompts):  # left padding: every prompt ends at the last position
            input_ids[b, length - len(ids) :] = torch.tensor(ids)
            mask[b, length - len(ids) :] = 1
        return input_ids, mask

    def image_embeddings(self, examples: Sequence[TeacherExample]) -> torch.Tensor:
        """Projected vision-tower tokens of every image of the batch, prompt by prompt. A grid shown
        in several prompts of the batch (a task's leave-one-out prompts share their grids) is
        rendered and encoded once."""
        index: dict[tuple, int] = {}
        order = []
        distinct = []
        for g in (g for e in examples for g in e.grids):
            key = (g.shape, g.tobytes())
            if key not in index:
                index[key] = len(distinct)
                distinct.append(g)
            order.append(index[key])
        pixels = to_pixel_values([render_grid(g) for g in distinct]).to(self.device, self.dtype)
        return self.model.image_embeddings(pixels)[torch.tensor(order, device=self.device)]

    @torch.inference_mode()
    def features(self, examples: Sequence[TeacherExample], token_features: bool = False) -> list[EntryFeatures]:
        input_ids, attention_mask = self.encode_text(examples)
        ids = input_ids.to(self.device)
        hidden = self.model(ids, attention_mask.to(self.device), image_tokens=self.image_embeddings(examples))
        per_image = self.arch.tokens_per_image
        out = []
        for b, example in enumerate(examples):
            n_pad = int((attention_mask[b] == 0).sum())
            slots = torch.nonzero(ids[b] == IMG_CONTEXT_ID).squeeze(1).view(len(example.grids), per_image)
            pooled = hidden[b, slots].float().mean(dim=1)  # [n_grids, dim], averaged in fp32
            tokens = hidden[b, n_pad:].cpu() if token_features else None
            out.append(
                EntryFeatures(
                    key=example.key,
                    task_id=example.task_id,
                    query=example.query,
                    demos=example.demos,
                    roles=example.roles,
                    pooled=pooled.cpu(),
                    tokens=tokens,
                    image_starts=tuple(int(s) - n_pad for s in slots[:, 0]),
                    n_tokens=ids.shape[1] - n_pad,
                )
            )
        return out


def load_teacher(teacher: TeacherConfig, device: str | torch.device = "auto") -> Teacher:
    """Build the configured teacher: real weights from teacher.checkpoint_dir, or (tiny preset
    without a checkpoint) deterministic random weights. Clear TeacherError when files are missing."""
    arch = get_preset(teacher.preset)
    require_real_files(teacher)
    tokenizer = load_tokenizer(teacher.tokenizer_dir, allow_builtin=not arch.has_public_weights)
    device = resolve_device(device) if isinstance(device, str) else device
    model, report = build_backbone(
        arch, device, resolve_dtype(teacher.dtype, device), teacher.checkpoint_dir, teacher.seed
    )
    return Teacher(arch, model, tokenizer, instruction_for(teacher.view), device, report)
