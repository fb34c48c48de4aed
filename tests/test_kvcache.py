"""The K/V cache types (kernels/kvcache.py): storage bytes, attention over each type, the flags.

Oracles: the stored bytes against numpy encoders written from the formats (f16: numpy's
round-to-nearest-even half; q8_0: the x86 quantize_row_q8_0 rule, d = max|x|/127 and
round-half-even(x * 127/max|x|); q4_0: gguf-py's quantizer, which is ggml's quantize_row_q4_0_ref;
fp8_e4m3: tests/lowbit_reference.py, the OCP formats' float64 reference);
attention against a float64 numpy softmax attention over the values gguf-py dequantizes from those
bytes (with the query quantized to q8_0 the same way where the K cache is q8_0/q4_0, as llama.cpp
does); the model against the float64 reference forward (tests/reference_llama.py).
"""

import lowbit_reference as lowref
import numba
import numpy as np
import pyllm
import pytest
from gguf import GGMLQuantizationType as GQ
from gguf.quants import dequantize, quantize
from pyllm.base import PyllmError
from pyllm.kernels import kvcache, ops
from pyllm.kernels.cpu import AVX2, isa_supported
from pyllm.kernels.quants import F16_TABLE

TYPES = ("f32", "f16", "q8_0", "q4_0", "fp8_e4m3")


# -- numpy encoders and decoders, from the formats ---------------------------------------------


def encode_q8_0(x):
    """(hd,) float32 -> block_q8_0 bytes, x86 rounding: d = amax/127 (as f16), q = rint(x * (127/amax))."""
    b = x.astype(np.float32).reshape(-1, 32)
    amax = np.abs(b).max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.rint(b * inv[:, None]).astype(np.int8)
    d = (amax / np.float32(127.0)).astype(np.float32).astype("<f2")
    return np.concatenate([np.concatenate([d[i:i + 1].view(np.uint8), q[i].view(np.uint8)]) for i in range(len(b))])


def encode(t, x):
    """One row of cache bytes (or float32 values for f32)."""
    x = np.asarray(x, np.float32)
    if t == "f32":
        return x.copy()
    if t == "f16":
        return x.astype("<f2").view(np.uint8)
    if t == "q8_0":
        return encode_q8_0(x)
    if t == "fp8_e4m3":
        return np.concatenate([np.frombuffer(lowref.quantize_block_fp("FP8_E4M3", b), np.uint8)
                               for b in x.reshape(-1, 32)])
    return quantize(x.reshape(1, -1), GQ.Q4_0).reshape(-1)  # gguf-py: ggml's quantize_row_q4_0_ref


def decode(t, row):
    """Cache bytes -> float64 values (gguf-py's dequantizers)."""
    if t == "f32":
        return row.astype(np.float64)
    if t == "fp8_e4m3":
        return np.concatenate([lowref.decode_block_fp("FP8_E4M3", bytes(b)) for b in row.reshape(-1, 33)])
    kind = {"f16": GQ.F16, "q8_0": GQ.Q8_0, "q4_0": GQ.Q4_0}[t]
    return dequantize(np.ascontiguousarray(row, np.uint8).reshape(1, -1), kind).reshape(-1).astype(np.float64)


def reference_attention(y, q_col, n, keys, values, start, type_k, type_v, n_heads, n_kv, hd):
    """float64 attention of queries y[t, q_col:...] (positions start + t) over keys/values (positions,
    n_kv*hd), each stored as its cache type; the query quantized to q8_0 for a q8_0/q4_0 K cache."""
    group = n_heads // n_kv
    out = np.zeros((n, n_heads * hd))
    for t in range(n):
        n_keys = start + t + 1
        for h in range(n_heads):
            g = h // group
            q = y[t, q_col + h * hd:q_col + (h + 1) * hd]
            q = decode("q8_0", encode_q8_0(q)) if type_k in ("q8_0", "q4_0") else q.astype(np.float64)
            K = np.stack([decode(type_k, encode(type_k, keys[j, g * hd:(g + 1) * hd])) for j in range(n_keys)])
            V = np.stack([decode(type_v, encode(type_v, values[j, g * hd:(g + 1) * hd])) for j in range(n_keys)])
            s = K @ q / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h * hd:(h + 1) * hd] = p / p.sum() @ V
    return out


