"""CPU features of this host, as LLVM sees them (the instructions JIT code may use)."""

from functools import lru_cache


@lru_cache(maxsize=1)
def cpu_features() -> frozenset:
    """Feature names enabled on this CPU, e.g. {'avx2', 'fma', 'avx512f', 'amx-tile', ...}."""
    import llvmlite.binding as llvm

    try:
        features = llvm.get_host_cpu_features()
    except RuntimeError:  # LLVM cannot query some hosts; claim nothing beyond the baseline
        return frozenset()
    return frozenset(name for name, on in features.items() if on)


def has(*names: str) -> bool:
    return all(n in cpu_features() for n in names)
