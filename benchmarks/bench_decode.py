"""Decode and prompt speed of a GGUF model, llama-bench style, with bandwidth achieved.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_decode.py [MODEL] [--threads 1,2] [-n 64] [-p 128]

Decode is memory-bound: each token streams every weight once, so GB/s = weight bytes x
tokens/s. The machine's own copy bandwidth (numpy, one thread) is printed for comparison.
"""

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import pyllm  # noqa: E402


def copy_bandwidth(n_bytes=1 << 29, repeats=5) -> float:
    src = np.ones(n_bytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9  # read + write


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?")
    p.add_argument("--threads", default="1,2")
    p.add_argument("-n", type=int, default=64, help="tokens to decode")
    p.add_argument("-p", type=int, default=128, help="prompt tokens")
    args = p.parse_args()

    t0 = time.perf_counter()
    model = pyllm.load(args.model, n_ctx=args.p + args.n + 8)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.warmup()
    warm_s = time.perf_counter() - t0
    name = os.path.basename(str(model.gguf.path))
    size = model.weight_bytes
    # Bytes streamed per decoded token: every weight except the embedding table, of which
    # only one row is read, unless it doubles as the output matrix (tied embeddings).
    streamed = size - (0 if model.args.tie_word_embeddings else model.token_embd.nbytes)
    print(f"load {load_s * 1e3:.0f} ms, JIT warm-up {warm_s * 1e3:.0f} ms; copy bandwidth {copy_bandwidth():.1f} GB/s (1 thread)")
    print("| model | size | params | backend | threads | test | t/s | GB/s |")
    print("| --- | ---: | ---: | --- | ---: | --- | ---: | ---: |")
    rng = np.random.default_rng(0)
    for threads in [int(t) for t in args.threads.split(",")]:
        from pyllm.kernels import set_threads

        set_threads(threads)
        prompt = rng.integers(3, model.args.vocab_size, size=args.p).tolist()
        model.reset()
        t = time.perf_counter()
        model.eval(prompt)
        pp = args.p / (time.perf_counter() - t)
        token = 3
        t = time.perf_counter()
        for _ in range(args.n):
            logits = model.eval([token])
            token = int(np.argmax(logits))
        tg = args.n / (time.perf_counter() - t)
        row = f"| {name} | {size / 2**20:.1f} MiB | {model.n_params / 1e6:.1f} M | numba-cpu | {threads} |"
        print(f"{row} pp{args.p} | {pp:.1f} | |")
        print(f"{row} tg{args.n} | {tg:.1f} | {streamed * tg / 1e9:.2f} |")


if __name__ == "__main__":
    main()
