"""Perplexity and KL divergence on a text, by llama.cpp's llama-perplexity method.

The method of tools/perplexity/perplexity.cpp (`perplexity()` and `kl_divergence()`):

- the whole text is tokenized (the -f file minus one trailing newline; BOS as the model adds it,
  special tokens not parsed) and cut into n_chunk = len(tokens) // n_ctx chunks of n_ctx tokens
  (at most --chunks); fewer than 2 * n_ctx tokens is refused;
- each chunk is evaluated from an empty cache, in batches of at most n_batch tokens, with its
  first token replaced by BOS when the model adds BOS;
- only the second half is scored: the logits at positions first = n_ctx // 2 ... n_ctx - 2
  predict the tokens at first + 1 ... n_ctx - 1 (n_ctx - 1 - first tokens per chunk);
- PPL = exp(mean nll), its error PPL * sqrt((mean nll^2 - mean nll^2) / (count - 1)), the
  standard error of the mean nll carried through exp.

The KL-divergence base file is pyllm's own (llama.cpp's stores 2 bytes per vocabulary entry per
scored token, 0.5 GB for 20 chunks of a 49k vocabulary): per scored token, the base model's
top_k log-probabilities (float32, with their ids), the log of the probability mass outside
them, and the log-probability of the actual next token; plus the tokens, n_ctx and a hash of
the vocabulary to check that a second run scores the same thing. The KL divergence is then
computed over the top_k tokens and one bucket holding the rest: exact when top_k covers the
vocabulary, otherwise a lower bound that differs from the full KLD only by the divergence
within the tail (see benchmarks/README.md for its size on SmolLM2).
"""

import hashlib
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass, field

import numpy as np
from pyllm.base import PyllmError

BASE_FORMAT = "pyllm-kld-base-1"
DEFAULT_TOP_K = 256


# -- tokens and chunks ----------------------------------------------------------------------

def read_text(path) -> str:
    """The text of a -f file as llama.cpp's common args read it: its bytes as they are (no newline
    translation: wikitext's lines end in \r\n), one trailing \n dropped."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except OSError as e:
        raise PyllmError(f"cannot read text file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise PyllmError(f"text file {path} is not UTF-8") from None
    return text[:-1] if text.endswith("\n") else text


def tokenize(tokenizer, text: str) -> np.ndarray:
    """common_tokenize(ctx, text, add_special=true, parse_special=false)."""
    return np.asarray(tokenizer.encode(text, parse_special=False), dtype=np.int32)


def check_chunking(n_tokens: int, n_ctx: int) -> None:
    if n_ctx < 3:
        raise PyllmError(f"the context (-c) must be at least 3 tokens to score any, got {n_ctx}")
    if n_tokens < 2 * n_ctx:
        raise PyllmError(
            f"you need at least {2 * n_ctx} tokens to evaluate perplexity with a context of {n_ctx}; "
            f"the text tokenizes to only {n_tokens}"
        )


def n_chunks_of(n_tokens: int, n_ctx: int, n_chunks: int = -1) -> int:
    """Chunks llama-perplexity evaluates: all whole ones, or at most n_chunks (< 0: all)."""
    most = n_tokens // n_ctx
    return most if n_chunks < 0 else min(n_chunks, most)


def chunk_logits(model, chunk, n_batch: int) -> np.ndarray:
    """Logits of one chunk at the scored positions first ... n_ctx - 2: (n_ctx - 1 - first, vocab).

    Evaluated from an empty cache in batches of at most n_batch tokens; the first token is
    BOS when the model adds one. As llama.cpp computes logits only where they are scored, a
    batch is also cut at `first`, and the part before it computes none but its last.
    """
    n_ctx = len(chunk)
    first = n_ctx // 2
    ids = [int(i) for i in chunk]
    tok = model.tokenizer
    if tok.add_bos and tok.bos_id is not None:
        ids[0] = tok.bos_id
    cuts = sorted(set(range(0, n_ctx, n_batch)) | {first, n_ctx})
    model.reset()
    rows = []
    for start, end in zip(cuts, cuts[1:]):
        if end <= first:
            model.eval(ids[start:end])
        else:
            rows.append(model.eval(ids[start:end], all_logits=True))  # (end - start, vocab)
    model.reset()
    return np.concatenate(rows)[:-1]  # the last position predicts nothing in the chunk


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of float32 logits, row by row: (rows, vocab)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


# -- statistics -----------------------------------------------------------------------------

def ppl_and_error(sum_nll: float, sum_nll2: float, count: int) -> tuple:
    """(PPL, its standard error) as llama-perplexity's final estimate; error nan if unknown."""
    mean = sum_nll / count
    var = sum_nll2 / count - mean * mean
    ppl = float(np.exp(mean))
    err = float(np.sqrt(var / (count - 1)) * ppl) if var > 0 and count > 1 else float("nan")
    return ppl, err


