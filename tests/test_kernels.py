"""Integer products against oracles written here from llama.cpp's definitions.

- Activation quantization (kernels/act.py) against numpy models of llama.cpp's x86
  quantize_row_q8_0 / _q8_1 (127/max, round half to even, float16 d and s) and of
  quantize_row_q8_K_ref.
- Products in "integer mode" (every float scale 1.0): the result is then an exact integer,
  computed here in int64 from gguf-py's dequantization; the portable and the SIMD kernels
  must both give it bit for bit.
- Products with random scales: within the float32 rounding bound of a float64 reference
  over gguf-py's dequantized weights and the dequantized activation.
- The block-type table drives dispatch; unknown types are refused.
"""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from numba import njit  # noqa: E402
from pyllm.base import BLOCK_SIZE, GGMLType  # noqa: E402
from pyllm.kernels.act import ACT_F32, ACT_Q8_1, ACT_Q8_K, Act, act_of  # noqa: E402
from pyllm.kernels.blocks import BLOCKS, block_type, type_mask  # noqa: E402
from pyllm.kernels.cpu import AVX2, PORTABLE, isa_supported  # noqa: E402
from pyllm.kernels.dispatch import mm_any  # noqa: E402
from test_quants import F16_FIELDS, random_blocks  # noqa: E402

QUANTIZED = "Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K".split()
FLOATS = "F32 F16 BF16".split()
ALL = QUANTIZED + FLOATS
LEVELS = [PORTABLE] + ([AVX2] if isa_supported(AVX2) else [])
# the interleaved layouts (8 rows per group) that this host's best level has kernels for
LAYOUTS = {name: bt.repack[0] for name, bt in ((n, block_type(GGMLType[n])) for n in QUANTIZED)
           if bt.repack and block_type(bt.repack[0]).kernel(LEVELS[-1]) is not None}
def _mask(level):
    return type_mask([GGMLType[n] for n in ALL] + [lid for lid in LAYOUTS.values() if block_type(lid).kernel(level)])
# Byte offsets of the K-quants' dmin (f16), which the integer-mode blocks set to 1 as well.
MIN_FIELDS = {"Q4_1": 2, "Q5_1": 2, "Q2_K": 82, "Q4_K": 2, "Q5_K": 2}


def _product(level):
    """One serial compiled product over every block type (one compilation per level)."""
    mask = _mask(level)

    @njit(cache=True)
    def run(qt, w, act, out):
        mm_any(mask, level, qt, w, 0, out.shape[1], act, 0, out.shape[0], out, 0)

    return run


PRODUCTS = {level: _product(level) for level in LEVELS}


def product(level, name, raw, act, n, layout=False):
    """out (n, rows) = act @ W.T for the raw rows of type name (in its interleaved layout if asked)."""
    out = np.full((n, raw.shape[0]), np.nan, np.float32)
    qt, data = int(GGMLType[name]), raw
    if layout:
        qt, data = block_type(qt).repacked(raw, level)
    PRODUCTS[level](qt, data, act, out)
    return out


def paths(name):
    """(level, layout) of every kernel this host runs for type name."""
    return [(lv, False) for lv in LEVELS] + ([(LEVELS[-1], True)] if name in LAYOUTS else [])


# -- activation quantization ------------------------------------------------------------------


