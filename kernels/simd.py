"""SIMD vectors inside Numba: LLVM vector types and x86 instructions as Numba intrinsics.

Numba has no vector types, so we add them: `I8x32`, `I16x16`, `I32x8` and `F32x8` are
Numba types whose LLVM representation is <32 x i8>, <16 x i16>, <8 x i32>, <8 x float>
(one 256-bit register each). The functions below are `@intrinsic`s: their code is LLVM IR
emitted straight into the calling kernel, so a kernel written with them reads like C with
immintrin.h and compiles to the instructions named (kernels/cpu.py decides which exist).

Two kinds of operation:

- portable: loads, stores, integer and float lane arithmetic, shuffles, int->float. These are
  plain LLVM instructions; LLVM selects AVX2 instructions for them on an AVX2 host and SSE
  sequences elsewhere, so they are safe on every x86-64.
- instruction-specific: `maddubs` (vpmaddubsw), `madd` (vpmaddwd), `sign` (vpsignb),
  `shuffle_bytes` (vpshufb) need AVX2; `dpbusd` (vpdpbusd) needs AVX-512 VNNI + VL or AVX-VNNI; `load_f16x8` lowers to
  vcvtph2ps and needs F16C. Compiling one of them for a host that lacks it makes LLVM abort
  the process, so kernels that use them are only compiled when `cpu.has(...)` says so.

Every instruction-specific intrinsic has a numpy model in kernels/simd_model.py, which the
tests hold both the portable kernels and (where the host runs it) the instruction to.
"""

from llvmlite import ir
from numba.core import types
from numba.core.datamodel.models import PrimitiveModel
from numba.extending import intrinsic, register_model


class Vec(types.Type):
    """A 256-bit LLVM vector of n lanes of kind 'i' (integer) or 'f' (float32)."""

    def __init__(self, kind: str, bits: int, n: int):
        self.kind, self.bits, self.n = kind, bits, n
        super().__init__(name=f"vec_{kind}{bits}x{n}")


I8x32 = Vec("i", 8, 32)
I16x16 = Vec("i", 16, 16)
I32x8 = Vec("i", 32, 8)
F32x8 = Vec("f", 32, 8)


@register_model(Vec)
class _VecModel(PrimitiveModel):
    def __init__(self, dmm, fe_type):
        elem = ir.FloatType() if fe_type.kind == "f" else ir.IntType(fe_type.bits)
        super().__init__(dmm, fe_type, ir.VectorType(elem, fe_type.n))


def _llvm(t: Vec) -> ir.VectorType:
    return ir.VectorType(ir.FloatType() if t.kind == "f" else ir.IntType(t.bits), t.n)


def _address(context, builder, arrty, arr, index, vecty):
    """Pointer to arr[index] (element index of a C-contiguous array), as a vecty*."""
    a = context.make_array(arrty)(context, builder, arr)
    ptr = builder.gep(a.data, [index])
    return builder.bitcast(ptr, vecty.as_pointer())


def _is_index(t):
    return isinstance(t, types.Integer)


def _is_byte_array(t):
    return isinstance(t, types.Array) and t.dtype in (types.uint8, types.int8) and t.layout == "C"


def _call(builder, name, retty, args):
    fnty = ir.FunctionType(retty, [a.type for a in args])
    module = builder.module
    fn = module.globals.get(name) or ir.Function(module, fnty, name=name)
    return builder.call(fn, args)


def _const_vec(vecty, value):
    return ir.Constant(vecty, [ir.Constant(vecty.element, value)] * vecty.count)


def _int(builder, v, bits, signed=True):
    """Integer value v truncated or extended to `bits` bits."""
    w = v.type.width
    if w > bits:
        return builder.trunc(v, ir.IntType(bits))
    if w < bits:
        return (builder.sext if signed else builder.zext)(v, ir.IntType(bits))
    return v


def _splat(builder, vecty, scalar):
    """A vector of vecty with every lane = scalar (insertelement + shuffle: vpbroadcast)."""
    undef = ir.Constant(vecty, ir.Undefined)
    one = builder.insert_element(undef, scalar, ir.Constant(ir.IntType(32), 0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), vecty.count), [0] * vecty.count)
    return builder.shuffle_vector(one, undef, zeros)


