"""AVX2 (FMA) versions of the layer ops where the plain loops are latency-bound or call
exp() one value at a time: attention with its softmax, and the SwiGLU.

The portable attention (kernels/ops.py) computes each score as one 64-long dot product whose
FMAs form a single dependency chain, then exp() one score at a time; here eight keys are
scored at once (eight independent chains, summed across in one transpose, simd.sums8), the
exponentials are eight-wide (vexp), and the V sum keeps four chains. Same arithmetic up to
float rounding; tests/test_ops.py holds it to the portable version and to float64.
"""

import numba
import numpy as np
from numba import literally, njit, prange
from pyllm.kernels import kvcache
from pyllm.kernels.simd import (
    bits_as_f32,
    f32_to_i32,
    fmadd,
    hmax_f32,
    hsum_f32,
    load_f32x8,
    select_lt,
    splat_f32,
    splat_i32,
    store_f32x8,
    sums8,
    vadd,
    vdiv,
    vmax,
    vmin,
    vmul,
    vrint,
    vshl,
    vsub,
    zero_f32,
)

# exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2]: ln 2 in two
# parts (Cody and Waite) so that n * LN2_HI is exact, and exp(r) by its Taylor-like minimax
# polynomial (the classic single-precision coefficients, as in Cephes' expf).
LOG2E = np.float32(1.4426950408889634)
LN2_HI = np.float32(0.693359375)
LN2_LO = np.float32(-2.12194440e-4)
EXP_P = (np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3),
         np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1))
EXP_MAX = np.float32(88.3762626647949)  # exp overflows above
EXP_MIN = np.float32(-87.33654475)  # exp(EXP_MIN) = the smallest normal float; below it we return 0


@njit(inline="always")
def vexp(x):
    """exp of 8 lanes, within 2 ulp of the correctly rounded value on [EXP_MIN, EXP_MAX];
    0 below (no subnormals), inf above."""
    small = x
    x = vmax(vmin(x, splat_f32(EXP_MAX)), splat_f32(EXP_MIN))
    n = vrint(vmul(x, splat_f32(LOG2E)))
    r = fmadd(n, splat_f32(-LN2_LO), fmadd(n, splat_f32(-LN2_HI), x))
    p = splat_f32(EXP_P[0])
    p = fmadd(p, r, splat_f32(EXP_P[1]))
    p = fmadd(p, r, splat_f32(EXP_P[2]))
    p = fmadd(p, r, splat_f32(EXP_P[3]))
    p = fmadd(p, r, splat_f32(EXP_P[4]))
    p = fmadd(p, r, splat_f32(EXP_P[5]))
    p = fmadd(vmul(p, r), r, vadd(r, splat_f32(np.float32(1.0))))
    scale = bits_as_f32(vshl(vadd(f32_to_i32(n), splat_i32(127)), 23))  # 2^n
    return select_lt(small, splat_f32(EXP_MIN), zero_f32(), vmul(p, scale))


@njit(inline="always")
def _scores8(q, qo, k, ko, hd):
    """The dot products of q[qo:qo + hd] with the 8 rows k[ko + i*hd : ko + (i+1)*hd]."""
    a0 = zero_f32()
    a1 = zero_f32()
    a2 = zero_f32()
    a3 = zero_f32()
    a4 = zero_f32()
    a5 = zero_f32()
    a6 = zero_f32()
    a7 = zero_f32()
    for c in range(0, hd, 8):
        qv = load_f32x8(q, qo + c)
        a0 = fmadd(qv, load_f32x8(k, ko + c), a0)
        a1 = fmadd(qv, load_f32x8(k, ko + hd + c), a1)
        a2 = fmadd(qv, load_f32x8(k, ko + 2 * hd + c), a2)
        a3 = fmadd(qv, load_f32x8(k, ko + 3 * hd + c), a3)
        a4 = fmadd(qv, load_f32x8(k, ko + 4 * hd + c), a4)
        a5 = fmadd(qv, load_f32x8(k, ko + 5 * hd + c), a5)
        a6 = fmadd(qv, load_f32x8(k, ko + 6 * hd + c), a6)
        a7 = fmadd(qv, load_f32x8(k, ko + 7 * hd + c), a7)
    return sums8(a0, a1, a2, a3, a4, a5, a6, a7)


@njit(inline="always", fastmath=True)
def _dot(q, qo, k, ko, hd):
    s = np.float32(0.0)
    for d in range(hd):
        s += q[qo + d] * k[ko + d]
    return s


