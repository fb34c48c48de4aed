"""Portable products: one row of raw weight blocks against one token of a quantized activation.

Each dot_<type>(row, act, t) returns row . act[t] as float32: per block an exact integer sum
of weight quants times activation quants (int32), then the block's scales in float32, as
llama.cpp's ggml_vec_dot_<type>_<vec_dot_type>_generic (ggml-cpu/quants.c) computes it:

    Q4_0, Q5_0, Q8_0 x Q8_0:  sum_b dw_b * dy_b * isum_b
    Q4_1, Q5_1 x Q8_1:        sum_b dw_b * dy_b * isum_b + mw_b * sy_b   (sy = dy * sum y)
    Q2_K..Q6_K x Q8_K:        dy * (d * sum_k sc_k * isum_k - dmin * sum_k m_k * bsum_k)

These plain Numba loops run on any CPU. They are the reference the SIMD kernels
(kernels/dots_avx2.py) are tested against: the same integer sums bit for bit, the same
floats up to rounding. The float weight types (F32, F16, BF16) meet the float activation.
"""

import numpy as np
from numba import njit
from pyllm.kernels.lowbit import NF4_INT, NF4_SHIFT
from pyllm.kernels.quants import scale_min_k4, u32_at
from pyllm.kernels.simd import f32_from_bits


@njit(inline="always")
def f16_to_f32(b, i):
    """The IEEE half at bytes b[i], b[i+1] as float32, by bit arithmetic (exact; no table, no F16C)."""
    h = np.uint32(b[i]) | (np.uint32(b[i + 1]) << 8)
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:  # zero or subnormal: m * 2^-24, exact in float32
        v = np.float32(m) * np.float32(5.9604644775390625e-08)
        return -v if sign else v
    if e == 31:  # inf or nan
        return f32_from_bits(sign | 0x7F800000 | (m << 13))
    return f32_from_bits(sign | ((e + 112) << 23) | (m << 13))


# -- 32-element blocks against Q8_0 / Q8_1 ------------------------------------------------


