"""Time to the first byte a command prints (for `pyllm generate`: its first generated token,
since the prompt is not echoed) and to its exit, over fresh processes: the measure of issue #8's
start-up goals.

    python benchmarks/first_token.py [--runs 3] -- pyllm generate MODEL -p "Once upon a time" -n 8 --temp 0

The first run after an install or a source change compiles the kernels (an empty Numba cache);
run it once before to time the warm case. Prints one line per run and the best of each.
"""

import argparse
import os
import subprocess
import sys
import time


def one_run(cmd: list) -> tuple:
    """(seconds to the first stdout byte, seconds to exit) of cmd."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = None
    while os.read(proc.stdout.fileno(), 1 if first is None else 65536):
        if first is None:
            first = time.perf_counter() - t0
    proc.wait()
    return first, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = p.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the command to time after --")
    results = []
    for i in range(args.runs):
        first, total = one_run(cmd)
        results.append((first, total))
        shown = "no output" if first is None else f"first byte {first:.2f} s"
        print(f"run {i + 1}: {shown}, exit {total:.2f} s", flush=True)
    firsts = [f for f, _ in results if f is not None]
    if firsts:
        print(f"best: first byte {min(firsts):.2f} s, exit {min(t for _, t in results):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
