"""The small per-layer kernels of a Llama-family decoder: RMSNorm, RoPE, attention, SwiGLU.

Each works in place or into a preallocated output, so decoding a token allocates nothing.
Heavy products (the weights) live in kernels/matmul.py.
"""

import numpy as np
from numba import njit, prange


@njit(cache=True, fastmath=True)
def rmsnorm(x, weight, eps, out):
    """out[i] = x[i] / rms(x[i]) * weight, row by row.  x, out: (n, dim); weight: (dim,)."""
    n, dim = x.shape
    for i in range(n):
        ss = 0.0
        for j in range(dim):
            ss += x[i, j] * x[i, j]
        scale = 1.0 / np.sqrt(ss / dim + eps)
        for j in range(dim):
            out[i, j] = x[i, j] * scale * weight[j]


def rope_tables(n_ctx: int, rope_dim: int, base: float, freq_factors=None, position_scale: float = 1.0):
    """cos/sin of pos * theta_i for every position: (n_ctx, rope_dim/2) each.

    theta_i = base^(-2i/rope_dim), divided by freq_factors[i] when the model has them
    (Llama-3 long-context scaling stores them as the rope_freqs tensor), and positions are
    multiplied by position_scale for linear rope scaling.
    """
    inv_freq = base ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)  # (rope_dim/2,)
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors, dtype=np.float64)
    angles = np.outer(np.arange(n_ctx, dtype=np.float64) * position_scale, inv_freq)  # (n_ctx, rope_dim/2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@njit(cache=True, fastmath=True)
def rope(x, n_heads, head_dim, rope_dim, start_pos, cos, sin, neox):
    """Rotate the first rope_dim dims of each head of x (n, n_heads*head_dim) in place.

    neox=False (llama.cpp's "normal" rope, used for llama/mistral GGUFs whose Q/K rows the
    converter permuted): pairs are adjacent dims (2i, 2i+1). neox=True (qwen2): pairs are
    (i, i + rope_dim/2), the rotate_half layout of Hugging Face.
    """
    n = x.shape[0]
    half = rope_dim // 2
    for t in range(n):
        p = start_pos + t
        for h in range(n_heads):
            base = h * head_dim
            for i in range(half):
                c = cos[p, i]
                s = sin[p, i]
                if neox:
                    a = base + i
                    b = base + i + half
                else:
                    a = base + 2 * i
                    b = a + 1
                x0 = x[t, a]
                x1 = x[t, b]
                x[t, a] = x0 * c - x1 * s
                x[t, b] = x0 * s + x1 * c


@njit(cache=True)
def store_kv(k, v, k_cache, v_cache, start_pos):
    """Copy new keys/values (n, n_kv*head_dim) into the caches (n_kv, n_ctx, head_dim)."""
    n = k.shape[0]
    n_kv, _, head_dim = k_cache.shape
    for t in range(n):
        for h in range(n_kv):
            for d in range(head_dim):
                k_cache[h, start_pos + t, d] = k[t, h * head_dim + d]
                v_cache[h, start_pos + t, d] = v[t, h * head_dim + d]


@njit(cache=True, fastmath=True, parallel=True)
def attention(q, k_cache, v_cache, start_pos, out):
    """Causal multi-head attention with grouped K/V heads.

    q, out: (n, n_heads*head_dim), query t sits at position start_pos + t and sees keys
    0..start_pos+t. k_cache, v_cache: (n_kv, n_ctx, head_dim); query head h reads kv head
    h // (n_heads / n_kv). Parallel over (query, head) pairs so decode (n=1) still spreads
    its heads over the threads.
    """
    n = q.shape[0]
    n_kv, n_ctx, head_dim = k_cache.shape
    n_heads = q.shape[1] // head_dim
    group = n_heads // n_kv
    scale = 1.0 / np.sqrt(head_dim)
    for job in prange(n * n_heads):
        t = job // n_heads
        h = job % n_heads
        kvh = h // group
        n_keys = start_pos + t + 1
        qh = q[t, h * head_dim : (h + 1) * head_dim]
        scores = np.empty(n_keys, dtype=np.float32)  # (n_keys,)
        best = -np.inf
        for j in range(n_keys):
            s = 0.0
            for d in range(head_dim):
                s += qh[d] * k_cache[kvh, j, d]
            s *= scale
            scores[j] = s
            best = max(best, s)
        total = 0.0
        for j in range(n_keys):
            e = np.exp(scores[j] - best)
            scores[j] = e
            total += e
        acc = np.zeros(head_dim, dtype=np.float32)  # (head_dim,)
        for j in range(n_keys):
            w = scores[j] / total
            for d in range(head_dim):
                acc[d] += w * v_cache[kvh, j, d]
        out[t, h * head_dim : (h + 1) * head_dim] = acc


@njit(cache=True, fastmath=True)
def silu_mul(gate, up):
    """gate = silu(gate) * up, in place: the SwiGLU of the feed-forward block.  (n, hidden)"""
    n, m = gate.shape
    for i in range(n):
        for j in range(m):
            g = gate[i, j]
            gate[i, j] = g / (1.0 + np.exp(-g)) * up[i, j]
