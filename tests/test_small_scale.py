"""The small-scale study (lsgd_jax.study): run definitions, tables, skipping, parallel runs, one real run."""

import dataclasses
import json
import math
import os
import sys

import pytest
from helpers import fake_metrics, study_config, study_paths, study_plan

import lsgd_jax.study as ss
from lsgd_jax.study import runner
from lsgd_jax.training.metrics import read_metrics

HAVE_FMNIST = os.path.exists(os.path.join(ss.FMNIST_DIR, "train-labels-idx1-ubyte.gz"))


_config, _plan, _fake_metrics, _paths = study_config, study_plan, fake_metrics, study_paths


@pytest.mark.parametrize("scale", [ss.FULL, ss.GPU, ss.LONG, ss.QUICK],
                         ids=["cpu", "gpu", "long", "quick"])
def test_every_run_is_a_valid_trainer_command(scale, tmp_path):
    paths = _paths(tmp_path)
    studies = ss.define_studies(scale, paths, large_kn=scale.kn_sweep[1])
    assert [s.key for s in studies] == (list(ss.STUDY_KEYS) if scale.ablations
                                        else ["kn_sweep"])
    runs = ss.unique_runs(studies)
    assert len({r.workdir for r in runs}) == len(runs) == len({r.record for r in runs})
    for run in runs:
        config = _config(run)  # the trainer's own parser and checks
        flags = dict(run.flags)
        # The GPU mode runs on the visible GPU: no fake CPU devices.
        assert ("--cpu-devices" in flags) == (scale.platform == "cpu")
        devices = int(flags.get("--cpu-devices", 1))
        assert config.batch_size % (devices * scale.bn_group) == 0
        assert config.batch_size <= scale.train_examples
        # Warmup and decays shrink by the same factor as the epochs (paper: 5; 30, 60, 80 of 90).
        assert config.warmup_epochs == pytest.approx(5 * scale.epochs / 90, rel=1e-5)
        assert config.decay_epochs == pytest.approx(
            tuple(e * scale.epochs / 90 for e in (30, 60, 80)), rel=1e-5)
        assert (config.num_steps is not None) == (scale is ss.QUICK)
        assert config.median_evals == 5
    if scale in (ss.FULL, ss.GPU, ss.LONG):
        # The whole data set, and 3 seeds for every compared row up to k = 32.
        assert all(run.flag("--data-dir") == ss.FMNIST_DIR for run in runs)
        for study in studies:
            for row in study.rows:
                kn = int(row.runs[0].flag("--batch-size"))
                assert len(row.runs) >= (3 if kn <= 32 * scale.reference_kn else 1)


def test_long_mode_is_the_cpu_sweep_at_30_epochs(tmp_path):
    """k = 32 gets 3,510 iterations, 195 of warmup; 10 runs; no ablations, ever."""
    paths = _paths(tmp_path)
    ss.store_large_kn(paths, 256, "stored by an earlier mode")
    studies = ss.define_studies(ss.LONG, paths, large_kn=256)
    assert [s.key for s in studies] == ["kn_sweep"]
    rows = studies[0].rows
    assert [(int(r.runs[0].flag("--batch-size")), len(r.runs)) for r in rows] == [
        (16, 3), (256, 3), (512, 3), (1024, 1)]
    runs = ss.unique_runs(studies)
    assert len(runs) == 10
    cpu_runs = {r.name: r for r in ss.unique_runs(ss.define_studies(ss.FULL, paths))}
    for run in runs:  # everything but the budget is the CPU mode's
        changed = {k for k, v in run.flags if cpu_runs[run.name].flag(k) != v}
        assert changed == {"--epochs", "--warmup-epochs", "--decay-epochs"}
        assert run.flag("--epochs") == "30" and run.flag("--decay-epochs") == "10,20,26.6667"
    plan = _plan(rows[2].runs[0], ss.LONG)
    # 195 warmup iterations; the flag's 6 digits (1.66667 epochs) round that up by one.
    assert (plan["total_steps"], plan["warmup_steps"]) == (3510, math.ceil(117 * 1.66667))
    # The reference first, then k = 32: the headline's comparison comes earliest.
    order = [int(r.flag("--batch-size")) for r in ss.order(runs, ss.LONG)][:4]
    assert order == [16, 512, 256, 1024]


