"""The small per-layer kernels of a Llama-family decoder: RMSNorm, RoPE, attention, SwiGLU.

Each works in place or into a preallocated output, so decoding a token allocates nothing;
the compiled step (kernels/forward.py) calls them. Products with the weights live in
kernels/matmul.py and kernels/dots*.py.
"""

import numba
import numpy as np
from numba import literally, njit, prange
from numba.core import types
from numba.extending import overload
from pyllm.kernels import kvcache


@njit(cache=True, fastmath=True)
def rmsnorm(x, weight, eps, out):
    """out[i] = x[i] / rms(x[i]) * weight, row by row.  x, out: (n, dim); weight: (dim,)."""
    n, dim = x.shape
    for i in range(n):
        ss = np.float32(0.0)
        for j in range(dim):
            ss += x[i, j] * x[i, j]
        scale = np.float32(1.0) / np.sqrt(ss / np.float32(dim) + eps)
        for j in range(dim):
            out[i, j] = x[i, j] * scale * weight[j]


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
def hadamard(x, n, width, size):
    """x[:n, :width] <- each run of `size` values (a power of two) times H_size, the orthonormal
    Walsh-Hadamard matrix in Sylvester order: symmetric and its own inverse (llama.cpp's
    ggml_gen_hadamard, src/llama-kv-cache.cpp). A fast transform: log2(size) butterfly passes.

    Why: a quantized K/V cache stores each head's rows in 32-value blocks with one scale, and a
    few large dims (outliers) set that scale; rotating q and k alike (q.k is unchanged) and v
    (undone on the attention output) spreads them over the block first."""
    scale = np.float32(1.0 / np.sqrt(size))
    for t in range(n):
        for c in range(0, width, size):
            h = 1
            while h < size:
                for i in range(c, c + size, 2 * h):
                    for j in range(i, i + h):
                        a, b = x[t, j], x[t, j + h]
                        x[t, j] = a + b
                        x[t, j + h] = a - b
                h *= 2
            for j in range(c, c + size):
                x[t, j] *= scale


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


# A float32 K/V cache is read only through _kv_dot and _kv_axpy; the other cache types through
# the typed kernels of kernels/kvcache.py (attention_kv below).


@njit(inline="always", fastmath=True)
def _kv_dot(cache, g, j, q, qo, head_dim):
    """q[qo:qo + head_dim] . K row j of kv head g."""
    s = np.float32(0.0)
    for d in range(head_dim):
        s += q[qo + d] * cache[g, j, d]
    return s


@njit(inline="always", fastmath=True)
def _kv_axpy(cache, g, j, w, acc, hh, head_dim):
    """acc[hh] += w * V row j of kv head g."""
    for d in range(head_dim):
        acc[hh, d] += w * cache[g, j, d]


@njit(inline="always", fastmath=True)
def _attend(y, q_col, k_cache, v_cache, g, t, start, group, sc, acc, out):
    """Query t (position start + t) against keys 0..start+t of kv head g, for the `group`
    query heads that share it: each K and V row is read once for all of them."""
    head_dim = k_cache.shape[2]
    scale = np.float32(1.0 / np.sqrt(head_dim))
    q = y[t]
    n_keys = start + t + 1
    for j in range(n_keys):
        for hh in range(group):
            sc[hh, j] = _kv_dot(k_cache, g, j, q, q_col + (g * group + hh) * head_dim, head_dim) * scale
    for hh in range(group):  # softmax of each head's scores
        best = -np.inf
        for j in range(n_keys):
            best = max(best, sc[hh, j])
        total = np.float32(0.0)
        for j in range(n_keys):
            e = np.exp(sc[hh, j] - best)
            sc[hh, j] = e
            total += e
        inv = np.float32(1.0) / total
        for j in range(n_keys):
            sc[hh, j] *= inv
        for d in range(head_dim):
            acc[hh, d] = np.float32(0.0)
    for j in range(n_keys):
        for hh in range(group):
            _kv_axpy(v_cache, g, j, sc[hh, j], acc, hh, head_dim)
    for hh in range(group):
        o = (g * group + hh) * head_dim
        for d in range(head_dim):
            out[t, o + d] = acc[hh, d]


