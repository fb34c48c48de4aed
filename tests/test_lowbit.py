"""Low-bit float block types (kernels/lowbit.py) against independent oracles.

- FP8_E4M3, FP8_E5M2, FP6_E3M2, NF4: tests/lowbit_reference.py, a float64 reference written
  from the OCP / QLoRA definitions (every code's value from its fields; encoding by searching
  all codes). E5M2 is also checked against numpy's float16 (E5M2 is a half's top byte).
- MXFP4: gguf-py's gguf.quants.MXFP4 (decoder and quantizer), and llama.cpp's own C
  quantize_row_mxfp4_ref compiled from its source when that source and gcc are at hand.
- fused dots: dequantize, then a float64 product, within the float32 error bound.
- files: pyllm's reader/writer/info/quantize, and llama.cpp's binaries (PYLLM_LLAMA_CPP_BIN):
  it must refuse pyllm-only files cleanly and run our MXFP4 files.
"""

import importlib.util
import os
import subprocess
from pathlib import Path

import lowbit_reference as ref
import numpy as np
import pytest
from numba import njit
from pyllm.base import PYLLM_BLOCK_TYPES_KEY, GGMLType, PyllmError, ValueType, row_bytes
from pyllm.convert.gguf_writer import GGUFWriter
from pyllm.convert.quantize import quantize_gguf
from pyllm.kernels import lowbit
from pyllm.runtime.gguf_file import GGUFFile

REPO = Path(__file__).resolve().parent.parent
FP = ["FP8_E4M3", "FP8_E5M2", "FP6_E3M2"]
ALL = ["MXFP4", "NF4"] + FP
ELEMENT_FMT = {"FP8_E4M3": lowbit.E4M3, "FP8_E5M2": lowbit.E5M2, "FP6_E3M2": lowbit.E3M2}
BIN = os.environ.get("PYLLM_LLAMA_CPP_BIN")


def f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def same(ours: np.ndarray, expected) -> bool:
    """Bit-identical float32 (so -0.0 differs from 0.0), NaN matching NaN."""
    with np.errstate(over="ignore", invalid="ignore"):  # 2^127 * 448 is inf in float32 on both sides
        expected = np.asarray(expected, dtype=np.float64).astype(np.float32)
    nan = np.isnan(expected)
    return bool(np.array_equal(np.isnan(ours), nan) and np.array_equal(ours[~nan].view(np.uint32),
                                                                        expected[~nan].view(np.uint32)))


def fp_blocks(name: str, codes, e: int = 127) -> np.ndarray:
    """Raw blocks (1 row) holding `codes` (a multiple of 32) with scale byte e."""
    out = []
    for i in range(0, len(codes), 32):
        c = list(codes[i:i + 32])
        out.append(bytes([e]) + (ref.pack_fp6(c) if name == "FP6_E3M2" else bytes(c)))
    return np.frombuffer(b"".join(out), dtype=np.uint8)[None, :]


def codes_of(name: str, raw: np.ndarray) -> list[int]:
    """The element codes of one row of FP8/FP6 blocks."""
    nbytes = 25 if name == "FP6_E3M2" else 33
    out = []
    for i in range(0, raw.size, nbytes):
        b = bytes(raw.reshape(-1)[i:i + nbytes])
        out += ref.unpack_fp6(b[1:]) if name == "FP6_E3M2" else list(b[1:])
    return out


def finite_codes(name: str) -> list[int]:
    fmt = ref.ELEMENT[name]
    return [c for c in range(ref.n_codes(fmt)) if not np.isnan(ref.decode(fmt, c))
            and np.isfinite(ref.decode(fmt, c))]


# -- element formats ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FP)
@pytest.mark.parametrize("e", [127, 0, 1, 100, 126, 128, 150, 254, 255])
def test_every_code_decodes_to_its_value(name, e):
    fmt = ref.ELEMENT[name]
    codes = list(range(ref.n_codes(fmt)))
    ours = lowbit.dequantize(fp_blocks(name, codes, e), GGMLType[name], len(codes))[0]
    expected = [ref.e8m0(e) * ref.decode(fmt, c) for c in codes]  # float64, rounded once to float32
    assert same(ours, expected)


