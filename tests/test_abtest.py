"""The A/B machinery of the train-step bench: options, interleaving, the combination."""

import argparse

import jax.numpy as jnp
import pytest

from lsgd_jax.bench.abtest import (
    Built,
    Variant,
    combination,
    time_rounds,
    unknown_option,
    xla_options,
)


def _variant(name, **changes):
    settings = dict(bn_group_size=32, bn_impl="plain", bn_split_rows=4096,
                    pool_impl="reduce_window", stem_impl="conv", xla_option=[])
    settings.update(changes)
    return Variant(name, argparse.Namespace(**settings))


def _built(variant, step_s):
    return Built(variant, compiled=None, lowered=None, state=None, layout=None, compile_s=0.0,
                 windows=[step_s])


def test_xla_options_parse_booleans_integers_and_strings():
    assert xla_options(["xla_gpu_enable_fast_min_max=true", "xla_a=False", "xla_b=-3",
                        "xla_gpu_enable_command_buffer="]) == {
        "xla_gpu_enable_fast_min_max": True, "xla_a": False, "xla_b": -3,
        "xla_gpu_enable_command_buffer": ""}
    for bad in ("xla_gpu_enable_fast_min_max", "gpu_enable_fast_min_max=true"):
        with pytest.raises(ValueError, match="NAME=VALUE"):
            xla_options([bad])


def test_unknown_option_names_the_option():
    assert unknown_option([]) is None
    assert unknown_option(["xla_cpu_enable_fast_min_max=true"]) is None
    assert "xla_no_such_option" in unknown_option(["xla_no_such_option=true"])


def test_combination_takes_each_winning_lever_and_pools_options():
    ref = _built(_variant("today"), 10.0)
    built = [
        ref,
        _built(_variant("bn_vjp", bn_impl="custom_vjp"), 9.0),         # faster: its bn_impl
        _built(_variant("bn_split", bn_impl="split"), 9.5),            # (listed after it)
        _built(_variant("pool", pool_impl="masks"), 9.8),
        _built(_variant("s2d", stem_impl="s2d"), 10.5),                # slower: left out
        _built(_variant("flag", xla_option=["xla_x=true"]), 9.9),
        _built(_variant("groups", bn_group_size=256), 8.0),            # not a lever
        _built(_variant("groups_pool", bn_group_size=256, pool_impl="masks"), 7.0),
    ]
    combined = combination(built)
    assert combined.name == "combined"
    assert vars(combined.settings) == dict(bn_group_size=32, bn_impl="custom_vjp",
                                           bn_split_rows=4096, pool_impl="masks",
                                           stem_impl="conv", xla_option=["xla_x=true"])
    assert combination([ref, _built(_variant("slow", pool_impl="masks"), 10.0)]) is None
    assert ref.variant.settings.bn_impl == "plain"  # the reference is not modified


class _FakeStep:
    """Stands in for a compiled step: counts calls, optionally fails."""

    def __init__(self, name, log, fail=False):
        self.name, self.log, self.calls, self.fail = name, log, 0, fail

    def __call__(self, state, batch):
        if self.fail:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
        self.calls += 1
        self.log.append(self.name)
        return state + 1, {"finite": jnp.bool_(True), "loss": jnp.float32(0)}


def test_time_rounds_interleaves_and_leaves_out_a_failing_variant(capsys):
    log = []
    steps = [_FakeStep("v0", log), _FakeStep("v1", log, fail=True), _FakeStep("v2", log)]
    built = [Built(_variant(f"v{i}"), step, None, jnp.int32(0), None, 0.0)
             for i, step in enumerate(steps)]
    timed = time_rounds(built, None, warmup=2, steps=3, repeats=4)
    assert [b.variant.name for b in timed] == ["v0", "v2"]
    assert "FAILED variant v1: RuntimeError: RESOURCE_EXHAUSTED" in capsys.readouterr().out
    for b, step in zip(timed, (steps[0], steps[2])):
        assert len(b.windows) == 4 and step.calls == 2 + 3 * 4
        assert int(b.state) == 14
    # Warm-ups, then rounds of one window (3 steps) of each variant in turn.
    assert log == ["v0"] * 2 + ["v2"] * 2 + (["v0"] * 3 + ["v2"] * 3) * 4
    with pytest.raises(RuntimeError, match="out of memory"):
        time_rounds([built[1], built[0]], None, warmup=1, steps=1, repeats=1)
