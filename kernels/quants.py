"""Block decoders for every GGML type, and the QTensor that carries raw blocks to the kernels.

A GGUF weight of shape (rows, cols) is stored row after row; each row is cols/block_size
blocks of type_size bytes (pyllm.base.BLOCK_SIZE). We keep it as a 2-D uint8 view (rows, row_bytes) straight into
the memory map, so nothing is dequantized at load time.
"""

from dataclasses import dataclass

import numpy as np
from numba import njit, prange
from pyllm.base import GGMLType


@dataclass
class QTensor:
    """A 2-D weight as raw GGML blocks: data is uint8 (rows, row_bytes)."""

    data: np.ndarray  # (rows, row_bytes) uint8
    qtype: GGMLType
    rows: int
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


# -- decoding ---------------------------------------------------------------------------
# Each _dq_* decodes one block (uint8 bytes) into out (float32), with the operations in
# the same order and precision as gguf-py's quants.py (the reference we test against), so
# results are bit-identical. No fastmath here: a fused multiply-add would change the bits.
# f16 is a 65536-entry table of every half value as float32 (exact, and a plain load).

F16_TABLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)  # (65536,)


@njit(inline="always")
def _f16(b, i, f16):
    return f16[np.int64(b[i]) | (np.int64(b[i + 1]) << 8)]


@njit(inline="always")
def _dq_q4_0(b, out, f16):  # d:f16 qs[16]; element j<16 is the low nibble of qs[j]
    d = _f16(b, 0, f16)
    for j in range(16):
        out[j] = d * np.float32(np.int32(b[2 + j] & 15) - 8)
        out[j + 16] = d * np.float32(np.int32(b[2 + j] >> 4) - 8)


@njit(inline="always")
def _dq_q4_1(b, out, f16):  # d:f16 m:f16 qs[16]
    d = _f16(b, 0, f16)
    m = _f16(b, 2, f16)
    for j in range(16):
        out[j] = d * np.float32(b[4 + j] & 15) + m
        out[j + 16] = d * np.float32(b[4 + j] >> 4) + m


@njit(inline="always")
def _qh32(b, i):
    return np.uint32(b[i]) | (np.uint32(b[i + 1]) << 8) | (np.uint32(b[i + 2]) << 16) | (np.uint32(b[i + 3]) << 24)


