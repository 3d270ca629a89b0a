"""The study's "beyond" section (lsgd_jax.study.beyond): its runs, equal tuning, its claims."""

import dataclasses
import json

import pytest
from helpers import fake_metrics as _fake_metrics
from helpers import study_config as _config
from helpers import study_paths as _paths
from helpers import study_plan as _plan

import lsgd_jax.study as ss
from lsgd_jax.study import beyond, runner


def _finish(run, error):
    """A finished fake run whose paper figure is ``error`` (a fraction)."""
    _fake_metrics(run.workdir, [0.5] + [error] * 5)


def test_every_run_is_a_valid_trainer_command_with_its_recipe(tmp_path):
    scale, paths = ss.FULL, _paths(tmp_path)
    grid = beyond.define_beyond(scale, paths)[0]
    assert len(grid.rows) == 1 + 2 * 3 * 3  # the reference, 2 kn × 3 recipes × 3 rates
    for row in grid.rows[1:]:
        (run,) = row.runs
        config = _config(run)
        arm = beyond.arm_of(run)
        assert config.batch_size in (512, 1024) and config.seed == 0
        assert config.optimizer == ("lars" if arm == "lars" else "sgd")
        assert config.schedule == ("steps" if arm == "paper" else "poly")
        assert config.label_smoothing == (0.0 if arm == "paper" else 0.1)
        # The same model, data, epochs and warmup as the study's sweep.
        sweep = _config(ss.define_studies(scale, paths)[0].rows[0].runs[0])
        for name in ("model", "data", "epochs", "warmup", "warmup_epochs", "bn_group_size",
                     "weight_decay", "momentum", "nesterov"):
            assert getattr(config, name) == getattr(sweep, name), name
    # The paper's recipe at × 1 is the sweep's own run (its records are reused).
    names = {r.name for row in grid.rows for r in row.runs}
    assert {"kn512_s0", "kn1024_s0", "kn16_s0"} <= names


def test_each_recipe_gets_the_same_three_point_grid_around_its_centre(tmp_path):
    scale, paths = ss.FULL, _paths(tmp_path)
    for kn in (512, 1024):
        k = kn / 16
        # By hand: η·k for the SGD recipes; √(2·η·k·λ/(1+m)) / 0.001 for LARS
        # (kn = 512: √(2·3.2·1e-4/1.9) / 0.001 = 18.353; kn = 1,024: 25.955).
        centres = {"paper": 0.1 * k, "nado": 0.1 * k,
                   "lars": {512: 18.353, 1024: 25.955}[kn]}
        for arm, centre in centres.items():
            peaks = [_plan(beyond.grid_run(scale, paths, arm, kn, m, 0), scale)["peak_lr"]
                     for m in beyond.MULTIPLIERS]
            # tolerance: the flags carry 6 significant digits; the LARS centre 5 here
            assert peaks == pytest.approx([centre / 2, centre, centre * 2], rel=1e-4), arm


def test_seeds_follow_the_best_rate_of_seed_0_once_its_grid_is_finished(tmp_path):
    scale, paths = ss.FULL, _paths(tmp_path)
    grid = {(beyond.arm_of(r), int(r.flag("--batch-size")), float(r.flag("--base-lr"))): r
            for row in beyond.define_beyond(scale, paths)[0].rows[1:] for r in row.runs}
    lars = sorted((key, r) for key, r in grid.items() if key[:2] == ("lars", 512))
    assert len(beyond.define_beyond(scale, paths)[1].rows) == 1  # only the reference
    _finish(lars[0][1], 0.12)                                   # × ½
    _finish(lars[1][1], 0.11)                                   # × 1
    assert beyond.best_multiplier(scale, paths, "lars", 512) is None  # × 2 not finished
    ss.mark_diverged(lars[2][1].workdir, "nan")                 # × 2 diverged: the worst
    assert beyond.best_multiplier(scale, paths, "lars", 512) == 1.0
    best = beyond.define_beyond(scale, paths)[1].rows[1]
    assert [r.name for r in best.runs] == [f"beyond_kn512_lars_x1_s{s}" for s in (0, 1, 2)]
    assert "best peak 18.4 (×1)" in best.label
    _finish(lars[0][1], 0.10)                                   # now × ½ is the best
    assert beyond.best_multiplier(scale, paths, "lars", 512) == 0.5
    # ... at the edge of the grid: the optimum was not bracketed, and the table says so.
    best = beyond.define_beyond(scale, paths)[1].rows[1]
    assert "best peak 9.18 (×0.5, at the grid's edge)" in best.label


def _verdicts(paper, lars):
    return {"paper": paper, "nado": {512: "does not match", 1024: "does not match"},
            "lars": lars}


