"""The GR00T N1.5 teacher: architecture size, checkpoint loading in GR00T's real key layout,
tokenizer and prompt layout, image scattering, rendering, views. All on the CPU with the tiny preset.

The real tokenizer is read from <repo>/../shared/groot_n15_tokenizer (never copied into the repo);
tests that need it skip when it is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sage.arc import Pair, Task
from sage.config import load_config
from sage.datasets import load_dataset
from sage.errors import ConfigError, TeacherError
from sage.teacher.backbone import GrootBackbone, build_backbone, count_parameters, random_state_dict
from sage.teacher.groot import Teacher, load_teacher
from sage.teacher.loading import checkpoint_fingerprint, read_backbone_state_dict
from sage.teacher.presets import GROOT_N15_BACKBONE_PARAMS, GROOT_N15_SIGLIP_HEAD_PARAMS, get_preset
from sage.teacher.prompt import Role, build_prompt, evaluation_prompts, view_example
from sage.teacher.render import ARC_PALETTE, BACKGROUND, IMAGE_SIZE, cell_size, render_grid, to_pixel_values
from sage.teacher.settings import TeacherConfig
from sage.teacher.tokenizer import IMG_CONTEXT_ID, SPECIAL_IDS, builtin_tokenizer, byte_alphabet, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO.parent / "shared" / "groot_n15_tokenizer"
TINY = get_preset("groot-n1.5-tiny")


@pytest.fixture(scope="session")
def real_tokenizer():
    if not (TOKENIZER_DIR / "vocab.json").is_file():
        pytest.skip(f"GR00T N1.5 tokenizer data not found at {TOKENIZER_DIR}")
    return load_tokenizer(TOKENIZER_DIR, allow_builtin=False)


@pytest.fixture(scope="session")
def arc_tasks():
    return load_dataset("arc-agi-1/training")


@pytest.fixture(scope="session")
def tiny_teacher():
    return load_teacher(TeacherConfig(), "cpu")


# ----------------------------------------------------------------------------- architecture


def test_real_preset_has_the_published_parameter_count():
    counts = count_parameters(get_preset("groot-n1.5"), with_pooling_head=True)
    assert counts.total == GROOT_N15_BACKBONE_PARAMS == 1_344_716_736
    assert (counts.vision_tower, counts.projector, counts.language_model) == (427_680_704, 2_361_344, 914_674_688)
    assert counts.pooling_head == GROOT_N15_SIGLIP_HEAD_PARAMS
    # What actually runs has no pooling head.
    assert count_parameters(get_preset("groot-n1.5"), with_pooling_head=False).total == 1_344_716_736 - 15_238_352


def test_describe_cli_prints_the_count(capsys):
    from extract_groot_features import main

    assert main(["--describe", "groot-n1.5"]) == 0
    assert "backbone parameters       1,344,716,736" in capsys.readouterr().out


def test_tiny_preset_keeps_the_real_token_geometry():
    assert TINY.tokens_per_image == get_preset("groot-n1.5").tokens_per_image == 256
    assert TINY.vocab_size > max(SPECIAL_IDS.values())  # the real tokenizer's ids index it directly


def test_tiny_random_weights_are_deterministic():
    a, _ = build_backbone(TINY, seed=3)
    b, _ = build_backbone(TINY, seed=3)
    c, _ = build_backbone(TINY, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["mlp1.weight"], sc["mlp1.weight"])


# ----------------------------------------------------------------------------- checkpoint loading

# GR00T N1.5's checkpoint layout, written out from GROOT_N15.md (deliberately not via sage's own mapping).
def groot_layout(module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in module_state.items():
        part, rest = key.split(".", 1)
        if part == "vision_model":
            rest = rest.removeprefix("vision_model.")
            out["backbone.eagle_model.vision_model.vision_model." + rest] = value
        elif part == "mlp1":
            out["backbone.eagle_model.mlp1.0." + rest] = value
        else:
            out["backbone.eagle_model.language_model.model." + rest] = value
    return out


def siglip_head_tensors() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        with_head = GrootBackbone(TINY, with_pooling_head=True)
    head = {k: v for k, v in with_head.state_dict().items() if ".head." in k}
    assert head, "the tiny tower should have a pooling head when asked for one"
    return {k: torch.full(v.shape, 7.0) for k, v in groot_layout(head).items()}


ACTION_HEAD = {
    "action_head.model.transformer_blocks.0.attn1.to_q.weight": torch.full((8, 8), 9.0),
    "action_head.state_encoder.layer1.W": torch.full((4, 8), 9.0),
}


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], n_files: int = 2, prefix: str = "") -> Path:
    """A GR00T-style checkpoint: backbone tensors over `n_files` shards with an index. The action head
    goes into its own file, which is NOT a valid safetensors file: a loader that opened it would fail."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {prefix + k: v.contiguous() for k, v in tensors.items()}
    backbone = sorted(k for k in tensors if not k.startswith(prefix + "action_head."))
    weight_map = {}
    if n_files == 1:
        save_file({k: tensors[k] for k in tensors}, str(directory / "model.safetensors"))
        return directory
    for i in range(n_files):
        name = f"model-{i + 1:05d}-of-{n_files + 1:05d}.safetensors"
        keys = backbone[i::n_files]
        save_file({k: tensors[k] for k in keys}, str(directory / name))
        weight_map.update({k: name for k in keys})
    action_file = f"model-{n_files + 1:05d}-of-{n_files + 1:05d}.safetensors"
    (directory / action_file).write_bytes(b"not a safetensors file: the loader must never open me")
    weight_map.update({k: action_file for k in tensors if k.startswith(prefix + "action_head.")})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@pytest.fixture(scope="module")
