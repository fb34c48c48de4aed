"""Assembly of the kernels' instructions for CPUs this host may not have, never run.

JIT-compiling an instruction the host lacks aborts the process, so instruction sets this
host does not have (AVX-512 VNNI, AVX-512 BF16, AMX) are checked the other way: the same
LLVM IR emitters the Numba intrinsics use (kernels/simd.py, kernels/amx.py) build small
probe functions, which llvmlite compiles for a named CPU that has them (`sapphirerapids`,
`znver4`, ...), and the tests look for the intended instructions in the assembly.
"""

import llvmlite.binding as llvm
from llvmlite import ir
from pyllm.kernels import amx, simd

TRIPLE = "x86_64-unknown-linux-gnu"
I8 = ir.IntType(8)
PTR = I8.as_pointer()


def _vec(bits, n, float_=False):
    return ir.VectorType(ir.FloatType() if float_ else ir.IntType(bits), n)


def _probe(module, name, arg_types, ret_type, emit):
    """void name(ptr out, ptr a, ptr b, ptr c): out = emit(builder, *loads of a, b, c)."""
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR] * (1 + len(arg_types))), name=name)
    builder = ir.IRBuilder(fn.append_basic_block())
    vals = [builder.load(builder.bitcast(p, t.as_pointer()), align=1) for p, t in zip(fn.args[1:], arg_types)]
    builder.store(emit(builder, *vals), builder.bitcast(fn.args[0], ret_type.as_pointer()), align=1)
    builder.ret_void()


def avx2_probes(module):
    i8x32, i16x16, i32x8 = _vec(8, 32), _vec(16, 16), _vec(32, 8)
    _probe(module, "maddubs", [i8x32, i8x32], i16x16, simd.emit_maddubs)
    _probe(module, "madd", [i16x16, i16x16], i32x8, simd.emit_madd)
    _probe(module, "sign", [i8x32, i8x32], i8x32, simd.emit_sign)
    _probe(module, "shuffle_bytes", [i8x32, i8x32], i8x32, simd.emit_shuffle_bytes)
    half8 = ir.VectorType(ir.HalfType(), 8)
    _probe(module, "f16", [half8], _vec(32, 8, True), lambda b, h: b.fpext(h, _vec(32, 8, True)))


def vnni_probes(module):
    i8x32, i32x8 = _vec(8, 32), _vec(32, 8)
    _probe(module, "dpbusd", [i32x8, i8x32, i8x32], i32x8, simd.emit_dpbusd)


def bf16_probes(module):
    i16x16, f32x8 = _vec(16, 16), _vec(32, 8, True)
    _probe(module, "dpbf16ps", [f32x8, i16x16, i16x16], f32x8, simd.emit_dpbf16ps)


def amx_probes(module):
    """One 16x16 int8 tile product, its unsigned and bf16 variants, as the Q8_0 kernel runs them."""
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR, PTR, PTR, PTR]), name="amx_tile")
    builder = ir.IRBuilder(fn.append_basic_block())
    cfg, a, b, c = fn.args
    stride = ir.Constant(ir.IntType(64), 64)
    amx.emit_ldtilecfg(builder, cfg)
    amx.emit_tilezero(builder, 2)
    amx.emit_tileloadd(builder, 0, a, stride)
    amx.emit_tileloadd(builder, 1, b, stride)
    amx.emit_tdp(builder, "tdpbssd", 2, 0, 1)
    amx.emit_tdp(builder, "tdpbusd", 3, 0, 1)
    amx.emit_tdp(builder, "tdpbf16ps", 4, 0, 1)
    amx.emit_tilestored(builder, 2, c, stride)
    amx.emit_tilerelease(builder)
    builder.ret_void()


def assembly(cpu: str, *builders, features: str = "") -> str:
    """x86 assembly of the probes made by builders, compiled for cpu (never run)."""
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    module = ir.Module(name="probes")
    module.triple = TRIPLE
    for build in builders:
        build(module)
    mod = llvm.parse_assembly(str(module))
    mod.verify()
    tm = llvm.Target.from_triple(TRIPLE).create_target_machine(cpu=cpu, features=features, opt=2)
    return tm.emit_assembly(mod)