def _bcast32(vec, align):
    """Codegen: the 32 bits at element i of an array, in every 32-bit lane of a vec."""

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        w = builder.load(_address(context, builder, sig.args[0], args[0], args[1], i32), align=align)
        return builder.bitcast(_splat(builder, _llvm(I32x8), w), _llvm(vec))

    return codegen


# -- loads and stores (portable) --------------------------------------------------------


@intrinsic
def load_i8x32(typingctx, arr, i):
    """32 bytes of a uint8/int8 array from element i (unaligned)."""
    if not (_is_byte_array(arr) and _is_index(i)):
        return None

    def codegen(context, builder, sig, args):
        vt = _llvm(I8x32)
        p = _address(context, builder, sig.args[0], args[0], args[1], vt)
        return builder.load(p, align=1)

    return I8x32(arr, i), codegen


@intrinsic
def load_nibbles(typingctx, arr, i):
    """16 bytes from element i as 32 lanes: their low nibbles, then their high nibbles (0..15)."""
    if not (_is_byte_array(arr) and _is_index(i)):
        return None

    def codegen(context, builder, sig, args):
        v16 = ir.VectorType(ir.IntType(8), 16)
        p = _address(context, builder, sig.args[0], args[0], args[1], v16)
        v = builder.load(p, align=1)
        lo = builder.and_(v, _const_vec(v16, 15))
        hi = builder.lshr(v, _const_vec(v16, 4))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32)))
        return builder.shuffle_vector(lo, hi, mask)

    return I8x32(arr, i), codegen


@intrinsic
def load_i8x16_pair(typingctx, arr, i, j):
    """16 bytes from element i and 16 from element j, as one 32-lane vector."""
    if not (_is_byte_array(arr) and _is_index(i) and _is_index(j)):
        return None

    def codegen(context, builder, sig, args):
        v16 = ir.VectorType(ir.IntType(8), 16)
        a = builder.load(_address(context, builder, sig.args[0], args[0], args[1], v16), align=1)
        b = builder.load(_address(context, builder, sig.args[0], args[0], args[2], v16), align=1)
        mask = ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32)))
        return builder.shuffle_vector(a, b, mask)

    return I8x32(arr, i, j), codegen


