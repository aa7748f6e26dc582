"""The student model: size of the default preset, shapes, and behaviour under padding."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sage.arc import Augmentation
from sage.datasets import load_dataset
from sage.encoding import ARCExamples, collate, evaluation_examples, grid_to_canvas
from sage.model import PRESETS, SageStudent, StudentConfig, dihedral_pair_views, dihedral_query_views, view_agreement

REPO = Path(__file__).resolve().parents[1]


def test_default_preset_is_44m_and_cli_prints_breakdown():
    out = subprocess.run([sys.executable, "sage_student_model.py"], cwd=REPO, capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("total parameters: ")
    total = int(lines[-1].split(": ")[1].replace(",", ""))
    assert 43_000_000 <= total <= 45_000_000
    for component in ("encoder", "decoder", "distill_head", "cell_head"):
        assert any(line.split()[0] == component for line in lines[1:-1])
    with torch.device("meta"):
        assert sum(p.numel() for p in SageStudent(PRESETS["sage-44m"]).parameters()) == total


def tiny_batch(n=3, grid_size=30):
    tasks = load_dataset("arc-agi-1/evaluation")[:n]
    data = ARCExamples(tasks, evaluation_examples(tasks)[:n], grid_size, 10, 4096)
    return data, [data[i] for i in range(n)]


def test_forward_shapes_and_slot_mask():
    torch.manual_seed(0)
    cfg = StudentConfig(d_model=32, n_heads=4, encoder_layers=1, decoder_layers=1, teacher_dim=48, distill_hidden=16)
    model = SageStudent(cfg).eval()
    data, items = tiny_batch()
    out = model(collate(items))
    assert out.logits.shape == (3, 900, 12)
    assert out.grid_features.shape == (3, 21, 48)
    for b, item in enumerate(items):
        slots = set(np.unique(item["segments"]).tolist())
        assert out.grid_mask[b].nonzero().flatten().tolist() == sorted(slots)


@pytest.mark.parametrize("variant", [{}, {"task_slot": True},
                                     {"task_slot": True, "answer_views": True, "view_agreement": True}])
def test_predictions_do_not_depend_on_batch_padding(variant):
    torch.manual_seed(0)
    task_slot = variant.get("task_slot", False)
    cfg = StudentConfig(d_model=32, n_heads=4, encoder_layers=2, decoder_layers=1, teacher_dim=16, distill_hidden=16,
                        **variant)
    model = SageStudent(cfg).eval()
    _, items = tiny_batch()
    alone = model(collate(items[:1]))
    padded = model(collate(items))  # item 0 is now padded to the longest context of the three
    torch.testing.assert_close(padded.logits[0], alone.logits[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(padded.grid_features[0], alone.grid_features[0], atol=1e-5, rtol=1e-4)
    if task_slot:
        torch.testing.assert_close(padded.task_features[0], alone.task_features[0], atol=1e-5, rtol=1e-4)


def test_task_slot_is_read_by_the_decoder_and_absent_when_off():
    cfg = StudentConfig(d_model=32, n_heads=4, encoder_layers=1, decoder_layers=1, teacher_dim=48, distill_hidden=16)
    torch.manual_seed(0)
    plain = SageStudent(cfg)
    torch.manual_seed(0)
    with_slot = SageStudent(StudentConfig(**{**cfg.__dict__, "task_slot": True})).eval()
    # Off, the model is the one checkpoints were written with: no new weights.
    assert set(with_slot.state_dict()) - set(plain.state_dict()) == {"task_emb", "task_to_canvas.weight",
                                                                    "task_to_canvas.bias"}
    _, items = tiny_batch()
    batch = collate(items)
    out = with_slot(batch)
    assert out.task_features.shape == (3, 48) and plain.eval()(batch).task_features is None
    assert out.grid_features.shape == (3, 21, 48)  # the task token is no grid slot
    with torch.no_grad():
        with_slot.task_emb.add_(torch.randn(32, generator=torch.Generator().manual_seed(1)))
    moved = with_slot(batch)
    # The answer depends on the task token (with no dependency the same arithmetic repeats bit for bit).
    assert (moved.logits - out.logits).abs().max() > 1e-6
    assert (moved.task_features - out.task_features).abs().max() > 1e-6


def test_batch_canvas_prediction_does_not_depend_on_batch_mates():
    """With model.answer_canvas "batch" each example's answer cells attend only to its own canvas:
    its logits are the same alone and beside a batch-mate with a larger canvas, while the batch
    computes far fewer cells than the fixed 30x30 canvas."""
    torch.manual_seed(0)
    model = SageStudent(StudentConfig(d_model=32, n_heads=4, encoder_layers=1, decoder_layers=1,
                                      teacher_dim=16, distill_hidden=16)).eval()
    tasks = load_dataset("arc-agi-1/evaluation")[:40]
    data = ARCExamples(tasks, evaluation_examples(tasks), 30, 10, 8704, answer_canvas="batch")
    areas = data.shapes.prod(1)
    small = int(np.argmin(areas))
    (r, c) = data.shapes[small]
    larger = (areas < 900) & (data.shapes[:, 0] >= r) & (data.shapes[:, 1] >= c)
    large = int(np.argmax(np.where(larger, areas, 0)))
    (R, C) = data.shapes[large]
    assert r <= R and c <= C and r * c < R * C
    with torch.no_grad():
        alone = model(collate([data[small]])).logits
        paired = collate([data[small], data[large]])
        beside = model(paired).logits
    assert alone.shape[1] == r * c and beside.shape[1] == R * C < 900
    own = beside[0].view(R, C, -1)[:r, :c].reshape(r * c, -1)
    torch.testing.assert_close(own, alone[0], rtol=1e-4, atol=1e-5)
    assert paired["answer_mask"][0].sum() == r * c and paired["answer_mask"][1].all()
    fixed = ARCExamples(tasks, evaluation_examples(tasks), 30, 10, 8704, answer_canvas="fixed")
    assert collate([fixed[small]])["query"].shape[1] == 900 and "answer_mask" not in collate([fixed[small]])


@pytest.mark.slow
def test_answer_views_let_the_decoder_carry_out_a_rotation():
    """model.answer_views: each answer cell attends over the test input's 8 dihedral views. With
    them a tiny student learns to rotate grids by 90 degrees in 200 steps, where the same student
    without them, attending across the canvas, gets almost no grid right (measured: 1.00 vs 0.01
    of 128 held-out grids; seeds 0-4: 1.00 vs at most 0.04 each, and with views 0.70-1.00 after 175
    steps, 0.06-0.51 after 125: the rule is learnt late, so fewer steps would not show it)."""
    from sage.encoding import training_examples
    from sage.losses import answer_cross_entropy
    from sage.step import score_batch
    from sage.synthetic import generate_tasks

    tasks = generate_tasks(num_tasks=320, seed=0, transforms=["rot90"], min_side=2, max_side=5, demos=1)
    train, held_out = tasks[:256], tasks[256:]

    def batches(task_list, n):
        data = ARCExamples(task_list, training_examples(task_list), 6, 2, 200, answer_canvas="batch")
        return [collate([data[j] for j in range(i, min(i + n, len(data)))]) for i in range(0, len(data), n)]

    exact = {}
    for views in (False, True):
        torch.manual_seed(0)
        model = SageStudent(StudentConfig(d_model=32, n_heads=2, encoder_layers=1, decoder_layers=1, grid_size=6,
                                          max_demos=2, teacher_dim=16, distill_hidden=16, answer_views=views))
        optimizer = torch.optim.AdamW(model.parameters(), lr=6e-3)
        train_batches = batches(train, 32)
        for step in range(200):
            batch = train_batches[step % len(train_batches)]
            loss = answer_cross_entropy(model(batch).logits, batch["target"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            scores = [s for batch in batches(held_out, 64) for s in score_batch(model(batch).logits, batch, 6)]
        exact[views] = np.mean([s.exact for s in scores])
    assert exact[True] >= 0.8 and exact[False] <= 0.3, exact


@pytest.mark.parametrize("answer_canvas", ["batch", "fixed"])
def test_dihedral_views_show_each_grid_source_under_every_transform(answer_canvas):
    """model.answer_views / view_agreement: an answer cell reads view d of its test input, a
    demonstration output cell view d of its demonstration input, both as grid_to_canvas lays out
    Augmentation(d).apply of that input (border included), cut to the cell's own canvas. Real
    tasks of several shapes, square and not, in one batch."""
    tasks = [t for t in load_dataset("arc-agi-1/training") if max(t.test[0].input.shape) <= 12][:12]
    assert len({t.test[0].input.shape for t in tasks}) > 3 and any(
        t.test[0].input.shape[0] != t.test[0].input.shape[1] for t in tasks)
    data = ARCExamples(tasks, evaluation_examples(tasks), 30, 10, 8704, answer_canvas=answer_canvas)
    items = [data[i] for i in range(len(data))]
    batch = collate(items)
    views = dihedral_query_views(batch)
    R, C = int(batch["answer_rows"].max()) + 1, int(batch["answer_cols"].max()) + 1
    assert views.shape == (len(items), R * C, 8)
    assert torch.equal(views[..., 0], batch["query"])  # view 0 is the input itself
    pair_views, is_output = dihedral_pair_views(batch, max_demos=10)
    for b, item in enumerate(items):
        task = tasks[data.refs[int(item["index"])].task_index]
        for d in range(8):
            want = grid_to_canvas(Augmentation(d).apply(task.test[0].input), 30)[:R, :C].reshape(-1)
            assert np.array_equal(views[b, :, d].numpy(), want), (b, d)
        segments = batch["segments"][b].numpy()
        for k, pair in enumerate(task.train):
            cells = np.flatnonzero(segments == 2 * k + 1)
            assert is_output[b, cells].all() and not is_output[b, segments == 2 * k].any()
            h, w = pair.output.shape
            for d in range(8):
                want = grid_to_canvas(Augmentation(d).apply(pair.input), 31)[: h + 1, : w + 1].reshape(-1)
                assert np.array_equal(pair_views[b, cells, d].numpy(), want), (b, k, d)
        assert not is_output[b, ~batch["context_mask"][b]].any()


def test_view_agreement_names_the_dihedral_transform_of_real_tasks():
    """model.view_agreement: the ARC-AGI-1 training tasks whose outputs are their inputs rotated,
    flipped or transposed agree with that view on every demonstration output cell and with no other
    view everywhere; a colour mapping (0d3d703e) agrees with none everywhere."""
    dihedral = {"3c9b0459": 2, "6150a2bd": 2, "67a3c6ac": 5, "68b16354": 7, "74dd1130": 4, "9dfd6313": 4,
                "ed36ccf7": 1}
    other = "0d3d703e"  # a colour mapping: every cell keeps its place, colours change
    by_id = {t.id: t for t in load_dataset("arc-agi-1/training")}
    tasks = [by_id[i] for i in [*dihedral, other]]
    data = ARCExamples(tasks, evaluation_examples(tasks), 30, 10, 8704)
    items = [data[i] for i in range(len(data))]
    batch = collate(items)
    pair_views, is_output = dihedral_pair_views(batch, max_demos=10)
    agreement = view_agreement(pair_views, batch["tokens"], is_output)
    assert agreement.shape == (len(tasks), 8)
    for b, item in enumerate(items):
        task = tasks[data.refs[int(item["index"])].task_index]
        full = {int(d) for d in torch.nonzero(agreement[b] == 1.0)}
        if task.id == other:
            assert not full and agreement[b].max() > 0.1  # in part: borders, chance matches
        else:
            assert full == {dihedral[task.id]}, (task.id, agreement[b])


def test_shape_buckets_give_a_compiled_model_few_shapes_and_the_same_loss():
    """train.compile pads training batches to a few shapes; the padding is masked, so the loss and
    the answers are those of the unpadded batch."""
    from sage.encoding import CANVAS_BUCKET, bucketed_length, training_examples
    from sage.losses import answer_cross_entropy
    from sage.step import score_batch

    lengths = {bucketed_length(n) for n in range(1, 8705)}
    assert len(lengths) == 25 and max(lengths) >= 8704
    assert all(bucketed_length(n) >= n and bucketed_length(n) <= max(64, 1.2 * n) + 64 for n in range(1, 8705))
    tasks = load_dataset("arc-agi-1/training")[:8]
    data = ARCExamples(tasks, training_examples(tasks), grid_size=30, max_demos=3, max_context_tokens=4096,
                       answer_canvas="batch", fit_answer=True)
    torch.manual_seed(0)
    model = SageStudent(StudentConfig(d_model=32, n_heads=4, encoder_layers=1, decoder_layers=1, teacher_dim=16,
                                      distill_hidden=16)).eval()
    for start in (0, 4, 8):
        items = [data[i] for i in range(start, start + 4)]
        plain, bucketed = collate(items), collate(items, shape_buckets=True)
        assert bucketed["tokens"].shape[1] == bucketed_length(int(plain["context_mask"].sum(1).max()))
        rows, cols = (int(bucketed[k].max()) + 1 for k in ("answer_rows", "answer_cols"))
        assert rows % CANVAS_BUCKET == cols % CANVAS_BUCKET == 0 and plain["target"].shape[1] < rows * cols
        a, b = model(plain).logits, model(bucketed).logits
        loss = [answer_cross_entropy(x, batch["target"]) for x, batch in ((a, plain), (b, bucketed))]
        torch.testing.assert_close(loss[0], loss[1], atol=1e-5, rtol=1e-5)
        assert score_batch(a, plain, 30) == score_batch(b, bucketed, 30)
    # The keys the model reads do not depend on the batch (a compiled model guards on them), also
    # where every answer fills its canvas: then the mask is all true.
    tasks = load_dataset("arc-agi-1/training")
    every = ARCExamples(tasks, training_examples(tasks), grid_size=30, max_demos=3, max_context_tokens=4096,
                        answer_canvas="batch", fit_answer=True)
    fills = next(i for i, (r, c) in enumerate(every.shapes) if r % CANVAS_BUCKET == c % CANVAS_BUCKET == 0)
    full = [every[fills]]
    bucketed = collate(full, shape_buckets=True)
    assert "answer_mask" in bucketed and bucketed["answer_mask"].all() and "answer_mask" not in collate(full)


def test_flops_estimate_agrees_with_torch_counting_real_batches():
    """sage.model.forward_flops (what ttt.flops budgets in) is within 5% of torch's own count of the
    dense blocks' FLOPs, on real ARC batches from a small task to a near-30x30 one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from sage.model import forward_flops

    cfg = StudentConfig(d_model=64, n_heads=4, encoder_layers=2, decoder_layers=3, teacher_dim=16, distill_hidden=16)
    model = SageStudent(cfg).eval()
    tasks = load_dataset("arc-agi-1/evaluation")
    data = ARCExamples(tasks, evaluation_examples(tasks), 30, 10, 3840, answer_canvas="batch")
    areas = data.shapes.prod(1)
    for index in (int(np.argmin(areas)), int(np.argsort(areas)[len(areas) // 2]), int(np.argmax(areas))):
        batch = collate([data[index], data[(index + 1) % len(data)]])
        examples, context_tokens = batch["context_mask"].shape
        answer_cells = batch["query"].shape[1]
        # The math kernel spells attention out as matmuls, which FlopCounterMode counts on any backend.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            with FlopCounterMode(display=False) as whole:
                context, mask = model.encode(batch)
                model.decode(batch, context, mask)
        estimate = forward_flops(cfg, examples, context_tokens, answer_cells)
        assert estimate == pytest.approx(whole.get_total_flops(), rel=0.05), (index, context_tokens, answer_cells)
