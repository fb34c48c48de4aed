"""pyllm beside llama.cpp on the same GGUF files, same threads, in one run.

    PYLLM_LLAMA_CPP_BIN=.../llama.cpp/build/bin \\
        python benchmarks/vs_llamacpp.py MODEL.gguf [MODEL.gguf ...] [-t 1,2] [-p 512] [-n 128] [-r 5] [--rounds 2]

For each model, thread count and test (ppN, tgN) it runs pyllm's test (`pyllm.runtime.bench`,
in this process) and then llama.cpp's `llama-bench` on the same test, and repeats that pair
--rounds times, so both see the same machine state; the samples of all rounds are pooled.
Both measure the same thing (llama-bench's definitions: runtime/bench.py). Prints a markdown
table: model, type, threads, test, pyllm t/s, llama.cpp t/s, ratio (pyllm / llama.cpp),
pyllm GB/s (weight bytes streamed per decoded token x t/s).

llama.cpp comes from `--llama-bench PATH` or `$PYLLM_LLAMA_CPP_BIN/llama-bench` (a cmake build
of llama.cpp, e.g. the one vendored in llama-cpp-python, built with -DGGML_NATIVE=ON).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pyllm.runtime import bench  # noqa: E402
from pyllm.runtime.loader import load  # noqa: E402


def llama_bench_samples(exe: Path, model: str, n_prompt: int, n_gen: int, threads: int, reps: int) -> list:
    """llama-bench's t/s samples of one test."""
    cmd = [str(exe), "-m", model, "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads), "-r", str(reps),
           "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        sys.exit(f"llama-bench failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    (record,) = json.loads(proc.stdout)
    return record["samples_ts"]


def mean_sd(v) -> str:
    m = sum(v) / len(v)
    sd = (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
    return f"{m:.2f} ± {sd:.2f}"


def main():
    p = argparse.ArgumentParser(description="pyllm and llama.cpp's llama-bench, interleaved, on the same files.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="GGUF files")
    p.add_argument("-t", "--threads", default="1,2", help="comma list (default: 1,2)")
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt test size, 0: none (default: 512)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="generation test size, 0: none (default: 128)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="repetitions per round (default: 5)")
    p.add_argument("--rounds", type=int, default=1, help="alternations of pyllm and llama.cpp (default: 1)")
    p.add_argument("--llama-bench", type=Path, default=None, help="llama-bench (default: $PYLLM_LLAMA_CPP_BIN/)")
    args = p.parse_args()
    exe = args.llama_bench or (Path(os.environ["PYLLM_LLAMA_CPP_BIN"]) / "llama-bench"
                               if os.environ.get("PYLLM_LLAMA_CPP_BIN") else None)
    if exe is None or not exe.exists():
        p.error("llama-bench not found: pass --llama-bench PATH or set PYLLM_LLAMA_CPP_BIN")
    threads = [int(t) for t in args.threads.split(",")]
    tests = ([(args.n_prompt, 0)] if args.n_prompt else []) + ([(0, args.n_gen)] if args.n_gen else [])

    rows = []
    for path in args.models:
        t0 = time.perf_counter()
        model = load(path, n_ctx=bench.n_ctx_needed([args.n_prompt], [args.n_gen]), n_threads=threads[0])
        model.warmup()
        name, ftype = Path(path).name, bench.file_type_name(model.gguf)
        print(f"{name}: load + warm-up {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        for t in threads:
            for n_p, n_g in tests:
                ours, theirs, per_token = [], [], 0
                for _ in range(args.rounds):
                    (r,) = bench.bench(model, [n_p], [n_g], [t], args.repetitions)
                    ours += r.samples_ts
                    per_token = r.bytes_per_token
                    theirs += llama_bench_samples(exe, path, n_p, n_g, t, args.repetitions)
                test = f"pp{n_p}" if n_p else f"tg{n_g}"
                mean_ours = sum(ours) / len(ours)
                ratio = mean_ours / (sum(theirs) / len(theirs))
                gb = f"{per_token * mean_ours / 1e9:.2f}" if n_g else ""
                rows.append(f"| {name} | {ftype} | {t} | {test} | {mean_sd(ours)} | {mean_sd(theirs)} | {ratio:.2f} "
                            f"| {gb} |")
                print(rows[-1], file=sys.stderr, flush=True)
        del model
    print("| model | type | threads | test | pyllm t/s | llama.cpp t/s | ratio | pyllm GB/s |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
