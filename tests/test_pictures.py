"""What the pictures show: curves.png / training_curves.png over steps, and task pictures with their
demonstrations. Checked on matplotlib's objects (axes, lines, their data), not on pixels."""

import numpy as np
import pytest
from tiny import tiny_config

from sage.pictures import draw_task, task_figure
from sage.runlog import plot_training_curves, read_metrics, training_curves_figure
from sage.training import train


def lines(ax):
    """{legend label: (x data, y data)} of an Axes' labelled lines."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_curves_show_every_logged_step_and_validation_where_it_ran(tmp_path, two_epoch_run):
    summary, logs = two_epoch_run.summary, two_epoch_run.logs  # 2 epochs, a train record every 2 steps
    records = read_metrics(logs / "metrics.jsonl")
    train_steps = [r["step"] for r in records if r["event"] == "train"]
    val_steps = [r["step"] for r in records if r["event"] == "epoch"]
    assert len(val_steps) == 2 and val_steps[-1] == summary["step"]
    assert len([s for s in train_steps if s <= val_steps[0]]) > 2  # one epoch alone is a curve, not a dot

    fig = training_curves_figure(records, two_epoch_run.name)
    loss, accuracy = fig.axes  # no distillation in this run: no distillation panel
    curves = lines(loss)
    assert curves["train loss"][0] == train_steps
    assert curves["train loss"][1] == pytest.approx([r["loss"] for r in records if r["event"] == "train"])
    assert curves["validation loss (task)"][0] == val_steps
    curves = lines(accuracy)
    assert {k: v[0] for k, v in curves.items() if k != "best baseline exact match"} == {
        "exact match": val_steps, "output size": val_steps, "pixels (target cells)": val_steps}
    assert curves["exact match"][1] == [r["val_exact_match"] for r in records if r["event"] == "epoch"]
    assert all(ax.get_xlabel() == "step" for ax in fig.axes)

    png = logs / "curves.png"  # what training drew is this figure
    from PIL import Image
    assert Image.open(png).size == tuple(round(v) for v in fig.get_size_inches() * 100)
    assert plot_training_curves(logs / "metrics.jsonl", tmp_path / "again.png").is_file()


def test_curves_are_drawn_when_a_run_stops_early_and_after_resume_have_no_repeated_steps(tmp_path):
    train(tiny_config(tmp_path, "stop", "train.epochs=1"), stop_after_steps=5, echo=False)
    png = tmp_path / "logs" / "stop" / "curves.png"
    fig = training_curves_figure(read_metrics(png.with_name("metrics.jsonl")))
    assert png.is_file() and lines(fig.axes[0])["train loss"][0] == [2, 4]
    assert "validation loss (task)" not in lines(fig.axes[0])  # no validation yet

    summary = train(tiny_config(tmp_path, "stop", "train.epochs=1"), resume=True, echo=False)
    steps = lines(training_curves_figure(read_metrics(png.with_name("metrics.jsonl"))).axes[0])["train loss"][0]
    assert steps == list(range(2, summary["step"] + 1, 2))


def test_distillation_panel_starts_from_the_untrained_head_and_skipped_steps_are_marked():
    records = [
        {"event": "start", "step": 0, "val_feature_cosine": -0.03, "baselines": {"copy_input": {"exact_match": 0.1}}},
        *({"event": "train", "step": s, "loss": 3.0 - s / 10, "task_loss": 2.0 - s / 10, "distill_mse": 1.0,
           "distill_cosine": s / 10} for s in (2, 4, 6, 8)),
        {"event": "train", "step": 10, "loss": 2.0, "task_loss": 1.5},  # a batch without teacher targets
        {"event": "skipped", "step": 11, "epoch": 1, "in_a_row": 1},
        {"event": "epoch", "step": 12, "epoch": 1, "train_loss": 2.5, "val_loss": 1.9, "val_exact_match": 0.0,
         "val_size_accuracy": 0.5, "val_pixel_accuracy": 0.6, "val_feature_cosine": 0.4},
    ]
    fig = training_curves_figure(records)
    loss, distill, accuracy = fig.axes
    assert lines(loss)["train task loss"][0] == [2, 4, 6, 8, 10]
    assert lines(loss)["skipped step"][0] == [11, 11]  # a vertical line at the skipped step
    curves = lines(distill)
    assert curves["train distill cosine"][0] == [2, 4, 6, 8]
    assert curves["validation feature cosine"] == ([0, 12], [-0.03, 0.4])
    assert lines(accuracy)["best baseline exact match"][1] == [0.1, 0.1]
    assert training_curves_figure([records[0]]) is None  # nothing trained yet: no picture


def random_grid(rng, h, w):
    return rng.integers(0, 10, size=(h, w))


def test_task_picture_shows_ten_demonstrations_and_readable_30x30_grids(tmp_path):
    rng = np.random.default_rng(0)
    demos = [(random_grid(rng, 30, 30), random_grid(rng, 30, 30)) for _ in range(10)]
    targets = [random_grid(rng, 30, 30), random_grid(rng, 4, 7)]
    inputs = [random_grid(rng, 30, 30), random_grid(rng, 4, 7)]
    attempts = [[targets[0], random_grid(rng, 30, 30)], [random_grid(rng, 3, 3)]]  # test 1 solved, test 2 not

    fig = task_figure("t", inputs, targets, attempts, title="t: task score 0.50", demos=demos)
    titles = [ax.get_title() for ax in fig.axes if ax.axison]
    assert len(titles) == 2 * 10 + 4 + 3  # every demonstration pair; input, target, attempts per test input
    for i in range(1, 11):
        assert f"demo {i} input 30x30" in titles and f"demo {i} output 30x30" in titles
    assert {"test 1 input 30x30", "target 30x30", "test 2 input 4x7", "target 4x7"} <= set(titles)
    marks = {ax.get_title(): ax.title.get_color() for ax in fig.axes if ax.get_title().startswith("attempt")}
    assert marks == {"attempt 1 30x30 RIGHT": "green", "attempt 2 30x30 wrong": "firebrick",
                     "attempt 1 3x3 wrong": "firebrick"}
    fig.draw_without_rendering()  # lays the figure out as savefig does
    # the demonstrations sit above the test rows (display coordinates: y grows upwards)
    demo_bottom = min(ax.get_window_extent().y0 for ax in fig.axes if ax.get_title().startswith("demo"))
    test_top = max(ax.get_window_extent().y1 for ax in fig.axes if ax.get_title().startswith("test"))
    assert test_top < demo_bottom
    for ax in fig.axes:  # at the saved 100 dpi every 30x30 grid gets at least 5 pixels a cell
        if ax.get_title().endswith("30x30") or "30x30 " in ax.get_title():
            box = ax.get_window_extent()
            assert min(box.width, box.height) / 30 >= 5, ax.get_title()
    path = draw_task(tmp_path / "t.png", "t", inputs, targets, attempts, demos=demos)
    from PIL import Image
    assert Image.open(path).size == tuple(round(v) for v in fig.get_size_inches() * 100)


def test_task_picture_without_demonstrations_is_the_test_rows_alone():
    grid = np.zeros((3, 3), dtype=int)
    fig = task_figure("t", [grid], [grid], [[grid, grid]])
    assert len(fig.axes) == 4 and fig.axes[2].get_title() == "attempt 1 3x3 RIGHT"
