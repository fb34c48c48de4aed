"""Start-up time: `import pyllm`, then load the bundled model and generate a few tokens, in a
fresh interpreter each time (so Numba's on-disk cache, not this process, is what is reused).

    python benchmarks/bench_startup.py [--runs 5] [--tokens 5]

Prints the best and median of each phase over the runs. The first run after an install (or
after the sources change) compiles the kernels; later runs read them from Numba's cache.
"""

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import pyllm
t1 = time.perf_counter()
m = pyllm.load()
t2 = time.perf_counter()
pyllm.generate(m, "Once", max_tokens={tokens})
t3 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "load": t2 - t1, "generate": t3 - t2, "torch": "torch" in sys.modules}}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tokens", type=int, default=5)
    a = p.parse_args()
    runs = []
    for _ in range(a.runs):
        out = subprocess.run([sys.executable, "-c", CHILD.format(tokens=a.tokens)], capture_output=True, text=True,
                             check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for phase in ("import", "load", "generate"):
        times = [r[phase] for r in runs]
        print(f"{phase:9s} best {min(times):7.3f} s   median {statistics.median(times):7.3f} s")
    print(f"torch imported: {any(r['torch'] for r in runs)}")


if __name__ == "__main__":
    main()