def mean_and_uncertainty(total: float, total2: float, count: int) -> tuple:
    """kl_divergence()'s mean_and_uncertainty: the mean and its standard error (0 below 11 values)."""
    if count < 1:
        return 0.0, 0.0
    f = total / count
    df = total2 / count - f * f
    return f, (float(np.sqrt(df / (count - 1))) if df > 0 and count > 10 else 0.0)


def covariance(sum_a: float, sum_b: float, sum_ab: float, count: int) -> float:
    """kl_divergence()'s covariance of the two means (0 below 10 values)."""
    if count < 10:
        return 0.0
    return (sum_ab / count - (sum_a / count) * (sum_b / count)) / (count - 1)


# -- perplexity -----------------------------------------------------------------------------

@dataclass
class PerplexityResult:
    n_ctx: int
    n_chunks: int
    nll: np.ndarray  # (count,) float64: -log p of every scored token, in order
    chunk_ppl: list  # the running PPL after each chunk, as printed [1]x,[2]y,...
    eval_seconds: float  # model evaluation time (the log-softmax excluded)
    tokens_evaluated: int

    @property
    def count(self) -> int:
        return len(self.nll)

    @property
    def ppl(self) -> float:
        return ppl_and_error(float(self.nll.sum()), float((self.nll**2).sum()), self.count)[0]

    @property
    def ppl_error(self) -> float:
        return ppl_and_error(float(self.nll.sum()), float((self.nll**2).sum()), self.count)[1]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_evaluated / self.eval_seconds if self.eval_seconds else 0.0


@dataclass
class _BaseRows:
    """What a base file stores per scored token, gathered chunk by chunk."""

    top_k: int
    top_ids: list = field(default_factory=list)
    top_logp: list = field(default_factory=list)
    rest_logp: list = field(default_factory=list)
    tok_logp: list = field(default_factory=list)

    def add(self, lp: np.ndarray, targets: np.ndarray):
        ids, top = top_k_logp(lp, self.top_k)
        self.top_ids.append(ids)
        self.top_logp.append(top.astype(np.float32))
        self.rest_logp.append(rest_logp(lp, ids).astype(np.float32))
        self.tok_logp.append(lp[np.arange(len(targets)), targets].astype(np.float32))


def top_k_logp(lp: np.ndarray, k: int) -> tuple:
    """Per row the k largest log-probs, largest first (ties: lower id first): (ids int32, values)."""
    rows, vocab = lp.shape
    k = min(k, vocab)
    ids = np.argpartition(-lp, k - 1, axis=1)[:, :k] if k < vocab else np.tile(np.arange(vocab), (rows, 1))
    ids = np.sort(ids, axis=1)
    vals = np.take_along_axis(lp, ids, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1).astype(np.int32), np.take_along_axis(vals, order, axis=1)


