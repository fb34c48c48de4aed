"""Block decoders and fused products against gguf-py's dequantizers (the reference decoder)."""

import zlib

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from pyllm.base import BLOCK_SIZE, GGMLType, row_bytes  # noqa: E402
from pyllm.kernels.matmul import BATCH_MIN, linear  # noqa: E402
from pyllm.kernels.quants import QTensor, dequantize, get_rows  # noqa: E402

TYPES = "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K".split()

# Byte offsets of the float16 scales inside each block (d, dmin, m), from ggml's block layouts.
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}


def finite_halves(rng, shape, extremes: bool) -> np.ndarray:
    """Random finite float16 values; with extremes, mixed with 0, -0, subnormals, +-65504."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    bits = np.where((bits & 0x7C00) == 0x7C00, bits & ~np.uint16(0x4000), bits)  # exponent 31 is inf/nan
    h = bits.view(np.float16)
    if extremes:
        special = np.array([0.0, -0.0, 6e-8, -6e-8, 65504.0, -65504.0, 1.0, -1.0], dtype=np.float16)
        pick = rng.random(shape) < 0.3
        h = np.where(pick, special[rng.integers(0, len(special), size=shape)], h)
    assert np.isfinite(h).all()
    return h


def random_blocks(name: str, rows: int, cols: int, rng, extremes: bool = False, small_scales: bool = False):
    """Raw blocks of type name: random quant bits, finite random scales."""
    qt = GGMLType[name]
    if name == "F32":
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        if extremes:
            x[0, :4] = [np.finfo(np.float32).max, np.finfo(np.float32).tiny, -0.0, 1e-45]
        return x.view(np.uint8)
    if name in ("F16", "BF16"):
        raw = finite_halves(rng, (rows, cols), extremes).view(np.uint8) if name == "F16" else None
        if name == "BF16":
            bits = rng.integers(0, 1 << 16, size=(rows, cols), dtype=np.uint16)
            bits = np.where((bits & 0x7F80) == 0x7F80, bits & ~np.uint16(0x0080), bits)  # no inf/nan
            raw = bits.view(np.uint8)
        return raw
    raw = rng.integers(0, 256, size=(rows, row_bytes(qt, cols)), dtype=np.uint8)
    size = BLOCK_SIZE[qt][1]
    blocks = raw.reshape(rows, -1, size)
    for off in F16_FIELDS[name]:
        if small_scales:
            h = rng.uniform(-0.05, 0.05, size=blocks.shape[:2]).astype(np.float16)
        else:
            h = finite_halves(rng, blocks.shape[:2], extremes)
        blocks[:, :, off:off + 2] = h.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return raw


def _seed(*key) -> int:
    """A seed fixed by the test's parameters (hash() of a str changes with every process)."""
    return zlib.crc32(repr(key).encode())


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("extremes", [False, True])
def test_dequantize_is_bit_exact(name, extremes):
    rng = np.random.default_rng(_seed(name, extremes))
    cols = 512 if BLOCK_SIZE[GGMLType[name]][0] > 1 else 96
    raw = random_blocks(name, 9, cols, rng, extremes)
    ours = dequantize(QTensor(raw, GGMLType[name], 9, cols))
    ref = gguf_dequantize(raw, gguf.GGMLQuantizationType[name]).reshape(9, cols)
    assert ours.dtype == np.float32 and ours.shape == (9, cols)
    with np.errstate(invalid="ignore"):
        fin = np.isfinite(ref)  # d * q can overflow to inf, identically on both sides
    assert np.array_equal(np.isfinite(ours), fin)
    assert np.array_equal(ours[fin].view(np.uint32), ref[fin].view(np.uint32))


def test_get_rows_picks_rows():
    rng = np.random.default_rng(1)
    raw = random_blocks("Q6_K", 20, 256, rng, small_scales=True)
    t = QTensor(raw, GGMLType.Q6_K, 20, 256)
    ids = [3, 0, 19, 3]
    assert np.array_equal(get_rows(t, ids), dequantize(t)[ids])


def test_unknown_block_type_is_refused():
    t = QTensor(np.zeros((1, 292), np.uint8), GGMLType.Q8_K, 1, 256)
    with pytest.raises(ValueError, match="Q8_K"):
        dequantize(t)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("n", [1, 3, BATCH_MIN + 1])
def test_linear_matches_dequantize_then_numpy(name, n):
    """Error bound: every product is float32 arithmetic on the exactly decoded weights, so
    |ours - exact| <= gamma_k * sum_j |w_j x_j| with k the number of rounding steps; we
    allow gamma for k = cols (a worst-case sequential sum), u = 2^-24."""
    rng = np.random.default_rng(_seed(name, n))
    rows, cols = 37, 512
    raw = random_blocks(name, rows, cols, rng, small_scales=True)
    if name in ("F16", "BF16", "F32"):  # random bits would overflow a float32 sum
        normal = rng.standard_normal((rows, cols)).astype(np.float32)
        raw = gguf.quants.quantize(normal, gguf.GGMLQuantizationType[name]).view(np.uint8).reshape(rows, -1)
    w = QTensor(raw, GGMLType[name], rows, cols)
    W = gguf_dequantize(raw, gguf.GGMLQuantizationType[name]).reshape(rows, cols).astype(np.float64)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    exact = x.astype(np.float64) @ W.T  # (n, rows)
    ours = linear(w, x)
    assert ours.shape == (n, rows) and ours.dtype == np.float32
    u = 2.0 ** -24
    gamma = cols * u / (1 - cols * u)
    bound = gamma * (np.abs(x.astype(np.float64)) @ np.abs(W).T)
    assert np.all(np.abs(ours - exact) <= bound), np.max(np.abs(ours - exact) / bound)


def test_linear_rejects_mismatched_input():
    w = QTensor(np.zeros((4, 18 * 2), np.uint8), GGMLType.Q4_0, 4, 64)
    with pytest.raises(ValueError, match="columns"):
        linear(w, np.zeros((1, 32), np.float32))
