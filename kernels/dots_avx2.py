"""AVX2 product kernels (vpmaddubsw, vpmaddwd, vcvtph2ps, FMA) for every block type.

Each mm_<type>(w, r0, r1, act, t0, t1, out, oc) fills out[t, oc + r] = row r of w . token t
of act for r0 <= r < r1, t0 <= t < t1, in tiles: four tokens at a time share each decoded weight block
(prefill, small batches), then one token at a time (decode). Tokens go in blocks of 32 (their
activations fit L2), rows inside a block (a row stays in L1 while the token tiles pass).

The integer work follows llama.cpp's x86 kernels (ggml-cpu/arch/x86/quants.c):
- 8-bit products: vpmaddubsw multiplies unsigned by signed bytes and adds pairs into int16,
  vpmaddwd adds pairs again (or multiplies by a sub-block scale) into int32 lanes. Signed
  weights go through vpsignb: |w| * (y * sign(w)), llama.cpp's mul_sum_i8_pairs_float.
- Per block: float lanes accumulate d * float(int lanes) with an FMA; one horizontal sum per
  row and token at the end.
- K-quants keep the sub-block-scaled sums in int32 lanes over a whole 256-element super-block;
  the mins (and Q6_K/Q3_K's offsets) meet the activation's 16-element sums (Q8_K bsums) in
  one vpmaddwd.

No intermediate int16 sum can saturate: |pair| <= 2 * 128 * 127 (Q8_0), 2 * 63 * 127 (Q6_K).
The per-lane integer sums equal the portable kernels' (kernels/dots.py) block sums exactly;
the floats differ by rounding (another summation order).

These need AVX2, FMA and F16C (kernels/cpu.py: AVX2); the *_vnni variants replace
vpmaddubsw + vpmaddwd by one vpdpbusd and need AVX-512 VNNI (AVX512VNNI). kernels/blocks.py
only hands a kernel out on a host that has its instructions.
"""

import numpy as np
from numba import njit, prange
from pyllm.kernels.lowbit import NF4_HI, NF4_HI_OFFSET, NF4_HIU, NF4_LO, NF4_SHIFT
from pyllm.kernels.quants import u32_at
from pyllm.kernels.simd import (
    bcast4,
    bcast_i16x2,
    bits_to_bytes,
    cvt_f32,
    dpbusd,
    f16_at,
    f32_at,
    f32_from_bits,
    fmadd,
    hsum_f32,
    lanes_i16,
    load_bf16x8,
    load_f16x8,
    load_f32x8,
    load_f32x8_bytes,
    load_i8x16_as_i16,
    load_i8x32,
    load_i16x16,
    load_nibbles,
    load_u8x8_twice_i16,
    load_u8x16_as_i16,
    madd,
    maddubs,
    pairs_i16,
    shuffle_bytes,
    sign,
    splat_f32,
    splat_i8,
    splat_i16,
    splat_i32,
    store_f32x8,
    twice_i16,
    u32x4_as_i16,
    vadd,
    vand,
    vmul,
    vor,
    vshl,
    vshr,
    vsub,
    zero_f32,
    zero_i16,
    zero_i32,
)

# -- shared pieces --------------------------------------------------------------------------


@njit(inline="always")
def _dot_u8s8(u, s):
    """int32 lanes: sums of 4 products of unsigned bytes u and signed bytes s."""
    return madd(maddubs(u, s), splat_i16(1))


@njit(inline="always")
def _dot_u8s8_vnni(u, s):
    """The same in one vpdpbusd (AVX-512 VNNI); equal, as no int16 sum here saturates."""
    return dpbusd(zero_i32(), u, s)


TOKEN_BLOCK = 32  # tokens whose activations (32 x 6 KB of floats at most here) share L2


def _tiled(x1, x4):
    """The rows x tokens loop around a type's one-token and four-token row kernels."""

    @njit(fastmath=True)
    def mm(w, r0, r1, act, t0, t1, out, oc):
        for b0 in range(t0, t1, TOKEN_BLOCK):  # a block of tokens stays in L2 ...
            b1 = min(b0 + TOKEN_BLOCK, t1)
            for r in range(r0, r1):  # ... and a row in L1 while its token tiles pass
                t = b0
                while t + 4 <= b1:
                    x4(w[r], act, t, out, oc + r)
                    t += 4
                while t < b1:
                    out[t, oc + r] = x1(w[r], act, t)
                    t += 1

    return mm


# -- Q8_0 x Q8_0, Q4_0 x Q8_0, Q5_0 x Q8_0: signed quants, one f16 scale per 32 --------------


@njit(inline="always")
def _q8_0_quants(row, o):
    return load_i8x32(row, o + 2)


@njit(inline="always")
def _q4_0_quants(row, o):
    return vsub(load_nibbles(row, o + 2), splat_i8(8))


@njit(inline="always")
def _q5_0_quants(row, o):
    # nibble | 0xF0 where the fifth bit is clear: the signed value q - 16 in one byte
    clear = vadd(bits_to_bytes(u32_at(row, o + 2)), splat_i8(1))  # 1 where clear, 0 where set
    hi = vand(vsub(splat_i8(0), clear), splat_i8(-16))
    return vor(load_nibbles(row, o + 6), hi)


