"""The SAGE student: a transformer that solves an ARC task from its grids alone.

    context grids (demonstration pairs + test input, packed, no padding)
        -> token + row + column (from both edges) + segment embeddings
        -> context encoder (pre-LN self-attention blocks, padding masked)
    answer canvas (grid_size^2 slots, or as many as the batch's examples need (sage/encoding.py): the
                   test input's canvas tokens + row + column + "answer" segment, so the decoder
                   edits the input in place)
        -> grid decoder (self-attention over the canvas, cross-attention to the context; with
           model.answer_views each cell also attends over the test input's 8 dihedral views there)
        -> per-cell logits over 12 tokens (PAD, EOS, 10 colours): the output grid AND its size
    per-grid mean of encoder states -> distillation head -> teacher width (2048 for GR00T N1.5)
    (model.task_slot: a learned task token leads the context; the distillation head's reading of
     its encoder state is the student's statement of the task, added to every answer cell;
     model.view_agreement: the token starts from which dihedral views the demonstrations agree with)

The student never reads teacher features: at inference it replaces the teacher. The distillation
head is part of the model (trained, saved, restored) and serves the training loss (and, with
model.task_slot, states the task for the decoder); the teacher-feature statistics it is trained
against are buffers of the model, saved with it.

`SageProbe` (model.kind: probe) is the comparison point, "GR00T + a trained head": the same
encoder and decoder, but its context is the teacher's per-grid features instead of the grids.

`python sage_student_model.py [--preset NAME]` prints a preset's parameter breakdown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sage.encoding import EOS, PAD, VOCAB_SIZE


@dataclass
class StudentConfig:
    """The network (sage/model.py); the defaults are the ~44M-parameter sage-44m student. A run
    resumes and evaluates only with the model its checkpoint was trained as."""

    kind: str = "student"  # student: reads grids; probe: reads teacher features (for comparison only)
    d_model: int = 512  # width of every token's state
    n_heads: int = 8  # attention heads; d_model must be divisible by it
    encoder_layers: int = 6  # context encoder blocks (self-attention + MLP)
    decoder_layers: int = 5  # answer decoder blocks (self-attention, cross-attention to the context, MLP)
    mlp_ratio: float = 4.0  # MLP hidden width over d_model
    dropout: float = 0.0  # in attention and MLPs, training only
    grid_size: int = 30  # largest answer canvas side; ARC grids are at most 30x30
    # fixed: every answer canvas is grid_size x grid_size; batch: each example's canvas is sized from
    # its context (never its answer) and a batch is as large as its largest (sage/encoding.py).
    # Checkpoints written before this key existed evaluate and resume with fixed.
    answer_canvas: str = "batch"
    max_demos: int = 10  # demonstration pairs the segment embedding can tell apart (ARC has at most 10)
    teacher_dim: int = 2048  # width of the teacher features the distillation head predicts
    distill_hidden: int = 1536  # hidden width of the distillation head's MLP
    # Probe only: what it reads per grid. pooled: the grid's mean teacher feature (1 token);
    # tokens: the image's output tokens average-pooled to probe_token_side^2 tokens (needs a cache
    # extracted with teacher.token_features=true).
    probe_input: str = "pooled"
    probe_token_side: int = 4  # probe_input=tokens: each grid's image tokens pooled to side x side
    # A learned task token leads the context: the encoder gathers the task into it, the decoder reads
    # it (cross-attention, and added to every answer cell), and distillation can target it with the
    # teacher's task-level feature (distill.slots). Off: the model as before it existed.
    task_slot: bool = False
    # Dihedral views: a cell also attends, in every block, over what the grid it is made from shows
    # at that cell under the 8 dihedral transforms (dihedral_query_views and
    # dihedral_pair_views below), so that a flip, rotation or transpose is a choice per cell, not an
    # attention pattern across grids to learn. answer_views: each answer cell over the test
    # input's views (carrying a rule out). Off: the model as before they existed.
    answer_views: bool = False
    # The task token starts from the demonstrations' view agreement (view_agreement below):
    # for each dihedral view, the share of demonstration output cells that their input's view shows
    # unchanged. Measured: attention does not learn to pool that from the cells in a short budget.
    # Needs task_slot. Off: the model as before it existed.
    view_agreement: bool = False

    @property
    def probe_tokens_per_grid(self) -> int:
        return 1 if self.probe_input == "pooled" else self.probe_token_side**2

    @property
    def num_segments(self) -> int:  # demo k input/output, test input, answer
        return 2 * self.max_demos + 2

    @property
    def num_grid_slots(self) -> int:  # context grids that get a pooled feature
        return 2 * self.max_demos + 1


# What a checkpoint written before a key existed was trained with, where that is not today's
# default (resume and evaluation fill these in before the defaults).
PREDATING_DEFAULTS = {"answer_canvas": "fixed"}  # canvases were 30x30 before they were sized per example

PRESETS: dict[str, StudentConfig] = {
    "sage-44m": StudentConfig(),
    "sage-small": StudentConfig(d_model=128, n_heads=4, encoder_layers=2, decoder_layers=2, distill_hidden=256),
    "sage-tiny": StudentConfig(
        d_model=64, n_heads=4, encoder_layers=2, decoder_layers=2, teacher_dim=64, distill_hidden=64
    ),
}


# ----------------------------------------------------------------------------- dihedral views
# What a grid shows at each cell under the 8 dihedral transforms, read from a batch's tensors on
# the device (model.answer_views, model.view_agreement).


def dihedral_views(source: torch.Tensor, start: torch.Tensor, stride: torch.Tensor, h: torch.Tensor,
                   w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[B, N, 8] tokens: what an h x w grid under each of the 8 dihedral transforms (sage.arc's
    Augmentation numbering) shows at positions (rows, cols) [B, N], laid out as grid_to_canvas lays
    out a grid: colours, the EOS border, PAD beyond. The grid's tokens are read from `source` [B, S]
    at start + r * stride + c; start, stride, h and w broadcast against rows."""
    views = []
    for dihedral in range(8):
        turns = dihedral % 4  # np.rot90 (anticlockwise) that many times, then transposed if >= 4
        rot_h, rot_w = (w, h) if turns % 2 else (h, w)
        i, j = (cols, rows) if dihedral >= 4 else (rows, cols)  # the rotation's cell that (r, c) shows
        out_h, out_w = (rot_w, rot_h) if dihedral >= 4 else (rot_h, rot_w)
        if turns == 0:
            src_r, src_c = i, j
        elif turns == 1:
            src_r, src_c = j, w - 1 - i
        elif turns == 2:
            src_r, src_c = h - 1 - i, w - 1 - j
        else:
            src_r, src_c = h - 1 - j, i
        inside = (i < rot_h) & (j < rot_w)
        index = (start + src_r.clamp(min=0) * stride + src_c.clamp(min=0)).clamp(0, source.shape[1] - 1)
        border = ((rows == out_h) & (cols < out_w)) | ((cols == out_w) & (rows < out_h))
        views.append(torch.where(inside, source.gather(1, index), torch.where(border, EOS, PAD)))
    return torch.stack(views, dim=-1)