@njit(inline="always", fastmath=True)
def _attend(q, q_col, kf, vf, kv_base, g, n_keys, group, hd, sc, out_row):
    """One query (q, heads from q_col) against n_keys keys of kv head g (rows at kv_base of the
    flat caches kf, vf), for the `group` query heads that share it; sc: (group, n_ctx) scratch."""
    scale = np.float32(1.0 / np.sqrt(hd))
    for hh in range(group):
        qo = q_col + (g * group + hh) * hd
        s = sc[hh]
        top = splat_f32(-np.inf)
        j = 0
        while j + 8 <= n_keys:  # scores, eight keys at a time
            v = vmul(_scores8(q, qo, kf, kv_base + j * hd, hd), splat_f32(scale))
            store_f32x8(s, j, v)
            top = vmax(top, v)
            j += 8
        best = hmax_f32(top)
        while j < n_keys:
            s[j] = _dot(q, qo, kf, kv_base + j * hd, hd) * scale
            best = max(best, s[j])
            j += 1
        tot = zero_f32()
        j = 0
        while j + 8 <= n_keys:  # exponentials, eight at a time
            e = vexp(vsub(load_f32x8(s, j), splat_f32(best)))
            store_f32x8(s, j, e)
            tot = vadd(tot, e)
            j += 8
        total = hsum_f32(tot)
        while j < n_keys:
            s[j] = np.exp(s[j] - best)
            total += s[j]
            j += 1
        inv = splat_f32(np.float32(1.0) / total)
        o = (g * group + hh) * hd
        for c in range(0, hd, 8):  # out = sum_j s[j] V[j], four chains of FMAs
            a0 = zero_f32()
            a1 = zero_f32()
            a2 = zero_f32()
            a3 = zero_f32()
            j = 0
            while j + 4 <= n_keys:
                base = kv_base + j * hd + c
                a0 = fmadd(splat_f32(s[j]), load_f32x8(vf, base), a0)
                a1 = fmadd(splat_f32(s[j + 1]), load_f32x8(vf, base + hd), a1)
                a2 = fmadd(splat_f32(s[j + 2]), load_f32x8(vf, base + 2 * hd), a2)
                a3 = fmadd(splat_f32(s[j + 3]), load_f32x8(vf, base + 3 * hd), a3)
                j += 4
            while j < n_keys:
                a0 = fmadd(splat_f32(s[j]), load_f32x8(vf, kv_base + j * hd + c), a0)
                j += 1
            store_f32x8(out_row, o + c, vmul(vadd(vadd(a0, a1), vadd(a2, a3)), inv))


