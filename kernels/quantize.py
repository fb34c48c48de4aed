"""Quantizers: float32 rows -> raw GGML blocks (the inverse of the decoders in quants.py).

    quantize(x, qtype) -> uint8 (rows, row_bytes(qtype, cols))

Legacy types (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0) and F16/BF16 are byte-identical to gguf-py's
`gguf.quants.quantize` (which itself matches ggml's quantize_row_*_ref). The K-quants
(Q2_K..Q6_K, Q8_K) follow llama.cpp's reference quantizers quantize_row_qN_K_ref and their
helpers make_qx_quants / make_q3_quants / make_qkx2_quants in ggml/src/ggml-quants.c
(llama.cpp commit c392e509, Feb 2025), operation for operation in float32, so the bytes
match a build of that C code compiled without FMA contraction (-ffp-contract=off; a
-march=native build may fuse multiply-adds and differ in rare last-bit ties).

Every arithmetic step below is kept in float32 on purpose: in Numba, float32 mixed with an
int or a Python float literal silently widens to float64, so ints are converted with F()
and constants are float32 globals. No fastmath (it would allow contraction/reassociation).
Inputs are expected finite: NaN/inf give whatever the float->int casts give (as in C).

Dispatch: kernels/blocks.py's table names each type's row quantizer (row_<type> below); one
parallel loop over rows is compiled per type on its first use (then cached on disk).
"""

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic
from pyllm.base import BLOCK_SIZE, GGMLType, row_bytes
from pyllm.kernels.dispatch import SOURCE_STAMP, quantize_row
from pyllm.kernels.quants import F16_TABLE

F = np.float32
# Constant arguments go through I()/B() so that Numba compiles one specialization of a helper
# rather than one per literal value (it types literal arguments first): fewer compilations.
I = np.int64
B = np.bool_
F0 = np.float32(0.0)
F1 = np.float32(1.0)
GROUP_MAX_EPS = np.float32(1e-15)  # ggml-quants.c: all-zero threshold of a group
MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: the nearest_int trick


_jit = njit(cache=True, error_model="numpy")  # numpy: x/0 gives inf/nan, as in C


@intrinsic
def _bits(typingctx, x):
    """The IEEE bits of a float32 as uint32 (a bitcast, no conversion)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@_jit
def nearest_int(fval):
    # ggml-quants.c nearest_int: add 1.5*2^23 in float32 and read the mantissa (round half to
    # even; valid for |fval| <= 2^22).
    i = np.int64(_bits(fval + MAGIC))
    return (i & 0x007FFFFF) - 0x00400000


@_jit
def f32_to_f16(f):
    """float32 -> IEEE half bits (int), round to nearest even: as numpy's astype(float16)
    and ggml's GGML_FP32_TO_FP16 (overflow to inf, subnormals kept)."""
    w = np.int64(_bits(f))
    sign = (w >> 16) & 0x8000
    a = w & 0x7FFFFFFF
    if a > 0x7F800000:  # NaN: keep the top payload bits, stay a NaN (numpy's rule)
        h = 0x7C00 + ((a & 0x7FFFFF) >> 13)
        if h == 0x7C00:
            h += 1
        return sign | h
    if a >= 0x477FF000:  # >= 65520 rounds to inf
        return sign | 0x7C00
    if a < 0x38800000:  # below the smallest normal half: a subnormal (or zero)
        e = a >> 23
        if e < 102:
            return sign
        m = (a & 0x7FFFFF) | 0x800000
        shift = 126 - e
        q = m >> shift
        rem = m & ((np.int64(1) << shift) - 1)
        half = np.int64(1) << (shift - 1)
        if rem > half or (rem == half and (q & 1)):
            q += 1
        return sign | q
    a -= 112 << 23  # rebias the exponent 127 -> 15
    return sign | ((a + 0xFFF + ((a >> 13) & 1)) >> 13)


@_jit
def _put16(b, i, v):
    b[i] = np.uint8(v & 0xFF)
    b[i + 1] = np.uint8((v >> 8) & 0xFF)