# -- the kernels -------------------------------------------------------------------------------

N_HEADS, N_KV, HD, N_CTX = 4, 2, 64, 43  # not a multiple of 8: the last keys have no 8-row block


def _data(seed=3):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((N_CTX, N_KV * HD)).astype(np.float32)
    values = rng.standard_normal((N_CTX, N_KV * HD)).astype(np.float32)
    keys[5, :32] = 0.0  # an all-zero block (d = 0)
    keys[6, :32] = np.arange(32) - 16.0  # exact ties for q4_0's x/d + 8.5
    keys[7, :32] = np.array([127.0, 2.5, -3.5, 0.5] * 8)  # halves for q8_0's round-half-even (d = 1)
    return keys, values


def _caches(type_k, type_v, keys, values, n_pos):
    """Layer caches (n_kv, n_ctx, row) with positions 0..n_pos-1 stored by kvcache.store_kv in two calls."""
    kc = kvcache.new_cache(type_k, 1, N_KV, N_CTX, HD)[0]
    vc = kvcache.new_cache(type_v, 1, N_KV, N_CTX, HD)[0]
    kt, vt = kvcache.kv_type(type_k).code, kvcache.kv_type(type_v).code
    half = n_pos // 2
    kvcache.store_kv(kt, vt, keys[:half], values[:half], kc, vc, 0, F16_TABLE)
    kvcache.store_kv(kt, vt, keys[half:n_pos], values[half:n_pos], kc, vc, half, F16_TABLE)
    return kc, vc


@pytest.mark.parametrize("t", TYPES)
def test_store_writes_the_format_bytes(t):
    keys, values = _data()
    kc, vc = _caches(t, t, keys, values, 24)
    assert kc.shape[-1] == kvcache.row_bytes(t, HD) // (4 if t == "f32" else 1)
    for j in range(24):
        for g in range(N_KV):
            np.testing.assert_array_equal(kc[g, j], encode(t, keys[j, g * HD:(g + 1) * HD]), err_msg=f"{t} K {j}")
            np.testing.assert_array_equal(vc[g, j], encode(t, values[j, g * HD:(g + 1) * HD]), err_msg=f"{t} V {j}")
    assert not kc[:, 24:].any()  # nothing past the stored positions


def _attention_kernels():
    from pyllm.kernels import ops_avx2

    yield "portable", ops.attention_kv, True
    if isa_supported(AVX2):
        yield "avx2", ops_avx2.attention_kv, False


@pytest.mark.parametrize("type_k,type_v", [("f16", "q8_0"), ("q8_0", "q4_0"), ("q4_0", "fp8_e4m3"),
                                           ("fp8_e4m3", "f16")])
def test_attention_matches_float64_reference(type_k, type_v):
    """Every K type and every V type once (three compilations per kernel level: they are slow).
    A float32 cache runs the original float32 attention (ops.attention), unchanged."""
    keys, values = _data()
    group, threads = N_HEADS // N_KV, numba.config.NUMBA_NUM_THREADS
    rng = np.random.default_rng(5)
    q_col = 16
    # a batch (keys 20..24: 8-key blocks and tails), one token, a batch at the end of the cache
    for start, n in ((19, 5), (23, 1), (38, 5)):
        kc, vc = _caches(type_k, type_v, keys, values, start + n)
        kc[:, start + n:] = 0xFF  # rows not stored yet hold anything (NaN in f16 and fp8): never used
        vc[:, start + n:] = 0xFF
        y = rng.standard_normal((n, q_col + N_HEADS * HD)).astype(np.float32)
        ref = reference_attention(y, q_col, n, keys, values, start, type_k, type_v, N_HEADS, N_KV, HD)
        for name, kernel, with_accs in _attention_kernels():
            scores = np.zeros((threads, group, N_CTX), np.float32)
            qqs = np.zeros((threads, group, kvcache.row_bytes("q8_0", HD)), np.uint8)
            out = np.full((n, N_HEADS * HD), np.nan, np.float32)
            kt, vt = kvcache.kv_type(type_k).code, kvcache.kv_type(type_v).code
            if with_accs:
                kernel(kt, vt, y, q_col, n, kc, vc, start, scores, np.zeros((threads, group, HD), np.float32), qqs,
                       F16_TABLE, out)
            else:
                kernel(kt, vt, y, q_col, n, kc, vc, start, scores, qqs, F16_TABLE, out)
            np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0, err_msg=f"{name} {type_k}/{type_v} n={n}")


