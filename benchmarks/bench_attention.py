"""Attention over a K/V cache for one batch of tokens, alone: the AVX2 kernel the compiled step
runs (kernels/ops_avx2.attention_kv), timed with its K/V store, per layer.

    python benchmarks/bench_attention.py [--heads 9] [--kv-heads 3] [--head-dim 64] [--batch 256]
        [--starts 0,256] [--cache f16] [-t 1] [-r 30]

The defaults are SmolLM2-135M's shapes; --starts 0,256 are the two batches of a 512-token
prompt (pp512). G MAC/s counts q.k and the weighted sum of V over every (token, key) pair.
"""

import argparse
import time

import numba
import numpy as np
from numba import njit
from pyllm.kernels import kvcache, ops_avx2, set_threads
from pyllm.kernels.cpu import AVX2, isa_supported
from pyllm.kernels.quants import F16_TABLE


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--starts", default="0,256", help="comma list of first positions")
    p.add_argument("--cache", default="f16", help="K/V cache type (kernels/kvcache.py)")
    p.add_argument("-t", "--threads", type=int, default=1)
    p.add_argument("-r", "--repeats", type=int, default=30)
    args = p.parse_args()
    if not isa_supported(AVX2):
        raise SystemExit("this host has no AVX2")
    set_threads(args.threads)
    n, nh, nkv, hd = args.batch, args.heads, args.kv_heads, args.head_dim
    starts = [int(s) for s in args.starts.split(",")]
    ctx = max(starts) + n
    code = kvcache.kv_type(args.cache).code
    qd, kvd = nh * hd, nkv * hd
    y = np.random.default_rng(0).standard_normal((n, qd + 2 * kvd)).astype(np.float32)
    kc = kvcache.new_cache(args.cache, 1, nkv, ctx, hd)[0]
    vc = kvcache.new_cache(args.cache, 1, nkv, ctx, hd, "V")[0]
    threads = numba.config.NUMBA_NUM_THREADS
    scores = np.zeros((threads, nh // nkv, ctx), np.float32)
    qq = np.zeros((threads, nh // nkv, max(kvcache.row_bytes("q8_0", hd), 34)), np.uint8)
    out = np.zeros((n, qd), np.float32)

    @njit
    def run(y, kc, vc, start, scores, qq, f16, out):
        kvcache.store_kv(code, code, y[:, qd:qd + kvd], y[:, qd + kvd:], kc, vc, start, f16)
        ops_avx2.attention_kv(code, code, y, 0, y.shape[0], kc, vc, start, scores, qq, f16, out)

    print(f"{nh} heads, {nkv} kv heads, head_dim {hd}, {args.cache} cache, batch {n}, {args.threads} thread(s)")
    print("| start | ms per batch | us per token | G MAC/s |")
    print("| ---: | ---: | ---: | ---: |")
    for start in starts:
        run(y, kc, vc, start, scores, qq, F16_TABLE, out)  # compile / warm
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run(y, kc, vc, start, scores, qq, F16_TABLE, out)
            best = min(best, time.perf_counter() - t0)
        macs = sum(start + t + 1 for t in range(n)) * nh * hd * 2
        print(f"| {start} | {best * 1e3:.2f} | {best * 1e6 / n:.2f} | {macs / best / 1e9:.2f} |")


if __name__ == "__main__":
    main()
