"""Block decoders for every GGML type, and the QTensor that carries raw blocks to the kernels.

A GGUF weight of shape (rows, cols) is stored row after row; each row is cols/block_size
blocks of type_size bytes (pyllm.base.BLOCK_SIZE). We keep it as a 2-D uint8 view (rows, row_bytes) straight into
the memory map, so nothing is dequantized at load time.
"""

import functools
from dataclasses import dataclass

import numpy as np
from numba import njit, prange
from pyllm.base import GGMLType
from pyllm.kernels.dispatch import SOURCE_STAMP, decode_row
from pyllm.kernels.simd import f32_from_bits


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
def half(b, i, f16):
    """The IEEE half at bytes b[i], b[i+1] as float32 (f16: F16_TABLE)."""
    return f16[np.int64(b[i]) | (np.int64(b[i + 1]) << 8)]


@njit(inline="always")
def decode_q4_0(b, out, f16):  # d:f16 qs[16]; element j<16 is the low nibble of qs[j]
    d = half(b, 0, f16)
    for j in range(16):
        out[j] = d * np.float32(np.int32(b[2 + j] & 15) - 8)
        out[j + 16] = d * np.float32(np.int32(b[2 + j] >> 4) - 8)


@njit(inline="always")
def decode_q4_1(b, out, f16):  # d:f16 m:f16 qs[16]
    d = half(b, 0, f16)
    m = half(b, 2, f16)
    for j in range(16):
        out[j] = d * np.float32(b[4 + j] & 15) + m
        out[j + 16] = d * np.float32(b[4 + j] >> 4) + m


@njit(inline="always")
def u32_at(b, i):
    """The little-endian uint32 at bytes b[i:i+4]."""
    return np.uint32(b[i]) | (np.uint32(b[i + 1]) << 8) | (np.uint32(b[i + 2]) << 16) | (np.uint32(b[i + 3]) << 24)


