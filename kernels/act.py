"""Activations quantized once per product, the way llama.cpp pairs them with each weight type.

A product W x with quantized W does not multiply floats: x is first cut into blocks and
quantized to int8 with one float scale per block, then each weight block meets an activation
block in an integer dot product (ggml-cpu.c, type_traits_cpu[].vec_dot_type):

- Q8_0 (for Q4_0, Q5_0, Q8_0 weights): blocks of 32, d = max|x| / 127, q = round(x * 127/max|x|).
- Q8_1 (for Q4_1, Q5_1): Q8_0's quants plus s = d * sum(q), which meets the weights' min.
- Q8_K (for Q2_K..Q6_K): blocks of 256, d = max / -127 (signed: the largest |x|), q clamped
  to 127, plus the sum of every 16 quants (bsums), which meets the K-quants' mins.

The rounding is llama.cpp's x86 code (ggml-cpu/arch/x86/quants.c, what llama-bench runs on
this kind of machine): quantize_row_q8_0/_q8_1 multiply by 127/max and round half to even
(_mm256_round_ps), d and s are stored as float16 (we keep them as the float32 value of that
half); quantize_row_q8_K is the reference quantize_row_q8_K_ref (nearest_int, half to even),
d a float32.

The activation of n tokens is one `Act` of preallocated arrays (see new_act); quantize_act
fills the parts that the weight types in hand need.
"""

import functools
from collections import namedtuple

import numpy as np
from numba import njit
from numba.core import types
from numba.extending import overload
from pyllm.kernels.dispatch import SOURCE_STAMP
from pyllm.kernels.quantize import f32_to_f16, nearest_int
from pyllm.kernels.quants import F16_TABLE

# Which activation each weight family meets (the `act` field of kernels/blocks.py's table).
ACT_F32 = 0  # float weights (F32, F16, BF16) meet the float activation
ACT_Q8_0 = 1
ACT_Q8_1 = 2
ACT_Q8_K = 3

Act = namedtuple("Act", "xf q8 d8 s8 y8 qk dk bk")
Act.__doc__ = """The activation of n tokens (one row each), in every form a product may read.

xf: float32 (n, cols)      the activation itself
q8: int8 (n, cols)         Q8_0/Q8_1 quants
d8: float32 (n, cols/32)   Q8_0/Q8_1 block scales (float16 values)
s8: float32 (n, cols/32)   Q8_1 d * sum(q) (float16 values)
y8: int32 (n, cols/32)     sum(q) of each Q8_0 block (the interleaved Q4_0 kernel's offset)
qk: int8 (n, cols)         Q8_K quants
dk: float32 (n, cols/256)  Q8_K scales
bk: int16 (n, cols/16)     Q8_K sums of 16 quants
"""


