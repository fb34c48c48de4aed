"""Numba kernels: block-type dequantizers and products (quants, matmul), layer ops (ops).

Importing this package configures Numba once: OpenMP first, because a parallel launch
costs ~2.5 us there against ~45 us with the workqueue layer, and decode launches
hundreds of them per token.
"""

import numba

numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


def max_threads() -> int:
    return numba.config.NUMBA_NUM_THREADS


def set_threads(n: int | None) -> int:
    """Use n threads for the kernels (None: all cores). Returns the number in use."""
    from pyllm.base import PyllmError

    limit = max_threads()
    if n is None:
        n = limit
    if not 1 <= n <= limit:
        raise PyllmError(f"threads must be between 1 and {limit} on this machine, got {n}")
    numba.set_num_threads(n)
    return n
