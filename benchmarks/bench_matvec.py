"""Product speed per block type: the runtime product (int8 activations, SIMD kernels) for one
token (decode, memory-bound) and for a batch (prefill), against the float reference product.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_matvec.py [--rows 4096] [--cols 4096] [--threads 1,2]
        [--types Q4_0,Q8_0] [--tokens 1,64] [--isa portable,avx2] [--layouts]

For one token the matrix (random weights quantized by pyllm, byte-identical to llama.cpp)
is larger than the caches, so GB/s is weight bytes streamed per second; for a batch,
G MAC/s = weights x tokens per second.
"""

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from pyllm.base import GGMLType  # noqa: E402
from pyllm.kernels import set_threads  # noqa: E402
from pyllm.kernels.act import act_of  # noqa: E402
from pyllm.kernels.blocks import block_type  # noqa: E402
from pyllm.kernels.cpu import ISA_NAMES, best_isa, isa_supported  # noqa: E402
from pyllm.kernels.matmul import product  # noqa: E402
from pyllm.kernels.quantize import quantize  # noqa: E402
from pyllm.kernels.quants import QTensor  # noqa: E402

TYPES = "F32 F16 BF16 Q8_0 Q5_1 Q5_0 Q4_1 Q4_0 Q6_K Q5_K Q4_K Q3_K Q2_K".split()


def best_time(f, repeats):
    f()  # compile / warm
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--tokens", default="1", help="comma list of batch sizes")
    p.add_argument("--isa", default=ISA_NAMES[best_isa()], help="comma list of kernel levels")
    p.add_argument("-r", "--repeats", type=int, default=20)
    p.add_argument("--layouts", action="store_true", help="also the interleaved (repacked) layouts")
    args = p.parse_args()
    w = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    print("| type | MiB | isa | tokens | threads | ms | GB/s | G MAC/s |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.types.split(","):
        qt = GGMLType[name]
        t = QTensor(quantize(w, qt), qt, args.rows, args.cols)
        for isa in [ISA_NAMES.index(s) for s in args.isa.split(",")]:
            if not isa_supported(isa):
                continue
            variants = [(name, int(qt), t.data)]
            packed = block_type(qt).repacked(t.data, isa) if args.layouts else None
            if packed is not None:
                variants.append((block_type(packed[0]).name, *packed))
            for label, code, data in variants:
                bench(label, code, data, isa, t, args)


def bench(label, code, data, isa, t, args):
    """Print one table row per batch size and thread count for one kernel."""
    run = product(code, isa)
    for n in [int(v) for v in args.tokens.split(",")]:
        x = np.random.default_rng(1).standard_normal((n, args.cols)).astype(np.float32)
        act = act_of(x, 1 << block_type(code).act)
        out = np.empty((n, args.rows), np.float32)
        for threads in [int(v) for v in args.threads.split(",")]:
            set_threads(threads)
            best = best_time(lambda: run(data, act, out), args.repeats)
            print(f"| {label} | {t.nbytes / 2**20:.1f} | {ISA_NAMES[isa]} | {n} | {threads} | {best * 1e3:.3f} | "
                  f"{t.nbytes / best / 1e9:.2f} | {args.rows * args.cols * n / best / 1e9:.2f} |", flush=True)


if __name__ == "__main__":
    main()