@njit(inline="always")
def _dq_q5_0(b, out, f16):  # d:f16 qh:u32 qs[16]; bit j of qh is bit 4 of element j
    d = _f16(b, 0, f16)
    qh = _qh32(b, 2)
    for j in range(16):
        lo = np.int32(b[6 + j] & 15) | np.int32(((qh >> j) & 1) << 4)
        hi = np.int32(b[6 + j] >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
        out[j] = d * np.float32(lo - 16)
        out[j + 16] = d * np.float32(hi - 16)


@njit(inline="always")
def _dq_q5_1(b, out, f16):  # d:f16 m:f16 qh:u32 qs[16]
    d = _f16(b, 0, f16)
    m = _f16(b, 2, f16)
    qh = _qh32(b, 4)
    for j in range(16):
        lo = np.int32(b[8 + j] & 15) | np.int32(((qh >> j) & 1) << 4)
        hi = np.int32(b[8 + j] >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
        out[j] = d * np.float32(lo) + m
        out[j + 16] = d * np.float32(hi) + m


@njit(inline="always")
def _dq_q8_0(b, out, f16):  # d:f16 qs:int8[32]
    d = _f16(b, 0, f16)
    for j in range(32):
        out[j] = np.float32(np.int8(b[2 + j])) * d


@njit(inline="always")
def _dq_q2_k(b, out, f16):
    # scales[16] (low nibble: scale, high: min) qs[64] d:f16 dmin:f16.
    # Element e = 128h + 32s + l holds bits 2s..2s+1 of qs[32h + l]; e // 16 picks the scale.
    d = _f16(b, 80, f16)
    dmin = _f16(b, 82, f16)
    for h in range(2):
        for s in range(4):
            for l in range(32):
                e = 128 * h + 32 * s + l
                sc = b[e // 16]
                dl = d * np.float32(sc & 15)
                ml = dmin * np.float32(sc >> 4)
                out[e] = dl * np.float32((b[16 + 32 * h + l] >> (2 * s)) & 3) - ml


@njit(inline="always")
def _dq_q3_k(b, out, f16):
    # hmask[32] qs[64] scales[12] d:f16. 16 six-bit scales: low 4 bits from bytes 0..7
    # (nibble i // 8), high 2 bits from bytes 8..11 (pair i // 4). The high bit of the 3-bit
    # quant is bit (e // 32) of hmask[e % 32]; when it is clear, 4 is subtracted.
    d = _f16(b, 108, f16)
    for h in range(2):
        for s in range(4):
            for l in range(32):
                e = 128 * h + 32 * s + l
                i = e // 16
                lo = (b[96 + i % 8] >> (4 * (i // 8))) & 15
                hi = (b[104 + i % 4] >> (2 * (i // 4))) & 3
                scale = np.int32(lo | (hi << 4)) - 32
                dl = d * np.float32(scale)
                q = np.int32((b[32 + 32 * h + l] >> (2 * s)) & 3)
                if not (b[l] >> (4 * h + s)) & 1:
                    q -= 4
                out[e] = dl * np.float32(q)


@njit(inline="always")
def _scale_min_k4(b, j):
    """Six-bit scale and min of sub-block j (0..7) from the 12 packed bytes at b[4:16]."""
    if j < 4:
        sc = b[4 + j] & 63
        m = b[8 + j] & 63
    else:
        sc = (b[12 + j - 4] & 15) | ((b[4 + j - 4] >> 2) & 48)
        m = (b[12 + j - 4] >> 4) | ((b[8 + j - 4] >> 2) & 48)
    return sc, m


@njit(inline="always")
def _dq_q4_k(b, out, f16):
    # d:f16 dmin:f16 scales[12] qs[128]; sub-block j = 2c + k takes nibble k of qs[32c + l].
    d = _f16(b, 0, f16)
    dmin = _f16(b, 2, f16)
    for j in range(8):
        sc, m = _scale_min_k4(b, j)
        dl = d * np.float32(sc)
        ml = dmin * np.float32(m)
        c, k = j // 2, j % 2
        for l in range(32):
            out[32 * j + l] = dl * np.float32((b[16 + 32 * c + l] >> (4 * k)) & 15) - ml


@njit(inline="always")
def _dq_q5_k(b, out, f16):
    # d dmin scales[12] qh[32] qs[128]; bit 4 of sub-block j's quants is bit j of qh[l].
    d = _f16(b, 0, f16)
    dmin = _f16(b, 2, f16)
    for j in range(8):
        sc, m = _scale_min_k4(b, j)
        dl = d * np.float32(sc)
        ml = dmin * np.float32(m)
        c, k = j // 2, j % 2
        for l in range(32):
            q = ((b[48 + 32 * c + l] >> (4 * k)) & 15) | (((b[16 + l] >> j) & 1) << 4)
            out[32 * j + l] = dl * np.float32(q) - ml


@njit(inline="always")
def _dq_q6_k(b, out, f16):
    # ql[128] qh[64] scales:int8[16] d:f16. Element e = 128h + 64k + m (m < 64) has its low
    # nibble k of ql[64h + m]; e = 128h + 32s + l has its top 2 bits at 2s of qh[32h + l].
    d = _f16(b, 208, f16)
    for h in range(2):
        for s in range(4):
            for l in range(32):
                e = 128 * h + 32 * s + l
                m = e - 128 * h
                lo = (b[64 * h + m % 64] >> (4 * (m // 64))) & 15
                hi = (b[128 + 32 * h + l] >> (2 * s)) & 3
                q = np.int32(lo | (hi << 4)) - 32
                dl = d * np.float32(np.int8(b[192 + e // 16]))
                out[e] = dl * np.float32(q)


@njit(inline="always")
def dequantize_row(row, qtype, cols, f16, out):
    """Decode one row of raw blocks (uint8) into out[:cols] (float32)."""
    if qtype == 0:  # F32
        for j in range(cols):
            out[j] = row[4 * j:4 * j + 4].view(np.float32)[0]
    elif qtype == 1:  # F16
        for j in range(cols):
            out[j] = _f16(row, 2 * j, f16)
    elif qtype == 30:  # BF16: the top half of a float32
        for j in range(cols):
            bits = (np.uint32(row[2 * j]) | (np.uint32(row[2 * j + 1]) << 8)) << 16
            out[j] = np.array([bits], dtype=np.uint32).view(np.float32)[0]
    elif qtype == 2:
        for i in range(cols // 32):
            _dq_q4_0(row[18 * i:18 * i + 18], out[32 * i:32 * i + 32], f16)
    elif qtype == 3:
        for i in range(cols // 32):
            _dq_q4_1(row[20 * i:20 * i + 20], out[32 * i:32 * i + 32], f16)
    elif qtype == 6:
        for i in range(cols // 32):
            _dq_q5_0(row[22 * i:22 * i + 22], out[32 * i:32 * i + 32], f16)
    elif qtype == 7:
        for i in range(cols // 32):
            _dq_q5_1(row[24 * i:24 * i + 24], out[32 * i:32 * i + 32], f16)
    elif qtype == 8:
        for i in range(cols // 32):
            _dq_q8_0(row[34 * i:34 * i + 34], out[32 * i:32 * i + 32], f16)
    elif qtype == 10:
        for i in range(cols // 256):
            _dq_q2_k(row[84 * i:84 * i + 84], out[256 * i:256 * i + 256], f16)
    elif qtype == 11:
        for i in range(cols // 256):
            _dq_q3_k(row[110 * i:110 * i + 110], out[256 * i:256 * i + 256], f16)
    elif qtype == 12:
        for i in range(cols // 256):
            _dq_q4_k(row[144 * i:144 * i + 144], out[256 * i:256 * i + 256], f16)
    elif qtype == 13:
        for i in range(cols // 256):
            _dq_q5_k(row[176 * i:176 * i + 176], out[256 * i:256 * i + 256], f16)
    elif qtype == 14:
        for i in range(cols // 256):
            _dq_q6_k(row[210 * i:210 * i + 210], out[256 * i:256 * i + 256], f16)


DECODABLE = frozenset(
    GGMLType[n] for n in "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K".split()
)


@njit(cache=True, parallel=True)
def _dequantize_rows(data, ids, qtype, cols, f16, out):
    for i in prange(ids.shape[0]):
        dequantize_row(data[ids[i]], qtype, cols, f16, out[i])


def _check(t: QTensor):
    if t.qtype not in DECODABLE:
        raise ValueError(f"no decoder for block type {GGMLType(t.qtype).name}")


def dequantize(t: QTensor) -> np.ndarray:
    """All rows of t as float32: (rows, cols)."""
    _check(t)
    return get_rows(t, np.arange(t.rows))


def get_rows(t: QTensor, ids) -> np.ndarray:
    """Rows ids of t as float32 (len(ids), cols): the embedding lookup."""
    _check(t)
    ids = np.asarray(ids, dtype=np.int64)
    out = np.empty((ids.shape[0], t.cols), dtype=np.float32)
    _dequantize_rows(t.data, ids, int(t.qtype), t.cols, F16_TABLE, out)
    return out
