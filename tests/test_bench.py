"""pyllm bench: llama-bench's test definitions, records and statistics; its CLI; and (with
PYLLM_LLAMA_CPP_BIN) its records beside llama-bench's own for the same file.

No timing is asserted (speed is for benchmarks/); what is checked is what gets timed and how
the samples become the reported numbers.
"""

import csv
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from pyllm.cli.main import main as pyllm_main
from pyllm.kernels import max_threads
from pyllm.runtime import bench
from pyllm.runtime.loader import load

BIN = os.environ.get("PYLLM_LLAMA_CPP_BIN")
LLAMA_BENCH_FIELDS = {"model_filename", "model_type", "model_size", "model_n_params", "n_threads", "n_prompt",
                      "n_gen", "avg_ts", "stddev_ts", "samples_ts", "samples_ns", "avg_ns", "stddev_ns", "test_time"}
THREADS = [1, 2] if max_threads() >= 2 else [1]


@pytest.fixture(scope="module")
def stories(stories260k):
    model = load(stories260k, n_ctx=bench.n_ctx_needed([20], [4]))
    model.warmup()
    return model


class Recorder:
    """Wraps Model.eval to record each call: (tokens cached before it, ids)."""

    def __init__(self, model):
        self.model, self.calls, self._eval = model, [], model.eval
        model.eval = self

    def __call__(self, ids, *args, **kwargs):
        self.calls.append((len(self.model.tokens), list(ids)))
        return self._eval(ids, *args, **kwargs)

    def close(self):
        del self.model.eval  # back to the class's method


def test_tests_are_llama_bench_tests(stories):
    """pp: warm-up + each repetition from an empty cache, BOS first, batches of <= n_batch;
    tg: one warm-up token, then n single-token steps from an empty cache, BOS first."""
    rec = Recorder(stories)
    try:
        results = bench.bench(stories, n_prompt=[20], n_gen=[4], threads=[1], repetitions=2, n_batch=8)
    finally:
        rec.close()
    bos = stories.tokenizer.bos_id
    pp_calls, tg_calls = rec.calls[: 3 * 3], rec.calls[3 * 3:]
    for rep in range(3):  # the warm-up, then two timed repetitions
        batches = pp_calls[3 * rep:3 * rep + 3]
        assert [len(ids) for _, ids in batches] == [8, 8, 4]
        assert [cached for cached, _ in batches] == [0, 8, 16]
        assert batches[0][1][0] == bos
    assert [len(ids) for _, ids in tg_calls] == [1] * (1 + 2 * 4)
    assert [cached for cached, _ in tg_calls] == [0] + [0, 1, 2, 3] * 2
    assert [tg_calls[i][1][0] for i in (0, 1, 5)] == [bos] * 3
    assert [(r.test, r.n_prompt, r.n_gen) for r in results] == [("pp20", 20, 0), ("tg4", 0, 4)]


def test_every_combination_in_llama_bench_order(stories):
    results = bench.bench(stories, n_prompt=[8, 16], n_gen=[2], threads=THREADS, repetitions=1)
    expected = [(t, test) for t in THREADS for test in ("pp8", "pp16", "tg2")]
    assert [(r.n_threads, r.test) for r in results] == expected


def test_statistics_from_the_samples(stories):
    r = bench.bench(stories, n_prompt=[16], n_gen=[0], threads=[1], repetitions=4)[0]
    ns = np.array(r.samples_ns, dtype=np.float64)
    ts = 1e9 * 16 / ns
    assert len(ns) == 4 and np.all(ns > 0)
    np.testing.assert_allclose(r.samples_ts, ts)
    assert r.avg_ts == pytest.approx(ts.mean()) and r.stddev_ts == pytest.approx(ts.std(ddof=1))
    assert r.avg_ns == pytest.approx(ns.mean(), abs=1) and r.stddev_ns == pytest.approx(ns.std(ddof=1), abs=1)


def test_record_sizes_against_gguf_py(stories, stories260k):
    """model_size and model_n_params are llama.cpp's (every tensor's bytes and elements), read
    here with gguf-py; stories260K has its own output matrix, so a token streams every tensor
    but the embedding table (of which it reads one row)."""
    reader = GGUFReader(stories260k)
    tensors = {t.name: t for t in reader.tensors}
    size = sum(int(t.n_bytes) for t in tensors.values())
    params = sum(int(t.n_elements) for t in tensors.values())
    r = bench.bench(stories, n_prompt=[0], n_gen=[2], threads=[1], repetitions=1)[0]
    rec = r.as_record()
    assert (rec["model_size"], rec["model_n_params"]) == (size, params)
    streamed = size - int(tensors["token_embd.weight"].n_bytes)
    assert "output.weight" in tensors and rec["bytes_per_token"] == streamed
    assert rec["avg_gbps"] == pytest.approx(streamed * r.avg_ts / 1e9)
    assert rec["model_type"] == "llama 293K (guessed) all F32"  # no general.file_type in this file
    assert LLAMA_BENCH_FIELDS <= set(rec)


