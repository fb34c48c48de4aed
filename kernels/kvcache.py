"""The K/V cache's storage types: f32, f16, q8_0, q4_0, fp8_e4m3, and the kernels that write and
read them.

One table (TYPES) knows each type; attention (kernels/ops.py, kernels/ops_avx2.py) reaches the
cache only through the typed kernels below, each a function of a compile-time type code (a
literal integer, like the block types' mask in dispatch.py), so a step compiles only the
cache types in use.

Layout: the cache of one layer is (n_kv, n_ctx, row) and one row holds the head_dim values of
one key (or value) of one kv head:

    f32   float32 (n_kv, n_ctx, head_dim): the values themselves (the old cache, unchanged)
    f16   uint8 (n_kv, n_ctx, 2 * head_dim): IEEE halves, little-endian
    q8_0  uint8 (n_kv, n_ctx, 34 * head_dim / 32): ggml's block_q8_0 (d:f16, qs[32] int8)
    q4_0  uint8 (n_kv, n_ctx, 18 * head_dim / 32): ggml's block_q4_0 (d:f16, qs[16]; element
          j < 16 is the low nibble of qs[j], j >= 16 the high nibble of qs[j - 16]; value
          (nibble - 8) * d)
    fp8_e4m3  uint8 (n_kv, n_ctx, 33 * head_dim / 32): pyllm's FP8_E4M3 block (kernels/lowbit.py:
          e:E8M0 scale, q[32] OCP E4M3 codes; value 2^(e-127) * E4M3(q[j])). llama.cpp has no
          such cache type (a cache is never written to a file, so nothing else must read it).

Rounding is what llama.cpp's CPU backend does when it copies K/V into such a cache
(ggml-cpu/ops.cpp set_rows / dup call type_traits_cpu[type].from_float, ggml-cpu.c):
f16: ggml_cpu_fp32_to_fp16 (vcvtps2ph, round to nearest even); q8_0: the x86
quantize_row_q8_0 (ggml-cpu/arch/x86/quants.c: d = max|x| / 127, q = round-half-even(x * 127 /
max|x|)); q4_0: quantize_row_q4_0, which is the reference quantize_row_q4_0_ref (ggml-quants.c:
d = the signed value of largest magnitude / -8, q = min(15, (int)(x / d + 8.5))); fp8_e4m3: the
weight type's own quantizer (lowbit.quantize_fp8_e4m3: the power-of-two scale that brings the
block's largest finite magnitude within E4M3's max 448, values rounded to nearest even, saturating).

Reading: keys are dotted with the query block by block, values accumulated block by block, from
the stored bytes (never a dequantized copy of the cache). For a q8_0/q4_0 K cache the query is
first quantized to q8_0 too (once per query head), and each key block meets it in an integer dot
product, as llama.cpp does (vec_dot_type of q8_0 and q4_0 is q8_0, for both its attention
paths): s = sum over blocks of d_k * d_q * sum(k_i * q_i). An fp8_e4m3 key meets the float
query: s = sum over blocks of 2^(e-127) * sum(E4M3(k_i) * q_i).

The kernels (t: the type code, a literal; c: a cache flattened to 1-D, co: the element offset of
a row in it; x, q: float32 arrays with the values at xo, qo; f16: quants.F16_TABLE):

    store(t, x, xo, c, co, hd, f16)           encode hd values into the row at co
    prepare_q(t, q, qo, qq, hd, f16)          the query in the form dot() reads (qq: a uint8
                                              row of q8_0 blocks; nothing for f32/f16)
    dot(t, q, qo, qq, c, co, hd, f16)         q . key row
    axpy(t, c, co, w, acc, hd, f16)           acc[:hd] += w * value row

and for the AVX2 attention dot8 (eight keys' scores as one vector) and load8 (eight values).
"""

import functools
from collections import namedtuple

import numpy as np
from llvmlite import ir
from numba import literally, njit
from numba.core import types
from numba.extending import intrinsic, overload
from pyllm.base import GGMLType, PyllmError
from pyllm.kernels.lowbit import E8M0_TABLE, quantize_fp8_e4m3
from pyllm.kernels.quantize import f32_to_f16, row_q4_0
from pyllm.kernels.quants import half

