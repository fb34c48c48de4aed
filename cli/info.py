"""`pyllm info`: what a GGUF file holds, and what this CPU offers the kernels."""

import argparse
import math
from collections import Counter

from pyllm.cli.common import add_cache_type_args, add_model_arg, model_arg

CPU_FEATURES = ("avx", "fma", "f16c", "amx", "sse4", "neon", "sve")  # the prefixes of those the kernels care about


def human(n: float, unit: str = "") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.2f} {prefix}{unit}".strip() if prefix else f"{n:.0f} {unit}".strip()
        n /= 1000


def readable_by(g) -> str:
    only = g.pyllm_only_types
    if only:
        return f"pyllm only ({', '.join(t.name for t in only)}: pyllm's own block types; llama.cpp refuses the file)"
    return "pyllm, llama.cpp"


def kv_cache_text(g, type_k: str, type_v: str, n_ctx: int = 0) -> str:
    """'f16 K, f16 V: 46080 bytes per token, 180.00 MiB at 4096 tokens' for a model file ('-' without one)."""
    from pyllm.kernels import kvcache
    from pyllm.runtime.llama import ARCHITECTURES, ModelArgs
    from pyllm.runtime.loader import DEFAULT_CTX

    if not g.tensors or g.architecture not in ARCHITECTURES:
        return "-"
    a = ModelArgs.from_gguf(g)
    for t, which in ((type_k, "K"), (type_v, "V")):
        kvcache.check_head_dim(t, a.head_dim, which)
    per = kvcache.bytes_per_token(type_k, type_v, a.num_hidden_layers, a.num_key_value_heads, a.head_dim)
    n_ctx = n_ctx or min(DEFAULT_CTX, int(g.metadata.get(f"{g.architecture}.context_length", DEFAULT_CTX)))
    return f"{type_k} K, {type_v} V: {per} bytes per token, {per * n_ctx / 2**20:.2f} MiB at {n_ctx} tokens"


def main(argv=None) -> int:
    from pyllm.kernels.cpu import cpu_features
    from pyllm.runtime.gguf_file import GGUFFile
    from pyllm.runtime.llama import ARCHITECTURES
    from pyllm.runtime.loader import bundled_model

    p = argparse.ArgumentParser(prog="pyllm info", description="Describe a GGUF model file.")
    add_model_arg(p)
    add_cache_type_args(p)
    p.add_argument("-c", "--ctx-size", type=int, default=0,
                   help="context size for the KV cache size shown (0: min(4096, model's))")
    args = p.parse_args(argv)
    model_arg(p, args)

    g = GGUFFile(args.model or bundled_model())
    meta = g.metadata
    arch = g.architecture or "?"
    n_params = sum(math.prod(t.dims) for t in g.tensors.values())
    size = sum(t.nbytes for t in g.tensors.values())
    hist = Counter(t.qtype.name for t in g.tensors.values())

    def get(key, default="-"):
        return meta.get(f"{arch}.{key}", default)

    n_heads = get("attention.head_count")

    rows = [
        ("file", f"{g.path} (GGUF v{g.version})"),
        ("name", meta.get("general.name", "-")),
        ("architecture", arch + ("" if arch in ARCHITECTURES else "  (not supported for inference)")),
        ("parameters", human(n_params)),
        ("size", f"{human(size, 'B')} ({size * 8 / max(n_params, 1):.2f} bits per weight)"),
        ("block types", ", ".join(f"{k}: {v}" for k, v in hist.most_common()) or "none (vocab only)"),
        ("readable by", readable_by(g)),
        ("context", get("context_length")),
        ("layers", get("block_count")),
        ("embedding", get("embedding_length")),
        ("heads (kv)", f"{n_heads} ({get('attention.head_count_kv', n_heads)})"),
        ("rope base", get("rope.freq_base", 10000.0)),
        ("kv cache", kv_cache_text(g, args.cache_type_k, args.cache_type_v, args.ctx_size)),
        ("tokenizer", f"{meta.get('tokenizer.ggml.model', '-')} ({len(meta.get('tokenizer.ggml.tokens', []))} tokens, "
                      f"pre={meta.get('tokenizer.ggml.pre', '-')})"),
        ("chat template", "yes" if "tokenizer.chat_template" in meta else "no"),
        ("license", meta.get("general.license", "-")),
        ("cpu features", " ".join(sorted(f for f in cpu_features() if f.startswith(CPU_FEATURES)))),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
