"""The plot command reads metrics.jsonl records and writes a PNG."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

from lsgd_jax.artifacts.plotting import curves
from lsgd_jax.training.metrics import paper_error


def _fake_run(path, errors, resumed_step=None):
    path.mkdir()
    records = [{"kind": "train", "step": s, "epoch": s / 10, "lr": 0.1, "loss": 2.0 / s,
                "top1_error": 0.5} for s in range(1, 31)]
    if resumed_step:  # a resumed run logs some steps twice; the later record wins
        records.append({"kind": "train", "step": resumed_step, "epoch": resumed_step / 10,
                        "lr": 0.1, "loss": 123.0, "top1_error": 0.5})
    records += [{"kind": "eval", "step": 10 * e, "epoch": e, "top1_error": err}
                for e, err in enumerate(errors, start=1)]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n{cut")
    return str(path)


def test_curves_deduplicate_and_skip_a_cut_line(tmp_path):
    run = _fake_run(tmp_path / "a", [0.5, 0.4, 0.3], resumed_step=5)
    c = curves(run)
    assert len(c["train_epoch"]) == 30
    assert c["train_loss"][4] == 123.0
    assert c["eval_error"] == pytest.approx([50.0, 40.0, 30.0])


def test_paper_error_is_the_median_of_the_last_five():
    assert paper_error([0.9, 0.8, 0.30, 0.25, 0.20, 0.22, 0.26]) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        paper_error([])


def test_plot_command_writes_a_png(tmp_path):
    a = _fake_run(tmp_path / "kn256", [0.5, 0.4, 0.3])
    b = _fake_run(tmp_path / "kn8k", [0.6, 0.45, 0.32])
    out = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "plot_curves.py"),
                             b, "--reference", a, "-o", str(out)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "plot_curves.py"),
                              str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr


def _config_json(path, **config):
    base = dict(batch_size=1024, base_lr=0.1, reference_batch_size=256, warmup_epochs=1,
                warmup="gradual", decay_epochs=[2, 3], decay_factor=0.1)
    base.update(config)
    (path / "config.json").write_text(json.dumps(
        {"config": base, "derived": {"steps_per_epoch": 4, "total_steps": 16}}))


def test_the_rate_is_drawn_from_the_schedule_at_every_step(tmp_path):
    from lsgd_jax.artifacts.plotting import schedule_curve

    run = _fake_run(tmp_path / "a", [0.5])
    _config_json(tmp_path / "a")
    epochs, rates = schedule_curve(run)
    assert len(epochs) == len(rates) == 32  # 16 steps, each drawn from t to t + 1
    # k = 4: 0.1 → 0.4 over 4 steps (0.1, 0.175, 0.25, 0.325), then 0.4, ×0.1 at epochs 2, 3.
    by_step = rates[::2]
    assert by_step == pytest.approx([0.1, 0.175, 0.25, 0.325] + [0.4] * 4 + [0.04] * 4
                                    + [0.004] * 4, rel=1e-6)
    assert epochs[:4] == pytest.approx([0.0, 0.25, 0.25, 0.5])
    assert schedule_curve(_fake_run(tmp_path / "b", [0.5])) is None  # no config.json


def test_a_poly_run_s_rate_is_drawn_from_its_poly_schedule(tmp_path):
    """--schedule poly: the curve is the run's own schedule, not the paper's steps."""
    from lsgd_jax.artifacts.plotting import schedule_curve
    from lsgd_jax.rules.schedules import poly_schedule

    run = _fake_run(tmp_path / "a", [0.5])
    _config_json(tmp_path / "a", schedule="poly", epochs=4, poly_power=2, end_lr=1e-3)
    rates = schedule_curve(run)[1][::2]
    expected = poly_schedule(batch_size=1024, steps_per_epoch=4, epochs=4, base_lr=0.1,
                             warmup_epochs=1, power=2, end_lr=1e-3)
    assert rates == pytest.approx([float(expected(t)) for t in range(16)], rel=1e-6)
    # tolerance: float32 schedule values; the step decay would hold 0.4 flat to epoch 2
    assert rates[4] == pytest.approx(0.4, rel=1e-6) and rates[5] < 0.4 * 0.99
    assert rates[-1] < 0.01


def test_the_png_goes_into_the_first_run_and_the_reference_is_drawn_once(tmp_path,
                                                                        monkeypatch):
    from lsgd_jax.artifacts import plotting

    a = _fake_run(tmp_path / "a", [0.5, 0.4])
    b = _fake_run(tmp_path / "b", [0.6, 0.45])
    drawn = []
    original = plotting.curves
    monkeypatch.setattr(plotting, "curves", lambda w: drawn.append(w) or original(w))
    path = plotting.plot_runs([a, b], reference=a)
    assert path == os.path.join(a, "curves.png")
    assert (tmp_path / "a" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert drawn == [a, b]  # the reference once, not again as a run


def test_a_short_window_at_an_epoch_end_is_folded_into_its_neighbour(tmp_path):
    # Windows of 10 steps, and one of a single step (closed by an evaluation) whose
    # error, over one batch, is far off; and a run that ends on a 2-step window.
    steps = [10, 20, 30, 31, 41, 51, 53]
    errors = {31: 0.9, 53: 0.7}
    path = tmp_path / "run"
    path.mkdir()
    records = [{"kind": "train", "step": s, "epoch": s / 31, "lr": 0.1, "loss": 1.0,
                "top1_error": errors.get(s, 0.2)} for s in steps]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    c = curves(str(path))
    # 31 joins 41 (1 and 10 steps), 53 joins 51 (10 and 2 steps); weights are steps.
    assert c["train_epoch"] == pytest.approx([10 / 31, 20 / 31, 30 / 31, 41 / 31, 53 / 31])
    assert c["train_error"] == pytest.approx(
        [20.0, 20.0, 20.0, (90.0 + 10 * 20.0) / 11, (10 * 20.0 + 2 * 70.0) / 12], abs=1e-9)
    assert c["train_loss"] == pytest.approx([1.0] * 5)


def test_evaluations_are_joined_only_where_they_are_consecutive():
    from lsgd_jax.artifacts.plotting import consecutive_segments

    # A 2-epoch run: epoch 1, then the median's 5 (one 90th apart, in whole steps).
    assert consecutive_segments([1.0, 1.91, 1.93, 1.96, 1.98, 2.0]) == [
        (1, 2), (2, 3), (3, 4), (4, 5)]
    # Every epoch: all joined; one evaluation missing (epoch 4): that gap is left open.
    assert consecutive_segments([1, 2, 3, 4, 5]) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert consecutive_segments([1, 2, 3, 5, 6]) == [(0, 1), (1, 2), (3, 4)]
    assert consecutive_segments([1.0, 2.0]) == [(0, 1)] and consecutive_segments([1.0]) == []


def _drawn_figure(monkeypatch, workdirs, **kwargs):
    """The matplotlib figure ``plot_runs`` draws (kept from its ``plt.close``)."""
    import matplotlib.pyplot as plt

    from lsgd_jax.artifacts.plotting import plot_runs

    kept = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig) or close(fig))
    plot_runs(workdirs, **kwargs)
    return kept[-1]


def test_the_curves_mark_the_papers_metric_and_the_result_without_a_legend_of_the_title(
        tmp_path, monkeypatch):
    from test_first_run import _fake_run as finished_run

    run = finished_run(tmp_path / "fashion_mnist")
    fig = _drawn_figure(monkeypatch, [run])
    validation = fig.axes[2]
    assert validation.get_ylabel() == "validation top-1 error (%)"
    assert fig.axes[0].get_ylabel() == "training top-1 error (%)"
    # Straight lines only between consecutive evaluations: none from epoch 1 to 1.91.
    segments = [line.get_xdata() for line in validation.lines
                if line.get_linestyle() == "-" and len(line.get_xdata()) == 2]
    assert len(segments) == 4 and all(x[0] > 1.5 for x in segments), segments
    # The median's evaluations are circled; the result is drawn across them and named.
    circled = [line for line in validation.lines if line.get_markerfacecolor() == "none"
               and len(line.get_xdata())]
    assert len(circled) == 1 and list(circled[0].get_xdata()) == pytest.approx(
        [224 / 117, 226 / 117, 229 / 117, 231 / 117, 2.0], abs=1e-3)
    result = [c for c in validation.collections if len(c.get_segments())]
    assert result and result[0].get_segments()[0][0][1] == pytest.approx(16.73)
    assert [t.get_text() for t in validation.texts] == ["result 16.73%"]
    # One run: its name is the title, and no legend repeats it.
    assert fig.texts[0].get_text() == "fashion_mnist" and fig.legends == []
    # Two runs: a legend names them; the title does not repeat it.
    other = finished_run(tmp_path / "other")
    fig = _drawn_figure(monkeypatch, [run, other], output=str(tmp_path / "two.png"))
    assert len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["fashion_mnist", "other"]
    assert fig.texts[0].get_text() == "2 runs"
    # A run still in progress has no result: nothing is circled.
    fig = _drawn_figure(monkeypatch, [finished_run(tmp_path / "live", result=False)])
    assert not [line for line in fig.axes[2].lines if line.get_markerfacecolor() == "none"]