@intrinsic
def load_f32x8(typingctx, arr, i):
    """8 float32 from element i of a float32 array."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.layout == "C" and _is_index(i)):
        return None

    def codegen(context, builder, sig, args):
        vt = _llvm(F32x8)
        return builder.load(_address(context, builder, sig.args[0], args[0], args[1], vt), align=4)

    return F32x8(arr, i), codegen


@intrinsic
def load_f32x8_bytes(typingctx, arr, i):
    """8 float32 from byte i of a uint8 array (rows of F32 weights are bytes, as all rows are:
    a view of each row as float32 in the loop would cost an array object per load)."""
    if not (_is_byte_array(arr) and _is_index(i)):
        return None

    def codegen(context, builder, sig, args):
        vt = _llvm(F32x8)
        return builder.load(_address(context, builder, sig.args[0], args[0], args[1], vt), align=1)

    return F32x8(arr, i), codegen


@intrinsic
def f32_at(typingctx, arr, i):
    """The float32 at byte i of a uint8 array."""
    if not (_is_byte_array(arr) and _is_index(i)):
        return None

    def codegen(context, builder, sig, args):
        p = _address(context, builder, sig.args[0], args[0], args[1], ir.FloatType())
        return builder.load(p, align=1)

    return types.float32(arr, i), codegen


@intrinsic
def store_f32x8(typingctx, arr, i, v):
    if not (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.layout == "C" and v == F32x8):
        return None

    def codegen(context, builder, sig, args):
        vt = _llvm(F32x8)
        builder.store(args[2], _address(context, builder, sig.args[0], args[0], args[1], vt), align=4)
        return context.get_dummy_value()

    return types.none(arr, i, v), codegen


@intrinsic
def load_f16x8(typingctx, arr, i):
    """8 IEEE halves from byte i of a uint8 array, widened to float32 (vcvtph2ps: needs F16C)."""
    if not (_is_byte_array(arr) and _is_index(i)):
        return None

    def codegen(context, builder, sig, args):
        vh = ir.VectorType(ir.HalfType(), 8)
        h = builder.load(_address(context, builder, sig.args[0], args[0], args[1], vh), align=1)
        return builder.fpext(h, _llvm(F32x8))

    return F32x8(arr, i), codegen


@intrinsic
def load_bf16x8(typingctx, arr, i):
    """8 bfloat16 from byte i of a uint8 array, widened to float32 (a 16-bit shift: portable)."""
    if not (_is_byte_array(arr) and _is_index(i)):
        return None

    def codegen(context, builder, sig, args):
        v16 = ir.VectorType(ir.IntType(16), 8)
        h = builder.load(_address(context, builder, sig.args[0], args[0], args[1], v16), align=1)
        w = builder.shl(builder.zext(h, _llvm(I32x8)), _const_vec(_llvm(I32x8), 16))
        return builder.bitcast(w, _llvm(F32x8))

    return F32x8(arr, i), codegen


@intrinsic
def f16_at(typingctx, arr, i):
    """The IEEE half at byte i of a uint8 array as float32 (vcvtph2ps: needs F16C)."""
    if not (_is_byte_array(arr) and _is_index(i)):
        return None

    def codegen(context, builder, sig, args):
        p = _address(context, builder, sig.args[0], args[0], args[1], ir.HalfType())
        return builder.fpext(builder.load(p, align=1), ir.FloatType())

    return types.float32(arr, i), codegen


# -- constants and lane arithmetic (portable) -------------------------------------------


@intrinsic
def splat_i8(typingctx, c):
    if not _is_index(c):
        return None

    def codegen(context, builder, sig, args):
        return _splat(builder, _llvm(I8x32), _int(builder, args[0], 8))

    return I8x32(c), codegen


@intrinsic
def splat_i16(typingctx, c):
    if not _is_index(c):
        return None

    def codegen(context, builder, sig, args):
        return _splat(builder, _llvm(I16x16), _int(builder, args[0], 16))

    return I16x16(c), codegen


@intrinsic
def splat_f32(typingctx, x):
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, sig, args):
        v = args[0] if sig.args[0] == types.float32 else builder.fptrunc(args[0], ir.FloatType())
        return _splat(builder, _llvm(F32x8), v)

    return F32x8(x), codegen


def _zero(vec):
    @intrinsic
    def zero(typingctx):
        def codegen(context, builder, sig, args):
            return ir.Constant(_llvm(vec), None)

        return vec(), codegen

    return zero


zero_f32 = _zero(F32x8)
zero_i32 = _zero(I32x8)


def _binary(op):
    @intrinsic
    def binary(typingctx, a, b):
        if not (isinstance(a, Vec) and a == b) or (op in ("and_", "or_", "xor") and a.kind == "f"):
            return None

        def codegen(context, builder, sig, args):
            name = {"add": "fadd", "sub": "fsub", "mul": "fmul"}.get(op, op) if a.kind == "f" else op
            return getattr(builder, name)(args[0], args[1])

        return a(a, b), codegen

    return binary


vadd = _binary("add")
vsub = _binary("sub")
vmul = _binary("mul")
vand = _binary("and_")
vor = _binary("or_")


def _shift(op):
    @intrinsic
    def shift(typingctx, a, n):
        if not (isinstance(a, Vec) and a.kind == "i" and isinstance(n, types.Integer)):
            return None
        count = n.literal_value if isinstance(n, types.IntegerLiteral) else None

        def codegen(context, builder, sig, args):
            vt = _llvm(a)
            if count is not None:
                return getattr(builder, op)(args[0], _const_vec(vt, count))
            return getattr(builder, op)(args[0], _splat(builder, vt, _int(builder, args[1], vt.element.width)))

        return a(a, n), codegen

    return shift


vshl = _shift("shl")  # lane-wise shifts (by a constant once inlined); on bytes LLVM emits vpsllw/vpsrlw + a mask
vshr = _shift("lshr")


@intrinsic
def cvt_f32(typingctx, a):
    """int32 lanes -> float32 lanes (vcvtdq2ps)."""
    if a != I32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], _llvm(F32x8))

    return F32x8(a), codegen


@intrinsic
def fmadd(typingctx, a, b, c):
    """a*b + c lane-wise, fused where the target has FMA (llvm.fmuladd)."""
    if not (a == b == c == F32x8):
        return None

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.fmuladd.v8f32", _llvm(F32x8), list(args))

    return F32x8(a, b, c), codegen


@intrinsic
def hsum_f32(typingctx, a):
    """Sum of the 8 lanes: (0+4, 1+5, 2+6, 3+7), then pairs, then the last two, as ggml's hsum_float_8."""
    if a != F32x8:
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        undef = ir.Constant(v.type, ir.Undefined)
        for mask in ([4, 5, 6, 7, 0, 0, 0, 0], [2, 3, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]):
            v = builder.fadd(v, builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(ir.IntType(32), 8), mask)))
        return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))

    return types.float32(a), codegen