def tiny_weights():
    with torch.device("meta"):
        model = GrootBackbone(TINY)
    return random_state_dict(model, seed=11)  # module keys -> fp32 tensors


def module_outputs(model: GrootBackbone) -> torch.Tensor:
    ids = torch.tensor([[SPECIAL_IDS["<|im_start|>"], 30, SPECIAL_IDS["<img>"]] + [IMG_CONTEXT_ID] * 256 + [40, 41]])
    pixels = to_pixel_values([render_grid(np.arange(12, dtype=np.uint8).reshape(3, 4) % 10)])
    with torch.inference_mode():
        return model(ids, torch.ones_like(ids), pixels)


def test_loads_sharded_checkpoint_strictly(tmp_path, tiny_weights):
    tensors = {**groot_layout(tiny_weights), **siglip_head_tensors(), **ACTION_HEAD}
    tensors["backbone.eagle_model.language_model.lm_head.weight"] = tensors[
        "backbone.eagle_model.language_model.model.embed_tokens.weight"
    ].clone()
    ckpt = write_checkpoint(tmp_path / "ckpt", {k: v.to(torch.bfloat16) for k, v in tensors.items()})

    model, report = build_backbone(TINY, checkpoint_dir=str(ckpt))
    # Every tensor the module has came from the checkpoint, from the documented key...
    assert set(report.loaded) == set(model.state_dict())
    assert set(report.loaded.values()) == set(groot_layout(tiny_weights))
    # ...and nothing else was read: the action head, the SigLIP head and the tied lm_head were skipped.
    assert sorted(report.ignored["action head"]) == sorted(ACTION_HEAD)
    assert len(report.ignored["SigLIP pooling head (unused by GR00T)"]) == len(siglip_head_tensors())
    assert report.ignored["lm_head (tied to embed_tokens)"] == ["backbone.eagle_model.language_model.lm_head.weight"]
    assert sum(len(v) for v in report.ignored.values()) + len(report.loaded) == len(tensors)
    assert len(report.files_read) == 2 and report.dtypes == {"bfloat16": len(report.loaded)}
    # Values arrive intact (bf16 in the file, fp32 module).
    state = model.state_dict()
    for key, value in tiny_weights.items():
        assert torch.equal(state[key], value.to(torch.bfloat16).float()), key


