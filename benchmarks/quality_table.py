"""Issue #11's table: one row per block-type mix with size, perplexity, KL divergence and
decode speed, beside llama-perplexity's perplexity where llama.cpp has the type.

    PYLLM_LLAMA_CPP_BIN=.../build/bin python benchmarks/quality_table.py SRC.gguf TEXT --out-dir DIR \\
        [--types F16,Q8_0,...] [-c 512] [--chunks 20] [-t 2] [--tg 64]

SRC is requantized into DIR/<stem>-<TYPE>.gguf (`pyllm quantize --allow-requantize`, kept
between runs). The first type (F16 by default) is the base: its log-probs are kept in memory
and every type's KLD and top-1 agreement are against it. Each type is evaluated once (the KL
pass also gives its perplexity); decode t/s is `pyllm bench -n TG` at -t THREADS after the
JIT warm-up. llama.cpp's column runs `llama-perplexity` on the same file with -t THREADS.
"""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pyllm.base import is_pyllm_only  # noqa: E402
from pyllm.convert.quantize import parse_file_type, quantize_gguf  # noqa: E402
from pyllm.runtime import bench, perplexity  # noqa: E402
from pyllm.runtime.loader import load  # noqa: E402

TYPES = ("F16,Q8_0,FP8_E4M3,FP8_E5M2,FP6_E3M2,Q6_K,Q5_K_M,Q4_K_M,Q4_K_PURE,Q4_1,Q4_0,NF4,Q3_K_M,Q2_K")


def make(src: Path, out_dir: Path, name: str) -> Path:
    """SRC requantized to name (Q4_K_PURE: Q4_K_M with --pure), made once."""
    path = out_dir / f"{src.stem}-{name}.gguf"
    if not path.exists():
        pure = name.endswith("_PURE")
        quantize_gguf(src, path, name.removesuffix("_PURE"), allow_requantize=True, pure=pure)
    return path


def llama_ppl(path: Path, text: Path, n_ctx: int, chunks: int, threads: int):
    """llama-perplexity's final estimate (ppl, error), or None where it has no tool."""
    exe = Path(os.environ.get("PYLLM_LLAMA_CPP_BIN", "")) / "llama-perplexity"
    if not exe.exists():
        return None
    cmd = [str(exe), "-m", str(path), "-f", str(text), "-c", str(n_ctx), "--chunks", str(chunks), "-t", str(threads)]
    for _ in range(5):  # its logger thread can lose the last lines at exit on a busy machine: retry
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", proc.stdout + proc.stderr)
        if m:
            return float(m.group(1)), float(m.group(2))
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("text", type=Path)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--types", default=TYPES)
    p.add_argument("-c", "--ctx-size", type=int, default=512)
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--tg", type=int, default=64, help="tokens generated for the decode speed")
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    names = args.types.split(",")
    for n in names:
        parse_file_type(n.removesuffix("_PURE"))  # unknown names fail before any work
    text = perplexity.read_text(args.text)

    base = None
    print("| type | MiB | bits/weight | PPL | mean KLD | same top p | decode t/s | llama.cpp PPL |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        path = make(args.src, args.out_dir, name)
        model = load(path, n_ctx=max(args.ctx_size, args.tg + 1), n_threads=args.threads)
        model.warmup()
        tokens = perplexity.tokenize(model.tokenizer, text)
        if base is None:  # the base row: its own perplexity, KLD 0 by definition
            res, base = perplexity.perplexity(model, tokens, args.ctx_size, n_chunks=args.chunks, save_base=True)
            ppl, err, kld, top = res.ppl, res.ppl_error, "", ""
        else:
            s = perplexity.kl_divergence(model, base, n_chunks=args.chunks).stats()
            (ppl, err), kld = s["ppl"], f"{s['kld'][0]:.5f}"
            top = f"{100 * s['same_top'][0]:.2f}%"
        (tg,) = bench.bench(model, n_prompt=(), n_gen=(args.tg,), threads=(args.threads,), repetitions=3)
        size = path.stat().st_size
        bpw = 8 * model.weight_bytes / model.n_params
        if any(is_pyllm_only(t.qtype) for t in model.gguf.tensors.values()):
            their = "(pyllm only)"
        else:
            theirs = llama_ppl(path, args.text, args.ctx_size, args.chunks, args.threads)
            their = f"{theirs[0]:.4f} ± {theirs[1]:.4f}" if theirs else ""
        print(f"| {name} | {size / 2**20:.1f} | {bpw:.2f} | {ppl:.4f} ± {err:.4f} | {kld} | {top} | "
              f"{tg.avg_ts:.1f} ± {tg.stddev_ts:.1f} | {their} |", flush=True)
        del model


if __name__ == "__main__":
    sys.exit(main())
