"""A random Llama bigger than the caches, as a Hugging Face directory, for the speed benchmarks.

    python benchmarks/make_random_llama.py OUT_DIR [--layers 18] [--hidden 1536] [--ff 4096]
    pyllm convert OUT_DIR -o big.f16.gguf --outtype f16
    pyllm quantize big.f16.gguf big.q4_k_m.gguf Q4_K_M

The defaults make 529 M parameters (18 layers of hidden 1536, 12 heads of 128, 4 kv heads,
feed-forward 4096, SmolLM2's tokenizer and 49152-token vocabulary, tied embeddings): over 4x
SmolLM2-135M and, at every quantization, far larger than a 32 MB L3 cache. The weights are
N(0, 0.02) float16 from a fixed seed; the text it writes is noise, only its speed matters.
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

TOKENIZER_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "hf" / "SmolLM2-135M-Instruct"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--ff", type=int, default=4096)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--tokenizer", default=str(TOKENIZER_DIR), help="directory with tokenizer.json and config.json")
    args = p.parse_args()
    from safetensors.numpy import save_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(args.tokenizer)
    config = json.loads((src / "config.json").read_text())
    hd = args.hidden // args.heads
    config.update(hidden_size=args.hidden, intermediate_size=args.ff, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=hd,
                  tie_word_embeddings=True, torch_dtype="float16")
    (out / "config.json").write_text(json.dumps(config, indent=1))
    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(np.float16)

    tensors = {"model.embed_tokens.weight": w(config["vocab_size"], args.hidden),
               "model.norm.weight": np.ones(args.hidden, np.float16)}
    for i in range(args.layers):
        p_ = f"model.layers.{i}."
        tensors.update({
            p_ + "input_layernorm.weight": np.ones(args.hidden, np.float16),
            p_ + "post_attention_layernorm.weight": np.ones(args.hidden, np.float16),
            p_ + "self_attn.q_proj.weight": w(args.heads * hd, args.hidden),
            p_ + "self_attn.k_proj.weight": w(args.kv_heads * hd, args.hidden),
            p_ + "self_attn.v_proj.weight": w(args.kv_heads * hd, args.hidden),
            p_ + "self_attn.o_proj.weight": w(args.hidden, args.heads * hd),
            p_ + "mlp.gate_proj.weight": w(args.ff, args.hidden),
            p_ + "mlp.up_proj.weight": w(args.ff, args.hidden),
            p_ + "mlp.down_proj.weight": w(args.hidden, args.ff),
        })
    save_file(tensors, str(out / "model.safetensors"))
    n = sum(t.size for t in tensors.values())
    print(f"wrote {out} ({n / 1e6:.0f} M parameters)")


if __name__ == "__main__":
    main()