def test_lm_head_stands_in_for_embed_tokens_and_loaded_model_matches_random_init(tmp_path, tiny_weights):
    tensors = groot_layout(tiny_weights)
    embed = tensors.pop("backbone.eagle_model.language_model.model.embed_tokens.weight")
    tensors["backbone.eagle_model.language_model.lm_head.weight"] = embed
    ckpt = write_checkpoint(tmp_path / "ckpt", {**tensors, **ACTION_HEAD}, n_files=3)
    model, report = build_backbone(TINY, checkpoint_dir=str(ckpt))
    assert report.loaded["language_model.embed_tokens.weight"] == "backbone.eagle_model.language_model.lm_head.weight"
    assert "lm_head (tied to embed_tokens)" not in report.ignored
    # Reference built the plain way (no meta device: transformers initialises every buffer itself),
    # with the same weights: the loaded model, incl. its recomputed RoPE and position buffers, must
    # compute exactly the same function.
    reference = GrootBackbone(TINY).eval()
    reference.load_state_dict(tiny_weights)
    assert torch.equal(module_outputs(model), module_outputs(reference))
    assert torch.equal(module_outputs(build_backbone(TINY, seed=11)[0]), module_outputs(reference))


def test_lerobot_single_file_without_siglip_head(tmp_path, tiny_weights):
    tensors = {**groot_layout(tiny_weights), **ACTION_HEAD}
    ckpt = write_checkpoint(tmp_path / "ckpt", tensors, n_files=1, prefix="_groot_model.")
    state, report = read_backbone_state_dict(ckpt, {k: v.shape for k, v in tiny_weights.items()})
    assert set(state) == set(tiny_weights)
    assert all(v.startswith("_groot_model.backbone.eagle_model.") for v in report.loaded.values())
    assert sorted(report.ignored) == ["action head"]


def test_checkpoint_errors_say_what_is_wrong(tmp_path, tiny_weights):
    with pytest.raises(TeacherError, match=r"does not exist[\s\S]*huggingface-cli download nvidia/GR00T-N1.5-3B"):
        build_backbone(TINY, checkpoint_dir=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match=r"neither model.safetensors.index.json nor model.safetensors"):
        build_backbone(TINY, checkpoint_dir=str(tmp_path / "empty"))

    tensors = groot_layout(tiny_weights)
    missing = dict(tensors)
    del missing["backbone.eagle_model.language_model.model.layers.1.mlp.up_proj.weight"]
    ckpt = write_checkpoint(tmp_path / "missing", missing)
    with pytest.raises(TeacherError, match=r"1 backbone tensor\(s\) missing[\s\S]*layers\.1\.mlp\.up_proj\.weight"):
        build_backbone(TINY, checkpoint_dir=str(ckpt))

    extra = dict(tensors)
    extra["backbone.eagle_model.language_model.model.layers.2.mlp.up_proj.weight"] = torch.zeros(3)
    ckpt = write_checkpoint(tmp_path / "extra", extra)
    with pytest.raises(TeacherError, match=r"no place for, e\.g\. .*layers\.2\.mlp\.up_proj\.weight"):
        build_backbone(TINY, checkpoint_dir=str(ckpt))

    wrong = dict(tensors)
    wrong["backbone.eagle_model.mlp1.0.weight"] = torch.zeros(64, 32)
    ckpt = write_checkpoint(tmp_path / "wrong", wrong)
    with pytest.raises(TeacherError, match=r"mlp1\.0\.weight has shape \(64, 32\), the preset needs \(64, 64\)"):
        build_backbone(TINY, checkpoint_dir=str(ckpt))


def test_checkpoint_fingerprint_sees_fine_tuning(tmp_path, tiny_weights):
    tensors = groot_layout(tiny_weights)
    a = checkpoint_fingerprint(write_checkpoint(tmp_path / "a", tensors))
    assert checkpoint_fingerprint(write_checkpoint(tmp_path / "a2", tensors)) == a
    tuned = dict(tensors)
    key = "backbone.eagle_model.language_model.model.norm.weight"
    tuned[key] = tuned[key] * 1.01
    assert checkpoint_fingerprint(write_checkpoint(tmp_path / "b", tuned)) != a


