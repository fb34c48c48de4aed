"""This machine's memory read bandwidth, at each thread count, so decode speed can be stated as
a fraction of it.

    python benchmarks/bandwidth.py [--size-mb 1024] [--threads 1,2] [-r 7]

A Numba parallel sum over a float64 buffer far larger than the last-level cache (32 MB L3 on
the project's EPYCs; 1 GB by default): each thread sums contiguous 1 MiB blocks, vectorised
(fastmath lets LLVM keep several vector accumulators). GB/s = buffer bytes / seconds (1 GB =
1e9 bytes, as the decode GB/s of `pyllm bench`), best of -r runs after one warm-up pass.
"""

import argparse
import time

import numba
import numpy as np
import pyllm.kernels  # noqa: F401  (Numba's threading layer as pyllm configures it: OpenMP)
from numba import njit, prange

BLOCK = 1 << 17  # float64 values per block: 1 MiB


@njit(parallel=True, fastmath=True, cache=True)
def block_sums(a):
    """a: (n_blocks, BLOCK) float64 -> the sum of each block (read once, front to back)."""
    n = a.shape[0]
    out = np.empty(n)
    for i in prange(n):
        row = a[i]
        s = 0.0
        for j in range(row.shape[0]):
            s += row[j]
        out[i] = s
    return out


def read_bandwidth(buf: np.ndarray, threads: int, repeats: int) -> tuple:
    """(best GB/s, median GB/s) of summing buf with this many threads."""
    numba.set_num_threads(threads)
    block_sums(buf)  # warm-up: compile or load, and fault every page in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        total = block_sums(buf).sum()
        times.append(time.perf_counter() - t0)
    assert total == buf.size  # every value was read (the buffer holds ones)
    return buf.nbytes / min(times) / 1e9, buf.nbytes / float(np.median(times)) / 1e9


def main():
    p = argparse.ArgumentParser(description="Memory read bandwidth at 1, 2, ... threads (Numba parallel sum).")
    p.add_argument("--size-mb", type=int, default=1024, help="buffer size in MiB (default: 1024)")
    p.add_argument("--threads", default=None, help="comma list (default: 1 up to all cores)")
    p.add_argument("-r", "--repeats", type=int, default=7, help="timed passes per thread count (default: 7)")
    args = p.parse_args()
    limit = numba.config.NUMBA_NUM_THREADS
    threads = [int(t) for t in args.threads.split(",")] if args.threads else list(range(1, limit + 1))
    if any(not 1 <= t <= limit for t in threads):
        p.error(f"threads must be between 1 and {limit}")
    buf = np.ones(((args.size_mb << 20) // (8 * BLOCK), BLOCK))
    print(f"buffer {buf.nbytes / 2**20:.0f} MiB, best and median of {args.repeats} passes")
    print("| threads | read GB/s (best) | read GB/s (median) |")
    print("| ---: | ---: | ---: |")
    for t in threads:
        best, median = read_bandwidth(buf, t, args.repeats)
        print(f"| {t} | {best:.1f} | {median:.1f} |", flush=True)


if __name__ == "__main__":
    main()
