"""Prompt and decode speed, measured the way llama.cpp's llama-bench measures them.

Semantics follow tools/llama-bench/llama-bench.cpp (test_prompt, test_gen and main's loop):

- ppN: N tokens evaluated as batches of at most n_batch tokens from an empty cache; the first
  token is BOS when the model adds one, the rest random ids. Only the last logits are computed.
- tgN: N single-token evaluations from an empty cache, the first token BOS (when the model adds
  one), each next one a random id. Every step computes its logits.
- Before a test's repetitions, one untimed run of the same prompt (pp) or one token (tg); each
  repetition starts from an empty cache. t/s of a repetition = tokens / its wall time; the table
  shows mean and sample standard deviation over the repetitions.
- Thread counts x prompt sizes, then thread counts x generation sizes, in llama-bench's order
  (for each thread count: every ppN, then every tgN).

The records carry llama-bench's JSON field names where pyllm has an honest value for them,
plus pyllm's own: `bytes_per_token` (weight bytes streamed per decoded token) and `avg_gbps`.
"""

import csv
import io
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from pyllm.base import GGMLType, PyllmError

BACKEND = "numba-cpu"

# llama_ftype -> llama_ftype_name() (src/llama-model-loader.cpp), for the types pyllm writes.
FTYPE_NAMES = {
    0: "all F32", 1: "F16", 32: "BF16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K - Medium", 21: "Q2_K - Small", 11: "Q3_K - Small", 12: "Q3_K - Medium", 13: "Q3_K - Large",
    14: "Q4_K - Small", 15: "Q4_K - Medium", 16: "Q5_K - Small", 17: "Q5_K - Medium", 18: "Q6_K",
}
# The file type llama.cpp guesses from the most common tensor type when general.file_type is absent.
_GUESSED_FTYPE = {
    GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.BF16: 32, GGMLType.Q4_0: 2, GGMLType.Q4_1: 3, GGMLType.Q5_0: 8,
    GGMLType.Q5_1: 9, GGMLType.Q8_0: 7, GGMLType.Q2_K: 10, GGMLType.Q3_K: 12, GGMLType.Q4_K: 15,
    GGMLType.Q5_K: 17, GGMLType.Q6_K: 18,
}


def file_type_name(gguf) -> str:
    """llama.cpp's name for the file's type ("Q4_K - Medium", "(guessed) all F32", ...)."""
    ftype = gguf.metadata.get("general.file_type")
    if ftype is not None:
        return FTYPE_NAMES.get(int(ftype), "unknown, may not work")
    # llama.cpp walks the tensors in name order; the first type to reach the top count wins.
    counts, top, top_n = Counter(), GGMLType.F32, 0
    for name in sorted(gguf.tensors):
        qtype = gguf.tensors[name].qtype
        counts[qtype] += 1
        if counts[qtype] > top_n:
            top, top_n = qtype, counts[qtype]
    return "(guessed) " + FTYPE_NAMES.get(_GUESSED_FTYPE.get(top, 0), "unknown, may not work")


def size_label(n_params: int) -> str:
    """135M, 1.2B, 293K: the parameter count rounded. (llama.cpp guesses its label from the
    layer count instead: SmolLM2-135M's 30 layers read "256M" there, stories260K "?B".)"""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n_params >= div:
            value = n_params / div
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(n_params)


def model_type(model) -> str:
    """llama-bench's model_type: architecture, size, file type, e.g. "llama 135M Q4_1"."""
    return f"{model.args.model_type} {size_label(model.n_params)} {file_type_name(model.gguf)}"


def bytes_per_token(model) -> int:
    """Weight bytes one decoded token streams: every tensor except the embedding table, of which
    only one row is read -- unless it doubles as the output matrix (tied), then it counts once."""
    embd = 0 if model.args.tie_word_embeddings else model.token_embd.nbytes
    return model.weight_bytes - embd


def cache_types(model) -> tuple:
    """The K and V cache types in llama.cpp's spelling (f32, f16, q8_0, q4_0; pyllm's fp8_e4m3)."""
    return model.cache_types