@intrinsic
def hsum_i32(typingctx, a):
    if a != I32x8:
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        undef = ir.Constant(v.type, ir.Undefined)
        for mask in ([4, 5, 6, 7, 0, 0, 0, 0], [2, 3, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]):
            v = builder.add(v, builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(ir.IntType(32), 8), mask)))
        return builder.sext(builder.extract_element(v, ir.Constant(ir.IntType(32), 0)), ir.IntType(64))

    return types.int64(a), codegen


@intrinsic
def lane_f32(typingctx, a, k):
    if not (a == F32x8 and _is_index(k)):
        return None

    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], args[1])

    return types.float32(a, k), codegen


# -- x86 instructions -------------------------------------------------------------------
# The emit_* functions write one instruction's LLVM IR; the intrinsics below use them inside
# Numba, and kernels/asm.py uses the same ones to compile standalone for other CPUs.


def emit_maddubs(builder, u, s):
    """vpmaddubsw (AVX2): <32 x i8> unsigned x <32 x i8> signed -> <16 x i16>, pairs added, saturated."""
    return _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _llvm(I16x16), [u, s])


def emit_madd(builder, a, b):
    """vpmaddwd (AVX2): <16 x i16> x <16 x i16> -> <8 x i32>, pairs added."""
    return _call(builder, "llvm.x86.avx2.pmadd.wd", _llvm(I32x8), [a, b])


def emit_sign(builder, a, b):
    """vpsignb (AVX2)."""
    return _call(builder, "llvm.x86.avx2.psign.b", _llvm(I8x32), [a, b])


def emit_shuffle_bytes(builder, table, idx):
    """vpshufb (AVX2): byte i of each 128-bit half = table[that half][idx[i] & 15], 0 where idx[i] < 0."""
    return _call(builder, "llvm.x86.avx2.pshuf.b", _llvm(I8x32), [table, idx])


def emit_dpbusd(builder, acc, u, s):
    """vpdpbusd (AVX-512 VNNI + VL, 256-bit): <8 x i32> + 4-byte dot products of u (unsigned) and s."""
    vt = _llvm(I32x8)
    return _call(builder, "llvm.x86.avx512.vpdpbusd.256", vt, [acc, builder.bitcast(u, vt), builder.bitcast(s, vt)])


class _BFloat(ir.Type):
    """LLVM's bfloat, which llvmlite.ir does not spell (its IR is text; this is the word)."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


def emit_dpbf16ps(builder, acc, a, b):
    """vdpbf16ps (AVX-512 BF16 + VL, 256-bit): <8 x float> + pairs of bf16 products; a, b are
    <16 x i16> raw bf16 bits."""
    vb = ir.VectorType(_BFloat(), 16)
    return _call(builder, "llvm.x86.avx512bf16.dpbf16ps.256", _llvm(F32x8),
                 [acc, builder.bitcast(a, vb), builder.bitcast(b, vb)])


@intrinsic
def maddubs(typingctx, u, s):
    """vpmaddubsw: unsigned bytes of u times signed bytes of s, adjacent pairs added with
    signed int16 saturation -> 16 int16 lanes. AVX2."""
    if not (u == s == I8x32):
        return None

    def codegen(context, builder, sig, args):
        return emit_maddubs(builder, *args)

    return I16x16(u, s), codegen


@intrinsic
def madd(typingctx, a, b):
    """vpmaddwd: int16 lanes multiplied, adjacent pairs added -> 8 int32 lanes. AVX2."""
    if not (a == b == I16x16):
        return None

    def codegen(context, builder, sig, args):
        return emit_madd(builder, *args)

    return I32x8(a, b), codegen


@intrinsic
def sign(typingctx, a, b):
    """vpsignb: a's lanes negated where b's are negative, zeroed where b's are zero. AVX2."""
    if not (a == b == I8x32):
        return None

    def codegen(context, builder, sig, args):
        return emit_sign(builder, *args)

    return I8x32(a, b), codegen


