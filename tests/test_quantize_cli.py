"""`pyllm quantize`: llama.cpp's file types, per-tensor mixes, fall-backs and safety rules.

The input is a small synthetic f32 Llama GGUF written here (8 layers, rows of 256 so every
K-quant applies), with stories260K's tokenizer so that it loads. Expected mixes are written
out by hand from llama.cpp's src/llama-quant.cpp (llama_tensor_get_type).
"""

from pathlib import Path

import numpy as np
import pytest
from pyllm.base import GGMLType as T
from pyllm.base import PyllmError
from pyllm.convert.gguf_writer import GGUFWriter
from pyllm.convert.quantize import FILE_TYPES, quantize_gguf
from pyllm.runtime.gguf_file import GGUFFile

FIXTURES = Path(__file__).resolve().parent / "fixtures"
N_LAYER, DIM, FF, N_HEAD, N_KV, VOCAB = 8, 256, 512, 4, 2, 512


def _tensors(rng):
    t = {"token_embd.weight": rng.standard_normal((VOCAB, DIM)), "output_norm.weight": 1 + 0.1 * rng.standard_normal(DIM),
         "output.weight": rng.standard_normal((VOCAB, DIM))}
    hd = DIM // N_HEAD
    for i in range(N_LAYER):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = 1 + 0.1 * rng.standard_normal(DIM)
        t[p + "attn_q.weight"] = rng.standard_normal((DIM, DIM))
        t[p + "attn_k.weight"] = rng.standard_normal((N_KV * hd, DIM))
        t[p + "attn_v.weight"] = rng.standard_normal((N_KV * hd, DIM))
        t[p + "attn_output.weight"] = rng.standard_normal((DIM, DIM))
        t[p + "ffn_norm.weight"] = 1 + 0.1 * rng.standard_normal(DIM)
        t[p + "ffn_gate.weight"] = rng.standard_normal((FF, DIM))
        t[p + "ffn_up.weight"] = rng.standard_normal((FF, DIM))
        t[p + "ffn_down.weight"] = rng.standard_normal((DIM, FF))
    scale = {n: (1.0 if n.endswith("norm.weight") else 0.05) for n in t}
    return {n: (v if n.endswith("norm.weight") else v * scale[n]).astype(np.float32) for n, v in t.items()}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, stories260k):
    """An f32 llama GGUF (GQA 2, 8 layers) with the stories tokenizer; returns (path, tensors)."""
    tok = GGUFFile(stories260k)
    rng = np.random.default_rng(0)
    tensors = _tensors(rng)
    path = tmp_path_factory.mktemp("q") / "synthetic-f32.gguf"
    w = GGUFWriter(path)
    w.add_string("general.architecture", "llama")
    w.add_string("general.name", "synthetic")
    for key, value in (("block_count", N_LAYER), ("context_length", 256), ("embedding_length", DIM),
                       ("feed_forward_length", FF), ("attention.head_count", N_HEAD), ("attention.head_count_kv", N_KV),
                       ("rope.dimension_count", DIM // N_HEAD)):
        w.add_u32(f"llama.{key}", value)
    w.add_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_u32("general.file_type", 0)
    for key, value in tok.metadata.items():
        if key.startswith("tokenizer."):
            w.add(key, value, *tok.value_types[key])
    for name, x in tensors.items():
        w.add_tensor(name, x.shape, T.F32, lambda x=x: x)
    w.write()
    return path, tensors


def types_of(path):
    return {n: t.qtype for n, t in GGUFFile(path).tensors.items()}


def more_bits(i, n=N_LAYER):  # use_more_bits in llama-quant.cpp
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# Expected (attn_v, ffn_down, attn_output, output, token_embd, others) per layer i for
# GQA 2, 8 layers, from llama_tensor_get_type.
def expected(ft, i):
    if ft == "Q2_K":
        return T.Q3_K, T.Q3_K, T.Q3_K, T.Q6_K, T.Q2_K, T.Q2_K
    if ft == "Q3_K_S":
        return T.Q3_K, T.Q3_K, T.Q3_K, T.Q6_K, T.Q3_K, T.Q3_K
    if ft == "Q3_K_M":
        return (T.Q5_K if i < 2 else T.Q4_K), T.Q4_K, T.Q4_K, T.Q6_K, T.Q3_K, T.Q3_K
    if ft == "Q3_K_L":
        return T.Q5_K, T.Q5_K, T.Q5_K, T.Q6_K, T.Q3_K, T.Q3_K
    if ft == "Q4_K_S":
        return (T.Q5_K if i < 4 else T.Q4_K), (T.Q5_K if i < 1 else T.Q4_K), T.Q4_K, T.Q6_K, T.Q4_K, T.Q4_K
    if ft == "Q4_K_M":
        mb = T.Q6_K if more_bits(i) else T.Q4_K
        return mb, mb, T.Q4_K, T.Q6_K, T.Q4_K, T.Q4_K
    if ft == "Q5_K_S":
        return T.Q5_K, T.Q5_K, T.Q5_K, T.Q6_K, T.Q5_K, T.Q5_K
    if ft == "Q5_K_M":
        mb = T.Q6_K if more_bits(i) else T.Q5_K
        return mb, mb, T.Q5_K, T.Q6_K, T.Q5_K, T.Q5_K
    if ft == "Q6_K":
        return (T.Q6_K,) * 6
    if ft == "Q8_0":
        return (T.Q8_0,) * 6
    if ft in ("F16", "BF16", "F32"):
        return (T[ft],) * 6
    if ft == "MXFP4":  # output.weight -> Q8_0, as llama.cpp's MXFP4_MOE
        return T.MXFP4, T.MXFP4, T.MXFP4, T.Q8_0, T.MXFP4, T.MXFP4
    legacy = T[ft]  # also pyllm's NF4, FP8_*, FP6_E3M2: no mixes
    return legacy, legacy, legacy, T.Q6_K, legacy, legacy  # output.weight -> Q6_K even for Q4_0..Q5_1


@pytest.mark.parametrize("ft", [f for f in FILE_TYPES if f != "F32"])
def test_each_type_mix_and_load(tmp_path, synthetic, ft):
    import pyllm

    src, tensors = synthetic
    out = tmp_path / f"{ft}.gguf"
    rep = quantize_gguf(src, out, ft)
    got = types_of(out)
    for i in range(N_LAYER):
        v, down, o, _, _, other = expected(ft, i)
        p = f"blk.{i}."
        assert got[p + "attn_v.weight"] == v, (ft, i)
        assert got[p + "ffn_down.weight"] == down, (ft, i)
        assert got[p + "attn_output.weight"] == o, (ft, i)
        for n in ("attn_q.weight", "attn_k.weight", "ffn_gate.weight", "ffn_up.weight"):
            assert got[p + n] == other, (ft, n)
        assert got[p + "attn_norm.weight"] == T.F32 and got[p + "ffn_norm.weight"] == T.F32
    _, _, _, output, embd, _ = expected(ft, 0)
    assert got["output.weight"] == output and got["token_embd.weight"] == embd and got["output_norm.weight"] == T.F32
    g = GGUFFile(out)
    assert g.metadata["general.file_type"] == FILE_TYPES[ft].ftype
    assert g.metadata["tokenizer.ggml.tokens"] == GGUFFile(src).metadata["tokenizer.ggml.tokens"]
    assert rep.bytes_in == sum(x.nbytes for x in tensors.values()) and rep.bytes_out < rep.bytes_in
    # the file loads and runs; the quantized weights stay close to the originals
    model = pyllm.load(out)
    logits = model.logits([1, 5, 9, 300])
    assert np.all(np.isfinite(logits))
    w = g.array("blk.3.attn_q.weight")
    ref = tensors["blk.3.attn_q.weight"]
    rel = np.sqrt(np.mean((w - ref) ** 2)) / np.sqrt(np.mean(ref**2))
    assert rel < {"Q2_K": 0.5, "Q3_K_S": 0.3, "Q3_K_M": 0.3, "Q3_K_L": 0.3}.get(ft, 0.15), (ft, rel)


@pytest.mark.parametrize("ft", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_legacy_bytes_equal_gguf_py(tmp_path, synthetic, ft):
    import gguf.quants

    src, tensors = synthetic
    out = tmp_path / "pure.gguf"
    quantize_gguf(src, out, ft, pure=True)
    g = GGUFFile(out)
    for name in ("token_embd.weight", "output.weight", "blk.2.attn_v.weight", "blk.7.ffn_down.weight"):
        assert g.tensors[name].qtype == T[ft]
        ref = gguf.quants.quantize(tensors[name], gguf.GGMLQuantizationType[ft])
        assert np.array_equal(g.raw(name), ref.reshape(-1)), name


def test_pure_and_leave_output(tmp_path, synthetic):
    src, _ = synthetic
    quantize_gguf(src, tmp_path / "p.gguf", "Q4_K_M", pure=True)
    got = types_of(tmp_path / "p.gguf")
    assert {t for n, t in got.items() if not n.endswith("norm.weight")} == {T.Q4_K}
    quantize_gguf(src, tmp_path / "l.gguf", "Q4_K_M", leave_output=True)
    got = types_of(tmp_path / "l.gguf")
    assert got["output.weight"] == T.F32 and got["blk.0.attn_v.weight"] == T.Q6_K


def test_fallback_for_short_rows(tmp_path):
    """tiny-llama has rows of 64 and 128: K-quants fall back as llama.cpp's convert_incompatible_tensor."""
    from pyllm.convert.hf import convert_hf

    f32 = tmp_path / "tiny.gguf"
    convert_hf(FIXTURES / "tiny-llama", f32, "f32")
    for ft, want in (("Q4_K_M", T.Q5_0), ("Q6_K", T.Q8_0), ("Q5_K_S", T.Q5_1), ("Q2_K", T.Q4_0), ("Q3_K_S", T.Q4_0)):
        out = tmp_path / f"{ft}.gguf"
        quantize_gguf(f32, out, ft)
        got = types_of(out)
        assert got["blk.0.attn_q.weight"] == want, ft
        assert got["output.weight"] == T.Q8_0  # nx % 256 != 0 -> Q8_0
        assert got["rope_freqs.weight"] == T.F32


def test_requantize_refused_then_allowed(tmp_path, synthetic):
    src, _ = synthetic
    q = tmp_path / "q8.gguf"
    quantize_gguf(src, q, "Q8_0")
    out = tmp_path / "q4.gguf"
    with pytest.raises(PyllmError, match="already quantized \\(Q8_0\\).*--allow-requantize"):
        quantize_gguf(q, out, "Q4_0")
    assert not out.exists()
    quantize_gguf(q, out, "Q4_0", allow_requantize=True)
    assert types_of(out)["blk.0.attn_q.weight"] == T.Q4_0
    # F16 input is not "quantized": converting it needs no flag
    quantize_gguf(src, tmp_path / "f16.gguf", "F16")
    quantize_gguf(tmp_path / "f16.gguf", tmp_path / "q.gguf", "Q8_0")


def test_cli(tmp_path, synthetic, capsys):
    from pyllm.cli.main import main

    src, _ = synthetic
    out = tmp_path / "o.gguf"
    assert main(["quantize", str(src), str(out), "q4_k_m"]) == 0
    err = capsys.readouterr().err
    assert "blk.0.attn_v.weight" in err and "F32 -> Q6_K" in err and "model size:" in err
    assert main(["quantize", str(src), str(tmp_path / "x.gguf"), "Q7_K"]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: unknown type 'Q7_K'") and "\n" not in line
    assert main(["quantize", str(src), str(src), "Q4_0"]) == 1
    assert "refusing to overwrite the input" in capsys.readouterr().err
    assert main(["quantize", str(out), str(tmp_path / "y.gguf"), "Q4_0"]) == 1
    assert "--allow-requantize" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


def test_error_midway_leaves_nothing(tmp_path, synthetic, monkeypatch):
    import pyllm.convert.quantize as qmod

    src, _ = synthetic
    out = tmp_path / "o.gguf"
    calls = []

    def boom(x, qtype):
        calls.append(qtype)
        if len(calls) > 3:
            raise RuntimeError("disk on fire")
        return orig(x, qtype)

    orig = qmod.encode
    monkeypatch.setattr(qmod, "encode", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        quantize_gguf(src, out, "Q8_0")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