def dihedral_query_views(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, cells, 8]: the test input under each dihedral transform, on the batch's answer canvas
    (cut where the canvas ends)."""
    # Canvases are row-major, one shape per batch; the width stays a tensor (no host sync, and
    # torch.func.vmap can batch it: sage/task_batched_ttt.py).
    width = batch["answer_cols"].amax(1, keepdim=True) + 1
    # Each example's test input is h x w: its edge distances at cell (0, 0) are h + 1 and w + 1.
    h = (batch["query_rows_from_end"][:, :1] - 1).clamp(min=0)
    w = (batch["query_cols_from_end"][:, :1] - 1).clamp(min=0)
    return dihedral_views(batch["query"], torch.zeros_like(h), width, h, w,
                          batch["answer_rows"], batch["answer_cols"])


def dihedral_pair_views(batch: dict[str, torch.Tensor], max_demos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, 8]: for every token of a demonstration output, its demonstration input under each
    dihedral transform at that position; and [B, L] which tokens are demonstration outputs (the
    views of other tokens are meaningless). Read from the packed context (encode_example): an
    output grid follows its input, each (h+1) x (w+1) tokens row-major."""
    tokens, rows, cols, segments = batch["tokens"], batch["rows"], batch["cols"], batch["segments"]
    is_output = (segments % 2 == 1) & (segments < 2 * max_demos) & batch["context_mask"]
    position = torch.arange(tokens.shape[1], device=tokens.device)
    own_width = batch["cols_from_end"] + cols  # w + 1 for a grid of width w (border included)
    own_start = position - rows * own_width - cols
    input_end = (own_start - 1).clamp(min=0)  # the input's last token: its border corner (h, w)
    h, w = rows.gather(1, input_end), cols.gather(1, input_end)
    input_start = own_start - (h + 1) * (w + 1)
    return dihedral_views(tokens, input_start, w + 1, h, w, rows, cols), is_output


