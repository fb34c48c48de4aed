"""Where a decoded token's time goes: the compiled step with parts of its work left out.

    OPENBLAS_NUM_THREADS=1 python benchmarks/profile_step.py MODEL [-t 1] [-n 64] [--ctx 128] [--batch 1]

Runs the step as is, then compiled without the products, without attention, without the
rest (norms, rope, K/V stores, activation quantization), and with none of them (what is
left: the Python -> Numba crossing, the embedding row, residual adds and the parallel
regions' launches). Each variant is compiled once (slow the first time, then cached).
Times are per token, best of -r runs of -n tokens at context --ctx; with --batch B, of one
prompt batch of B tokens from an empty cache (prompt processing) instead.
"""

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pyllm  # noqa: E402
from pyllm.kernels import set_threads  # noqa: E402
from pyllm.kernels.forward import SKIP_ATTENTION, SKIP_OTHER, SKIP_PRODUCTS  # noqa: E402


def per_prompt_token(decoder, batch, repeats):
    ids = np.ones(batch, np.int64)
    decoder(ids, 0, False)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        decoder(ids, 0, False)
        best = min(best, (time.perf_counter() - t) / batch)
    return best


def per_token(decoder, ctx, n, repeats):
    ids = np.ones(1, np.int64)
    decoder(np.ones(ctx, np.int64), 0, False)  # fill the cache to the context length
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(n):
            decoder(ids, ctx + i, False)
        best = min(best, (time.perf_counter() - t) / n)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("-t", "--threads", type=int, default=1)
    p.add_argument("-n", type=int, default=64)
    p.add_argument("-r", type=int, default=3)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--batch", type=int, default=1, help="profile prompt batches of this many tokens")
    args = p.parse_args()
    model = pyllm.load(args.model, n_ctx=max(args.ctx + args.n + 1, args.batch), n_threads=args.threads)
    set_threads(args.threads)
    base = model.decoder
    variants = [("full step", 0), ("without products", SKIP_PRODUCTS), ("without attention", SKIP_ATTENTION),
                ("without norms/rope/quantize", SKIP_OTHER),
                ("none of them", SKIP_PRODUCTS | SKIP_ATTENTION | SKIP_OTHER)]
    times = {}
    for label, skip in variants:
        d = base if skip == 0 else base.without(skip)
        if args.batch > 1:
            times[label] = per_prompt_token(d, args.batch, args.r)
        else:
            times[label] = per_token(d, args.ctx, args.n, args.r)
    full = times["full step"]
    what = f"prompt batches of {args.batch}" if args.batch > 1 else f"decode at context {args.ctx}"
    print(f"{os.path.basename(args.model)}, {args.threads} thread(s), {what}, kernels {base.kernels}")
    print("| part | ms per token | share |")
    print("| --- | ---: | ---: |")
    print(f"| full step | {full * 1e3:.3f} | 100% |")
    rest = times["none of them"]
    for label, name in [("without products", "products"), ("without attention", "attention"),
                        ("without norms/rope/quantize", "norms, rope, K/V store, activation quantization")]:
        part = full - times[label]
        print(f"| {name} | {part * 1e3:.3f} | {100 * part / full:.0f}% |")
    print(f"| crossing, embedding, residuals, region launches | {rest * 1e3:.3f} | {100 * rest / full:.0f}% |")


if __name__ == "__main__":
    main()