@pytest.mark.parametrize("paper, lars, expected", [
    ({512: "does not match", 1024: "does not match"}, {512: "matches", 1024: "does not match"},
     "yes"),
    ({512: "does not match", 1024: "does not match"},
     {512: "does not match", 1024: "does not match"}, "no"),
    ({512: "matches", 1024: "does not match"}, {512: "matches", 1024: "does not match"}, "no"),
    ({512: "does not match", 1024: "does not match"},
     {512: "cannot tell (spread too large)", 1024: "does not match"},
     "cannot tell (spread too large)"),
    ({512: "does not match", 1024: "does not match"},
     {512: "cannot tell yet", 1024: "does not match"}, "cannot tell yet"),
])
def test_the_outcome_rule(paper, lars, expected):
    assert beyond.moved(_verdicts(paper, lars), "lars")[0] == expected


def _run_fake_section(tmp_path, monkeypatch, errors):
    """The section in quick mode with fake runs; ``errors(run)`` gives each run's error."""
    out, results = tmp_path / "runs", tmp_path / "results"
    called = []

    def fake_execute(run, scale):
        called.append(run.name)
        _finish(run, errors(run))
        ss.keep_record(run)
        return ss.status(run)

    monkeypatch.setattr(runner, "execute", fake_execute)
    from lsgd_jax.study import cli

    monkeypatch.setattr(cli, "write_subset", lambda *a: None)  # no data needed
    assert ss.main(["--quick", "--section", "beyond", "--out", str(out),
                    "--results", str(results)]) == 0
    return called, results


def test_the_section_runs_grid_then_seeds_and_decides(tmp_path, monkeypatch):
    """LARS at × 1 within 0.1 points of the reference (9.40 %) at both kn, every other
    run at 15 % or worse: LARS matches at both kn, the others do not: LARS moved it."""

    def errors(run):
        kn, seed = int(run.flag("--batch-size")), int(run.flag("--seed"))
        if kn == 16:
            return 0.094
        if beyond.arm_of(run) == "lars" and run.name.split("_")[3] == "x1":
            return 0.0945 + 0.0002 * seed
        return 0.15 + float(run.flag("--base-lr"))  # the smallest rate is the best

    called, results = _run_fake_section(tmp_path, monkeypatch, errors)
    # Seed 0 of everything first, then seeds 1 and 2 of each recipe's best rate only.
    first_seed1 = next(i for i, n in enumerate(called) if not n.endswith("_s0"))
    assert all(n.endswith("_s0") for n in called[:first_seed1])
    later = [n for n in called[first_seed1:] if n.startswith("beyond")]
    assert sorted(later) == sorted(
        f"beyond_kn{kn}_{arm}_x{m}_s{s}" for kn in (32, 64)
        for arm, m in (("paper", "0.5"), ("nado", "0.5"), ("lars", "1")) for s in (1, 2))
    assert len(called) == len(set(called))  # each once
    claims = json.loads((results / "beyond_claims.json").read_text())["items"]
    outcome = {i["claim"]: i["verdict"] for i in claims if i["kind"] == "outcome"}
    assert outcome["At this budget, with equal tuning, LARS moved the largest kn that "
                   "matches the reference"] == "yes"
    # The paper's recipe and the control were best at × ½, the grid's edge: the outcome
    # says their tuning was not bracketed; LARS's was (× 1), so it is not named.
    why = {i["claim"]: i["why"] for i in claims if i["kind"] == "outcome"}
    lars_why = why["At this budget, with equal tuning, LARS moved the largest kn that "
                   "matches the reference"]
    assert "edge of its grid for the paper's recipe at kn=32, the paper's recipe at kn=64" \
        in lars_why and "LARS + poly" not in lars_why
    nado_why = next(w for c, w in why.items() if "without LARS" in c)
    assert "(Nado control) at kn=32" in nado_why and "(Nado control) at kn=64" in nado_why
    line = next(i for i in claims if i["claim"].startswith("LARS beats the paper's recipe "
                                                           "at kn=64"))
    assert line["verdict"] == "reproduces"
    table = (results / "beyond.md").read_text()
    assert "| kn=64, LARS + poly decay + label smoothing, best peak" in table
    assert (results / "beyond.png").read_bytes()[:4] == b"\x89PNG"
    # A second call finds every run done and trains nothing.
    again, _ = _run_fake_section(tmp_path, monkeypatch, errors)
    assert again == []


def test_the_section_writes_its_part_of_the_results_readme(tmp_path):
    scale = dataclasses.replace(ss.QUICK, name="cpu")
    results = tmp_path / "results" / "small_scale"
    results.mkdir(parents=True)
    (tmp_path / "results" / "README.md").write_text(
        "a\n<!-- beyond start -->\nnot run yet\n<!-- beyond end -->\nb\n")
    paths = ss.Paths(out=str(tmp_path / "runs"), results=str(results))
    written = beyond.write_beyond_reports(beyond.define_beyond(scale, paths), scale, paths,
                                          plots=False)
    assert str(tmp_path / "results" / "README.md") in written
    text = (tmp_path / "results" / "README.md").read_text()
    assert "not run yet\n<!--" not in text and "#### Claims" in text
    assert "waits for the 3-rate grid on seed 0" in text and text.endswith("end -->\nb\n")
