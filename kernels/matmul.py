"""Products with quantized weights: y = x @ W.T, reading W's raw GGML blocks directly.

linear(w, x) is what every layer calls; rows of W are split over the threads (prange).
No float32 copy of W ever exists:

- one token (decode, memory-bound): a fused kernel per block type multiplies the packed
  quants straight into 32 float32 lane accumulators. Sub-block scales multiply in, and
  the constant part of each block (Q4_1's min, Q4_0's -8, the K-quants' mins) is applied
  once per block through precomputed sums of x: sum_j (d*q_j + m)*x_j = d*sum_j q_j*x_j
  + m*sum_j x_j. The lanes are summed once per row, not once per block.
- a batch (prefill): each thread decodes one weight row into a float32 buffer that stays
  in L1 and dots it with every token, so a row is decoded once per batch.

fastmath lets LLVM vectorise and reassociate these float reductions (11x on a matvec);
results differ from a sequential sum by float32 rounding only.
"""

import numpy as np
from numba import njit, prange
from pyllm.base import GGMLType
from pyllm.kernels.quants import DECODABLE, F16_TABLE, QTensor, _f16, _qh32, _scale_min_k4, dequantize_row

BATCH_MIN = 8  # from this many tokens on, decode each row once and reuse it


# -- one token: fused row dots ----------------------------------------------------------
# Each _dot_* returns sum_j w[r, j] * x[j] for one row of raw blocks, given
# xs16[k] = sum of x[16k:16k+16] (for the per-block constant terms).


