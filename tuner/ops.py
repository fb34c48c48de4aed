"""The decoder's ops, each with a hand-written backward: no autograd.

Every op is a pair `op(...) -> (out, saved)` / `op_backward(dout, saved...) -> dinput`,
dtype-generic (float32 for training, float64 for the finite-difference checks in
tests/test_tuner_ops.py). `mm` is the matrix product the caller chose: np.matmul, or
bf16_matmul for --dtype bf16 (operands rounded to bfloat16, float32 accumulation).

Shapes: B sequences of L positions; D = hidden size; H query heads and KV key/value heads
of hd dims (GQA: query head h reads kv head h // (H / KV), as the runtime does).
"""

import math

import numpy as np
from numba import njit
from pyllm.kernels.grad import round_bf16


def bf16_matmul(a, b):
    """a @ b with both operands rounded to bfloat16 and float32 accumulation."""
    return np.matmul(round_bf16(np.ascontiguousarray(a)), round_bf16(np.ascontiguousarray(b)))


# -- embedding lookup ---------------------------------------------------------------------
# The forward is get_rows (kernels); its backward scatters the row gradients back.


def embedding_backward(dx, ids, vocab: int):
    """d table (vocab, D) from dx (N, D) of x = table[ids]; repeated ids add up."""
    dtable = np.zeros((vocab, dx.shape[-1]), dtype=dx.dtype)
    np.add.at(dtable, np.asarray(ids).reshape(-1), dx.reshape(-1, dx.shape[-1]))
    return dtable


# -- RMSNorm ------------------------------------------------------------------------------


def rmsnorm(x, w, eps):
    """y = x / rms(x) * w over the last axis.  x (..., D), w (D,); saves rstd (..., 1)."""
    rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * rstd * w, rstd


def rmsnorm_backward(dy, x, w, rstd):
    """dx for y = x * r * w with r = (mean(x^2) + eps)^-1/2:
    dx = r * (g - x * r^2 * mean(g * x)), g = dy * w (the weight is frozen)."""
    g = dy * w
    return rstd * (g - x * (rstd * rstd) * np.mean(g * x, axis=-1, keepdims=True))


# -- RoPE ---------------------------------------------------------------------------------


def _rope_pairs(x, half, neox):
    # the two halves of each rotated pair, as views: (..., half) each
    if neox:  # (i, i + half): Hugging Face's rotate_half layout (qwen2)
        return x[..., :half], x[..., half:2 * half]
    return x[..., 0:2 * half:2], x[..., 1:2 * half:2]  # (2i, 2i+1): llama.cpp's "normal" rope


def rope(x, cos, sin, neox: bool):
    """Rotate the first 2*half dims of each head by position.  x (B, L, heads, hd);
    cos, sin (L, half) for positions 0..L-1. Dims past rope_dim pass through."""
    half = cos.shape[1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]  # (1, L, 1, half)
    out = x.copy()
    a, b = _rope_pairs(x, half, neox)
    oa, ob = _rope_pairs(out, half, neox)
    oa[...] = a * c - b * s
    ob[...] = a * s + b * c
    return out


def rope_backward(dy, cos, sin, neox: bool):
    """A rotation's transpose is the rotation by the opposite angle."""
    return rope(dy, cos, -sin, neox)


# -- causal attention with grouped K/V heads ------------------------------------------------


def attention(q, k, v, mm=np.matmul):
    """softmax(q k^T / sqrt(hd) + causal mask) v.

    q (B, L, H, hd), k, v (B, L, KV, hd) -> out (B, L, H*hd) and the probabilities P
    (B, KV, G, L, L), G = H / KV, which the backward needs."""
    B, L, H, hd = q.shape
    KV = k.shape[2]
    G = H // KV
    qg = q.reshape(B, L, KV, G, hd).transpose(0, 2, 3, 1, 4)  # (B, KV, G, L, hd)
    kt = k.transpose(0, 2, 1, 3)[:, :, None]  # (B, KV, 1, L, hd)
    vt = v.transpose(0, 2, 1, 3)[:, :, None]  # (B, KV, 1, L, hd)
    s = mm(qg, kt.swapaxes(-1, -2)) * (1.0 / math.sqrt(hd))  # (B, KV, G, L, L)
    s += np.triu(np.full((L, L), -np.inf, dtype=s.dtype), 1)  # a query sees keys 0..itself
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s, out=s)
    p /= p.sum(axis=-1, keepdims=True)
    out = mm(p, vt)  # (B, KV, G, L, hd)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, L, H * hd), p


