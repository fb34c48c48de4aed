"""llama2.c checkpoint (.bin, version-0 layout) -> GGUF, as llama.cpp's
examples/convert-llama2c-to-ggml does it (commit c392e509).

Layout (karpathy/llama2.c run.c): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len; a negative vocab_size means the classifier is stored separately), then
float32 arrays: token_embedding (vocab, dim), rms_att (L, dim), wq (L, dim, dim),
wk (L, kv_dim, dim), wv (L, kv_dim, dim), wo (L, dim, dim), rms_ffn (L, dim),
w1 (L, hidden, dim), w2 (L, dim, hidden), w3 (L, hidden, dim), rms_final (dim),
freq_cis_real and freq_cis_imag (seq_len * head_size / 2 each, skipped), then wcls
(vocab, dim) when vocab_size < 0.

llama2.c already uses interleaved-pair RoPE like llama.cpp, so nothing is permuted. The
output.weight tensor is always written (the embedding again when shared), like the C++
converter. Tensor order and key types follow its save_as_llama_model.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
from pyllm.base import GGMLType, PyllmError
from pyllm.convert import vocab as vocab_mod
from pyllm.convert.gguf_writer import GGUFWriter
from pyllm.convert.quantize import (
    ModelInfo,
    QuantizeReport,
    TensorReport,
    choose_types,
    chunked,
    format_tensor_line,
    parse_file_type,
)

HEADER = struct.Struct("<7i")


def is_llama2c(path) -> bool:
    """A regular file whose 28-byte header describes exactly its size."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
        cfg = Llama2cConfig.parse(head, path.stat().st_size)
        return cfg is not None
    except (OSError, struct.error):
        return False


