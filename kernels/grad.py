"""The trainer's own kernels: products with a frozen quantized weight in both directions,
and bfloat16 rounding.

Training multiplies every frozen weight W (rows, cols) twice per step: forward
y = x @ W.T and, for the input gradient, dx = dy @ W (through the transposed matrix).
Both stream W's GGUF blocks a tile of rows at a time: a parallel Numba kernel decodes
TILE_ELEMENTS worth of rows into a scratch buffer that stays in cache, and a BLAS product
(numpy's matmul, multi-threaded) consumes it. W is never held in float32 as a whole — peak extra memory
is one tile, whatever the model — and the decode cost is shared by every token of the
batch, which is what makes a batch of a few hundred tokens compute-bound.

Threads come from BLAS or from the caller, never from Numba: these kernels are serial
and release the GIL, so a trainer can run one batch shard per thread. Numba's OpenMP
workers spin for a while after each parallel region, and so do OpenBLAS's after each
product; alternating the two on the same cores made a tiled product 10x slower (5.6
against 55 GFLOP/s on a 576x1536 Q4_1 weight and 512 tokens, 2 cores). A serial decode
of one tile costs about 5% of the tile's product.

Everything here is dtype-generic: float32 for training, float64 for the finite-difference
gradient checks (the decoded values are the same numbers in both; the check is about the
math, not the rounding).

bfloat16 (--dtype bf16): Numba has no bf16 type, so operands are rounded to the nearest
bf16 value (round to nearest, ties to even) through uint32 bit operations and kept in
float32; the products then accumulate in float32. A CPU with AMX-BF16 would take the
rounded tiles straight into `tdpbf16ps`: qmatmul/qmatmul_t are the call sites where such a
kernel belongs (the kernels' job), the rounding semantics here are what it must match.
"""

import functools

import numpy as np
from numba import njit
from pyllm.base import GGMLType
from pyllm.kernels.blocks import decodable
from pyllm.kernels.dispatch import SOURCE_STAMP, decode_row
from pyllm.kernels.quants import F16_TABLE, QTensor

TILE_ELEMENTS = 1 << 17  # 128K elements per decoded tile (512 KB of float32: about one L2)


# -- bfloat16 rounding -------------------------------------------------------------------


@njit(inline="always")
def _bf16_bits(b):
    # b: the uint32 bits of a float32. NaN stays a (quiet) NaN; everything else rounds to
    # nearest even on the 16 bits dropped (overflow correctly becomes infinity).
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return (b | np.uint32(0x00400000)) & np.uint32(0xFFFF0000)
    return (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)


@njit(cache=True, nogil=True)
def _round_bf16_inplace(bits):
    # bits: (n,) uint32 view of a float32 array
    for i in range(bits.shape[0]):
        bits[i] = _bf16_bits(bits[i])


