"""GR00T N1.5's backbone rebuilt from transformers classes (no gr00t package, no trust_remote_code).

    pixel_values [N_img, 3, 224, 224] -> SiglipVisionModel.last_hidden_state [N_img, 256, 1152]
                                      -> mlp1 = Linear(1152 -> 2048)          [N_img, 256, 2048]
    input_ids [B, L] -> Qwen3 embed_tokens; the projected image tokens replace, in order, the
                        embeddings at the <IMG_CONTEXT> positions
                     -> 12-layer Qwen3Model (SDPA, attention mask) -> final RMSNorm
                     -> features [B, L, 2048]  (= last_hidden_state; GR00T's "backbone_features")

Modules are created on the meta device and materialised once, directly in the target dtype and
device: no 1.3B-parameter random initialisation, and no fp32 copy of bf16 weights.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from sage.teacher.loading import LoadReport, read_backbone_state_dict
from sage.teacher.presets import GrootArch
from sage.teacher.tokenizer import IMG_CONTEXT_ID

# Non-persistent buffers (not in checkpoints) that `_init_buffers` recomputes after materialising.
KNOWN_BUFFERS = {
    "vision_model.embeddings.position_ids",
    "vision_model.vision_model.embeddings.position_ids",  # transformers 4.x nesting
    "language_model.rotary_emb.inv_freq",
    "language_model.rotary_emb.original_inv_freq",
}


class GrootBackbone(nn.Module):
    def __init__(self, arch: GrootArch, with_pooling_head: bool = False) -> None:
        """`with_pooling_head` adds SigLIP's attention-pooling head, which GR00T never uses; only
        `--describe` builds it, to count the parameters the way the published total does."""
        super().__init__()
        from transformers import Qwen3Model, SiglipVisionModel

        self.arch = arch
        self.vision_model = SiglipVisionModel(arch.vision_config(with_head=with_pooling_head))
        self.mlp1 = nn.Linear(arch.vision_hidden, arch.llm_hidden)
        self.language_model = Qwen3Model(arch.llm_config())
        self.image_token_id = IMG_CONTEXT_ID
        self.vision_chunk = 64  # images per SigLIP call, bounds activation memory

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N_img, 3, H, W] -> projected image tokens [N_img, tokens_per_image, llm_hidden]."""
        dtype = self.mlp1.weight.dtype
        outs = []
        for start in range(0, pixel_values.shape[0], self.vision_chunk):
            chunk = pixel_values[start : start + self.vision_chunk].to(self.mlp1.weight.device, dtype)
            outs.append(self.mlp1(self.vision_model(pixel_values=chunk).last_hidden_state))
        return torch.cat(outs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Features [B, L, llm_hidden] of left-padded prompts. `pixel_values` holds every image of
        the batch, prompt by prompt, in prompt order (the order of the <IMG_CONTEXT> runs); or pass
        their `image_embeddings` as `image_tokens` (computed once for images the prompts share)."""
        embeds = self.language_model.embed_tokens(input_ids)
        image_slots = input_ids == self.image_token_id
        n_slots = int(image_slots.sum())
        per_image = self.arch.tokens_per_image
        if image_tokens is None and pixel_values is not None:
            image_tokens = self.image_embeddings(pixel_values)
        n_given = 0 if image_tokens is None else image_tokens.shape[0] * image_tokens.shape[1]
        if n_slots != n_given:
            raise ValueError(
                f"the prompts have {n_slots} <IMG_CONTEXT> tokens but {n_given // per_image} images x {per_image} "
                f"tokens = {n_given} image tokens were given"
            )
        if n_slots:
            # masked_scatter fills the True positions in row-major order: prompt by prompt, left to right.
            embeds = embeds.masked_scatter(image_slots.unsqueeze(-1), image_tokens.to(embeds.dtype))
        # Positions count from each prompt's first real token. NVIDIA's code uses 0..L-1 for every
        # row (shifted by the left padding); RoPE only sees position differences, so the features
        # are the same up to rounding, and this way they do not depend on a prompt's batch-mates.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state


@dataclass
class ParamCounts:
    vision_tower: int  # incl. the pooling head when built with it
    pooling_head: int
    projector: int
    language_model: int

    @property
    def total(self) -> int:
        return self.vision_tower + self.projector + self.language_model


def count_parameters(arch: GrootArch, with_pooling_head: bool = True) -> ParamCounts:
    """Parameter counts of the architecture, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = GrootBackbone(arch, with_pooling_head=with_pooling_head)

    def n(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    head = getattr(model.vision_model, "head", None)
    if head is None:  # transformers 4.x nests the tower under .vision_model
        head = getattr(getattr(model.vision_model, "vision_model", None), "head", None)
    head_params = n(head) if head is not None else 0
    return ParamCounts(n(model.vision_model), head_params, n(model.mlp1), n(model.language_model))


def random_state_dict(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random weights for a preset without public weights (the tiny one).

    Each tensor gets its own generator seeded from (seed, key), so the values do not depend on the
    device, the transformers version's init code, or which other tensors exist. Norm weights are
    1, biases 0, everything else N(0, 0.02)."""
    state = {}
    for key, value in sorted(model.state_dict().items()):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        if key.endswith(".bias"):
            state[key] = torch.zeros(value.shape)
        elif value.dim() == 1:
            state[key] = torch.ones(value.shape)
        else:
            state[key] = torch.randn(value.shape, generator=gen) * 0.02
    return state


def _init_buffers(model: GrootBackbone, device: torch.device) -> None:
    """Recompute the non-persistent buffers that `to_empty` left uninitialised, in fp32 like
    transformers does when it builds a bf16 model (RoPE frequencies must not be rounded to bf16)."""
    names = {name for name, _ in model.named_buffers()}
    unknown = names - KNOWN_BUFFERS
    if unknown:
        raise RuntimeError(
            f"GrootBackbone: this transformers version has buffers {sorted(unknown)} that the teacher does not "
            "know how to initialise; add them to sage/teacher/backbone.py:_init_buffers"
        )
    rotary = model.language_model.rotary_emb
    with torch.device(device):
        model.language_model.rotary_emb = type(rotary)(config=model.language_model.config)
    for name, buf in model.named_buffers():
        if name.endswith("embeddings.position_ids"):
            buf.copy_(torch.arange(buf.shape[-1], device=device).expand_as(buf))


def build_backbone(
    arch: GrootArch,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    checkpoint_dir: str | None = None,
    seed: int = 0,
) -> tuple[GrootBackbone, LoadReport | None]:
    """The backbone in eval mode with weights from `checkpoint_dir`, or deterministic random weights
    (seed) when it is None. Returns the load report (None for random weights)."""
    device = torch.device(device)
    with torch.device("meta"):
        model = GrootBackbone(arch).to(dtype)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if checkpoint_dir is None:
        state, report = random_state_dict(model, seed), None
    else:
        state, report = read_backbone_state_dict(checkpoint_dir, shapes)
    model.to_empty(device=device)
    with torch.no_grad():
        model.load_state_dict(state, strict=True)  # copy_ casts to the model's dtype and device
        _init_buffers(model, device)
    return model.eval().requires_grad_(False), report