def test_e5m2_is_the_top_byte_of_a_half():
    codes = np.arange(256)
    ours = lowbit.dequantize(fp_blocks("FP8_E5M2", codes.tolist()), GGMLType.FP8_E5M2, 256)[0]
    halves = (codes.astype(np.uint16) << 8).view(np.float16).astype(np.float32)
    assert same(ours, halves)


def test_known_bit_patterns():
    def q(name, values):
        x = f32(values + [0.0] * (32 - len(values)))
        return codes_of(name, lowbit.quantize(x[None, :], GGMLType[name]))[:len(values)]

    # scale 2^0 in each: the block max is the format's max
    assert q("FP8_E4M3", [448, 1, -2, 2.0**-9, 0.875 * 2**-6, 2.0**-6, -0.0, 240]) == \
        [0x7E, 0x38, 0xC0, 0x01, 0x07, 0x08, 0x80, 0x77]
    assert q("FP8_E5M2", [57344, 1, -2, 2.0**-16, 2.0**-14, 0.75 * 2**-14]) == [0x7B, 0x3C, 0xC0, 0x01, 0x04, 0x03]
    assert q("FP6_E3M2", [28, 1, -2, 0.0625, 0.25, 0.1875, -28]) == [0x1F, 0x0C, 0x30, 0x01, 0x04, 0x03, 0x3F]


