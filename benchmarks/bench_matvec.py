"""One-token product speed per block type: GB/s of weights streamed, against copy bandwidth.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_matvec.py [--rows 4096] [--cols 4096] [--threads 1,2]

The matrix (random weights quantized by gguf-py) is larger than the caches, so this
measures the memory-bound decode case that a token of a real model is made of.
"""

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import gguf  # noqa: E402  (the reference quantizer, to build realistic blocks)
import numpy as np  # noqa: E402
from pyllm.base import GGMLType  # noqa: E402
from pyllm.kernels import set_threads  # noqa: E402
from pyllm.kernels.matmul import linear  # noqa: E402
from pyllm.kernels.quants import QTensor  # noqa: E402

TYPES = "F32 F16 BF16 Q8_0 Q5_1 Q5_0 Q4_1 Q4_0 Q6_K Q5_K Q4_K Q3_K Q2_K".split()


def blocks(name, w):
    qt = gguf.GGMLQuantizationType[name]
    if name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        # gguf-py has no K-quantizer: random quant bits with realistic half scales
        from pyllm.base import row_bytes

        rng = np.random.default_rng(0)
        raw = rng.integers(0, 256, size=(w.shape[0], row_bytes(GGMLType[name], w.shape[1])), dtype=np.uint8)
        return raw
    return gguf.quants.quantize(w, qt).view(np.uint8).reshape(w.shape[0], -1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--types", default=",".join(TYPES))
    args = p.parse_args()
    w = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((1, args.cols)).astype(np.float32)
    print("| type | MiB | threads | ms | GB/s | Gweights/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.types.split(","):
        t = QTensor(blocks(name, w), GGMLType[name], args.rows, args.cols)
        for threads in [int(n) for n in args.threads.split(",")]:
            set_threads(threads)
            linear(t, x)  # compile / warm
            best = float("inf")
            for _ in range(20):
                t0 = time.perf_counter()
                linear(t, x)
                best = min(best, time.perf_counter() - t0)
            print(f"| {name} | {t.nbytes / 2**20:.1f} | {threads} | {best * 1e3:.2f} | {t.nbytes / best / 1e9:.2f} | "
                  f"{args.rows * args.cols / best / 1e9:.2f} |")


if __name__ == "__main__":
    main()
