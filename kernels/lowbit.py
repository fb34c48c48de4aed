"""Low-bit float block types: NF4, FP8 (E4M3, E5M2), FP6 (E3M2) and ggml's MXFP4.

Each type has three Numba kernels with the shapes of the other block types' (quants.py,
matmul.py, quantize.py), so the block-type table takes them as they are:

    decode_<t>(b, out, f16)         one block of raw bytes (uint8) -> out (float32)
    dot_<t>(row, f16, x, xs16)      sum_j w[j] * x[j] over one row of raw blocks (float32)
    quantize_<t>(x, b)              one block of float32 -> raw bytes b (uint8)

plus whole-tensor wrappers (dequantize, quantize, matvec) for tests and benchmarks.

Block layouts (element j of a block; little-endian; "E8M0" is the OCP MX scale byte e,
the power of two 2^(e-127), with e = 255 NaN):

    MXFP4     32 values, 17 bytes  e:E8M0 qs[16]    ggml's block_mxfp4 (ggml-common.h): j < 16
              is the low nibble of qs[j], j >= 16 the high nibble of qs[j-16]; a nibble is an
              E2M1 code (sign, 2 exponent bits, 1 mantissa bit), decoded as in ggml
              (ggml-quants.c dequantize_row_mxfp4): kvalues[q] * 2^(e-128), kvalues = 2 * E2M1.
    NF4       64 values, 34 bytes  d:f16 qs[32]     d = the block's absmax (as f16); j < 32 is the
              low nibble of qs[j], j >= 32 the high nibble of qs[j-32]; value = d * NF4[q], with
              QLoRA's 16 NormalFloat levels (bitsandbytes functional.get_4bit_type("nf4")).
    FP8_E4M3  32 values, 33 bytes  e:E8M0 q[32]     value = 2^(e-127) * E4M3(q[j])
    FP8_E5M2  32 values, 33 bytes  e:E8M0 q[32]     value = 2^(e-127) * E5M2(q[j])
    FP6_E3M2  32 values, 25 bytes  e:E8M0 p[24]     value = 2^(e-127) * E3M2(code); 4 codes in
              3 bytes: element 8i + g (i < 4, g < 8) is bits 6i..6i+5 of the 24-bit word
              p[g] | p[8+g] << 8 | p[16+g] << 16, so each i is 8 consecutive elements (8 lanes).

The element encodings are OCP's (OCP 8-bit Floating Point Specification v1.0; OCP Microscaling
Formats v1.0 for E3M2 and E2M1), sign in the top bit:

    E4M3  bias 7,  no Inf, NaN = S.1111.111, max 448, subnormals m * 2^-9
    E5M2  bias 15, IEEE-like: Inf = S.11111.00, NaN = S.11111.{01,10,11}, max 57344, m * 2^-16
    E3M2  bias 3,  no Inf/NaN, max 28, subnormals m * 2^-4
    E2M1  bias 1,  no Inf/NaN, max 6, subnormal 0.5

Quantizers (our stated rules; tests/lowbit_reference.py is an independent float64 version):
- FP8/FP6 scale: the smallest power of two X with absmax / X <= the format's max (so no finite
  element saturates because of the scale), over the block's finite values; e = 0 for a block
  without any non-zero finite value; X is clamped to E8M0's range 2^-127..2^127. (OCP MX's own
  rule, X = 2^(floor(log2 absmax) - emax), clips the largest elements; it is what MXFP4 uses.)
- elements: x / X rounded to the nearest code, ties to even (RNE), saturating: finite values
  beyond the max become +-max. Signs are kept, -0.0 included. Inf: E5M2 stores +-Inf, E4M3 and
  E3M2 saturate it to +-max. NaN: E4M3 stores 0x7F, E5M2 0x7E; E3M2 cannot (see below).
- NF4: d = absmax of the finite values rounded to f16 (clamped to 65504); each value gets the
  code whose d * NF4[k] is nearest, ties to the lower code (bitsandbytes' comparisons), decided
  exactly (float64 midpoints); +-Inf saturate to +-d; a block whose d rounds to 0 is all zeros.
- MXFP4: byte for byte ggml's quantize_row_mxfp4_ref (ggml-quants.c): e = floor(log2f(amax))
  - 2 + 127 (0 for amax = 0), each value the first nearest of kvalues * 2^(e-128) in float32.
  ggml's uint8 cast is undefined for amax < 2^-125; we clamp e at 0 there.
- Types without a NaN code (NF4, FP6_E3M2, MXFP4) cannot store NaN: quantize() raises
  ValueError for NaN input (and MXFP4 for Inf too, which ggml's reference cannot encode); the
  block kernels themselves write +0 for NaN and never fail.

Decoders and fused dots work a block at a time in 32-bit vector lanes, emitted as LLVM IR by
Numba @intrinsics (with a Numba type for LLVM's <8 x float>, the dots keep 8 float32 lane
accumulators): FP8/FP6 codes become floats by placing their exponent and mantissa bits into a
float32 (plain vector IR, portable); NF4 and MXFP4 look their nibbles up in a 16-entry float
table with two vpermps (llvm.x86.avx2.permps) per 8 weights on AVX2, and with plain table
loads elsewhere (1.5-2x slower). So a dot multiplies exactly the decoder's values, only summed
in another order; the IR never assumes "no NaN/Inf", so NaN and Inf codes reach the result.
These float dots serve lowbit.matvec; in the model (the block-type table, kernels/blocks.py)
NF4 meets int8 (Q8_0) activations instead, its levels in fixed point (NF4_INT below,
kernels/dots.py dot_nf4, dots_avx2.mm_nf4), as llama.cpp's IQ4_NL meets them.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model
from pyllm.base import BLOCK_SIZE, GGMLType, row_bytes
from pyllm.kernels.cpu import has
from pyllm.kernels.quantize import f32_to_f16
from pyllm.kernels.quants import F16_TABLE

# -- tables -------------------------------------------------------------------------------

# QLoRA's NF4 levels as bitsandbytes stores them (float32), ascending.
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float32)
# decision boundaries between neighbouring levels, exact in float64 (float32 sums halved)
NF4_MIDPOINTS = (NF4_VALUES[:-1].astype(np.float64) + NF4_VALUES[1:].astype(np.float64)) / 2
# The levels in fixed point for the integer product with int8 activations (kernels/dots.py
# dot_nf4, dots_avx2.mm_nf4): NF4_INT[k] = round(NF4[k] * 2^12), |error| <= 2^-13 of the
# block's absmax, under a tenth of a percent of the levels' smallest spacing (0.08). 2^12 keeps
# 32 products |code| * 127 within float32's 2^24, so a 32-value partial sum converts exactly.
# Split for vpmaddubsw: NF4_INT = 128 * NF4_HI + NF4_LO, NF4_LO in 0..127, NF4_HI in -32..32.
NF4_SHIFT = 12
NF4_INT = np.rint(NF4_VALUES.astype(np.float64) * 2.0 ** NF4_SHIFT).astype(np.int32)
NF4_LO = np.tile((NF4_INT & 127).astype(np.int8), 2)  # 32 bytes: the 16 entries twice (vpshufb)
NF4_HI = np.tile((NF4_INT >> 7).astype(np.int8), 2)
NF4_HI_OFFSET = 32  # NF4_HI + 32 in 0..64: unsigned, as vpmaddubsw's first operand must be (NF4x8)
NF4_HIU = np.tile(((NF4_INT >> 7) + NF4_HI_OFFSET).astype(np.int8), 2)

# ggml's kvalues_mxfp4: E2M1 values doubled, so they are integers (ggml-common.h)
MXFP4_KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)
MXFP4_KVALUES_F32 = MXFP4_KVALUES.astype(np.float32)

# E8M0 byte -> its power of two: 2^(e-127) (e = 0 is the float32 subnormal 2^-127), 255 is NaN
E8M0_TABLE = np.append(np.ldexp(np.float64(1.0), np.arange(255) - 127), np.nan).astype(np.float32)


# -- bits <-> float32 -----------------------------------------------------------------------

@intrinsic
def _f32_bits(typingctx, x):
    """The IEEE bits of a float32, as an int64 (a bitcast, no conversion)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return types.int64(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, u):
    """The float32 whose IEEE bits are the low 32 bits of an integer."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif v.type.width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(u), codegen


# -- 8-lane vectors ------------------------------------------------------------------------------
# A Numba type for an LLVM <8 x float> value lets the loops below carry 8 lanes in a register;
# the intrinsics on it are plain LLVM vector IR (two SSE registers where there is no AVX).

class _F32x8(types.Type):
    def __init__(self):
        super().__init__(name="f32x8")


f32x8 = _F32x8()
# float flags of the IR below: reassociation (the lanes sum in any order), never "nnan"/"ninf",
# so NaN and Inf codes reach the results
_FLAGS = ("reassoc", "contract", "nsz", "arcp")
_V8F = ir.VectorType(ir.FloatType(), 8)
_V8I = ir.VectorType(ir.IntType(32), 8)


@register_model(_F32x8)
class _F32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8F)


def _element_ptr(context, builder, arrty, arr, index):
    return builder.gep(context.make_array(arrty)(context, builder, arr).data, [index])


@intrinsic
def _zeros8(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_V8F, [0.0] * 8)

    return f32x8(), codegen


@intrinsic
def _load8(typingctx, arr, i):
    """arr[i:i+8] (float32) as a vector."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.float32):
        return None

    def codegen(context, builder, sig, args):
        p = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.load(builder.bitcast(p, _V8F.as_pointer()), align=4)

    return f32x8(arr, i), codegen