class Llama2cConfig:
    def __init__(self, dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len):
        self.dim, self.hidden_dim, self.n_layers = dim, hidden_dim, n_layers
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.shared = vocab_size > 0
        self.vocab_size = abs(vocab_size)
        self.seq_len = seq_len
        self.head_size = dim // n_heads if n_heads else 0
        self.kv_dim = dim * n_kv_heads // n_heads if n_heads else 0

    def layout(self):
        """[(name, shape)] of the float32 arrays in file order (None name: skipped)."""
        L, d, h, kv, v = self.n_layers, self.dim, self.hidden_dim, self.kv_dim, self.vocab_size
        out = [
            ("tok_embeddings", (v, d)), ("rms_att", (L, d)), ("wq", (L, d, d)), ("wk", (L, kv, d)),
            ("wv", (L, kv, d)), ("wo", (L, d, d)), ("rms_ffn", (L, d)), ("w1", (L, h, d)), ("w2", (L, d, h)),
            ("w3", (L, h, d)), ("rms_final", (d,)), (None, (self.seq_len * self.head_size // 2,)),
            (None, (self.seq_len * self.head_size // 2,)),
        ]
        if not self.shared:
            out.append(("wcls", (v, d)))
        return out

    def n_floats(self):
        return sum(int(np.prod(s)) for _, s in self.layout())

    @classmethod
    def parse(cls, head: bytes, size: int):
        if len(head) < HEADER.size:
            return None
        vals = HEADER.unpack(head)
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = vals
        if min(dim, hidden, n_layers, n_heads, n_kv, seq_len) <= 0 or vocab == 0:
            return None
        if dim % n_heads or n_heads % n_kv or n_kv > n_heads:
            return None
        cfg = cls(*vals)
        if HEADER.size + 4 * cfg.n_floats() != size:
            return None
        return cfg


def read_checkpoint(path):
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
        size = path.stat().st_size
    except FileNotFoundError:
        raise PyllmError(f"checkpoint not found: {path}") from None
    except OSError as e:
        raise PyllmError(f"cannot read {path}: {e.strerror}") from None
    cfg = Llama2cConfig.parse(head, size)
    if cfg is None:
        detail = ""
        if len(head) == HEADER.size:
            detail = f" (header {list(HEADER.unpack(head))}, {size} bytes)"
        raise PyllmError(f"{path}: not a llama2.c version-0 checkpoint{detail}")
    offsets = {}
    pos = HEADER.size
    for name, shape in cfg.layout():
        if name:
            offsets[name] = (pos, shape)
        pos += 4 * int(np.prod(shape))
    return cfg, offsets


def convert_llama2c(src, out, tokenizer, outtype: str = "f32", vocab_only: bool = False, progress: bool = False,
                    log=None) -> QuantizeReport:
    src = Path(src)
    cfg, offsets = read_checkpoint(src)
    ft = parse_file_type(outtype)
    if tokenizer is None:
        for cand in (src.parent / f"tok{cfg.vocab_size}.bin", src.parent / "tokenizer.bin"):
            if cand.is_file():
                tokenizer = cand
                break
        else:
            raise PyllmError(f"{src}: a llama2.c checkpoint needs its tokenizer: pass --tokenizer tok{cfg.vocab_size}.bin "
                             "(or a SentencePiece .model)")

    w = GGUFWriter(out)
    vocab_mod.add_llama2c_vocab(w, tokenizer, cfg.vocab_size)
    w.add_string("general.architecture", "llama")
    w.add_string("general.name", "llama")
    a = "llama"
    # save_as_llama_model; the context is the checkpoint's seq_len (the C++ tool takes it from a flag)
    w.add_u32(f"{a}.context_length", cfg.seq_len)
    w.add_u32(f"{a}.embedding_length", cfg.dim)
    w.add_u32(f"{a}.feed_forward_length", cfg.hidden_dim)
    w.add_u32(f"{a}.attention.head_count", cfg.n_heads)
    w.add_u32(f"{a}.attention.head_count_kv", cfg.n_kv_heads)
    w.add_u32(f"{a}.block_count", cfg.n_layers)
    w.add_u32(f"{a}.rope.dimension_count", cfg.head_size)
    w.add_f32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
    if not vocab_only:
        w.add_u32("general.file_type", ft.ftype)
    w.add_u32("general.quantization_version", 2)

    plan = []
    if not vocab_only:
        fd = os.open(src, os.O_RDONLY)

        def reader(key, layer=None):
            pos, shape = offsets[key]
            if layer is not None:
                shape = shape[1:]
                pos += 4 * layer * int(np.prod(shape))
            cols = shape[-1]

            def read(r0, r1):
                buf = os.pread(fd, 4 * cols * (r1 - r0), pos + 4 * cols * r0)
                return np.frombuffer(buf, dtype=np.float32).reshape(r1 - r0, cols)

            return shape, read

        def add(gname, key, layer=None):
            shape, read = reader(key, layer)
            plan.append((gname, shape, read))

        add("token_embd.weight", "tok_embeddings")
        add("output_norm.weight", "rms_final")
        add("output.weight", "tok_embeddings" if cfg.shared else "wcls")
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            add(p + "attn_q.weight", "wq", i)
            add(p + "attn_k.weight", "wk", i)
            add(p + "attn_v.weight", "wv", i)
            add(p + "attn_output.weight", "wo", i)
            add(p + "attn_norm.weight", "rms_att", i)
            add(p + "ffn_gate.weight", "w1", i)
            add(p + "ffn_down.weight", "w2", i)
            add(p + "ffn_up.weight", "w3", i)
            add(p + "ffn_norm.weight", "rms_ffn", i)

    info = ModelInfo("llama", cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)
    types = choose_types({n: (s, GGMLType.F32) for n, s, _ in plan}, ft, info)
    for name, shape, read in plan:
        rows = shape[0] if len(shape) > 1 else 1
        w.add_tensor(name, shape, types[name], chunked(rows, shape[-1], read, types[name]))

    report = QuantizeReport()

    def on_tensor(t):
        r = TensorReport(t.name, t.shape, GGMLType.F32, t.qtype, 4 * int(np.prod(t.shape)), t.nbytes)
        report.tensors.append(r)
        if log:
            log(format_tensor_line(len(report.tensors), len(plan), r))

    try:
        w.write(progress=progress, on_tensor=on_tensor, description=f"convert {ft.name}")
    finally:
        if plan:
            os.close(fd)
    return report
