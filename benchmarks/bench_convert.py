"""Convert / quantize throughput and peak memory on a synthetic >= 2 GB Llama checkpoint.

    python benchmarks/bench_convert.py [--layers 8] [--dtype f32|bf16] [--keep DIR] [--quantize Q4_K_M,Q8_0]

Writes a random LlamaForCausalLM safetensors checkpoint (hidden 2048, ffn 5632, vocab 32000,
8 layers: 542M parameters, 2.17 GB in f32) into a temporary directory, then in a fresh child
process each time runs `pyllm convert --outtype f16`, `--outtype q8_0`, and `pyllm quantize`
of the f16 file, reporting wall time, MB/s (input bytes / second) and the child's peak RSS
(VmHWM from /proc/self/status). Everything is deleted afterwards (unless --keep).
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import sys, time
from pyllm.cli.main import main
t0 = time.perf_counter()
rc = main(sys.argv[1:] + ["-q", "--no-progress"])
dt = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(f"RESULT {rc} {dt:.3f} {hwm}")
"""


def write_checkpoint(d: Path, layers: int, dtype: str, hidden=2048, ff=5632, vocab=32000, n_head=16, n_kv=16):
    hd = hidden // n_head
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (n_head * hd, hidden), p + "self_attn.k_proj.weight": (n_kv * hd, hidden),
            p + "self_attn.v_proj.weight": (n_kv * hd, hidden), p + "self_attn.o_proj.weight": (hidden, n_head * hd),
            p + "mlp.gate_proj.weight": (ff, hidden), p + "mlp.up_proj.weight": (ff, hidden),
            p + "mlp.down_proj.weight": (hidden, ff),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    item = 4 if dtype == "f32" else 2
    header, off = {}, 0
    for n, s in shapes.items():
        nb = int(np.prod(s)) * item
        header[n] = {"dtype": "F32" if dtype == "f32" else "BF16", "shape": list(s), "data_offsets": [off, off + nb]}
        off += nb
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for n, s in shapes.items():
            rows = s[0] if len(s) > 1 else 1
            cols = s[-1]
            step = max(1, (1 << 22) // cols)
            for r0 in range(0, rows, step):
                r = min(rows, r0 + step) - r0
                x = rng.standard_normal((r, cols), dtype=np.float32) * np.float32(0.02)
                if n.endswith("norm.weight"):
                    x += 1
                if dtype == "bf16":
                    x = (x.view(np.uint32) >> 16).astype(np.uint16)
                f.write(x.tobytes())
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": ff,
           "num_hidden_layers": layers, "num_attention_heads": n_head, "num_key_value_heads": n_kv, "vocab_size": vocab,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2}
    (d / "config.json").write_text(json.dumps(cfg))
    tok = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "llama2c" / "tokenizer.model"
    shutil.copy(tok, d / "tokenizer.model")  # Llama 2's, vocab 32000
    return off, sum(int(np.prod(s)) for s in shapes.values())


def run(args, in_bytes, label):
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT")), None)
    if p.returncode or line is None or line.split()[1] != "0":
        print(f"{label}: FAILED\n{p.stderr[-2000:]}")
        return None
    _, _, dt, hwm = line.split()
    dt, hwm = float(dt), int(hwm)
    out_bytes = Path(args[2] if args[0] == "quantize" else args[3]).stat().st_size
    print(f"{label:<28} {dt:8.1f} s  {in_bytes / 1e6 / dt:8.1f} MB/s in  {out_bytes / 1e6 / dt:8.1f} MB/s out  "
          f"peak RSS {hwm / 1024:8.1f} MiB   (process wall {wall:.1f} s)")
    return dt, hwm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--keep", help="build in this directory and keep it")
    ap.add_argument("--quantize", default="Q8_0,Q4_K_M", help="types for `pyllm quantize` of the f16 file ('' = none)")
    a = ap.parse_args()
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="pyllm-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        src = tmp / "hf"
        src.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        nbytes, nparams = write_checkpoint(src, a.layers, a.dtype)
        print(f"synthetic checkpoint: {nparams / 1e6:.0f}M params, {nbytes / 1e9:.2f} GB {a.dtype} "
              f"(written in {time.perf_counter() - t0:.0f} s); {os.cpu_count()} CPUs")
        f16 = tmp / "f16.gguf"
        run(["convert", str(src), "-o", str(f16), "--outtype", "f16"], nbytes, "convert -> f16")
        run(["convert", str(src), "-o", str(tmp / "q8.gguf"), "--outtype", "q8_0"], nbytes, "convert -> q8_0")
        (tmp / "q8.gguf").unlink(missing_ok=True)
        for t in filter(None, a.quantize.split(",")):
            out = tmp / f"{t}.gguf"
            run(["quantize", str(f16), str(out), t], f16.stat().st_size, f"quantize f16 -> {t}")
            out.unlink(missing_ok=True)
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