def new_act(n: int, cols: int) -> Act:
    """Zeroed arrays for n tokens of up to cols values (cols a multiple of 32).

    The rows of the quants and floats are padded by 64 bytes: with rows a multiple of 4 KiB
    (4096 columns), the same offset of every token falls in one L1 set, and a batch of more
    than 8 tokens (the associativity) then misses on every load (2x slower measured)."""
    return Act(
        xf=np.zeros((n, cols + 16), np.float32),
        q8=np.zeros((n, cols + 64), np.int8),
        d8=np.zeros((n, cols // 32), np.float32),
        s8=np.zeros((n, cols // 32), np.float32),
        y8=np.zeros((n, cols // 32), np.int32),
        qk=np.zeros((n, cols + 64), np.int8),
        dk=np.zeros((n, max(cols // 256, 1)), np.float32),
        bk=np.zeros((n, cols // 16), np.int16),
    )


@njit(inline="always")
def _half(v, f16):
    """v rounded to float16 and back (GGML_CPU_FP32_TO_FP16 then FP16_TO_FP32)."""
    return f16[f32_to_f16(v)]


@njit(cache=True)
def quantize_row_q8_0(x, q, d, s, ysum, f16):
    """x (cols,) float32 -> q (cols,) int8, d, s and ysum (cols/32,): x86 quantize_row_q8_1,
    which is quantize_row_q8_0 plus s, and the integer sum of each block's quants."""
    for b in range(x.shape[0] // 32):
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[32 * b + j]))
        db = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax != np.float32(0.0) else np.float32(0.0)
        total = 0
        for j in range(32):
            v = np.int32(np.rint(x[32 * b + j] * inv))  # |v| <= 127
            q[32 * b + j] = np.int8(v)
            total += v
        d[b] = _half(db, f16)
        s[b] = _half(db * np.float32(total), f16)
        ysum[b] = total


@njit(cache=True)
def quantize_row_q8_k(x, q, d, bsums):
    """x (cols,) float32 -> q (cols,) int8, d (cols/256,), bsums (cols/16,): quantize_row_q8_K_ref."""
    for b in range(x.shape[0] // 256):
        o = 256 * b
        amax = np.float32(0.0)
        mx = np.float32(0.0)
        for j in range(256):
            a = abs(x[o + j])
            if a > amax:
                amax = a
                mx = x[o + j]
        if amax == np.float32(0.0):
            d[b] = np.float32(0.0)
            for j in range(256):
                q[o + j] = 0
            for j in range(16):
                bsums[16 * b + j] = 0
            continue
        iscale = np.float32(-127.0) / mx
        for j in range(256):
            q[o + j] = np.int8(min(127, nearest_int(iscale * x[o + j])))
        for j in range(16):
            total = 0
            for i in range(16):
                total += np.int32(q[o + 16 * j + i])
            bsums[16 * b + j] = np.int16(total)
        d[b] = np.float32(1.0) / iscale


def quantize_act(x, act, t, cols, need, f16):
    """Token t of act from x (cols,): the float copy, and every quantized form set in the bit
    mask need (1 << ACT_Q8_0 | 1 << ACT_Q8_1 | 1 << ACT_Q8_K), a compile-time constant: only
    the quantizers a model needs are compiled."""
    raise NotImplementedError("only callable from compiled code")


@overload(quantize_act, prefer_literal=True)
def _quantize_act(x, act, t, cols, need, f16):
    if not isinstance(need, types.IntegerLiteral):
        return None
    q8 = need.literal_value & ((1 << ACT_Q8_0) | (1 << ACT_Q8_1))
    qk = need.literal_value & (1 << ACT_Q8_K)

    def copy(x, act, t, cols, need, f16):
        _copy_row(x, act.xf[t], cols)

    def with_q8(x, act, t, cols, need, f16):
        _copy_row(x, act.xf[t], cols)
        quantize_row_q8_0(x[:cols], act.q8[t], act.d8[t], act.s8[t], act.y8[t], f16)

    def with_qk(x, act, t, cols, need, f16):
        _copy_row(x, act.xf[t], cols)
        quantize_row_q8_k(x[:cols], act.qk[t], act.dk[t], act.bk[t])

    def with_both(x, act, t, cols, need, f16):
        _copy_row(x, act.xf[t], cols)
        quantize_row_q8_0(x[:cols], act.q8[t], act.d8[t], act.s8[t], act.y8[t], f16)
        quantize_row_q8_k(x[:cols], act.qk[t], act.dk[t], act.bk[t])

    return with_both if q8 and qk else with_q8 if q8 else with_qk if qk else copy


@njit(inline="always")
def _copy_row(x, out, cols):
    for j in range(cols):
        out[j] = x[j]


@functools.cache
def _quantizer(need: int):
    stamp = SOURCE_STAMP  # a free variable: a changed kernel file is a new cache key

    @njit(cache=True)
    def run(x, act, f16):
        if stamp < 0:
            return
        for t in range(x.shape[0]):
            quantize_act(x[t], act, t, x.shape[1], need, f16)

    return run


def act_of(x: np.ndarray, need: int = 14) -> Act:
    """A new Act for x (n, cols) float32 with the forms in need (default: all)."""
    n, cols = x.shape
    act = new_act(n, -(-cols // 256) * 256)
    _quantizer(need)(np.ascontiguousarray(x, dtype=np.float32), act, F16_TABLE)
    return act
