"""Numba kernels: block-type dequantizers and products (quants, matmul), layer ops (ops).

Importing this package configures Numba once: OpenMP first, because a parallel launch
costs ~2.5 us there against ~45 us with the workqueue layer, and decode launches
hundreds of them per token.
"""

import hashlib
import os
from pathlib import Path

import numba

numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


def _cache_dir() -> Path:
    """Numba's disk cache for pyllm: one directory per version of the sources and of Numba.

    Numba checks only the timestamp of the file a cached function is defined in, so the
    compiled step (kernels/forward.py) would outlive an edit of a kernel it inlines from
    another file and run the old code. Keying the directory on the hash of every compiled
    source (this package, the trainer's ops, base.py) and its location makes any edit, and
    every install, a cache of its own.
    Under $NUMBA_CACHE_DIR when set, else ~/.cache/pyllm/numba (XDG_CACHE_HOME)."""
    root = Path(__file__).resolve().parent.parent
    # The install's location too: Numba's index of each function also records its source file's
    # mtime, so two installs with equal sources (two venvs, a clone) sharing one directory would
    # each find the other's index stale, renumber its entries from 1 and overwrite the other's
    # data files, and then load a kernel compiled for another key (seen: ZeroDivisionError in
    # the step under two concurrent test runs).
    h = hashlib.sha1(f"{numba.__version__} {numba.config.PYVERSION} {root}".encode())
    for p in sorted([*root.glob("kernels/*.py"), *root.glob("tuner/*.py"), *root.glob("runtime/*.py"),
                     root / "base.py"]):
        h.update(p.name.encode() + p.read_bytes())
    base = os.environ.get("NUMBA_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "pyllm" / "numba"
    return Path(base) / h.hexdigest()[:16]


# Before any kernel module is imported: Numba picks a function's cache directory when it is
# decorated. Where it cannot write there, it falls back to its own locations.
numba.config.CACHE_DIR = str(_cache_dir())


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