@njit(cache=True, fastmath=True, parallel=True)
def attention(y, q_col, n, k_cache, v_cache, start_pos, scores, accs, out):
    """Causal multi-head attention with grouped K/V heads, allocation-free.

    Queries: y[t, q_col:q_col + n_heads*head_dim] for t < n, query t at position
    start_pos + t, seeing keys 0..start_pos+t. k_cache, v_cache: (n_kv, n_ctx, head_dim); query
    head h reads kv head h // (n_heads / n_kv). out: (>= n, n_heads*head_dim). scores
    (threads, group, n_ctx) and accs (threads, group, head_dim) are per-thread scratch.
    A job is one kv head and a pair of queries (t, n-1-t): the jobs, split evenly over the
    threads, then have even numbers of keys; for one token the kv heads spread over them.
    """
    n_kv, _, head_dim = k_cache.shape
    group = out.shape[1] // head_dim // n_kv
    for job in prange((n + 1) // 2 * n_kv):
        g, t = job % n_kv, job // n_kv
        tid = numba.get_thread_id()
        _attend(y, q_col, k_cache, v_cache, g, t, start_pos, group, scores[tid], accs[tid], out)
        if n - 1 - t != t:
            _attend(y, q_col, k_cache, v_cache, g, n - 1 - t, start_pos, group, scores[tid], accs[tid], out)


@njit(inline="always", fastmath=True)
def _attend_kv(kt, vt, y, q_col, kf, vf, kbase, vbase, krow, vrow, g, t, start, group, hd, sc, acc, qq, f16, out):
    """_attend for caches of any type (kernels/kvcache.py): kf, vf are the caches flattened,
    kbase, vbase the offsets of kv head g's rows, krow, vrow a row's length in elements; qq
    (group, q8_0 row) scratch for the quantized query."""
    scale = np.float32(1.0 / np.sqrt(hd))
    q = y[t]
    n_keys = start + t + 1
    for hh in range(group):
        kvcache.prepare_q(kt, q, q_col + (g * group + hh) * hd, qq[hh], hd, f16)
    for j in range(n_keys):
        for hh in range(group):
            qo = q_col + (g * group + hh) * hd
            sc[hh, j] = kvcache.dot(kt, q, qo, qq[hh], kf, kbase + j * krow, hd, f16) * scale
    for hh in range(group):  # softmax of each head's scores
        best = -np.inf
        for j in range(n_keys):
            best = max(best, sc[hh, j])
        total = np.float32(0.0)
        for j in range(n_keys):
            e = np.exp(sc[hh, j] - best)
            sc[hh, j] = e
            total += e
        inv = np.float32(1.0) / total
        for j in range(n_keys):
            sc[hh, j] *= inv
        for d in range(hd):
            acc[hh, d] = np.float32(0.0)
    for j in range(n_keys):
        for hh in range(group):
            kvcache.axpy(vt, vf, vbase + j * vrow, sc[hh, j], acc[hh], hd, f16)
    for hh in range(group):
        o = (g * group + hh) * hd
        for d in range(hd):
            out[t, o + d] = acc[hh, d]


@njit(cache=True, fastmath=True, parallel=True)
def attention_kv(kt, vt, y, q_col, n, k_cache, v_cache, start_pos, scores, accs, qqs, f16, out):
    """attention() over caches of types kt, vt (literal codes of kernels/kvcache.py): k_cache,
    v_cache (n_kv, n_ctx, row) as kvcache.new_cache makes them; qqs (threads, group, q8_0 row)
    uint8 scratch for the quantized queries; f16: quants.F16_TABLE."""
    literally(kt)
    literally(vt)
    n_kv, n_ctx = k_cache.shape[0], k_cache.shape[1]
    krow, vrow = k_cache.shape[2], v_cache.shape[2]
    group = scores.shape[1]
    hd = out.shape[1] // group // n_kv
    kf, vf = k_cache.reshape(-1), v_cache.reshape(-1)
    for job in prange((n + 1) // 2 * n_kv):
        g, t = job % n_kv, job // n_kv
        tid = numba.get_thread_id()
        sc, acc, qq = scores[tid], accs[tid], qqs[tid]
        kb, vb = g * n_ctx * krow, g * n_ctx * vrow
        _attend_kv(kt, vt, y, q_col, kf, vf, kb, vb, krow, vrow, g, t, start_pos, group, hd, sc, acc, qq, f16, out)
        if n - 1 - t != t:
            _attend_kv(kt, vt, y, q_col, kf, vf, kb, vb, krow, vrow, g, n - 1 - t, start_pos, group, hd, sc, acc, qq,
                       f16, out)


@njit(cache=True, fastmath=True)
def silu_mul(y, n, gate_col, up_col, width, out):
    """out[t] = silu(gate) * up, the SwiGLU of the feed-forward block, for gate and up in
    columns gate_col, up_col (width each) of y's first n rows.  out: (>= n, width)"""
    for t in range(n):
        for j in range(width):
            g = y[t, gate_col + j]
            out[t, j] = g / (np.float32(1.0) + np.exp(-g)) * y[t, up_col + j]


def attention_at(isa, y, q_col, n, k_cache, v_cache, start_pos, scores, accs, out):
    """attention() with the kernels of level isa (a compile-time constant, kernels/cpu.py):
    the AVX2 version (kernels/ops_avx2.py) from that level on, which needs head_dim % 8 == 0
    (the caller passes PORTABLE otherwise), else the portable one. Only one is compiled."""
    raise NotImplementedError("only callable from compiled code")


@overload(attention_at, prefer_literal=True)
def _attention_at(isa, y, q_col, n, k_cache, v_cache, start_pos, scores, accs, out):
    if not isinstance(isa, types.IntegerLiteral):
        return None
    from pyllm.kernels.cpu import AVX2, isa_supported

    if isa.literal_value >= AVX2 and isa_supported(AVX2):
        from pyllm.kernels.ops_avx2 import attention as fast

        def impl(isa, y, q_col, n, k_cache, v_cache, start_pos, scores, accs, out):
            fast(y, q_col, n, k_cache, v_cache, start_pos, scores, accs, out)

        return impl

    def portable(isa, y, q_col, n, k_cache, v_cache, start_pos, scores, accs, out):
        attention(y, q_col, n, k_cache, v_cache, start_pos, scores, accs, out)

    return portable


def attention_kv_at(isa, kt, vt, y, q_col, n, k_cache, v_cache, start_pos, scores, accs, qqs, f16, out):
    """attention_at() over caches of types kt, vt (literal codes of kernels/kvcache.py): float32
    caches take attention_at itself, unchanged; the other types attention_kv (portable) or its
    AVX2 version from that level on. Only one is compiled."""
    raise NotImplementedError("only callable from compiled code")


@overload(attention_kv_at, prefer_literal=True)
def _attention_kv_at(isa, kt, vt, y, q_col, n, k_cache, v_cache, start_pos, scores, accs, qqs, f16, out):
    if not all(isinstance(a, types.IntegerLiteral) for a in (isa, kt, vt)):
        return None
    from pyllm.kernels.cpu import AVX2, isa_supported

    if kt.literal_value == kvcache.F32 and vt.literal_value == kvcache.F32:
        def f32(isa, kt, vt, y, q_col, n, k_cache, v_cache, start_pos, scores, accs, qqs, f16, out):
            attention_at(isa, y, q_col, n, k_cache, v_cache, start_pos, scores, accs, out)

        return f32
    if isa.literal_value >= AVX2 and isa_supported(AVX2):
        from pyllm.kernels.ops_avx2 import attention_kv as fast

        def impl(isa, kt, vt, y, q_col, n, k_cache, v_cache, start_pos, scores, accs, qqs, f16, out):
            fast(kt, vt, y, q_col, n, k_cache, v_cache, start_pos, scores, qqs, f16, out)

        return impl

    def portable(isa, kt, vt, y, q_col, n, k_cache, v_cache, start_pos, scores, accs, qqs, f16, out):
        attention_kv(kt, vt, y, q_col, n, k_cache, v_cache, start_pos, scores, accs, qqs, f16, out)

    return portable


def silu_mul_at(isa, y, n, gate_col, up_col, width, out):
    """silu_mul() with the kernels of level isa (AVX2: eight-wide exp; needs width % 8 == 0,
    the caller passes PORTABLE otherwise)."""
    raise NotImplementedError("only callable from compiled code")


@overload(silu_mul_at, prefer_literal=True)
def _silu_mul_at(isa, y, n, gate_col, up_col, width, out):
    if not isinstance(isa, types.IntegerLiteral):
        return None
    from pyllm.kernels.cpu import AVX2, isa_supported

    if isa.literal_value >= AVX2 and isa_supported(AVX2):
        from pyllm.kernels.ops_avx2 import silu_mul as fast

        def impl(isa, y, n, gate_col, up_col, width, out):
            fast(y, n, gate_col, up_col, width, out)

        return impl

    def portable(isa, y, n, gate_col, up_col, width, out):
        silu_mul(y, n, gate_col, up_col, width, out)

    return portable