# -- the Walsh-Hadamard rotation of quantized caches -------------------------------------------


def sylvester(n):
    """H_n / sqrt(n) by Kronecker products of [[1, 1], [1, -1]] (llama.cpp's ggml_gen_hadamard builds
    the same matrix by its block recursion)."""
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return h / np.sqrt(n)


@pytest.mark.parametrize("size", [64, 128])
def test_hadamard_is_the_sylvester_matrix(size):
    rng = np.random.default_rng(size)
    y = rng.standard_normal((4, 512)).astype(np.float32)
    before = y.copy()
    block = y[:3, 128:384]  # a column slice, as the step passes y's q/k/v columns
    x = block.astype(np.float64).copy()
    ops.hadamard(block, 3, 256, size)
    outside = np.ones(y.shape, bool)
    outside[:3, 128:384] = False
    assert (y[outside] == before[outside]).all()
    expected = (x.reshape(3, -1, size) @ sylvester(size).T).reshape(3, 256)
    np.testing.assert_allclose(block, expected, atol=2e-6, rtol=0)
    ops.hadamard(block, 3, 256, size)  # H H = I
    np.testing.assert_allclose(block, x, atol=2e-6, rtol=0)


def test_rotation_follows_llama_cpp(monkeypatch):
    """Which caches are rotated, and by what size, as src/llama-kv-cache.cpp decides (attn_rot_k:
    quantized type and head_dim % 64 == 0, size the largest power of two dividing head_dim;
    attn_rot_v: the same test, size 64)."""
    assert [kvcache.rotation(t, 64, "K") for t in TYPES] == [0, 0, 64, 64, 64]
    assert [kvcache.rotation("q4_0", hd, "K") for hd in (32, 96, 128, 192, 256)] == [0, 0, 128, 64, 256]
    assert [kvcache.rotation("q4_0", hd, "V") for hd in (32, 96, 128, 192, 256)] == [0, 0, 64, 64, 64]
    monkeypatch.setenv(kvcache.ROTATE_OFF, "1")
    assert kvcache.rotation("q4_0", 64, "K") == kvcache.rotation("q8_0", 128, "V") == 0


# -- types, sizes, errors ----------------------------------------------------------------------


def test_sizes_and_names():
    assert [kvcache.row_bytes(t, 64) for t in TYPES] == [256, 128, 68, 36, 66]
    # SmolLM2-135M: 30 layers, 3 kv heads of 64: f16 23040 B/token, q8_0 12240 (0.53x), q4_0 6480
    assert kvcache.bytes_per_token("f16", "f16", 30, 3, 64) == 30 * 3 * 2 * 128
    assert kvcache.bytes_per_token("q8_0", "q8_0", 30, 3, 64) == 12240
    assert kvcache.kv_type("Q8_0").name == "q8_0" and kvcache.DEFAULT == "f16"
    with pytest.raises(PyllmError, match=r"unknown KV cache type 'q9'; valid types: f32, f16, q8_0, q4_0, fp8_e4m3"):
        kvcache.kv_type("q9")


