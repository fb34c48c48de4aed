"""The SIMD/AMX instruction models (kernels/simd_model.py), the instructions themselves where
this host runs them, the portable kernels against the models, and assembly checks for the
instruction sets this host lacks (compiled for a CPU that has them, never run)."""

import numpy as np
import pytest
from numba import njit
from pyllm.base import PyllmError
from pyllm.kernels import asm, cpu
from pyllm.kernels import simd_model as M
from pyllm.kernels.amx import repack_q8_0, tile_config
from pyllm.kernels.simd import (
    bcast_i16x2,
    f32_at,
    load_f16x8,
    load_f32x8_bytes,
    load_i8x32,
    load_i16x16,
    load_u8x8_twice_i16,
    madd,
    maddubs,
    shuffle_bytes,
    sign,
    store,
    twice_i16,
)

AVX2 = cpu.isa_supported(cpu.AVX2)


def edge_bytes(rng, n, signed):
    """n x 32 bytes, a third of them at the extremes (0, 255 / -128, 127, -127)."""
    lo, hi = (-128, 128) if signed else (0, 256)
    v = rng.integers(lo, hi, size=(n, 32))
    ext = np.array([-128, -127, 127, 0] if signed else [0, 255, 128, 1])
    pick = rng.random((n, 32)) < 0.35
    v = np.where(pick, ext[rng.integers(0, 4, size=(n, 32))], v)
    return v.astype(np.int8 if signed else np.uint8)


# -- the models themselves ----------------------------------------------------------------------


def test_maddubs_model_saturates_and_madd_wraps():
    u = np.full(32, 255, np.uint8)
    assert (M.maddubs(u, np.full(32, 127, np.int8)) == 32767).all()  # 2 * 255 * 127 = 64770
    assert (M.maddubs(u, np.full(32, -128, np.int8)) == -32768).all()
    assert (M.madd(np.full(16, -32768, np.int16), np.full(16, -32768, np.int16)) == -(2**31)).all()  # 2^31 wraps
    assert list(M.sign(np.array([5, -128, 7, 3], np.int8), np.array([-1, -1, 0, 9], np.int8))) == [-5, -128, 0, 3]


def test_dpbusd_model_is_the_unsaturated_sum():
    rng = np.random.default_rng(0)
    u, s = edge_bytes(rng, 50, False), edge_bytes(rng, 50, True)
    acc = rng.integers(-1000, 1000, size=(50, 8)).astype(np.int32)
    exact = acc + (u.astype(np.int64) * s).reshape(50, 8, 4).sum(-1)
    assert np.array_equal(M.dpbusd(acc, u, s), exact)
    # where no int16 pair saturates (the kernels' ranges: u <= 128, |s| <= 127), the AVX2 pair
    # vpmaddubsw + vpmaddwd(1) equals one vpdpbusd
    u2, s2 = np.minimum(u, 128), np.maximum(s, -127).astype(np.int8)
    ones = np.ones(16, np.int16)
    assert np.array_equal(M.madd(M.maddubs(u2, s2), ones), M.dpbusd(np.zeros((50, 8), np.int32), u2, s2))


def test_amx_tile_models_are_matrix_products():
    rng = np.random.default_rng(1)
    a = rng.integers(-128, 128, size=(16, 64)).astype(np.int8)  # 16 x 64 bytes: K = 64
    b = rng.integers(-128, 128, size=(64, 16)).astype(np.int8)  # (K, N)
    c0 = rng.integers(-9, 9, size=(16, 16)).astype(np.int32)
    bp = M.vnni_pack(b, 4)  # (16, 64)
    assert bp.shape == (16, 64) and bp[3, 4 * 5 + 2] == b[4 * 3 + 2, 5]
    assert np.array_equal(M.tdpbssd(c0, a, bp), c0 + a.astype(np.int64) @ b.astype(np.int64))
    au = a.view(np.uint8)
    assert np.array_equal(M.tdpbssd(c0, au, bp, a_unsigned=True), c0 + au.astype(np.int64) @ b.astype(np.int64))
    # bf16: 16 x 32 halves (K = 32) . (32, 16)
    fa = rng.standard_normal((16, 32)).astype(np.float32)
    fb = rng.standard_normal((32, 16)).astype(np.float32)
    ha, hb = (fa.view(np.uint32) >> 16).astype(np.uint16), (fb.view(np.uint32) >> 16).astype(np.uint16)
    exact = M.bf16_to_f32(ha).astype(np.float64) @ M.bf16_to_f32(hb).astype(np.float64)
    ours = M.tdpbf16ps(np.zeros((16, 16), np.float32), ha, M.vnni_pack(hb, 2))
    bound = 32 * 2.0**-24 * (np.abs(M.bf16_to_f32(ha)) @ np.abs(M.bf16_to_f32(hb)))
    assert np.all(np.abs(ours - exact) <= bound)


