"""Helpers for the tuner/LoRA tests: a tiny random decoder written as a real GGUF file,
and batches from plain token lists."""

import numpy as np
from pyllm.base import GGMLType
from pyllm.convert.gguf_writer import GGUFWriter


def write_tiny_model(path, arch="llama", qtype=GGMLType.F32, seed=0, hidden=32, heads=4, kv_heads=2, ff=64,
                     layers=2, vocab=64, ctx=64, tied=False, bias=None, rope_dim=None):
    """A random `arch` decoder (llama: adjacent-pair rope; qwen2: neox rope and q/k/v biases)."""
    from pyllm.convert.quantize import encode

    rng = np.random.default_rng(seed)
    hd = hidden // heads
    bias = arch == "qwen2" if bias is None else bias
    w = GGUFWriter(path)
    w.add_string("general.architecture", arch)
    w.add_string("general.name", f"tiny-{arch}")
    for key, value in (("embedding_length", hidden), ("feed_forward_length", ff), ("block_count", layers),
                       ("attention.head_count", heads), ("attention.head_count_kv", kv_heads),
                       ("context_length", ctx), ("rope.dimension_count", rope_dim or hd)):
        w.add_u32(f"{arch}.{key}", value)
    w.add_f32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_f32(f"{arch}.rope.freq_base", 10000.0)

    def mat(name, rows, cols, scale=None, t=qtype):
        x = (rng.standard_normal((rows, cols)) * (scale or 1.0 / np.sqrt(cols))).astype(np.float32)
        w.add_tensor(name, (rows, cols), t, lambda x=x, t=t: encode(x, t))

    def vec(name, n, base=1.0, spread=0.2):
        x = (base + spread * rng.standard_normal(n)).astype(np.float32)
        w.add_tensor(name, (n,), GGMLType.F32, lambda x=x: x)

    mat("token_embd.weight", vocab, hidden, scale=1.0)
    vec("output_norm.weight", hidden)
    if not tied:
        mat("output.weight", vocab, hidden)
    for i in range(layers):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", hidden)
        mat(p + "attn_q.weight", heads * hd, hidden)
        mat(p + "attn_k.weight", kv_heads * hd, hidden)
        mat(p + "attn_v.weight", kv_heads * hd, hidden)
        mat(p + "attn_output.weight", hidden, heads * hd)
        if bias:
            vec(p + "attn_q.bias", heads * hd, 0.0, 0.3)
            vec(p + "attn_k.bias", kv_heads * hd, 0.0, 0.3)
            vec(p + "attn_v.bias", kv_heads * hd, 0.0, 0.3)
        vec(p + "ffn_norm.weight", hidden)
        mat(p + "ffn_gate.weight", ff, hidden)
        mat(p + "ffn_up.weight", ff, hidden)
        mat(p + "ffn_down.weight", hidden, ff)
    w.write()
    return path


def load_base(path, n_ctx=32):
    """The runtime's Model for a GGUF file, without a tokenizer (the trainer's base)."""
    from pyllm.runtime.gguf_file import GGUFFile
    from pyllm.runtime.llama import Model

    return Model.from_gguf(GGUFFile(path), None, n_ctx)


def batch_of(seqs, loss_from=None):
    """A padded Batch from token lists; loss_from[i]: first target index of sequence i in the loss."""
    from pyllm.tuner.data import Batch

    T = max(len(s) for s in seqs) - 1
    inputs = np.zeros((len(seqs), T), dtype=np.int64)
    targets = np.zeros((len(seqs), T), dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=bool)
    for i, s in enumerate(seqs):
        n = len(s) - 1
        inputs[i, :n], targets[i, :n] = s[:-1], s[1:]
        mask[i, (loss_from[i] if loss_from else 0):n] = True
    return Batch(inputs, targets, mask, tuple(range(len(seqs))), tuple(len(s) - 1 for s in seqs))