@njit(cache=True, fastmath=True, parallel=True)
def attention(y, q_col, n, k_cache, v_cache, start_pos, scores, accs, out):
    """kernels/ops.py's attention, same arguments; head_dim must be a multiple of 8."""
    n_kv, n_ctx, hd = k_cache.shape
    group = out.shape[1] // hd // n_kv
    kf, vf = k_cache.reshape(-1), v_cache.reshape(-1)
    for job in prange((n + 1) // 2 * n_kv):
        g, t = job % n_kv, job // n_kv
        sc = scores[numba.get_thread_id()]
        _attend(y[t], q_col, kf, vf, g * n_ctx * hd, g, start_pos + t + 1, group, hd, sc, out[t])
        if n - 1 - t != t:
            t2 = n - 1 - t
            _attend(y[t2], q_col, kf, vf, g * n_ctx * hd, g, start_pos + t2 + 1, group, hd, sc, out[t2])


@njit(cache=True, fastmath=True)
def silu_mul(y, n, gate_col, up_col, width, out):
    """kernels/ops.py's silu_mul, eight lanes at a time (vexp); width a multiple of 8."""
    one = splat_f32(np.float32(1.0))
    for t in range(n):
        row, o = y[t], out[t]
        for j in range(0, width, 8):
            g = load_f32x8(row, gate_col + j)
            e = vexp(vsub(zero_f32(), g))
            store_f32x8(o, j, vmul(vdiv(g, vadd(one, e)), load_f32x8(row, up_col + j)))


@njit(inline="always", fastmath=True)
def _attend_kv(kt, vt, q, q_col, qq, kf, vf, kbase, vbase, krow, vrow, g, n_keys, group, hd, sc, f16, out_row):
    """_attend for caches of any type (kernels/kvcache.py): kf, vf the caches flattened, kbase,
    vbase the offsets of kv head g's rows, krow, vrow a row's length in elements; qq (group,
    q8_0 row) scratch for the quantized query."""
    scale = np.float32(1.0 / np.sqrt(hd))
    for hh in range(group):
        qo = q_col + (g * group + hh) * hd
        qh = qq[hh]
        kvcache.prepare_q(kt, q, qo, qh, hd, f16)
        s = sc[hh]
        top = splat_f32(-np.inf)
        j = 0
        while j + 8 <= n_keys:  # scores, eight keys at a time
            v = vmul(kvcache.dot8(kt, q, qo, qh, kf, kbase + j * krow, krow, hd), splat_f32(scale))
            store_f32x8(s, j, v)
            top = vmax(top, v)
            j += 8
        padded = j
        if j < n_keys and j + 8 <= s.shape[0] and kbase + (j + 8) * krow <= kf.shape[0]:
            # The last keys with the cache's next (unused) rows as padding, one dot8 instead of up
            # to seven scalar dots that cost more than all the rest (measured: SmolLM2, 128 keys):
            # the padding's scores become -1e30 (finite: fastmath assumes no infinities), weight 0.
            store_f32x8(s, j, vmul(kvcache.dot8(kt, q, qo, qh, kf, kbase + j * krow, krow, hd), splat_f32(scale)))
            for k in range(n_keys, j + 8):
                s[k] = np.float32(-1e30)
            top = vmax(top, load_f32x8(s, j))
            j = n_keys
            padded += 8
        best = hmax_f32(top)
        while j < n_keys:  # only at the end of the cache
            s[j] = kvcache.dot(kt, q, qo, qh, kf, kbase + j * krow, hd, f16) * scale
            best = max(best, s[j])
            j += 1
        tot = zero_f32()
        j = 0
        while j + 8 <= padded:  # exponentials, eight at a time
            e = vexp(vsub(load_f32x8(s, j), splat_f32(best)))
            store_f32x8(s, j, e)
            tot = vadd(tot, e)
            j += 8
        total = hsum_f32(tot)
        while j < n_keys:
            s[j] = np.exp(s[j] - best)
            total += s[j]
            j += 1
        inv = splat_f32(np.float32(1.0) / total)
        o = (g * group + hh) * hd
        for c in range(0, hd, 8):  # out = sum_j s[j] V[j], four chains of FMAs
            a0 = zero_f32()
            a1 = zero_f32()
            a2 = zero_f32()
            a3 = zero_f32()
            j = 0
            while j + 4 <= n_keys:
                base = vbase + j * vrow
                a0 = fmadd(splat_f32(s[j]), kvcache.load8(vt, vf, base, c), a0)
                a1 = fmadd(splat_f32(s[j + 1]), kvcache.load8(vt, vf, base + vrow, c), a1)
                a2 = fmadd(splat_f32(s[j + 2]), kvcache.load8(vt, vf, base + 2 * vrow, c), a2)
                a3 = fmadd(splat_f32(s[j + 3]), kvcache.load8(vt, vf, base + 3 * vrow, c), a3)
                j += 4
            while j < n_keys:
                a0 = fmadd(splat_f32(s[j]), kvcache.load8(vt, vf, vbase + j * vrow, c), a0)
                j += 1
            store_f32x8(out_row, o + c, vmul(vadd(vadd(a0, a1), vadd(a2, a3)), inv))


@njit(cache=True, fastmath=True, parallel=True)
def attention_kv(kt, vt, y, q_col, n, k_cache, v_cache, start_pos, scores, qqs, f16, out):
    """kernels/ops.py's attention_kv, same arguments but accs; head_dim a multiple of 8."""
    literally(kt)
    literally(vt)
    n_kv, n_ctx = k_cache.shape[0], k_cache.shape[1]
    krow, vrow = k_cache.shape[2], v_cache.shape[2]
    group = scores.shape[1]
    hd = out.shape[1] // group // n_kv
    kf, vf = k_cache.reshape(-1), v_cache.reshape(-1)
    for job in prange((n + 1) // 2 * n_kv):
        g, t = job % n_kv, job // n_kv
        sc, qq = scores[numba.get_thread_id()], qqs[numba.get_thread_id()]
        kb, vb = g * n_ctx * krow, g * n_ctx * vrow
        _attend_kv(kt, vt, y[t], q_col, qq, kf, vf, kb, vb, krow, vrow, g, start_pos + t + 1, group, hd, sc, f16,
                   out[t])
        if n - 1 - t != t:
            t2 = n - 1 - t
            _attend_kv(kt, vt, y[t2], q_col, qq, kf, vf, kb, vb, krow, vrow, g, start_pos + t2 + 1, group, hd, sc, f16,
                       out[t2])
