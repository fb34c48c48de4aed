"""An independent float64 numpy Llama forward pass, used only as a test oracle.

It shares no code with pyllm: weights are read with gguf.GGUFReader and dequantized with
gguf.quants.dequantize, and attention is the textbook masked softmax over the whole sequence.
"""

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def _field(reader, key):
    f = reader.fields[key]
    value = f.parts[f.data[0]]
    return value.tobytes().decode() if f.types[0].name == "STRING" else value[0]


def load_weights(path):
    reader = GGUFReader(path)
    w = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # numpy order
        w[t.name] = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float64)
    arch = _field(reader, "general.architecture")
    hp = {
        "n_layers": int(_field(reader, f"{arch}.block_count")),
        "n_heads": int(_field(reader, f"{arch}.attention.head_count")),
        "n_kv": int(_field(reader, f"{arch}.attention.head_count_kv")),
        "eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "base": float(_field(reader, f"{arch}.rope.freq_base")) if f"{arch}.rope.freq_base" in reader.fields else 10000.0,
        "neox": arch == "qwen2",
    }
    return w, hp


def _rope(x, base, neox):
    # x: (seq, heads, head_dim); rotate pairs by pos * base^(-2i/head_dim)
    seq, _, hd = x.shape
    inv = base ** (-np.arange(0, hd, 2) / hd)  # (hd/2,)
    ang = np.arange(seq)[:, None] * inv[None, :]  # (seq, hd/2)
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if neox:
        a, b = x[..., : hd // 2], x[..., hd // 2 :]
        return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out


def forward(weights, hp, ids):
    """Logits (seq, vocab) for the token ids, in float64."""
    w = weights

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + hp["eps"]) * g

    x = w["token_embd.weight"][ids]  # (seq, dim)
    seq = len(ids)
    mask = np.triu(np.full((seq, seq), -np.inf), 1)  # (seq, seq)
    for i in range(hp["n_layers"]):
        p = f"blk.{i}."
        h = norm(x, w[p + "attn_norm.weight"])
        q = h @ w[p + "attn_q.weight"].T + w.get(p + "attn_q.bias", 0)
        k = h @ w[p + "attn_k.weight"].T + w.get(p + "attn_k.bias", 0)
        v = h @ w[p + "attn_v.weight"].T + w.get(p + "attn_v.bias", 0)
        hd = q.shape[1] // hp["n_heads"]
        q = _rope(q.reshape(seq, hp["n_heads"], hd), hp["base"], hp["neox"])  # (seq, heads, hd)
        k = _rope(k.reshape(seq, hp["n_kv"], hd), hp["base"], hp["neox"])  # (seq, kv, hd)
        v = v.reshape(seq, hp["n_kv"], hd)
        rep = hp["n_heads"] // hp["n_kv"]
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # (seq, heads, hd)
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask  # (heads, seq, seq)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", att, v).reshape(seq, -1)  # (seq, heads*hd)
        x = x + o @ w[p + "attn_output.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])
        g = h @ w[p + "ffn_gate.weight"].T
        u = h @ w[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T
    x = norm(x, w["output_norm.weight"])
    out = w.get("output.weight", w["token_embd.weight"])
    return x @ out.T