def q8_0_model(x):
    """x86 quantize_row_q8_1: per 32, d = max|x| / 127 and q = rint(x * (127 / max|x|)) in
    float32 (round half to even); d and s = d * sum(q) stored as float16."""
    xb = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(xb).max(1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.rint(xb * inv[:, None]).astype(np.int32)
    d = (amax / np.float32(127.0)).astype(np.float32)
    s = (d * q.sum(1).astype(np.float32)).astype(np.float32)
    half = np.float16
    return q.astype(np.int8).reshape(-1), d.astype(half).astype(np.float32), s.astype(half).astype(np.float32)


def q8_k_model(x):
    """quantize_row_q8_K_ref: per 256, the signed value of largest magnitude (first on ties)
    sets iscale = -127 / max; q = min(127, nearest_int(iscale * x)); d = 1 / iscale."""
    qs, ds, bs = [], [], []
    for blk in x.reshape(-1, 256).astype(np.float32):
        i = int(np.argmax(np.abs(blk)))
        if blk[i] == 0:
            qs.append(np.zeros(256, np.int8))
            ds.append(np.float32(0))
            bs.append(np.zeros(16, np.int16))
            continue
        iscale = np.float32(-127.0) / blk[i]
        q = np.minimum(127, np.rint((iscale * blk).astype(np.float32))).astype(np.int8)
        qs.append(q)
        ds.append(np.float32(1.0) / iscale)
        bs.append(q.astype(np.int32).reshape(16, 16).sum(1).astype(np.int16))
    return np.concatenate(qs), np.array(ds, np.float32), np.concatenate(bs)


def test_activation_quantization_matches_llamacpp_x86():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 512)).astype(np.float32) * np.float32(3.0)
    x[1, :32] = 0.0  # an all-zero block
    x[2, :32] = np.arange(32) - 15.5  # max 16.5 ... not a tie; next block has exact halves
    x[2, 32:64] = np.array([127.0, 2.5, -3.5, 0.5, -0.5, 1.5] + [0.0] * 26, np.float32)  # x*127/max hits .5
    x[3, 256:512] = 0.0  # an all-zero Q8_K block
    act = act_of(x)
    for t in range(4):
        q, d, s = q8_0_model(x[t])
        assert np.array_equal(act.q8[t, :512], q)
        assert np.array_equal(act.y8[t], q.astype(np.int32).reshape(-1, 32).sum(1))
        assert np.array_equal(act.d8[t].view(np.uint32), d.view(np.uint32))
        assert np.array_equal(act.s8[t].view(np.uint32), s.view(np.uint32))
        qk, dk, bk = q8_k_model(x[t])
        assert np.array_equal(act.qk[t, :512], qk)
        assert np.array_equal(act.dk[t].view(np.uint32), dk.view(np.uint32))
        assert np.array_equal(act.bk[t], bk)
    assert list(act.q8[2, 33:38]) == [2, -4, 0, 0, 2]  # half to even, not C's roundf


# -- integer mode: every scale 1.0, exact integer results -------------------------------------


def integer_blocks(name, rows, cols, rng):
    """Random quant bits with every f16 scale (and min) field 1.0: the weights are integers."""
    if name in FLOATS:
        w = rng.integers(-8, 9, size=(rows, cols)).astype(np.float32)
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType[name]).view(np.uint8).reshape(rows, -1)
    raw = random_blocks(name, rows, cols, rng)
    blocks = raw.reshape(rows, -1, BLOCK_SIZE[GGMLType[name]][1])
    one = np.array([1.0], np.float16).view(np.uint8)
    for off in F16_FIELDS[name]:
        blocks[:, :, off:off + 2] = one
    return raw