def test_e4m3_values_are_the_ocp_values():
    """The decode table of the fp8_e4m3 cache (a float32 bit move) against the OCP formula, every
    code; and the AVX2 load of eight codes against the table, NaN codes included."""
    want = np.array([lowref.decode("E4M3", c) for c in range(256)])
    np.testing.assert_array_equal(kvcache.E4M3_VALUES.astype(np.float64), want)
    if not isa_supported(AVX2):
        pytest.skip("no AVX2 on this host: the AVX2 load is not compiled")
    row = np.zeros(8 * 33, np.uint8)  # 8 blocks, scale byte 127 + s (value 2^s), the 256 codes in order
    for b in range(8):
        row[33 * b] = 127 + b - 4
        row[33 * b + 1:33 * b + 33] = np.arange(32 * b, 32 * b + 32)

    from pyllm.kernels.simd import store_f32x8

    @numba.njit
    def loads(row):
        out = np.zeros(256, np.float32)
        for d in range(0, 256, 8):
            store_f32x8(out, d, kvcache.load8(4, row, 0, d))  # 4: kvcache.FP8_E4M3
        return out

    scale = np.repeat(2.0 ** (np.arange(8) - 4), 32)
    np.testing.assert_array_equal(loads(row).astype(np.float64), want * scale)


def test_block_type_needs_head_dim_multiple_of_32(stories260k):
    with pytest.raises(PyllmError, match=r"a q8_0 K cache needs head_dim a multiple of 32, this model's is 8"):
        pyllm.load(stories260k, n_ctx=64, cache_type_k="q8_0")
    with pytest.raises(PyllmError, match=r"a q4_0 V cache needs head_dim a multiple of 32"):
        pyllm.load(stories260k, n_ctx=64, cache_type_v="q4_0")
    with pytest.raises(PyllmError, match=r"unknown KV cache type 'bf16'"):
        pyllm.load(stories260k, n_ctx=64, cache_type_v="bf16")


# -- models ------------------------------------------------------------------------------------


def test_f16_cache_generates_the_f32_caches_greedy_text(stories260k):
    """stories260K's greedy text is the same with an f16 cache (the default) as with f32: halves keep
    11 bits of mantissa, and its scores are far from ties over these 60 tokens."""
    texts = {}
    for t in ("f32", "f16"):
        model = pyllm.load(stories260k, n_ctx=128, cache_type_k=t, cache_type_v=t)
        assert model.cache_types == (t, t)
        texts[t] = pyllm.generate(model, "Once upon a time", max_tokens=60, temp=0)
    assert texts["f16"] == texts["f32"] and len(texts["f32"]) > 100


@pytest.fixture(scope="module")
def tiny_hd32(tmp_path_factory, stories260k):
    """A 2-layer random Llama with head_dim 32 (stories260K's tokenizer), so block caches apply."""
    from pyllm.base import GGMLType
    from pyllm.convert.gguf_writer import GGUFWriter
    from pyllm.kernels.quantize import quantize as pq
    from pyllm.runtime.gguf_file import GGUFFile

    src = GGUFFile(stories260k)
    path = tmp_path_factory.mktemp("kv") / "hd32.gguf"
    w = GGUFWriter(path)
    for key, value in src.metadata.items():
        if key.startswith("tokenizer.") or key == "general.architecture":
            vtype, item_type = src.value_types[key]
            w.add(key, value, vtype, item_type)
    hidden, ff, heads, kv, hd, vocab = 128, 256, 4, 2, 32, int(src.tensors["token_embd.weight"].dims[1])
    for key, value in {"llama.block_count": 2, "llama.embedding_length": hidden, "llama.feed_forward_length": ff,
                       "llama.attention.head_count": heads, "llama.attention.head_count_kv": kv,
                       "llama.context_length": 128, "llama.rope.dimension_count": hd}.items():
        w.add_u32(key, value)
    w.add_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    rng = np.random.default_rng(2)

    def tensor(name, shape, scale):
        x = (rng.standard_normal(shape) * scale).astype(np.float32)
        w.add_tensor(name, shape, GGMLType.Q8_0, lambda x=x: pq(x, GGMLType.Q8_0))

    tensor("token_embd.weight", (vocab, hidden), 1.0)
    shapes = {"attn_q": (heads * hd, hidden), "attn_k": (kv * hd, hidden), "attn_v": (kv * hd, hidden),
              "attn_output": (hidden, heads * hd), "ffn_gate": (ff, hidden), "ffn_up": (ff, hidden),
              "ffn_down": (hidden, ff)}
    for i in range(2):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", (hidden,), GGMLType.F32, lambda: np.ones(hidden, np.float32))
        for name, shape in shapes.items():
            tensor(f"blk.{i}.{name}.weight", shape, 2.0 / np.sqrt(shape[1]))
    w.add_tensor("output_norm.weight", (hidden,), GGMLType.F32, lambda: np.ones(hidden, np.float32))
    tensor("output.weight", (vocab, hidden), 1.0 / np.sqrt(hidden))
    w.write()
    return path


