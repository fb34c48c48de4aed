"""Products with quantized weights: y = x @ W.T, reading W's raw GGML blocks directly.

Two products, for two purposes:

- qlinear(w, x): what the model runs, as llama.cpp does it. x is quantized once to the
  activation form the weight type pairs with (kernels/act.py: Q8_0, Q8_1 or Q8_K; float
  for F32/F16/BF16 weights), then every block is an integer dot product, with the SIMD
  kernels of the host's instruction set (kernels/dots_avx2.py) or the portable ones
  (kernels/dots.py). Rows are split over the threads in chunks (prange); within a chunk, four
  tokens at a time share each weight block, so a batch reads each weight row once.
- linear(w, x): the float product of the exactly decoded weights with float32 x, within the
  float32 error bound of the exact result. Each thread decodes one weight row into an L1
  buffer and dots it with every token. A reference and a utility, not the hot path.

Which kernel runs for a type is the table's business (kernels/blocks.py); each product is
compiled per block type on first use, so a model compiles only the types it has.
"""

import functools

import numpy as np
from numba import njit, prange
from pyllm.base import GGMLType
from pyllm.kernels.act import act_of
from pyllm.kernels.cpu import best_isa
from pyllm.kernels.dispatch import SOURCE_STAMP, decode_row, mm
from pyllm.kernels.quants import F16_TABLE, QTensor

BATCH_MIN = 2  # from this many tokens on, a product reads each weight row once for all of them
ROW_CHUNK = 16  # rows per unit of parallel work (llama.cpp's chunk size for matrix products)


def _check(w: QTensor, x: np.ndarray):
    from pyllm.kernels.blocks import block_type

    try:
        bt = block_type(w.qtype)
    except ValueError:
        bt = None
    if bt is None or bt.dot is None:
        raise ValueError(f"no product for block type {GGMLType(w.qtype).name}")
    if x.ndim != 2 or x.shape[1] != w.cols:
        raise ValueError(f"x has {x.shape[-1]} columns, weight has {w.cols}")
    return bt


# -- the runtime product: quantized activations, integer dots ------------------------------


@functools.cache
def product(qt: int, isa: int):
    """The compiled product for block type (or layout) qt with kernel level isa
    (kernels/cpu.py): product(w, act, out) sets out (n, rows) = act (n tokens) @ w.T."""
    stamp = SOURCE_STAMP  # a free variable: a changed kernel file is a new cache key

    @njit(cache=True, parallel=True)
    def run(w, act, out):
        n, rows = out.shape  # w may be an interleaved layout: fewer, longer rows
        if stamp < 0:
            return
        for c in prange((rows + ROW_CHUNK - 1) // ROW_CHUNK):
            r0 = c * ROW_CHUNK
            mm(qt, isa, w, r0, min(rows, r0 + ROW_CHUNK), act, 0, n, out, 0)

    return run


def qlinear_into(w: QTensor, x: np.ndarray, out: np.ndarray, isa: int | None = None) -> np.ndarray:
    """out (n, rows) = x (n, cols) @ w.T as the model computes it (int8 activations for
    quantized w). isa: the kernel level (default: the best this host runs)."""
    bt = _check(w, x)
    act = act_of(np.ascontiguousarray(x, dtype=np.float32), 1 << bt.act)
    product(int(w.qtype), best_isa() if isa is None else isa)(w.data, act, out)
    return out


def qlinear(w: QTensor, x: np.ndarray, isa: int | None = None) -> np.ndarray:
    """x (n, cols) float32 @ w.T -> (n, rows) float32, as the model computes it."""
    return qlinear_into(w, x, np.empty((x.shape[0], w.rows), dtype=np.float32), isa)


# -- the float product of exactly decoded weights --------------------------------------------


@njit(inline="always", fastmath=True)
def _dot_f(row, x, cols):
    acc = np.float32(0.0)
    for j in range(cols):
        acc += row[j] * x[j]
    return acc


@njit(cache=True, parallel=True, fastmath=True)
def _linear_f32(w, x, out):
    # w: (rows, cols) float32, x: (n, cols), out: (n, rows)
    rows, cols = w.shape
    for r in prange(rows):
        for t in range(x.shape[0]):
            out[t, r] = _dot_f(w[r], x[t], cols)


@functools.cache
def _decoded_product(qt: int):
    stamp = SOURCE_STAMP  # a free variable: a changed kernel file is a new cache key

    @njit(cache=True, parallel=True, fastmath=True)
    def run(data, cols, f16, x, out):
        if stamp < 0:
            return
        # data: (rows, row_bytes) uint8, x: (n, cols) float32, out: (n, rows)
        for r in prange(data.shape[0]):
            buf = np.empty(cols, dtype=np.float32)  # (cols,) this row, decoded
            decode_row(qt, data[r], cols, f16, buf)
            for t in range(x.shape[0]):
                out[t, r] = _dot_f(buf, x[t], cols)

    return run


def linear_into(w: QTensor, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (n, rows) = x (n, cols) @ w.T, all float32 and C-contiguous, weights decoded exactly."""
    _check(w, x)
    if w.qtype == GGMLType.F32:
        _linear_f32(w.data.view(np.float32), x, out)
    else:
        _decoded_product(int(w.qtype))(w.data, w.cols, F16_TABLE, x, out)
    return out


def linear(w: QTensor, x: np.ndarray) -> np.ndarray:
    """x (n, cols) float32 @ w.T -> (n, rows) float32, weights decoded exactly."""
    return linear_into(w, x, np.empty((x.shape[0], w.rows), dtype=np.float32))