F32, F16, Q8_0, Q4_0, FP8_E4M3 = range(5)

KVType = namedtuple("KVType", "name code ggml block nbytes")
KVType.__doc__ = "A cache type: name (as llama.cpp spells it), code, GGML type, values and bytes per block."
TYPES = (
    KVType("f32", F32, GGMLType.F32, 1, 4),
    KVType("f16", F16, GGMLType.F16, 1, 2),
    KVType("q8_0", Q8_0, GGMLType.Q8_0, 32, 34),
    KVType("q4_0", Q4_0, GGMLType.Q4_0, 32, 18),
    KVType("fp8_e4m3", FP8_E4M3, GGMLType.FP8_E4M3, 32, 33),
)
NAMES = tuple(t.name for t in TYPES)
DEFAULT = "f16"  # llama.cpp's default


def kv_type(name) -> KVType:
    """The cache type called name ('f16', 'q8_0', ...; a KVType or code passes through)."""
    if isinstance(name, KVType):
        return name
    if isinstance(name, (int, np.integer)) and 0 <= name < len(TYPES):
        return TYPES[name]
    key = str(name).strip().lower()
    for t in TYPES:
        if t.name == key:
            return t
    raise PyllmError(f"unknown KV cache type {name!r}; valid types: {', '.join(NAMES)}")


def row_bytes(t, head_dim: int) -> int:
    """Bytes of one cached key or value row of head_dim values."""
    t = kv_type(t)
    return head_dim // t.block * t.nbytes


def check_head_dim(t, head_dim: int, which: str = "K"):
    t = kv_type(t)
    if head_dim % t.block:
        raise PyllmError(f"a {t.name} {which} cache needs head_dim a multiple of {t.block}, "
                         f"this model's is {head_dim}; use f16 or f32")


def new_cache(t, n_layers: int, n_kv: int, n_ctx: int, head_dim: int, which: str = "K") -> np.ndarray:
    """A zeroed cache of type t: float32 (layers, n_kv, n_ctx, head_dim) for f32, else uint8
    (layers, n_kv, n_ctx, row_bytes)."""
    t = kv_type(t)
    check_head_dim(t, head_dim, which)
    if t.code == F32:
        return np.zeros((n_layers, n_kv, n_ctx, head_dim), np.float32)
    return np.zeros((n_layers, n_kv, n_ctx, row_bytes(t, head_dim)), np.uint8)


def cache_type(cache: np.ndarray, head_dim: int) -> KVType:
    """The type of a cache made by new_cache (from its dtype and row length)."""
    if cache.dtype == np.float32:
        return TYPES[F32]
    for t in TYPES[1:]:
        if cache.shape[-1] == row_bytes(t, head_dim):
            return t
    raise ValueError(f"not a K/V cache of head_dim {head_dim}: {cache.dtype} {cache.shape}")


ROTATE_OFF = "PYLLM_ATTN_ROT_DISABLE"  # =1: no rotation (as llama.cpp's LLAMA_ATTN_ROT_DISABLE)


def rotation(t, head_dim: int, which: str) -> int:
    """The Walsh-Hadamard rotation size for a `which` ("K" or "V") cache of type t: 0 for none.

    As llama.cpp (src/llama-kv-cache.cpp, attn_rot_k/attn_rot_v): block-quantized caches of
    heads whose size is a multiple of 64 are rotated, K by the largest power of two dividing
    head_dim, V by 64. pyllm's fp8_e4m3 is block-scaled too, so it is rotated as well."""
    import os

    t = kv_type(t)
    if t.block == 1 or head_dim % 64 or os.environ.get(ROTATE_OFF, "0").strip() not in ("", "0"):
        return 0
    if which == "V":
        return 64
    return head_dim & -head_dim  # the lowest set bit: the largest power of two dividing head_dim


def bytes_per_token(type_k, type_v, n_layers: int, n_kv: int, head_dim: int) -> int:
    """Cache bytes one token takes, K and V of every layer."""
    return n_layers * n_kv * (row_bytes(type_k, head_dim) + row_bytes(type_v, head_dim))