@intrinsic
def _sum8(typingctx, v):
    def codegen(context, builder, sig, args):
        s = builder.extract_element(args[0], ir.Constant(ir.IntType(32), 0))
        for k in range(1, 8):
            s = builder.fadd(s, builder.extract_element(args[0], ir.Constant(ir.IntType(32), k)))
        return s

    return types.float32(f32x8), codegen


@intrinsic
def _axpy8(typingctx, d, v, acc):
    """acc + d * v for a float32 scalar d."""
    def codegen(context, builder, sig, args):
        d, v, acc = args
        dv = builder.insert_element(ir.Constant(_V8F, ir.Undefined), d, ir.Constant(ir.IntType(32), 0))
        dv = builder.shuffle_vector(dv, dv, ir.Constant(_V8I, [0] * 8))
        return builder.fadd(acc, builder.fmul(dv, v, flags=_FLAGS), flags=_FLAGS)

    return f32x8(types.float32, f32x8, f32x8), codegen


# -- OCP float elements -------------------------------------------------------------------------
# A format is (mbits, bias, sign_bit, max_mag, inf_mag, nan_mag); *_mag are codes without the
# sign, -1 where the format has no such code: nan_mag is the NaN the encoder writes (codes above
# inf_mag are NaN too). encode_fp takes them as arguments (LLVM folds them after inlining);
# _emit_decode bakes them into the IR it emits.

