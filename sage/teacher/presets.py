"""Architecture presets of the GR00T N1.5 backbone (sizes only; no weights, no transformers import),
and the names and width of the oracle teacher.

`groot-n1.5` has the real sizes (GROOT_N15.md). `groot-n1.5-tiny` is the same architecture and code
path at toy width: 2-layer SigLIP and 2-layer Qwen3, 64 wide, still 224x224 images cut into 14x14
patches (256 tokens per image) and still the real 151,680-entry vocabulary, so the real tokenizer's
ids (the special tokens are 151643..151679) index it directly and the prompt is the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sage.errors import TeacherError
from sage.teacher.settings import DOWNLOAD_HELP, ORACLE_PRESET, TOKENIZER_HELP, TeacherConfig


@dataclass(frozen=True)
class GrootArch:
    name: str
    # SigLIP vision tower
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    patch_size: int
    image_size: int
    # Qwen3 language model, truncated
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_head_dim: int
    llm_intermediate: int
    vocab_size: int = 151680
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_positions: int = 40960
    vision_layer_norm_eps: float = 1e-6
    has_public_weights: bool = True  # False: deterministic random weights unless a checkpoint is given

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def feature_dim(self) -> int:
        return self.llm_hidden

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def vision_config(self, with_head: bool) -> Any:
        """transformers SiglipVisionConfig (the pooling head is unused by GR00T; built only to count it)."""
        from transformers import SiglipVisionConfig

        cfg = SiglipVisionConfig(
            hidden_size=self.vision_hidden,
            intermediate_size=self.vision_intermediate,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            num_channels=3,
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=self.vision_layer_norm_eps,
            vision_use_head=with_head,
        )
        cfg._attn_implementation = "sdpa"  # no flash-attn dependency; SDPA runs on CPU and GPU
        return cfg

    def llm_config(self) -> Any:
        """transformers Qwen3Config with only the layers GR00T keeps (select_layer 12)."""
        from transformers import Qwen3Config

        cfg = Qwen3Config(
            vocab_size=self.vocab_size,
            hidden_size=self.llm_hidden,
            intermediate_size=self.llm_intermediate,
            num_hidden_layers=self.llm_layers,
            num_attention_heads=self.llm_heads,
            num_key_value_heads=self.llm_kv_heads,
            head_dim=self.llm_head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_positions,
            tie_word_embeddings=True,
            attention_bias=False,
            use_cache=False,
        )
        cfg._attn_implementation = "sdpa"
        return cfg


PRESETS: dict[str, GrootArch] = {
    "groot-n1.5": GrootArch(
        name="groot-n1.5",
        vision_hidden=1152,
        vision_layers=27,
        vision_heads=16,
        vision_intermediate=4304,
        patch_size=14,
        image_size=224,
        llm_hidden=2048,
        llm_layers=12,
        llm_heads=16,
        llm_kv_heads=8,
        llm_head_dim=128,
        llm_intermediate=6144,
    ),
    "groot-n1.5-tiny": GrootArch(
        name="groot-n1.5-tiny",
        vision_hidden=64,
        vision_layers=2,
        vision_heads=4,
        vision_intermediate=128,
        patch_size=14,
        image_size=224,
        llm_hidden=64,
        llm_layers=2,
        llm_heads=4,
        llm_kv_heads=2,
        llm_head_dim=16,
        llm_intermediate=128,
        has_public_weights=False,
    ),
}

# Parameter counts the real preset must reproduce (GROOT_N15.md, facts).
GROOT_N15_BACKBONE_PARAMS = 1_344_716_736
GROOT_N15_SIGLIP_HEAD_PARAMS = 15_238_352


ORACLE_FEATURE_DIM = 64
ORACLE_ENCODING = (f"one-hot dihedral (8) + one-hot colour table (10x10) -> Gaussian projection to "
                   f"{ORACLE_FEATURE_DIM} dims (unit variance per dim), + noise x N(0, 1) per prompt and grid")
TEACHER_NAMES = (*PRESETS, ORACLE_PRESET)  # what teacher.preset may name


def get_preset(name: str) -> GrootArch:
    if name not in PRESETS:
        what = ("the oracle teacher has no GR00T architecture" if name == ORACLE_PRESET
                else f"unknown teacher preset '{name}'")
        raise TeacherError(f"{what}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def feature_dim(name: str) -> int:
    """Width of the features teacher `name` produces."""
    return ORACLE_FEATURE_DIM if name == ORACLE_PRESET else get_preset(name).feature_dim


def oracle_identity(seed: int, noise: float) -> dict[str, Any]:
    """What determines the oracle's features (its cache's teacher identity)."""
    return {"preset": ORACLE_PRESET, "encoding": ORACLE_ENCODING, "feature_dim": ORACLE_FEATURE_DIM,
            "noise": noise, "weights": f"projection(seed={seed})", "tokenizer": None}


def require_real_files(teacher: TeacherConfig) -> None:
    """The real preset needs the user's checkpoint and tokenizer: say what to download and where."""
    if teacher.preset != ORACLE_PRESET and get_preset(teacher.preset).has_public_weights:
        if teacher.checkpoint_dir is None:
            raise TeacherError(f"teacher.preset {teacher.preset} needs teacher.checkpoint_dir.\n{DOWNLOAD_HELP}")
        if teacher.tokenizer_dir is None:
            raise TeacherError(f"teacher.preset {teacher.preset} needs teacher.tokenizer_dir.\n{TOKENIZER_HELP}")