@njit(inline="always")
def decode_q5_0(b, out, f16):  # d:f16 qh:u32 qs[16]; bit j of qh is bit 4 of element j
    d = half(b, 0, f16)
    qh = u32_at(b, 2)
    for j in range(16):
        lo = np.int32(b[6 + j] & 15) | np.int32(((qh >> j) & 1) << 4)
        hi = np.int32(b[6 + j] >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
        out[j] = d * np.float32(lo - 16)
        out[j + 16] = d * np.float32(hi - 16)


@njit(inline="always")
def decode_q5_1(b, out, f16):  # d:f16 m:f16 qh:u32 qs[16]
    d = half(b, 0, f16)
    m = half(b, 2, f16)
    qh = u32_at(b, 4)
    for j in range(16):
        lo = np.int32(b[8 + j] & 15) | np.int32(((qh >> j) & 1) << 4)
        hi = np.int32(b[8 + j] >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
        out[j] = d * np.float32(lo) + m
        out[j + 16] = d * np.float32(hi) + m


@njit(inline="always")
def decode_q8_0(b, out, f16):  # d:f16 qs:int8[32]
    d = half(b, 0, f16)
    for j in range(32):
        out[j] = np.float32(np.int8(b[2 + j])) * d


@njit(inline="always")
def decode_q2_k(b, out, f16):
    # scales[16] (low nibble: scale, high: min) qs[64] d:f16 dmin:f16.
    # Element e = 128h + 32s + l holds bits 2s..2s+1 of qs[32h + l]; e // 16 picks the scale.
    d = half(b, 80, f16)
    dmin = half(b, 82, f16)
    for h in range(2):
        for s in range(4):
            for l in range(32):
                e = 128 * h + 32 * s + l
                sc = b[e // 16]
                dl = d * np.float32(sc & 15)
                ml = dmin * np.float32(sc >> 4)
                out[e] = dl * np.float32((b[16 + 32 * h + l] >> (2 * s)) & 3) - ml


@njit(inline="always")
def decode_q3_k(b, out, f16):
    # hmask[32] qs[64] scales[12] d:f16. 16 six-bit scales: low 4 bits from bytes 0..7
    # (nibble i // 8), high 2 bits from bytes 8..11 (pair i // 4). The high bit of the 3-bit
    # quant is bit (e // 32) of hmask[e % 32]; when it is clear, 4 is subtracted.
    d = half(b, 108, f16)
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
def scale_min_k4(b, j):
    """Six-bit scale and min of sub-block j (0..7) from the 12 packed bytes at b[4:16]."""
    if j < 4:
        sc = b[4 + j] & 63
        m = b[8 + j] & 63
    else:
        sc = (b[12 + j - 4] & 15) | ((b[4 + j - 4] >> 2) & 48)
        m = (b[12 + j - 4] >> 4) | ((b[8 + j - 4] >> 2) & 48)
    return sc, m


@njit(inline="always")
def decode_q4_k(b, out, f16):
    # d:f16 dmin:f16 scales[12] qs[128]; sub-block j = 2c + k takes nibble k of qs[32c + l].
    d = half(b, 0, f16)
    dmin = half(b, 2, f16)
    for j in range(8):
        sc, m = scale_min_k4(b, j)
        dl = d * np.float32(sc)
        ml = dmin * np.float32(m)
        c, k = j // 2, j % 2
        for l in range(32):
            out[32 * j + l] = dl * np.float32((b[16 + 32 * c + l] >> (4 * k)) & 15) - ml


@njit(inline="always")
def decode_q5_k(b, out, f16):
    # d dmin scales[12] qh[32] qs[128]; bit 4 of sub-block j's quants is bit j of qh[l].
    d = half(b, 0, f16)
    dmin = half(b, 2, f16)
    for j in range(8):
        sc, m = scale_min_k4(b, j)
        dl = d * np.float32(sc)
        ml = dmin * np.float32(m)
        c, k = j // 2, j % 2
        for l in range(32):
            q = ((b[48 + 32 * c + l] >> (4 * k)) & 15) | (((b[16 + l] >> j) & 1) << 4)
            out[32 * j + l] = dl * np.float32(q) - ml


@njit(inline="always")
def decode_q6_k(b, out, f16):
    # ql[128] qh[64] scales:int8[16] d:f16. Element e = 128h + 64k + m (m < 64) has its low
    # nibble k of ql[64h + m]; e = 128h + 32s + l has its top 2 bits at 2s of qh[32h + l].
    d = half(b, 208, f16)
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
def decode_f32(b, out, f16):  # one float32 element
    out[0] = b.view(np.float32)[0]


@njit(inline="always")
def decode_f16(b, out, f16):  # one IEEE half element
    out[0] = half(b, 0, f16)


@njit(inline="always")
def decode_bf16(b, out, f16):  # one bfloat16 element: the top half of a float32
    out[0] = f32_from_bits((np.uint32(b[0]) | (np.uint32(b[1]) << 8)) << 16)


# -- whole rows: dispatch through the block-type table (kernels/blocks.py) ----------------


@functools.cache
def _rows_decoder(qt: int):
    """get_rows for one block type: compiled (or loaded from the cache) on first use, so a
    model compiles only the decoders of the types it has."""

    stamp = SOURCE_STAMP  # a free variable: a changed kernel file is a new cache key

    @njit(cache=True, parallel=True)
    def decode_rows(data, ids, cols, f16, out):
        if stamp < 0:
            return
        for i in prange(ids.shape[0]):
            decode_row(qt, data[ids[i]], cols, f16, out[i])

    return decode_rows


def _check(t: QTensor):
    from pyllm.kernels.blocks import BLOCKS

    bt = BLOCKS.get(int(t.qtype))
    if bt is None or bt.decode is None:
        raise ValueError(f"no decoder for block type {GGMLType(t.qtype).name}")


def dequantize(t: QTensor) -> np.ndarray:
    """All rows of t as float32: (rows, cols)."""
    return get_rows(t, np.arange(t.rows))


def get_rows(t: QTensor, ids) -> np.ndarray:
    """Rows ids of t as float32 (len(ids), cols): the embedding lookup."""
    _check(t)
    ids = np.asarray(ids, dtype=np.int64)
    out = np.empty((ids.shape[0], t.cols), dtype=np.float32)
    _rows_decoder(int(t.qtype))(t.data, ids, t.cols, F16_TABLE, out)
    return out