@intrinsic
def shuffle_bytes(typingctx, table, idx):
    """vpshufb: a 16-entry byte table lookup in each 128-bit half (table: the 16 entries
    twice; idx lanes 0..15 pick one, a negative lane gives 0). AVX2."""
    if not (table == idx == I8x32):
        return None

    def codegen(context, builder, sig, args):
        return emit_shuffle_bytes(builder, *args)

    return I8x32(table, idx), codegen


@intrinsic
def dpbusd(typingctx, acc, u, s):
    """vpdpbusd: acc + sum of 4 (unsigned byte of u x signed byte of s) per int32 lane, no
    intermediate saturation. AVX-512 VNNI with VL."""
    if not (acc == I32x8 and u == s == I8x32):
        return None

    def codegen(context, builder, sig, args):
        return emit_dpbusd(builder, *args)

    return I32x8(acc, u, s), codegen


@intrinsic
def store(typingctx, arr, i, v):
    """Store vector v at element i of an array of its lane type (int8, int16, int32, float32)."""
    lane = {I8x32: (types.int8, types.uint8), I16x16: (types.int16,), I32x8: (types.int32,), F32x8: (types.float32,)}
    if not (isinstance(v, Vec) and isinstance(arr, types.Array) and arr.layout == "C" and arr.dtype in lane[v]):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _address(context, builder, sig.args[0], args[0], args[1], _llvm(v)), align=1)
        return context.get_dummy_value()

    return types.none(arr, i, v), codegen


# -- scalar bit casts (portable) ----------------------------------------------------------


@intrinsic
def f32_from_bits(typingctx, u):
    """The float32 whose IEEE bits are the low 32 bits of integer u."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(_int(builder, args[0], 32, signed=False), ir.FloatType())

    return types.float32(u), codegen


# -- more loads and lane shuffles (portable) ----------------------------------------------


@intrinsic
def load_i16x16(typingctx, arr, i):
    """16 int16 from element i of an int16 array."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int16 and arr.layout == "C" and _is_index(i)):
        return None

    def codegen(context, builder, sig, args):
        vt = _llvm(I16x16)
        return builder.load(_address(context, builder, sig.args[0], args[0], args[1], vt), align=2)

    return I16x16(arr, i), codegen


@intrinsic
def load_i8x16_as_i16(typingctx, arr, i):
    """16 signed bytes from element i, sign-extended to 16 int16 lanes (vpmovsxbw)."""
    if not (_is_byte_array(arr) and _is_index(i)):
        return None

    def codegen(context, builder, sig, args):
        v16 = ir.VectorType(ir.IntType(8), 16)
        v = builder.load(_address(context, builder, sig.args[0], args[0], args[1], v16), align=1)
        return builder.sext(v, _llvm(I16x16))

    return I16x16(arr, i), codegen


@intrinsic
def load_u8x16_as_i16(typingctx, arr, i):
    """16 unsigned bytes from element i, zero-extended to 16 int16 lanes (vpmovzxbw)."""
    if not (_is_byte_array(arr) and _is_index(i)):
        return None

    def codegen(context, builder, sig, args):
        v16 = ir.VectorType(ir.IntType(8), 16)
        v = builder.load(_address(context, builder, sig.args[0], args[0], args[1], v16), align=1)
        return builder.zext(v, _llvm(I16x16))

    return I16x16(arr, i), codegen