E4M3 = (3, 7, 0x80, 0x7E, -1, 0x7F)
E5M2 = (2, 15, 0x80, 0x7B, 0x7C, 0x7E)
E3M2 = (2, 3, 0x20, 0x1F, -1, -1)
E2M1 = (1, 1, 0x08, 0x07, -1, -1)


def emax(fmt) -> int:
    """Unbiased exponent of the format's largest finite value."""
    mbits, bias, _, max_mag, _, _ = fmt
    return (max_mag >> mbits) - bias


@njit(inline="always")
def encode_fp(v, mbits, bias, sign_bit, max_mag, inf_mag, nan_mag):
    """float32 v -> the nearest code (ties to even), saturating finite values at +-max."""
    bits = _f32_bits(v)
    sign = sign_bit if bits >> 31 else 0
    a = bits & 0x7FFFFFFF
    if a > 0x7F800000:  # NaN
        return nan_mag if nan_mag >= 0 else 0
    if a == 0x7F800000:
        return sign | (inf_mag if inf_mag >= 0 else max_mag)
    if a < (128 - bias) << 23:
        # below the smallest normal 2^(1-bias): a multiple n of 2^(1-bias-mbits), rounded by rint
        # (RNE); the scaling by a power of two is exact. n = 2^mbits is the smallest normal's code.
        mag = np.int64(np.rint(_bits_f32(a) * _bits_f32((126 + bias + mbits) << 23)))
    else:
        # drop 23-mbits mantissa bits with round-to-nearest-even; a carry moves into the exponent
        shift = 23 - mbits
        r = (a + ((1 << (shift - 1)) - 1) + ((a >> shift) & 1)) >> shift
        mag = r - ((127 - bias) << mbits)
    return sign | min(mag, max_mag)


def _emit_decode(builder, code, fmt):
    """LLVM IR: an i32 code (or a vector of them) -> its float32 value(s), exactly. All in 32-bit
    lanes, so a loop of these vectorises 8 wide on AVX2 (Numba's integer arithmetic is 64-bit)."""
    mbits, bias, sign_bit, max_mag, inf_mag, nan_mag = fmt
    i32, f32 = ir.IntType(32), ir.FloatType()
    lanes = code.type.count if isinstance(code.type, ir.VectorType) else 0

    def k(n, t=i32):
        return ir.Constant(ir.VectorType(t, lanes), [n] * lanes) if lanes else ir.Constant(t, n)

    def kf(x):
        return k(x, ir.FloatType())

    if lanes:
        f32 = ir.VectorType(f32, lanes)

    mag = builder.and_(code, k(sign_bit - 1))
    # place exponent and mantissa into a float32 with the exponent rebiased
    f = builder.bitcast(builder.add(builder.shl(mag, k(23 - mbits)), k((127 - bias) << 23)), f32)
    # exponent 0: subnormal m * 2^(1-bias-mbits) = (f - 2^-bias) * 2, exactly
    sub = builder.fmul(builder.fsub(f, kf(2.0 ** -bias)), kf(2.0))
    f = builder.select(builder.icmp_unsigned("<", mag, k(1 << mbits)), sub, f)
    if inf_mag >= 0:  # E5M2: the top exponent is Inf (mantissa 0) or NaN
        special = builder.select(builder.icmp_unsigned("==", mag, k(inf_mag)), kf(float("inf")), kf(float("nan")))
        f = builder.select(builder.icmp_unsigned(">=", mag, k(inf_mag)), special, f)
    elif nan_mag >= 0:  # E4M3: only S.1111.111 is NaN
        f = builder.select(builder.icmp_unsigned(">=", mag, k(nan_mag)), kf(float("nan")), f)
    negative = builder.icmp_unsigned("!=", builder.and_(code, k(sign_bit)), k(0))
    return builder.select(negative, builder.fneg(f), f)


@njit(cache=True)
def scale_exponent(amax, emax):
    """s such that 2^s is the smallest power of two with amax / 2^s <= 1.75 * 2^emax (the
    max of every format here has mantissa 1.75), clamped to E8M0's -127..127."""
    if not amax > 0:
        return -127
    bits = _f32_bits(amax)
    e = (bits >> 23) - 127
    m = bits & 0x7FFFFF
    if e == -127:  # a float32 subnormal: normalise
        e = -126
        while m < 0x800000:
            m <<= 1
            e -= 1
        m &= 0x7FFFFF
    s = e - emax + (1 if m > 0x600000 else 0)  # mantissa above 1.75: one more
    return max(-127, min(127, s))


@njit(inline="always")
def _finite_absmax(x):
    amax = np.float32(0.0)
    for j in range(x.shape[0]):
        a = abs(x[j])
        if a > amax and a < np.float32(np.inf):  # NaN and Inf compare out
            amax = a
    return amax


# -- FP8 / FP6: E8M0 scale + elements ------------------------------------------------------------

