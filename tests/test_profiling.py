"""Profiling helpers of the benchmarks: FLOPs from cost analysis, op kinds, top ops."""

import jax
import jax.numpy as jnp
import pytest

from lsgd_jax.bench import profiling


def test_step_flops_of_a_matrix_product_is_two_m_n_k():
    x = jax.ShapeDtypeStruct((64, 16), jnp.float32)
    y = jax.ShapeDtypeStruct((16, 32), jnp.float32)
    lowered = jax.jit(lambda a, b: a @ b).lower(x, y)
    assert profiling.step_flops(lowered) == 2 * 64 * 16 * 32  # 32,768


def test_peak_by_card_name():
    assert profiling.bf16_peak("NVIDIA H200") == 989e12
    assert profiling.bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert profiling.bf16_peak("cpu") is None


@pytest.mark.parametrize("name,kind", [
    ("cudnn-conv.102", "convolution"), ("cudnn-conv-bw-filter.105", "convolution"),
    ("input_convert_reduce_fusion.1", "reduction"), ("command_buffer_1103", "graph"),
    ("all-reduce.3", "collective"), ("loop_select_fusion.15", "fusion"),
    ("transpose_copy_fusion.12", "copy/transpose"), ("cublas-gemm.1", "matmul"),
    ("custom-call.7", "other"),
])
def test_op_kind_by_hand(name, kind):
    assert profiling.op_kind(name) == kind


def test_profile_ranks_the_ops_of_a_real_trace():
    step = jax.jit(lambda s, b: (jnp.tanh(s @ b), {"sum": jnp.sum(s)}))
    s = jnp.ones((256, 256)) * 0.01
    b = jnp.eye(256)
    step(s, b)  # compile outside the trace
    out, ranked, busy = profiling.profile(step, s, b, steps=3, count=5)
    assert out.shape == (256, 256)
    assert 1 <= len(ranked) <= 5
    seconds = [t for _, _, t in ranked]
    assert seconds == sorted(seconds, reverse=True)
    assert all(calls >= 1 for _, calls, _ in ranked)
    assert 0 < sum(seconds) <= busy + 1e-12


def test_a_convert_fusion_is_not_a_convolution():
    # "input_convert_reduce_fusion" holds "conv": an early version filed BN's statistics
    # under convolutions.
    assert profiling.op_kind("loop_convert_fusion.9") == "fusion"
    assert profiling.op_kind("cudnn-conv-bias-activation.60") == "convolution"
