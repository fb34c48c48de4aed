"""The K/V cache types on one model: perplexity, KV bytes per token, decode speed deep in the
context, and max RSS -- pyllm's, with llama.cpp's beside it when its tools are given.

    python benchmarks/bench_kvcache.py MODEL.gguf --text wikitext-2-raw-wiki.test.raw \\
        [--chunks 10] [--depth 2048] [-n 32] [-t 2] [--types f32,f16,q8_0,q4_0,fp8_e4m3] [--llama-cpp-bin DIR]

- PPL: `pyllm.runtime.perplexity` (llama-perplexity's method) over the first --chunks chunks of
  -c 512; llama.cpp: llama-perplexity with the same -ctk/-ctv and `-fa on` (a quantized V cache
  needs flash attention there).
- decode at depth: --depth random tokens prefilled, then -n single-token steps timed (best of
  -r); llama.cpp: llama-bench -p 0 -n N -d DEPTH -fa 1.
- max RSS: /usr/bin/time -v of `pyllm generate -c C -n 16` and of llama-completion -c C -n 16,
  for each --rss-ctx.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def pyllm_ppl(model_path, text, types, chunks, threads):
    import pyllm
    from pyllm.runtime import perplexity as ppl

    model = pyllm.load(model_path, n_ctx=512, n_threads=threads, cache_type_k=types[0], cache_type_v=types[1])
    model.warmup()
    tokens = ppl.tokenize(model.tokenizer, text)
    result, _ = ppl.perplexity(model, tokens, 512, 512, chunks)
    return result.ppl, result.ppl_error, model.kv_bytes_per_token


def pyllm_decode(model_path, types, depth, n_gen, threads, reps):
    import pyllm

    model = pyllm.load(model_path, n_ctx=depth + n_gen + 1, n_threads=threads, cache_type_k=types[0],
                       cache_type_v=types[1])
    model.warmup()
    rng = np.random.default_rng(0)
    model.eval(rng.integers(model.args.vocab_size, size=depth).tolist())
    best = 0.0
    for _ in range(reps):
        model.truncate(depth)
        ids = rng.integers(model.args.vocab_size, size=n_gen).tolist()
        t0 = time.perf_counter()
        for i in ids:
            model.eval([i])
        best = max(best, n_gen / (time.perf_counter() - t0))
    return best


def max_rss_mib(cmd) -> float:
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return int(m.group(1)) / 1024


def llama_ppl(bin_dir, model_path, text_path, types, chunks, threads):
    r = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", model_path, "-f", text_path, "-c", "512",
                        "--chunks", str(chunks), "-t", str(threads), "-ctk", types[0], "-ctv", types[1], "-fa", "on"],
                       check=False, capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", r.stdout + r.stderr)
    return (float(m.group(1)), float(m.group(2))) if m else (float("nan"), float("nan"))


def llama_decode(bin_dir, model_path, types, depth, n_gen, threads, reps):
    r = subprocess.run([str(bin_dir / "llama-bench"), "-m", model_path, "-p", "0", "-n", str(n_gen), "-d", str(depth),
                        "-t", str(threads), "-ctk", types[0], "-ctv", types[1], "-fa", "1", "-r", str(reps),
                        "-o", "json"], check=False, capture_output=True, text=True)
    try:
        (record,) = json.loads(r.stdout)
        return float(record["avg_ts"])
    except (ValueError, KeyError):
        return float("nan")


LLAMA_CPP_TYPES = {"f32", "f16", "q8_0", "q4_0"}  # fp8_e4m3 is pyllm's own


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--text", required=True)
    p.add_argument("--chunks", type=int, default=10)
    p.add_argument("--depth", type=int, default=2048)
    p.add_argument("-n", "--n-gen", type=int, default=32)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--types", default="f32,f16,q8_0,q4_0,fp8_e4m3", help="cache types (K = V) to measure")
    p.add_argument("--rss-ctx", default="2048,8192")
    p.add_argument("--llama-cpp-bin", type=Path, default=None)
    p.add_argument("--skip", default="", help="parts to leave out: ppl,decode,rss")
    args = p.parse_args(argv)
    from pyllm.runtime.perplexity import read_text

    text = read_text(args.text)  # as llama-perplexity reads it: wikitext's \r\n kept
    skip = set(args.skip.split(","))
    rss_ctx = [int(c) for c in args.rss_ctx.split(",")]
    print("| cache (K = V) | KV bytes/token | PPL (pyllm) | PPL (llama.cpp) | tg at depth (pyllm) | "
          "tg at depth (llama.cpp) | " + " | ".join(f"max RSS -c {c} pyllm / llama.cpp" for c in rss_ctx) + " |")
    print("| --- |" + " ---: |" * (5 + len(rss_ctx)))
    for t in args.types.split(","):
        types = (t, t)
        cells = [t]
        llama = args.llama_cpp_bin if t in LLAMA_CPP_TYPES else None
        if "ppl" not in skip:
            ppl, err, per = pyllm_ppl(args.model, text, types, args.chunks, args.threads)
            cells += [str(per), f"{ppl:.4f} ± {err:.4f}"]
            if llama:
                lp, le = llama_ppl(args.llama_cpp_bin, args.model, args.text, types, args.chunks, args.threads)
                cells.append(f"{lp:.4f} ± {le:.4f}")
            else:
                cells.append("")
        else:
            cells += ["", "", ""]
        if "decode" not in skip:
            run = (types, args.depth, args.n_gen, args.threads, args.repetitions)
            cells.append(f"{pyllm_decode(args.model, *run):.2f}")
            cells.append(f"{llama_decode(llama, args.model, *run):.2f}" if llama else "")
        else:
            cells += ["", ""]
        if "rss" not in skip:
            for c in rss_ctx:
                ours = max_rss_mib([sys.executable, "-m", "pyllm", "generate", args.model, "-c", str(c), "-n", "16",
                                    "-p", "Once upon a time", "--temp", "0", "-t", str(args.threads), "-ctk", t,
                                    "-ctv", t])
                theirs = ""
                if llama:
                    theirs = max_rss_mib([str(llama / "llama-completion"), "-m", args.model, "-c", str(c),
                                          "-n", "16", "-p", "Once upon a time", "--temp", "0", "-t", str(args.threads),
                                          "-ctk", t, "-ctv", t, "-fa", "on", "-no-cnv", "--simple-io"])
                    theirs = f"{theirs:.0f}"
                cells.append(f"{ours:.0f} / {theirs}")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
