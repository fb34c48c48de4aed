"""Time to the first byte a command prints (for `pyllm generate`: its first generated token,
since the prompt is not echoed) and to its exit, over fresh processes: the measure of issue #8's
start-up goals.

    python benchmarks/first_token.py [--runs 3] -- pyllm generate MODEL -p "Once upon a time" -n 8 --temp 0
    python benchmarks/first_token.py --input Hi -- pyllm chat MODEL --temp 0 -n 8

With --input the text is piped in (a chat answers it and ends), and the first byte on stderr
is timed too: for `pyllm chat` that is its banner, shown when the prompt is ready.
The first run after an install or a source change compiles the kernels (an empty Numba cache);
run it once before to time the warm case. Prints one line per run and the best of each.
"""

import argparse
import os
import selectors
import subprocess
import sys
import time


def one_run(cmd: list, text) -> tuple:
    """(seconds to the first stdout byte, to the first stderr byte, to exit) of cmd; None where
    nothing came."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if text is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if text is not None:
        proc.stdin.write(text.encode() + b"\n")
        proc.stdin.close()
    first = {}
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    while sel.get_map():
        for key, _ in sel.select():
            if os.read(key.fileobj.fileno(), 65536):
                first.setdefault(key.data, time.perf_counter() - t0)
            else:
                sel.unregister(key.fileobj)
    proc.wait()
    return first.get("out"), first.get("err"), time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--input", default=None, help="text piped into the command (else no stdin)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = p.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the command to time after --")
    results = []
    for i in range(args.runs):
        out, err, total = one_run(cmd, args.input)
        results.append((out, err, total))
        shown = "no output" if out is None else f"first byte {out:.2f} s"
        note = "" if err is None else f", first stderr byte {err:.2f} s"
        print(f"run {i + 1}: {shown}{note}, exit {total:.2f} s", flush=True)
    outs = [o for o, _, _ in results if o is not None]
    errs = [e for _, e, _ in results if e is not None]
    if outs:
        best = f"best: first byte {min(outs):.2f} s"
        best += f", first stderr byte {min(errs):.2f} s" if errs else ""
        print(f"{best}, exit {min(t for _, _, t in results):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