@pytest.mark.parametrize("type_k,type_v,row_bytes,bound", [("q8_0", "q4_0", 34 + 18, 0.93),
                                                           ("fp8_e4m3", "fp8_e4m3", 33 + 33, 0.96)])
def test_block_caches_in_the_model(tiny_hd32, type_k, type_v, row_bytes, bound):
    """Block caches through the compiled step: batch prefill equals token-by-token decode (the
    cache holds the same bytes either way), and the logits stay near the float64 reference.

    How near is the formats' own error (the kernels are held exactly to it above): measured on
    this model, the minimum cosine over the 30 positions is 0.9994 with an f32 cache, 0.9975 with
    q8_0/q8_0, 0.951 with q8_0/q4_0 (4-bit values of a random model's V: the q4_0 cache is lossy),
    0.976 with fp8_e4m3/fp8_e4m3 (3 mantissa bits: ~4x q8_0's error on normal values)."""
    from reference_llama import forward, load_weights

    model = pyllm.load(tiny_hd32, n_ctx=64, cache_type_k=type_k, cache_type_v=type_v)
    assert model.cache_types == (type_k, type_v) and model.kv_bytes_per_token == 2 * 2 * row_bytes
    ids = list(np.random.default_rng(4).integers(3, 500, size=30))
    batch = model.logits(ids)
    model.reset()
    steps = np.stack([model.eval([i]) for i in ids])
    np.testing.assert_allclose(steps, batch, atol=1e-4, rtol=0)
    ref = forward(*load_weights(tiny_hd32), ids)
    cos = (batch * ref).sum(-1) / np.linalg.norm(batch, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > bound, cos.min()


def test_flags_reach_the_model(stories260k, capsys, monkeypatch):
    from pyllm.cli import bench, generate, info
    from pyllm.cli.common import cache_type_list
    from pyllm.runtime import loader

    loaded = []
    real_load = loader.load
    monkeypatch.setattr(loader, "load", lambda *a, **kw: loaded.append(real_load(*a, **kw)) or loaded[-1])
    assert generate.main([str(stories260k), "-p", "Once", "-n", "4", "--temp", "0", "-c", "64",
                          "-ctk", "f32", "--cache-type-v", "f32"]) == 0
    assert loaded[-1].cache_types == ("f32", "f32")
    assert info.main([str(stories260k), "-ctk", "f32", "-ctv", "f16", "-c", "100"]) == 0
    assert "f32 K, f16 V: 960 bytes per token" in capsys.readouterr().out  # 5 layers x 4 kv heads x (32 + 16)
    assert bench.main([str(stories260k), "-p", "0", "-n", "4", "-r", "1", "-ctk", "f32", "-ctv", "f32"]) == 0
    out = capsys.readouterr().out
    assert "| type_k | type_v |" in out and "| f32 | f32 |" in out  # shown when not f16, as llama-bench
    assert cache_type_list("q8_0,F16") == ["q8_0", "f16"]  # bench's comma lists
    for argv in (["-ctk", "q9"], ["-ctv", "f16,f32"]):
        with pytest.raises(SystemExit) as e:
            generate.main([str(stories260k), "-p", "x", *argv])
        assert e.value.code == 2
    assert "valid types: f32, f16, q8_0, q4_0" in capsys.readouterr().err