NESTED_SIGLIP = "backbone.eagle_model.vision_model.vision_model."
FLAT_SIGLIP = "backbone.eagle_model.vision_model."


def flat_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same checkpoint with SigLIP saved flat, as transformers 5 saves SiglipVisionModel."""
    return {FLAT_SIGLIP + k.removeprefix(NESTED_SIGLIP) if k.startswith(NESTED_SIGLIP) else k: v
            for k, v in tensors.items()}


def tiny_shapes(tiny_weights: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in tiny_weights.items()}


@pytest.mark.parametrize("n_files, prefix", [(2, ""), (1, "_groot_model.")])
def test_flat_siglip_layout_loads_like_nested(tmp_path, tiny_weights, n_files, prefix):
    nested = {**groot_layout(tiny_weights), **siglip_head_tensors(), **ACTION_HEAD}
    flat = flat_layout(nested)
    assert len(flat) == len(nested) and f"{FLAT_SIGLIP}embeddings.patch_embedding.weight" in flat
    a = write_checkpoint(tmp_path / "nested", nested, n_files=n_files, prefix=prefix)
    b = write_checkpoint(tmp_path / "flat", flat, n_files=n_files, prefix=prefix)
    (model_a, report_a), (model_b, report_b) = build_backbone(TINY, checkpoint_dir=str(a)), build_backbone(
        TINY, checkpoint_dir=str(b)
    )
    assert (report_a.siglip_layout, report_b.siglip_layout) == ("nested", "flat")
    assert set(report_b.loaded.values()) == {prefix + k for k in flat_layout(groot_layout(tiny_weights))}
    assert sorted(report_b.ignored["SigLIP pooling head (unused by GR00T)"]) == sorted(
        flat_layout(siglip_head_tensors())
    )
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert torch.equal(module_outputs(model_a), module_outputs(model_b))
    # The feature-cache identity works on the flat layout too: stable, and it sees fine-tuning.
    fp = checkpoint_fingerprint(b)
    assert fp.startswith("sha256:") and checkpoint_fingerprint(b) == fp
    tuned = dict(flat)
    tuned[FLAT_SIGLIP + "post_layernorm.weight"] = tuned[FLAT_SIGLIP + "post_layernorm.weight"] * 1.01
    assert checkpoint_fingerprint(write_checkpoint(tmp_path / "tuned", tuned, n_files=n_files, prefix=prefix)) != fp


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_missing_siglip_keys_are_named_in_the_checkpoints_layout(tmp_path, tiny_weights, layout):
    tensors = groot_layout(tiny_weights)
    to_layout = flat_layout if layout == "flat" else dict
    siglip = NESTED_SIGLIP if layout == "nested" else FLAT_SIGLIP
    one_gone = to_layout(tensors)
    del one_gone[siglip + "post_layernorm.bias"]
    ckpt = write_checkpoint(tmp_path / "one", one_gone)
    with pytest.raises(TeacherError) as err:
        read_backbone_state_dict(ckpt, tiny_shapes(tiny_weights))
    message = str(err.value)
    assert f"{ckpt}: 1 backbone tensor(s) missing from the checkpoint, e.g. {siglip}post_layernorm.bias." in message
    assert f"stores SigLIP keys {layout}" in message and "huggingface-cli download" in message

    no_tower = {k: v for k, v in to_layout({**tensors, **siglip_head_tensors()}).items()
                if not k.startswith(siglip) or ".head." in k}  # only the unused pooling head is left
    ckpt = write_checkpoint(tmp_path / "none", no_tower, n_files=1, prefix="_groot_model.")
    n_tower = sum(k.startswith("vision_model.") for k in tiny_weights)
    with pytest.raises(TeacherError, match=rf"{n_tower} backbone tensor\(s\) missing[\s\S]*_groot_model\.{siglip}"
                       rf"[\s\S]*stores SigLIP keys {layout}"):
        read_backbone_state_dict(ckpt, tiny_shapes(tiny_weights))
    no_vision = {k: v for k, v in tensors.items() if not k.startswith(FLAT_SIGLIP)}
    ckpt = write_checkpoint(tmp_path / "no_vision", no_vision)
    with pytest.raises(TeacherError, match=r"no SigLIP tensors in either layout \(neither nested .* nor flat"):
        read_backbone_state_dict(ckpt, tiny_shapes(tiny_weights))


def test_a_mix_of_siglip_layouts_is_refused(tmp_path, tiny_weights):
    nested = groot_layout(tiny_weights)
    both = {**nested, **flat_layout(nested)}  # every SigLIP tensor twice, once in each layout
    ckpt = write_checkpoint(tmp_path / "both", both, prefix="_groot_model.")
    with pytest.raises(TeacherError, match=r"mixes both SigLIP key layouts: (\d+) key\(s\) nested .*, e\.g\. "
                       r"_groot_model\.backbone\.eagle_model\.vision_model\.vision_model\..*and \1 flat"):
        build_backbone(TINY, checkpoint_dir=str(ckpt))
    # A pooling head in the other layout is a mix too, though the head itself is never read.
    flat_head = flat_layout(siglip_head_tensors())
    ckpt = write_checkpoint(tmp_path / "stray_head", {**nested, **flat_head})
    with pytest.raises(TeacherError, match=rf"mixes both SigLIP key layouts: .* {len(flat_head)} flat .*e\.g\. "
                       rf"{FLAT_SIGLIP}head\.[\s\S]*re-save it with all SigLIP keys nested"):
        build_backbone(TINY, checkpoint_dir=str(ckpt))


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_missing_key_error_points_at_the_other_layout(tmp_path, tiny_weights, layout):
    tensors = groot_layout(tiny_weights) if layout == "nested" else flat_layout(groot_layout(tiny_weights))
    mine, other = (NESTED_SIGLIP, FLAT_SIGLIP) if layout == "nested" else (FLAT_SIGLIP, NESTED_SIGLIP)
    moved = "embeddings.patch_embedding.weight"
    tensors[other + moved] = tensors.pop(mine + moved)  # one tensor saved in the other layout
    ckpt = write_checkpoint(tmp_path / "ckpt", tensors)
    other_name = "flat" if layout == "nested" else "nested"
    with pytest.raises(TeacherError) as err:
        build_backbone(TINY, checkpoint_dir=str(ckpt))
    message = str(err.value)
    assert f"missing from the checkpoint, e.g. {mine}{moved}." in message
    assert f"stores SigLIP keys {layout}" in message
    assert f"1 of the missing tensor(s) are stored {other_name}" in message
    assert f"e.g. {other}{moved} for {mine}{moved}: the checkpoint mixes both layouts; re-save it" in message
    assert "download" not in message  # the tensor is there, in the other layout: not an incomplete download


def test_real_preset_without_files_says_what_to_download(tmp_path):
    cfg = load_config(None, ["teacher.preset=groot-n1.5"])
    with pytest.raises(TeacherError, match="huggingface-cli download nvidia/GR00T-N1.5-3B"):
        load_teacher(cfg.teacher, "cpu")
    cfg = load_config(None, ["teacher.preset=groot-n1.5", f"teacher.checkpoint_dir={tmp_path}"])
    with pytest.raises(TeacherError, match="Isaac-GR00T"):
        load_teacher(cfg.teacher, "cpu")


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    from extract_groot_features import main

    assert main(["--set", "teacher.preset=groot-n1.5", "--set", f"teacher.cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: teacher.preset groot-n1.5 needs teacher.checkpoint_dir") and "Traceback" not in err
    assert main(["--set", "teacher.view=everything"]) == 2
    assert "teacher.view must be one of task_context, test_input, with_answer" in capsys.readouterr().err


def test_teacher_config_schema():
    cfg = load_config(None, ["teacher.batch_size=8", "teacher.token_features=true"])
    assert (cfg.teacher.batch_size, cfg.teacher.token_features, cfg.teacher.preset) == (8, True, "groot-n1.5-tiny")
    with pytest.raises(ConfigError, match="unknown key 'teacher.weights'"):
        load_config(None, ["teacher.weights=x"])
    with pytest.raises(ConfigError, match="teacher.feature_dtype must be one of"):
        load_config(None, ["teacher.feature_dtype=int8"])


# ----------------------------------------------------------------------------- tokenizer and prompt


def test_real_tokenizer_ids_and_reference_prompt(real_tokenizer):
    for token, expected in SPECIAL_IDS.items():
        assert real_tokenizer.encode(token) == [expected]
    # The reference count from the tokenizer's README: one image + "pick up the apple" = 286 tokens.
    assert len(real_tokenizer.encode(build_prompt(1, "pick up the apple"))) == 286
    assert real_tokenizer.decode(real_tokenizer.encode("Solve: 3 grids.")) == "Solve: 3 grids."


def test_builtin_tokenizer_uses_real_ids(real_tokenizer):
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text())
    assert [vocab[ch] for ch in byte_alphabet()] == list(range(256))
    builtin = builtin_tokenizer()
    text = build_prompt(3, "What is the output grid? é")
    ids = builtin.encode(text)
    assert builtin.decode(ids) == text == real_tokenizer.decode(ids)  # every id means the same to the real one
    special = [i for i in ids if i >= 151643]
    assert special == [i for i in real_tokenizer.encode(text) if i >= 151643]  # same special-token layout


@pytest.mark.parametrize("n_images", [1, 3, 9, 10, 21])
def test_prompt_layout_and_length(real_tokenizer, n_images):
    instruction = "What is the output grid for the test input?"
    ids = real_tokenizer.encode(build_prompt(n_images, instruction))
    n_instr = len(real_tokenizer.encode(instruction))
    extra_digits = max(0, n_images - 9)  # "<image 10>" onwards is 6 tokens instead of 5
    assert len(ids) == 19 + 263 * n_images + extra_digits + n_instr
    head = real_tokenizer.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert ids[: len(head)] == head and len(head) == 14
    assert ids[-5:] == real_tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n")
    # N runs of exactly 256 <IMG_CONTEXT>, each between <img> and </img>, in order.
    arr = np.array(ids)
    starts = np.flatnonzero(arr == SPECIAL_IDS["<img>"])
    assert len(starts) == n_images
    for s in starts:
        assert (arr[s + 1 : s + 257] == IMG_CONTEXT_ID).all() and arr[s + 257] == SPECIAL_IDS["</img>"]
    assert (arr == IMG_CONTEXT_ID).sum() == 256 * n_images


def test_image_features_land_exactly_on_img_context_positions(tiny_teacher, arc_tasks):
    teacher: Teacher = tiny_teacher
    examples = [first_prompt(arc_tasks[0], "task_context", 2), first_prompt(arc_tasks[1], "test_input", 2)]
    batch = teacher.encode(examples)
    captured = {}
    hook = teacher.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True
    )
    try:
        with torch.inference_mode():
            teacher.model(batch.input_ids, batch.attention_mask, batch.pixel_values)
    finally:
        hook.remove()
    embeds = captured["inputs_embeds"]
    with torch.inference_mode():
        text = teacher.model.language_model.embed_tokens(batch.input_ids)
        images = teacher.model.mlp1(teacher.model.vision_model(pixel_values=batch.pixel_values).last_hidden_state)
    is_image = batch.input_ids == IMG_CONTEXT_ID
    assert torch.equal(embeds[~is_image], text[~is_image])  # text (and padding) untouched
    # Image k of the batch (prompt 0's 5 images, then prompt 1's one) fills the k-th run of 256 slots.
    assert torch.equal(embeds[is_image].view(-1, 256, embeds.shape[-1]), images)
    assert batch.pixel_values.shape[0] == 6 and int(is_image.sum()) == 6 * 256
    # Left padding: the shorter prompt is padded on the left and masked.
    assert batch.attention_mask[1, 0] == 0 and batch.attention_mask[:, -1].all()


def test_features_do_not_depend_on_batch_mates(tiny_teacher, arc_tasks):
    long = first_prompt(arc_tasks[2], "task_context", 10)
    short = first_prompt(arc_tasks[3], "test_input", 10)
    alone = tiny_teacher.features([short])[0]
    together = tiny_teacher.features([long, short])[1]  # short is left-padded by ~2,000 tokens here
    assert together.n_tokens == alone.n_tokens
    torch.testing.assert_close(together.pooled, alone.pooled, rtol=1e-4, atol=1e-5)


def test_nvidia_position_convention_gives_the_same_features(tiny_teacher, arc_tasks):
    """We count positions from each prompt's first real token; NVIDIA uses 0..L-1 for every row
    (shifted by the padding). RoPE sees only differences, so the two must agree."""
    model = tiny_teacher.model
    examples = [first_prompt(arc_tasks[2], "task_context", 3), first_prompt(arc_tasks[3], "test_input", 3)]
    batch = tiny_teacher.encode(examples)
    with torch.inference_mode():
        ours = model(batch.input_ids, batch.attention_mask, batch.pixel_values)
        embeds = model.language_model.embed_tokens(batch.input_ids)
        slots = (batch.input_ids == IMG_CONTEXT_ID).unsqueeze(-1)
        embeds = embeds.masked_scatter(slots, model.image_embeddings(batch.pixel_values))
        nvidia = model.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask).last_hidden_state
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], nvidia[real], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- rendering and views


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (30, 30), (30, 2)])
def test_render_shows_colours_and_size(shape):
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 10, size=shape).astype(np.uint8)
    image = render_grid(grid)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
    h, w = shape
    cell = cell_size(h, w)
    # The grid's extent is exactly (h * cell + 1) x (w * cell + 1) non-background pixels: the size is visible.
    drawn = (image != BACKGROUND).any(-1)
    rows, cols = np.flatnonzero(drawn.any(1)), np.flatnonzero(drawn.any(0))
    assert (len(rows), len(cols)) == (h * cell + 1, w * cell + 1)
    top, left = rows[0], cols[0]
    for r in range(h):
        for c in range(w):
            centre = image[top + 1 + r * cell + cell // 2, left + 1 + c * cell + cell // 2]
            assert (centre == ARC_PALETTE[grid[r, c]]).all()
    assert not (ARC_PALETTE == BACKGROUND).all(-1).any()  # background is no ARC colour
    pixels = to_pixel_values([image])
    assert pixels.shape == (1, 3, 224, 224) and pixels.min() >= -1 and pixels.max() <= 1


def first_prompt(task: Task, view: str, max_demos: int):
    """The prompt evaluation builds for the task's first test input."""
    return evaluation_prompts([task], view, max_demos)[0]