@njit(cache=True)
def _put_scale(x, b, emax):
    """The block's scale byte into b[0]; returns 1/scale (2^-s, a normal float32 for every s)."""
    s = scale_exponent(_finite_absmax(x), emax)
    b[0] = np.uint8(s + 127)
    return _bits_f32((127 - s) << 23)


E4M3_EMAX = emax(E4M3)
E5M2_EMAX = emax(E5M2)
E3M2_EMAX = emax(E3M2)


@njit(cache=True)
def quantize_fp8_e4m3(x, b):
    inv = _put_scale(x, b, E4M3_EMAX)
    for j in range(32):
        b[1 + j] = np.uint8(encode_fp(x[j] * inv, 3, 7, 0x80, 0x7E, -1, 0x7F))


@njit(cache=True)
def quantize_fp8_e5m2(x, b):
    inv = _put_scale(x, b, E5M2_EMAX)
    for j in range(32):
        b[1 + j] = np.uint8(encode_fp(x[j] * inv, 2, 15, 0x80, 0x7B, 0x7C, 0x7E))


@njit(inline="always")
def decode_fp8_e4m3(b, out, f16):
    _e4m3_decode(b, 1, E8M0_TABLE[b[0]], out)


@njit(inline="always")
def decode_fp8_e5m2(b, out, f16):
    _e5m2_decode(b, 1, E8M0_TABLE[b[0]], out)


@njit(cache=True)
def quantize_fp6_e3m2(x, b):
    inv = _put_scale(x, b, E3M2_EMAX)
    for g in range(8):
        w = np.int64(0)
        for i in range(4):
            w |= encode_fp(x[8 * i + g] * inv, 2, 3, 0x20, 0x1F, -1, -1) << (6 * i)
        b[1 + g] = np.uint8(w & 0xFF)
        b[9 + g] = np.uint8((w >> 8) & 0xFF)
        b[17 + g] = np.uint8(w >> 16)


def _emit_fp6_codes(context, builder, arrty, arr, o):
    """The 32 codes of the FP6 block whose packed bytes start at arr[o], as 4 <8 x i32>: vector
    i holds elements 8i..8i+7, i.e. code i of the words p[g] | p[8+g] << 8 | p[16+g] << 16."""
    v8b = ir.VectorType(ir.IntType(8), 8)
    p = _element_ptr(context, builder, arrty, arr, o)
    words = None
    for k in range(3):
        pk = builder.gep(p, [ir.Constant(ir.IntType(64), 8 * k)])
        part = builder.zext(builder.load(builder.bitcast(pk, v8b.as_pointer()), align=1), _V8I)
        part = builder.shl(part, ir.Constant(_V8I, [8 * k] * 8))
        words = part if words is None else builder.or_(words, part)
    return [builder.and_(builder.lshr(words, ir.Constant(_V8I, [6 * i] * 8)), ir.Constant(_V8I, [63] * 8))
            for i in range(4)]


def _emit_fp8_codes(context, builder, arrty, arr, o):
    """The 32 one-byte codes at arr[o:o+32] as 4 <8 x i32>."""
    v8b = ir.VectorType(ir.IntType(8), 8)
    p = _element_ptr(context, builder, arrty, arr, o)
    return [builder.zext(builder.load(builder.bitcast(builder.gep(p, [ir.Constant(ir.IntType(64), 8 * i)]),
                                                      v8b.as_pointer()), align=1), _V8I) for i in range(4)]


def _block_kernels(fmt, codes):
    """Two intrinsics over one block of 32 codes read by codes(context, builder, arrty, arr, o):
    dot8(q, o, x, xo) -> f32x8 lane partial sums of sum_j value_j * x[xo + j], and
    decode(q, o, d, out): out[0:32] = d * value_j."""

    @intrinsic
    def dot8(typingctx, q, o, x, xo):
        def codegen(context, builder, sig, args):
            q, o, x, xo = args
            px = _element_ptr(context, builder, sig.args[2], x, xo)
            total = None
            for i, c in enumerate(codes(context, builder, sig.args[0], q, o)):
                xp = builder.gep(px, [ir.Constant(ir.IntType(64), 8 * i)])
                xv = builder.load(builder.bitcast(xp, _V8F.as_pointer()), align=4)
                prod = builder.fmul(_emit_decode(builder, c, fmt), xv, flags=_FLAGS)
                total = prod if total is None else builder.fadd(total, prod, flags=_FLAGS)
            return total

        return f32x8(q, o, x, xo), codegen

    @intrinsic
    def decode(typingctx, q, o, d, out):
        def codegen(context, builder, sig, args):
            q, o, d, out = args
            po = _element_ptr(context, builder, sig.args[3], out, ir.Constant(ir.IntType(64), 0))
            dv = builder.insert_element(ir.Constant(_V8F, ir.Undefined), d, ir.Constant(ir.IntType(32), 0))
            dv = builder.shuffle_vector(dv, dv, ir.Constant(_V8I, [0] * 8))
            for i, c in enumerate(codes(context, builder, sig.args[0], q, o)):
                pi = builder.gep(po, [ir.Constant(ir.IntType(64), 8 * i)])
                builder.store(builder.fmul(dv, _emit_decode(builder, c, fmt)), builder.bitcast(pi, _V8F.as_pointer()),
                              align=4)
            return context.get_dummy_value()

        return types.none(q, o, types.float32, out), codegen

    return dot8, decode