def test_amx_q8_0_repack_and_tiles_give_the_portable_integer_sums():
    """The AMX kernel's data path, in the model: repacked Q8_0 weights, one tdpbssd per
    32-element block, equal the integer-mode portable product (every scale 1)."""
    from test_kernels import integer_act, integer_blocks, product

    rng = np.random.default_rng(2)
    rows, cols, n = 32, 128, 16
    raw = integer_blocks("Q8_0", rows, cols, rng)
    act = integer_act(rng, n, cols)
    quants, scales = repack_q8_0(raw)
    assert quants.shape == (2, 4, 8, 64) and np.all(scales == 1)
    out = np.zeros((n, rows), np.int64)
    for g in range(rows // 16):
        for b in range(cols // 32):
            c = M.tdpbssd(np.zeros((16, 16), np.int32), act.q8[:, 32 * b:32 * b + 32], quants[g, b])
            out[:, 16 * g:16 * g + 16] += c
    assert np.array_equal(out.astype(np.float32), product(cpu.PORTABLE, "Q8_0", raw, act, n))
    cfg = tile_config([(16, 32), (8, 64), (16, 64)])
    assert cfg[0] == 1 and list(cfg[16:22]) == [32, 0, 64, 0, 64, 0] and list(cfg[48:51]) == [16, 8, 16]


# -- the instructions on this host -----------------------------------------------------------------


@njit(cache=True)
def _run_maddubs(u, s, out):
    for i in range(u.shape[0]):
        store(out[i], 0, maddubs(load_i8x32(u[i], 0), load_i8x32(s[i], 0)))


@njit(cache=True)
def _run_sign(a, b, out):
    for i in range(a.shape[0]):
        store(out[i], 0, sign(load_i8x32(a[i], 0), load_i8x32(b[i], 0)))


@njit(cache=True)
def _run_shuffle_bytes(a, b, out):
    for i in range(a.shape[0]):
        store(out[i], 0, shuffle_bytes(load_i8x32(a[i], 0), load_i8x32(b[i], 0)))


@njit(cache=True)
def _run_madd(a, b, out):
    for i in range(a.shape[0]):
        store(out[i], 0, madd(load_i16x16(a[i], 0), load_i16x16(b[i], 0)))


@njit(cache=True)
def _run_f16(h, out):
    for i in range(h.shape[0]):
        store(out[i], 0, load_f16x8(h[i], 0))


@njit(cache=True)
def _run_lane_moves(b, h, twice, pair, odd):
    store(twice, 0, load_u8x8_twice_i16(b, 3))
    store(pair, 0, bcast_i16x2(h, 5))
    store(odd, 0, twice_i16(load_i16x16(h, 0), 1))


def test_lane_moves_of_the_interleaved_k_quant_kernels():
    """The portable lane moves that give each row lane of Q4_Kx8/Q6_Kx8 its scales and the
    activation's 16-sums, against numpy (unsigned bytes above 127 must not sign-extend)."""
    rng = np.random.default_rng(5)
    b = rng.integers(0, 256, size=32).astype(np.uint8)
    b[4] = 255
    h = rng.integers(-32768, 32768, size=16).astype(np.int16)
    twice, pair, odd = (np.zeros(16, np.int16) for _ in range(3))
    _run_lane_moves(b, h, twice, pair, odd)
    assert np.array_equal(twice, np.repeat(b[3:11].astype(np.int16), 2))
    assert np.array_equal(pair, np.tile(h[5:7], 8))
    assert np.array_equal(odd, np.repeat(h[1::2], 2))


@pytest.mark.skipif(not AVX2, reason="this host has no AVX2")
def test_avx2_instructions_equal_their_models():
    rng = np.random.default_rng(4)
    u, s = edge_bytes(rng, 200, False), edge_bytes(rng, 200, True)
    out16 = np.zeros((200, 16), np.int16)
    _run_maddubs(u, s, out16)
    assert np.array_equal(out16, M.maddubs(u, s))
    out8 = np.zeros((200, 32), np.int8)
    b8 = edge_bytes(rng, 200, True)
    _run_sign(s, b8, out8)
    assert np.array_equal(out8, M.sign(s, b8))
    _run_shuffle_bytes(s, b8, out8)  # idx: every byte value, negative ones included
    assert np.array_equal(out8, M.shuffle_bytes(s, b8))
    a16 = np.concatenate([rng.integers(-32768, 32768, size=(199, 16)), np.full((1, 16), -32768)]).astype(np.int16)
    b16 = np.concatenate([rng.integers(-32768, 32768, size=(199, 16)), np.full((1, 16), -32768)]).astype(np.int16)
    out32 = np.zeros((200, 8), np.int32)
    _run_madd(a16, b16, out32)
    assert np.array_equal(out32, M.madd(a16, b16))
    halves = rng.integers(0, 1 << 16, size=(100, 8)).astype(np.uint16)
    halves[(halves & 0x7C00) == 0x7C00] &= 0xBFFF  # no inf/nan
    f = np.zeros((100, 8), np.float32)
    _run_f16(halves.view(np.uint8).reshape(100, 16), f)
    assert np.array_equal(f, halves.view(np.float16).astype(np.float32))


@njit(cache=True)
def _run_f32_bytes(b, i, out):
    store(out, 0, load_f32x8_bytes(b, i))
    return f32_at(b, i + 32)


def test_float32_loads_from_bytes_at_any_offset():
    """F32 weight rows are bytes like every row: 8 floats (and one) from an odd byte offset."""
    b = np.frombuffer(np.linspace(-3, 3, 16, dtype=np.float32).tobytes(), np.uint8)  # 64 bytes
    shifted = np.concatenate([np.zeros(3, np.uint8), b, np.zeros(5, np.uint8)])
    out = np.zeros(8, np.float32)
    one = _run_f32_bytes(shifted, 3, out)
    assert np.array_equal(out, b[:32].view(np.float32)) and one == b[32:36].view(np.float32)[0]


def test_sign_model_matches_the_host_or_is_skipped():
    if not AVX2:
        pytest.skip("this host has no AVX2")
    rng = np.random.default_rng(5)
    a, b = edge_bytes(rng, 100, True), edge_bytes(rng, 100, True)
    out = np.zeros((100, 32), np.int8)
    _run_sign(a, b, out)
    assert np.array_equal(out, M.sign(a, b))


# -- the portable kernels against the models of the SIMD algorithm --------------------------------


def test_portable_block_sums_equal_the_avx2_algorithm_model():
    """llama.cpp's AVX2 algorithms, written with the instruction models, give the portable
    kernels' integer results at the extremes of every range (no saturation anywhere)."""
    from test_kernels import integer_act, integer_blocks, product

    rng = np.random.default_rng(6)
    rows, cols, n = 8, 256, 1
    act = integer_act(rng, n, cols)
    act.q8[0, ::3] = -127
    act.q8[0, 1::3] = 127
    act.qk[:] = act.q8
    act.bk[:] = act.qk.reshape(n, -1, 16).astype(np.int32).sum(-1)
    y = act.q8[0].reshape(-1, 32)  # (blocks, 32)
    ones = np.ones(16, np.int16)

    # Q8_0: signed weights (extremes -128, 127) through vpsignb: |w| . (y * sign(w))
    raw = integer_blocks("Q8_0", rows, cols, rng)
    raw.reshape(rows, -1, 34)[:, 0, 2:6] = [0x80, 0x7F, 0x80, 0x81]
    w = raw.reshape(rows, -1, 34)[:, :, 2:].view(np.int8)  # (rows, blocks, 32)
    model = M.madd(M.maddubs(M.sign(w, w).view(np.uint8), M.sign(y[None], w)), ones).astype(np.int64).sum((1, 2))
    assert np.array_equal(product(cpu.PORTABLE, "Q8_0", raw, act, n)[0], model.astype(np.float32))

    # Q4_0: nibbles - 8, signed, same path
    raw = integer_blocks("Q4_0", rows, cols, rng)
    qs = raw.reshape(rows, -1, 18)[:, :, 2:]
    q = (np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.int16) - 8).astype(np.int8)
    model = M.madd(M.maddubs(M.sign(q, q).view(np.uint8), M.sign(y[None], q)), ones).astype(np.int64).sum((1, 2))
    assert np.array_equal(product(cpu.PORTABLE, "Q4_0", raw, act, n)[0], model.astype(np.float32))

    # Q6_K: unsigned 0..63 quants, madd by the int8 scales, minus 32 * scales . bsums
    raw = integer_blocks("Q6_K", rows, cols, rng)
    blk = raw.reshape(rows, 210)
    ql, qh, sc = blk[:, :128], blk[:, 128:192], blk[:, 192:208].view(np.int8).astype(np.int16)
    e = np.arange(256)
    h, s_, l_ = e // 128, (e % 128) // 32, e % 32
    lo = (ql[:, 64 * h + 32 * (s_ % 2) + l_] >> (4 * (s_ // 2))) & 15
    hi = (qh[:, 32 * h + l_] >> (2 * s_)) & 3
    qu = (lo | (hi << 4)).astype(np.uint8).reshape(rows, 8, 32)  # (rows, groups of 32, 32)
    p16 = M.maddubs(qu, act.qk[0].reshape(8, 32)[None])  # (rows, 8, 16)
    scale_lanes = np.repeat(sc.reshape(rows, 8, 2), 8, axis=-1)  # lanes 0..7: scale 2g, 8..15: 2g+1
    total = M.madd(scale_lanes, p16).astype(np.int64).sum((1, 2))
    offset = M.madd(sc, act.bk[0][None]).astype(np.int64).sum(-1) * 32
    assert np.array_equal(product(cpu.PORTABLE, "Q6_K", raw, act, n)[0], (total - offset).astype(np.float32))


# -- assembly -------------------------------------------------------------------------------------

AVX2_OPS = ["vpmaddubsw", "vpmaddwd", "vpsignb", "vpshufb", "vcvtph2ps"]
VNNI_OPS = ["vpdpbusd"]
BF16_OPS = ["vdpbf16ps"]
AMX_OPS = ["ldtilecfg", "tilezero", "tileloadd", "tdpbssd", "tdpbusd", "tdpbf16ps", "tilestored", "tilerelease"]


@pytest.mark.parametrize("cpu_name, builders, expected", [
    ("haswell", [asm.avx2_probes], AVX2_OPS),
    ("znver3", [asm.avx2_probes], AVX2_OPS),
    ("znver4", [asm.avx2_probes, asm.vnni_probes, asm.bf16_probes], AVX2_OPS + VNNI_OPS + BF16_OPS),
    ("sapphirerapids", [asm.vnni_probes, asm.bf16_probes, asm.amx_probes], VNNI_OPS + BF16_OPS + AMX_OPS),
])
def test_emitters_compile_to_the_intended_instructions(cpu_name, builders, expected):
    text = asm.assembly(cpu_name, *builders)
    for op in expected:
        assert op in text, f"{op} missing for {cpu_name}"


@pytest.mark.skipif(not AVX2, reason="this host has no AVX2")
def test_the_avx2_product_kernels_use_the_instructions():
    """The product over every block type (test_kernels), and NF4's, compiled here: a function
    loaded from Numba's disk cache has no assembly to inspect."""
    from pyllm.base import GGMLType
    from pyllm.kernels.act import act_of
    from test_kernels import PRODUCTS, _nf4_product

    act = act_of(np.zeros((1, 512), np.float32))
    text = ""
    for dispatcher, qt, row_bytes in ((PRODUCTS[cpu.AVX2], int(GGMLType.Q8_0), 544),
                                      (_nf4_product(cpu.AVX2), int(GGMLType.NF4), 272)):
        fresh = njit(dispatcher.py_func)
        fresh(qt, np.zeros((1, row_bytes), np.uint8), act, np.zeros((1, 1), np.float32))
        text += "\n".join(fresh.inspect_asm().values())
    for op in ["vpmaddubsw", "vpmaddwd", "vpsignb", "vpshufb", "vcvtph2ps", "vfmadd"]:
        assert op in text, op


def test_asking_for_a_missing_instruction_set_is_an_error_not_a_crash(monkeypatch):
    missing = [lv for lv in range(len(cpu.ISA_NAMES)) if not cpu.isa_supported(lv)]
    if not missing:
        pytest.skip("this host has every kernel level")
    monkeypatch.setenv("PYLLM_ISA", cpu.ISA_NAMES[missing[0]])
    cpu.best_isa.cache_clear()
    try:
        with pytest.raises(PyllmError, match="this CPU lacks"):
            cpu.best_isa()
    finally:
        monkeypatch.delenv("PYLLM_ISA")
        cpu.best_isa.cache_clear()