def _task_with_answer(answer: np.ndarray) -> Task:
    g = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    return Task("t", (Pair(g, g.T.copy()), Pair(g + 1, (g + 1).T.copy())), (Pair(g + 2, answer),), "test")


def test_views_show_the_right_grids():
    task = _task_with_answer(np.full((2, 2), 9, dtype=np.uint8))
    ctx = first_prompt(task, "task_context", 10)
    assert [str(r) for r in ctx.roles] == [
        "train/0/input", "train/0/output", "train/1/input", "train/1/output", "test/0/input"
    ]
    assert not any((g == 9).all() for g in ctx.grids)
    assert [str(r) for r in first_prompt(task, "test_input", 10).roles] == ["test/0/input"]
    assert first_prompt(task, "with_answer", 10).roles[-1] == Role("test", 0, "output")
    assert len(first_prompt(task, "task_context", 1).grids) == 3  # max_demos keeps the first demos
    # A training example (query = demonstration 0, the others as context, in the student's order):
    # its own answer is never shown, and the prompt ends with its input.
    loo = view_example(task, (2, 1), 0, "task_context", 10)
    assert [str(r) for r in loo.roles] == [
        "test/0/input", "test/0/output", "train/1/input", "train/1/output", "train/0/input"
    ]
    assert loo.key == "t/q0/d2.1"
    assert [str(r) for r in view_example(task, (2, 1), 0, "with_answer", 10).roles][-2:] == [
        "train/0/input", "train/0/output"]