@njit(inline="always", fastmath=True)
def _dot_q4_0(row, f16, x, xs16):
    acc = np.zeros(32, dtype=np.float32)
    const = np.float32(0.0)
    for b in range(row.shape[0] // 18):
        o = 18 * b
        d = _f16(row, o, f16)
        const -= np.float32(8.0) * d * (xs16[2 * b] + xs16[2 * b + 1])
        for j in range(16):
            v = row[o + 2 + j]
            acc[j] += d * (np.float32(v & 15) * x[32 * b + j])
            acc[j + 16] += d * (np.float32(v >> 4) * x[32 * b + 16 + j])
    return acc.sum() + const


@njit(inline="always", fastmath=True)
def _dot_q4_1(row, f16, x, xs16):
    acc = np.zeros(32, dtype=np.float32)
    const = np.float32(0.0)
    for b in range(row.shape[0] // 20):
        o = 20 * b
        d = _f16(row, o, f16)
        const += _f16(row, o + 2, f16) * (xs16[2 * b] + xs16[2 * b + 1])
        for j in range(16):
            v = row[o + 4 + j]
            acc[j] += d * (np.float32(v & 15) * x[32 * b + j])
            acc[j + 16] += d * (np.float32(v >> 4) * x[32 * b + 16 + j])
    return acc.sum() + const


@njit(inline="always", fastmath=True)
def _dot_q5_0(row, f16, x, xs16):
    acc = np.zeros(32, dtype=np.float32)
    const = np.float32(0.0)
    for b in range(row.shape[0] // 22):
        o = 22 * b
        d = _f16(row, o, f16)
        qh = _qh32(row, o + 2)
        const -= np.float32(16.0) * d * (xs16[2 * b] + xs16[2 * b + 1])
        for j in range(16):
            v = row[o + 6 + j]
            lo = np.uint32(v & 15) | (((qh >> j) & 1) << 4)
            hi = np.uint32(v >> 4) | (((qh >> (j + 16)) & 1) << 4)
            acc[j] += d * (np.float32(lo) * x[32 * b + j])
            acc[j + 16] += d * (np.float32(hi) * x[32 * b + 16 + j])
    return acc.sum() + const


@njit(inline="always", fastmath=True)
def _dot_q5_1(row, f16, x, xs16):
    acc = np.zeros(32, dtype=np.float32)
    const = np.float32(0.0)
    for b in range(row.shape[0] // 24):
        o = 24 * b
        d = _f16(row, o, f16)
        const += _f16(row, o + 2, f16) * (xs16[2 * b] + xs16[2 * b + 1])
        qh = _qh32(row, o + 4)
        for j in range(16):
            v = row[o + 8 + j]
            lo = np.uint32(v & 15) | (((qh >> j) & 1) << 4)
            hi = np.uint32(v >> 4) | (((qh >> (j + 16)) & 1) << 4)
            acc[j] += d * (np.float32(lo) * x[32 * b + j])
            acc[j + 16] += d * (np.float32(hi) * x[32 * b + 16 + j])
    return acc.sum() + const


@njit(inline="always", fastmath=True)
def _dot_q8_0(row, f16, x, xs16):
    acc = np.zeros(32, dtype=np.float32)
    for b in range(row.shape[0] // 34):
        o = 34 * b
        d = _f16(row, o, f16)
        for j in range(32):
            acc[j] += d * (np.float32(np.int8(row[o + 2 + j])) * x[32 * b + j])
    return acc.sum()


@njit(inline="always", fastmath=True)
def _dot_q2_k(row, f16, x, xs16):
    acc = np.zeros(32, dtype=np.float32)
    const = np.float32(0.0)
    for b in range(row.shape[0] // 84):
        o, xo = 84 * b, 256 * b
        d = _f16(row, o + 80, f16)
        dmin = _f16(row, o + 82, f16)
        for h in range(2):
            for s in range(4):
                # elements e = 128h + 32s + l: bits 2s of qs[32h + l]; scale k = e // 16
                k = 8 * h + 2 * s
                sc0, sc1 = row[o + k], row[o + k + 1]
                dl0, dl1 = d * np.float32(sc0 & 15), d * np.float32(sc1 & 15)
                const -= dmin * (np.float32(sc0 >> 4) * xs16[16 * b + k] + np.float32(sc1 >> 4) * xs16[16 * b + k + 1])
                qbase, xb = o + 16 + 32 * h, xo + 128 * h + 32 * s
                for l in range(32):
                    q = (row[qbase + l] >> (2 * s)) & 3
                    dl = dl0 if l < 16 else dl1
                    acc[l] += dl * (np.float32(q) * x[xb + l])
    return acc.sum() + const


@njit(inline="always", fastmath=True)
def _q3_scale(row, o, k):
    lo = (row[o + 96 + k % 8] >> (4 * (k // 8))) & 15
    hi = (row[o + 104 + k % 4] >> (2 * (k // 4))) & 3
    return np.float32(np.int32(lo | (hi << 4)) - 32)


@njit(inline="always", fastmath=True)
def _dot_q3_k(row, f16, x, xs16):
    acc = np.zeros(32, dtype=np.float32)
    for b in range(row.shape[0] // 110):
        o, xo = 110 * b, 256 * b
        d = _f16(row, o + 108, f16)
        for h in range(2):
            for s in range(4):
                # elements e = 128h + 32s + l: bits 2s of qs[32h + l], minus 4 unless bit
                # 4h + s of hmask[l] is set; scale k = e // 16
                k = 8 * h + 2 * s
                dl0, dl1 = d * _q3_scale(row, o, k), d * _q3_scale(row, o, k + 1)
                qbase, xb, hshift = o + 32 + 32 * h, xo + 128 * h + 32 * s, 4 * h + s
                for l in range(32):
                    q = np.int32((row[qbase + l] >> (2 * s)) & 3) - 4 + 4 * np.int32((row[o + l] >> hshift) & 1)
                    dl = dl0 if l < 16 else dl1
                    acc[l] += dl * (np.float32(q) * x[xb + l])
    return acc.sum()


@njit(inline="always", fastmath=True)
def _dot_q4_k(row, f16, x, xs16):
    acc = np.zeros(32, dtype=np.float32)
    const = np.float32(0.0)
    for b in range(row.shape[0] // 144):
        o, xo = 144 * b, 256 * b
        bl = row[o:o + 16]
        d = _f16(row, o, f16)
        dmin = _f16(row, o + 2, f16)
        for j in range(8):
            sc, m = _scale_min_k4(bl, j)
            dl = d * np.float32(sc)
            const -= dmin * np.float32(m) * (xs16[16 * b + 2 * j] + xs16[16 * b + 2 * j + 1])
            shift, base = 4 * (j % 2), o + 16 + 32 * (j // 2)
            for l in range(32):
                q = (row[base + l] >> shift) & 15
                acc[l] += dl * (np.float32(q) * x[xo + 32 * j + l])
    return acc.sum() + const


@njit(inline="always", fastmath=True)
def _dot_q5_k(row, f16, x, xs16):
    acc = np.zeros(32, dtype=np.float32)
    const = np.float32(0.0)
    for b in range(row.shape[0] // 176):
        o, xo = 176 * b, 256 * b
        bl = row[o:o + 16]
        d = _f16(row, o, f16)
        dmin = _f16(row, o + 2, f16)
        for j in range(8):
            sc, m = _scale_min_k4(bl, j)
            dl = d * np.float32(sc)
            const -= dmin * np.float32(m) * (xs16[16 * b + 2 * j] + xs16[16 * b + 2 * j + 1])
            shift, base = 4 * (j % 2), o + 48 + 32 * (j // 2)
            for l in range(32):
                q = ((row[base + l] >> shift) & 15) | (((row[o + 16 + l] >> j) & 1) << 4)
                acc[l] += dl * (np.float32(q) * x[xo + 32 * j + l])
    return acc.sum() + const


@njit(inline="always", fastmath=True)
def _dot_q6_k(row, f16, x, xs16):
    acc = np.zeros(32, dtype=np.float32)
    const = np.float32(0.0)
    for b in range(row.shape[0] // 210):
        o, xo = 210 * b, 256 * b
        d = _f16(row, o + 208, f16)
        for h in range(2):
            for s in range(4):
                # elements e = 128h + 32s + l: low nibble (s // 2) of ql[64h + 32(s % 2) + l],
                # top 2 bits at 2s of qh[32h + l]; scale k = e // 16 switches at l = 16.
                lbase, lshift, hbase = o + 64 * h + 32 * (s % 2), 4 * (s // 2), o + 128 + 32 * h
                k = 8 * h + 2 * s
                dl0 = d * np.float32(np.int8(row[o + 192 + k]))
                dl1 = d * np.float32(np.int8(row[o + 193 + k]))
                const -= np.float32(32.0) * (dl0 * xs16[16 * b + k] + dl1 * xs16[16 * b + k + 1])
                xb = xo + 128 * h + 32 * s
                for l in range(32):
                    q = ((row[lbase + l] >> lshift) & 15) | (((row[hbase + l] >> (2 * s)) & 3) << 4)
                    dl = dl0 if l < 16 else dl1  # a select, so the loop still vectorises
                    acc[l] += dl * (np.float32(q) * x[xb + l])
    return acc.sum() + const


@njit(inline="always", fastmath=True)
def _dot_f(row, x, cols):
    acc = np.float32(0.0)
    for j in range(cols):
        acc += row[j] * x[j]
    return acc


@njit(cache=True, parallel=True, fastmath=True)
def _matvec(data, qtype, cols, f16, x, out):
    """out (rows,) = W x for one token; data (rows, row_bytes) uint8; x (cols,) float32."""
    rows = data.shape[0]
    xs16 = np.zeros(cols // 16, dtype=np.float32)  # (cols/16,) sums for the block constants
    for k in range(cols // 16):
        for j in range(16):
            xs16[k] += x[16 * k + j]
    for r in prange(rows):
        row = data[r]
        if qtype == 2:
            out[r] = _dot_q4_0(row, f16, x, xs16)
        elif qtype == 3:
            out[r] = _dot_q4_1(row, f16, x, xs16)
        elif qtype == 6:
            out[r] = _dot_q5_0(row, f16, x, xs16)
        elif qtype == 7:
            out[r] = _dot_q5_1(row, f16, x, xs16)
        elif qtype == 8:
            out[r] = _dot_q8_0(row, f16, x, xs16)
        elif qtype == 10:
            out[r] = _dot_q2_k(row, f16, x, xs16)
        elif qtype == 11:
            out[r] = _dot_q3_k(row, f16, x, xs16)
        elif qtype == 12:
            out[r] = _dot_q4_k(row, f16, x, xs16)
        elif qtype == 13:
            out[r] = _dot_q5_k(row, f16, x, xs16)
        elif qtype == 14:
            out[r] = _dot_q6_k(row, f16, x, xs16)
        else:  # F16, BF16: decode then dot
            buf = np.empty(cols, dtype=np.float32)
            dequantize_row(row, qtype, cols, f16, buf)
            out[r] = _dot_f(buf, x, cols)


# -- float32 weights and batches ---------------------------------------------------------


@njit(cache=True, parallel=True, fastmath=True)
def _linear_f32(w, x, out):
    # w: (rows, cols) float32, x: (n, cols), out: (n, rows)
    rows, cols = w.shape
    for r in prange(rows):
        for t in range(x.shape[0]):
            out[t, r] = _dot_f(w[r], x[t], cols)


@njit(cache=True, parallel=True, fastmath=True)
def _linear_batch(data, qtype, cols, f16, x, out):
    # data: (rows, row_bytes) uint8, x: (n, cols) float32, out: (n, rows)
    for r in prange(data.shape[0]):
        buf = np.empty(cols, dtype=np.float32)  # (cols,) this row, decoded
        dequantize_row(data[r], qtype, cols, f16, buf)
        for t in range(x.shape[0]):
            out[t, r] = _dot_f(buf, x[t], cols)


def linear_into(w: QTensor, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (n, rows) = x (n, cols) @ w.T, all float32 and C-contiguous."""
    if w.qtype not in DECODABLE:
        raise ValueError(f"no product for block type {GGMLType(w.qtype).name}")
    if x.shape[1] != w.cols:
        raise ValueError(f"x has {x.shape[1]} columns, weight has {w.cols}")
    if w.qtype == GGMLType.F32:
        _linear_f32(w.data.view(np.float32), x, out)
    elif x.shape[0] >= BATCH_MIN:
        _linear_batch(w.data, int(w.qtype), w.cols, F16_TABLE, x, out)
    else:
        for t in range(x.shape[0]):
            _matvec(w.data, int(w.qtype), w.cols, F16_TABLE, x[t], out[t])
    return out


def linear(w: QTensor, x: np.ndarray) -> np.ndarray:
    """x (n, cols) float32 @ w.T -> (n, rows) float32."""
    return linear_into(w, x, np.empty((x.shape[0], w.rows), dtype=np.float32))
