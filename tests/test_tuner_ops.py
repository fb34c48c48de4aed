"""The trainer's hand-written backward against central finite differences in float64:
each op alone, then the whole LoRA'd model on tiny random GGUF decoders (llama with
adjacent-pair rope, qwen2 with neox rope and biases, GQA, dropout, padding, masked
prompts). Also: the quantized products against gguf-py's dequantization, and bfloat16
rounding against a reference written from the definition."""

import numpy as np
import pytest
from pyllm.base import GGMLType
from pyllm.tuner import ops
from tuner_helpers import batch_of, load_base, write_tiny_model

TOL = 1e-4  # the bound on the relative error; float64 central differences reach ~1e-9


def rel_err(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-30)


def numeric_grad(f, x, h=1e-6, idx=None):
    """Central differences of the scalar f() in the entries idx of x (perturbed in place)."""
    flat = x.reshape(-1)
    idx = range(flat.size) if idx is None else idx
    out = []
    for i in idx:
        old = flat[i]
        flat[i] = old + h
        up = f()
        flat[i] = old - h
        down = f()
        flat[i] = old
        out.append((up - down) / (2 * h))
    return np.array(out)


rng = np.random.default_rng(0)


def test_rmsnorm_backward():
    x, w, g = rng.standard_normal((5, 12)), rng.standard_normal(12), rng.standard_normal((5, 12))
    y, rstd = ops.rmsnorm(x, w, 1e-5)
    np.testing.assert_allclose(y, x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * w)
    dx = ops.rmsnorm_backward(g, x, w, rstd)
    fd = numeric_grad(lambda: (ops.rmsnorm(x, w, 1e-5)[0] * g).sum(), x)
    assert rel_err(dx, fd) < TOL


@pytest.mark.parametrize("neox", [False, True])
def test_rope_backward(neox):
    from pyllm.runtime.rope import rope_tables

    B, L, H, hd, rope_dim = 2, 5, 3, 8, 6  # rope_dim < head_dim: the last dims pass through
    cos, sin = (t.astype(np.float64) for t in rope_tables(L, rope_dim, 10000.0))
    x, g = rng.standard_normal((B, L, H, hd)), rng.standard_normal((B, L, H, hd))
    dx = ops.rope_backward(g, cos, sin, neox)
    fd = numeric_grad(lambda: (ops.rope(x, cos, sin, neox) * g).sum(), x)
    assert rel_err(dx, fd) < TOL


def test_rope_matches_the_runtime_kernel():
    from pyllm.kernels.ops import rope as runtime_rope
    from pyllm.runtime.rope import rope_tables

    L, H, hd = 7, 4, 8
    cos, sin = rope_tables(L, hd, 10000.0)
    x = rng.standard_normal((1, L, H, hd)).astype(np.float32)
    for neox in (False, True):
        ref = x[0].reshape(L, H * hd).copy()
        runtime_rope(ref, H, hd, hd, 0, cos, sin, neox)
        np.testing.assert_allclose(ops.rope(x, cos, sin, neox)[0].reshape(L, -1), ref, atol=1e-6)


def test_attention_backward_gqa():
    B, L, H, KV, hd = 2, 6, 4, 2, 5
    q, k, v = (rng.standard_normal((B, L, n, hd)) for n in (H, KV, KV))
    g = rng.standard_normal((B, L, H * hd))
    out, p = ops.attention(q, k, v)
    dq, dk, dv = ops.attention_backward(g, q, k, v, p)
    for x, d in ((q, dq), (k, dk), (v, dv)):
        fd = numeric_grad(lambda: (ops.attention(q, k, v)[0] * g).sum(), x)
        assert rel_err(d, fd) < TOL


