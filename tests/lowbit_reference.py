"""A float64 numpy reference of pyllm's low-bit float block types, written from the specs.

Independent of kernels/lowbit.py on purpose: element values come from the OCP formulas
(sign, exponent field, mantissa field), encoding picks the nearest value from the list of
every finite code (no bit tricks), scales are searched, not computed from float bits.

OCP 8-bit Floating Point Specification (OFP8) v1.0: E4M3 (bias 7, no Inf, S.1111.111 NaN,
max 448) and E5M2 (bias 15, IEEE-like Inf/NaN, max 57344). OCP Microscaling Formats (MX) v1.0:
E3M2 (bias 3, no Inf/NaN, max 28), E2M1 (bias 1, max 6) and the E8M0 scale (2^(e-127),
0xFF NaN). NF4: the 16 levels of QLoRA (bitsandbytes functional.get_4bit_type("nf4")).
The block layouts and the rounding/saturation rules are pyllm's, as kernels/lowbit.py's
docstring states them.
"""

import functools
import math

import numpy as np

# name -> (exponent bits, mantissa bits, bias, has Inf, has NaN)
FORMATS = {
    "E4M3": (4, 3, 7, False, True),
    "E5M2": (5, 2, 15, True, True),
    "E3M2": (3, 2, 3, False, False),
    "E2M1": (2, 1, 1, False, False),
}


def n_codes(fmt: str) -> int:
    ebits, mbits = FORMATS[fmt][:2]
    return 1 << (1 + ebits + mbits)


def decode(fmt: str, code: int) -> float:
    """The value of one code, from the format's definition."""
    ebits, mbits, bias, has_inf, has_nan = FORMATS[fmt]
    sign = -1.0 if code >> (ebits + mbits) & 1 else 1.0
    e = (code >> mbits) & ((1 << ebits) - 1)
    m = code & ((1 << mbits) - 1)
    top = (1 << ebits) - 1
    if fmt == "E4M3" and e == top and m == (1 << mbits) - 1:
        return math.nan
    if fmt == "E5M2" and e == top:
        return sign * math.inf if m == 0 else math.nan
    if e == 0:
        return sign * m * 2.0 ** (1 - bias - mbits)
    return sign * (1 + m / 2**mbits) * 2.0 ** (e - bias)


def max_value(fmt: str) -> float:
    return max(v for v in map(lambda c: decode(fmt, c), range(n_codes(fmt))) if math.isfinite(v))


@functools.lru_cache(maxsize=None)
def _finite_positive_codes(fmt):
    ebits, mbits = FORMATS[fmt][:2]
    half = 1 << (ebits + mbits)
    codes = [c for c in range(half) if math.isfinite(decode(fmt, c))]
    return codes, np.array([decode(fmt, c) for c in codes])


def encode(fmt: str, v: float) -> int:
    """Nearest code to v, ties to the even code (mantissa LSB 0), finite values saturating at
    +-max; Inf -> Inf code (E5M2) or +-max; NaN -> 0x7F (E4M3) / 0x7E (E5M2) / +0 otherwise."""
    ebits, mbits, _, has_inf, has_nan = FORMATS[fmt]
    sign_bit = 1 << (ebits + mbits)
    if math.isnan(v):
        return {"E4M3": 0x7F, "E5M2": 0x7E}.get(fmt, 0)
    sign = sign_bit if math.copysign(1.0, v) < 0 else 0
    a = abs(v)
    codes, values = _finite_positive_codes(fmt)
    if math.isinf(a):
        return sign | (0x7C if has_inf else codes[-1])
    if a >= values[-1]:  # saturate (and keep float64 distances exact below)
        return sign | codes[-1]
    dist = np.abs(values - a)
    best = np.flatnonzero(dist == dist.min())
    pick = best[0] if len(best) == 1 else next(i for i in best if codes[i] % 2 == 0)
    return sign | codes[pick]


def scale_exponent(amax: float, fmt: str) -> int:
    """The s of the smallest 2^s with amax / 2^s <= max, clamped to E8M0's -127..127."""
    if not amax > 0:
        return -127
    mx = max_value(fmt)
    s = math.floor(math.log2(amax / mx)) - 2
    while amax > mx * 2.0**s:
        s += 1
    return max(-127, min(127, s))