def _e4m3_values() -> np.ndarray:
    """The float32 value of each E4M3 code (OCP FP8: S.EEEE.MMM, bias 7). The bits EEEE.MMM put
    at float32's bits 26..20 read as 2^(E-127) (1 + M/8), or M/8 2^-126 for E = 0, so times
    2^120 they are E4M3's normals and subnormals (M 2^-9) at once; S.1111.111 is NaN."""
    c = np.arange(256, dtype=np.uint32)
    v = ((c & 0x7F) << 20).view(np.float32).astype(np.float64) * 2.0 ** 120
    v = np.where(c & 0x80, -v, v)
    v[(c & 0x7F) == 0x7F] = np.nan
    return v.astype(np.float32)


E4M3_VALUES = _e4m3_values()

# -- the portable kernels ---------------------------------------------------------------------


@njit(inline="always")
def _put_half(c, i, v):
    h = f32_to_f16(v)
    c[i] = np.uint8(h & 0xFF)
    c[i + 1] = np.uint8((h >> 8) & 0xFF)


@njit(inline="always")
def _i8(c, i):
    """The byte c[i] (uint8) read as a signed int8, widened to int32."""
    return np.int32(np.int8(c[i]))


@njit(inline="always")
def _u4(c, o, j):
    """Element j (0..31) of the q4_0 block at c[o]: its nibble minus 8."""
    b = np.int32(c[o + 2 + (j & 15)])
    return ((b >> 4) if j >= 16 else (b & 15)) - 8


@njit(inline="always")
def store_q8_0(x, xo, c, co, hd):
    """x[xo:xo + hd] -> q8_0 blocks at c[co]: the x86 quantize_row_q8_0 rounding."""
    for b in range(hd // 32):
        o, xb = co + 34 * b, xo + 32 * b
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[xb + j]))
        inv = np.float32(127.0) / amax if amax != np.float32(0.0) else np.float32(0.0)
        _put_half(c, o, amax / np.float32(127.0))
        for j in range(32):
            c[o + 2 + j] = np.uint8(np.int32(np.rint(x[xb + j] * inv)) & 0xFF)


def _store_f32(t, x, xo, c, co, hd, f16):
    for d in range(hd):
        c[co + d] = x[xo + d]


def _store_f16(t, x, xo, c, co, hd, f16):
    for d in range(hd):
        _put_half(c, co + 2 * d, x[xo + d])


def _store_q8_0(t, x, xo, c, co, hd, f16):
    store_q8_0(x, xo, c, co, hd)