def test_teacher_never_sees_the_answer_except_in_with_answer(tiny_teacher):
    a = _task_with_answer(np.full((2, 2), 9, dtype=np.uint8))
    b = _task_with_answer(np.full((5, 3), 6, dtype=np.uint8))
    for view in ("task_context", "test_input"):
        fa, fb = tiny_teacher.features([first_prompt(a, view, 10), first_prompt(b, view, 10)])
        assert torch.equal(fa.pooled, fb.pooled), view
    fa, fb = tiny_teacher.features([first_prompt(a, "with_answer", 10), first_prompt(b, "with_answer", 10)])
    assert not torch.allclose(fa.pooled[-1], fb.pooled[-1])


def test_a_checkpoint_that_fails_to_load_leaves_no_cache_behind(tmp_path, tiny_weights, arc_tasks):
    """Extraction with a broken checkpoint stops with the loader's message and leaves no cache
    directory (whose manifest would refuse the fixed checkpoint); the fixed one then extracts."""
    from sage.distill import prompts_for_dataset
    from sage.extraction import run_extraction, teacher_tasks

    tensors = groot_layout(tiny_weights)
    broken = {k: v for k, v in tensors.items() if not k.endswith("layers.1.mlp.up_proj.weight")}
    ckpt = write_checkpoint(tmp_path / "ckpt", broken)
    cfg = load_config(None, [f"teacher.checkpoint_dir={ckpt}", f"teacher.cache_dir={tmp_path / 'features'}",
                             "teacher.max_demos=2", "run.device=cpu"])
    prompts = prompts_for_dataset(cfg, *teacher_tasks(cfg.teacher, cfg.data, 1))
    with pytest.raises(TeacherError, match=r"missing[\s\S]*layers\.1\.mlp\.up_proj\.weight"):
        run_extraction(cfg.teacher, cfg.data, prompts, limit=1, progress=False, log=lambda _: None)
    assert not (tmp_path / "features").exists() or not any((tmp_path / "features").rglob("manifest.json"))
    for f in ckpt.iterdir():
        f.unlink()
    write_checkpoint(ckpt, tensors)  # fixed in place: same directory, now complete
    result = run_extraction(cfg.teacher, cfg.data, prompts, limit=1, progress=False, log=lambda _: None)
    assert result.status["complete"] and result.computed == len(prompts) > 0