def view_agreement(pair_views: torch.Tensor, tokens: torch.Tensor, is_output: torch.Tensor) -> torch.Tensor:
    """[B, 8]: for each dihedral view, the share of an example's demonstration output cells (and
    borders) that their input under that view shows unchanged; 1.0 for the view a flip, rotation
    or transpose maps the inputs by. From `dihedral_pair_views`' [B, L, 8] views and [B, L] mask of
    demonstration outputs, and the context tokens [B, L]; 0 for an example without demonstrations."""
    agrees = (pair_views == tokens.unsqueeze(-1)) & is_output.unsqueeze(-1)
    return agrees.sum(1).float() / is_output.sum(1, keepdim=True).clamp(min=1)


# ----------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """Multi-head attention (self or cross) on PyTorch's fused scaled_dot_product_attention."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, memory: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        S = memory.shape[1]
        q = self.q(x).view(B, T, self.n_heads, -1).transpose(1, 2)
        k, v = self.kv(memory).view(B, S, 2, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # True = attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.up = nn.Linear(cfg.d_model, hidden)
        self.down = nn.Linear(hidden, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


@dataclass
class Views:
    """What dihedral views give a decoder block: every (view, token) pair's embedding and which pairs
    each position's 8 view tokens are."""
    table: torch.Tensor  # [8 * VOCAB_SIZE, d]
    ids: torch.Tensor  # [B, T, 8]


class ViewAttention(nn.Module):
    """Each position attends over its own 8 view tokens (model.answer_views). A
    view token is one of 8 x 12 (view, token) pairs, so their keys and values are projected once
    per forward, as a table, and gathered: 8 tokens per position cost a lookup, not 8 projections."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.norm = nn.LayerNorm(cfg.d_model)
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, view_table: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
        """x [B, T, d]; view_table [8 * 12, d] the embedding of every (view, token) pair; view_ids
        [B, T, 8] which pair each position's 8 view tokens are."""
        B, T, D = x.shape
        q = self.q(self.norm(x)).view(B, T, self.n_heads, -1)
        k, v = self.kv(view_table)[view_ids].view(B, T, 8, 2, self.n_heads, -1).unbind(3)
        # 8 keys per query are far too few for a fused attention kernel: two einsums.
        weights = torch.einsum("bthe,btkhe->bthk", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
        return self.out(torch.einsum("bthk,btkhe->bthe", weights, v).reshape(B, T, D))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.norm2, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, mask)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.norm2, self.cross_attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.view_attn = ViewAttention(cfg) if cfg.answer_views else None
        self.norm3, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor,
                answer_mask: torch.Tensor | None, views: Views | None = None) -> torch.Tensor:
        h = self.norm1(x)
        # Every cell of an example's canvas sees every other (sizes must agree), never a batch-mate's.
        x = x + self.self_attn(h, h, answer_mask)
        x = x + self.cross_attn(self.norm2(x), context, context_mask)
        if views is not None:  # each cell picks among what the test input's 8 views show there
            x = x + self.view_attn(x, views.table, views.ids)
        return x + self.mlp(self.norm3(x))


@dataclass
class StudentOutput:
    logits: torch.Tensor  # [B, cells, 12] per answer cell of the batch's canvas
    grid_features: torch.Tensor | None  # [B, num_grid_slots, teacher_dim] distillation head (None: probe)
    grid_mask: torch.Tensor  # [B, num_grid_slots] which slots hold a context grid
    task_features: torch.Tensor | None = None  # [B, teacher_dim] distillation head on the task token (task_slot)


class SageStudent(nn.Module):
    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model ({cfg.d_model}) must be divisible by n_heads ({cfg.n_heads})")
        if cfg.view_agreement and not cfg.task_slot:
            raise ValueError("model.view_agreement starts the task token from the views that agree: set task_slot=true")
        self.cfg = cfg
        d = cfg.d_model
        self.token_emb = nn.Embedding(VOCAB_SIZE, d)
        self.row_emb = nn.Embedding(31, d)  # context grids are up to 30x30 plus the EOS border
        self.col_emb = nn.Embedding(31, d)
        # Distance from the far edge (sage.encoding.edge_distance): 0 beyond the grid, 1 border, 2.. cells.
        self.row_from_end_emb = nn.Embedding(32, d)
        self.col_from_end_emb = nn.Embedding(32, d)
        self.segment_emb = nn.Embedding(cfg.num_segments, d)
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.encoder_layers))
        self.encoder_norm = nn.LayerNorm(d)
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.cell_head = nn.Linear(d, VOCAB_SIZE)
        if cfg.answer_views:  # which of the 8 dihedral views a view token shows
            self.view_emb = nn.Embedding(8, d)
        if cfg.task_slot:
            self.task_emb = nn.Parameter(torch.zeros(d))
            # The decoder reads the task as the distillation head states it, in the teacher's units.
            self.task_to_canvas = nn.Linear(cfg.teacher_dim, d)
        if cfg.view_agreement:
            self.agreement_to_task = nn.Linear(8, d)
        self.distill_head = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, cfg.distill_hidden), nn.GELU(), nn.Linear(cfg.distill_hidden, cfg.teacher_dim)
        )
        # Per-dimension mean/std of the teacher's features on the training tasks: the head predicts
        # standardised features. Persistent buffers, so a checkpoint carries them.
        self.register_buffer("teacher_mean", torch.zeros(cfg.teacher_dim))
        self.register_buffer("teacher_std", torch.ones(cfg.teacher_dim))
        self.apply(self._init_weights)
        if cfg.task_slot:
            nn.init.normal_(self.task_emb, mean=0.0, std=0.02)
        # GPT-2 style: shrink the residual projections so the stream's variance stays put with depth.
        n_residual = 2 * cfg.encoder_layers + (3 + cfg.answer_views) * cfg.decoder_layers
        for name, p in self.named_parameters():
            if name.endswith(("out.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(n_residual))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Context states [B, L, d] and their mask [B, L]; with model.task_slot the task token's
        state comes first ([B, 1 + L, d])."""
        x = (
            self.token_emb(batch["tokens"])
            + self.row_emb(batch["rows"])
            + self.col_emb(batch["cols"])
            + self.row_from_end_emb(batch["rows_from_end"])
            + self.col_from_end_emb(batch["cols_from_end"])
            + self.segment_emb(batch["segments"])
        )
        mask = batch["context_mask"]
        if self.cfg.task_slot:
            task = self.task_emb.to(x.dtype).expand(len(x), -1)
            if self.cfg.view_agreement:  # each demo output cell's input, 8 ways, there
                pair_views, present = dihedral_pair_views(batch, self.cfg.max_demos)
                task = task + self.agreement_to_task(view_agreement(pair_views, batch["tokens"], present).to(x.dtype))
            x = torch.cat([task.unsqueeze(1), x], dim=1)
            mask = torch.cat([mask.new_ones(len(x), 1), mask], dim=1)
        for block in self.encoder:
            x = block(x, mask)
        return self.encoder_norm(x), mask

    def decode(self, batch: dict[str, torch.Tensor], context: torch.Tensor, context_mask: torch.Tensor,
               task: torch.Tensor | None = None) -> torch.Tensor:
        """Per-cell logits of the answer canvas; `task` [B, d] (model.task_slot) is added to every cell."""
        answer_segment = self.segment_emb.weight[self.cfg.num_segments - 1]
        x = (
            self.token_emb(batch["query"])  # the test input's canvas
            + self.row_emb(batch["answer_rows"])  # row r / column c: the same in any canvas
            + self.col_emb(batch["answer_cols"])
            + self.row_from_end_emb(batch["query_rows_from_end"])  # measured on the test input
            + self.col_from_end_emb(batch["query_cols_from_end"])
            + answer_segment
        )
        views = None
        if self.cfg.answer_views:  # what each dihedral view of the test input shows at each cell
            views = self.views(dihedral_query_views(batch))
        if task is not None:  # every answer cell starts from what the task is
            x = x + task.unsqueeze(1)
        answer_mask = batch.get("answer_mask")
        for block in self.decoder:
            x = block(x, context, context_mask, answer_mask, views)
        return self.cell_head(self.decoder_norm(x))

    def views(self, tokens: torch.Tensor) -> Views:
        """Views of [B, T, 8] view tokens (view d of position t shows tokens[b, t, d])."""
        table = (self.view_emb.weight[:, None] + self.token_emb.weight[None]).reshape(-1, self.cfg.d_model)
        offsets = torch.arange(8, device=tokens.device) * VOCAB_SIZE
        return Views(table, tokens + offsets)

    def pool_grids(self, context: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean of the encoder states of each context grid: [B, num_grid_slots, d] and a slot mask."""
        slots = F.one_hot(batch["segments"], self.cfg.num_segments)[..., : self.cfg.num_grid_slots]
        slots = slots * batch["context_mask"].unsqueeze(-1)
        slots = slots.to(context.dtype)
        counts = slots.sum(1)  # [B, G]
        pooled = torch.einsum("bsg,bsd->bgd", slots, context) / counts.clamp(min=1).unsqueeze(-1)
        return pooled, counts > 0

    def standardise(self, teacher_features: torch.Tensor) -> torch.Tensor:
        """Teacher features in the units the distillation head predicts."""
        return (teacher_features.float() - self.teacher_mean) / self.teacher_std

    def forward(self, batch: dict[str, torch.Tensor]) -> StudentOutput:
        context, context_mask = self.encode(batch)
        task = read = None
        if self.cfg.task_slot:
            task = self.distill_head(context[:, 0])  # the student's statement of the task
            read = self.task_to_canvas(task)
        logits = self.decode(batch, context, context_mask, read)
        grids = context[:, 1:] if self.cfg.task_slot else context
        pooled, grid_mask = self.pool_grids(grids, batch)
        return StudentOutput(logits, self.distill_head(pooled), grid_mask, task)


class SageProbe(SageStudent):
    """GR00T + a trained head: the teacher's features of each context grid (projected to d_model)
    replace the student's grid tokens; encoder and decoder as above. With probe_input "pooled" each
    grid slot is one context token (batch["teacher_features"] [B, slots, teacher_dim]); with
    "tokens" it is probe_token_side^2 tokens (batch["teacher_tokens"] [B, slots, k, teacher_dim]),
    told apart by a learned position-in-image embedding. batch["teacher_mask"] [B, slots] marks
    the grids the teacher saw."""

    def __init__(self, cfg: StudentConfig) -> None:
        if cfg.view_agreement:  # before building anything: it would go unused
            raise ValueError("model.view_agreement is the student's: a probe reads teacher features, not grids")
        super().__init__(cfg)
        self.feature_norm = nn.LayerNorm(cfg.teacher_dim)  # teacher features are not unit-scaled
        self.feature_proj = nn.Linear(cfg.teacher_dim, cfg.d_model)
        nn.init.normal_(self.feature_proj.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.feature_proj.bias)
        if cfg.probe_input == "tokens":
            self.image_pos_emb = nn.Embedding(cfg.probe_tokens_per_grid, cfg.d_model)
            nn.init.normal_(self.image_pos_emb.weight, mean=0.0, std=0.02)
        del self.distill_head  # a probe has nothing to distil

    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch["teacher_mask"]
        if self.cfg.probe_input == "tokens":
            features = batch["teacher_tokens"]  # [B, slots, k, dim]
            B, S, K, _ = features.shape
            x = self.feature_proj(self.feature_norm(features.float()))
            x = x + self.image_pos_emb(torch.arange(K, device=x.device))
            x = x + self.segment_emb(torch.arange(S, device=x.device)).unsqueeze(1)
            x, mask = x.reshape(B, S * K, -1), mask.repeat_interleave(K, dim=1)
        else:
            features = batch["teacher_features"]  # [B, slots, dim]
            slots = torch.arange(features.shape[1], device=features.device)
            x = self.feature_proj(self.feature_norm(features.float())) + self.segment_emb(slots)
        for block in self.encoder:
            x = block(x, mask)
        return self.encoder_norm(x), mask

    def forward(self, batch: dict[str, torch.Tensor]) -> StudentOutput:
        context, context_mask = self.encode(batch)
        logits = self.decode(batch, context, context_mask)
        return StudentOutput(logits, None, context_mask)


def build_model(cfg: StudentConfig) -> SageStudent:
    """The network `cfg.kind` names."""
    if cfg.kind == "probe":
        return SageProbe(cfg)
    if cfg.kind != "student":
        raise ValueError(f"model.kind must be 'student' or 'probe', got {cfg.kind!r}")
    return SageStudent(cfg)


# ----------------------------------------------------------------------------- attention kernel


ATTENTION_KERNELS = {"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "memory-efficient",
                     "CUDNN_ATTENTION": "cuDNN", "MATH": "math (unfused)", "OVERRIDEABLE": "a backend's own"}


def attention_kernel(cfg: StudentConfig, device: torch.device, dtype: torch.dtype) -> str:
    """Which kernel torch's scaled_dot_product_attention picks for this model's attention (a boolean
    key mask, d_model / n_heads per head) on `device` in `dtype`, as the log and benchmarks say it.
    cuDNN's builds a plan for every new shape; the flash kernel takes no mask at all."""
    head = cfg.d_model // cfg.n_heads
    q = torch.zeros(2, cfg.n_heads, 8, head, device=device, dtype=dtype)
    mask = torch.ones(2, 1, 1, 8, device=device, dtype=torch.bool)
    try:  # a private torch function: it may move; the name is for reading only
        from torch.nn.attention import SDPBackend

        choice = SDPBackend(torch._fused_sdp_choice(q, q, q, mask)).name
    except Exception:  # noqa: BLE001 - whatever torch changed, training goes on
        return "unknown"
    return ATTENTION_KERNELS.get(choice, choice.lower())


# ----------------------------------------------------------------------------- cost


def forward_flops(cfg: StudentConfig, examples: int, context_tokens: int, answer_cells: int) -> float:
    """Estimated FLOPs of a forward pass over `examples` examples padded to `context_tokens` context
    tokens and `answer_cells` answer cells: the dense blocks' matmuls and attention (2 FLOPs per
    multiply-add), without embeddings, heads and dihedral views. Deterministic and the same on any
    machine, so a budget counted in it gives the same steps everywhere (ttt.flops)."""
    d, L, A = cfg.d_model, context_tokens, answer_cells
    mlp = 4 * cfg.mlp_ratio * d * d  # up and down projections, per token
    encoder_block = L * (8 * d * d + mlp) + 4 * L * L * d  # q, kv, out; scores and weighted sum
    decoder_block = (A * (8 * d * d + mlp) + 4 * A * A * d  # self-attention and MLP over the canvas
                     + A * 4 * d * d + L * 4 * d * d + 4 * A * L * d)  # cross-attention: q, out; kv; attention
    per_example = cfg.decoder_layers * decoder_block + cfg.encoder_layers * encoder_block
    return float(examples * per_example)


# ----------------------------------------------------------------------------- parameter report


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Parameters per top-level component, in definition order."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        component = name.split(".")[0]
        counts[component] = counts.get(component, 0) + p.numel()
    return counts