@pytest.mark.parametrize("name", FP)
def test_every_finite_code_round_trips(name):
    """A block whose largest value is the format's max has scale 2^0: each value returns its code."""
    fmt = ref.ELEMENT[name]
    top = max(finite_codes(name), key=lambda c: ref.decode(fmt, c))
    codes = finite_codes(name)
    x, expect = [], []
    for i in range(0, len(codes), 31):
        chunk = codes[i:i + 31] + [0] * (31 - len(codes[i:i + 31]))
        x += [ref.decode(fmt, c) for c in [top] + chunk]
        expect += [top] + chunk
    raw = lowbit.quantize(f32(x)[None, :], GGMLType[name])
    assert raw.reshape(-1, raw.size // (len(x) // 32))[:, 0].tolist() == [127] * (len(x) // 32)
    assert codes_of(name, raw) == expect
    assert [encode_ref(fmt, v) for v in x] == expect  # the reference agrees with itself


def encode_ref(fmt, v):
    return ref.encode(fmt, float(np.float32(v)))


@pytest.mark.parametrize("name", FP)
def test_rounding_between_codes_is_nearest_even(name):
    """Midpoints of neighbouring codes (ties: the even code), and one float32 step either side;
    this crosses every binade, the subnormals and zero."""
    fmt = ref.ELEMENT[name]
    mx = ref.max_value(fmt)
    pos = sorted(ref.decode(fmt, c) for c in finite_codes(name) if ref.decode(fmt, c) >= 0)
    probes = []
    for a, b in zip(pos, pos[1:]):
        m = np.float32((a + b) / 2)
        assert float(m) == (a + b) / 2  # midpoints of these formats are float32 values
        probes += [m, np.nextafter(m, np.float32(0)), np.nextafter(m, np.float32(np.inf)), np.float32(a + (b - a) / 4)]
    probes = probes + [-p for p in probes]
    x, expect = [], []
    for i in range(0, len(probes), 31):
        chunk = [float(p) for p in probes[i:i + 31]]
        chunk += [0.0] * (31 - len(chunk))
        x += [mx] + chunk
        expect += [encode_ref(fmt, mx)] + [encode_ref(fmt, v) for v in chunk]
    assert codes_of(name, lowbit.quantize(f32(x)[None, :], GGMLType[name])) == expect


@njit
def _encode_all(v, fmt):
    out = np.empty(v.shape[0], dtype=np.int64)
    for i in range(v.shape[0]):
        out[i] = lowbit.encode_fp(v[i], fmt[0], fmt[1], fmt[2], fmt[3], fmt[4], fmt[5])
    return out


@pytest.mark.parametrize("name", FP)
def test_element_encoder_saturates_and_keeps_nan_inf(name):
    """The element encoder on its own (the block scale keeps finite values in range, so
    saturation shows only here): finite values past the max become +-max; Inf is Inf (E5M2)
    or +-max; NaN is the NaN code or +0 (E3M2 has none)."""
    fmt = ref.ELEMENT[name]
    mx = ref.max_value(fmt)
    v = f32([mx, mx * 1.0001, mx * 1.07, mx * 1.5, 2 * mx, 1e30, 3.4e38, np.inf, np.nan, 0.0, -0.0,
             1e-30, 1.4e-45]).tolist()
    v = f32(v + [-a for a in v])
    ours = _encode_all(v, np.array(ELEMENT_FMT[name], dtype=np.int64))
    assert ours.tolist() == [ref.encode(fmt, float(a)) for a in v]


# -- the block scale ------------------------------------------------------------------------------

def _scale_probe_blocks():
    """Blocks whose absmax walks the float32 range: subnormals, exact powers of two, the
    1.75 mantissa where the scale steps, one step either side, the largest float."""
    amaxes = [0.0, 1.4e-45, 1e-40, 2.0**-130, 1e-30, 3e-8, 1.0, 448.0, 57344.0, 28.0, 3.4e38]
    for k in (-20, -7, 0, 3, 9, 100):
        for base in (2.0**k, 1.75 * 2.0**k):
            m = np.float32(base)
            amaxes += [m, np.nextafter(m, np.float32(0)), np.nextafter(m, np.float32(np.inf))]
    rng = np.random.default_rng(5)
    blocks = []
    for a in amaxes:
        x = rng.uniform(-1, 1, 32).astype(np.float32) * np.float32(a)
        x[rng.integers(32)] = np.float32(a) * (1 if rng.random() < 0.5 else -1)
        blocks.append(x)
    return np.array(blocks, dtype=np.float32)


@pytest.mark.parametrize("name", FP)
def test_scale_and_codes_of_extreme_blocks(name):
    x = _scale_probe_blocks()  # (blocks, 32): one block per row
    ours = lowbit.quantize(x, GGMLType[name])
    assert np.array_equal(ours, ref.quantize_rows(name, x))


@pytest.mark.parametrize("name", FP)
def test_zero_block(name):
    raw = lowbit.quantize(np.zeros((1, 32), np.float32), GGMLType[name])
    assert raw[0, 0] == 0 and not raw[0, 1:].any()
    neg = lowbit.quantize(np.full((1, 32), -0.0, np.float32), GGMLType[name])
    assert same(lowbit.dequantize(neg, GGMLType[name], 32)[0], np.full(32, -0.0))


# -- whole blocks against the reference ----------------------------------------------------------

def _realistic(rng, rows, cols):
    """Normal, heavy-tailed and sparse rows at scales from 1e-4 to 1e3."""
    x = rng.standard_normal((rows, cols))
    x[1::4] = rng.standard_t(2, size=x[1::4].shape)
    x[2::4] *= rng.random(x[2::4].shape) < 0.2
    x *= 10.0 ** rng.uniform(-4, 3, size=(rows, 1))
    return x.astype(np.float32)


@pytest.mark.parametrize("name", ["NF4"] + FP)
def test_random_rows_match_reference_bytes(name):
    x = _realistic(np.random.default_rng(hash(name) % 2**32), 12, 256)
    ours = lowbit.quantize(x, GGMLType[name])
    assert ours.shape == (12, row_bytes(GGMLType[name], 256))
    assert np.array_equal(ours, ref.quantize_rows(name, x))
    dec = lowbit.dequantize(ours, GGMLType[name], 256)
    assert same(dec, ref.dequantize_rows(name, ours, 256))


@pytest.mark.parametrize("name", ["NF4"] + FP)
def test_decoders_on_random_bytes(name):
    rng = np.random.default_rng(7)
    t = GGMLType[name]
    raw = rng.integers(0, 256, size=(6, row_bytes(t, 256)), dtype=np.uint8)
    if name == "NF4":  # finite f16 scales, some subnormal, some zero
        d = rng.standard_normal((6, 4)).astype(np.float16) * np.float16(rng.choice([1, 1e-5, 0], size=(6, 4)))
        raw.reshape(6, 4, 34)[:, :, :2] = d.view(np.uint8).reshape(6, 4, 2)
    assert same(lowbit.dequantize(raw, t, 256), ref.dequantize_rows(name, raw, 256))


def test_fp6_packing_by_hand():
    """Element 8i + g is bits 6i..6i+5 of bytes g, 8+g, 16+g read as one little-endian word."""
    codes = [0] * 32
    codes[0], codes[8], codes[16], codes[24] = 0b000001, 0b000010, 0b110011, 0b111111
    raw = fp_blocks("FP6_E3M2", codes)[0]
    assert raw[1] == 0b10_000001 and raw[9] == 0b0011_0000 and raw[17] == 0b111111_11
    assert not raw[2:9].any() and not raw[10:17].any() and not raw[18:25].any()


# -- NF4 ------------------------------------------------------------------------------------------

def test_nf4_levels_round_trip_and_decode_exactly():
    levels = lowbit.NF4_VALUES
    x = np.concatenate([levels, -levels[::-1], levels * np.float32(0.5), levels[::-1]])[None, :]  # absmax 1
    raw = lowbit.quantize(x, GGMLType.NF4)
    assert np.frombuffer(raw[0, :2].tobytes(), np.float16)[0] == 1.0
    q = raw[0, 2:34]
    codes = np.concatenate([q & 15, q >> 4])
    assert codes[:16].tolist() == list(range(16))
    assert np.array_equal(lowbit.dequantize(raw, GGMLType.NF4, 64)[0, :16], levels)
    assert np.array_equal(raw, ref.quantize_rows("NF4", x))


def test_nf4_boundaries_and_scale_rounding():
    """Values at and around every boundary between levels, for scales that are and are not
    f16 values (so d rounds), subnormal in f16, and beyond f16's range (clamped to 65504)."""
    mids = ref.NF4[:-1] / 2 + ref.NF4[1:] / 2
    blocks = []
    for d in (1.0, 0.37, 3e-6, 1e5):
        v = [np.float32(m * d) for m in mids]
        row = [np.float32(d)] + v + [np.nextafter(a, np.float32(-np.inf)) for a in v] + \
            [np.nextafter(a, np.float32(np.inf)) for a in v]
        blocks.append(row + [np.float32(0)] * (64 - len(row)))
    x = f32(blocks)
    assert np.array_equal(lowbit.quantize(x, GGMLType.NF4), ref.quantize_rows("NF4", x))


def test_nf4_exact_ties_go_to_the_lower_level():
    # with d = 1 these level midpoints are float32 values: an input on one is a tie
    ties = [(k, np.float32((ref.NF4[k] + ref.NF4[k + 1]) / 2)) for k in range(15)
            if float(np.float32((ref.NF4[k] + ref.NF4[k + 1]) / 2)) == (ref.NF4[k] + ref.NF4[k + 1]) / 2]
    assert len(ties) >= 5
    x = np.zeros(64, np.float32)
    x[0] = 1.0
    x[1:1 + len(ties)] = [v for _, v in ties]
    q = lowbit.quantize(x[None, :], GGMLType.NF4)[0, 2:34]
    codes = np.concatenate([q & 15, q >> 4])
    assert codes[1:1 + len(ties)].tolist() == [k for k, _ in ties]


def test_nf4_zero_inf_nan():
    raw = lowbit.quantize(np.zeros((1, 64), np.float32), GGMLType.NF4)
    assert raw[0, :2].tolist() == [0, 0] and (raw[0, 2:] == 0x77).all()
    x = np.zeros((1, 64), np.float32)
    x[0, :3] = [np.inf, -np.inf, 0.5]
    raw = lowbit.quantize(x, GGMLType.NF4)
    assert np.frombuffer(raw[0, :2].tobytes(), np.float16)[0] == 0.5  # Inf is not the scale
    assert lowbit.dequantize(raw, GGMLType.NF4, 64)[0, :3].tolist() == [0.5, -0.5, 0.5]  # saturated
    x[0, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lowbit.quantize(x, GGMLType.NF4)


# -- NaN and Inf in the float formats --------------------------------------------------------------

def test_fp8_nan_and_inf():
    x = np.zeros((1, 32), np.float32)
    x[0, :5] = [np.nan, np.inf, -np.inf, 2.0, -1.0]
    e4 = lowbit.quantize(x, GGMLType.FP8_E4M3)
    assert e4[0, 0] == 127 - 7  # scale from the finite values: 2 <= 448 * 2^-7
    assert e4[0, 1:6].tolist() == [0x7F, 0x7E, 0xFE, ref.encode("E4M3", 256.0), ref.encode("E4M3", -128.0)]
    dec = lowbit.dequantize(e4, GGMLType.FP8_E4M3, 32)[0, :3]
    assert np.isnan(dec[0]) and dec[1:].tolist() == [3.5, -3.5]  # Inf saturated to +-448 * 2^-7
    e5 = lowbit.quantize(x, GGMLType.FP8_E5M2)
    assert e5[0, 1:4].tolist() == [0x7E, 0x7C, 0xFC]
    dec = lowbit.dequantize(e5, GGMLType.FP8_E5M2, 32)[0, :3]
    assert np.isnan(dec[0]) and dec[1:].tolist() == [np.inf, -np.inf]


def test_types_without_nan_refuse_it():
    x = np.ones((1, 64), np.float32)
    x[0, 3] = np.nan
    for name in ("NF4", "FP6_E3M2", "MXFP4"):
        with pytest.raises(ValueError, match=f"NaN values cannot be stored as {name}"):
            lowbit.quantize(x, GGMLType[name])
    x[0, 3] = np.inf
    with pytest.raises(ValueError, match="infinite values cannot be stored as MXFP4"):
        lowbit.quantize(x, GGMLType.MXFP4)
    fp6 = lowbit.quantize(x, GGMLType.FP6_E3M2)  # FP6 saturates Inf
    assert lowbit.dequantize(fp6, GGMLType.FP6_E3M2, 64)[0, 3] == 28 / 16  # max * 2^-4, as 1 = 2^0 <= 28 * 2^-4


# -- MXFP4 (ggml's) --------------------------------------------------------------------------------

gguf = pytest.importorskip("gguf")


def test_mxfp4_decoder_is_gguf_py_bit_for_bit():
    raw = np.random.default_rng(3).integers(0, 256, size=(8, 17 * 16), dtype=np.uint8)
    with np.errstate(over="ignore"):
        theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.MXFP4).reshape(8, 512)
    assert same(lowbit.dequantize(raw, GGMLType.MXFP4, 512), theirs)


def test_mxfp4_quantizer_matches_gguf_py():
    x = _realistic(np.random.default_rng(11), 16, 512)
    theirs = gguf.quants.quantize(x, gguf.GGMLQuantizationType.MXFP4).view(np.uint8).reshape(16, -1)
    assert np.array_equal(lowbit.quantize(x, GGMLType.MXFP4), theirs)


def test_mxfp4_tiny_blocks_clamp_the_exponent():
    """ggml's (uint8_t) cast of a negative exponent is undefined; pyllm writes e = 0."""
    x = np.zeros((1, 32), np.float32)
    x[0, :3] = [1e-39, -3e-39, 1.4e-45]
    raw = lowbit.quantize(x, GGMLType.MXFP4)
    assert raw[0, 0] == 0
    dec = lowbit.dequantize(raw, GGMLType.MXFP4, 32)[0]
    assert np.abs(dec[:3] - x[0, :3]).max() <= 2.0 ** -128  # half a step of the finest scale


def _bench_module():
    spec = importlib.util.spec_from_file_location("_pyllm_bench_lowbit", REPO / "benchmarks" / "bench_lowbit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ggml_mxfp4():
    lib = _bench_module().build_mxfp4_ref()
    if lib is None:
        pytest.skip("llama.cpp's source (LLAMA_CPP_SRC or PYLLM_LLAMA_CPP_BIN/../..) or gcc is absent")
    return lib


def test_mxfp4_quantizer_is_byte_identical_to_ggml(ggml_mxfp4):
    rng = np.random.default_rng(13)
    # exact powers of two and their float32 neighbours as block maxima, where floorf(log2f()) steps
    edges = np.array([np.nextafter(np.float32(2.0**k), np.float32(to)) for k in range(-100, 120)
                      for to in (0, np.inf, 2.0**k)], dtype=np.float32)
    probe = rng.uniform(-1, 1, (len(edges), 32)).astype(np.float32) * edges[:, None]
    probe[:, 7] = -edges
    x = np.concatenate([_realistic(rng, 64, 512).reshape(-1, 32), probe])
    x = x[np.abs(x).max(axis=1) >= 2.0**-125]  # below, ggml's uint8 cast is undefined
    assert np.array_equal(lowbit.quantize(x, GGMLType.MXFP4), ggml_mxfp4(x))


# -- fused dots ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("portable", [False, True])
def test_matvec_matches_dequantize_then_float64(name, portable):
    """|ours - exact| <= gamma_cols * sum_j |w_j x_j|, as for the other block types."""
    rng = np.random.default_rng(hash((name, portable)) % 2**32)
    rows, cols = 37, 512
    raw = lowbit.quantize(_realistic(rng, rows, cols), GGMLType[name])
    W = lowbit.dequantize(raw, GGMLType[name], cols).astype(np.float64)
    x = rng.standard_normal(cols).astype(np.float32)
    ours = lowbit.matvec(raw, GGMLType[name], x, portable=portable)
    exact = W @ x.astype(np.float64)
    u = 2.0 ** -24
    bound = cols * u / (1 - cols * u) * (np.abs(W) @ np.abs(x.astype(np.float64)))
    assert ours.dtype == np.float32 and np.all(np.abs(ours - exact) <= bound)


def test_matvec_carries_fp8_nan_and_inf_codes():
    codes = [0x38] * 32
    codes[4] = 0x7F  # NaN
    nan_row = fp_blocks("FP8_E4M3", codes)
    codes = [0x3C] * 32
    codes[2] = 0x7C  # +Inf
    inf_row = fp_blocks("FP8_E5M2", codes)
    x = np.ones(32, np.float32)
    assert np.isnan(lowbit.matvec(nan_row, GGMLType.FP8_E4M3, x)[0])
    assert lowbit.matvec(inf_row, GGMLType.FP8_E5M2, x)[0] == np.inf


# -- files ------------------------------------------------------------------------------------------

STORIES = REPO / "models" / "stories260K.gguf"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """stories260K quantized to every new type: {type name: path}."""
    d = tmp_path_factory.mktemp("lowbit")
    out = {}
    for name in ("NF4", "FP8_E4M3", "FP8_E5M2", "FP6", "MXFP4", "SYM_INT4", "Q4_0"):
        out[name] = d / f"stories-{name}.gguf"
        quantize_gguf(STORIES, out[name], name)
    return out


def test_quantized_files_name_their_types_and_decode(quantized):
    src = GGUFFile(STORIES)
    for name, block in (("NF4", "NF4"), ("FP8_E4M3", "FP8_E4M3"), ("FP8_E5M2", "FP8_E5M2"), ("FP6", "FP6_E3M2")):
        g = GGUFFile(quantized[name])
        t = GGMLType[block]
        assert g.metadata[PYLLM_BLOCK_TYPES_KEY] == [f"{block}={int(t)}"]
        assert g.pyllm_only_types == [t]
        q = g.tensors["blk.0.attn_q.weight"]
        assert q.qtype == t
        x = src.array("blk.0.attn_q.weight")
        assert np.array_equal(g.raw("blk.0.attn_q.weight").reshape(64, -1), lowbit.quantize(x, t))
        assert g.tensors["output.weight"].qtype == GGMLType.Q8_0  # Q6_K (llama.cpp's rule), 64 wide: Q8_0
        assert g.tensors["blk.0.ffn_down.weight"].qtype == GGMLType.F16  # rows of 172: the fallback
        assert g.tensors["blk.0.attn_norm.weight"].qtype == GGMLType.F32
    mx = GGUFFile(quantized["MXFP4"])
    assert mx.tensors["blk.0.attn_q.weight"].qtype == GGMLType.MXFP4
    assert mx.tensors["output.weight"].qtype == GGMLType.Q8_0 and not mx.pyllm_only_types
    assert PYLLM_BLOCK_TYPES_KEY not in mx.metadata and mx.metadata["general.file_type"] == 38


def test_quantized_models_run_close_to_the_original(tmp_path, quantized):
    """Until the block-type table gives these types products, a model runs by decoding them:
    `pyllm quantize ... F32` back (through kernels/lowbit's decoders), then generate. The oracle
    is the unquantized stories260K: the same next tokens, logits close for the 8/6-bit types."""
    import pyllm

    base = pyllm.load(STORIES)
    ids = base.tokenizer.encode("Once upon a time, there was a little girl named Lily. She loved")
    ref_logits = base.logits(ids)
    for name, limit in (("FP8_E4M3", 0.08), ("FP8_E5M2", 0.1), ("FP6", 0.1), ("NF4", 0.25), ("MXFP4", 0.3)):
        f32 = tmp_path / f"{name}-f32.gguf"
        quantize_gguf(quantized[name], f32, "F32", allow_requantize=True)
        logits = pyllm.load(f32).logits(ids)
        rel = np.sqrt(np.mean((logits - ref_logits) ** 2) / np.mean(ref_logits ** 2))
        assert rel < limit, (name, rel)
        assert np.mean(logits.argmax(-1) == ref_logits.argmax(-1)) >= 0.9, name


def test_sym_int4_is_q4_0(quantized):
    assert quantized["SYM_INT4"].read_bytes() == quantized["Q4_0"].read_bytes()


def test_info_marks_pyllm_only_files(quantized, capsys):
    from pyllm.cli.info import main

    main([str(quantized["NF4"])])
    out = capsys.readouterr().out
    assert "readable by" in out and "pyllm only (NF4" in out and "llama.cpp refuses" in out
    main([str(quantized["MXFP4"])])
    assert "pyllm, llama.cpp" in capsys.readouterr().out


def _raw_gguf(path, type_id: int, nbytes: int, key=None) -> Path:
    """A GGUF v3 file written byte by byte (not by pyllm's writer, which always names its types):
    one tensor "w" of 2 x 64 values with block type type_id, and optionally pyllm.block_types."""
    import struct

    def string(v):
        return struct.pack("<Q", len(v.encode())) + v.encode()

    kv = [string("general.architecture") + struct.pack("<I", ValueType.STRING) + string("llama")]
    if key is not None:
        kv.append(string(PYLLM_BLOCK_TYPES_KEY) + struct.pack("<IIQ", ValueType.ARRAY, ValueType.STRING, len(key))
                  + b"".join(string(e) for e in key))
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kv)) + b"".join(kv)
    head += string("w") + struct.pack("<I2QIQ", 2, 64, 2, type_id, 0)
    head += b"\0" * (-len(head) % 32)
    path.write_bytes(head + bytes(nbytes))
    return path