@_jit
def _u(b, i):
    # a byte as int64: mixing uint8 with int64 in Numba can otherwise unify to float64
    return np.int64(b[i])


@_jit
def _or(b, i, v):
    b[i] = np.uint8((np.int64(b[i]) | v) & 0xFF)


@_jit
def _f16(b, i, f16):
    return f16[np.int64(b[i]) | (np.int64(b[i + 1]) << 8)]


# -- plain floats ---------------------------------------------------------------------------


@_jit
def _row_f16(x, b):
    for j in range(x.shape[0]):
        _put16(b, 2 * j, f32_to_f16(x[j]))


@_jit
def _row_bf16(x, b):
    # ggml_compute_fp32_to_bf16 / gguf-py BF16: quiet NaNs, otherwise round to nearest even.
    for j in range(x.shape[0]):
        n = np.int64(_bits(x[j]))
        if (n & 0x7FFFFFFF) > 0x7F800000:
            h = ((n >> 16) & 0xFFFF) | 64
        else:
            h = ((n + (0x7FFF + ((n >> 16) & 1))) >> 16) & 0xFFFF
        _put16(b, 2 * j, h)


@_jit
def _row_f32(x, b):
    for j in range(x.shape[0]):
        v = np.int64(_bits(x[j]))
        b[4 * j] = np.uint8(v & 0xFF)
        b[4 * j + 1] = np.uint8((v >> 8) & 0xFF)
        b[4 * j + 2] = np.uint8((v >> 16) & 0xFF)
        b[4 * j + 3] = np.uint8((v >> 24) & 0xFF)


# -- legacy 32-element blocks (gguf-py quants.py / ggml quantize_row_q*_ref) -----------------


@_jit
def _absmax_signed(x):
    """The element of largest magnitude (the first one on ties), with its sign."""
    amax = F0
    mx = F0
    for j in range(x.shape[0]):
        v = x[j]
        if amax < abs(v):
            amax = abs(v)
            mx = v
    return mx


@_jit
def _trunc_u(v):
    # (int)(v) of a float32 that is >= 0 here; truncation toward zero as C and np.trunc
    return np.int64(v)


@_jit
def _blk_q4_0(x, b):
    d = _absmax_signed(x) / F(-8.0)
    idd = F1 / d if d != F0 else F0
    _put16(b, I(0), f32_to_f16(d))
    for j in range(16):
        q0 = min(15, _trunc_u(x[j] * idd + F(8.5)))
        q1 = min(15, _trunc_u(x[j + 16] * idd + F(8.5)))
        b[2 + j] = np.uint8(q0 | (q1 << 4))


@_jit
def _minmax(x):
    mn = x[0]
    mx = x[0]
    for j in range(1, x.shape[0]):
        if x[j] < mn:
            mn = x[j]
        if x[j] > mx:
            mx = x[j]
    return mn, mx


@_jit
def _blk_q4_1(x, b):
    mn, mx = _minmax(x)
    d = (mx - mn) / F(15.0)
    idd = F1 / d if d != F0 else F0
    _put16(b, I(0), f32_to_f16(d))
    _put16(b, I(2), f32_to_f16(mn))
    for j in range(16):
        q0 = min(15, _trunc_u((x[j] - mn) * idd + F(0.5)))
        q1 = min(15, _trunc_u((x[j + 16] - mn) * idd + F(0.5)))
        b[4 + j] = np.uint8(q0 | (q1 << 4))


@_jit
def _put_qh(b, i, qh):
    for k in range(4):
        b[i + k] = np.uint8((qh >> (8 * k)) & 0xFF)


@_jit
def _blk_q5_0(x, b):
    d = _absmax_signed(x) / F(-16.0)
    idd = F1 / d if d != F0 else F0
    _put16(b, I(0), f32_to_f16(d))
    qh = np.int64(0)
    for j in range(16):
        q0 = min(31, _trunc_u(x[j] * idd + F(16.5)))
        q1 = min(31, _trunc_u(x[j + 16] * idd + F(16.5)))
        b[6 + j] = np.uint8((q0 & 15) | ((q1 & 15) << 4))
        qh |= ((q0 >> 4) & 1) << j
        qh |= ((q1 >> 4) & 1) << (j + 16)
    _put_qh(b, I(2), qh)