def test_attention_is_causal_softmax_attention():
    # against a textbook loop: query t sees keys 0..t of its kv head h // (H/KV)
    B, L, H, KV, hd = 1, 5, 4, 2, 3
    q, k, v = (rng.standard_normal((B, L, n, hd)) for n in (H, KV, KV))
    out = ops.attention(q, k, v)[0].reshape(B, L, H, hd)
    for t in range(L):
        for h in range(H):
            s = k[0, : t + 1, h // 2] @ q[0, t, h] / np.sqrt(hd)
            w = np.exp(s - s.max())
            np.testing.assert_allclose(out[0, t, h], (w / w.sum()) @ v[0, : t + 1, h // 2], atol=1e-12)


def test_swiglu_backward():
    g, u, da = rng.standard_normal((4, 9)) * 3, rng.standard_normal((4, 9)), rng.standard_normal((4, 9))
    np.testing.assert_allclose(ops.swiglu(g, u), g / (1 + np.exp(-g)) * u)
    dg, du = ops.swiglu_backward(da, g, u)
    assert rel_err(dg, numeric_grad(lambda: (ops.swiglu(g, u) * da).sum(), g)) < TOL
    assert rel_err(du, numeric_grad(lambda: (ops.swiglu(g, u) * da).sum(), u)) < TOL


@pytest.mark.parametrize("dropout", [False, True])
def test_lora_backward(dropout):
    N, n_in, n_out, r, scale = 6, 7, 5, 3, 2.0
    x, a, b = rng.standard_normal((N, n_in)), rng.standard_normal((r, n_in)), rng.standard_normal((n_out, r))
    keep = (rng.random((N, n_in)) > 0.3) / 0.7 if dropout else None
    g = rng.standard_normal((N, n_out))

    def f():
        return (ops.lora(x, a, b, scale, keep)[0] * g).sum()

    y, xa = ops.lora(x, a, b, scale, keep)
    np.testing.assert_allclose(y, scale * ((x if keep is None else x * keep) @ a.T) @ b.T)
    dx, da, db = ops.lora_backward(g, x, a, b, scale, xa, keep)
    for t, d in ((x, dx), (a, da), (b, db)):
        assert rel_err(d, numeric_grad(f, t)) < TOL


def test_cross_entropy_backward():
    logits, targets = rng.standard_normal((4, 11)) * 3, np.array([0, 10, 3, 3])

    def f():
        return ops.cross_entropy(logits.copy(), targets)[0]

    z = logits - logits.max(-1, keepdims=True)
    ref = -(z[np.arange(4), targets] - np.log(np.exp(z).sum(-1))).sum()
    loss, d = ops.cross_entropy(logits.copy(), targets)
    assert abs(loss - ref) < 1e-12
    assert rel_err(d, numeric_grad(f, logits)) < TOL


def test_embedding_backward():
    table, ids = rng.standard_normal((10, 4)), np.array([[3, 1, 3], [0, 9, 3]])
    g = rng.standard_normal((2, 3, 4))
    d = ops.embedding_backward(g, ids, 10)
    assert rel_err(d, numeric_grad(lambda: (table[ids] * g).sum(), table)) < TOL


# -- the frozen quantized products ---------------------------------------------------------

QTYPES = [GGMLType[n] for n in "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K".split()]


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_quantized_products_equal_dequantize_then_matmul(qtype):
    # oracle: gguf-py's own dequantization of the same bytes
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize
    from pyllm.convert.quantize import encode
    from pyllm.kernels import grad
    from pyllm.kernels.quants import QTensor

    rows, cols = 300, 512  # 300 rows: several tiles when the tile is small
    data = encode(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1)
    w = QTensor(raw, qtype, rows, cols)
    W = gguf_dequantize(raw, GGMLQuantizationType(int(qtype))).reshape(rows, cols).astype(np.float64)
    x, dy = rng.standard_normal((9, cols)), rng.standard_normal((9, rows))
    old = grad.TILE_ELEMENTS
    grad.TILE_ELEMENTS = 64 * cols  # 5 tiles, the last one partial
    try:
        np.testing.assert_allclose(grad.qmatmul(w, x), x @ W.T, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(grad.qmatmul_t(w, dy), dy @ W, rtol=1e-12, atol=1e-12)
        x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
        bound = 1e-5 * np.sqrt(cols)  # float32 accumulation
        assert np.abs(grad.qmatmul(w, x32) - x @ W.T).max() < bound * np.abs(W).max() * 4
        assert np.abs(grad.qmatmul_t(w, dy32) - dy @ W).max() < bound * np.abs(W).max() * 4
    finally:
        grad.TILE_ELEMENTS = old
    ids = np.array([5, 0, 299, 5])
    np.testing.assert_array_equal(grad.gather_rows(w, ids), W[ids].astype(np.float32))


def test_forward_product_matches_runtime_linear(stories260k):
    from pyllm.kernels.grad import qmatmul
    from pyllm.kernels.matmul import linear
    from pyllm.runtime.gguf_file import GGUFFile

    w = GGUFFile(stories260k).qtensor("blk.0.ffn_gate.weight")
    x = rng.standard_normal((12, w.cols)).astype(np.float32)
    np.testing.assert_allclose(qmatmul(w, x), linear(w, x), atol=1e-5)


# -- bfloat16 rounding ---------------------------------------------------------------------


def _bf16_reference(x32):
    # from the definition: the nearest of the two bf16 neighbours, exact arithmetic in
    # float64, ties to the one whose last kept bit is 0; NaN stays NaN, infinities stay
    out = np.empty_like(x32)
    for i, v in enumerate(x32):
        if not np.isfinite(v):
            out[i] = v
            continue
        bits = np.array([v]).view(np.uint32)[0]
        lo_bits = bits & np.uint32(0xFFFF0000)
        hi_bits = lo_bits + np.uint32(0x10000)  # the next bf16 away from zero (may be inf)
        lo, hi = (np.array([b], dtype=np.uint32).view(np.float32)[0] for b in (lo_bits, hi_bits))
        d_lo, d_hi = abs(float(v) - float(lo)), abs(float(hi) - float(v)) if np.isfinite(hi) else np.inf
        if np.isinf(hi):  # past the largest bf16: rounds to inf at or beyond the midpoint
            mid = float(lo) + (2.0**127 * 2.0**-7) / 2 * (1 if v > 0 else -1)
            out[i] = hi if abs(float(v)) >= abs(mid) else lo
            continue
        if d_lo < d_hi or (d_lo == d_hi and not (lo_bits >> 16) & 1):
            out[i] = lo
        else:
            out[i] = hi
    return out


def test_round_bf16_against_definition():
    from pyllm.kernels.grad import round_bf16

    specials = np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8),
                         3.3895314e38, np.finfo(np.float32).max, np.inf, -np.inf, 1e-40, -1e-42, 2**-126],
                        dtype=np.float32)
    x = np.concatenate([specials, (rng.standard_normal(3000) * 10.0 ** rng.integers(-30, 30, 3000)).astype(np.float32),
                        rng.integers(0, 2**32, 2000, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    x = x[~np.isnan(x)]
    got = round_bf16(x)
    np.testing.assert_array_equal(got.view(np.uint32), _bf16_reference(x).view(np.uint32))
    nan = round_bf16(np.array([np.nan, np.float32(np.uint32(0x7F800001).view(np.float32))], dtype=np.float32))
    assert np.isnan(nan).all()
    assert (got.view(np.uint32) & 0xFFFF == 0).all()


# -- the whole model ---------------------------------------------------------------------------


CASES = {
    "llama": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tied=True),  # (partial rope: the op test; the runtime refuses it)
    "qwen2-neox-bias": dict(arch="qwen2"),
    "llama-q8_0": dict(arch="llama", qtype=GGMLType.Q8_0),
}


def _tiny_lora_model(tmp_path, case, dropout=0.0, grad_checkpoint=False, targets=None):
    from pyllm.tuner.model import TARGETS, LoraModel, LoraSpec

    path = write_tiny_model(tmp_path / f"{case}.gguf", **CASES[case])
    spec = LoraSpec(rank=3, alpha=6.0, dropout=dropout, targets=tuple(targets or TARGETS))
    m = LoraModel(load_base(path), spec, dtype=np.float64, grad_checkpoint=grad_checkpoint, seed=5)
    m.weights.flat[:] = np.random.default_rng(1).standard_normal(m.weights.flat.size) * 0.3  # B != 0 too
    return m


def _batch():
    r = np.random.default_rng(2)
    seqs = [list(r.integers(0, 64, 9)), list(r.integers(0, 64, 6))]  # padded: 8 positions, 5 real
    return batch_of(seqs, loss_from=[3, 0])  # the first sequence's first 3 targets are "prompt"


@pytest.mark.parametrize("case", list(CASES))
def test_whole_model_gradients_against_finite_differences(tmp_path, case):
    m = _tiny_lora_model(tmp_path, case, dropout=0.2 if case == "llama" else 0.0)
    batch = _batch()
    m.grads.flat[:] = 0
    m.forward_backward(batch, step_key=7, need_input_grad=True)
    analytic = m.grads.flat.copy()

    def loss():
        m.grads.flat[:] = 0
        return m.forward_backward(batch, step_key=7)  # same dropout masks (step_key 7)

    # a few entries of every A and B: every layer's backward is on the path of layer 0's
    idx = []
    pick = np.random.default_rng(3)
    for name in m.weights.names:
        for mat in (m.weights.a[name], m.weights.b[name]):
            start = mat.__array_interface__["data"][0] - m.weights.flat.__array_interface__["data"][0]
            idx += list(start // 8 + pick.choice(mat.size, 3, replace=False))
    fd = numeric_grad(loss, m.weights.flat, idx=idx)
    assert rel_err(analytic[idx], fd) < TOL


def test_input_gradient_against_finite_differences(tmp_path):
    # d loss / d embeddings: the backward through every layer down to the lookup
    m = _tiny_lora_model(tmp_path, "qwen2-neox-bias", targets=("v", "down"))
    batch = _batch()
    x0 = {}
    orig = m._embed
    m._embed = lambda b: x0["x"]
    x0["x"] = orig(batch).copy()
    m.forward_backward(batch, need_input_grad=True)
    dx = m.input_grad.copy()
    idx = np.random.default_rng(4).choice(x0["x"].size, 40, replace=False)
    fd = numeric_grad(lambda: m.loss(batch), x0["x"], idx=idx)
    assert rel_err(dx.reshape(-1)[idx], fd) < TOL
    # padding positions get no gradient
    assert np.abs(dx[1, 5:]).max() == 0.0


def test_grad_checkpoint_gives_the_same_gradients(tmp_path):
    ref = _tiny_lora_model(tmp_path, "llama", dropout=0.2)
    ckpt = _tiny_lora_model(tmp_path, "llama", dropout=0.2, grad_checkpoint=True)
    batch = _batch()
    la, lb = ref.forward_backward(batch, step_key=3), ckpt.forward_backward(batch, step_key=3)
    assert la == lb
    np.testing.assert_array_equal(ref.grads.flat, ckpt.grads.flat)


def test_lora_with_zero_b_is_the_base_model(stories260k):
    # at initialisation (B = 0) the training forward is the runtime's forward
    import pyllm
    from pyllm.tuner.model import LoraModel, LoraSpec

    base = load_base(stories260k, n_ctx=64)
    m = LoraModel(base, LoraSpec(rank=4, targets=("q", "v", "down")))
    m.weights.init(np.random.default_rng(0))
    ids = pyllm.load_tokenizer(stories260k).encode("Once upon a time, there was a cat.")
    batch = batch_of([ids])
    expected = pyllm.load(stories260k, n_ctx=64).logits(ids[:-1])  # (n, vocab)
    z = expected - expected.max(-1, keepdims=True)
    ref = -(z[np.arange(len(ids) - 1), ids[1:]] - np.log(np.exp(z).sum(-1))).sum()
    assert abs(m.loss(batch) - ref) < 1e-3 * len(ids)


def test_float32_stays_float32():
    # NumPy 2 promotes float32 by numpy float64 scalars: every op must keep the compute dtype
    f = np.float32
    x, w = rng.standard_normal((2, 3, 4, 8)).astype(f), rng.standard_normal(8).astype(f)
    kv = rng.standard_normal((2, 3, 2, 8)).astype(f)
    cos, sin = np.ones((3, 4), f), np.zeros((3, 4), f)
    y, rstd = ops.rmsnorm(x, w, 1e-5)
    out, p = ops.attention(x, kv, kv)
    dq, dk, dv = ops.attention_backward(out, x, kv, kv, p)
    a, b = rng.standard_normal((2, 8)).astype(f), rng.standard_normal((5, 2)).astype(f)
    z, xa = ops.lora(x[0, 0], a, b, 2.0)
    arrays = [y, ops.rmsnorm_backward(y, x, w, rstd), ops.rope(x, cos, sin, False), out, p, dq, dk, dv, z,
              *ops.lora_backward(z, x[0, 0], a, b, 2.0, xa), *ops.swiglu_backward(x, x, x), ops.swiglu(x, x)]
    assert all(t.dtype == f for t in arrays)


def test_batch_shards_on_threads_give_the_same_gradients(tmp_path):
    # sequences of different lengths over 2 threads: each shard cut to its own length
    m = _tiny_lora_model(tmp_path, "llama", dropout=0.2)
    r = np.random.default_rng(6)
    batch = batch_of([list(r.integers(0, 64, n)) for n in (9, 4, 7, 6, 3)], loss_from=[2, 0, 1, 0, 0])
    shards = batch.split(2)
    assert sorted(k for s in shards for k in s.keys) == list(range(5))
    assert sum(s.n_inputs for s in shards) == batch.n_inputs and sum(s.n_tokens for s in shards) == batch.n_tokens
    loss = m.forward_backward(batch, step_key=4)
    ref = m.grads.flat.copy()
    m.grads.flat[:] = 0
    assert abs(m.forward_backward_threads(batch, 4, 2) - loss) < 1e-12 * abs(loss)
    np.testing.assert_allclose(m.grads.flat, ref, rtol=1e-10, atol=1e-13)
