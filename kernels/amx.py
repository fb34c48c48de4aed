"""Intel AMX for batched products: tiles of int8 (tdpbssd, tdpbusd) and bf16 (tdpbf16ps).

AMX has eight tile registers tmm0..7 of up to 16 rows x 64 bytes, configured by a 64-byte
block (ldtilecfg: palette 1, then each tile's bytes per row and rows). One tdpbssd does
C (16 x 16 int32) += A (16 x 64 int8) . B, with B in the VNNI layout (16 rows, each holding
4 consecutive K values of 16 columns; kernels/simd_model.py: vnni_pack, tdpbssd).

The Q8_0 kernel here follows llama.cpp's ggml-cpu/amx/mmq.cpp in outline: the weights are
repacked once (repack_q8_0) into, per group of 16 rows and per 32-element block, a 8 x 64
byte VNNI tile and the 16 rows' scales; per block, one tdpbssd gives the 16 tokens x 16 rows
integer sums, which AVX-512 scales by d_x * d_w into float accumulators.

Nothing here is compiled unless the host has amx-tile, amx-int8 (and amx-bf16 for bf16)
*and* Linux has granted this process the tile state (request_amx, arch_prctl): compiling
AMX IR for any other CPU makes LLVM abort the process. Elsewhere, kernels/asm.py compiles
the same instruction emitters for Sapphire Rapids and the tests check the assembly.
"""

import ctypes
from functools import lru_cache

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic
from pyllm.kernels.cpu import has

ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158  # x86-64
TILE_ROWS, TILE_BYTES = 16, 64


@lru_cache(maxsize=1)
def request_amx() -> bool:
    """Ask Linux for the AMX tile state (once per process); True when granted. Required
    before the first tile instruction, which otherwise faults."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def amx_available(bf16: bool = False) -> bool:
    """The host has AMX (int8; also bf16 if asked) and the kernel granted us its state."""
    need = ("amx-tile", "amx-int8", "avx512f", "avx512bw", "avx512vl") + (("amx-bf16",) if bf16 else ())
    return has(*need) and request_amx()


def tile_config(rows_bytes) -> np.ndarray:
    """The 64-byte ldtilecfg block, palette 1: rows_bytes[t] = (rows, bytes per row) of tile t."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1  # palette
    for t, (rows, nbytes) in enumerate(rows_bytes):
        cfg[16 + 2 * t:18 + 2 * t] = np.frombuffer(np.uint16(nbytes).tobytes(), np.uint8)
        cfg[48 + t] = rows
    return cfg


# -- instruction emitters (also used by kernels/asm.py) --------------------------------------


def _void_call(builder, name, args):
    fnty = ir.FunctionType(ir.VoidType(), [a.type for a in args])
    fn = builder.module.globals.get(name) or ir.Function(builder.module, fnty, name=name)
    builder.call(fn, args)


def _i8(v):
    return ir.Constant(ir.IntType(8), v)


def emit_ldtilecfg(builder, cfg_ptr):
    _void_call(builder, "llvm.x86.ldtilecfg", [cfg_ptr])


def emit_tileloadd(builder, tile, ptr, stride):
    _void_call(builder, "llvm.x86.tileloadd64", [_i8(tile), ptr, stride])


def emit_tilestored(builder, tile, ptr, stride):
    _void_call(builder, "llvm.x86.tilestored64", [_i8(tile), ptr, stride])


def emit_tilezero(builder, tile):
    _void_call(builder, "llvm.x86.tilezero", [_i8(tile)])


def emit_tdp(builder, op, c, a, b):
    """op: 'tdpbssd' | 'tdpbusd' | 'tdpbf16ps'; c += a . b on tile registers."""
    _void_call(builder, f"llvm.x86.{op}", [_i8(c), _i8(a), _i8(b)])


def emit_tilerelease(builder):
    _void_call(builder, "llvm.x86.tilerelease", [])


# -- the same as Numba intrinsics (tile numbers are compile-time constants) --------------------


def _byte_ptr(context, builder, arrty, arr, byte_offset):
    a = context.make_array(arrty)(context, builder, arr)
    p = builder.bitcast(a.data, ir.IntType(8).as_pointer())
    return builder.gep(p, [byte_offset])


def _lit(t):
    return isinstance(t, types.IntegerLiteral)


@intrinsic
def tile_loadconfig(typingctx, cfg):
    def codegen(context, builder, sig, args):
        emit_ldtilecfg(builder, _byte_ptr(context, builder, sig.args[0], args[0], ir.Constant(ir.IntType(64), 0)))
        return context.get_dummy_value()

    return types.none(cfg), codegen


@intrinsic
def tile_load(typingctx, tile, arr, byte_offset, stride):
    if not _lit(tile):
        return None
    t = tile.literal_value

    def codegen(context, builder, sig, args):
        emit_tileloadd(builder, t, _byte_ptr(context, builder, sig.args[1], args[1], args[2]), args[3])
        return context.get_dummy_value()

    return types.none(tile, arr, byte_offset, stride), codegen