def test_long_mode_stops_after_the_sweep(tmp_path, monkeypatch):
    out, results = tmp_path / "runs", tmp_path / "results"
    ran = []

    def fake_execute(run, scale):
        ran.append(run.name)
        _fake_metrics(run.workdir, [0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
        ss.keep_record(run)
        return ss.status(run)

    monkeypatch.setattr(runner, "execute", fake_execute)
    assert ss.main(["--mode", "long", "--out", str(out), "--results", str(results)]) == 0
    assert len(ran) == 10 and not (results / "ablation_kn.json").exists()
    claims = json.loads((results / "claims.json").read_text())
    assert claims["label"] == "long mode (30 epochs)"
    assert [i["kind"] for i in claims["items"]] == ["goal"] + ["compare"] * 3


def test_the_sweep_alone_until_the_ablation_kn_is_known(tmp_path):
    paths = _paths(tmp_path)
    assert [s.key for s in ss.define_studies(ss.FULL, paths)] == ["kn_sweep"]
    ss.store_large_kn(paths, 256, "test")
    assert [s.key for s in ss.define_studies(ss.FULL, paths)] == list(ss.STUDY_KEYS)
    assert "kn256_nowarmup_s0" in {r.name for r in ss.unique_runs(ss.define_studies(ss.FULL, paths))}


def test_the_rate_rows_reach_eta_sqrtk_and_k_multiples(tmp_path):
    scale = ss.FULL
    big = 512
    study = {s.key: s for s in ss.define_studies(scale, _paths(tmp_path), big)}["lr_rule"]
    k = big / scale.reference_kn
    eta = scale.base_lr
    peaks = []
    for row in study.rows[1:]:
        derived = _plan(row.runs[0], scale)
        peaks.append(derived["peak_lr"])
    # tolerance: the flags carry 6 significant digits
    assert peaks == pytest.approx([eta, eta * math.sqrt(k), eta * k / 2, eta * k, 2 * eta * k],
                                  rel=1e-5)
    unscaled = _plan(study.rows[1].runs[0], scale)
    assert unscaled["warmup_steps"] == 0


def test_shared_rows_are_one_run_and_conflicting_flags_are_refused(tmp_path):
    studies = ss.define_studies(ss.FULL, _paths(tmp_path), 512)
    holders = [s.key for s in studies for row in s.rows for r in row.runs if r.name == "kn512_s0"]
    assert holders == ["kn_sweep", "warmup", "lr_rule", "zero_gamma", "momentum"]
    run = studies[0].rows[0].runs[0]
    clash = ss.Study("x", "x", (ss.Row("a", (run,), "-"), ss.Row("b", (
        ss.Run(run.name, run.flags + (("--seed", "9"),), run.record),), "-")), run)
    with pytest.raises(ValueError, match=run.name):
        ss.unique_runs([clash])


def test_status_and_the_paper_figure_of_a_run(tmp_path):
    run = ss.define_studies(ss.QUICK, _paths(tmp_path))[0].rows[0].runs[0]
    assert ss.status(run) == "missing"
    errors = [0.9, 0.5, 0.30, 0.25, 0.20, 0.22, 0.26]
    _fake_metrics(run.workdir, errors, result=False)
    assert ss.status(run) == "partial" and ss.run_error(run) is None
    _fake_metrics(run.workdir, errors)
    assert ss.status(run) == "done"
    assert ss.run_error(run) == pytest.approx(25.0)  # median of 0.30 0.25 0.20 0.22 0.26
    # The committed record decides, even without the workdir (a fresh clone).
    ss.keep_record(run)
    import shutil

    shutil.rmtree(run.workdir)
    assert ss.status(run) == "done" and ss.run_error(run) == pytest.approx(25.0)
    ss.mark_diverged(run.record, "nan at step 3")
    assert ss.status(run) == "diverged" and ss.run_error(run) == "diverged"


def test_the_ablation_kn_is_the_largest_that_matches(tmp_path):
    paths = _paths(tmp_path)
    scale = dataclasses.replace(ss.FULL, kn_sweep=(16, 32, 64, 128), seeded_k=4)
    sweep = ss.define_studies(scale, paths)[0]
    assert ss.choose_large_kn(sweep, scale) is None  # nothing finished
    errors = {16: [0.095, 0.096, 0.097], 32: [0.0955, 0.0965, 0.0975],
              64: [0.0950, 0.0960, 0.0970], 128: [0.11]}
    for row in sweep.rows:
        for run, err in zip(row.runs, errors[int(row.runs[0].flag("--batch-size"))]):
            _fake_metrics(run.workdir, [0.5, err, err, err, err, err])
    assert ss.choose_large_kn(sweep, scale)[0] == 64
    # No row matches at 95 % (wide seeds): the largest whose mean is within τ = 0.3 points.
    errors = {16: [0.090, 0.096, 0.102], 32: [0.091, 0.098, 0.105],
              64: [0.094, 0.100, 0.106], 128: [0.11]}
    for row in sweep.rows:
        for run, err in zip(row.runs, errors[int(row.runs[0].flag("--batch-size"))]):
            _fake_metrics(run.workdir, [0.5, err, err, err, err, err])
    kn, reason = ss.choose_large_kn(sweep, scale)
    assert (kn, reason.startswith("no kn matches")) == (32, True)  # 64 is +0.6 points


def test_table_and_reports_from_fake_runs(tmp_path):
    scale = ss.QUICK
    paths = _paths(tmp_path)
    studies = ss.define_studies(scale, paths)
    warmup = {s.key: s for s in studies}["warmup"]
    base, none, const, gradual = warmup.rows
    _fake_metrics(base.runs[0].workdir, [0.5, 0.3, 0.2, 0.2, 0.2])
    _fake_metrics(gradual.runs[0].workdir, [0.6, 0.4, 0.3, 0.25, 0.35])  # median 0.35
    ss.mark_diverged(none.runs[0].workdir, "nan")
    table, record = ss.study_table(warmup, scale)
    lines = table.splitlines()
    assert lines[0] == f"### {warmup.title}"
    row_of = {r["label"]: r for r in record["rows"]}
    assert row_of[gradual.label]["mean"] == pytest.approx(35.0)
    assert f"| {gradual.label} | {scale.large_kn} |" in table and "35.00 (1/1 seeds)" in table
    # iterations per epoch and in all, next to the paper's
    # k = 2 ↔ the paper's kn = 512: 1,281,167 // 512 = 2,502 per epoch, 225,180 in 90 epochs
    assert f"| {scale.train_examples // 32} (2,502) | 3 (225,180) |" in table
    assert f"| {none.label} |" in table and "| diverged | 24.84 ± 0.37 |" in table
    assert f"| {const.label} |" in table and "not run yet" in table
    written = ss.write_reports(studies, scale, paths, only={"warmup"})
    assert sorted(os.path.basename(p) for p in written) == [
        "claims.json", "claims.md", "summary.md", "warmup.json", "warmup.md", "warmup.png"]
    results = tmp_path / "results"
    assert (results / "warmup.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((results / "warmup.json").read_text())["rows"][3]["mean"] == pytest.approx(35.0)
    assert "### Warmup" in (results / "summary.md").read_text()
    claims = (results / "claims.md").read_text()
    assert "no warmup is worse than gradual warmup (table 1): **reproduces** " in claims


def test_the_claims_of_both_modes_side_by_side_in_the_results_readme(tmp_path):
    paths = {}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "README.md").write_text(
        "intro\n<!-- claims start -->\nold\n<!-- claims end -->\nrest\n")
    for mode, ref_errors, nowarmup in (("cpu", [0.096, 0.099, 0.093], 0.140),
                                       ("gpu", [0.084, 0.085, 0.086], 0.085)):
        scale = dataclasses.replace(ss.QUICK, name=mode, seeds=(0, 1, 2))
        paths[mode] = ss.Paths(out=str(tmp_path / "runs" / mode),
                               results=str(tmp_path / "results" / f"small_scale_{mode}"))
        studies = ss.define_studies(scale, paths[mode])
        by_key = {s.key: s for s in studies}
        for run, err in zip(by_key["kn_sweep"].rows[0].runs, ref_errors):
            _fake_metrics(run.workdir, [0.5, err, err, err, err, err])
        for row, errs in ((by_key["warmup"].rows[3], ref_errors),
                          (by_key["warmup"].rows[1], [nowarmup] * 3)):
            for run, err in zip(row.runs, errs):
                _fake_metrics(run.workdir, [0.5, err, err, err, err, err])
        ss.write_reports(studies, scale, paths[mode], plots=False)
    # A third mode, sweep only, with the longest budget: its column comes last.
    long = dataclasses.replace(ss.QUICK, name="long", epochs=6, seeds=(0, 1, 2),
                               ablations=False, label="long mode (6 epochs)")
    paths["long"] = ss.Paths(out=str(tmp_path / "runs" / "long"),
                             results=str(tmp_path / "results" / "small_scale_long"))
    studies = ss.define_studies(long, paths["long"])
    for row, errs in zip(studies[0].rows, ([0.080, 0.081, 0.082], [0.081, 0.080, 0.082])):
        for run, err in zip(row.runs, errs):
            _fake_metrics(run.workdir, [0.5, err, err, err, err, err])
    ss.write_reports(studies, long, paths["long"], plots=False)
    readme = (tmp_path / "results" / "README.md").read_text()
    assert readme.startswith("intro\n<!-- claims start -->\n| claim | CPU mode (")
    header = next(t for t in readme.splitlines() if t.startswith("| claim"))
    assert header.endswith("| GPU mode (2 epochs) | long mode (6 epochs) |")
    line = next(t for t in readme.splitlines() if t.startswith("| no warmup is worse"))
    assert line.endswith(" | – |")  # no ablations in the long mode
    assert "old" not in readme and readme.endswith("<!-- claims end -->\nrest\n")
    line = next(t for t in readme.splitlines() if t.startswith("| no warmup is worse"))
    cpu, gpu = line.split(" | ")[1:3]
    assert cpu.startswith("**reproduces**: 14.00") and gpu.startswith("**does not reproduce**")
    line = next(t for t in readme.splitlines() if t.startswith("| The reference"))
    assert "**yes**: 9.60 ± 0.30 (3/3 seeds)" in line and "**yes**: 8.50 ± 0.10" in line


@pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist is not installed")
def test_main_skips_finished_runs_and_runs_the_others(tmp_path, monkeypatch):
    out, results = tmp_path / "runs", tmp_path / "results"
    paths = ss.Paths(out=str(out), results=str(results))
    studies = ss.define_studies(ss.QUICK, paths)
    runs = ss.unique_runs([s for s in studies if s.key == "momentum"])
    _fake_metrics(runs[0].workdir, [0.5, 0.4])                 # done: skipped
    _fake_metrics(runs[1].workdir, [0.5], result=False)        # partial: resumed
    ss.mark_diverged(runs[2].workdir, "nan")                  # diverged: skipped
    called = []

    def fake_execute(run, scale):
        called.append(run.name)
        _fake_metrics(run.workdir, [0.5, 0.45])
        ss.keep_record(run)
        return ss.status(run)

    monkeypatch.setattr(runner, "execute", fake_execute)
    assert ss.main(["--quick", "--only", "momentum", "--out", str(out),
                    "--results", str(results)]) == 0
    assert called == [r.name for r in runs if r.name not in (runs[0].name, runs[2].name)]
    text = (results / "momentum.md").read_text()
    assert "| diverged |" in text and "45.00 (1/1 seeds)" in text
    assert (results / "runs" / runs[1].name / "metrics.jsonl").exists()


@pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist is not installed")
def test_one_quick_run_trains_for_real(tmp_path):
    scale = ss.QUICK
    paths = _paths(tmp_path)
    ss.write_subset(scale, paths)
    run = ss.define_studies(scale, paths)[0].rows[0].runs[0]
    assert ss.execute(run, scale) == "done"
    error = ss.run_error(run)
    assert isinstance(error, float) and 0.0 <= error <= 100.0
    steps = [r["step"] for r in read_metrics(run.workdir, "train")]
    assert max(steps) == scale.num_steps
    assert read_metrics(run.record, "result")  # the record was kept


def test_commit_takes_the_results_and_the_readme_and_nothing_else(tmp_path):
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True,
                              text=True, check=True).stdout

    git("init", "-q")
    git("config", "user.email", "study@example.com")
    git("config", "user.name", "study")
    (tmp_path / "other.txt").write_text("work in progress")
    git("add", "other.txt")  # staged by someone else: must stay out of the study's commit
    results = tmp_path / "small_scale"
    (results / "runs" / "kn16_s0").mkdir(parents=True)
    (results / "runs" / "kn16_s0" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "README.md").write_text("snapshot\n")
    ss.git_commit(ss.Paths(out=str(tmp_path / "runs"), results=str(results)), "kn16_s0 done")
    committed = git("show", "--name-only", "--format=%s", "HEAD").split()
    assert committed[:2] == ["kn16_s0", "done"]
    assert sorted(committed[2:]) == ["README.md", "small_scale/runs/kn16_s0/metrics.jsonl"]
    assert git("diff", "--cached", "--name-only").split() == ["other.txt"]


def test_cpu_order_is_seed_first_and_gpu_order_longest_first(tmp_path):
    def names(scale):
        runs = ss.unique_runs(ss.define_studies(scale, _paths(tmp_path)))
        return [r.name for r in ss.order(runs, scale)]

    cpu = names(ss.FULL)
    assert cpu[:8] == [f"kn{kn}_s0" for kn in ss.FULL.kn_sweep]  # every kn once, then seed 1
    assert cpu[8] == "kn16_s1"
    gpu = names(ss.GPU)
    # The reference has the most steps: all its seeds start first, then kn = 32's.
    assert gpu[:6] == ["kn16_s0", "kn16_s1", "kn16_s2", "kn32_s0", "kn32_s1", "kn32_s2"]
    assert gpu[-1] == "kn2048_s0"


_FAKE_TRAINER = """
import json, os, sys, time
workdir, log = sys.argv[1], sys.argv[2]
with open(log, "a") as f:
    f.write(f"start {time.time()}\\n")
time.sleep(0.4)
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for r in ({"kind": "train", "step": 1, "epoch": 1, "lr": 0.1, "loss": 1.0, "top1_error": 0.5},
              {"kind": "eval", "step": 1, "epoch": 1, "top1_error": 0.5},
              {"kind": "result", "step": 1}):
        f.write(json.dumps(r) + "\\n")
with open(log, "a") as f:
    f.write(f"end {time.time()}\\n")
"""


def test_parallel_runs_train_each_once_and_at_most_n_at_a_time(tmp_path, monkeypatch):
    import subprocess

    out, results, log = tmp_path / "runs", tmp_path / "results", tmp_path / "events.log"
    started = []

    def fake_start(run, scale, log_path=None):
        started.append(run.name)
        return subprocess.Popen([sys.executable, "-c", _FAKE_TRAINER, run.workdir, str(log)])

    monkeypatch.setattr(runner, "start", fake_start)
    assert ss.main(["--quick", "--only", "momentum", "--parallel", "2", "--out", str(out),
                    "--results", str(results)]) == 0
    runs = ss.unique_runs([s for s in ss.define_studies(ss.QUICK, ss.Paths(
        out=str(out), results=str(results))) if s.key == "momentum"])
    assert sorted(started) == sorted(r.name for r in runs)  # each once
    assert all(ss.status(r) == "done" for r in runs)
    events = sorted((float(t), kind) for kind, t in (ln.split() for ln in log.read_text().splitlines()))
    running = peak = 0
    for _, kind in events:
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == 2  # two at once, never three


def test_a_spent_time_limit_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "start", lambda *a, **k: pytest.fail("a run was started"))
    assert ss.main(["--quick", "--only", "momentum", "--parallel", "2", "--time-limit", "0",
                    "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "r")]) == 0


def test_budget_points_and_the_critical_kn_figure(tmp_path):
    """Each mode's k against its iterations: the difference to that mode's reference."""
    root = tmp_path / "results"
    for mode, epochs, ref, k2 in (("cpu", 2, [0.10, 0.11, 0.12], [0.14, 0.15, 0.16]),
                                  ("long", 6, [0.08, 0.09, 0.10], [0.08, 0.09, 0.10])):
        scale = dataclasses.replace(ss.QUICK, name=mode, epochs=epochs, seeds=(0, 1, 2),
                                    ablations=False, num_steps=None)
        paths = ss.Paths(out=str(tmp_path / "runs" / mode),
                         results=str(root / f"small_scale_{mode}"))
        studies = ss.define_studies(scale, paths)
        for row, errs in zip(studies[0].rows, (ref, k2)):
            for run, err in zip(row.runs, errs):
                _fake_metrics(run.workdir, [0.5, err, err, err, err, err])
        written = ss.write_reports(studies, scale, paths)
    points = [p for p in ss.budget_points(str(root)) if p["k"] == 2]
    spe = ss.QUICK.train_examples // 32
    assert [(p["mode"], p["iterations"]) for p in points] == [("cpu", 2 * spe), ("long", 6 * spe)]
    assert points[0]["diff"] == pytest.approx(4.0) and points[1]["diff"] == pytest.approx(0.0)
    se = math.sqrt(1 / 3 + 1 / 3)  # both rows: sample std 1 point over 3 seeds
    assert points[0]["two_se"] == pytest.approx(2 * se)
    assert str(root / "critical_kn.png") in written
    assert (root / "critical_kn.png").read_bytes()[:4] == b"\x89PNG"