def round_bf16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 x rounded to the nearest bfloat16 value (ties to even), still as float32.

    out=None returns a new array; out=x rounds in place."""
    if x.dtype != np.float32:
        raise TypeError(f"bf16 rounding takes float32, got {x.dtype}")
    if out is None:
        out = np.array(x, order="C")
    elif out is not x:
        np.copyto(out, x)
    _round_bf16_inplace(out.reshape(-1).view(np.uint32))
    return out


# -- decoding a tile of rows ------------------------------------------------------------


@functools.cache
def _decoders(qt: int):
    """The serial row decoders of one block type (compiled on first use, through the
    block-type table): (rows into float32 (+ bf16 rounding), rows into float64, gather)."""
    stamp = SOURCE_STAMP  # a free variable: a changed kernel file is a new cache key

    @njit(cache=True, nogil=True)
    def rows_f32(data, cols, f16, r0, out, bf16):
        # data: (rows, row_bytes) uint8; out: (n, cols) float32 gets rows r0..r0+n
        if stamp < 0:
            return
        for i in range(out.shape[0]):
            decode_row(qt, data[r0 + i], cols, f16, out[i])
            if bf16:
                bits = out[i].view(np.uint32)
                for j in range(cols):
                    bits[j] = _bf16_bits(bits[j])

    @njit(cache=True, nogil=True)
    def rows_f64(data, cols, f16, r0, out):
        # the same into float64 (the gradient checks): decoded as float32, then widened
        buf = np.empty(cols, dtype=np.float32)
        for i in range(out.shape[0]):
            decode_row(qt, data[r0 + i], cols, f16, buf)
            for j in range(cols):
                out[i, j] = buf[j]

    @njit(cache=True, nogil=True)
    def gather(data, cols, f16, ids, out):
        buf = np.empty(cols, dtype=np.float32)
        for i in range(ids.shape[0]):
            decode_row(qt, data[ids[i]], cols, f16, buf)
            for j in range(cols):
                out[i, j] = buf[j]

    return rows_f32, rows_f64, gather


def _check(w: QTensor):
    if not decodable(w.qtype):
        raise ValueError(f"no decoder for block type {GGMLType(w.qtype).name}")


def tile_rows(cols: int) -> int:
    """Rows per decoded tile for a weight with `cols` columns (a multiple of 16)."""
    return max(16, TILE_ELEMENTS // cols // 16 * 16)


def decode_rows(w: QTensor, r0: int, r1: int, out: np.ndarray, bf16: bool = False) -> np.ndarray:
    """Rows r0..r1 of w decoded into out[: r1 - r0] (float32 or float64)."""
    _check(w)
    rows_f32, rows_f64, _ = _decoders(int(w.qtype))
    if out.dtype == np.float32:
        rows_f32(w.data, w.cols, F16_TABLE, r0, out[: r1 - r0], bf16)
    else:
        rows_f64(w.data, w.cols, F16_TABLE, r0, out[: r1 - r0])
    return out[: r1 - r0]


def _tiles(w: QTensor, dtype, bf16: bool):
    """(r0, r1, decoded rows) for consecutive tiles of w's rows. An F32 weight in the compute
    dtype is its own tile (a view into the memory map, no copy)."""
    if w.qtype == GGMLType.F32 and dtype == np.float32 and not bf16:
        yield 0, w.rows, w.data.view(np.float32)
        return
    step = tile_rows(w.cols)
    buf = np.empty((min(step, w.rows), w.cols), dtype=dtype)
    for r0 in range(0, w.rows, step):
        r1 = min(w.rows, r0 + step)
        yield r0, r1, decode_rows(w, r0, r1, buf, bf16)


def qmatmul(w: QTensor, x: np.ndarray, bf16: bool = False) -> np.ndarray:
    """y (n, rows) = x (n, cols) @ W.T, W read as raw blocks a tile at a time.

    bf16: x and W are rounded to bfloat16 first (x must then be float32); the products
    accumulate in float32."""
    if x.shape[1] != w.cols:
        raise ValueError(f"x has {x.shape[1]} columns, weight has {w.cols}")
    if bf16:
        x = round_bf16(x)
    out = np.empty((x.shape[0], w.rows), dtype=x.dtype)
    for r0, r1, tile in _tiles(w, x.dtype, bf16):
        np.matmul(x, tile.T, out=out[:, r0:r1])
    return out


def qmatmul_t(w: QTensor, dy: np.ndarray, bf16: bool = False) -> np.ndarray:
    """dx (n, cols) = dy (n, rows) @ W: the input gradient of y = x @ W.T, through the
    transposed quantized matrix, a tile of W's rows at a time."""
    if dy.shape[1] != w.rows:
        raise ValueError(f"dy has {dy.shape[1]} columns, weight has {w.rows} rows")
    if bf16:
        dy = round_bf16(dy)
    dx = np.zeros((dy.shape[0], w.cols), dtype=dy.dtype)
    part = None
    for r0, r1, tile in _tiles(w, dy.dtype, bf16):
        if r0 == 0 and r1 == w.rows:
            np.matmul(dy, tile, out=dx)
            break
        if part is None:
            part = np.empty_like(dx)
        np.matmul(dy[:, r0:r1], tile, out=part)
        dx += part
    return dx


# -- the embedding lookup -----------------------------------------------------------------


def gather_rows(w: QTensor, ids, dtype=np.float32) -> np.ndarray:
    """Rows ids of w decoded: (len(ids), cols) in dtype (the serial twin of quants.get_rows)."""
    _check(w)
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    out = np.empty((ids.shape[0], w.cols), dtype=dtype)
    _decoders(int(w.qtype))[2](w.data, w.cols, F16_TABLE, ids, out)
    return out