def cpu_info() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@dataclass
class BenchResult:
    """One test (ppN or tgN at some thread count) and its repetitions' wall times."""

    model_filename: str
    model_type: str
    model_size: int  # bytes of all tensors (llama_model_size)
    model_n_params: int
    n_batch: int
    n_threads: int
    type_k: str
    type_v: str
    n_prompt: int
    n_gen: int
    bytes_per_token: int
    test_time: str = ""  # RFC 3339, when the test started
    samples_ns: list = field(default_factory=list)

    @property
    def test(self) -> str:
        return f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"

    @property
    def samples_ts(self) -> list:
        n = self.n_prompt + self.n_gen
        return [1e9 * n / t for t in self.samples_ns]

    @property
    def avg_ts(self) -> float:
        return _mean(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        return _stdev(self.samples_ts)

    @property
    def avg_ns(self) -> int:
        return int(_mean(self.samples_ns))

    @property
    def stddev_ns(self) -> int:
        return int(_stdev(self.samples_ns))

    @property
    def avg_gbps(self) -> float | None:
        """Decode only: weight bytes streamed per token x tokens/s, in GB/s (1e9)."""
        return self.bytes_per_token * self.avg_ts / 1e9 if self.n_gen else None

    def as_record(self) -> dict:
        """llama-bench's JSON record (the fields pyllm can fill), then pyllm's own."""
        return {
            "cpu_info": cpu_info(),
            "gpu_info": "",
            "backends": BACKEND,
            "model_filename": self.model_filename,
            "model_type": self.model_type,
            "model_size": self.model_size,
            "model_n_params": self.model_n_params,
            "n_batch": self.n_batch,
            "n_threads": self.n_threads,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "n_gpu_layers": 0,
            "n_prompt": self.n_prompt,
            "n_gen": self.n_gen,
            "n_depth": 0,
            "test_time": self.test_time,
            "avg_ns": self.avg_ns,
            "stddev_ns": self.stddev_ns,
            "avg_ts": self.avg_ts,
            "stddev_ts": self.stddev_ts,
            "samples_ns": list(self.samples_ns),
            "samples_ts": self.samples_ts,
            "bytes_per_token": self.bytes_per_token,
            "avg_gbps": self.avg_gbps,
        }


def _mean(v) -> float:
    return sum(v) / len(v) if v else 0.0


def _stdev(v) -> float:
    """Sample standard deviation (n - 1), 0 for fewer than two values, as llama-bench's stdev()."""
    if len(v) < 2:
        return 0.0
    m = _mean(v)
    return math.sqrt(max(sum((x - m) ** 2 for x in v) / (len(v) - 1), 0.0))


# -- the two tests -------------------------------------------------------------------------

def _first_token(model, rng) -> int:
    tok = model.tokenizer
    if tok.add_bos and tok.bos_id is not None:
        return tok.bos_id
    return int(rng.integers(model.args.vocab_size))


def run_prompt(model, n_prompt: int, n_batch: int, rng) -> None:
    """test_prompt: n_prompt tokens from an empty cache, in batches of at most n_batch."""
    model.reset()
    done = 0
    while done < n_prompt:
        n = min(n_prompt - done, n_batch)
        ids = rng.integers(model.args.vocab_size, size=n).tolist()
        if done == 0:
            ids[0] = _first_token(model, rng)
        model.eval(ids)
        done += n


def run_gen(model, n_gen: int, rng) -> None:
    """test_gen: n_gen single-token evaluations from an empty cache."""
    model.reset()
    token = _first_token(model, rng)
    for _ in range(n_gen):
        model.eval([token])
        token = int(rng.integers(model.args.vocab_size))


def run_test(model, n_prompt: int, n_gen: int, n_batch: int, rng) -> None:
    """One repetition of a ppN (n_gen 0) or tgN (n_prompt 0) test."""
    if n_prompt:
        run_prompt(model, n_prompt, n_batch, rng)
    else:
        run_gen(model, n_gen, rng)


def check_params(n_prompt, n_gen, threads, repetitions: int, n_batch: int) -> None:
    """Raise PyllmError for values no test can run with (before anything is loaded)."""
    from pyllm.kernels import max_threads

    if any(n < 0 for n in n_prompt) or any(n < 0 for n in n_gen):
        raise PyllmError("-p and -n must be 0 or more")
    if not any(n_prompt) and not any(n_gen):
        raise PyllmError("nothing to measure: every -p and -n is 0")
    limit = max_threads()
    for t in threads:
        if t is not None and not 1 <= t <= limit:
            raise PyllmError(f"threads must be between 1 and {limit} on this machine, got {t}")
    if repetitions < 1:
        raise PyllmError(f"-r must be 1 or more, got {repetitions}")
    if n_batch < 1:
        raise PyllmError(f"-b must be 1 or more, got {n_batch}")


def n_ctx_needed(n_prompt, n_gen) -> int:
    """Positions the KV cache needs for these tests (and for Model.warmup's batch)."""
    from pyllm.kernels.matmul import BATCH_MIN

    return max(max(n_prompt, default=0), max(n_gen, default=0), BATCH_MIN + 1)


def bench(model, n_prompt=(512,), n_gen=(128,), threads=(None,), repetitions: int = 5, n_batch: int = 2048,
          seed: int = 0, on_result=None, warmup: bool = True) -> list:
    """Run every (threads, ppN) and (threads, tgN) test on a loaded model; return BenchResults.

    threads: thread counts (None: all cores). on_result(result) is called as each test ends.
    The model's KV cache must hold the largest N of any test (see n_ctx_needed). The JIT warm-up
    (Model.warmup) is the caller's, so that it can be timed apart; warmup here is llama-bench's
    untimed run before each test's repetitions.
    """
    from pyllm.kernels import set_threads

    check_params(n_prompt, n_gen, threads, repetitions, n_batch)
    need = max(max(n_prompt, default=0), max(n_gen, default=0))
    if need > model.n_ctx:
        raise PyllmError(f"the tests need {need} positions but the model was loaded with a context of {model.n_ctx}")
    rng = np.random.default_rng(seed)
    results = []
    for t in threads:
        n_threads = set_threads(t)
        tests = [(p, 0) for p in n_prompt if p > 0] + [(0, g) for g in n_gen if g > 0]
        for p, g in tests:
            r = BenchResult(
                model_filename=str(model.gguf.path),
                model_type=model_type(model),
                model_size=model.weight_bytes,
                model_n_params=model.n_params,
                n_batch=n_batch,
                n_threads=n_threads,
                type_k=cache_types(model)[0],
                type_v=cache_types(model)[1],
                n_prompt=p,
                n_gen=g,
                bytes_per_token=bytes_per_token(model),
                test_time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )

            if warmup:  # llama-bench: the whole prompt once, or one generated token
                run_test(model, p, min(g, 1), n_batch, rng)
            for _ in range(repetitions):
                t0 = time.perf_counter_ns()
                run_test(model, p, g, n_batch, rng)
                r.samples_ns.append(time.perf_counter_ns() - t0)
            model.reset()
            results.append(r)
            if on_result is not None:
                on_result(r)
    return results


# -- output ---------------------------------------------------------------------------------

MARKDOWN_COLUMNS = ("model", "size", "params", "backend", "threads", "test", "t/s", "GB/s")
KV_COLUMNS = ("type_k", "type_v")  # shown after threads when a cache type is not the default f16, as llama-bench
CSV_FIELDS = (
    "cpu_info", "gpu_info", "backends", "model_filename", "model_type", "model_size", "model_n_params",
    "n_batch", "n_threads", "type_k", "type_v", "n_gpu_layers", "n_prompt", "n_gen", "n_depth", "test_time",
    "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "bytes_per_token", "avg_gbps",
)


def format_size(n_bytes: int) -> str:
    """llama-bench's size column: MiB below 1 GiB, GiB above."""
    if n_bytes < 1 << 30:
        return f"{n_bytes / 2**20:.2f} MiB"
    return f"{n_bytes / 2**30:.2f} GiB"


def format_params(n: int) -> str:
    """llama-bench's params column: M below a billion, B above."""
    return f"{n / 1e6:.2f} M" if n < 1e9 else f"{n / 1e9:.2f} B"


def _columns(kv: bool) -> tuple:
    at = MARKDOWN_COLUMNS.index("threads") + 1
    return MARKDOWN_COLUMNS[:at] + KV_COLUMNS + MARKDOWN_COLUMNS[at:] if kv else MARKDOWN_COLUMNS


def markdown_header(kv: bool = False) -> str:
    """The table's header; kv: with the type_k and type_v columns."""
    cols = _columns(kv)
    head = "| " + " | ".join(cols) + " |"
    align = "| " + " | ".join("---" if c in ("model", "backend", "test") else "---:" for c in cols) + " |"
    return head + "\n" + align


def markdown_row(r: BenchResult, kv: bool = False) -> str:
    gbps = "" if r.avg_gbps is None else f"{r.avg_gbps:.2f}"
    cells = (r.model_type, format_size(r.model_size), format_params(r.model_n_params), BACKEND, str(r.n_threads),
             r.test, f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}", gbps)
    if kv:
        at = MARKDOWN_COLUMNS.index("threads") + 1
        cells = cells[:at] + (r.type_k, r.type_v) + cells[at:]
    return "| " + " | ".join(cells) + " |"


def csv_header() -> str:
    return _csv_line(CSV_FIELDS)


def csv_row(r: BenchResult) -> str:
    rec = r.as_record()
    return _csv_line("" if rec[k] is None else rec[k] for k in CSV_FIELDS)


def _csv_line(values) -> str:
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="").writerow(list(values))
    return buf.getvalue()


def to_json(results) -> str:
    return json.dumps([r.as_record() for r in results], indent=2)
