"""numpy models of the SIMD and AMX instructions the kernels use, from the ISA's definition
(Intel SDM / Intrinsics Guide pseudo-code), written lane by lane in int64/float64.

They serve the tests in two ways: the portable kernels must equal the model applied to the
same data (so the portable code computes what the instruction sequence computes), and where
the host runs an instruction, the instruction must equal the model (tests/test_simd.py).
Shapes: the leading axes are batch; the last is the lanes of one 256-bit register.
"""

import numpy as np


def _sat16(v):
    return np.clip(v, -32768, 32767).astype(np.int16)


def _wrap32(v):
    return ((np.asarray(v, np.int64) + 2**31) % 2**32 - 2**31).astype(np.int32)


def maddubs(u, s):
    """vpmaddubsw: (..., 32) unsigned bytes x (..., 32) signed bytes -> (..., 16) int16:
    u[2i]*s[2i] + u[2i+1]*s[2i+1], saturated to the int16 range."""
    p = np.asarray(u, np.uint8).astype(np.int64) * np.asarray(s, np.int8).astype(np.int64)
    return _sat16(p[..., 0::2] + p[..., 1::2])


def madd(a, b):
    """vpmaddwd: (..., 16) int16 x (..., 16) int16 -> (..., 8) int32: a[2i]*b[2i] + a[2i+1]*b[2i+1]
    (wraps around only for -32768 * -32768 twice)."""
    p = np.asarray(a, np.int16).astype(np.int64) * np.asarray(b, np.int16).astype(np.int64)
    return _wrap32(p[..., 0::2] + p[..., 1::2])


def shuffle_bytes(table, idx):
    """vpshufb: (..., 32) bytes; lane i of half h (lanes 16h..16h+15) = table[16h + (idx[i] & 15)],
    or 0 where idx[i] has its top bit set."""
    t = np.asarray(table, np.int8)
    i = np.asarray(idx, np.int8)
    half = (np.arange(32) // 16) * 16
    picked = np.take_along_axis(t, np.broadcast_to(half + (i.astype(np.int64) & 15), i.shape), axis=-1)
    return np.where(i < 0, 0, picked).astype(np.int8)


def sign(a, b):
    """vpsignb: a where b > 0, -a where b < 0 (-(-128) stays -128), 0 where b == 0."""
    a64 = np.asarray(a, np.int8).astype(np.int64)
    b = np.asarray(b, np.int8)
    r = np.where(b > 0, a64, np.where(b < 0, -a64, 0))
    return ((r + 128) % 256 - 128).astype(np.int8)


def dpbusd(acc, u, s):
    """vpdpbusd: acc (..., 8) int32 + sum of the 4 products u[4i+k]*s[4i+k] (unsigned x signed
    bytes), no intermediate saturation, the int32 sum wrapping."""
    p = np.asarray(u, np.uint8).astype(np.int64) * np.asarray(s, np.int8).astype(np.int64)
    return _wrap32(np.asarray(acc, np.int64) + p.reshape(*p.shape[:-1], -1, 4).sum(-1))


def bf16_to_f32(h):
    return (np.asarray(h, np.uint16).astype(np.uint32) << 16).view(np.float32)


def dpbf16ps(acc, a, b):
    """vdpbf16ps: acc (..., 8) float32 + a[2i]*b[2i] + a[2i+1]*b[2i+1] of bfloat16 pairs (a, b:
    (..., 16) raw bf16 bits). Per the SDM: the odd product is added first, then the even one,
    each rounded to float32 (round to nearest even), denormal inputs and outputs flushed to 0."""
    def ftz(x):
        x = np.asarray(x, np.float32)
        return np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0.0), x).astype(np.float32)

    fa, fb = ftz(bf16_to_f32(a)), ftz(bf16_to_f32(b))
    out = ftz(np.asarray(acc, np.float32))
    out = ftz((out + fa[..., 1::2] * fb[..., 1::2]).astype(np.float32))
    return ftz((out + fa[..., 0::2] * fb[..., 0::2]).astype(np.float32))


# -- AMX ------------------------------------------------------------------------------------
# A tile is up to 16 rows of up to 64 bytes. tdpbssd/tdpbusd: C (M x N int32) += A (M x 4K
# bytes) . B, where B holds 4 consecutive K values of each column side by side (the "VNNI"
# layout: B is (K, 4N) bytes for a (4K x N) matrix). tdpbf16ps: the same with bf16 pairs.


def vnni_pack(b, group: int):
    """A (K, N) matrix -> the (K / group, N * group) tile layout: out[k // g, n * g + k % g] = b[k, n]
    (group 4 for int8, 2 for bf16)."""
    k, n = b.shape
    return b.reshape(k // group, group, n).transpose(0, 2, 1).reshape(k // group, n * group)


def tdpbssd(c, a, b_packed, a_unsigned: bool = False):
    """C (M, N) int32 += A (M, 4K) int8 (uint8 if a_unsigned: tdpbusd) . B (K, 4N) int8 VNNI.
    For each m, n: sum over k of the 4 products A[m, 4k+i] * B[k, 4n+i], in k order, int32 wrapping."""
    a64 = np.asarray(a, np.uint8 if a_unsigned else np.int8).astype(np.int64)
    b64 = np.asarray(b_packed, np.int8).astype(np.int64)
    m, kk = a64.shape
    k, n4 = b64.shape
    assert kk == 4 * k and m <= 16 and k <= 16 and n4 <= 64
    out = np.asarray(c, np.int64).copy()
    for kr in range(k):
        prod = a64[:, 4 * kr:4 * kr + 4][:, None, :] * b64[kr].reshape(-1, 4)[None, :, :]  # (M, N, 4)
        out = _wrap32(out + prod.sum(-1)).astype(np.int64)
    return out.astype(np.int32)


def tdpbf16ps(c, a, b_packed):
    """C (M, N) float32 += A (M, 2K) bf16 . B (K, 2N) bf16 VNNI: for each k in order, the odd
    product then the even one, each rounded to float32 (as dpbf16ps)."""
    a = np.asarray(a, np.uint16)
    b = np.asarray(b_packed, np.uint16)
    m, kk = a.shape
    k, n2 = b.shape
    assert kk == 2 * k and m <= 16 and k <= 16 and n2 <= 32
    out = np.asarray(c, np.float32).copy()
    for kr in range(k):
        pa = np.broadcast_to(a[:, 2 * kr:2 * kr + 2][:, None, :], (m, n2 // 2, 2)).reshape(m, -1)
        pb = np.broadcast_to(b[kr][None, :], (m, n2))
        out = dpbf16ps(out, pa, pb)
    return out
