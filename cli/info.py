"""`pyllm info`: what a GGUF file holds, and what this CPU offers the kernels."""

import argparse
import math
from collections import Counter

from pyllm.cli.common import add_model_arg, model_arg

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


def main(argv=None) -> int:
    from pyllm.kernels.cpu import cpu_features
    from pyllm.runtime.gguf_file import GGUFFile
    from pyllm.runtime.llama import ARCHITECTURES
    from pyllm.runtime.loader import bundled_model

    p = argparse.ArgumentParser(prog="pyllm info", description="Describe a GGUF model file.")
    add_model_arg(p)
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