@_jit
def _blk_q5_1(x, b):
    mn, mx = _minmax(x)
    d = (mx - mn) / F(31.0)
    idd = F1 / d if d != F0 else F0
    _put16(b, I(0), f32_to_f16(d))
    _put16(b, I(2), f32_to_f16(mn))
    qh = np.int64(0)
    for j in range(16):
        q0 = min(31, _trunc_u((x[j] - mn) * idd + F(0.5)))
        q1 = min(31, _trunc_u((x[j + 16] - mn) * idd + F(0.5)))
        b[8 + j] = np.uint8((q0 & 15) | ((q1 & 15) << 4))
        qh |= ((q0 >> 4) & 1) << j
        qh |= ((q1 >> 4) & 1) << (j + 16)
    _put_qh(b, I(4), qh)


@_jit
def _roundf(v):
    # C roundf (half away from zero) as gguf-py's np_roundf computes it, in float32
    a = abs(v)
    fl = np.floor(a)
    r = np.int64(fl + np.floor(F(2.0) * (a - fl)))
    return -r if v < F0 else r


@_jit
def _blk_q8_0(x, b):
    amax = F0
    for j in range(32):
        amax = max(amax, abs(x[j]))
    d = amax / F(127.0)
    idd = F1 / d if d != F0 else F0
    _put16(b, I(0), f32_to_f16(d))
    for j in range(32):
        b[2 + j] = np.uint8(_roundf(x[j] * idd) & 0xFF)


# -- K-quant helpers (ggml-quants.c) ---------------------------------------------------------


