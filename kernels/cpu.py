"""CPU features of this host, as LLVM sees them (the instructions JIT code may use), and the
instruction-set levels the kernels are written for.

A kernel level is only ever compiled on a host that has every feature it needs: LLVM aborts
the whole process when asked to select an instruction the target lacks, and running one
would be a SIGILL.
"""

import os
from functools import lru_cache

# Kernel levels, lowest first. Each needs the features of the ones before it plus its own.
PORTABLE, AVX2, AVX512VNNI = 0, 1, 2
ISA_NAMES = ("portable", "avx2", "avx512vnni")
ISA_FEATURES = (
    frozenset(),
    frozenset({"avx2", "fma", "f16c"}),
    frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}),
)


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


def isa_supported(level: int) -> bool:
    return ISA_FEATURES[level] <= cpu_features()


@lru_cache(maxsize=1)
def best_isa() -> int:
    """The highest kernel level this host runs. PYLLM_ISA=portable|avx2|avx512vnni asks for a
    lower one (for comparisons); asking for one the host lacks is an error, not a crash."""
    from pyllm.base import PyllmError

    want = os.environ.get("PYLLM_ISA", "").strip().lower()
    best = max(level for level in range(len(ISA_NAMES)) if isa_supported(level))
    if not want:
        return best
    if want not in ISA_NAMES:
        raise PyllmError(f"PYLLM_ISA must be one of {', '.join(ISA_NAMES)}, got {want!r}")
    level = ISA_NAMES.index(want)
    if level > best:
        raise PyllmError(f"PYLLM_ISA={want}: this CPU lacks {', '.join(sorted(ISA_FEATURES[level] - cpu_features()))}")
    return level