def test_auto_dtype_is_bf16_where_native_fp16_on_older_gpus_and_fp32_on_cpus(monkeypatch):
    import sage.teacher.groot as groot

    cuda = torch.device("cuda")  # nothing runs on a GPU: the choice alone
    monkeypatch.setattr(groot, "has_native_bf16", lambda device: True)
    assert groot.resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(groot, "has_native_bf16", lambda device: False)  # V100, T4, RTX 20xx
    assert groot.resolve_dtype("auto", cuda) == torch.float16
    assert groot.resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_fp16_features_match_fp32_on_every_prompt(tmp_path):
    """benchmarks/teacher_precision.py on the tiny backbone (random weights): fp16's pooled
    features against fp32's on every evaluation prompt of 3 tasks, and no layer near fp16's limit.
    (The full-size backbone's fp16 needs a GPU: the GPU check's teacher_precision stage.)"""
    from benchmarks.teacher_precision import main

    assert main(["--tasks", "3", "--json", str(tmp_path / "precision.json")]) == 0
    report = json.loads((tmp_path / "precision.json").read_text())
    assert len(report["prompts"]) >= 3 and report["min_cosine"] >= 0.999
    assert len(report["layers"]) == 4 and report["overflowing_layers"] == []  # 2 SigLIP + 2 Qwen3 layers
