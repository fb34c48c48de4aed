"""Layer ops against float64 numpy written from their definitions: attention (portable and
AVX2, grouped K/V heads, causal, a batch starting mid-context), the eight-wide exp."""

import numba
import numpy as np
import pytest
from numba import njit
from pyllm.kernels import cpu, ops
from pyllm.kernels.ops_avx2 import vexp
from pyllm.kernels.simd import load_f32x8, store_f32x8

AVX2 = cpu.isa_supported(cpu.AVX2)


def reference_attention(q, k, v, start, n_heads):
    """q (n, n_heads*hd) at positions start..; k, v (n_kv, >= start+n, hd): float64."""
    n = q.shape[0]
    n_kv, _, hd = k.shape
    group = n_heads // n_kv
    out = np.zeros((n, n_heads * hd))
    for t in range(n):
        keys = start + t + 1
        for h in range(n_heads):
            g = h // group
            s = k[g, :keys].astype(np.float64) @ q[t, h * hd:(h + 1) * hd].astype(np.float64) / np.sqrt(hd)
            w = np.exp(s - s.max())
            out[t, h * hd:(h + 1) * hd] = (w / w.sum()) @ v[g, :keys].astype(np.float64)
    return out


@njit(cache=True)
def _portable(y, q_col, n, k, v, start, scores, accs, out):
    ops.attention_at(0, y, q_col, n, k, v, start, scores, accs, out)


@njit(cache=True)
def _avx2(y, q_col, n, k, v, start, scores, accs, out):
    ops.attention_at(1, y, q_col, n, k, v, start, scores, accs, out)


@pytest.mark.parametrize("n, start, hd", [(1, 0, 64), (1, 37, 64), (7, 0, 64), (5, 20, 16), (3, 4, 8)])
def test_attention_matches_float64(n, start, hd):
    rng = np.random.default_rng(n * 100 + start + hd)
    n_heads, n_kv, n_ctx = 6, 2, 64
    q_col = 5  # the queries sit after some other columns, as in the step's shared buffer
    y = rng.standard_normal((n, q_col + n_heads * hd + 3)).astype(np.float32) * np.float32(2.0)
    k = rng.standard_normal((n_kv, n_ctx, hd)).astype(np.float32)
    v = rng.standard_normal((n_kv, n_ctx, hd)).astype(np.float32)
    ref = reference_attention(y[:, q_col:q_col + n_heads * hd], k, v, start, n_heads)
    runs = [_portable] + ([_avx2] if AVX2 else [])
    for run in runs:
        out = np.full((n, n_heads * hd), np.nan, np.float32)
        scores = np.zeros((cpu_threads(), n_heads // n_kv, n_ctx), np.float32)
        accs = np.zeros((cpu_threads(), n_heads // n_kv, hd), np.float32)
        run(y, q_col, n, k, v, start, scores, accs, out)
        # softmax weights sum to 1, so |error| <~ keys * 2^-24 * max|v| * a few
        np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(v).max() * 4, rtol=0)


def cpu_threads():
    return numba.config.NUMBA_NUM_THREADS


@njit(cache=True)
def _exp8(x, out):
    for i in range(0, x.shape[0], 8):
        store_f32x8(out, i, vexp(load_f32x8(x, i)))


@pytest.mark.skipif(not AVX2, reason="this host has no AVX2")
def test_vector_exp_is_within_two_ulp():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-87.3, 88.3, 4000), rng.uniform(-5, 0, 4000),
                        [0.0, -0.0, 1.0, -1.0, 88.3, -87.3, -100.0, -1e30, 1e-30, np.log(2.0)]]).astype(np.float32)
    x = np.concatenate([x, np.zeros((-len(x)) % 8, np.float32)])
    out = np.empty_like(x)
    _exp8(x, out)
    exact = np.exp(x.astype(np.float64))
    normal = exact >= np.finfo(np.float32).tiny
    ulp = np.spacing(exact[normal].astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(out[normal] - exact[normal]) <= 2 * ulp)
    assert np.all(out[~normal] == 0.0)  # below the smallest normal: 0, never a subnormal


@njit(cache=True)
def _silu(level, y, n, g, u, width, out):
    if level == 0:
        ops.silu_mul_at(0, y, n, g, u, width, out)
    else:
        ops.silu_mul_at(1, y, n, g, u, width, out)


def test_silu_mul_matches_float64():
    rng = np.random.default_rng(7)
    y = (rng.standard_normal((3, 100)) * 6).astype(np.float32)
    y[0, :4] = [-100.0, 100.0, 0.0, -0.0]
    ref = y[:, 3:43].astype(np.float64) / (1 + np.exp(-y[:, 3:43].astype(np.float64))) * y[:, 50:90]
    for level in [0] + ([1] if AVX2 else []):
        out = np.zeros((3, 40), np.float32)
        _silu(level, y, 3, 3, 50, 40, out)
        np.testing.assert_allclose(out, ref, rtol=4e-7, atol=1e-30)