def rest_logp(lp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per row log(sum of the probabilities outside ids); -inf when ids cover the vocabulary."""
    masked = lp.copy()
    np.put_along_axis(masked, ids.astype(np.int64), -np.inf, axis=1)
    top = masked.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(np.exp(masked - np.where(np.isfinite(top), top, 0.0)).sum(axis=1)) + top[:, 0]
    return np.where(np.isfinite(top[:, 0]), out, -np.inf)


def perplexity(model, tokens, n_ctx: int, n_batch: int = 2048, n_chunks: int = -1, on_chunk=None,
               top_k: int | None = None) -> tuple:
    """llama-perplexity's perplexity() over tokens (see the module docstring).

    on_chunk(i, running_ppl, eval_seconds) is called after each chunk (i from 1). top_k: also gather what a
    KL-divergence base file needs (the base's top_k log-probs per scored token).
    Returns (PerplexityResult, KLBase or None).
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    check_chunking(len(tokens), n_ctx)
    if n_batch < 1:
        raise PyllmError(f"the batch size (-b) must be 1 or more, got {n_batch}")
    if n_ctx > model.n_ctx:
        raise PyllmError(f"the model was loaded with a context of {model.n_ctx}, smaller than -c {n_ctx}")
    n_chunk = n_chunks_of(len(tokens), n_ctx, n_chunks)
    if n_chunk < 1:
        raise PyllmError(f"--chunks must be -1 (all) or 1 or more, got {n_chunks}")
    first = n_ctx // 2
    base = _BaseRows(top_k) if top_k is not None else None
    nll, chunk_ppl, seconds = [], [], 0.0
    for i in range(n_chunk):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
        t0 = time.perf_counter()
        logits = chunk_logits(model, chunk, n_batch)  # (n_ctx - 1 - first, vocab)
        seconds += time.perf_counter() - t0
        lp = log_softmax(logits)
        targets = chunk[first + 1:]
        nll.append(-lp[np.arange(len(targets)), targets])
        if base is not None:
            base.add(lp, targets)
        all_nll = np.concatenate(nll)
        chunk_ppl.append(float(np.exp(all_nll.mean())))
        if on_chunk is not None:
            on_chunk(i + 1, chunk_ppl[-1], seconds)
    result = PerplexityResult(n_ctx, n_chunk, np.concatenate(nll), chunk_ppl, seconds, n_chunk * n_ctx)
    kl_base = None
    if base is not None:
        kl_base = KLBase(
            n_ctx=n_ctx, n_vocab=model.args.vocab_size, vocab_hash=vocab_hash(model.tokenizer),
            tokens=tokens[:n_chunk * n_ctx].copy(), top_k=min(top_k, model.args.vocab_size),
            top_ids=np.concatenate(base.top_ids), top_logp=np.concatenate(base.top_logp),
            rest_logp=np.concatenate(base.rest_logp), tok_logp=np.concatenate(base.tok_logp),
            model=os.path.basename(str(model.gguf.path)),
        )
    return result, kl_base


# -- the KL-divergence base file ------------------------------------------------------------

def vocab_hash(tokenizer) -> str:
    """sha256 of the vocabulary (every token's bytes, in id order)."""
    h = hashlib.sha256()
    for i in range(tokenizer.n_vocab):
        piece = tokenizer.token_text(i).encode("utf-8", "surrogatepass")
        h.update(len(piece).to_bytes(4, "little") + piece)
    return h.hexdigest()


@dataclass
class KLBase:
    """The base model's log-probabilities at every scored token of n_chunks chunks."""

    n_ctx: int
    n_vocab: int
    vocab_hash: str
    tokens: np.ndarray  # (n_chunks * n_ctx,) int32, as tokenized (before any BOS replacement)
    top_k: int
    top_ids: np.ndarray  # (rows, top_k) int32, largest log-prob first
    top_logp: np.ndarray  # (rows, top_k) float32
    rest_logp: np.ndarray  # (rows,) float32: log of the mass outside top_ids (-inf: none)
    tok_logp: np.ndarray  # (rows,) float32: log-prob of the actual next token
    model: str = ""  # the base model's file name, for the record

    @property
    def n_chunks(self) -> int:
        return len(self.tokens) // self.n_ctx

    @property
    def rows_per_chunk(self) -> int:
        return self.n_ctx - 1 - self.n_ctx // 2

    def save(self, path) -> None:
        """Write to path atomically (a temporary file in the same folder, then a rename)."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        try:
            fd, tmp = tempfile.mkstemp(prefix=".kld-", suffix=".tmp", dir=folder)
        except OSError as e:
            raise PyllmError(f"cannot write {path}: {e.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f, format=np.array(BASE_FORMAT), n_ctx=np.int64(self.n_ctx), n_vocab=np.int64(self.n_vocab),
                    vocab_hash=np.array(self.vocab_hash), tokens=self.tokens, top_k=np.int64(self.top_k),
                    top_ids=self.top_ids, top_logp=self.top_logp, rest_logp=self.rest_logp,
                    tok_logp=self.tok_logp, model=np.array(self.model),
                )
            os.replace(tmp, path)
        except OSError as e:
            os.unlink(tmp)
            raise PyllmError(f"cannot write {path}: {e.strerror}") from None
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path) -> "KLBase":
        try:
            with np.load(path, allow_pickle=False) as z:
                fmt = str(z["format"])
                if fmt != BASE_FORMAT:
                    raise PyllmError(f"{path}: a KL-divergence base of format {fmt!r}, not {BASE_FORMAT!r}")
                base = cls(
                    n_ctx=int(z["n_ctx"]), n_vocab=int(z["n_vocab"]), vocab_hash=str(z["vocab_hash"]),
                    tokens=z["tokens"], top_k=int(z["top_k"]), top_ids=z["top_ids"], top_logp=z["top_logp"],
                    rest_logp=z["rest_logp"], tok_logp=z["tok_logp"], model=str(z["model"]),
                )
        except OSError as e:
            raise PyllmError(f"cannot read KL-divergence base {path}: {e.strerror or e}") from None
        except (KeyError, ValueError, zipfile.BadZipFile, EOFError):
            raise PyllmError(f"{path} is not a KL-divergence base (pyllm perplexity --kl-divergence-base)") from None
        rows = base.n_chunks * base.rows_per_chunk
        shapes_ok = (
            base.n_ctx >= 3 and len(base.tokens) % base.n_ctx == 0 and base.top_ids.shape == (rows, base.top_k)
            and base.top_logp.shape == (rows, base.top_k) and base.rest_logp.shape == (rows,)
            and base.tok_logp.shape == (rows,)
        )
        if not shapes_ok:
            raise PyllmError(f"{path}: corrupt KL-divergence base (its arrays do not fit n_ctx {base.n_ctx})")
        return base

    def check_compatible(self, model, n_ctx: int | None = None, tokens=None) -> None:
        """Raise PyllmError unless model, -c and the text's tokens (when given) match the base."""
        if model.args.vocab_size != self.n_vocab or vocab_hash(model.tokenizer) != self.vocab_hash:
            raise PyllmError(
                f"the model's vocabulary ({model.args.vocab_size} tokens) is not the base's ({self.n_vocab} tokens, "
                f"from {self.model or 'the base model'})"
            )
        if n_ctx is not None and n_ctx != self.n_ctx:
            raise PyllmError(f"the base was computed with -c {self.n_ctx}, not {n_ctx}")
        if tokens is not None:
            tokens = np.asarray(tokens)
            n = len(self.tokens)
            if len(tokens) < n or not np.array_equal(tokens[:n], self.tokens):
                raise PyllmError("the text does not tokenize to the tokens the base was computed on")


# -- KL divergence --------------------------------------------------------------------------

@dataclass
class KLResult:
    """Per scored token: nll of the model and of the base, KLD, Δp = p - p_base, same top-1."""

    n_ctx: int
    n_chunks: int
    nll: np.ndarray
    nll_base: np.ndarray
    kld: np.ndarray
    p_diff: np.ndarray
    same_top: np.ndarray  # bool
    eval_seconds: float
    tokens_evaluated: int

    @property
    def count(self) -> int:
        return len(self.nll)

    def stats(self) -> dict:
        """kl_divergence()'s summary: each value a (mean, uncertainty) pair or a number."""
        n = self.count
        s = {}
        log_ppl = mean_and_uncertainty(self.nll.sum(), (self.nll**2).sum(), n)
        log_base = mean_and_uncertainty(self.nll_base.sum(), (self.nll_base**2).sum(), n)
        cov = covariance(self.nll.sum(), self.nll_base.sum(), (self.nll * self.nll_base).sum(), n)
        ppl, ppl_base = np.exp(log_ppl[0]), np.exp(log_base[0])
        s["ppl"] = (ppl, ppl * log_ppl[1])
        s["ppl_base"] = (ppl_base, ppl_base * log_base[1])
        denom = log_ppl[1] * log_base[1]
        s["cor"] = cov / denom if denom else float("nan")
        ratio_unc = np.sqrt(max(log_ppl[1] ** 2 + log_base[1] ** 2 - 2 * cov, 0.0))
        s["ln_ratio"] = (log_ppl[0] - log_base[0], ratio_unc)
        s["ratio"] = (np.exp(log_ppl[0] - log_base[0]), np.exp(log_ppl[0] - log_base[0]) * ratio_unc)
        ppl_cov = ppl * ppl_base * cov
        s["diff"] = (ppl - ppl_base, np.sqrt(max(s["ppl"][1] ** 2 + s["ppl_base"][1] ** 2 - 2 * ppl_cov, 0.0)))
        s["kld"] = mean_and_uncertainty(self.kld.sum(), (self.kld**2).sum(), n)
        s["p_diff"] = mean_and_uncertainty(self.p_diff.sum(), (self.p_diff**2).sum(), n)
        mse = mean_and_uncertainty((self.p_diff**2).sum(), (self.p_diff**4).sum(), n)
        rms = np.sqrt(mse[0])
        s["p_diff_rms"] = (rms, 0.5 / rms * mse[1] if rms else 0.0)
        top = self.same_top.mean() if n else 0.0
        s["same_top"] = (top, np.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0)
        # llama.cpp's percentile(): linear interpolation between order statistics (numpy's default)
        s["kld_percentiles"] = {q: float(np.percentile(self.kld, q)) for q in KLD_PERCENTILES} if n else {}
        s["p_diff_percentiles"] = {q: float(np.percentile(self.p_diff, q)) for q in P_DIFF_PERCENTILES} if n else {}
        return s


KLD_PERCENTILES = (100, 99.9, 99, 95, 90, 50, 10, 5, 1, 0.1, 0)
P_DIFF_PERCENTILES = (100, 99.9, 99, 95, 90, 75, 50, 25, 10, 5, 1, 0.1, 0)


def kl_row_stats(lp: np.ndarray, base: KLBase, rows: slice, targets: np.ndarray) -> tuple:
    """(nll, nll_base, kld, p_diff, same_top) of these rows of the base against lp (float64)."""
    ids = base.top_ids[rows].astype(np.int64)
    top_p_log = base.top_logp[rows].astype(np.float64)
    rest = base.rest_logp[rows].astype(np.float64)
    r = np.arange(len(targets))
    nll = -lp[r, targets]
    nll_base = -base.tok_logp[rows].astype(np.float64)
    lq_top = np.take_along_axis(lp, ids, axis=1)
    kld = (np.exp(top_p_log) * (top_p_log - lq_top)).sum(axis=1)
    has_rest = np.isfinite(rest)
    if has_rest.any():
        lq_rest = rest_logp(lp[has_rest], ids[has_rest])
        kld[has_rest] += np.exp(rest[has_rest]) * (rest[has_rest] - lq_rest)
    p_diff = np.exp(-nll) - np.exp(-nll_base)
    same_top = lp.argmax(axis=1) == ids[:, 0]
    return nll, nll_base, kld, p_diff, same_top


def kl_divergence(model, base: KLBase, n_batch: int = 2048, n_chunks: int = -1, on_chunk=None) -> KLResult:
    """llama-perplexity's kl_divergence(): the model on the base's chunks, against the base.

    on_chunk(i, result_so_far) is called after each chunk (i from 1). Check compatibility first
    (KLBase.check_compatible).
    """
    if n_batch < 1:
        raise PyllmError(f"the batch size (-b) must be 1 or more, got {n_batch}")
    n_ctx, first, per = base.n_ctx, base.n_ctx // 2, base.rows_per_chunk
    if n_ctx > model.n_ctx:
        raise PyllmError(f"the model was loaded with a context of {model.n_ctx}, smaller than the base's {n_ctx}")
    n_chunk = base.n_chunks if n_chunks < 0 else min(n_chunks, base.n_chunks)
    if n_chunk < 1:
        raise PyllmError(f"--chunks must be -1 (all) or 1 or more, got {n_chunks}")
    parts, seconds = [], 0.0
    for i in range(n_chunk):
        chunk = base.tokens[i * n_ctx:(i + 1) * n_ctx]
        t0 = time.perf_counter()
        logits = chunk_logits(model, chunk, n_batch)
        seconds += time.perf_counter() - t0
        parts.append(kl_row_stats(log_softmax(logits), base, slice(i * per, (i + 1) * per), chunk[first + 1:]))
        if on_chunk is not None:
            on_chunk(i + 1, _kl_result(parts, n_ctx, i + 1, seconds))
    return _kl_result(parts, n_ctx, n_chunk, seconds)


def _kl_result(parts, n_ctx, n_chunk, seconds) -> KLResult:
    cols = [np.concatenate([p[j] for p in parts]) for j in range(5)]
    return KLResult(n_ctx, n_chunk, *cols, eval_seconds=seconds, tokens_evaluated=n_chunk * n_ctx)