@pytest.mark.parametrize("key, message", [
    (None, "has block type 1000, a pyllm-only id, but the file has no pyllm.block_types key"),
    (["FP6_E3M2=1003"], "has block type 1000, which pyllm.block_types does not name"),
    (["FP8_E4M3=1000"], "calls block type 1000 'FP8_E4M3', but to pyllm 1000 is NF4"),
    (["NF4"], "bad pyllm.block_types: bad entry 'NF4'"),
])
def test_reader_checks_pyllm_type_ids(tmp_path, key, message):
    path = _raw_gguf(tmp_path / "x.gguf", int(GGMLType.NF4), 2 * 34, key)
    with pytest.raises(PyllmError, match=message):
        GGUFFile(path)
    assert GGUFFile(_raw_gguf(tmp_path / "ok.gguf", int(GGMLType.NF4), 2 * 34, ["NF4=1000"])).pyllm_only_types == \
        [GGMLType.NF4]


def test_reader_refuses_unknown_pyllm_types(tmp_path):
    path = _raw_gguf(tmp_path / "future.gguf", 1099, 64, ["NF9=1099"])
    with pytest.raises(PyllmError, match=r"block type NF9 \(1099\), which this version of pyllm does not know"):
        GGUFFile(path)


def test_writer_replaces_a_stale_key(tmp_path, quantized):
    out = tmp_path / "back-to-q8.gguf"
    quantize_gguf(quantized["NF4"], out, "Q8_0", allow_requantize=True)
    g = GGUFFile(out)
    assert PYLLM_BLOCK_TYPES_KEY not in g.metadata and not g.pyllm_only_types


