"""Read the backbone's weights out of a local GR00T N1.5 checkpoint, by key prefix, strictly.

Checkpoint layout (GROOT_N15.md) -> our module (sage/teacher/backbone.py):

    backbone.eagle_model.vision_model.vision_model.*   -> vision_model.*   (SiglipVisionModel; NVIDIA's
                                                          nested layout, saved with transformers 4)
    backbone.eagle_model.vision_model.*                -> vision_model.*   (the same, flat: how
                                                          transformers 5 saves SiglipVisionModel)
    backbone.eagle_model.mlp1.0.{weight,bias}          -> mlp1.*           (the Linear projector)
    backbone.eagle_model.language_model.model.*        -> language_model.* (12-layer Qwen3Model)
    backbone.eagle_model.language_model.lm_head.weight -> language_model.embed_tokens.weight,
                                                          only when embed_tokens is not stored (tied)
    backbone.eagle_model.vision_model[.vision_model].head.*  ignored (SigLIP pooling head, unused)
    action_head.*                                           ignored, never read
    anything else under backbone.                           an error (not the architecture we rebuild)

The SigLIP layout is read off the checkpoint's key names; one checkpoint must use one layout (a
mix is refused, naming keys of both). A LeRobot-saved checkpoint prefixes every key with
`_groot_model.`. Shards are found through `model.safetensors.index.json`; a single
`model.safetensors` works too. Only the files that hold needed tensors are opened, and only the
needed tensors are read (safetensors.safe_open, mmap).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Mapping

import torch

from sage.errors import TeacherError
from sage.teacher.settings import DOWNLOAD_HELP

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
LEROBOT_PREFIX = "_groot_model."
BACKBONE = "backbone."
VISION_PREFIX = "backbone.eagle_model.vision_model."
SiglipLayout = Literal["nested", "flat"]
# Where each layout puts SiglipVisionModel's own keys (embeddings.*, encoder.*, post_layernorm.*, head.*).
SIGLIP_PREFIX: dict[SiglipLayout, str] = {"nested": VISION_PREFIX + "vision_model.", "flat": VISION_PREFIX}
SIGLIP_LAYOUT_NAME: dict[SiglipLayout, str] = {
    "nested": "nested (NVIDIA's layout, saved with transformers 4)",
    "flat": "flat (transformers 5 layout)",
}
MLP1_PREFIX = "backbone.eagle_model.mlp1.0."
LLM_PREFIX = "backbone.eagle_model.language_model.model."
EMBED_KEY = LLM_PREFIX + "embed_tokens.weight"
LM_HEAD_KEY = "backbone.eagle_model.language_model.lm_head.weight"
ACTION_HEAD = "action_head."


def siglip_layout_of(key: str) -> SiglipLayout | None:
    """The SigLIP layout a checkpoint key (without LeRobot prefix) is in; None outside the tower."""
    if not key.startswith(VISION_PREFIX):
        return None
    return "nested" if key.startswith(SIGLIP_PREFIX["nested"]) else "flat"


def checkpoint_key(module_key: str, layout: SiglipLayout = "nested") -> str:
    """GR00T checkpoint name (without any LeRobot prefix) of a GrootBackbone state-dict key.

    Module side: transformers 4.x nests SiglipVisionModel's weights under `vision_model.`, 5.x does
    not. Checkpoint side: `layout` (NVIDIA's checkpoints are nested, transformers 5 saves flat)."""
    part, _, rest = module_key.partition(".")
    if part == "vision_model":
        return SIGLIP_PREFIX[layout] + rest.removeprefix("vision_model.")
    if part == "mlp1":
        return MLP1_PREFIX + rest
    if part == "language_model":
        return LLM_PREFIX + rest
    raise ValueError(f"not a GrootBackbone key: {module_key}")


@dataclass
class CheckpointFiles:
    """Where each tensor of a checkpoint directory lives."""

    directory: Path
    prefix: str  # "" or LEROBOT_PREFIX
    files: dict[str, str]  # key without prefix -> file name

    @property
    def siglip_keys(self) -> dict[SiglipLayout, list[str]]:
        """The checkpoint's SigLIP keys (pooling head included) by the layout they are in, sorted."""
        out: dict[SiglipLayout, list[str]] = {"nested": [], "flat": []}
        for key in sorted(self.files):
            layout = siglip_layout_of(key)
            if layout is not None:
                out[layout].append(key)
        return out

    @property
    def siglip_layout(self) -> SiglipLayout:
        """The layout most SigLIP keys are in (nested, NVIDIA's, on a tie or when there are none)."""
        return _majority(self.siglip_keys)

    def path(self, file_name: str) -> Path:
        return self.directory / file_name


def _majority(keys: dict[SiglipLayout, list[str]]) -> SiglipLayout:
    return "flat" if len(keys["flat"]) > len(keys["nested"]) else "nested"


@dataclass
class LoadReport:
    """Strict accounting of one load: what was read from where, and what was skipped and why."""

    directory: str
    siglip_layout: SiglipLayout = "nested"
    loaded: dict[str, str] = field(default_factory=dict)  # module key -> checkpoint key it came from
    ignored: dict[str, list[str]] = field(default_factory=dict)  # reason -> checkpoint keys (never read)
    files_read: list[str] = field(default_factory=list)
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype in the file -> tensor count

    def summary(self) -> str:
        skipped = ", ".join(f"{len(keys)} {reason}" for reason, keys in self.ignored.items()) or "none"
        return (
            f"loaded {len(self.loaded)} tensors from {len(self.files_read)} file(s) of {self.directory} "
            f"(dtypes {self.dtypes}, SigLIP keys {self.siglip_layout}); not read: {skipped}"
        )


def _safetensors_keys(path: Path) -> list[str]:
    header = read_safetensors_header(path)
    return [k for k in header if k != "__metadata__"]


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (cheap: no tensor data is touched)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise TeacherError(f"{path}: not a safetensors file (truncated download?)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise TeacherError(f"{path}: not a safetensors file (header size {n})")
        try:
            return json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TeacherError(f"{path}: corrupted safetensors header (truncated download?)") from None


def open_checkpoint(directory: str | Path) -> CheckpointFiles:
    """Index a checkpoint directory (sharded with an index, or a single model.safetensors)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise TeacherError(f"teacher.checkpoint_dir: {directory} does not exist.\n{DOWNLOAD_HELP}")
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TeacherError(f"{index}: not a safetensors index (expected a JSON object with 'weight_map')") from None
        raw = dict(weight_map)
    elif (directory / SINGLE_FILE).is_file():
        raw = {k: SINGLE_FILE for k in _safetensors_keys(directory / SINGLE_FILE)}
    else:
        found = sorted(p.name for p in directory.iterdir())[:8]
        raise TeacherError(
            f"teacher.checkpoint_dir: {directory} has neither {INDEX_FILE} nor {SINGLE_FILE} "
            f"(it holds: {', '.join(found) or 'nothing'}).\n{DOWNLOAD_HELP}"
        )
    # LeRobot prefixes the model's keys; anything it stores beside the model keeps its own name.
    prefix = LEROBOT_PREFIX if any(k.startswith(LEROBOT_PREFIX + BACKBONE) for k in raw) else ""
    files = {(k[len(prefix) :] if prefix and k.startswith(prefix) else k): f for k, f in raw.items()}
    if not any(k.startswith(BACKBONE) for k in files):
        raise TeacherError(
            f"{directory}: no backbone weights (no key starts with '{prefix}{BACKBONE}'); this is not a GR00T N1.5 "
            f"checkpoint.\n{DOWNLOAD_HELP}"
        )
    return CheckpointFiles(directory, prefix, files)


def plan_load(ckpt: CheckpointFiles, module_keys: Iterable[str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(module key -> checkpoint key to read, reason -> checkpoint keys not read). Raises on gaps, on a
    mix of SigLIP layouts, or on backbone tensors the rebuild has no place for."""
    by_layout = ckpt.siglip_keys
    layout = _majority(by_layout)
    other: SiglipLayout = "flat" if layout == "nested" else "nested"
    plan = {k: checkpoint_key(k, layout) for k in module_keys}
    embed_module_key = next((m for m, c in plan.items() if c == EMBED_KEY), None)
    if embed_module_key is not None and EMBED_KEY not in ckpt.files and LM_HEAD_KEY in ckpt.files:
        plan[embed_module_key] = LM_HEAD_KEY  # tied embeddings: lm_head holds the same matrix
    missing = sorted(c for c in plan.values() if c not in ckpt.files)
    if missing:
        hint, relocated = _siglip_hint(ckpt, missing, layout, other, by_layout)
        raise TeacherError(
            f"{ckpt.directory}: {len(missing)} backbone tensor(s) missing from the checkpoint, e.g. "
            f"{', '.join(ckpt.prefix + m for m in missing[:3])}. {hint}"
            + ("" if relocated else "The download is incomplete or this is not a GR00T N1.5 checkpoint (or the "
               f"teacher.preset does not match it).\n{DOWNLOAD_HELP}")
        )
    strays = by_layout[other]
    if strays:
        mine = by_layout[layout]
        raise TeacherError(
            f"{ckpt.directory}: the checkpoint mixes both SigLIP key layouts: {len(mine)} key(s) "
            f"{SIGLIP_LAYOUT_NAME[layout]}, e.g. {ckpt.prefix + mine[0]}, and {len(strays)} "
            f"{SIGLIP_LAYOUT_NAME[other]}, e.g. {ckpt.prefix + strays[0]}. One checkpoint must use one layout: "
            f"re-save it with all SigLIP keys nested ({ckpt.prefix + SIGLIP_PREFIX['nested']}*) or all flat "
            f"({ckpt.prefix + SIGLIP_PREFIX['flat']}embeddings.*, encoder.*, ...)."
        )
    wanted = set(plan.values())
    head_prefix = SIGLIP_PREFIX[layout] + "head."
    ignored: dict[str, list[str]] = {}
    unexpected = []
    for key in sorted(ckpt.files):
        if key in wanted:
            continue
        if key.startswith(ACTION_HEAD):
            reason = "action head"
        elif key.startswith(head_prefix):
            reason = "SigLIP pooling head (unused by GR00T)"
        elif key == LM_HEAD_KEY:
            reason = "lm_head (tied to embed_tokens)"
        elif key.startswith(BACKBONE):
            unexpected.append(key)
            continue
        else:
            reason = "outside the model (not backbone or action head)"
        ignored.setdefault(reason, []).append(key)
    if unexpected:
        raise TeacherError(
            f"{ckpt.directory}: {len(unexpected)} backbone tensor(s) that the GR00T N1.5 rebuild has no place for, "
            "e.g. "
            f"{', '.join(ckpt.prefix + k for k in unexpected[:3])}. The checkpoint's architecture differs from "
            "the preset (e.g. more language-model layers than 12): check teacher.preset and the checkpoint."
        )
    return plan, ignored


def _siglip_hint(
    ckpt: CheckpointFiles,
    missing: list[str],
    layout: SiglipLayout,
    other: SiglipLayout,
    by_layout: dict[SiglipLayout, list[str]],
) -> tuple[str, bool]:
    """What the SigLIP layout has to do with missing keys ('' when no SigLIP key is missing), and
    whether the missing keys are there, in the other layout (then that is the whole diagnosis)."""
    missing_vision = [k for k in missing if siglip_layout_of(k) is not None]
    if not missing_vision:
        return "", False
    if not any(by_layout.values()):
        return (
            f"The checkpoint has no SigLIP tensors in either layout (neither {SIGLIP_LAYOUT_NAME['nested']}, "
            f"{ckpt.prefix + SIGLIP_PREFIX['nested']}*, nor {SIGLIP_LAYOUT_NAME['flat']}, "
            f"{ckpt.prefix + SIGLIP_PREFIX['flat']}embeddings.* etc.). "
        ), False
    relocated = [
        (k, c) for k in missing_vision
        if (c := SIGLIP_PREFIX[other] + k.removeprefix(SIGLIP_PREFIX[layout])) in ckpt.files
    ]
    hint = f"The checkpoint stores SigLIP keys {SIGLIP_LAYOUT_NAME[layout]}"
    if relocated:
        return (
            f"{hint}, but {len(relocated)} of the missing tensor(s) are stored {SIGLIP_LAYOUT_NAME[other]} instead, "
            f"e.g. {ckpt.prefix + relocated[0][1]} for {ckpt.prefix + relocated[0][0]}: the checkpoint mixes both "
            "layouts; re-save it with all SigLIP keys in one."
        ), True
    return f"{hint}; none of the missing is stored {SIGLIP_LAYOUT_NAME[other]} either. ", False


def read_backbone_state_dict(
    directory: str | Path, module_shapes: Mapping[str, torch.Size]
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Read exactly the tensors a GrootBackbone with state-dict `module_shapes` needs.

    Returns the state dict (module keys, dtypes as stored) and the accounting."""
    from safetensors import SafetensorError, safe_open

    ckpt = open_checkpoint(directory)
    plan, ignored = plan_load(ckpt, module_shapes)
    by_file: dict[str, list[tuple[str, str]]] = {}
    for module_key, ckpt_key in plan.items():
        by_file.setdefault(ckpt.files[ckpt_key], []).append((module_key, ckpt_key))
    report = LoadReport(str(ckpt.directory), siglip_layout=ckpt.siglip_layout, ignored=ignored)
    state: dict[str, torch.Tensor] = {}
    for file_name in sorted(by_file):
        path = ckpt.path(file_name)
        if not path.is_file():
            raise TeacherError(
                f"{path}: listed in {INDEX_FILE} but missing (incomplete download).\n{DOWNLOAD_HELP}"
            )
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                present = set(f.keys())
                for module_key, ckpt_key in by_file[file_name]:
                    stored = ckpt.prefix + ckpt_key
                    if stored not in present:
                        raise TeacherError(f"{path}: {INDEX_FILE} says it holds {stored}, but it does not")
                    shape = tuple(f.get_slice(stored).get_shape())
                    if shape != tuple(module_shapes[module_key]):
                        raise TeacherError(
                            f"{path}: {stored} has shape {shape}, the preset needs {tuple(module_shapes[module_key])} "
                            "(wrong teacher.preset for this checkpoint?)"
                        )
                    tensor = f.get_tensor(stored)
                    state[module_key] = tensor
                    report.loaded[module_key] = stored
                    name = str(tensor.dtype).replace("torch.", "")
                    report.dtypes[name] = report.dtypes.get(name, 0) + 1
        except SafetensorError as e:
            raise TeacherError(f"{path}: cannot read ({e}); the file is truncated or corrupted") from None
        report.files_read.append(file_name)
    return state, report


def checkpoint_fingerprint(directory: str | Path) -> str:
    """A cheap content identity of a checkpoint's backbone: the safetensors headers of the files that
    hold backbone tensors plus the bytes of its 1-d tensors (norms, biases), which any fine-tuning
    changes. Reads a few MB, not the 2.7 GB. Key names are hashed as stored, so the same weights saved
    in the nested and the flat SigLIP layout get different fingerprints (a cache miss, never a wrong hit)."""
    from safetensors import safe_open

    ckpt = open_checkpoint(directory)
    h = hashlib.sha256()
    backbone_files = sorted({f for k, f in ckpt.files.items() if k.startswith(BACKBONE)})
    for file_name in backbone_files:
        path = ckpt.path(file_name)
        if not path.is_file():
            raise TeacherError(f"{path}: listed in {INDEX_FILE} but missing (incomplete download).\n{DOWNLOAD_HELP}")
        header = read_safetensors_header(path)
        h.update(file_name.encode())
        h.update(json.dumps({k: v for k, v in header.items() if k != "__metadata__"}, sort_keys=True).encode())
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in sorted(header):
                info = header[key]
                if key.startswith(ckpt.prefix + BACKBONE) and isinstance(info, dict) and len(info["shape"]) == 1:
                    h.update(f.get_tensor(key).contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]