_e4m3_dot8, _e4m3_decode = _block_kernels(E4M3, _emit_fp8_codes)
_e5m2_dot8, _e5m2_decode = _block_kernels(E5M2, _emit_fp8_codes)
_fp6_dot8, _fp6_decode = _block_kernels(E3M2, _emit_fp6_codes)


@njit(inline="always")
def decode_fp6_e3m2(b, out, f16):
    _fp6_decode(b, 1, E8M0_TABLE[b[0]], out)


# -- NF4 ------------------------------------------------------------------------------------------

@njit(cache=True)
def quantize_nf4(x, b):
    amax = min(_finite_absmax(x), np.float32(65504.0))
    h = f32_to_f16(amax)
    b[0] = np.uint8(h & 0xFF)
    b[1] = np.uint8(h >> 8)
    d = np.float64(F16_TABLE[h])
    if d == 0.0:
        for j in range(32):
            b[2 + j] = np.uint8(0x77)  # code 7 (0.0) everywhere
        return
    t = np.empty(15, dtype=np.float64)
    for k in range(15):
        t[k] = d * NF4_MIDPOINTS[k]  # exact: 11-bit d times a 25-bit midpoint
    for j in range(32):
        lo = 7  # NaN stays 0.0 (quantize() refuses it before it gets here)
        hi = 7
        v0 = np.float64(x[j])
        v1 = np.float64(x[32 + j])
        if v0 == v0:
            lo = 0
            for k in range(15):
                lo += 1 if v0 > t[k] else 0  # a value on a boundary goes to the lower code
        if v1 == v1:
            hi = 0
            for k in range(15):
                hi += 1 if v1 > t[k] else 0
        b[2 + j] = np.uint8(lo | (hi << 4))


@njit(inline="always")
def decode_nf4(b, out, f16):
    d = f16[np.int64(b[0]) | (np.int64(b[1]) << 8)]
    for j in range(32):
        out[j] = d * NF4_VALUES[b[2 + j] & 15]
        out[j + 32] = d * NF4_VALUES[b[2 + j] >> 4]


# -- MXFP4 (ggml's) -------------------------------------------------------------------------------

@njit(inline="always")
def e8m0_half(e):
    """ggml_e8m0_to_fp32_half (ggml-impl.h): 2^(e-128) as float32 bits, no NaN for e = 255."""
    if e < 2:
        return _bits_f32(np.int64(0x00200000) << e)
    return _bits_f32((e - 1) << 23)


@njit(cache=True)
def quantize_mxfp4(x, b):
    # ggml-quants.c quantize_row_mxfp4_ref, in float32 step for step
    amax = np.float32(0.0)
    for j in range(32):
        if amax < abs(x[j]):
            amax = abs(x[j])
    e = np.int64(0)
    if amax > np.float32(0.0):
        e = max(0, np.int64(np.floor(np.log2(amax))) - 2 + 127)  # np.log2 of a float32 is libm's log2f
    b[0] = np.uint8(e)
    d = e8m0_half(e)
    for j in range(16):
        b[1 + j] = np.uint8(_mxfp4_best(x[j], d) | (_mxfp4_best(x[16 + j], d) << 4))


@njit(inline="always")
def _mxfp4_best(v, d):
    # best_index_mxfp4: the first index of the smallest |kvalue * d - v|
    best = 0
    best_err = abs(MXFP4_KVALUES_F32[0] * d - v)
    for i in range(1, 16):
        err = abs(MXFP4_KVALUES_F32[i] * d - v)
        if err < best_err:
            best = i
            best_err = err
    return best


@njit(inline="always")
def decode_mxfp4(b, out, f16):
    d = e8m0_half(np.int64(b[0]))
    for j in range(16):
        out[j] = MXFP4_KVALUES_F32[b[1 + j] & 15] * d
        out[j + 16] = MXFP4_KVALUES_F32[b[1 + j] >> 4] * d


# -- fused one-token dots -------------------------------------------------------------------------
# dot_<t>(row, f16, x, xs16) = sum_j w[j] x[j] for one row of raw blocks; xs16 (block sums of x)
# is unused: these types have no per-block offset. Their kernels must be compiled without
# "nnan"/"ninf" (FASTMATH below) for NaN/Inf codes to reach the result.

FASTMATH = {"reassoc", "contract", "nsz", "arcp"}  # vectorised float sums, IEEE NaN/Inf kept