@intrinsic
def tile_store(typingctx, tile, arr, byte_offset, stride):
    if not _lit(tile):
        return None
    t = tile.literal_value

    def codegen(context, builder, sig, args):
        emit_tilestored(builder, t, _byte_ptr(context, builder, sig.args[1], args[1], args[2]), args[3])
        return context.get_dummy_value()

    return types.none(tile, arr, byte_offset, stride), codegen


@intrinsic
def tile_zero(typingctx, tile):
    if not _lit(tile):
        return None
    t = tile.literal_value

    def codegen(context, builder, sig, args):
        emit_tilezero(builder, t)
        return context.get_dummy_value()

    return types.none(tile), codegen


@intrinsic
def tile_dpbssd(typingctx, c, a, b):
    if not (_lit(c) and _lit(a) and _lit(b)):
        return None
    tiles = (c.literal_value, a.literal_value, b.literal_value)

    def codegen(context, builder, sig, args):
        emit_tdp(builder, "tdpbssd", *tiles)
        return context.get_dummy_value()

    return types.none(c, a, b), codegen


@intrinsic
def tile_release(typingctx):
    def codegen(context, builder, sig, args):
        emit_tilerelease(builder)
        return context.get_dummy_value()

    return types.none(), codegen


# -- Q8_0 weights for the tiles ------------------------------------------------------------


def repack_q8_0(data: np.ndarray):
    """Q8_0 rows (rows, cols/32 * 34 bytes; rows % 16 == 0) -> (quants, scales):
    quants (rows/16, cols/32, 8, 64) int8: per group of 16 rows and per block, the VNNI
    tile B[k // 4, 4n + k % 4] = weight[16g + n, 32b + k]; scales (rows/16, cols/32, 16) float32."""
    rows = data.shape[0]
    nb = data.shape[1] // 34
    if rows % TILE_ROWS:
        raise ValueError(f"AMX Q8_0 needs a multiple of 16 rows, got {rows}")
    blocks = data.reshape(rows, nb, 34)
    d = blocks[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32)  # (rows, nb)
    q = blocks[:, :, 2:].view(np.int8)  # (rows, nb, 32)
    g = q.reshape(rows // 16, 16, nb, 32).transpose(0, 2, 3, 1)  # (groups, nb, 32 k, 16 n)
    quants = g.reshape(rows // 16, nb, 8, 4, 16).transpose(0, 1, 2, 4, 3).reshape(rows // 16, nb, 8, 64)
    scales = d.reshape(rows // 16, 16, nb).transpose(0, 2, 1)
    return np.ascontiguousarray(quants), np.ascontiguousarray(scales)


def q8_0_tile_config() -> np.ndarray:
    """tmm0: A, 16 tokens x 32 bytes; tmm1: B, 8 rows x 64 bytes; tmm2: C, 16 x 16 int32."""
    return tile_config([(16, 32), (8, 64), (16, 64)])


# -- the product (compiled only where amx_available(); no such host has run it yet) ----------


def _gemm_q8_0():
    from numba import njit, prange

    @njit(parallel=True, fastmath=True)
    def gemm(quants, scales, xq, xd, cfg, out):
        """out (M, N) = x (M tokens, Q8_0: xq int8 (M, K), xd (M, K/32)) @ W.T, W repacked
        (repack_q8_0); M % 16 == 0. One job per group of 16 weight rows."""
        n_groups, nb = quants.shape[0], quants.shape[1]
        m_tiles = xq.shape[0] // 16
        k = xq.shape[1]
        for g in prange(n_groups):
            tile_loadconfig(cfg)
            c = np.empty((16, 16), np.int32)
            for mt in range(m_tiles):
                acc = np.zeros((16, 16), np.float32)
                for b in range(nb):
                    tile_zero(2)
                    tile_load(0, xq, (16 * mt) * k + 32 * b, k)  # 16 tokens x 32 bytes
                    tile_load(1, quants, ((g * nb + b) * 8) * 64, 64)  # 8 x 64 VNNI bytes
                    tile_dpbssd(2, 0, 1)
                    tile_store(2, c, 0, 64)
                    for m in range(16):
                        dx = xd[16 * mt + m, b]
                        for n in range(16):
                            acc[m, n] += dx * scales[g, b, n] * np.float32(c[m, n])
                for m in range(16):
                    for n in range(16):
                        out[16 * mt + m, 16 * g + n] = acc[m, n]
            tile_release()

    return gemm


def gemm_q8_0(quants, scales, xq, xd, out):
    """AMX product of repacked Q8_0 weights with Q8_0 activations (M % 16 == 0 tokens)."""
    if not amx_available():
        raise RuntimeError("AMX is not available on this host (or the kernel refused the tile state)")
    global _GEMM
    if _GEMM is None:
        _GEMM = _gemm_q8_0()
    _GEMM(quants, scales, xq, xd, q8_0_tile_config(), out)
    return out


_GEMM = None