@intrinsic
def load_u8x8_twice_i16(typingctx, arr, i):
    """8 unsigned bytes from element i, byte k zero-extended into int16 lanes 2k and 2k+1: a
    value per int32 lane (per row of an interleaved layout) for madd to multiply a pair by."""
    if not (_is_byte_array(arr) and _is_index(i)):
        return None

    def codegen(context, builder, sig, args):
        v8 = ir.VectorType(ir.IntType(8), 8)
        v = builder.load(_address(context, builder, sig.args[0], args[0], args[1], v8), align=1)
        w = builder.zext(v, ir.VectorType(ir.IntType(16), 8))
        twice = ir.Constant(ir.VectorType(ir.IntType(32), 16), [k // 2 for k in range(16)])
        return builder.shuffle_vector(w, ir.Constant(w.type, ir.Undefined), twice)

    return I16x16(arr, i), codegen


@intrinsic
def bcast_i16x2(typingctx, arr, i):
    """arr[i], arr[i + 1] of an int16 array, repeated in all eight pairs of int16 lanes (vpbroadcastd)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int16 and arr.layout == "C" and _is_index(i)):
        return None
    return I16x16(arr, i), _bcast32(I16x16, 2)


@intrinsic
def u32x4_as_i16(typingctx, a, b, c, d):
    """The 16 bytes of four uint32 (little-endian, a first), zero-extended to 16 int16 lanes."""
    if not all(isinstance(v, types.Integer) for v in (a, b, c, d)):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        v = ir.Constant(ir.VectorType(i32, 4), ir.Undefined)
        for k, x in enumerate(args):
            v = builder.insert_element(v, _int(builder, x, 32, signed=False), ir.Constant(i32, k))
        return builder.zext(builder.bitcast(v, ir.VectorType(ir.IntType(8), 16)), _llvm(I16x16))

    return I16x16(a, b, c, d), codegen


@intrinsic
def lanes_i16(typingctx, v, a, b):
    """16 int16 lanes: lane a of v in lanes 0..7, lane b in lanes 8..15. A maddubs result
    covers 32 bytes as 16 pairs, so this gives sub-block a's scale to bytes 0..15 and b's to
    bytes 16..31. a, b should be constants once inlined (then it is one shuffle)."""
    if not (v == I16x16 and isinstance(a, types.Integer) and isinstance(b, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        vt = args[0].type
        undef = ir.Constant(vt, ir.Undefined)
        ea = builder.extract_element(args[0], _int(builder, args[1], 32))
        eb = builder.extract_element(args[0], _int(builder, args[2], 32))
        lo = builder.insert_element(undef, ea, ir.Constant(i32, 0))
        both = builder.insert_element(lo, eb, ir.Constant(i32, 8))
        return builder.shuffle_vector(both, undef, ir.Constant(ir.VectorType(i32, 16), [0] * 8 + [8] * 8))

    return I16x16(v, a, b), codegen


@intrinsic
def pairs_i16(typingctx, v, start):
    """16 int16 lanes: lanes start..start+7 of v, each twice (start a constant): a per-32
    weight against per-16 sums, for madd."""
    if not (v == I16x16 and isinstance(start, types.IntegerLiteral)):
        return None
    s = start.literal_value
    mask = [s + k // 2 for k in range(16)]

    def codegen(context, builder, sig, args):
        return builder.shuffle_vector(args[0], ir.Constant(args[0].type, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), 16), mask))

    return I16x16(v, start), codegen


@intrinsic
def twice_i16(typingctx, v, k):
    """16 int16 lanes: lanes k, k+2, ..., k+14 of v, each twice (k = 0 or 1, a constant): one of
    the two values of every int32 lane's pair, in both halves of that lane, for madd."""
    if not (v == I16x16 and isinstance(k, types.IntegerLiteral) and k.literal_value in (0, 1)):
        return None
    mask = [2 * (m // 2) + k.literal_value for m in range(16)]

    def codegen(context, builder, sig, args):
        return builder.shuffle_vector(args[0], ir.Constant(args[0].type, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), 16), mask))

    return I16x16(v, k), codegen


@intrinsic
def bits_to_bytes(typingctx, u):
    """The 32 bits of u (bit j -> lane j) as 32 bytes, 0xFF where set, 0 where clear."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = _int(builder, args[0], 32, signed=False)
        return builder.sext(builder.bitcast(v, ir.VectorType(ir.IntType(1), 32)), _llvm(I8x32))

    return I8x32(u), codegen


@intrinsic
def splat_i32(typingctx, c):
    if not _is_index(c):
        return None

    def codegen(context, builder, sig, args):
        return _splat(builder, _llvm(I32x8), _int(builder, args[0], 32))

    return I32x8(c), codegen


@intrinsic
def bcast4(typingctx, arr, i):
    """The 4 bytes at element i of a byte array, repeated in all eight 32-bit lanes (vpbroadcastd)."""
    if not (_is_byte_array(arr) and _is_index(i)):
        return None
    return I8x32(arr, i), _bcast32(I8x32, 1)


zero_i16 = _zero(I16x16)


# -- float lane math (portable) -------------------------------------------------------------


def _fcall1(name):
    @intrinsic
    def op(typingctx, a):
        if a != F32x8:
            return None

        def codegen(context, builder, sig, args):
            return _call(builder, f"llvm.{name}.v8f32", _llvm(F32x8), [args[0]])

        return F32x8(a), codegen

    return op


vrint = _fcall1("rint")  # round to nearest even (vroundps)


def _fcall2(name):
    @intrinsic
    def op(typingctx, a, b):
        if not (a == b == F32x8):
            return None

        def codegen(context, builder, sig, args):
            return _call(builder, f"llvm.{name}.v8f32", _llvm(F32x8), list(args))

        return F32x8(a, b), codegen

    return op


vmax = _fcall2("maxnum")
vmin = _fcall2("minnum")


@intrinsic
def f32_to_i32(typingctx, a):
    """float lanes -> int32 lanes, truncating (vcvttps2dq)."""
    if a != F32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.fptosi(args[0], _llvm(I32x8))

    return I32x8(a), codegen


@intrinsic
def bits_as_f32(typingctx, a):
    """The int32 lanes' bits as float lanes (a bitcast)."""
    if a != I32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _llvm(F32x8))

    return F32x8(a), codegen


@intrinsic
def select_lt(typingctx, a, b, x, y):
    """Lane-wise a < b ? x : y."""
    if not (a == b == x == y == F32x8):
        return None

    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_ordered("<", args[0], args[1]), args[2], args[3])

    return F32x8(a, b, x, y), codegen