def e8m0(e: int) -> float:
    return math.nan if e == 255 else 2.0 ** (e - 127)


def _finite_absmax(x) -> float:
    a = np.abs(np.asarray(x, dtype=np.float64))
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else 0.0


# -- blocks ---------------------------------------------------------------------------------------

ELEMENT = {"FP8_E4M3": "E4M3", "FP8_E5M2": "E5M2", "FP6_E3M2": "E3M2"}


def quantize_block_fp(name: str, x) -> bytes:
    """FP8_E4M3 / FP8_E5M2 / FP6_E3M2: 32 float32 values -> the block's bytes."""
    fmt = ELEMENT[name]
    s = scale_exponent(_finite_absmax(x), fmt)
    codes = [encode(fmt, float(v) / 2.0**s) for v in np.asarray(x, dtype=np.float64)]
    if name == "FP6_E3M2":
        return bytes([s + 127]) + pack_fp6(codes)
    return bytes([s + 127] + codes)


def pack_fp6(codes) -> bytes:
    """32 six-bit codes -> 24 bytes: element 8i + g is bits 6i.. of bytes g, 8+g, 16+g (LE)."""
    out = bytearray(24)
    for g in range(8):
        w = sum(codes[8 * i + g] << (6 * i) for i in range(4))
        out[g], out[8 + g], out[16 + g] = w & 255, (w >> 8) & 255, w >> 16
    return bytes(out)


def unpack_fp6(p: bytes) -> list[int]:
    codes = [0] * 32
    for g in range(8):
        w = p[g] | (p[8 + g] << 8) | (p[16 + g] << 16)
        for i in range(4):
            codes[8 * i + g] = (w >> (6 * i)) & 63
    return codes


def decode_block_fp(name: str, b: bytes) -> np.ndarray:
    fmt = ELEMENT[name]
    codes = unpack_fp6(b[1:25]) if name == "FP6_E3M2" else list(b[1:33])
    return np.array([e8m0(b[0]) * decode(fmt, c) for c in codes])


NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float32).astype(np.float64)


def quantize_block_nf4(x) -> bytes:
    """64 float32 values -> d:f16 + 32 bytes of nibbles (j low, j + 32 high)."""
    d = np.float16(min(_finite_absmax(x), 65504.0))  # numpy: round to nearest even
    df = float(d)
    codes = []
    for v in np.asarray(x, dtype=np.float64):
        if df == 0.0 or math.isnan(v):
            codes.append(7)
        elif math.isinf(v):
            codes.append(15 if v > 0 else 0)
        else:
            dist = np.abs(v - df * NF4)
            codes.append(int(np.flatnonzero(dist == dist.min())[0]))  # ties: the lower code
    return d.tobytes() + bytes(codes[j] | (codes[j + 32] << 4) for j in range(32))


def decode_block_nf4(b: bytes) -> np.ndarray:
    """float64 values; the kernel's float32 d * level is this rounded once to float32."""
    d = float(np.frombuffer(b[:2], dtype=np.float16)[0])
    q = np.frombuffer(b[2:34], dtype=np.uint8)
    codes = np.concatenate([q & 15, q >> 4])
    return d * NF4[codes]


def quantize_rows(name: str, x: np.ndarray) -> np.ndarray:
    """Whole rows of float32 -> uint8 (rows, row_bytes), block by block."""
    block = 64 if name == "NF4" else 32
    q = quantize_block_nf4 if name == "NF4" else (lambda blk: quantize_block_fp(name, blk))
    rows = [b"".join(q(r[i:i + block]) for i in range(0, len(r), block)) for r in np.asarray(x)]
    return np.array([np.frombuffer(r, dtype=np.uint8) for r in rows])


def dequantize_rows(name: str, data: np.ndarray, cols: int) -> np.ndarray:
    block, nbytes = (64, 34) if name == "NF4" else (32, 25 if name == "FP6_E3M2" else 33)
    dec = decode_block_nf4 if name == "NF4" else (lambda b: decode_block_fp(name, b))
    return np.array([np.concatenate([dec(bytes(r[nbytes * i:nbytes * (i + 1)])) for i in range(cols // block)])
                     for r in np.asarray(data)])