def _signed32(size, quants, dot_u8s8):
    """Kernels for a signed block type of `size` bytes per 32 weights, scale f16 at offset 0;
    signed x signed goes through vpsignb: |w| . (y * sign(w))."""

    @njit(inline="always", fastmath=True)
    def x1(row, act, t):
        y, dy = act.q8[t], act.d8[t]
        nb = row.shape[0] // size
        acc0 = zero_f32()
        acc1 = zero_f32()
        b = 0
        while b + 2 <= nb:  # two chains of FMAs, so their latency overlaps
            o = size * b
            q0, q1 = quants(row, o), quants(row, o + size)
            p0 = cvt_f32(dot_u8s8(sign(q0, q0), sign(load_i8x32(y, 32 * b), q0)))
            acc0 = fmadd(splat_f32(f16_at(row, o) * dy[b]), p0, acc0)
            p1 = cvt_f32(dot_u8s8(sign(q1, q1), sign(load_i8x32(y, 32 * b + 32), q1)))
            acc1 = fmadd(splat_f32(f16_at(row, o + size) * dy[b + 1]), p1, acc1)
            b += 2
        if b < nb:
            o = size * b
            q0 = quants(row, o)
            p0 = cvt_f32(dot_u8s8(sign(q0, q0), sign(load_i8x32(y, 32 * b), q0)))
            acc0 = fmadd(splat_f32(f16_at(row, o) * dy[b]), p0, acc0)
        return hsum_f32(vadd(acc0, acc1))

    @njit(inline="always", fastmath=True)
    def x4(row, act, t, out, r):
        y0, y1, y2, y3 = act.q8[t], act.q8[t + 1], act.q8[t + 2], act.q8[t + 3]
        d0, d1, d2, d3 = act.d8[t], act.d8[t + 1], act.d8[t + 2], act.d8[t + 3]
        a0 = zero_f32()
        a1 = zero_f32()
        a2 = zero_f32()
        a3 = zero_f32()
        for b in range(row.shape[0] // size):
            o = size * b
            q = quants(row, o)
            aq = sign(q, q)
            dw = f16_at(row, o)
            a0 = fmadd(splat_f32(dw * d0[b]), cvt_f32(dot_u8s8(aq, sign(load_i8x32(y0, 32 * b), q))), a0)
            a1 = fmadd(splat_f32(dw * d1[b]), cvt_f32(dot_u8s8(aq, sign(load_i8x32(y1, 32 * b), q))), a1)
            a2 = fmadd(splat_f32(dw * d2[b]), cvt_f32(dot_u8s8(aq, sign(load_i8x32(y2, 32 * b), q))), a2)
            a3 = fmadd(splat_f32(dw * d3[b]), cvt_f32(dot_u8s8(aq, sign(load_i8x32(y3, 32 * b), q))), a3)
        out[t, r] = hsum_f32(a0)
        out[t + 1, r] = hsum_f32(a1)
        out[t + 2, r] = hsum_f32(a2)
        out[t + 3, r] = hsum_f32(a3)

    return _tiled(x1, x4)


mm_q8_0 = _signed32(34, _q8_0_quants, _dot_u8s8)
mm_q4_0 = _signed32(18, _q4_0_quants, _dot_u8s8)
mm_q5_0 = _signed32(22, _q5_0_quants, _dot_u8s8)
mm_q8_0_vnni = _signed32(34, _q8_0_quants, _dot_u8s8_vnni)
mm_q4_0_vnni = _signed32(18, _q4_0_quants, _dot_u8s8_vnni)
mm_q5_0_vnni = _signed32(22, _q5_0_quants, _dot_u8s8_vnni)


# -- NF4 x Q8_0: 16 float levels in fixed point, looked up with vpshufb ----------------------
# lowbit.NF4_INT = 128 * NF4_HI + NF4_LO: the low 7 bits (0..127) meet y in one vpmaddubsw, the
# signed rest (-32..32) in another through vpsignb, as Q4_0's; neither int16 pair sum saturates
# (2 * 127 * 127, 2 * 32 * 127). Per 64-value block: d at 0, the low nibbles of qs[32] (at 2)
# are values 0..31 (activation block 2b), the high nibbles 32..63 (block 2b + 1).

_NF4_SCALE = np.float32(2.0 ** -NF4_SHIFT)


@njit(inline="always")
def _nf4_codes(row, o, shift):
    """(low parts, |high parts|, high parts) of the 32 levels in nibble `shift` of row[o:o+32]."""
    idx = vand(vshr(load_i8x32(row, o), shift), splat_i8(15))
    hi = shuffle_bytes(load_i8x32(NF4_HI, 0), idx)
    return shuffle_bytes(load_i8x32(NF4_LO, 0), idx), sign(hi, hi), hi


@njit(inline="always")
def _nf4_sums(codes, y, yo):
    """int32 lanes of sum_j NF4_INT[code_j] * y[yo + j] over the 32 values of codes."""
    lo, ahi, hi = codes
    yv = load_i8x32(y, yo)
    return vadd(madd(maddubs(lo, yv), splat_i16(1)), madd(maddubs(ahi, sign(yv, hi)), splat_i16(128)))


@njit(inline="always", fastmath=True)
def _nf4_x1(row, act, t):
    y, dy = act.q8[t], act.d8[t]
    acc0 = zero_f32()
    acc1 = zero_f32()
    for b in range(row.shape[0] // 34):
        o = 34 * b
        d = f16_at(row, o) * _NF4_SCALE
        acc0 = fmadd(splat_f32(d * dy[2 * b]), cvt_f32(_nf4_sums(_nf4_codes(row, o + 2, 0), y, 64 * b)), acc0)
        acc1 = fmadd(splat_f32(d * dy[2 * b + 1]), cvt_f32(_nf4_sums(_nf4_codes(row, o + 2, 4), y, 64 * b + 32)),
                     acc1)
    return hsum_f32(vadd(acc0, acc1))


@njit(inline="always", fastmath=True)
def _nf4_x4(row, act, t, out, r):
    y0, y1, y2, y3 = act.q8[t], act.q8[t + 1], act.q8[t + 2], act.q8[t + 3]
    d0, d1, d2, d3 = act.d8[t], act.d8[t + 1], act.d8[t + 2], act.d8[t + 3]
    a0 = zero_f32()
    a1 = zero_f32()
    a2 = zero_f32()
    a3 = zero_f32()
    for b in range(row.shape[0] // 34):
        o = 34 * b
        d = f16_at(row, o) * _NF4_SCALE
        for half in range(2):
            c = _nf4_codes(row, o + 2, 4 * half)
            yo, k = 64 * b + 32 * half, 2 * b + half
            a0 = fmadd(splat_f32(d * d0[k]), cvt_f32(_nf4_sums(c, y0, yo)), a0)
            a1 = fmadd(splat_f32(d * d1[k]), cvt_f32(_nf4_sums(c, y1, yo)), a1)
            a2 = fmadd(splat_f32(d * d2[k]), cvt_f32(_nf4_sums(c, y2, yo)), a2)
            a3 = fmadd(splat_f32(d * d3[k]), cvt_f32(_nf4_sums(c, y3, yo)), a3)
    out[t, r] = hsum_f32(a0)
    out[t + 1, r] = hsum_f32(a1)
    out[t + 2, r] = hsum_f32(a2)
    out[t + 3, r] = hsum_f32(a3)


mm_nf4 = _tiled(_nf4_x1, _nf4_x4)


# -- Q4_1 x Q8_1, Q5_1 x Q8_1: unsigned quants, scale d and min m per 32 -----------------------


@njit(inline="always")
def _q4_1_quants(row, o):
    return load_nibbles(row, o + 4)


@njit(inline="always")
def _q5_1_quants(row, o):
    return vor(load_nibbles(row, o + 8), vand(bits_to_bytes(u32_at(row, o + 4)), splat_i8(16)))


def _affine32(size, quants, _dot_u8s8):
    """Kernels for an unsigned block type with d (f16 at 0) and min m (f16 at 2)."""

    @njit(inline="always", fastmath=True)
    def x1(row, act, t):
        y, dy, sy = act.q8[t], act.d8[t], act.s8[t]
        nb = row.shape[0] // size
        acc0 = zero_f32()
        acc1 = zero_f32()
        mins = np.float32(0.0)
        b = 0
        while b + 2 <= nb:
            o = size * b
            p0 = cvt_f32(_dot_u8s8(quants(row, o), load_i8x32(y, 32 * b)))
            acc0 = fmadd(splat_f32(f16_at(row, o) * dy[b]), p0, acc0)
            p1 = cvt_f32(_dot_u8s8(quants(row, o + size), load_i8x32(y, 32 * b + 32)))
            acc1 = fmadd(splat_f32(f16_at(row, o + size) * dy[b + 1]), p1, acc1)
            mins += f16_at(row, o + 2) * sy[b] + f16_at(row, o + size + 2) * sy[b + 1]
            b += 2
        if b < nb:
            o = size * b
            p0 = cvt_f32(_dot_u8s8(quants(row, o), load_i8x32(y, 32 * b)))
            acc0 = fmadd(splat_f32(f16_at(row, o) * dy[b]), p0, acc0)
            mins += f16_at(row, o + 2) * sy[b]
        return hsum_f32(vadd(acc0, acc1)) + mins

    @njit(inline="always", fastmath=True)
    def x4(row, act, t, out, r):
        y0, y1, y2, y3 = act.q8[t], act.q8[t + 1], act.q8[t + 2], act.q8[t + 3]
        d0, d1, d2, d3 = act.d8[t], act.d8[t + 1], act.d8[t + 2], act.d8[t + 3]
        s0, s1, s2, s3 = act.s8[t], act.s8[t + 1], act.s8[t + 2], act.s8[t + 3]
        a0 = zero_f32()
        a1 = zero_f32()
        a2 = zero_f32()
        a3 = zero_f32()
        m0 = np.float32(0.0)
        m1 = np.float32(0.0)
        m2 = np.float32(0.0)
        m3 = np.float32(0.0)
        for b in range(row.shape[0] // size):
            o = size * b
            q = quants(row, o)
            dw, mw = f16_at(row, o), f16_at(row, o + 2)
            a0 = fmadd(splat_f32(dw * d0[b]), cvt_f32(_dot_u8s8(q, load_i8x32(y0, 32 * b))), a0)
            a1 = fmadd(splat_f32(dw * d1[b]), cvt_f32(_dot_u8s8(q, load_i8x32(y1, 32 * b))), a1)
            a2 = fmadd(splat_f32(dw * d2[b]), cvt_f32(_dot_u8s8(q, load_i8x32(y2, 32 * b))), a2)
            a3 = fmadd(splat_f32(dw * d3[b]), cvt_f32(_dot_u8s8(q, load_i8x32(y3, 32 * b))), a3)
            m0 += mw * s0[b]
            m1 += mw * s1[b]
            m2 += mw * s2[b]
            m3 += mw * s3[b]
        out[t, r] = hsum_f32(a0) + m0
        out[t + 1, r] = hsum_f32(a1) + m1
        out[t + 2, r] = hsum_f32(a2) + m2
        out[t + 3, r] = hsum_f32(a3) + m3

    return _tiled(x1, x4)


mm_q4_1 = _affine32(20, _q4_1_quants, _dot_u8s8)
mm_q5_1 = _affine32(24, _q5_1_quants, _dot_u8s8)
mm_q4_1_vnni = _affine32(20, _q4_1_quants, _dot_u8s8_vnni)
mm_q5_1_vnni = _affine32(24, _q5_1_quants, _dot_u8s8_vnni)


# -- K-quants x Q8_K: 256-element super-blocks, sub-block scales as int16 lanes ----------------
# Each *_int(row, o, y, yo, sc) returns the int32 lanes of sum_k scale_k * (quants_k . y_k)
# for the super-block at row[o] against activation quants y[yo:yo + 256]; each *_block scales
# them by d * dy and adds the mins (or offsets) through the activation's bsums.

K4_MASK1 = np.uint32(0x3F3F3F3F)
K4_MASK2 = np.uint32(0x0F0F0F0F)
K4_MASK3 = np.uint32(0x03030303)


@njit(inline="always")
def _k4_scales(row, o):
    """Q4_K/Q5_K: the 8 six-bit scales (lanes 0..7) and 8 mins (lanes 8..15) of the
    super-block at row[o], from the 12 packed bytes at o + 4 (llama.cpp's utmp shuffle)."""
    a0, a1, a2 = u32_at(row, o + 4), u32_at(row, o + 8), u32_at(row, o + 12)
    m_hi = ((a2 >> 4) & K4_MASK2) | (((a1 >> 6) & K4_MASK3) << 4)
    s_hi = (a2 & K4_MASK2) | (((a0 >> 6) & K4_MASK3) << 4)
    return u32x4_as_i16(a0 & K4_MASK1, s_hi, a1 & K4_MASK1, m_hi)


@njit(inline="always")
def _scaled(sc, ja, jb, q, y, yo):
    """int32 lanes: scale lanes ja (bytes 0..15) and jb (16..31) times the pair sums of q . y."""
    return madd(lanes_i16(sc, ja, jb), maddubs(q, load_i8x32(y, yo)))


@njit(inline="always")
def _q4_k_int(row, o, y, yo, sc):
    # sub-blocks 2c and 2c+1 are the low and high nibbles of qs[32c:32c+32] (qs at o + 16)
    m4 = splat_i8(15)
    s = zero_i32()
    for c in range(4):
        q = load_i8x32(row, o + 16 + 32 * c)
        s = vadd(s, vadd(_scaled(sc, 2 * c, 2 * c, vand(q, m4), y, yo + 64 * c),
                         _scaled(sc, 2 * c + 1, 2 * c + 1, vand(vshr(q, 4), m4), y, yo + 64 * c + 32)))
    return s


@njit(inline="always")
def _q5_k_int(row, o, y, yo, sc):
    # as Q4_K (qs at o + 48), with bit 4 of sub-block j's quants from bit j of qh[l] (o + 16)
    m4 = splat_i8(15)
    one = splat_i8(1)
    qh = load_i8x32(row, o + 16)
    s = zero_i32()
    for c in range(4):
        q = load_i8x32(row, o + 48 + 32 * c)
        lo = vor(vand(q, m4), vshl(vand(vshr(qh, 2 * c), one), 4))
        hi = vor(vand(vshr(q, 4), m4), vshl(vand(vshr(qh, 2 * c + 1), one), 4))
        s = vadd(s, vadd(_scaled(sc, 2 * c, 2 * c, lo, y, yo + 64 * c),
                         _scaled(sc, 2 * c + 1, 2 * c + 1, hi, y, yo + 64 * c + 32)))
    return s


def _super(size, block):
    """Tiles for a K-quant of `size` bytes per 256 weights. block(row, b, y, dy, bs, acc) adds
    super-block b's product with one token (quants y, scales dy, bsums bs) to acc. The
    four-token kernel calls it four times per super-block with the same row bytes: once
    inlined, LLVM computes the weight side (unpacked quants, scales) once for the four."""

    @njit(inline="always", fastmath=True)
    def x1(row, act, t):
        y, dy, bs = act.qk[t], act.dk[t], act.bk[t]
        acc = zero_f32()
        for b in range(row.shape[0] // size):
            acc = block(row, b, y, dy, bs, acc)
        return hsum_f32(acc)

    @njit(inline="always", fastmath=True)
    def x4(row, act, t, out, r):
        y0, y1, y2, y3 = act.qk[t], act.qk[t + 1], act.qk[t + 2], act.qk[t + 3]
        d0, d1, d2, d3 = act.dk[t], act.dk[t + 1], act.dk[t + 2], act.dk[t + 3]
        s0, s1, s2, s3 = act.bk[t], act.bk[t + 1], act.bk[t + 2], act.bk[t + 3]
        a0 = zero_f32()
        a1 = zero_f32()
        a2 = zero_f32()
        a3 = zero_f32()
        for b in range(row.shape[0] // size):
            a0 = block(row, b, y0, d0, s0, a0)
            a1 = block(row, b, y1, d1, s1, a1)
            a2 = block(row, b, y2, d2, s2, a2)
            a3 = block(row, b, y3, d3, s3, a3)
        out[t, r] = hsum_f32(a0)
        out[t + 1, r] = hsum_f32(a1)
        out[t + 2, r] = hsum_f32(a2)
        out[t + 3, r] = hsum_f32(a3)

    return _tiled(x1, x4)


def _k4_block(size, integer):
    """Q4_K / Q5_K: d, dmin (f16 at 0, 2), 8 sub-blocks of 32 with six-bit scales and mins."""

    @njit(inline="always", fastmath=True)
    def block(row, b, y, dy, bs, acc):
        o = size * b
        sc = _k4_scales(row, o)
        mins = madd(pairs_i16(sc, 8), load_i16x16(bs, 16 * b))  # m_j * (bsum_2j + bsum_2j+1)
        acc = fmadd(splat_f32(dy[b] * f16_at(row, o)), cvt_f32(integer(row, o, y, 256 * b, sc)), acc)
        return fmadd(splat_f32(-dy[b] * f16_at(row, o + 2)), cvt_f32(mins), acc)

    return block


mm_q4_k = _super(144, _k4_block(144, _q4_k_int))
mm_q5_k = _super(176, _k4_block(176, _q5_k_int))


@njit(inline="always")
def _q6_k_int(row, o, y, yo, sc):
    # ql[128] @0, qh[64] @128. Half h, group s (32 elements at 128h + 32s): low nibble s // 2
    # of ql[64h + 32(s % 2):], bits 2s of qh[32h:]. Unsigned 0..63; the caller removes the -32.
    m4 = splat_i8(15)
    m3 = splat_i8(3)
    s = zero_i32()
    for h in range(2):
        l1 = load_i8x32(row, o + 64 * h)
        l2 = load_i8x32(row, o + 64 * h + 32)
        hb = load_i8x32(row, o + 128 + 32 * h)
        k, yb = 8 * h, yo + 128 * h
        s = vadd(s, _scaled(sc, k, k + 1, vor(vand(l1, m4), vshl(vand(hb, m3), 4)), y, yb))
        s = vadd(s, _scaled(sc, k + 2, k + 3, vor(vand(l2, m4), vshl(vand(vshr(hb, 2), m3), 4)), y, yb + 32))
        s = vadd(s, _scaled(sc, k + 4, k + 5, vor(vshr(l1, 4), vshl(vand(vshr(hb, 4), m3), 4)), y, yb + 64))
        s = vadd(s, _scaled(sc, k + 6, k + 7, vor(vshr(l2, 4), vshl(vshr(hb, 6), 4)), y, yb + 96))
    return s


@njit(inline="always", fastmath=True)
def _q6_k_block(row, b, y, dy, bs, acc):
    # scales int8[16] @192, d @208
    o = 210 * b
    sc = load_i8x16_as_i16(row, o + 192)
    offset = vshl(madd(sc, load_i16x16(bs, 16 * b)), 5)  # 32 * sum_k scale_k * bsum_k
    integer = vsub(_q6_k_int(row, o, y, 256 * b, sc), offset)
    return fmadd(splat_f32(dy[b] * f16_at(row, o + 208)), cvt_f32(integer), acc)


mm_q6_k = _super(210, _q6_k_block)


@njit(inline="always")
def _q2_k_int(row, o, y, yo, sc):
    # qs[64] @16: element 128h + 32s + l is bits 2s of qs[32h + l]
    m3 = splat_i8(3)
    s = zero_i32()
    for h in range(2):
        q = load_i8x32(row, o + 16 + 32 * h)
        k, yb = 8 * h, yo + 128 * h
        s = vadd(s, _scaled(sc, k, k + 1, vand(q, m3), y, yb))
        s = vadd(s, _scaled(sc, k + 2, k + 3, vand(vshr(q, 2), m3), y, yb + 32))
        s = vadd(s, _scaled(sc, k + 4, k + 5, vand(vshr(q, 4), m3), y, yb + 64))
        s = vadd(s, _scaled(sc, k + 6, k + 7, vshr(q, 6), y, yb + 96))
    return s


@njit(inline="always", fastmath=True)
def _q2_k_block(row, b, y, dy, bs, acc):
    # scales[16] @0 (low nibble scale, high nibble min), d @80, dmin @82
    o = 84 * b
    packed = load_u8x16_as_i16(row, o)
    mins = madd(vshr(packed, 4), load_i16x16(bs, 16 * b))
    integer = _q2_k_int(row, o, y, 256 * b, vand(packed, splat_i16(15)))
    acc = fmadd(splat_f32(dy[b] * f16_at(row, o + 80)), cvt_f32(integer), acc)
    return fmadd(splat_f32(-dy[b] * f16_at(row, o + 82)), cvt_f32(mins), acc)


mm_q2_k = _super(84, _q2_k_block)


@njit(inline="always")
def _q3_k_scales(row, o):
    """Q3_K: the 16 six-bit scales minus 32, as int16 lanes (llama.cpp's utmp shuffle of the
    12 bytes at o + 96)."""
    a0, a1, a2 = u32_at(row, o + 96), u32_at(row, o + 100), u32_at(row, o + 104)
    s0 = (a0 & K4_MASK2) | ((a2 & K4_MASK3) << 4)
    s1 = (a1 & K4_MASK2) | (((a2 >> 2) & K4_MASK3) << 4)
    s2 = ((a0 >> 4) & K4_MASK2) | (((a2 >> 4) & K4_MASK3) << 4)
    s3 = ((a1 >> 4) & K4_MASK2) | (((a2 >> 6) & K4_MASK3) << 4)
    return vsub(u32x4_as_i16(s0, s1, s2, s3), splat_i16(32))


@njit(inline="always")
def _q3_high(hm, bit):
    """4 where bit `bit` of each hmask byte is set, else 0."""
    return vshl(vand(vshr(hm, bit), splat_i8(1)), 2)


@njit(inline="always")
def _q3_k_int(row, o, y, yo, sc):
    # hmask[32] @0, qs[64] @32: element 128h + 32s + l is bits 2s of qs[32h + l], plus 4 when
    # bit 4h + s of hmask[l] is set (quants + 4, unsigned 0..7); the caller removes the 4.
    m3 = splat_i8(3)
    hm = load_i8x32(row, o)
    s = zero_i32()
    for h in range(2):
        q = load_i8x32(row, o + 32 + 32 * h)
        k, yb = 8 * h, yo + 128 * h
        s = vadd(s, _scaled(sc, k, k + 1, vor(vand(q, m3), _q3_high(hm, 4 * h)), y, yb))
        s = vadd(s, _scaled(sc, k + 2, k + 3, vor(vand(vshr(q, 2), m3), _q3_high(hm, 4 * h + 1)), y, yb + 32))
        s = vadd(s, _scaled(sc, k + 4, k + 5, vor(vand(vshr(q, 4), m3), _q3_high(hm, 4 * h + 2)), y, yb + 64))
        s = vadd(s, _scaled(sc, k + 6, k + 7, vor(vshr(q, 6), _q3_high(hm, 4 * h + 3)), y, yb + 96))
    return s


@njit(inline="always", fastmath=True)
def _q3_k_block(row, b, y, dy, bs, acc):
    # scales[12] @96, d @108
    o = 110 * b
    sc = _q3_k_scales(row, o)
    offset = vshl(madd(sc, load_i16x16(bs, 16 * b)), 2)  # 4 * sum_k scale_k * bsum_k
    integer = vsub(_q3_k_int(row, o, y, 256 * b, sc), offset)
    return fmadd(splat_f32(dy[b] * f16_at(row, o + 108)), cvt_f32(integer), acc)


mm_q3_k = _super(110, _q3_k_block)


# -- float weights: F32, F16 (vcvtph2ps), BF16 (a shift) against the float activation ---------


def _float(load, scalar, width):
    """Kernels for float weights of `width` bytes each: 8 at a time through load(row, byte),
    the tail of a row that is not a multiple of 8 through scalar(row, byte)."""

    @njit(inline="always", fastmath=True)
    def x1(row, act, t):
        x = act.xf[t]
        n = row.shape[0] // width
        acc0 = zero_f32()
        acc1 = zero_f32()
        j = 0
        while j + 16 <= n:
            acc0 = fmadd(load(row, width * j), load_f32x8(x, j), acc0)
            acc1 = fmadd(load(row, width * (j + 8)), load_f32x8(x, j + 8), acc1)
            j += 16
        if j + 8 <= n:
            acc0 = fmadd(load(row, width * j), load_f32x8(x, j), acc0)
            j += 8
        total = hsum_f32(vadd(acc0, acc1))
        while j < n:
            total += scalar(row, width * j) * x[j]
            j += 1
        return total

    @njit(inline="always", fastmath=True)
    def x4(row, act, t, out, r):
        x0, x1_, x2, x3 = act.xf[t], act.xf[t + 1], act.xf[t + 2], act.xf[t + 3]
        a0 = zero_f32()
        a1 = zero_f32()
        a2 = zero_f32()
        a3 = zero_f32()
        n = row.shape[0] // width
        j = 0
        while j + 8 <= n:
            w = load(row, width * j)
            a0 = fmadd(w, load_f32x8(x0, j), a0)
            a1 = fmadd(w, load_f32x8(x1_, j), a1)
            a2 = fmadd(w, load_f32x8(x2, j), a2)
            a3 = fmadd(w, load_f32x8(x3, j), a3)
            j += 8
        s0, s1, s2, s3 = hsum_f32(a0), hsum_f32(a1), hsum_f32(a2), hsum_f32(a3)
        while j < n:
            w1 = scalar(row, width * j)
            s0 += w1 * x0[j]
            s1 += w1 * x1_[j]
            s2 += w1 * x2[j]
            s3 += w1 * x3[j]
            j += 1
        out[t, r] = s0
        out[t + 1, r] = s1
        out[t + 2, r] = s2
        out[t + 3, r] = s3

    @njit(inline="always", fastmath=True)
    def x4x2(ra, rb, act, t, out, r):
        """x4 for rows r (ra) and r + 1 (rb) at once: each weight vector meets four tokens and
        each token vector two rows, 8 FMAs per 6 loads (x4: 4 per 5, bound by the loads). Every
        (row, token) sum is accumulated in x4's order, so the results are x4's, bit for bit."""
        x0, x1_, x2, x3 = act.xf[t], act.xf[t + 1], act.xf[t + 2], act.xf[t + 3]
        a0 = zero_f32()
        a1 = zero_f32()
        a2 = zero_f32()
        a3 = zero_f32()
        b0 = zero_f32()
        b1 = zero_f32()
        b2 = zero_f32()
        b3 = zero_f32()
        n = ra.shape[0] // width
        j = 0
        while j + 8 <= n:
            wa = load(ra, width * j)
            wb = load(rb, width * j)
            v = load_f32x8(x0, j)
            a0 = fmadd(wa, v, a0)
            b0 = fmadd(wb, v, b0)
            v = load_f32x8(x1_, j)
            a1 = fmadd(wa, v, a1)
            b1 = fmadd(wb, v, b1)
            v = load_f32x8(x2, j)
            a2 = fmadd(wa, v, a2)
            b2 = fmadd(wb, v, b2)
            v = load_f32x8(x3, j)
            a3 = fmadd(wa, v, a3)
            b3 = fmadd(wb, v, b3)
            j += 8
        sa0, sa1, sa2, sa3 = hsum_f32(a0), hsum_f32(a1), hsum_f32(a2), hsum_f32(a3)
        sb0, sb1, sb2, sb3 = hsum_f32(b0), hsum_f32(b1), hsum_f32(b2), hsum_f32(b3)
        while j < n:
            wa1 = scalar(ra, width * j)
            wb1 = scalar(rb, width * j)
            sa0 += wa1 * x0[j]
            sa1 += wa1 * x1_[j]
            sa2 += wa1 * x2[j]
            sa3 += wa1 * x3[j]
            sb0 += wb1 * x0[j]
            sb1 += wb1 * x1_[j]
            sb2 += wb1 * x2[j]
            sb3 += wb1 * x3[j]
            j += 1
        out[t, r] = sa0
        out[t + 1, r] = sa1
        out[t + 2, r] = sa2
        out[t + 3, r] = sa3
        out[t, r + 1] = sb0
        out[t + 1, r + 1] = sb1
        out[t + 2, r + 1] = sb2
        out[t + 3, r + 1] = sb3

    @njit(inline="always", fastmath=True)
    def x4x3(ra, rb, rc, act, t, out, r):
        """x4 for rows r, r + 1, r + 2 at once: 12 accumulators, 12 FMAs per 3 weight and 4 token
        loads (x4x2: 8 per 2 and 4), in x4's order per (row, token), so x4's results bit for bit."""
        x0, x1_, x2, x3 = act.xf[t], act.xf[t + 1], act.xf[t + 2], act.xf[t + 3]
        a0 = zero_f32()
        a1 = zero_f32()
        a2 = zero_f32()
        a3 = zero_f32()
        b0 = zero_f32()
        b1 = zero_f32()
        b2 = zero_f32()
        b3 = zero_f32()
        c0 = zero_f32()
        c1 = zero_f32()
        c2 = zero_f32()
        c3 = zero_f32()
        n = ra.shape[0] // width
        j = 0
        while j + 8 <= n:
            wa = load(ra, width * j)
            wb = load(rb, width * j)
            wc = load(rc, width * j)
            v = load_f32x8(x0, j)
            a0 = fmadd(wa, v, a0)
            b0 = fmadd(wb, v, b0)
            c0 = fmadd(wc, v, c0)
            v = load_f32x8(x1_, j)
            a1 = fmadd(wa, v, a1)
            b1 = fmadd(wb, v, b1)
            c1 = fmadd(wc, v, c1)
            v = load_f32x8(x2, j)
            a2 = fmadd(wa, v, a2)
            b2 = fmadd(wb, v, b2)
            c2 = fmadd(wc, v, c2)
            v = load_f32x8(x3, j)
            a3 = fmadd(wa, v, a3)
            b3 = fmadd(wb, v, b3)
            c3 = fmadd(wc, v, c3)
            j += 8
        sa = (hsum_f32(a0), hsum_f32(a1), hsum_f32(a2), hsum_f32(a3))
        sb = (hsum_f32(b0), hsum_f32(b1), hsum_f32(b2), hsum_f32(b3))
        sc = (hsum_f32(c0), hsum_f32(c1), hsum_f32(c2), hsum_f32(c3))
        sa0, sa1, sa2, sa3 = sa
        sb0, sb1, sb2, sb3 = sb
        sc0, sc1, sc2, sc3 = sc
        while j < n:
            wa1, wb1, wc1 = scalar(ra, width * j), scalar(rb, width * j), scalar(rc, width * j)
            sa0 += wa1 * x0[j]
            sa1 += wa1 * x1_[j]
            sa2 += wa1 * x2[j]
            sa3 += wa1 * x3[j]
            sb0 += wb1 * x0[j]
            sb1 += wb1 * x1_[j]
            sb2 += wb1 * x2[j]
            sb3 += wb1 * x3[j]
            sc0 += wc1 * x0[j]
            sc1 += wc1 * x1_[j]
            sc2 += wc1 * x2[j]
            sc3 += wc1 * x3[j]
            j += 1
        out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = sa0, sa1, sa2, sa3
        out[t, r + 1], out[t + 1, r + 1], out[t + 2, r + 1], out[t + 3, r + 1] = sb0, sb1, sb2, sb3
        out[t, r + 2], out[t + 1, r + 2], out[t + 2, r + 2], out[t + 3, r + 2] = sc0, sc1, sc2, sc3

    return _tiled_rows(x1, x4, x4x2, x4x3)


def _tiled_rows(x1, x4, x4x2, x4x3):
    """_tiled, with rows three at a time through x4x3 (then two, then one) where a token block
    has four tokens or more (prefill); one-token products (decode) take x1 row by row."""

    @njit(fastmath=True)
    def mm(w, r0, r1, act, t0, t1, out, oc):
        for b0 in range(t0, t1, TOKEN_BLOCK):
            b1 = min(b0 + TOKEN_BLOCK, t1)
            r = r0
            while r < r1:
                t = b0
                left = r1 - r  # threes, but 4 = 2 + 2 (a 16-row job: 3 + 3 + 3 + 3 + 2 + 2)
                step = 1 if b1 - b0 < 4 else (2 if left == 4 else min(3, left))
                while t + 4 <= b1:
                    if step == 3:
                        x4x3(w[r], w[r + 1], w[r + 2], act, t, out, oc + r)
                    elif step == 2:
                        x4x2(w[r], w[r + 1], act, t, out, oc + r)
                    else:
                        x4(w[r], act, t, out, oc + r)
                    t += 4
                while t < b1:
                    for k in range(step):
                        out[t, oc + r + k] = x1(w[r + k], act, t)
                    t += 1
                r += step

    return mm



@njit(inline="always")
def _bf16_at(row, i):
    return f32_from_bits((np.uint32(row[i]) | (np.uint32(row[i + 1]) << 8)) << 16)


mm_f32 = _float(load_f32x8_bytes, f32_at, 4)
mm_f16 = _float(load_f16x8, f16_at, 2)
mm_bf16 = _float(load_bf16x8, _bf16_at, 2)


# -- interleaved layouts: eight rows per group (repacked at load, kernels/blocks.py) ----------
# As llama.cpp's block_q4_0x8 (ggml-cpu/repack.cpp), learnt from, not copied: for each group of
# 8 rows and each 32-element block, the 8 scales (f16) come first, then the quants so that one
# 32-byte load holds 4 consecutive quants of each of the 8 rows (bytes 4r..4r+3: row r). One
# activation load of 4 bytes, broadcast to the 8 lanes, then meets all 8 rows: the int32 lane r
# of the product is row r's, scales load as one vector, and 8 outputs store at once, with no
# horizontal sums. Per 256 weights that is ~45 instructions instead of ~110.
#   Q4_0x8 block (144 bytes): d[8] f16 | 4 chunks of 32 bytes: byte 4r+i of chunk c is byte
#     4c+i of row r's qs (low nibble: quant 4c+i, high nibble: quant 16+4c+i).
#   Q4_1x8 block (160 bytes): d[8] | m[8] | the Q4_0x8 chunks.
#   Q5_0x8 block (176 bytes): d[8] | a 32-byte plane of fifth bits (_fifth_bit_plane) | the chunks.
#   Q5_1x8 block (192 bytes): d[8] | m[8] | plane | chunks.
#   Q8_0x8 block (272 bytes): d[8] | 8 chunks of 32 bytes: byte 4r+i of chunk j is quant 4j+i of row r.
# mm(w, r0, r1, ...) takes w as (rows/8, 8 * row_bytes) and rows r0, r1 that are multiples of 8.


def _grouped(x1, x4):
    @njit(fastmath=True)
    def mm(w, r0, r1, act, t0, t1, out, oc):
        g0, g1 = r0 // 8, (r1 + 7) // 8
        for b0 in range(t0, t1, TOKEN_BLOCK):  # a block of tokens stays in L2 ...
            b1 = min(b0 + TOKEN_BLOCK, t1)
            for g in range(g0, g1):  # ... and a group of rows in L1 while its token tiles pass
                t = b0
                while t + 4 <= b1:
                    x4(w[g], act, t, out, oc + 8 * g)
                    t += 4
                while t < b1:
                    x1(w[g], act, t, out, oc + 8 * g)
                    t += 1

    return mm


@njit(inline="always")
def _nibble_sums(wg, o, y, yo):
    """int16 lanes: pair sums over one block of the 8 rows' unsigned nibbles times y[yo:yo+32]
    (at most 8 * 2 * 15 * 127 = 30480: no saturation)."""
    m4 = splat_i8(15)
    s = zero_i16()
    for c in range(4):
        v = load_i8x32(wg, o + 32 * c)
        s = vadd(s, maddubs(vand(v, m4), bcast4(y, yo + 4 * c)))
        s = vadd(s, maddubs(vand(vshr(v, 4), m4), bcast4(y, yo + 16 + 4 * c)))
    return s


@njit(inline="always")
def _y8_of(act, t):
    return act.y8[t]


@njit(inline="always")
def _s8_of(act, t):
    return act.s8[t]


@njit(inline="always", fastmath=True)
def _finish_q4_0(wg, o, b, isum, dy, ysum, acc):
    # quants are nibble - 8: subtract 8 * sum(y) from every row's sum
    return fmadd(vmul(load_f16x8(wg, o), splat_f32(dy[b])), cvt_f32(vsub(isum, splat_i32(8 * ysum[b]))), acc)


@njit(inline="always", fastmath=True)
def _finish_q4_1(wg, o, b, isum, dy, sy, acc):
    # d * dy * sum + m * s (Q8_1's s = dy * sum(y), as float16)
    acc = fmadd(vmul(load_f16x8(wg, o), splat_f32(dy[b])), cvt_f32(isum), acc)
    return fmadd(load_f16x8(wg, o + 16), splat_f32(sy[b]), acc)


@njit(inline="always")
def _four_bit(wg, o, y, yo):
    """int32 lanes: row r's sum of its 32 unsigned 4-bit quants (chunks at o) times y[yo:yo+32]."""
    return madd(_nibble_sums(wg, o, y, yo), splat_i16(1))


@njit(inline="always")
def _bit16(plane, k):
    """16 in every byte whose bit k is set, else 0."""
    return vshl(vand(vshr(plane, k), splat_i8(1)), 4)


@njit(inline="always")
def _five_bit(wg, o, y, yo):
    """As _four_bit for 5-bit quants: the chunks at o, the fifth bits in the 32-byte plane at
    o - 32 (byte 4r+i, bit 2c: quant 4c+i of row r; bit 2c+1: quant 16+4c+i). Pair sums reach
    2 * 31 * 127, so int16 holds four of them: two vpmaddwd per block."""
    m4 = splat_i8(15)
    plane = load_i8x32(wg, o - 32)
    total = zero_i32()
    for half in range(2):
        s = zero_i16()
        for c in range(2 * half, 2 * half + 2):
            v = load_i8x32(wg, o + 32 * c)
            lo = vor(vand(v, m4), _bit16(plane, 2 * c))
            hi = vor(vand(vshr(v, 4), m4), _bit16(plane, 2 * c + 1))
            s = vadd(s, maddubs(lo, bcast4(y, yo + 4 * c)))
            s = vadd(s, maddubs(hi, bcast4(y, yo + 16 + 4 * c)))
        total = vadd(total, madd(s, splat_i16(1)))
    return total


@njit(inline="always", fastmath=True)
def _finish_q5_0(wg, o, b, isum, dy, ysum, acc):
    # quants are value - 16
    return fmadd(vmul(load_f16x8(wg, o), splat_f32(dy[b])), cvt_f32(vsub(isum, splat_i32(16 * ysum[b]))), acc)


def _x8(size, part, extra_of):
    """The one- and four-token kernels of an 8-row layout (`size` bytes per group and block)
    against Q8_0/Q8_1 activations: part(wg, b, y, dy, extra, acc) adds block b of the group
    against one token's quants y, scales dy and extra = extra_of(act, t) (per-block sums or
    Q8_1's s) into acc, the 8 rows' float32 lanes."""

    @njit(inline="always", fastmath=True)
    def x1(wg, act, t, out, col):
        y, dy, extra = act.q8[t], act.d8[t], extra_of(act, t)
        acc = zero_f32()
        for b in range(wg.shape[0] // size):
            acc = part(wg, b, y, dy, extra, acc)
        store_f32x8(out[t], col, acc)

    @njit(inline="always", fastmath=True)
    def x4(wg, act, t, out, col):
        a0 = zero_f32()
        a1 = zero_f32()
        a2 = zero_f32()
        a3 = zero_f32()
        y0, y1, y2, y3 = act.q8[t], act.q8[t + 1], act.q8[t + 2], act.q8[t + 3]
        d0, d1, d2, d3 = act.d8[t], act.d8[t + 1], act.d8[t + 2], act.d8[t + 3]
        e0, e1, e2, e3 = extra_of(act, t), extra_of(act, t + 1), extra_of(act, t + 2), extra_of(act, t + 3)
        for b in range(wg.shape[0] // size):  # inlined, the four share the weight loads and unpacking
            a0 = part(wg, b, y0, d0, e0, a0)
            a1 = part(wg, b, y1, d1, e1, a1)
            a2 = part(wg, b, y2, d2, e2, a2)
            a3 = part(wg, b, y3, d3, e3, a3)
        store_f32x8(out[t], col, a0)
        store_f32x8(out[t + 1], col, a1)
        store_f32x8(out[t + 2], col, a2)
        store_f32x8(out[t + 3], col, a3)

    return _grouped(x1, x4)


def _x8_nibbles(size, qoff, sums, extra_of, finish):
    """Q4_0x8, Q4_1x8, Q5_0x8, Q5_1x8 (`size` bytes per block, quant chunks at qoff):
    sums() the rows' integer sums, extra_of(act, t) the per-block activation term finish()
    needs (sum(y) for the offset types, Q8_1's s for those with a min)."""

    @njit(inline="always", fastmath=True)
    def part(wg, b, y, dy, extra, acc):
        o = size * b
        return finish(wg, o, b, sums(wg, o + qoff, y, 32 * b), dy, extra, acc)

    return _x8(size, part, extra_of)


def _x8_q8_0(dot_u8s8):
    @njit(inline="always", fastmath=True)
    def part(wg, b, y, dy, ysum, acc):  # signed quants: sum(y) is not needed
        o = 272 * b
        isum = zero_i32()
        for j in range(8):
            v = load_i8x32(wg, o + 16 + 32 * j)
            isum = vadd(isum, dot_u8s8(sign(v, v), sign(bcast4(y, 32 * b + 4 * j), v)))
        return fmadd(vmul(load_f16x8(wg, o), splat_f32(dy[b])), cvt_f32(isum), acc)

    return _x8(272, part, _y8_of)


# NF4x8 (272 bytes per group and 64-value block): d[8] f16 | 8 chunks of 32 bytes, byte 4r+i of
# chunk c is byte 4c+i of row r's qs (low nibble: value 4c+i, meeting activation block 2b; high
# nibble: value 32+4c+i, block 2b+1). The row lanes replace mm_nf4's per-row scale broadcast and
# two horizontal sums with one f16x8 scale load per block. The high parts are offset by +32
# (lowbit.NF4_HIU, 0..64) so they meet y unsigned, without mm_nf4's two vpsignb; the offset
# comes back out as 128 * 32 * sum(y) per activation block (Q8_0's y8), in int32.


@njit(inline="always")
def _nf4u_sums(wg, q, shift, yv):
    idx = vand(vshr(load_i8x32(wg, q), shift), splat_i8(15))
    lo = shuffle_bytes(load_i8x32(NF4_LO, 0), idx)
    hiu = shuffle_bytes(load_i8x32(NF4_HIU, 0), idx)  # pair sums <= 2 * 64 * 127: no saturation
    return vadd(madd(maddubs(lo, yv), splat_i16(1)), madd(maddubs(hiu, yv), splat_i16(128)))


@njit(inline="always", fastmath=True)
def _nf4x8_part(wg, b, y, dy, ysum, acc):
    o = 272 * b
    lo_sum = splat_i32(-128 * NF4_HI_OFFSET * ysum[2 * b])
    hi_sum = splat_i32(-128 * NF4_HI_OFFSET * ysum[2 * b + 1])
    for c in range(8):
        q = o + 16 + 32 * c
        lo_sum = vadd(lo_sum, _nf4u_sums(wg, q, 0, bcast4(y, 64 * b + 4 * c)))
        hi_sum = vadd(hi_sum, _nf4u_sums(wg, q, 4, bcast4(y, 64 * b + 32 + 4 * c)))
    d = vmul(load_f16x8(wg, o), splat_f32(_NF4_SCALE))
    acc = fmadd(vmul(d, splat_f32(dy[2 * b])), cvt_f32(lo_sum), acc)
    return fmadd(vmul(d, splat_f32(dy[2 * b + 1])), cvt_f32(hi_sum), acc)


mm_nf4x8 = _x8(272, _nf4x8_part, _y8_of)


def repack_nf4x8(data):
    return _interleave(data, 34, [(0, 2, 2), (2, 34, 4)])


mm_q4_0x8 = _x8_nibbles(144, 16, _four_bit, _y8_of, _finish_q4_0)
mm_q4_1x8 = _x8_nibbles(160, 32, _four_bit, _s8_of, _finish_q4_1)
mm_q5_0x8 = _x8_nibbles(176, 48, _five_bit, _y8_of, _finish_q5_0)
mm_q5_1x8 = _x8_nibbles(192, 64, _five_bit, _s8_of, _finish_q4_1)
mm_q8_0x8 = _x8_q8_0(_dot_u8s8)
mm_q8_0x8_vnni = _x8_q8_0(_dot_u8s8_vnni)


def _x8_super(size, sums, sums4, finish):
    """Q4_Kx8, Q6_Kx8 (`size` bytes per group and super-block) against Q8_K: sums(wg, o, y, yo)
    the int32 lanes of the super-block at wg[o] against quants y[yo:yo + 256], sums4 the same
    for four tokens at once, finish(wg, o, b, isum, dy, bs, acc) scales them (and takes off the
    mins or offsets through the bsums) into acc."""

    @njit(inline="always", fastmath=True)
    def x1(wg, act, t, out, col):
        y, dy, bs = act.qk[t], act.dk[t], act.bk[t]
        acc = zero_f32()
        for b in range(wg.shape[0] // size):
            o = size * b
            acc = finish(wg, o, b, sums(wg, o, y, 256 * b), dy, bs, acc)
        store_f32x8(out[t], col, acc)

    @njit(inline="always", fastmath=True)
    def x4(wg, act, t, out, col):
        a0 = zero_f32()
        a1 = zero_f32()
        a2 = zero_f32()
        a3 = zero_f32()
        y0, y1, y2, y3 = act.qk[t], act.qk[t + 1], act.qk[t + 2], act.qk[t + 3]
        d0, d1, d2, d3 = act.dk[t], act.dk[t + 1], act.dk[t + 2], act.dk[t + 3]
        s0, s1, s2, s3 = act.bk[t], act.bk[t + 1], act.bk[t + 2], act.bk[t + 3]
        for b in range(wg.shape[0] // size):
            o = size * b
            i0, i1, i2, i3 = sums4(wg, o, y0, y1, y2, y3, 256 * b)
            a0 = finish(wg, o, b, i0, d0, s0, a0)
            a1 = finish(wg, o, b, i1, d1, s1, a1)
            a2 = finish(wg, o, b, i2, d2, s2, a2)
            a3 = finish(wg, o, b, i3, d3, s3, a3)
        store_f32x8(out[t], col, a0)
        store_f32x8(out[t + 1], col, a1)
        store_f32x8(out[t + 2], col, a2)
        store_f32x8(out[t + 3], col, a3)

    return _grouped(x1, x4)


# Q4_Kx8 (1184 bytes per group and 256-value super-block). As llama.cpp's block_q4_Kx8
# (repack.cpp) it interleaves 8 rows' quants in 4-byte runs, but the six-bit scales and mins
# are unpacked at load, a byte each (32 bytes more per 1152, +2.8%), so applying them takes
# no shuffles:
#   d[8] f16 | dmin[8] f16 | scales[j][r] (64 bytes) | mins[j][r] (64) | 32 chunks of 32 bytes:
#   byte 4r+i of chunk k is byte 4k+i of row r's qs (chunk 8c+i: low nibbles are quants 4i..4i+3
#   of sub-block 2c, high nibbles those of sub-block 2c+1).
# Sub-block j of the 8 rows: 8 vpmaddubsw of nibbles against activation quads broadcast to the
# rows, summed in int16 (<= 8 * 2 * 15 * 128 = 30720), then one vpmaddwd by the rows' scales
# (each in both int16 halves of its row's int32 lane). The mins meet the two Q8_K 16-sums of
# sub-block j in one vpmaddwd.


@njit(inline="always")
def _q4_kx8_int(wg, o, y, yo):
    m4 = splat_i8(15)
    isum = zero_i32()
    for c in range(4):
        lo = zero_i16()
        hi = zero_i16()
        for i in range(8):
            v = load_i8x32(wg, o + 160 + 32 * (8 * c + i))
            lo = vadd(lo, maddubs(vand(v, m4), bcast4(y, yo + 64 * c + 4 * i)))
            hi = vadd(hi, maddubs(vand(vshr(v, 4), m4), bcast4(y, yo + 64 * c + 32 + 4 * i)))
        isum = vadd(isum, madd(lo, load_u8x8_twice_i16(wg, o + 32 + 16 * c)))
        isum = vadd(isum, madd(hi, load_u8x8_twice_i16(wg, o + 40 + 16 * c)))
    return isum


@njit(inline="always")
def _q4_kx8_mins(wg, o, bs, bo):
    s = zero_i32()
    for j in range(8):
        s = vadd(s, madd(load_u8x8_twice_i16(wg, o + 96 + 8 * j), bcast_i16x2(bs, bo + 2 * j)))
    return s


@njit(inline="always")
def _q4_kx8_int4(wg, o, y0, y1, y2, y3, yo):
    # inlined, the four share the weight loads and nibbles
    return (_q4_kx8_int(wg, o, y0, yo), _q4_kx8_int(wg, o, y1, yo), _q4_kx8_int(wg, o, y2, yo),
            _q4_kx8_int(wg, o, y3, yo))


@njit(inline="always", fastmath=True)
def _q4_kx8_finish(wg, o, b, isum, dy, bs, acc):
    acc = fmadd(vmul(load_f16x8(wg, o), splat_f32(dy[b])), cvt_f32(isum), acc)
    return fmadd(vmul(load_f16x8(wg, o + 16), splat_f32(-dy[b])), cvt_f32(_q4_kx8_mins(wg, o, bs, 16 * b)), acc)


mm_q4_kx8 = _x8_super(1184, _q4_kx8_int, _q4_kx8_int4, _q4_kx8_finish)


def repack_q4_kx8(data):
    rows, nb = data.shape[0], data.shape[1] // 144
    q = data.reshape(rows, nb, 144)[:, :, 4:16]
    # the six-bit scales and mins of sub-blocks 0..7 (llama.cpp's get_scale_min_k4)
    sc = np.concatenate([q[..., 0:4] & 63, (q[..., 8:12] & 15) | ((q[..., 0:4] >> 6) << 4)], axis=2)
    mn = np.concatenate([q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)], axis=2)

    def by_row(v):  # (rows, nb, j) -> (groups, nb, j * 8 + r)
        return v.reshape(rows // 8, 8, nb, 8).transpose(0, 2, 3, 1).reshape(rows // 8, nb, 64)

    scales = _interleave(data, 144, [(0, 2, 2), (2, 4, 2)]).reshape(rows // 8, nb, 32)
    quants = _interleave(data, 144, [(16, 144, 4)]).reshape(rows // 8, nb, 1024)
    parts = [scales, by_row(sc), by_row(mn), quants]
    return np.ascontiguousarray(np.concatenate(parts, axis=2).reshape(rows // 8, -1))


# Q6_Kx8 (1680 bytes per group and super-block, 8 x 210: no bigger): d[8] f16 | scale pairs:
# byte 16jp + 2r + k is scale 2jp+k of row r (int8) | then, for half h and quad i (in the order
# the kernel reads them, so that a group streams front to back: interleaved streams ran at half
# the memory bandwidth), 96 bytes: ql[64h + 4i], ql[64h + 32 + 4i] and qh[32h + 4i], each 4 bytes
# of every row (byte 4r+i' of a 32-byte chunk is row r's). Quants are 0..63 here (the -32 comes
# off through the bsums, as in _q6_k_block); pair sums reach 2 * 63 * 128, so int16 holds two
# vpmaddubsw before a vpmaddwd by the sub-block's scales.


@njit(inline="always")
def _element(pairs, k):
    """Element k (0 or 1, known once the loops unroll) of each int16 pair, in both halves."""
    return twice_i16(pairs, 1) if k else twice_i16(pairs, 0)


@njit(inline="always")
def _q6_kx8_quants(wg, o, h, i, kind):
    """Quants 0..63 of quad i of run `kind` (0..3) of half h, the 8 rows' (32 bytes): the low
    or high nibbles of ql[64h + 32 (kind % 2) + 4i], and bits 2 kind of qh[32h + 4i]."""
    m4 = splat_i8(15)
    at = o + 144 + 96 * (8 * h + i)
    ql = load_i8x32(wg, at + 32 * (kind % 2))
    low = vand(ql, m4) if kind < 2 else vand(vshr(ql, 4), m4)
    return vor(low, vshl(vand(vshr(load_i8x32(wg, at + 64), 2 * kind), splat_i8(3)), 4))


@njit(inline="always")
def _q6_kx8_scales(wg, o, h, q, kind):
    """The 8 rows' scales of the sub-block that quads 2q, 2q + 1 of run `kind` of half h fall
    in (j = 8h + 2 kind + q // 2), each in both halves of its row's lane: element j % 2 of
    scale pair j // 2."""
    j = 8 * h + 2 * kind + q // 2
    return _element(load_i8x16_as_i16(wg, o + 16 + 8 * (j - j % 2)), j % 2)


@njit(inline="always")
def _q6_kx8_int(wg, o, y, yo):
    isum = zero_i32()
    for h in range(2):  # two halves of 128 values, each four runs of 32
        for q in range(4):  # quads 2q, 2q + 1 of each run in int16, then their sub-blocks' scales
            s0 = zero_i16()
            s1 = zero_i16()
            s2 = zero_i16()
            s3 = zero_i16()
            for i in range(2 * q, 2 * q + 2):  # the four runs share the loads of ql and qh
                yq = yo + 128 * h + 4 * i
                s0 = vadd(s0, maddubs(_q6_kx8_quants(wg, o, h, i, 0), bcast4(y, yq)))
                s1 = vadd(s1, maddubs(_q6_kx8_quants(wg, o, h, i, 1), bcast4(y, yq + 32)))
                s2 = vadd(s2, maddubs(_q6_kx8_quants(wg, o, h, i, 2), bcast4(y, yq + 64)))
                s3 = vadd(s3, maddubs(_q6_kx8_quants(wg, o, h, i, 3), bcast4(y, yq + 96)))
            isum = vadd(isum, madd(s0, _q6_kx8_scales(wg, o, h, q, 0)))
            isum = vadd(isum, madd(s1, _q6_kx8_scales(wg, o, h, q, 1)))
            isum = vadd(isum, madd(s2, _q6_kx8_scales(wg, o, h, q, 2)))
            isum = vadd(isum, madd(s3, _q6_kx8_scales(wg, o, h, q, 3)))
    return isum


@njit(inline="always")
def _q6_kx8_int4(wg, o, y0, y1, y2, y3, yo):
    # the tokens innermost: each unpacked quant vector meets the four in turn (as four
    # _q6_kx8_int one after another, LLVM keeps 64 unpacked vectors alive and spills them)
    i0 = zero_i32()
    i1 = zero_i32()
    i2 = zero_i32()
    i3 = zero_i32()
    for h in range(2):
        for kind in range(4):
            for q in range(4):
                s0 = zero_i16()
                s1 = zero_i16()
                s2 = zero_i16()
                s3 = zero_i16()
                for i in range(2 * q, 2 * q + 2):
                    v = _q6_kx8_quants(wg, o, h, i, kind)
                    yq = yo + 128 * h + 32 * kind + 4 * i
                    s0 = vadd(s0, maddubs(v, bcast4(y0, yq)))
                    s1 = vadd(s1, maddubs(v, bcast4(y1, yq)))
                    s2 = vadd(s2, maddubs(v, bcast4(y2, yq)))
                    s3 = vadd(s3, maddubs(v, bcast4(y3, yq)))
                sc = _q6_kx8_scales(wg, o, h, q, kind)
                i0 = vadd(i0, madd(s0, sc))
                i1 = vadd(i1, madd(s1, sc))
                i2 = vadd(i2, madd(s2, sc))
                i3 = vadd(i3, madd(s3, sc))
    return i0, i1, i2, i3


@njit(inline="always", fastmath=True)
def _q6_kx8_finish(wg, o, b, isum, dy, bs, acc):
    offset = zero_i32()
    for jp in range(8):  # 32 * sum_j scale_j * bsum_j, row by row
        offset = vadd(offset, madd(load_i8x16_as_i16(wg, o + 16 + 16 * jp), bcast_i16x2(bs, 16 * b + 2 * jp)))
    return fmadd(vmul(load_f16x8(wg, o), splat_f32(dy[b])), cvt_f32(vsub(isum, vshl(offset, 5))), acc)


mm_q6_kx8 = _x8_super(1680, _q6_kx8_int, _q6_kx8_int4, _q6_kx8_finish)


def repack_q6_kx8(data):
    quads = [(at, at + 4, 4) for h in range(2) for i in range(8)
             for at in (64 * h + 4 * i, 64 * h + 32 + 4 * i, 128 + 32 * h + 4 * i)]
    return _interleave(data, 210, [(208, 210, 2), (192, 208, 2)] + quads)


def _interleave(data, nbytes, parts):
    """(rows, nb * nbytes) blocks -> (rows / 8, nb * 8 * nbytes): per group of 8 rows and block,
    each part (start, end, chunk) of the block's bytes, rows interleaved every `chunk` bytes."""
    rows = data.shape[0]
    p = np.array(parts, np.int64).reshape(-1, 3)
    out = np.empty((rows // 8, 8 * (sum(e - s for s, e, _ in parts) * (data.shape[1] // nbytes))), np.uint8)
    _interleave_into(data, nbytes, p, out)
    return out


@njit(cache=True, parallel=True)
def _interleave_into(data, nbytes, parts, out):
    # A loop, not numpy's transposes: those copy 4-byte runs through strided iterators, ~0.6 s
    # of SmolLM2's start; this is one pass over the weights (their first read from the map).
    nb = data.shape[1] // nbytes
    for g in prange(data.shape[0] // 8):
        o = 0
        for b in range(nb):
            for p in range(parts.shape[0]):
                start, end, chunk = parts[p, 0], parts[p, 1], parts[p, 2]
                for k in range(b * nbytes + start, b * nbytes + end, chunk):  # (block, part, chunk, row, byte)
                    for r in range(8):
                        src = data[8 * g + r]
                        for i in range(chunk):
                            out[g, o] = src[k + i]
                            o += 1


def repack_q4_0x8(data):
    return _interleave(data, 18, [(0, 2, 2), (2, 18, 4)])


def repack_q4_1x8(data):
    return _interleave(data, 20, [(0, 2, 2), (2, 4, 2), (4, 20, 4)])


def repack_q8_0x8(data):
    return _interleave(data, 34, [(0, 2, 2), (2, 34, 4)])


def _fifth_bit_plane(data, nbytes, qh_at):
    """The 32-byte plane of Q5_0x8/Q5_1x8 per group and block from each row's qh (uint32 at qh_at):
    byte 4r+i holds, at bit 2c, bit 4c+i of row r's qh and, at bit 2c+1, bit 16+4c+i."""
    rows = data.shape[0]
    nb = data.shape[1] // nbytes
    qh = data.reshape(rows, nb, nbytes)[:, :, qh_at:qh_at + 4].copy().view(np.uint32)[..., 0]  # (rows, nb)
    qh = qh.reshape(rows // 8, 8, nb).transpose(0, 2, 1)  # (groups, nb, row)
    plane = np.zeros((rows // 8, nb, 8, 4), np.uint8)  # (group, block, row, i)
    for i in range(4):
        for c in range(4):
            lo = (qh >> (4 * c + i)) & 1
            hi = (qh >> (16 + 4 * c + i)) & 1
            plane[:, :, :, i] |= ((lo << (2 * c)) | (hi << (2 * c + 1))).astype(np.uint8)
    return plane.reshape(rows // 8, nb, 32)


def _with_plane(data, nbytes, scale_parts, qh_at, qs_at):
    rows = data.shape[0]
    nb = data.shape[1] // nbytes
    scales = _interleave(data, nbytes, scale_parts).reshape(rows // 8, nb, -1)
    quants = _interleave(data, nbytes, [(qs_at, nbytes, 4)]).reshape(rows // 8, nb, -1)
    plane = _fifth_bit_plane(data, nbytes, qh_at)
    return np.ascontiguousarray(np.concatenate([scales, plane, quants], axis=2).reshape(rows // 8, -1))


def repack_q5_0x8(data):
    return _with_plane(data, 22, [(0, 2, 2)], 2, 6)


def repack_q5_1x8(data):
    return _with_plane(data, 24, [(0, 2, 2), (2, 4, 2)], 4, 8)