@intrinsic
def hmax_f32(typingctx, a):
    """The largest of the 8 lanes."""
    if a != F32x8:
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        undef = ir.Constant(v.type, ir.Undefined)
        for mask in ([4, 5, 6, 7, 0, 0, 0, 0], [2, 3, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]):
            other = builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(ir.IntType(32), 8), mask))
            v = _call(builder, "llvm.maxnum.v8f32", v.type, [v, other])
        return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))

    return types.float32(a), codegen


@intrinsic
def sums8(typingctx, a0, a1, a2, a3, a4, a5, a6, a7):
    """Lane i: the sum of the 8 lanes of ai (a transpose and three rounds of pairwise adds)."""
    if not all(a == F32x8 for a in (a0, a1, a2, a3, a4, a5, a6, a7)):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)

        def hadd(x, y):  # per 128-bit half: [x0+x1, x2+x3, y0+y1, y2+y3]
            ev = builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(i32, 8), [0, 2, 8, 10, 4, 6, 12, 14]))
            od = builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(i32, 8), [1, 3, 9, 11, 5, 7, 13, 15]))
            return builder.fadd(ev, od)

        u0 = hadd(hadd(args[0], args[1]), hadd(args[2], args[3]))  # [s0 s1 s2 s3 (lo halves) | (hi halves)]
        u1 = hadd(hadd(args[4], args[5]), hadd(args[6], args[7]))
        lo = builder.shuffle_vector(u0, u1, ir.Constant(ir.VectorType(i32, 8), [0, 1, 2, 3, 8, 9, 10, 11]))
        hi = builder.shuffle_vector(u0, u1, ir.Constant(ir.VectorType(i32, 8), [4, 5, 6, 7, 12, 13, 14, 15]))
        return builder.fadd(lo, hi)

    return F32x8(a0, a1, a2, a3, a4, a5, a6, a7), codegen


@intrinsic
def vdiv(typingctx, a, b):
    """a / b lane-wise (float lanes)."""
    if not (a == b == F32x8):
        return None

    def codegen(context, builder, sig, args):
        return builder.fdiv(args[0], args[1])

    return F32x8(a, b), codegen