def _store_q4_0(t, x, xo, c, co, hd, f16):
    row_q4_0(x[xo:xo + hd], c[co:co + 18 * (hd // 32)], f16)


def _store_fp8(t, x, xo, c, co, hd, f16):
    for b in range(hd // 32):
        quantize_fp8_e4m3(x[xo + 32 * b:xo + 32 * b + 32], c[co + 33 * b:co + 33 * b + 33])


def _prepare_none(t, q, qo, qq, hd, f16):
    pass


def _prepare_q8_0(t, q, qo, qq, hd, f16):
    store_q8_0(q, qo, qq, 0, hd)


def _dot_f32(t, q, qo, qq, c, co, hd, f16):
    s = np.float32(0.0)
    for d in range(hd):
        s += q[qo + d] * c[co + d]
    return s


def _dot_f16(t, q, qo, qq, c, co, hd, f16):
    s = np.float32(0.0)
    for d in range(hd):
        s += q[qo + d] * half(c, co + 2 * d, f16)
    return s


def _dot_q8_0(t, q, qo, qq, c, co, hd, f16):
    s = np.float32(0.0)
    for b in range(hd // 32):
        o, oq = co + 34 * b, 34 * b
        acc = np.int32(0)
        for j in range(32):
            acc += _i8(c, o + 2 + j) * _i8(qq, oq + 2 + j)
        s += half(c, o, f16) * half(qq, oq, f16) * np.float32(acc)
    return s


def _dot_q4_0(t, q, qo, qq, c, co, hd, f16):
    s = np.float32(0.0)
    for b in range(hd // 32):
        o, oq = co + 18 * b, 34 * b
        acc = np.int32(0)
        for j in range(32):
            acc += _u4(c, o, j) * _i8(qq, oq + 2 + j)
        s += half(c, o, f16) * half(qq, oq, f16) * np.float32(acc)
    return s


def _dot_fp8(t, q, qo, qq, c, co, hd, f16):
    s = np.float32(0.0)
    for b in range(hd // 32):
        o, x = co + 33 * b, qo + 32 * b
        acc = np.float32(0.0)
        for j in range(32):
            acc += q[x + j] * E4M3_VALUES[c[o + 1 + j]]
        s += E8M0_TABLE[c[o]] * acc
    return s


def _axpy_f32(t, c, co, w, acc, hd, f16):
    for d in range(hd):
        acc[d] += w * c[co + d]


def _axpy_f16(t, c, co, w, acc, hd, f16):
    for d in range(hd):
        acc[d] += w * half(c, co + 2 * d, f16)


def _axpy_q8_0(t, c, co, w, acc, hd, f16):
    for b in range(hd // 32):
        o = co + 34 * b
        wd = w * half(c, o, f16)
        for j in range(32):
            acc[32 * b + j] += wd * np.float32(_i8(c, o + 2 + j))


def _axpy_q4_0(t, c, co, w, acc, hd, f16):
    for b in range(hd // 32):
        o = co + 18 * b
        wd = w * half(c, o, f16)
        for j in range(32):
            acc[32 * b + j] += wd * np.float32(_u4(c, o, j))


def _axpy_fp8(t, c, co, w, acc, hd, f16):
    for b in range(hd // 32):
        o = co + 33 * b
        wd = w * E8M0_TABLE[c[o]]
        for j in range(32):
            acc[32 * b + j] += wd * E4M3_VALUES[c[o + 1 + j]]


_STORE = (_store_f32, _store_f16, _store_q8_0, _store_q4_0, _store_fp8)
_PREPARE = (_prepare_none, _prepare_none, _prepare_q8_0, _prepare_q8_0, _prepare_none)
_DOT = (_dot_f32, _dot_f16, _dot_q8_0, _dot_q4_0, _dot_fp8)
_AXPY = (_axpy_f32, _axpy_f16, _axpy_q8_0, _axpy_q4_0, _axpy_fp8)
_FAST = {"fastmath": True}  # the float sums may be reassociated (vectorised), as in ops.py


def _pick(table, t):
    return table[t.literal_value] if isinstance(t, types.IntegerLiteral) else None


def store(t, x, xo, c, co, hd, f16):
    raise NotImplementedError("only callable from compiled code")


def prepare_q(t, q, qo, qq, hd, f16):
    raise NotImplementedError("only callable from compiled code")


def dot(t, q, qo, qq, c, co, hd, f16):
    raise NotImplementedError("only callable from compiled code")


def axpy(t, c, co, w, acc, hd, f16):
    raise NotImplementedError("only callable from compiled code")


@overload(store, prefer_literal=True)
def _ov_store(t, x, xo, c, co, hd, f16):
    return _pick(_STORE, t)


@overload(prepare_q, prefer_literal=True)
def _ov_prepare(t, q, qo, qq, hd, f16):
    return _pick(_PREPARE, t)


@overload(dot, prefer_literal=True, jit_options=_FAST)
def _ov_dot(t, q, qo, qq, c, co, hd, f16):
    return _pick(_DOT, t)


@overload(axpy, prefer_literal=True, jit_options=_FAST)
def _ov_axpy(t, c, co, w, acc, hd, f16):
    return _pick(_AXPY, t)


@njit(cache=True)
def store_kv(kt, vt, k, v, k_cache, v_cache, start_pos, f16):
    """Encode new keys/values (n, n_kv*head_dim) into one layer's caches (n_kv, n_ctx, row) at
    positions start_pos..: kt, vt are the caches' type codes (literals)."""
    literally(kt)
    literally(vt)
    n, kvd = k.shape
    n_kv, n_ctx = k_cache.shape[0], k_cache.shape[1]
    hd = kvd // n_kv
    kf, vf = k_cache.reshape(-1), v_cache.reshape(-1)
    krow, vrow = k_cache.shape[2], v_cache.shape[2]
    for t in range(n):
        kt_row, vt_row = k[t], v[t]
        for h in range(n_kv):
            at = h * n_ctx + start_pos + t
            store(kt, kt_row, h * hd, kf, at * krow, hd, f16)
            store(vt, vt_row, h * hd, vf, at * vrow, hd, f16)


# -- AVX2 kernels (compiled only from the AVX2 attention, on hosts that have it) ---------------


def _ptr(context, builder, arrty, arr, index, elty):
    a = context.make_array(arrty)(context, builder, arr)
    return builder.bitcast(builder.gep(a.data, [index]), elty.as_pointer())


@intrinsic
def i8x8_f32(typingctx, arr, i):
    """8 signed bytes of a uint8 array from element i, as 8 float32 lanes (vpmovsxbd + vcvtdq2ps)."""
    from pyllm.kernels.simd import F32x8

    if not (isinstance(arr, types.Array) and arr.dtype == types.uint8 and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(ir.IntType(8), 8)),
                         align=1)
        return builder.sitofp(builder.sext(v, ir.VectorType(ir.IntType(32), 8)), ir.VectorType(ir.FloatType(), 8))

    return F32x8(arr, i), codegen


@intrinsic
def u4x8_f32(typingctx, arr, i, shift):
    """The nibbles (bits shift..shift+3, shift 0 or 4) of 8 bytes of a uint8 array from element
    i, minus 8, as 8 float32 lanes: 8 q4_0 values."""
    from pyllm.kernels.simd import F32x8

    if not (isinstance(arr, types.Array) and arr.dtype == types.uint8 and isinstance(i, types.Integer)
            and isinstance(shift, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v8, v32 = ir.VectorType(ir.IntType(8), 8), ir.VectorType(ir.IntType(32), 8)
        v = builder.zext(builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], v8), align=1), v32)
        s = builder.trunc(args[2], ir.IntType(32)) if args[2].type.width > 32 else builder.zext(args[2], ir.IntType(32))
        sv = builder.insert_element(ir.Constant(v32, None), s, ir.Constant(ir.IntType(32), 0))
        sv = builder.shuffle_vector(sv, ir.Constant(v32, None), ir.Constant(v32, [0] * 8))
        q = builder.and_(builder.lshr(v, sv), ir.Constant(v32, [15] * 8))
        q = builder.sub(q, ir.Constant(v32, [8] * 8))
        return builder.sitofp(q, ir.VectorType(ir.FloatType(), 8))

    return F32x8(arr, i, shift), codegen


@intrinsic
def e4m3x8_f32(typingctx, arr, i):
    """8 E4M3 codes of a uint8 array from element i, as 8 float32 lanes: E4M3_VALUES' bit move
    (magnitude bits to float32's 26..20, times 2^120, the sign bit on top; 0x7F magnitude NaN)."""
    from pyllm.kernels.simd import F32x8

    if not (isinstance(arr, types.Array) and arr.dtype == types.uint8 and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v8, v32, vf = ir.VectorType(ir.IntType(8), 8), ir.VectorType(ir.IntType(32), 8), ir.VectorType(ir.FloatType(), 8)
        v = builder.zext(builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], v8), align=1), v32)
        mag = builder.and_(v, ir.Constant(v32, [0x7F] * 8))
        sign = builder.shl(builder.and_(v, ir.Constant(v32, [0x80] * 8)), ir.Constant(v32, [24] * 8))
        f = builder.bitcast(builder.shl(mag, ir.Constant(v32, [20] * 8)), vf)
        f = builder.fmul(f, ir.Constant(vf, [2.0 ** 120] * 8))  # exact: no fast-math flags (denormals in)
        f = builder.bitcast(builder.or_(builder.bitcast(f, v32), sign), vf)
        nan = builder.icmp_unsigned("==", mag, ir.Constant(v32, [0x7F] * 8))
        return builder.select(nan, ir.Constant(vf, [float("nan")] * 8), f)

    return F32x8(arr, i), codegen


@functools.cache
def _avx2():
    """The AVX2 kernels' tables, built on first use (importing simd is cheap, compiling it is not)."""
    from pyllm.kernels.simd import (
        cvt_f32,
        f16_at,
        fmadd,
        load_f16x8,
        load_f32x8,
        load_i8x32,
        load_nibbles,
        madd,
        maddubs,
        sign,
        splat_f32,
        splat_i8,
        splat_i16,
        sums8,
        vmul,
        vsub,
        zero_f32,
    )

    @njit(inline="always")
    def i8dot(k, q):
        """sum of k_i * q_i over 32 int8 lanes, as 8 float32 partial sums (ggml's
        mul_sum_i8_pairs_float: |k| unsigned times q with k's sign)."""
        return cvt_f32(madd(maddubs(sign(k, k), sign(q, k)), splat_i16(1)))

    def float_dot8(load):
        """dot8 for a type whose values d..d+7 of the row at c[co] load(c, co, d) gives as
        float32 lanes (f32, f16, fp8_e4m3): the eight keys' FMAs against one query vector."""

        def dot8(t, q, qo, qq, c, co, stride, hd):
            a0 = zero_f32()
            a1 = zero_f32()
            a2 = zero_f32()
            a3 = zero_f32()
            a4 = zero_f32()
            a5 = zero_f32()
            a6 = zero_f32()
            a7 = zero_f32()
            for d in range(0, hd, 8):
                qv = load_f32x8(q, qo + d)
                a0 = fmadd(qv, load(c, co, d), a0)
                a1 = fmadd(qv, load(c, co + stride, d), a1)
                a2 = fmadd(qv, load(c, co + 2 * stride, d), a2)
                a3 = fmadd(qv, load(c, co + 3 * stride, d), a3)
                a4 = fmadd(qv, load(c, co + 4 * stride, d), a4)
                a5 = fmadd(qv, load(c, co + 5 * stride, d), a5)
                a6 = fmadd(qv, load(c, co + 6 * stride, d), a6)
                a7 = fmadd(qv, load(c, co + 7 * stride, d), a7)
            return sums8(a0, a1, a2, a3, a4, a5, a6, a7)

        return dot8

    @njit(inline="always")
    def f32_lanes(c, co, d):
        return load_f32x8(c, co + d)

    @njit(inline="always")
    def f16_lanes(c, co, d):
        return load_f16x8(c, co + 2 * d)

    @njit(inline="always")
    def fp8_lanes(c, co, d):
        o = co + 33 * (d >> 5)
        return vmul(e4m3x8_f32(c, o + 1 + (d & 31)), splat_f32(E8M0_TABLE[c[o]]))

    def dot8_q8_0(t, q, qo, qq, c, co, stride, hd):
        a0 = zero_f32()
        a1 = zero_f32()
        a2 = zero_f32()
        a3 = zero_f32()
        a4 = zero_f32()
        a5 = zero_f32()
        a6 = zero_f32()
        a7 = zero_f32()
        for b in range(hd // 32):
            qv = load_i8x32(qq, 34 * b + 2)
            dq = f16_at(qq, 34 * b)
            o = co + 34 * b
            a0 = fmadd(splat_f32(dq * f16_at(c, o)), i8dot(load_i8x32(c, o + 2), qv), a0)
            o += stride
            a1 = fmadd(splat_f32(dq * f16_at(c, o)), i8dot(load_i8x32(c, o + 2), qv), a1)
            o += stride
            a2 = fmadd(splat_f32(dq * f16_at(c, o)), i8dot(load_i8x32(c, o + 2), qv), a2)
            o += stride
            a3 = fmadd(splat_f32(dq * f16_at(c, o)), i8dot(load_i8x32(c, o + 2), qv), a3)
            o += stride
            a4 = fmadd(splat_f32(dq * f16_at(c, o)), i8dot(load_i8x32(c, o + 2), qv), a4)
            o += stride
            a5 = fmadd(splat_f32(dq * f16_at(c, o)), i8dot(load_i8x32(c, o + 2), qv), a5)
            o += stride
            a6 = fmadd(splat_f32(dq * f16_at(c, o)), i8dot(load_i8x32(c, o + 2), qv), a6)
            o += stride
            a7 = fmadd(splat_f32(dq * f16_at(c, o)), i8dot(load_i8x32(c, o + 2), qv), a7)
        return sums8(a0, a1, a2, a3, a4, a5, a6, a7)

    def dot8_q4_0(t, q, qo, qq, c, co, stride, hd):
        a0 = zero_f32()
        a1 = zero_f32()
        a2 = zero_f32()
        a3 = zero_f32()
        a4 = zero_f32()
        a5 = zero_f32()
        a6 = zero_f32()
        a7 = zero_f32()
        eight = splat_i8(8)
        for b in range(hd // 32):
            qv = load_i8x32(qq, 34 * b + 2)
            dq = f16_at(qq, 34 * b)
            o = co + 18 * b
            a0 = fmadd(splat_f32(dq * f16_at(c, o)), i8dot(vsub(load_nibbles(c, o + 2), eight), qv), a0)
            o += stride
            a1 = fmadd(splat_f32(dq * f16_at(c, o)), i8dot(vsub(load_nibbles(c, o + 2), eight), qv), a1)
            o += stride
            a2 = fmadd(splat_f32(dq * f16_at(c, o)), i8dot(vsub(load_nibbles(c, o + 2), eight), qv), a2)
            o += stride
            a3 = fmadd(splat_f32(dq * f16_at(c, o)), i8dot(vsub(load_nibbles(c, o + 2), eight), qv), a3)
            o += stride
            a4 = fmadd(splat_f32(dq * f16_at(c, o)), i8dot(vsub(load_nibbles(c, o + 2), eight), qv), a4)
            o += stride
            a5 = fmadd(splat_f32(dq * f16_at(c, o)), i8dot(vsub(load_nibbles(c, o + 2), eight), qv), a5)
            o += stride
            a6 = fmadd(splat_f32(dq * f16_at(c, o)), i8dot(vsub(load_nibbles(c, o + 2), eight), qv), a6)
            o += stride
            a7 = fmadd(splat_f32(dq * f16_at(c, o)), i8dot(vsub(load_nibbles(c, o + 2), eight), qv), a7)
        return sums8(a0, a1, a2, a3, a4, a5, a6, a7)

    def load8_f32(t, c, co, d):
        return f32_lanes(c, co, d)

    def load8_f16(t, c, co, d):
        return f16_lanes(c, co, d)

    def load8_q8_0(t, c, co, d):
        o = co + 34 * (d >> 5)
        return vmul(i8x8_f32(c, o + 2 + (d & 31)), splat_f32(f16_at(c, o)))

    def load8_q4_0(t, c, co, d):
        o = co + 18 * (d >> 5)
        j = d & 31
        return vmul(u4x8_f32(c, o + 2 + (j & 15), 4 if j >= 16 else 0), splat_f32(f16_at(c, o)))

    def load8_fp8(t, c, co, d):
        return fp8_lanes(c, co, d)

    return ((float_dot8(f32_lanes), float_dot8(f16_lanes), dot8_q8_0, dot8_q4_0, float_dot8(fp8_lanes)),
            (load8_f32, load8_f16, load8_q8_0, load8_q4_0, load8_fp8))


def dot8(t, q, qo, qq, c, co, stride, hd):
    """The scores of q against the eight key rows at c[co], c[co + stride], ... (AVX2)."""
    raise NotImplementedError("only callable from compiled code")


def load8(t, c, co, d):
    """Values d..d+7 of the value row at c[co], as float32 lanes (AVX2)."""
    raise NotImplementedError("only callable from compiled code")


@overload(dot8, prefer_literal=True, jit_options=_FAST)
def _ov_dot8(t, q, qo, qq, c, co, stride, hd):
    return _pick(_avx2()[0], t)


@overload(load8, prefer_literal=True, jit_options=_FAST)
def _ov_load8(t, c, co, d):
    return _pick(_avx2()[1], t)