def test_cli_quantize_errors(tmp_path, capsys):
    from pyllm.cli.main import main

    assert main(["quantize", str(STORIES), str(tmp_path / "o.gguf"), "nf5"]) == 1
    err = capsys.readouterr().err
    assert "unknown type 'nf5'" in err and "NF4" in err and "SYM_INT4" in err
    # NaN weights: one line, no output file
    bad = tmp_path / "nan.gguf"
    w = GGUFWriter(bad)
    src = GGUFFile(STORIES)
    for k, v in src.metadata.items():
        w.add(k, v, *src.value_types[k])
    for n, t in src.tensors.items():
        x = src.array(n)
        if n == "blk.0.attn_q.weight":
            x = x.copy()
            x[3, 5] = np.nan
        w.add_tensor(n, x.shape, GGMLType.F32, lambda x=x: x)
    w.write()
    assert main(["quantize", "-q", str(bad), str(tmp_path / "o.gguf"), "fp6"]) == 1
    err = capsys.readouterr().err
    assert "tensor blk.0.attn_q.weight: NaN values cannot be stored as FP6_E3M2" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o.gguf").exists()


# -- llama.cpp -------------------------------------------------------------------------------------

needs_llama_cpp = pytest.mark.skipif(not BIN, reason="PYLLM_LLAMA_CPP_BIN (llama.cpp's build/bin) is not set")