@njit(inline="always", fastmath=True)
def dot_q4_0(row, act, t):  # d:f16 qs[16]; element j < 16: low nibble of qs[j], else high of qs[j-16]
    y, dy = act.q8[t], act.d8[t]
    total = np.float32(0.0)
    for b in range(row.shape[0] // 18):
        o, yo = 18 * b, 32 * b
        isum = np.int32(0)
        for j in range(16):
            v = np.int32(row[o + 2 + j])
            isum += ((v & 15) - 8) * np.int32(y[yo + j]) + ((v >> 4) - 8) * np.int32(y[yo + 16 + j])
        total += f16_to_f32(row, o) * dy[b] * np.float32(isum)
    return total


@njit(inline="always", fastmath=True)
def dot_nf4(row, act, t):  # d:f16 qs[32]; element j < 32: low nibble of qs[j], else high of qs[j-32]
    """NF4 against Q8_0 in fixed point (lowbit.NF4_INT, the levels x 2^12): per 32-value half,
    d * 2^-12 * dy * sum(NF4_INT[code] * y)."""
    y, dy = act.q8[t], act.d8[t]
    total = np.float32(0.0)
    for b in range(row.shape[0] // 34):
        o, yo = 34 * b, 64 * b
        lo = np.int32(0)
        hi = np.int32(0)
        for j in range(32):
            v = np.int32(row[o + 2 + j])
            lo += NF4_INT[v & 15] * np.int32(y[yo + j])
            hi += NF4_INT[v >> 4] * np.int32(y[yo + 32 + j])
        d = f16_to_f32(row, o) * np.float32(2.0 ** -NF4_SHIFT)
        total += d * dy[2 * b] * np.float32(lo) + d * dy[2 * b + 1] * np.float32(hi)
    return total


@njit(inline="always", fastmath=True)
def dot_q4_1(row, act, t):  # d:f16 m:f16 qs[16]
    y, dy, sy = act.q8[t], act.d8[t], act.s8[t]
    total = np.float32(0.0)
    for b in range(row.shape[0] // 20):
        o, yo = 20 * b, 32 * b
        isum = np.int32(0)
        for j in range(16):
            v = np.int32(row[o + 4 + j])
            isum += (v & 15) * np.int32(y[yo + j]) + (v >> 4) * np.int32(y[yo + 16 + j])
        total += f16_to_f32(row, o) * dy[b] * np.float32(isum) + f16_to_f32(row, o + 2) * sy[b]
    return total


@njit(inline="always", fastmath=True)
def dot_q5_0(row, act, t):  # d:f16 qh:u32 qs[16]; bit j of qh is bit 4 of element j
    y, dy = act.q8[t], act.d8[t]
    total = np.float32(0.0)
    for b in range(row.shape[0] // 22):
        o, yo = 22 * b, 32 * b
        qh = u32_at(row, o + 2)
        isum = np.int32(0)
        for j in range(16):
            v = np.int32(row[o + 6 + j])
            lo = ((v & 15) | np.int32(((qh >> j) & 1) << 4)) - 16
            hi = ((v >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)) - 16
            isum += lo * np.int32(y[yo + j]) + hi * np.int32(y[yo + 16 + j])
        total += f16_to_f32(row, o) * dy[b] * np.float32(isum)
    return total


@njit(inline="always", fastmath=True)
def dot_q5_1(row, act, t):  # d:f16 m:f16 qh:u32 qs[16]
    y, dy, sy = act.q8[t], act.d8[t], act.s8[t]
    total = np.float32(0.0)
    for b in range(row.shape[0] // 24):
        o, yo = 24 * b, 32 * b
        qh = u32_at(row, o + 4)
        isum = np.int32(0)
        for j in range(16):
            v = np.int32(row[o + 8 + j])
            lo = (v & 15) | np.int32(((qh >> j) & 1) << 4)
            hi = (v >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
            isum += lo * np.int32(y[yo + j]) + hi * np.int32(y[yo + 16 + j])
        total += f16_to_f32(row, o) * dy[b] * np.float32(isum) + f16_to_f32(row, o + 2) * sy[b]
    return total


@njit(inline="always", fastmath=True)
def dot_q8_0(row, act, t):  # d:f16 qs:int8[32]
    y, dy = act.q8[t], act.d8[t]
    total = np.float32(0.0)
    for b in range(row.shape[0] // 34):
        o, yo = 34 * b, 32 * b
        isum = np.int32(0)
        for j in range(32):
            isum += np.int32(np.int8(row[o + 2 + j])) * np.int32(y[yo + j])
        total += f16_to_f32(row, o) * dy[b] * np.float32(isum)
    return total


# -- 256-element super-blocks against Q8_K --------------------------------------------------


@njit(inline="always", fastmath=True)
def dot_q2_k(row, act, t):
    # scales[16] (low nibble: scale, high: min) qs[64] d:f16 dmin:f16. Element e = 128h + 32s + i
    # is bits 2s..2s+1 of qs[32h + i]; its scale/min is byte e // 16.
    y, dy, bs = act.qk[t], act.dk[t], act.bk[t]
    total = np.float32(0.0)
    for b in range(row.shape[0] // 84):
        o, yo = 84 * b, 256 * b
        isum = np.int32(0)
        msum = np.int32(0)
        for k in range(16):
            sc = np.int32(row[o + k])
            h, s, half = k // 8, (k % 8) // 2, k % 2
            part = np.int32(0)
            for i in range(16 * half, 16 * half + 16):
                q = (np.int32(row[o + 16 + 32 * h + i]) >> (2 * s)) & 3
                part += q * np.int32(y[yo + 128 * h + 32 * s + i])
            isum += (sc & 15) * part
            msum += (sc >> 4) * bs[16 * b + k]
        total += dy[b] * (f16_to_f32(row, o + 80) * np.float32(isum) - f16_to_f32(row, o + 82) * np.float32(msum))
    return total


@njit(inline="always")
def q3_scale(row, o, k):
    """Six-bit scale k (0..15) of the Q3_K block at row[o], minus 32."""
    lo = (np.int32(row[o + 96 + k % 8]) >> (4 * (k // 8))) & 15
    hi = (np.int32(row[o + 104 + k % 4]) >> (2 * (k // 4))) & 3
    return (lo | (hi << 4)) - 32


@njit(inline="always", fastmath=True)
def dot_q3_k(row, act, t):
    # hmask[32] qs[64] scales[12] d:f16. Element e = 128h + 32s + i: bits 2s of qs[32h + i],
    # minus 4 unless bit 4h + s of hmask[i] is set; scale e // 16.
    y, dy = act.qk[t], act.dk[t]
    total = np.float32(0.0)
    for b in range(row.shape[0] // 110):
        o, yo = 110 * b, 256 * b
        isum = np.int32(0)
        for k in range(16):
            h, s, half = k // 8, (k % 8) // 2, k % 2
            part = np.int32(0)
            for i in range(16 * half, 16 * half + 16):
                q = (np.int32(row[o + 32 + 32 * h + i]) >> (2 * s)) & 3
                q -= 4 - 4 * ((np.int32(row[o + i]) >> (4 * h + s)) & 1)
                part += q * np.int32(y[yo + 128 * h + 32 * s + i])
            isum += q3_scale(row, o, k) * part
        total += dy[b] * f16_to_f32(row, o + 108) * np.float32(isum)
    return total


@njit(inline="always", fastmath=True)
def dot_q4_k(row, act, t):
    # d:f16 dmin:f16 scales[12] qs[128]; sub-block j (32 elements) is nibble j % 2 of qs[32(j // 2) + i].
    y, dy, bs = act.qk[t], act.dk[t], act.bk[t]
    total = np.float32(0.0)
    for b in range(row.shape[0] // 144):
        o, yo = 144 * b, 256 * b
        blk = row[o:o + 16]
        isum = np.int32(0)
        msum = np.int32(0)
        for j in range(8):
            sc, m = scale_min_k4(blk, j)
            shift, base = 4 * (j % 2), o + 16 + 32 * (j // 2)
            part = np.int32(0)
            for i in range(32):
                part += ((np.int32(row[base + i]) >> shift) & 15) * np.int32(y[yo + 32 * j + i])
            isum += np.int32(sc) * part
            msum += np.int32(m) * (bs[16 * b + 2 * j] + bs[16 * b + 2 * j + 1])
        total += dy[b] * (f16_to_f32(row, o) * np.float32(isum) - f16_to_f32(row, o + 2) * np.float32(msum))
    return total


@njit(inline="always", fastmath=True)
def dot_q5_k(row, act, t):
    # d dmin scales[12] qh[32] qs[128]; bit 4 of sub-block j's quants is bit j of qh[i].
    y, dy, bs = act.qk[t], act.dk[t], act.bk[t]
    total = np.float32(0.0)
    for b in range(row.shape[0] // 176):
        o, yo = 176 * b, 256 * b
        blk = row[o:o + 16]
        isum = np.int32(0)
        msum = np.int32(0)
        for j in range(8):
            sc, m = scale_min_k4(blk, j)
            shift, base = 4 * (j % 2), o + 48 + 32 * (j // 2)
            part = np.int32(0)
            for i in range(32):
                q = ((np.int32(row[base + i]) >> shift) & 15) | (((np.int32(row[o + 16 + i]) >> j) & 1) << 4)
                part += q * np.int32(y[yo + 32 * j + i])
            isum += np.int32(sc) * part
            msum += np.int32(m) * (bs[16 * b + 2 * j] + bs[16 * b + 2 * j + 1])
        total += dy[b] * (f16_to_f32(row, o) * np.float32(isum) - f16_to_f32(row, o + 2) * np.float32(msum))
    return total


@njit(inline="always", fastmath=True)
def dot_q6_k(row, act, t):
    # ql[128] qh[64] scales:int8[16] d:f16. Element e = 128h + 32s + i: low nibble s // 2 of
    # ql[64h + 32(s % 2) + i], top 2 bits at 2s of qh[32h + i], minus 32; scale e // 16.
    y, dy = act.qk[t], act.dk[t]
    total = np.float32(0.0)
    for b in range(row.shape[0] // 210):
        o, yo = 210 * b, 256 * b
        isum = np.int32(0)
        for k in range(16):
            h, s, half = k // 8, (k % 8) // 2, k % 2
            lbase, lshift, hbase = o + 64 * h + 32 * (s % 2), 4 * (s // 2), o + 128 + 32 * h
            part = np.int32(0)
            for i in range(16 * half, 16 * half + 16):
                lo = (np.int32(row[lbase + i]) >> lshift) & 15
                hi = (np.int32(row[hbase + i]) >> (2 * s)) & 3
                part += ((lo | (hi << 4)) - 32) * np.int32(y[yo + 128 * h + 32 * s + i])
            isum += np.int32(np.int8(row[o + 192 + k])) * part
        total += dy[b] * f16_to_f32(row, o + 208) * np.float32(isum)
    return total


# -- float weights against the float activation ------------------------------------------------


@njit(inline="always", fastmath=True)
def dot_f32(row, act, t):
    w, x = row.view(np.float32), act.xf[t]
    total = np.float32(0.0)
    for j in range(w.shape[0]):
        total += w[j] * x[j]
    return total


@njit(inline="always", fastmath=True)
def dot_f16(row, act, t):
    x = act.xf[t]
    total = np.float32(0.0)
    for j in range(row.shape[0] // 2):
        total += f16_to_f32(row, 2 * j) * x[j]
    return total


@njit(inline="always", fastmath=True)
def dot_bf16(row, act, t):
    x = act.xf[t]
    total = np.float32(0.0)
    for j in range(row.shape[0] // 2):
        total += f32_from_bits((np.uint32(row[2 * j]) | (np.uint32(row[2 * j + 1]) << 8)) << 16) * x[j]
    return total
