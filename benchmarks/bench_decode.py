"""Decode and prompt speed of a GGUF model, measured the way llama-bench measures it.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_decode.py MODEL [-t 1,2] [-p 512] [-n 128] [-r 3]

pp<p>: p random tokens evaluated from an empty cache; tg<n>: n tokens decoded one at a time
from an empty cache (llama-bench's tests). Each is repeated r times after one warm-up run;
t/s is mean +- sd, with the best run alongside (the machine may be shared). Decode is
memory-bound when the weights exceed the caches: GB/s = weight bytes streamed per token x
tokens/s (the tied output matrix counts once, the embedding table is not streamed).
"""

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pyllm  # noqa: E402
from pyllm.kernels import set_threads  # noqa: E402


def pp_run(model, prompt):
    model.reset()
    t = time.perf_counter()
    model.eval(prompt)
    return len(prompt) / (time.perf_counter() - t)


def tg_run(model, n, first):
    model.reset()
    token = first
    t = time.perf_counter()
    for _ in range(n):
        token = int(np.argmax(model.eval([token])))
    return n / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?")
    p.add_argument("-t", "--threads", default="1,2")
    p.add_argument("-p", type=int, default=512, help="prompt tokens")
    p.add_argument("-n", type=int, default=128, help="tokens to decode")
    p.add_argument("-r", type=int, default=3, help="repetitions")
    args = p.parse_args()

    t0 = time.perf_counter()
    model = pyllm.load(args.model, n_ctx=max(args.p, args.n) + 8)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.warmup()
    warm_s = time.perf_counter() - t0
    name = os.path.basename(str(model.gguf.path))
    size = model.weight_bytes
    streamed = size - (0 if model.args.tie_word_embeddings else model.token_embd.nbytes)
    print(f"load {load_s * 1e3:.0f} ms, JIT warm-up {warm_s * 1e3:.0f} ms; kernels {model.decoder.kernels}")
    print("| model | size | params | backend | threads | test | t/s | best t/s | GB/s |")
    print("| --- | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, model.args.vocab_size, size=args.p).tolist()
    for threads in [int(t) for t in args.threads.split(",")]:
        set_threads(threads)
        row = f"| {name} | {size / 2**20:.1f} MiB | {model.n_params / 1e6:.1f} M | numba-cpu | {threads} |"
        if args.p:
            pp_run(model, prompt)
            runs = [pp_run(model, prompt) for _ in range(args.r)]
            print(f"{row} pp{args.p} | {np.mean(runs):.1f} ± {np.std(runs):.1f} | {max(runs):.1f} | |", flush=True)
        if args.n:
            tg_run(model, 8, 1)
            runs = [tg_run(model, args.n, 1) for _ in range(args.r)]
            gbs = streamed * max(runs) / 1e9
            print(f"{row} tg{args.n} | {np.mean(runs):.1f} ± {np.std(runs):.1f} | {max(runs):.1f} | {gbs:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