@needs_llama_cpp
@pytest.mark.parametrize("name", ["NF4", "FP6"])
def test_llama_cpp_refuses_pyllm_only_files_cleanly(quantized, name):
    proc = subprocess.run([str(Path(BIN) / "llama-simple"), "-m", str(quantized[name]), "-n", "4", "Hello"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode > 0  # an error exit, not a signal (crash)
    assert "invalid ggml type" in proc.stderr


@needs_llama_cpp
def test_llama_cpp_runs_our_mxfp4_and_quantizes_it_the_same(tmp_path, quantized):
    proc = subprocess.run([str(Path(BIN) / "llama-simple"), "-m", str(quantized["MXFP4"]), "-n", "16",
                           "Once upon a time"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.split("Once upon a time", 1)[1].split()) >= 5
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    quantize_gguf(STORIES, ours, "MXFP4", pure=True)
    subprocess.run([str(Path(BIN) / "llama-quantize"), "--pure", str(STORIES), str(theirs), "MXFP4_MOE"],
                   capture_output=True, check=True, timeout=120)
    a, b = GGUFFile(ours), GGUFFile(theirs)
    n_mx = 0
    for name in a.tensors:
        assert a.tensors[name].qtype == b.tensors[name].qtype, name
        assert np.array_equal(a.raw(name), b.raw(name)), name
        n_mx += a.tensors[name].qtype == GGMLType.MXFP4
    assert n_mx >= 20
