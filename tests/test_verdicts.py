"""Verdicts on the paper's claims: seed aggregation and the 2-standard-error rules, by hand."""

import math
import statistics

import pytest

from lsgd_jax.study import verdicts


def test_aggregate_counts_seeds_and_uses_the_sample_std():
    agg = verdicts.aggregate([10.0, 12.0, "diverged", None])
    assert agg["mean"] == pytest.approx(11.0)
    assert agg["std"] == pytest.approx(statistics.stdev([10.0, 12.0]))
    assert (agg["finished"], agg["diverged"], agg["missing"], agg["seeds"]) == (2, 1, 1, 4)
    assert verdicts.format_cell(agg) == "11.00 ± 1.41 (2/4 seeds, 1 diverged)"
    assert verdicts.format_cell(verdicts.aggregate([9.5])) == "9.50 (1/1 seeds)"
    assert verdicts.format_cell(verdicts.aggregate(["diverged"])) == "diverged"
    assert verdicts.format_cell(verdicts.aggregate([None, None])) == "not run yet"


def test_verdicts_from_hand_computed_differences():
    ref = verdicts.aggregate([9.5, 9.6, 9.7])                 # mean 9.6, std 0.1
    same = verdicts.aggregate([9.55, 9.65, 9.75])             # +0.05 ± 2·sqrt(2·0.01/3) = ±0.163
    d = verdicts.difference(same, ref)
    assert d["diff"] == pytest.approx(0.05) and d["se"] == pytest.approx(math.sqrt(0.02 / 3))
    # 95 %: two standard errors either side
    assert (d["low"], d["high"]) == pytest.approx((0.05 - 2 * d["se"], 0.05 + 2 * d["se"]))
    assert verdicts.verdict_matches(same, ref, 0.3)[0] == "matches"
    worse = verdicts.aggregate([10.4, 10.5, 10.6])            # +0.9, interval above 0.3
    assert verdicts.verdict_matches(worse, ref, 0.3)[0] == "does not match"
    assert verdicts.verdict_worse(worse, ref, 0.3)[0] == "reproduces"
    noisy = verdicts.aggregate([9.0, 9.9, 10.8])              # +0.3 ± 1.06
    assert verdicts.verdict_matches(noisy, ref, 0.3)[0].startswith("cannot tell")
    assert verdicts.verdict_worse(same, ref, 0.3)[0] == "does not reproduce"
    # One seed borrows the other row's spread.
    one = verdicts.aggregate([9.6])
    assert verdicts.difference(one, ref)["se"] == pytest.approx(math.sqrt(0.01 / 1 + 0.01 / 3))
    assert verdicts.verdict_matches(verdicts.aggregate(["diverged"]), ref, 0.3)[0] == "does not match"