@_jit
def _make_qkx2(n, nmax, x, w, L, Laux, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants: an affine (scale, -min) fit of x to 0..nmax under weights w, trying
    nstep+1 candidate scales. Fills L[:n]; returns (scale, the_min)."""
    nmaxf = F(nmax)
    mn = x[0]
    mx = x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if mn > F0:
        mn = F0
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return F0, -mn
    iscale = nmaxf / (mx - mn)
    scale = F1 / iscale
    best_mad = F0
    for i in range(n):
        l = nearest_int(iscale * (x[i] - mn))
        L[i] = max(0, min(nmax, l))
        diff = scale * F(L[i]) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_mad += w[i] * diff
    if nstep < 1:
        return scale, -mn
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F(step) + nmaxf) / (mx - mn)
        sum_l = F0
        sum_l2 = F0
        sum_xl = F0
        for i in range(n):
            l = max(0, min(nmax, nearest_int(iscale * (x[i] - mn))))
            Laux[i] = l
            fl = F(l)
            wl = w[i] * fl
            sum_l += wl
            sum_l2 += wl * fl
            sum_xl += wl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > F0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > F0:
                this_min = F0
                this_scale = sum_xl / sum_l2
            mad = F0
            for i in range(n):
                diff = this_scale * F(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                mad += w[i] * diff
            if mad < best_mad:
                for i in range(n):
                    L[i] = Laux[i]
                best_mad = mad
                scale = this_scale
                mn = this_min
    return scale, -mn


@_jit
def _signed_absmax(x, n):
    """The largest |x[i]| of x[:n] and the signed value that has it (the first, on ties):
    the K-quant searches scale by -nmax / that value, as ggml-quants.c does."""
    mx = F0
    amax = F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    return amax, mx


@_jit
def _make_qx_rmse1(n, nmax, x, L):
    """make_qx_quants with rmse_type 1 (weights x^2) and no importance: a symmetric scale
    searched over 19 candidates; L[:n] = q + nmax. Returns the scale."""
    nmaxf = F(nmax)
    amax, mx = _signed_absmax(x, n)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    iscale = -nmaxf / mx
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = l + nmax
        fl = F(l)
        w = x[i] * x[i]
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != F0 else F0
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(nmaxf + F(0.1) * F(step)) / mx
        sumlx = F0
        suml2 = F0
        for i in range(n):
            fl = F(max(-nmax, min(nmax - 1, nearest_int(iscale * x[i]))))
            w = x[i] * x[i]
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > F0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@_jit
def _make_q3(n, nmax, x, L):
    """make_q3_quants with do_rmse: a symmetric scale refined element by element (up to 5
    passes) under weights x^2. L[:n] = q + nmax. Returns the scale."""
    nmaxf = F(nmax)
    amax, mx = _signed_absmax(x, n)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    iscale = -nmaxf / mx
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = l
        fl = F(l)
        w = x[i] * x[i]
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            fL = F(L[i])
            slx = sumlx - w * x[i] * fL
            if slx > F0:
                sl2 = suml2 - w * fL * fL
                new_l = max(-nmax, min(nmax - 1, nearest_int(x[i] * sl2 / slx)))
                if new_l != L[i]:
                    fn = F(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if sl2 > F0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2


@_jit
def _pack2(L, b, o):
    """Four 2-bit planes: byte o + 32h + l holds L[128h + 32s + l] at bits 2s (Q2_K, Q3_K)."""
    for h in range(2):
        for l in range(32):
            j = 128 * h + l
            b[o + 32 * h + l] = np.uint8(L[j] | (L[j + 32] << 2) | (L[j + 64] << 4) | (L[j + 96] << 6))


@_jit
def _blk_q2_k(x, b, f16, L, Laux, w, scales, mins):
    # quantize_row_q2_K_ref. Layout: scales[16] qs[64] d dmin.
    q4scale = F(15.0)
    max_scale = F0
    max_min = F0
    for j in range(16):
        xs = x[16 * j:16 * j + 16]
        for l in range(16):
            w[l] = abs(xs[l])
        s, m = _make_qkx2(I(16), I(3), xs, w, L[16 * j:16 * j + 16], Laux, F(-0.5), F(0.1), I(15), B(True))
        scales[j] = s
        mins[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    if max_scale > F0:
        iscale = q4scale / max_scale
        for j in range(16):
            b[j] = np.uint8(nearest_int(iscale * scales[j]) & 0xFF)
        _put16(b, I(80), f32_to_f16(max_scale / q4scale))
    else:
        for j in range(16):
            b[j] = 0
        _put16(b, I(80), I(0))
    if max_min > F0:
        iscale = q4scale / max_min
        for j in range(16):
            b[j] = np.uint8((np.int64(b[j]) | (nearest_int(iscale * mins[j]) << 4)) & 0xFF)
        _put16(b, I(82), f32_to_f16(max_min / q4scale))
    else:
        _put16(b, I(82), I(0))
    dd = _f16(b, I(80), f16)
    dmin = _f16(b, I(82), f16)
    for j in range(16):
        d = dd * F(_u(b, j) & 15)
        if d == F0:
            continue
        dm = dmin * F(_u(b, j) >> 4)
        for ii in range(16):
            L[16 * j + ii] = max(0, min(3, nearest_int((x[16 * j + ii] + dm) / d)))
    _pack2(L, b, I(16))


@_jit
def _blk_q3_k(x, b, f16, L, scales):
    # quantize_row_q3_K_ref. Layout: hmask[32] qs[64] scales[12] d.
    max_scale = F0
    amax = F0
    for j in range(16):
        s = _make_q3(I(16), I(4), x[16 * j:16 * j + 16], L[16 * j:16 * j + 16])
        scales[j] = s
        if abs(s) > amax:
            amax = abs(s)
            max_scale = s
    for k in range(12):
        b[96 + k] = 0
    if max_scale != F0:
        iscale = F(-32.0) / max_scale
        for j in range(16):
            l = np.int64(np.int8(nearest_int(iscale * scales[j]) & 0xFF))  # C: int8_t l = ...
            l = max(-32, min(31, l)) + 32
            if j < 8:
                b[96 + j] = np.uint8(l & 15)
            else:
                _or(b, 96 + j - 8, (l & 15) << 4)
            _or(b, 104 + j % 4, ((l >> 4) << (2 * (j // 4))) & 0xFF)
        _put16(b, I(108), f32_to_f16(F1 / iscale))
    else:
        _put16(b, I(108), I(0))
    dd = _f16(b, I(108), f16)
    for j in range(16):
        lo = (_u(b, 96 + j) & 15) if j < 8 else (_u(b, 96 + j - 8) >> 4)
        sc = np.int64(lo | (((_u(b, 104 + j % 4) >> (2 * (j // 4))) & 3) << 4)) - 32
        d = dd * F(sc)
        if d == F0:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-4, min(3, nearest_int(x[16 * j + ii] / d))) + 4
    for m in range(32):
        b[m] = 0
    for j in range(256):
        if L[j] > 3:
            _or(b, j % 32, 1 << (j // 32))
            L[j] -= 4
    _pack2(L, b, I(32))


@_jit
def _fit_k4(x, f16, L, Laux, w, scales, mins, b, nmax, rmin, nstep):
    """The shared body of quantize_row_q4_K_ref / q5_K_ref: eight 32-element sub-blocks, each
    an affine fit, then 6-bit scales and mins in b[4:16] (get_scale_min_k4 packing), d and dmin
    in b[0:4], and the final L[256] in 0..nmax against the rounded scales."""
    max_scale = F0
    max_min = F0
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        sum_x2 = F0
        for l in range(32):
            sum_x2 += xs[l] * xs[l]
        av_x = np.sqrt(sum_x2 / F(32.0))
        for l in range(32):
            w[l] = av_x + abs(xs[l])
        s, m = _make_qkx2(I(32), nmax, xs, w, L[32 * j:32 * j + 32], Laux, rmin, F(0.1), nstep, B(False))
        scales[j] = s
        mins[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    inv_scale = F(63.0) / max_scale if max_scale > F0 else F0
    inv_min = F(63.0) / max_min if max_min > F0 else F0
    for j in range(8):
        ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # C: uint8_t ls = nearest_int(..)
        lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        if j < 4:
            b[4 + j] = np.uint8(ls)
            b[8 + j] = np.uint8(lm)
        else:
            b[8 + j] = np.uint8((ls & 15) | ((lm & 15) << 4))
            _or(b, 4 + j - 4, (ls >> 4) << 6)
            _or(b, 4 + j, (lm >> 4) << 6)
    _put16(b, I(0), f32_to_f16(max_scale / F(63.0)))
    _put16(b, I(2), f32_to_f16(max_min / F(63.0)))
    dd = _f16(b, I(0), f16)
    dmin = _f16(b, I(2), f16)
    for j in range(8):
        if j < 4:
            sc = _u(b, 4 + j) & 63
            m = _u(b, 8 + j) & 63
        else:
            sc = (_u(b, 8 + j) & 15) | ((_u(b, j) >> 6) << 4)
            m = (_u(b, 8 + j) >> 4) | ((_u(b, 4 + j) >> 6) << 4)
        d = dd * F(sc)
        if d == F0:
            continue
        dm = dmin * F(m)
        for ii in range(32):
            L[32 * j + ii] = max(0, min(nmax, nearest_int((x[32 * j + ii] + dm) / d)))


@_jit
def _blk_q4_k(x, b, f16, L, Laux, w, scales, mins):
    # quantize_row_q4_K_ref. Layout: d dmin scales[12] qs[128].
    for k in range(12):
        b[4 + k] = 0
    _fit_k4(x, f16, L, Laux, w, scales, mins, b, I(15), F(-1.0), I(20))
    for c in range(4):
        for l in range(32):
            b[16 + 32 * c + l] = np.uint8(L[64 * c + l] | (L[64 * c + l + 32] << 4))


@_jit
def _blk_q5_k(x, b, f16, L, Laux, w, scales, mins):
    # quantize_row_q5_K_ref. Layout: d dmin scales[12] qh[32] qs[128].
    for k in range(12):
        b[4 + k] = 0
    _fit_k4(x, f16, L, Laux, w, scales, mins, b, I(31), F(-0.5), I(15))
    for k in range(32):
        b[16 + k] = 0
    for c in range(4):
        for j in range(32):
            l1 = L[64 * c + j]
            if l1 > 15:
                l1 -= 16
                _or(b, 16 + j, 1 << (2 * c))
            l2 = L[64 * c + j + 32]
            if l2 > 15:
                l2 -= 16
                _or(b, 16 + j, 2 << (2 * c))
            b[48 + 32 * c + j] = np.uint8(l1 | (l2 << 4))


@_jit
def _blk_q6_k(x, b, f16, L, scales):
    # quantize_row_q6_K_ref. Layout: ql[128] qh[64] scales:int8[16] d.
    max_scale = F0
    max_abs_scale = F0
    for ib in range(16):
        s = _make_qx_rmse1(I(16), I(32), x[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16])
        scales[ib] = s
        if abs(s) > max_abs_scale:
            max_abs_scale = abs(s)
            max_scale = s
    if max_abs_scale < GROUP_MAX_EPS:
        for k in range(210):
            b[k] = 0
        return
    iscale = F(-128.0) / max_scale
    _put16(b, I(208), f32_to_f16(F1 / iscale))
    for ib in range(16):
        b[192 + ib] = np.uint8(min(127, nearest_int(iscale * scales[ib])) & 0xFF)
    dd = _f16(b, I(208), f16)
    for j in range(16):
        d = dd * F(np.int8(b[192 + j]))
        if d == F0:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-32, min(31, nearest_int(x[16 * j + ii] / d))) + 32
    for h in range(2):
        for l in range(32):
            j = 128 * h + l
            q1 = L[j] & 15
            q2 = L[j + 32] & 15
            q3 = L[j + 64] & 15
            q4 = L[j + 96] & 15
            b[64 * h + l] = np.uint8(q1 | (q3 << 4))
            b[64 * h + l + 32] = np.uint8(q2 | (q4 << 4))
            b[128 + 32 * h + l] = np.uint8(
                (L[j] >> 4) | ((L[j + 32] >> 4) << 2) | ((L[j + 64] >> 4) << 4) | ((L[j + 96] >> 4) << 6)
            )


@_jit
def _blk_q8_k(x, b):
    # quantize_row_q8_K_ref. Layout: d:float32 qs:int8[256] bsums:int16[16].
    amax, mx = _signed_absmax(x, 256)
    if amax == F0:
        for k in range(292):
            b[k] = 0
        return
    iscale = F(-127.0) / mx
    for j in range(256):
        b[4 + j] = np.uint8(min(127, nearest_int(iscale * x[j])) & 0xFF)
    for j in range(16):
        s = np.int64(0)
        for ii in range(16):
            s += np.int64(np.int8(b[4 + 16 * j + ii]))
        _put16(b, 260 + 2 * j, s & 0xFFFF)
    v = np.int64(_bits(F1 / iscale))
    for k in range(4):
        b[k] = np.uint8((v >> (8 * k)) & 0xFF)


# -- whole rows, one function per block type (the `quantize_row` of kernels/blocks.py's table) --


@_jit
def row_f32(x, b, f16):
    _row_f32(x, b)


@_jit
def row_f16(x, b, f16):
    _row_f16(x, b)


@_jit
def row_bf16(x, b, f16):
    _row_bf16(x, b)


@_jit
def row_q4_0(x, b, f16):
    for i in range(x.shape[0] // 32):
        _blk_q4_0(x[32 * i:32 * i + 32], b[18 * i:18 * i + 18])


@_jit
def row_q4_1(x, b, f16):
    for i in range(x.shape[0] // 32):
        _blk_q4_1(x[32 * i:32 * i + 32], b[20 * i:20 * i + 20])


@_jit
def row_q5_0(x, b, f16):
    for i in range(x.shape[0] // 32):
        _blk_q5_0(x[32 * i:32 * i + 32], b[22 * i:22 * i + 22])


@_jit
def row_q5_1(x, b, f16):
    for i in range(x.shape[0] // 32):
        _blk_q5_1(x[32 * i:32 * i + 32], b[24 * i:24 * i + 24])


@_jit
def row_q8_0(x, b, f16):
    for i in range(x.shape[0] // 32):
        _blk_q8_0(x[32 * i:32 * i + 32], b[34 * i:34 * i + 34])


@_jit
def row_q8_k(x, b, f16):
    for i in range(x.shape[0] // 256):
        _blk_q8_k(x[256 * i:256 * i + 256], b[292 * i:292 * i + 292])


@_jit
def row_q2_k(x, b, f16):
    L, Laux, w = np.zeros(256, dtype=np.int64), np.zeros(32, dtype=np.int64), np.zeros(32, dtype=np.float32)
    scales, mins = np.zeros(16, dtype=np.float32), np.zeros(16, dtype=np.float32)
    for i in range(x.shape[0] // 256):
        _blk_q2_k(x[256 * i:256 * i + 256], b[84 * i:84 * i + 84], f16, L, Laux, w, scales, mins)


@_jit
def row_q3_k(x, b, f16):
    L, scales = np.zeros(256, dtype=np.int64), np.zeros(16, dtype=np.float32)
    for i in range(x.shape[0] // 256):
        _blk_q3_k(x[256 * i:256 * i + 256], b[110 * i:110 * i + 110], f16, L, scales)


@_jit
def row_q4_k(x, b, f16):
    L, Laux, w = np.zeros(256, dtype=np.int64), np.zeros(32, dtype=np.int64), np.zeros(32, dtype=np.float32)
    scales, mins = np.zeros(16, dtype=np.float32), np.zeros(16, dtype=np.float32)
    for i in range(x.shape[0] // 256):
        _blk_q4_k(x[256 * i:256 * i + 256], b[144 * i:144 * i + 144], f16, L, Laux, w, scales, mins)


@_jit
def row_q5_k(x, b, f16):
    L, Laux, w = np.zeros(256, dtype=np.int64), np.zeros(32, dtype=np.int64), np.zeros(32, dtype=np.float32)
    scales, mins = np.zeros(16, dtype=np.float32), np.zeros(16, dtype=np.float32)
    for i in range(x.shape[0] // 256):
        _blk_q5_k(x[256 * i:256 * i + 256], b[176 * i:176 * i + 176], f16, L, Laux, w, scales, mins)


@_jit
def row_q6_k(x, b, f16):
    L, scales = np.zeros(256, dtype=np.int64), np.zeros(16, dtype=np.float32)
    for i in range(x.shape[0] // 256):
        _blk_q6_k(x[256 * i:256 * i + 256], b[210 * i:210 * i + 210], f16, L, scales)


@functools.cache
def _rows_quantizer(qt: int):
    """The parallel loop over rows for one block type, compiled on first use (only the types
    a model or a quantization run needs)."""

    stamp = SOURCE_STAMP  # a free variable: a changed kernel file is a new cache key

    @njit(cache=True, parallel=True, error_model="numpy")
    def quantize_rows(x, out, f16):
        if stamp < 0:
            return
        for r in prange(x.shape[0]):
            quantize_row(qt, x[r], out[r], f16)

    return quantize_rows


def quantize(x: np.ndarray, qtype) -> np.ndarray:
    """Quantize float32 rows to raw GGML blocks of type qtype.

    x: (rows, cols) (or any shape: the last axis is the row) float values.
    Returns uint8 (rows, row_bytes(qtype, cols)) (the leading shape of x kept).
    Raises ValueError when cols is not a multiple of the block size or qtype has no quantizer.
    """
    from pyllm.kernels.blocks import block_type

    qtype = GGMLType(int(qtype))
    bt = block_type(qtype)
    if bt.quantize_row is None:
        raise ValueError(f"no quantizer for block type {qtype.name}")
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("quantize needs at least a 1-D array")
    cols = x.shape[-1]
    rb = row_bytes(qtype, cols)  # raises ValueError when cols is not a block multiple
    x2 = np.ascontiguousarray(x.reshape(-1, cols), dtype=np.float32)
    if bt.check is not None:
        bt.check(x2, qtype)
    out = np.empty((x2.shape[0], rb), dtype=np.uint8)
    if x2.size:
        _rows_quantizer(int(qtype))(x2, out, F16_TABLE)
    return out.reshape(*x.shape[:-1], rb)


__all__ = ["quantize", "BLOCK_SIZE", "f32_to_f16", "nearest_int"]