@njit(inline="always")
def dot_fp8_e4m3(row, f16, x, xs16):
    acc = _zeros8()
    for b in range(row.shape[0] // 33):
        acc = _axpy8(E8M0_TABLE[row[33 * b]], _e4m3_dot8(row, 33 * b + 1, x, 32 * b), acc)
    return _sum8(acc)


@njit(inline="always")
def dot_fp8_e5m2(row, f16, x, xs16):
    acc = _zeros8()
    for b in range(row.shape[0] // 33):
        acc = _axpy8(E8M0_TABLE[row[33 * b]], _e5m2_dot8(row, 33 * b + 1, x, 32 * b), acc)
    return _sum8(acc)


@njit(inline="always")
def dot_fp6_e3m2(row, f16, x, xs16):
    acc = _zeros8()
    for b in range(row.shape[0] // 25):
        acc = _axpy8(E8M0_TABLE[row[25 * b]], _fp6_dot8(row, 25 * b + 1, x, 32 * b), acc)
    return _sum8(acc)


@njit(inline="always")
def _dot_nf4_portable(row, f16, x, xs16):
    acc = np.zeros(32, dtype=np.float32)
    for b in range(row.shape[0] // 34):
        o = 34 * b
        d = f16[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]
        for j in range(32):
            v = row[o + 2 + j]
            acc[j] += d * (NF4_VALUES[v & 15] * x[64 * b + j] + NF4_VALUES[v >> 4] * x[64 * b + 32 + j])
    return acc.sum()


@njit(inline="always")
def _dot_mxfp4_portable(row, f16, x, xs16):
    acc = np.zeros(16, dtype=np.float32)
    for b in range(row.shape[0] // 17):
        o = 17 * b
        d = e8m0_half(np.int64(row[o]))
        for j in range(16):
            v = row[o + 1 + j]
            acc[j] += d * (MXFP4_KVALUES_F32[v & 15] * x[32 * b + j] + MXFP4_KVALUES_F32[v >> 4] * x[32 * b + 16 + j])
    return acc.sum()


# -- AVX2: 16-entry float tables through vpermps -----------------------------------------------

def _lut16_dot(n):
    """An intrinsic (q, o, x, xo, tlo, thi) -> f32x8: lane partial sums of sum_j T[nib_j] x[xo+j]
    over 2n nibbles: the low nibbles of the n bytes q[o:o+n] pair with x[xo:xo+n], the high ones
    with x[xo+n:xo+2n]; T is the 16-entry table whose halves are the vectors tlo and thi."""

    @intrinsic
    def lut16_dot(typingctx, q, o, x, xo, tlo, thi):
        def codegen(context, builder, sig, args):
            q, o, x, xo, tlo, thi = args
            v8b = ir.VectorType(ir.IntType(8), 8)
            pq = _element_ptr(context, builder, sig.args[0], q, o)
            px = _element_ptr(context, builder, sig.args[2], x, xo)
            permps = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8F, [_V8F, _V8I]),
                                                    "llvm.x86.avx2.permps")
            parts = []
            for g in range(n // 8):
                # 8 bytes widened to 32-bit lanes (one vpmovzxbd), then their two nibbles
                pg = builder.gep(pq, [ir.Constant(ir.IntType(64), 8 * g)])
                raw = builder.zext(builder.load(builder.bitcast(pg, v8b.as_pointer()), align=1), _V8I)
                for h, idx in enumerate((builder.and_(raw, ir.Constant(_V8I, [15] * 8)),
                                         builder.lshr(raw, ir.Constant(_V8I, [4] * 8)))):
                    # vpermps uses the low 3 bits of each index; bit 3 picks the table half
                    w = builder.select(builder.icmp_unsigned(">", idx, ir.Constant(_V8I, [7] * 8)),
                                       builder.call(permps, [thi, idx]), builder.call(permps, [tlo, idx]))
                    xp = builder.gep(px, [ir.Constant(ir.IntType(64), n * h + 8 * g)])
                    parts.append(builder.fmul(w, builder.load(builder.bitcast(xp, _V8F.as_pointer()), align=4),
                                              flags=_FLAGS))
            while len(parts) > 1:
                parts = [builder.fadd(parts[i], parts[i + 1], flags=_FLAGS) for i in range(0, len(parts), 2)]
            return parts[0]

        return f32x8(q, o, x, xo, f32x8, f32x8), codegen

    return lut16_dot


_lut16_dot32 = _lut16_dot(32)
_lut16_dot16 = _lut16_dot(16)


@njit(inline="always")
def _dot_nf4_avx2(row, f16, x, xs16):
    tlo = _load8(NF4_VALUES, 0)
    thi = _load8(NF4_VALUES, 8)
    acc = _zeros8()
    for b in range(row.shape[0] // 34):
        o = 34 * b
        d = f16[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]
        acc = _axpy8(d, _lut16_dot32(row, o + 2, x, 64 * b, tlo, thi), acc)
    return _sum8(acc)


@njit(inline="always")
def _dot_mxfp4_avx2(row, f16, x, xs16):
    tlo = _load8(MXFP4_KVALUES_F32, 0)
    thi = _load8(MXFP4_KVALUES_F32, 8)
    acc = _zeros8()
    for b in range(row.shape[0] // 17):
        o = 17 * b
        acc = _axpy8(e8m0_half(np.int64(row[o])), _lut16_dot16(row, o + 1, x, 32 * b, tlo, thi), acc)
    return _sum8(acc)


# The table kernels only compile where the instruction exists; the choice is made once, here.
HAS_AVX2 = has("avx2")
dot_nf4 = _dot_nf4_avx2 if HAS_AVX2 else _dot_nf4_portable
dot_mxfp4 = _dot_mxfp4_avx2 if HAS_AVX2 else _dot_mxfp4_portable


# -- the block-type table's signatures (kernels/blocks.py) ---------------------------------------
# dot(row, act, t): row . token t of the float activation; quantize_row(x, row, f16).
# Module-level functions, one per type, so that each has its own place in Numba's cache.

_NO_SUMS = np.zeros(0, dtype=np.float32)


@njit(inline="always")
def table_dot_mxfp4(row, act, t):
    return dot_mxfp4(row, F16_TABLE, act.xf[t], _NO_SUMS)


@njit(inline="always")
def table_dot_fp8_e4m3(row, act, t):
    return dot_fp8_e4m3(row, F16_TABLE, act.xf[t], _NO_SUMS)


@njit(inline="always")
def table_dot_fp8_e5m2(row, act, t):
    return dot_fp8_e5m2(row, F16_TABLE, act.xf[t], _NO_SUMS)


@njit(inline="always")
def table_dot_fp6_e3m2(row, act, t):
    return dot_fp6_e3m2(row, F16_TABLE, act.xf[t], _NO_SUMS)


@njit(error_model="numpy")
def row_mxfp4(x, b, f16):
    for i in range(x.shape[0] // 32):
        quantize_mxfp4(x[32 * i:32 * i + 32], b[17 * i:17 * i + 17])


@njit(error_model="numpy")
def row_nf4(x, b, f16):
    for i in range(x.shape[0] // 64):
        quantize_nf4(x[64 * i:64 * i + 64], b[34 * i:34 * i + 34])


@njit(error_model="numpy")
def row_fp8_e4m3(x, b, f16):
    for i in range(x.shape[0] // 32):
        quantize_fp8_e4m3(x[32 * i:32 * i + 32], b[33 * i:33 * i + 33])


@njit(error_model="numpy")
def row_fp8_e5m2(x, b, f16):
    for i in range(x.shape[0] // 32):
        quantize_fp8_e5m2(x[32 * i:32 * i + 32], b[33 * i:33 * i + 33])


@njit(error_model="numpy")
def row_fp6_e3m2(x, b, f16):
    for i in range(x.shape[0] // 32):
        quantize_fp6_e3m2(x[32 * i:32 * i + 32], b[25 * i:25 * i + 25])


# -- the types ------------------------------------------------------------------------------------

class LowbitType:
    """One block type's kernels and facts, as the block-type table needs them."""

    def __init__(self, qtype, decode, dot, quantize, nan_ok, inf_ok, dot_portable=None, table_dot=None,
                 quantize_row=None):
        self.qtype = GGMLType(qtype)
        self.block, self.nbytes = BLOCK_SIZE[self.qtype]
        self.decode, self.dot, self.quantize = decode, dot, quantize
        self.table_dot, self.quantize_row = table_dot, quantize_row  # the block-type table's kernels
        self.dot_portable = dot_portable or dot  # the dot without SIMD intrinsics
        # whether quantize() takes NaN (stored as a NaN code) and Inf (stored, or saturated)
        self.nan_ok, self.inf_ok = nan_ok, inf_ok

    def __repr__(self):
        return f"LowbitType({self.qtype.name}, {self.block} values in {self.nbytes} bytes)"


T = GGMLType
TYPES = {
    T.MXFP4: LowbitType(T.MXFP4, decode_mxfp4, dot_mxfp4, quantize_mxfp4, False, False, _dot_mxfp4_portable,
                        table_dot_mxfp4, row_mxfp4),
    T.NF4: LowbitType(T.NF4, decode_nf4, dot_nf4, quantize_nf4, False, True, _dot_nf4_portable, None, row_nf4),
    T.FP8_E4M3: LowbitType(T.FP8_E4M3, decode_fp8_e4m3, dot_fp8_e4m3, quantize_fp8_e4m3, True, True, None,
                           table_dot_fp8_e4m3, row_fp8_e4m3),
    T.FP8_E5M2: LowbitType(T.FP8_E5M2, decode_fp8_e5m2, dot_fp8_e5m2, quantize_fp8_e5m2, True, True, None,
                           table_dot_fp8_e5m2, row_fp8_e5m2),
    T.FP6_E3M2: LowbitType(T.FP6_E3M2, decode_fp6_e3m2, dot_fp6_e3m2, quantize_fp6_e3m2, False, True, None,
                           table_dot_fp6_e3m2, row_fp6_e3m2),
}


def lowbit_type(qtype) -> LowbitType:
    try:
        return TYPES[GGMLType(int(qtype))]
    except (KeyError, ValueError):
        raise ValueError(f"{qtype} is not a low-bit float type ({', '.join(t.name for t in TYPES)})") from None


# -- whole tensors (tests, benchmarks; the block-type table will supersede these) ----------------
# Plain if-chains on the type id, as in quants.py: a kernel that takes the block function as an
# argument would be typed by the function object's identity and miss Numba's disk cache.

@njit(inline="always")
def _decode_row(row, qtype, f16, out):
    if qtype == 39:
        for i in range(out.shape[0] // 32):
            decode_mxfp4(row[17 * i:17 * i + 17], out[32 * i:32 * i + 32], f16)
    elif qtype == 1000:
        for i in range(out.shape[0] // 64):
            decode_nf4(row[34 * i:34 * i + 34], out[64 * i:64 * i + 64], f16)
    elif qtype == 1001:
        for i in range(out.shape[0] // 32):
            decode_fp8_e4m3(row[33 * i:33 * i + 33], out[32 * i:32 * i + 32], f16)
    elif qtype == 1002:
        for i in range(out.shape[0] // 32):
            decode_fp8_e5m2(row[33 * i:33 * i + 33], out[32 * i:32 * i + 32], f16)
    elif qtype == 1003:
        for i in range(out.shape[0] // 32):
            decode_fp6_e3m2(row[25 * i:25 * i + 25], out[32 * i:32 * i + 32], f16)


@njit(inline="always")
def _quantize_row(x, qtype, out):
    if qtype == 39:
        for i in range(x.shape[0] // 32):
            quantize_mxfp4(x[32 * i:32 * i + 32], out[17 * i:17 * i + 17])
    elif qtype == 1000:
        for i in range(x.shape[0] // 64):
            quantize_nf4(x[64 * i:64 * i + 64], out[34 * i:34 * i + 34])
    elif qtype == 1001:
        for i in range(x.shape[0] // 32):
            quantize_fp8_e4m3(x[32 * i:32 * i + 32], out[33 * i:33 * i + 33])
    elif qtype == 1002:
        for i in range(x.shape[0] // 32):
            quantize_fp8_e5m2(x[32 * i:32 * i + 32], out[33 * i:33 * i + 33])
    elif qtype == 1003:
        for i in range(x.shape[0] // 32):
            quantize_fp6_e3m2(x[32 * i:32 * i + 32], out[25 * i:25 * i + 25])


@njit(cache=True, parallel=True)
def _dequantize_rows(data, qtype, f16, out):
    for r in prange(data.shape[0]):
        _decode_row(data[r], qtype, f16, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def _quantize_rows(x, qtype, out):
    for r in prange(x.shape[0]):
        _quantize_row(x[r], qtype, out[r])


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _matvec(data, qtype, f16, x, out):
    xs16 = np.zeros(0, dtype=np.float32)  # unused by these types
    for r in prange(data.shape[0]):
        row = data[r]
        if qtype == 39:
            out[r] = dot_mxfp4(row, f16, x, xs16)
        elif qtype == 1000:
            out[r] = dot_nf4(row, f16, x, xs16)
        elif qtype == 1001:
            out[r] = dot_fp8_e4m3(row, f16, x, xs16)
        elif qtype == 1002:
            out[r] = dot_fp8_e5m2(row, f16, x, xs16)
        elif qtype == 1003:
            out[r] = dot_fp6_e3m2(row, f16, x, xs16)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _matvec_portable(data, qtype, f16, x, out):
    xs16 = np.zeros(0, dtype=np.float32)
    for r in prange(data.shape[0]):
        if qtype == 39:
            out[r] = _dot_mxfp4_portable(data[r], f16, x, xs16)
        elif qtype == 1000:
            out[r] = _dot_nf4_portable(data[r], f16, x, xs16)


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view: Numba types read-only and writable arrays apart, so inputs from a
    memory map and from memory would each compile the kernels once more (minutes, all types)."""
    v = a.view()
    v.flags.writeable = False
    return v


def check_storable(x: np.ndarray, qtype):
    """Raise ValueError when x holds values the type cannot store: NaN where it has no NaN code,
    Inf for MXFP4 (ggml's reference has no defined result for it). The block quantizers never
    check; whatever quantizes whole tensors calls this first."""
    t = lowbit_type(qtype)
    if not t.nan_ok and np.isnan(x).any():
        raise ValueError(f"NaN values cannot be stored as {t.qtype.name}")
    if not t.inf_ok and np.isinf(x).any():
        raise ValueError(f"infinite values cannot be stored as {t.qtype.name}")


def dequantize(data: np.ndarray, qtype, cols: int) -> np.ndarray:
    """Raw blocks uint8 (rows, row_bytes) -> float32 (rows, cols)."""
    t = lowbit_type(qtype)
    data = _readonly(np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, row_bytes(t.qtype, cols)))
    out = np.empty((data.shape[0], cols), dtype=np.float32)
    if out.size:
        _dequantize_rows(data, int(t.qtype), F16_TABLE, out)
    return out


def quantize(x: np.ndarray, qtype) -> np.ndarray:
    """float32 (rows, cols) (the last axis is the row) -> raw blocks uint8 (rows, row_bytes).

    Raises ValueError for a row length that is not a block multiple, and for values the type
    cannot store (NaN without a NaN code; Inf for MXFP4)."""
    t = lowbit_type(qtype)
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("quantize needs at least a 1-D array")
    cols = x.shape[-1]
    rb = row_bytes(t.qtype, cols)
    x2 = _readonly(np.ascontiguousarray(x.reshape(-1, cols), dtype=np.float32))
    check_storable(x2, t.qtype)
    out = np.empty((x2.shape[0], rb), dtype=np.uint8)
    if x2.size:
        _quantize_rows(x2, int(t.qtype), out)
    return out.reshape(*x.shape[:-1], rb)


def matvec(data: np.ndarray, qtype, x: np.ndarray, portable: bool = False) -> np.ndarray:
    """W x for raw blocks W uint8 (rows, row_bytes) and x float32 (cols,): (rows,) float32,
    through the fused dot (portable=True: the table-load one that needs no AVX2, where the
    type has one)."""
    t = lowbit_type(qtype)
    x = _readonly(np.ascontiguousarray(x, dtype=np.float32))
    data = _readonly(np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, row_bytes(t.qtype, x.shape[0])))
    out = np.empty(data.shape[0], dtype=np.float32)
    kernel = _matvec_portable if portable and t.dot_portable is not t.dot else _matvec
    kernel(data, int(t.qtype), F16_TABLE, x, out)
    return out
