"""`pyllm export`: --fuse (base + adapter in one GGUF) and --peft (Hugging Face).

Oracles: the runtime applying the adapter; gguf-py's quantizer on the merged weights;
llama.cpp's llama-export-lora (with PYLLM_LLAMA_CPP_BIN); for PEFT, an independent float64
forward in Hugging Face's conventions (rotate-half rope) over the Hugging Face checkpoint
of stories260K with PEFT's W + (alpha / r) B A merged in."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyllm
import pytest
from conftest import shared_file
from pyllm.base import GGMLType
from pyllm.cli.main import main
from pyllm.runtime.gguf_file import GGUFFile
from test_lora_runtime import random_adapter
from tuner_helpers import write_tiny_model

BIN = os.environ.get("PYLLM_LLAMA_CPP_BIN")


def test_fused_f32_model_equals_the_adapter_at_run_time(tmp_path, stories260k):
    random_adapter(tmp_path / "a.gguf", stories260k, rank=4, alpha=8.0, size=0.2)
    assert main(["export", "--fuse", "-m", str(stories260k), "--lora-scaled", str(tmp_path / "a.gguf"), "0.6",
                 "-o", str(tmp_path / "fused.gguf"), "-q"]) == 0
    base, fused = GGUFFile(stories260k), GGUFFile(tmp_path / "fused.gguf")
    assert {n: t.qtype for n, t in fused.tensors.items()} == {n: t.qtype for n, t in base.tensors.items()}
    assert fused.metadata["general.architecture"] == "llama" and "general.type" not in fused.metadata
    ids = pyllm.load_tokenizer(stories260k).encode("Once upon a time, there was a big tree.")
    ref = pyllm.load(stories260k, n_ctx=64, lora=[(tmp_path / "a.gguf", 0.6)]).logits(ids)
    np.testing.assert_allclose(pyllm.load(tmp_path / "fused.gguf", n_ctx=64).logits(ids), ref, atol=1e-4)


@pytest.mark.parametrize("qtype", [GGMLType.Q8_0, GGMLType.Q4_0])
def test_fused_quantized_weights_are_the_requantized_merge(tmp_path, qtype):
    # oracle: gguf-py's own quantizer applied to dequantize(W) + scale * B A
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    base = write_tiny_model(tmp_path / "tiny.gguf", qtype=qtype)
    w = random_adapter(tmp_path / "a.gguf", base, targets=("q", "down"), rank=2, alpha=4.0, size=0.3)
    assert main(["export", "--fuse", "-m", str(base), "--lora", str(tmp_path / "a.gguf"), "-o",
                 str(tmp_path / "fused.gguf"), "-q"]) == 0
    src, fused = GGUFFile(base), GGUFFile(tmp_path / "fused.gguf")
    gq = GGMLQuantizationType(int(qtype))
    for name, info in src.tensors.items():
        assert fused.tensors[name].qtype == info.qtype
        if name in w.names:
            rows, cols = info.dims[1], info.dims[0]
            merged = dequantize(src.raw(name).reshape(rows, -1), gq).reshape(rows, cols)
            merged = merged + np.float32(2.0) * (w.b[name] @ w.a[name])
            expected = quantize(merged.astype(np.float32), gq)
            assert np.array_equal(fused.raw(name).reshape(expected.shape), expected), name
        else:
            assert np.array_equal(fused.raw(name), src.raw(name)), name


def test_fuse_outtype_and_bad_usage(tmp_path, stories260k):
    random_adapter(tmp_path / "a.gguf", stories260k)
    assert main(["export", "--fuse", "-m", str(stories260k), "--lora", str(tmp_path / "a.gguf"), "-o",
                 str(tmp_path / "q8.gguf"), "--outtype", "q8_0", "-q"]) == 0
    for name, t in GGUFFile(tmp_path / "q8.gguf").tensors.items():  # ffn_down rows (172) fall back to F16
        assert t.qtype == (GGMLType.F32 if "norm" in name else GGMLType.Q8_0 if t.dims[0] % 32 == 0 else GGMLType.F16)
    for argv in (["export", "--fuse", "-m", str(stories260k), "-o", str(tmp_path / "x.gguf")],
                 ["export", "--fuse", "--peft", "-m", str(stories260k), "--lora", "a", "-o", "x"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert main(["export", "--fuse", "-m", str(stories260k), "--lora", str(stories260k), "-o",
                 str(tmp_path / "y.gguf")]) == 1
    assert not (tmp_path / "y.gguf").exists()


# -- PEFT -----------------------------------------------------------------------------------


def _hf_forward(hf_dir, peft_dir, ids):
    """Float64 logits of the Hugging Face checkpoint with the PEFT adapter merged, in HF's
    conventions: q/k rows in rotate-half order, hence neox rope (tests/reference_llama.py)."""
    from reference_llama import forward
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    hf = {k: v.astype(np.float64) for k, v in load_file(hf_dir / "model.safetensors").items()}
    peft = load_file(peft_dir / "adapter_model.safetensors")
    pc = json.loads((peft_dir / "adapter_config.json").read_text())
    scale = pc["lora_alpha"] / pc["r"]
    for key in peft:
        if key.endswith(".lora_A.weight"):
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            b = peft[key.replace("lora_A", "lora_B")].astype(np.float64)
            hf[module + ".weight"] = hf[module + ".weight"] + scale * b @ peft[key].astype(np.float64)
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    w = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        for k, g in names.items():
            w[f"blk.{i}.{g}.weight"] = hf[f"model.layers.{i}.{k}.weight"]
    hp = {"n_layers": cfg["num_hidden_layers"], "n_heads": cfg["num_attention_heads"],
          "n_kv": cfg["num_key_value_heads"], "eps": cfg["rms_norm_eps"], "base": cfg["rope_theta"], "neox": True}
    return forward(w, hp, ids)


def test_peft_export_matches_the_hugging_face_checkpoint(tmp_path, stories260k):
    hf_dir = shared_file("derived/stories260K-hf")
    random_adapter(tmp_path / "a.gguf", stories260k, rank=4, alpha=8.0, size=0.2)
    assert main(["export", "--peft", "-m", str(stories260k), "--lora", str(tmp_path / "a.gguf"),
                 "-o", str(tmp_path / "peft")]) == 0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"])
    from safetensors.numpy import load_file

    t = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert t["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].shape == (4, 64)
    assert t["base_model.model.model.layers.4.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    ids = pyllm.load_tokenizer(stories260k).encode("Once upon a time, there was a big tree.")
    ours = pyllm.load(stories260k, n_ctx=64, lora=[(tmp_path / "a.gguf", 1.0)],
                      cache_type_k="f32", cache_type_v="f32").logits(ids)
    hf = _hf_forward(Path(hf_dir), tmp_path / "peft", ids)
    base = pyllm.load(stories260k, n_ctx=64, cache_type_k="f32", cache_type_v="f32").logits(ids)
    assert np.abs(hf - base).max() > 0.5  # the adapter changes the logits ...
    np.testing.assert_allclose(ours, hf, atol=2e-3)  # ... the same way in both layouts


# -- llama.cpp's llama-export-lora ------------------------------------------------------------


def export_lora_bin():
    if not BIN:
        pytest.skip("PYLLM_LLAMA_CPP_BIN (llama.cpp's build/bin) is not set")
    exe = Path(BIN) / "llama-export-lora"
    if not exe.exists():
        pytest.skip(f"{exe} is missing (cmake --build build --target llama-export-lora)")
    return exe


def test_fuse_equals_llama_export_lora(tmp_path, stories260k):
    exe = export_lora_bin()
    random_adapter(tmp_path / "a.gguf", stories260k, rank=4, alpha=8.0, size=0.2)
    proc = subprocess.run([str(exe), "-m", str(stories260k), "--lora-scaled", f"{tmp_path / 'a.gguf'}:0.5",
                           "-o", str(tmp_path / "theirs.gguf"), "-t", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main(["export", "--fuse", "-m", str(stories260k), "--lora-scaled", str(tmp_path / "a.gguf"), "0.5",
                 "-o", str(tmp_path / "ours.gguf"), "-q"]) == 0
    ours, theirs = GGUFFile(tmp_path / "ours.gguf"), GGUFFile(tmp_path / "theirs.gguf")
    assert set(ours.tensors) == set(theirs.tensors)
    for name in ours.tensors:  # all F32 in stories260K: merged in float32 on both sides
        assert ours.tensors[name].qtype == theirs.tensors[name].qtype == GGMLType.F32
        np.testing.assert_allclose(ours.array(name), theirs.array(name), atol=2e-6, err_msg=name)


def test_fuse_quantized_model_to_f16_equals_llama_export_lora(tmp_path, smollm2):
    # llama-export-lora writes each adapted tensor as F16 (F32 ones stay F32): so does `--outtype f16`
    exe = export_lora_bin()
    random_adapter(tmp_path / "a.gguf", smollm2, targets=("q", "k", "down"), rank=4, alpha=8.0, size=0.02)
    proc = subprocess.run([str(exe), "-m", str(smollm2), "--lora", str(tmp_path / "a.gguf"),
                           "-o", str(tmp_path / "theirs.gguf"), "-t", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main(["export", "--fuse", "-m", str(smollm2), "--lora", str(tmp_path / "a.gguf"), "--outtype", "f16",
                 "-o", str(tmp_path / "ours.gguf"), "-q"]) == 0
    ours, theirs = GGUFFile(tmp_path / "ours.gguf"), GGUFFile(tmp_path / "theirs.gguf")
    assert set(ours.tensors) == set(theirs.tensors)
    for name in ("blk.0.attn_q.weight", "blk.7.attn_k.weight", "blk.29.ffn_down.weight", "blk.13.attn_q.weight"):
        assert ours.tensors[name].qtype == theirs.tensors[name].qtype == GGMLType.F16, name
        a, b = ours.array(name), theirs.array(name)
        # float16 rounding of the same float32 merge: equal, or one half-ulp apart
        assert np.all(np.abs(a - b) <= np.abs(b) * 2**-10 + 2**-24), name
        assert np.mean(a == b) > 0.99, name