def test_tied_output_matrix_counts_once():
    from types import SimpleNamespace as NS

    model = NS(args=NS(tie_word_embeddings=True), weight_bytes=10_000, token_embd=NS(nbytes=3_000))
    assert bench.bytes_per_token(model) == 10_000


def test_size_and_params_columns():
    assert bench.format_size(96_571_392) == "92.10 MiB" and bench.format_size(3 << 30) == "3.00 GiB"
    assert bench.format_params(134_515_008) == "134.52 M" and bench.format_params(1_235_814_400) == "1.24 B"
    assert bench.size_label(134_515_008) == "135M" and bench.size_label(292_800) == "293K"
    assert bench.size_label(1_235_814_400) == "1.2B" and bench.size_label(6_738_415_616) == "6.7B"


# -- the command ----------------------------------------------------------------------------

def run_cli(capsys, *args):
    rc = pyllm_main(["bench", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_markdown_table(stories260k, capsys):
    t = ",".join(map(str, THREADS))
    rc, out, err = run_cli(capsys, stories260k, "-p", "8,16", "-n", "4", "-t", t, "-r", "2")
    assert rc == 0 and "warm-up (JIT compile/load):" in err and "warm-up" not in out
    lines = out.strip().splitlines()
    assert lines[0] == "| model | size | params | backend | threads | test | t/s | GB/s |"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [(r[4], r[5]) for r in rows] == [(str(n), test) for n in THREADS for test in ("pp8", "pp16", "tg4")]
    for r in rows:
        assert r[0] == "llama 293K (guessed) all F32" and r[1] == "1.12 MiB" and r[2] == "0.29 M"
        mean, sd = r[6].split(" ± ")
        assert float(mean) > 0 and float(sd) >= 0
        assert (r[7] != "") == r[5].startswith("tg")


def test_json_and_csv(stories260k, capsys):
    rc, out, _ = run_cli(capsys, "-m", stories260k, "-p", "8", "-n", "2", "-t", "1", "-r", "3", "-o", "json")
    records = json.loads(out)
    assert rc == 0 and [(r["n_prompt"], r["n_gen"]) for r in records] == [(8, 0), (0, 2)]
    assert all(LLAMA_BENCH_FIELDS <= set(r) and len(r["samples_ts"]) == 3 for r in records)
    assert records[0]["avg_gbps"] is None and records[1]["avg_gbps"] > 0
    rc, out, _ = run_cli(capsys, stories260k, "-p", "8", "-n", "0", "-t", "1", "-r", "1", "-o", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and len(rows) == 1 and rows[0]["n_prompt"] == "8" and float(rows[0]["avg_ts"]) > 0


@pytest.mark.parametrize("args, message", [
    (["-t", "0"], "threads must be between 1 and"),
    (["-t", "1,999"], "threads must be between 1 and"),
    (["-r", "0"], "-r must be 1 or more"),
    (["-p", "0", "-n", "0"], "nothing to measure"),
    (["-p", "-4"], "-p and -n must be 0 or more"),
])
def test_bad_values_are_one_line_errors(stories260k, capsys, args, message):
    rc, out, err = run_cli(capsys, stories260k, *args)
    assert rc == 1 and out == "" and err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["-t", "1,x"], ["-p", "1.5"], ["-o", "xml"], []])
def test_usage_errors(stories260k, capsys, args):
    with pytest.raises(SystemExit) as e:
        pyllm_main(["bench"] + ([str(stories260k)] if args else []) + args)
    assert e.value.code == 2
    capsys.readouterr()


# -- beside llama-bench ---------------------------------------------------------------------

@pytest.mark.skipif(not BIN, reason="PYLLM_LLAMA_CPP_BIN (llama.cpp's build/bin) is not set")
@pytest.mark.parametrize("qtype", [None, "Q8_0"])
def test_records_match_llama_bench(stories260k, tmp_path, capsys, qtype):
    model = stories260k
    if qtype:
        model = tmp_path / f"stories-{qtype}.gguf"
        assert pyllm_main(["quantize", str(stories260k), str(model), qtype]) == 0
    proc = subprocess.run([str(Path(BIN) / "llama-bench"), "-m", str(model), "-p", "8", "-n", "2", "-r", "1",
                           "-t", "1", "-o", "json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout)
    rc, out, _ = run_cli(capsys, model, "-p", "8", "-n", "2", "-r", "1", "-t", "1", "-o", "json")
    mine = json.loads(out)
    assert rc == 0 and len(mine) == len(theirs) == 2
    for a, b in zip(mine, theirs):
        assert set(a) - {"bytes_per_token", "avg_gbps"} <= set(b)  # the same names, none invented
        for key in ("model_filename", "model_size", "model_n_params", "n_prompt", "n_gen", "n_threads", "n_batch"):
            assert a[key] == b[key], key
        # "<arch> <size label> <file type>": the file type as llama.cpp names it
        assert a["model_type"].split(" ", 2)[2] == b["model_type"].split(" ", 2)[2]
        assert a["model_type"].split(" ")[0] == b["model_type"].split(" ")[0]