def attention_backward(dout, q, k, v, p, mm=np.matmul):
    """dq, dk, dv for attention(q, k, v) given d out (B, L, H*hd) and its saved P."""
    B, L, H, hd = q.shape
    KV = k.shape[2]
    G = H // KV
    scale = 1.0 / math.sqrt(hd)  # a Python float: keeps float32 float32 (NEP 50)
    do = dout.reshape(B, L, KV, G, hd).transpose(0, 2, 3, 1, 4)  # (B, KV, G, L, hd)
    qg = q.reshape(B, L, KV, G, hd).transpose(0, 2, 3, 1, 4)
    kt = k.transpose(0, 2, 1, 3)[:, :, None]  # (B, KV, 1, L, hd)
    vt = v.transpose(0, 2, 1, 3)[:, :, None]
    dv = mm(p.swapaxes(-1, -2), do).sum(axis=2)  # (B, KV, L, hd): the G heads sharing v add up
    dp = mm(do, vt.swapaxes(-1, -2))  # (B, KV, G, L, L)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # softmax backward; masked entries stay 0
    ds *= scale
    dq = mm(ds, kt)  # (B, KV, G, L, hd)
    dk = mm(ds.swapaxes(-1, -2), qg).sum(axis=2)  # (B, KV, L, hd)
    dq = dq.transpose(0, 3, 1, 2, 4).reshape(B, L, H, hd)
    return dq, dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)


# -- SiLU-gated MLP -----------------------------------------------------------------------


# Flat loops (1-D views of C-contiguous arrays). exp(-x) may overflow to inf for very
# negative x, which gives sigmoid = 0 exactly: the right limit.


@njit(cache=True, fastmath=True, nogil=True)
def _swiglu(g, u, out):
    for i in range(g.shape[0]):
        x = g[i]
        out[i] = x / (1.0 + np.exp(-x)) * u[i]


@njit(cache=True, fastmath=True, nogil=True)
def _swiglu_backward(da, g, u, dg, du):
    for i in range(g.shape[0]):
        x = g[i]
        sig = 1.0 / (1.0 + np.exp(-x))
        dg[i] = da[i] * u[i] * sig * (1.0 + x * (1.0 - sig))
        du[i] = da[i] * x * sig


def _flat(x):
    return np.ascontiguousarray(x).reshape(-1)


def swiglu(g, u):
    """silu(g) * u, silu(g) = g * sigmoid(g).  g, u (N, F)."""
    out = np.empty(g.shape, dtype=g.dtype)
    _swiglu(_flat(g), _flat(u), out.reshape(-1))
    return out


def swiglu_backward(da, g, u):
    """dg = da * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))), du = da * silu(g)."""
    dg, du = np.empty(g.shape, dtype=g.dtype), np.empty(u.shape, dtype=u.dtype)
    _swiglu_backward(_flat(da), _flat(g), _flat(u), dg.reshape(-1), du.reshape(-1))
    return dg, du


# -- LoRA branch --------------------------------------------------------------------------


def lora(x, a, b, scale, keep=None, mm=np.matmul):
    """scale * B (A x') with x' = x * keep (inverted dropout; keep holds 0 or 1/(1-p)).
    x (N, n_in), a (r, n_in), b (n_out, r) -> y (N, n_out) and x' A^T (N, r)."""
    xd = x if keep is None else x * keep
    xa = mm(xd, a.T)  # (N, r)
    return mm(xa, b.T) * scale, xa


def lora_backward(dy, x, a, b, scale, xa, keep=None, mm=np.matmul):
    """(dx, dA, dB) for y = scale * (x' A^T) B^T."""
    xd = x if keep is None else x * keep
    dyb = mm(dy, b)  # (N, r)
    db = mm(dy.T, xa) * scale  # (n_out, r)
    da = mm(dyb.T, xd) * scale  # (r, n_in)
    dx = mm(dyb, a) * scale  # (N, n_in)
    if keep is not None:
        dx *= keep
    return dx, da, db


# -- cross-entropy ------------------------------------------------------------------------


@njit(cache=True, fastmath=True, nogil=True)
def _cross_entropy(logits, targets):
    # in place: logits (n, V) become d loss / d logits; returns the summed loss
    total = 0.0
    n, vocab = logits.shape
    for i in range(n):
        row = logits[i]
        best = row[0]
        for j in range(1, vocab):
            best = max(best, row[j])
        t = targets[i]
        zt = row[t]
        s = 0.0
        for j in range(vocab):
            e = np.exp(row[j] - best)
            row[j] = e
            s += e
        total += np.log(s) + best - zt  # -log softmax(row)[t] = logsumexp(row) - row[t]
        inv = 1.0 / s
        for j in range(vocab):
            row[j] *= inv
        row[t] -= 1.0
    return total


def cross_entropy(logits, targets):
    """Summed -log softmax(logits)[target] over rows, and its gradient (overwrites logits).

    logits (n, V), targets (n,) -> (loss, dlogits (n, V)). A row's gradient is
    softmax(row) - onehot(target)."""
    logits = np.ascontiguousarray(logits)
    loss = _cross_entropy(logits, np.asarray(targets, dtype=np.int64))
    return float(loss), logits