def integer_act(rng, n, cols):
    """An activation whose every scale is 1: q8 = qk = random int8 in [-127, 127]."""
    q = rng.integers(-127, 128, size=(n, cols)).astype(np.int8)
    return Act(
        xf=rng.integers(-8, 9, size=(n, cols)).astype(np.float32),
        q8=q, d8=np.ones((n, cols // 32), np.float32),
        s8=q.reshape(n, -1, 32).astype(np.float32).sum(-1),
        y8=q.reshape(n, -1, 32).astype(np.int32).sum(-1).astype(np.int32),
        qk=q.copy(), dk=np.ones((n, cols // 256), np.float32),
        bk=q.reshape(n, -1, 16).astype(np.int32).sum(-1).astype(np.int16),
    )


@pytest.mark.parametrize("name", ALL)
def test_integer_mode_is_exact_on_every_path(name):
    rng = np.random.default_rng(hash(name) % 2**32)
    rows, cols, n = 40, 512, 6  # 40 rows: five groups of 8; 6 tokens = one 4-token tile + 2
    raw = integer_blocks(name, rows, cols, rng)
    W = gguf_dequantize(raw, gguf.GGMLQuantizationType[name]).reshape(rows, cols)
    assert np.array_equal(W, np.round(W))  # integers, so the exact product is an integer
    act = integer_act(rng, n, cols)
    X = act.xf if block_type(GGMLType[name]).act == ACT_F32 else act.q8.astype(np.float64)
    exact = X.astype(np.int64) @ W.astype(np.int64).T  # (n, rows); Q8_1's s = sum(q) exactly here
    assert np.abs(exact).max() < 2**24  # so float32 holds every partial sum exactly
    for level, layout in paths(name):
        assert np.array_equal(product(level, name, raw, act, n, layout), exact.astype(np.float32)), (level, layout)


# -- random scales: within the float32 rounding bound -------------------------------------------


def _magnitudes(name, raw, rows, cols):
    """|scale part| + |min part| of every weight, for the rounding bound (the kernels sum
    d * integer and dmin * integer separately)."""
    W = gguf_dequantize(raw, gguf.GGMLQuantizationType[name]).reshape(rows, cols).astype(np.float64)
    if name not in MIN_FIELDS:
        return W, np.abs(W)
    no_min = raw.copy()
    blocks = no_min.reshape(rows, -1, BLOCK_SIZE[GGMLType[name]][1])
    blocks[:, :, MIN_FIELDS[name]:MIN_FIELDS[name] + 2] = 0
    W_sc = gguf_dequantize(no_min, gguf.GGMLQuantizationType[name]).reshape(rows, cols).astype(np.float64)
    return W, np.abs(W_sc) + np.abs(W_sc - W)


@pytest.mark.parametrize("name", ALL)
def test_random_scales_within_float32_bound(name):
    rng = np.random.default_rng(hash((name, 1)) % 2**32)
    rows, cols, n = 24, 512, 5
    if name in FLOATS:
        rows = 17  # jobs of 16 + 1 rows: the float kernels' three-, two- and single-row paths (16 = 3*4 + 2*2)
        raw = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32),
                                   gguf.GGMLQuantizationType[name]).view(np.uint8).reshape(rows, -1)
    else:
        raw = random_blocks(name, rows, cols, rng, small_scales=True)
    W, mag = _magnitudes(name, raw, rows, cols)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    act = act_of(x)
    kind = block_type(GGMLType[name]).act
    if kind == ACT_F32:
        X = x.astype(np.float64)
    elif kind == ACT_Q8_K:
        X = (act.qk[:, :cols].reshape(n, -1, 256) * act.dk[:, :, None].astype(np.float64)).reshape(n, cols)
    else:
        X = (act.q8[:, :cols].reshape(n, -1, 32) * act.d8[:, :, None].astype(np.float64)).reshape(n, cols)
    exact = X @ W.T
    terms = np.abs(X) @ mag.T
    if kind == ACT_Q8_1:
        # llama.cpp's Q8_1 pairs the weights' min m with s = f16(d * sum q), not with d * sum q:
        # the reference does the same, block by block.
        size = BLOCK_SIZE[GGMLType[name]][1]
        m = raw.reshape(rows, -1, size)[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        exact += act.s8.astype(np.float64) @ m.T - (act.q8[:, :cols].reshape(n, -1, 32).sum(-1) * act.d8) @ m.T
        terms += np.abs(act.s8) @ np.abs(m).T
    u = 2.0 ** -24
    gamma = cols * u / (1 - cols * u)
    for level, layout in paths(name):
        ours = product(level, name, raw, act, n, layout)
        worst = np.max(np.abs(ours - exact) / terms)
        assert np.all(np.abs(ours - exact) <= gamma * terms + 1e-30), (level, layout, worst)


# -- NF4: the code book in fixed point ----------------------------------------------------------


NF4_LAYOUT = block_type(GGMLType.NF4).repack[0]  # NF4x8, eight rows interleaved


def _nf4_product(level):
    mask = type_mask([GGMLType.NF4] + ([NF4_LAYOUT] if block_type(NF4_LAYOUT).kernel(level) else []))

    @njit(cache=True)
    def run(qt, w, act, out):
        mm_any(mask, level, qt, w, 0, out.shape[1], act, 0, out.shape[0], out, 0)

    return run


NF4_PRODUCTS = {level: _nf4_product(level) for level in LEVELS}


def nf4_paths(raw):
    """(name, run(act, out)) of every NF4 kernel this host runs: each level, and the layout."""
    for level in LEVELS:
        yield str(level), lambda act, out, level=level: NF4_PRODUCTS[level](int(GGMLType.NF4), raw, act, out)
        packed = block_type(GGMLType.NF4).repacked(raw, level)
        if packed is not None:
            yield f"{level} NF4x8", lambda act, out, level=level, packed=packed: NF4_PRODUCTS[level](*packed, act, out)


def _nf4_rows(rng, rows, cols, d):
    """NF4 rows of random codes, block scales d (rows, cols // 64) stored as f16."""
    raw = np.zeros((rows, cols // 64, 34), np.uint8)
    raw[:, :, 2:] = rng.integers(0, 256, size=(rows, cols // 64, 32))
    raw[:, :, :2] = np.asarray(d, np.float16).view(np.uint8).reshape(rows, cols // 64, 2)
    return raw.reshape(rows, -1)


def _nf4_fixed_point(raw, act, cols):
    """float64 sum over 32-value halves of d * 2^-12 * dy * sum(NF4_INT[code] * y), and its terms."""
    from pyllm.kernels.lowbit import NF4_INT

    rows, n = raw.shape[0], act.q8.shape[0]
    b = raw.reshape(rows, -1, 34)
    d = b[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float64) * 2.0 ** -12
    codes = np.concatenate([b[:, :, 2:] & 15, b[:, :, 2:] >> 4], axis=2).reshape(rows, cols)  # value order
    W = NF4_INT[codes].reshape(rows, -1, 32).astype(np.float64) * np.repeat(d, 2, axis=1)[:, :, None]
    Y = act.q8[:, :cols].reshape(n, -1, 32).astype(np.float64) * act.d8[:, :cols // 32, None].astype(np.float64)
    exact = np.einsum("rbj,tbj->tr", W, Y)
    terms = np.einsum("rbj,tbj->tr", np.abs(W), np.abs(Y))
    return exact, terms


def test_nf4_integer_mode_is_exact_on_every_path():
    """d = 1 and activation scales 1, y in -3..3: every partial sum is a multiple of 2^-12 below
    2^12, so float32 holds the fixed-point product exactly on every path."""
    rng = np.random.default_rng(21)
    rows, cols, n = 40, 512, 6
    raw = _nf4_rows(rng, rows, cols, np.ones((rows, cols // 64)))
    act = integer_act(rng, n, cols)
    act.q8[:] = rng.integers(-3, 4, size=act.q8.shape)
    act.y8[:] = act.q8.reshape(n, -1, 32).astype(np.int32).sum(-1)  # the block sums NF4x8 reads
    exact, _ = _nf4_fixed_point(raw, act, cols)
    names = []
    for name, run in nf4_paths(raw):
        out = np.full((n, rows), np.nan, np.float32)
        run(act, out)
        assert np.array_equal(out, exact.astype(np.float32)), name
        names.append(name)
    assert len(names) == 2 * len(LEVELS) - 1, names  # the layout wherever AVX2 runs


def test_nf4_random_scales_within_bounds():
    """Random scales and activations (whose block maxima are +-127, where vpmaddubsw would
    saturate a careless split): within float32 rounding of the fixed-point formula, and that
    formula within 2^-13 of the decoded levels' product (lowbit.decode_nf4, float64)."""
    from pyllm.kernels import lowbit

    rng = np.random.default_rng(22)
    rows, cols, n = 24, 512, 5
    raw = _nf4_rows(rng, rows, cols, rng.standard_normal((rows, cols // 64)) * 0.05)
    act = act_of(rng.standard_normal((n, cols)).astype(np.float32))
    exact, terms = _nf4_fixed_point(raw, act, cols)
    u = 2.0 ** -24
    gamma = cols * u / (1 - cols * u)
    for name, run in nf4_paths(raw):
        out = np.full((n, rows), np.nan, np.float32)
        run(act, out)
        assert np.all(np.abs(out - exact) <= gamma * terms + 1e-30), name
    W = lowbit.dequantize(raw, GGMLType.NF4, cols).astype(np.float64)
    X = (act.q8[:, :cols].reshape(n, -1, 32) * act.d8[:, :cols // 32, None].astype(np.float64)).reshape(n, cols)
    d = np.abs(raw.reshape(rows, -1, 34)[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float64))
    bound = 2.0 ** -13 * np.abs(X) @ np.repeat(d, 64, axis=1).T
    assert np.all(np.abs(exact - X @ W.T) <= bound + 1e-12)


# -- the table -------------------------------------------------------------------------------


def test_table_covers_the_formats_and_refuses_the_rest():
    for name in ALL:
        bt = block_type(GGMLType[name])
        assert (bt.block, bt.nbytes) == BLOCK_SIZE[GGMLType[name]]
        assert bt.decode is not None and bt.dot is not None and bt.quantize_row is not None
    assert block_type(GGMLType.Q8_K).decode is None  # an activation format, quantizable only
    with pytest.raises(ValueError, match="no kernels for block type"):
        block_type(99)
    assert set(BLOCKS) >= {int(GGMLType[n]) for n in ALL}


def test_simd_kernels_are_never_handed_out_without_the_instructions():
    for bt in BLOCKS.values():
        for level in range(3):
            k = bt.kernel(level)
            if k is not None:
                assert any(bt.simd[lv] is k and isa_supported(lv) and lv <= level for lv in bt.simd)
