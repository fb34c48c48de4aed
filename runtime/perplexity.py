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

The KL-divergence base file (pyllm's own format, an .npz) keeps, per scored token, the base
model's log-probabilities as llama.cpp's base file does: 16-bit steps over the 16 nats below the
row's most likely token (finer than float16 there), everything below that range summed exactly
into one "rest" bucket; plus, exactly, the log-probability of the actual next token and the
base's top-1 id, and the tokens, n_ctx and a hash of the vocabulary that a second run is checked
against. That is 2 bytes per vocabulary entry per token (0.5 GB for 20 chunks of 512 with a 49k
vocabulary). top_k keeps only the k most likely entries (ids stored), the rest in the bucket: a
far smaller file, but the KLD then omits the divergence within the bucket, which on SmolLM2 and
wikitext is ~12% of it at k = 256 (benchmarks/README.md).
"""

import hashlib
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass

import numpy as np
from pyllm.base import PyllmError

BASE_FORMAT = "pyllm-kld-base-1"
LOGP_RANGE = 16.0  # nats below a row's top log-prob that a base keeps (llama.cpp's cut)
STEPS = 65535  # codes 1..65535 span that range; code 0: below it, counted in the rest bucket


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


def top_k_logp(lp: np.ndarray, k: int) -> tuple:
    """Per row the k largest log-probs, largest first (ties: lower id first): (ids int32, values)."""
    ids = np.sort(np.argpartition(-lp, k - 1, axis=1)[:, :k], axis=1)
    vals = np.take_along_axis(lp, ids, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1).astype(np.int32), np.take_along_axis(vals, order, axis=1)


def bucket_logsumexp(lp: np.ndarray, ids, coded: np.ndarray) -> np.ndarray:
    """Per row log(sum of exp(lp) over the entries not coded): those outside ids (None: ids are
    0..vocab-1) or with code 0. -inf for an empty bucket."""
    in_bucket = ~coded if ids is None else np.ones(lp.shape, dtype=bool)
    if ids is not None:
        np.put_along_axis(in_bucket, ids.astype(np.int64), ~coded, axis=1)
    x = np.where(in_bucket, lp, -np.inf)
    top = x.max(axis=1)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(x - safe[:, None]).sum(axis=1)) + safe


@dataclass
class LogProbCodes:
    """A base's log-probabilities of some rows, coded (see the module docstring)."""

    ids: np.ndarray | None  # (rows, k) int32 when only the top k are kept; None: every id, in order
    codes: np.ndarray  # (rows, k) uint16: 0 below the range, else 1 + steps above `low`
    low: np.ndarray  # (rows,) float32: the log-prob of code 1
    step: np.ndarray  # (rows,) float32: log-prob per code step
    rest: np.ndarray  # (rows,) float32: log of the mass not coded (exact; -inf: none)

    @classmethod
    def encode(cls, lp: np.ndarray, top_k: int | None = None) -> "LogProbCodes":
        """Code float64 log-probs (rows, vocab), all of them or the top_k of each row."""
        ids, vals = (None, lp) if top_k is None or top_k >= lp.shape[1] else top_k_logp(lp, top_k)
        high = vals.max(axis=1)
        low64 = np.maximum(vals.min(axis=1), high - LOGP_RANGE)
        low = low64.astype(np.float32)
        low = np.where(low > low64, np.nextafter(low, np.float32(-np.inf)), low)  # rounded down: the bottom stays in
        step = ((high - low) / (STEPS - 1)).astype(np.float32)
        lo, st = low.astype(np.float64)[:, None], step.astype(np.float64)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            steps = np.where(st > 0, np.rint((vals - lo) / np.where(st > 0, st, 1.0)), 0.0)
        codes = np.where(vals >= lo, 1 + np.clip(steps, 0, STEPS - 1), 0).astype(np.uint16)
        rest = bucket_logsumexp(lp, ids, codes > 0).astype(np.float32)
        return cls(ids, codes, low, step, rest)

    def decode(self) -> tuple:
        """(log-probs (rows, k) in float64, coded mask); entries with code 0 hold no value."""
        lp = self.low.astype(np.float64)[:, None] + (self.codes.astype(np.float64) - 1) * self.step[:, None]
        return lp, self.codes > 0

    def rows(self, sel: slice) -> "LogProbCodes":
        ids = None if self.ids is None else self.ids[sel]
        return LogProbCodes(ids, self.codes[sel], self.low[sel], self.step[sel], self.rest[sel])


def perplexity(model, tokens, n_ctx: int, n_batch: int = 2048, n_chunks: int = -1, on_chunk=None,
               save_base: bool = False, top_k: int | None = None) -> tuple:
    """llama-perplexity's perplexity() over tokens (see the module docstring).

    on_chunk(i, running_ppl, eval_seconds) is called after each chunk (i from 1). save_base: also
    gather a KL-divergence base (every log-prob, or the top_k of each scored token).
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
    per = n_ctx - 1 - first
    nll, chunk_ppl, seconds, coded = [], [], 0.0, []
    for i in range(n_chunk):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
        t0 = time.perf_counter()
        logits = chunk_logits(model, chunk, n_batch)  # (n_ctx - 1 - first, vocab)
        seconds += time.perf_counter() - t0
        lp = log_softmax(logits)
        nll.append(-lp[np.arange(per), chunk[first + 1:]])
        if save_base:
            coded.append((LogProbCodes.encode(lp, top_k), lp.argmax(axis=1).astype(np.int32)))
        chunk_ppl.append(float(np.exp(np.concatenate(nll).mean())))
        if on_chunk is not None:
            on_chunk(i + 1, chunk_ppl[-1], seconds)
    result = PerplexityResult(n_ctx, n_chunk, np.concatenate(nll), chunk_ppl, seconds, n_chunk * n_ctx)
    kl_base = None
    if save_base:
        def cat(name):
            parts = [getattr(c, name) for c, _ in coded]
            return None if parts[0] is None else np.concatenate(parts)

        kl_base = KLBase(
            n_ctx=n_ctx, n_vocab=model.args.vocab_size, vocab_hash=vocab_hash(model.tokenizer),
            tokens=tokens[:n_chunk * n_ctx].copy(),
            logp=LogProbCodes(cat("ids"), cat("codes"), cat("low"), cat("step"), cat("rest")),
            tok_logp=(-result.nll).astype(np.float32), top1=np.concatenate([t for _, t in coded]),
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
    logp: LogProbCodes  # rows: the scored tokens, chunk after chunk
    tok_logp: np.ndarray  # (rows,) float32: log-prob of the actual next token
    top1: np.ndarray  # (rows,) int32: the most likely id (the first on ties)
    model: str = ""  # the base model's file name, for the record

    @property
    def n_chunks(self) -> int:
        return len(self.tokens) // self.n_ctx

    @property
    def rows_per_chunk(self) -> int:
        return self.n_ctx - 1 - self.n_ctx // 2

    @property
    def top_k(self) -> int:
        """Log-probs coded per token (n_vocab: all of them)."""
        return self.logp.codes.shape[1]

    def save(self, path) -> None:
        """Write to path atomically (a temporary file in the same folder, then a rename)."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        lp = self.logp
        arrays = dict(
            format=np.array(BASE_FORMAT), n_ctx=np.int64(self.n_ctx), n_vocab=np.int64(self.n_vocab),
            vocab_hash=np.array(self.vocab_hash), tokens=self.tokens, tok_logp=self.tok_logp, top1=self.top1,
            logp_ids=np.zeros((0, 0), np.int32) if lp.ids is None else lp.ids, logp_codes=lp.codes,
            logp_low=lp.low, logp_step=lp.step, logp_rest=lp.rest, model=np.array(self.model),
        )
        try:
            fd, tmp = tempfile.mkstemp(prefix=".kld-", suffix=".tmp", dir=folder)
        except OSError as e:
            raise PyllmError(f"cannot write {path}: {e.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the finished file is not
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
                ids = z["logp_ids"]
                logp = LogProbCodes(None if ids.size == 0 else ids, z["logp_codes"], z["logp_low"], z["logp_step"],
                                    z["logp_rest"])
                base = cls(
                    n_ctx=int(z["n_ctx"]), n_vocab=int(z["n_vocab"]), vocab_hash=str(z["vocab_hash"]),
                    tokens=z["tokens"], logp=logp, tok_logp=z["tok_logp"], top1=z["top1"], model=str(z["model"]),
                )
        except OSError as e:
            raise PyllmError(f"cannot read KL-divergence base {path}: {e.strerror or e}") from None
        except (KeyError, ValueError, zipfile.BadZipFile, EOFError):
            raise PyllmError(f"{path} is not a KL-divergence base (pyllm perplexity --kl-divergence-base)") from None
        rows, k, lp = base.n_chunks * base.rows_per_chunk, base.top_k, base.logp
        shapes_ok = (
            base.n_ctx >= 3 and len(base.tokens) % base.n_ctx == 0 and lp.codes.shape == (rows, k)
            and (lp.ids.shape == (rows, k) if lp.ids is not None else k == base.n_vocab)
            and all(a.shape == (rows,) for a in (lp.low, lp.step, lp.rest, base.tok_logp, base.top1))
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
    """(nll, nll_base, kld, p_diff, same_top) of these rows of the base against lp (float64).

    KLD = sum over the coded entries of p_base (log p_base - log q), plus the same term for the
    bucket of the rest (its mass under each model), as kl_divergence()'s log_softmax sums it.
    """
    part = base.logp.rows(rows)
    lp_base, coded = part.decode()  # (rows, k)
    lq = lp if part.ids is None else np.take_along_axis(lp, part.ids.astype(np.int64), axis=1)
    kld = np.where(coded, np.exp(lp_base) * (lp_base - lq), 0.0).sum(axis=1)
    rest = part.rest.astype(np.float64)
    has_rest = np.isfinite(rest)
    if has_rest.any():
        lq_rest = bucket_logsumexp(lp, part.ids, coded)
        with np.errstate(invalid="ignore"):  # rows without a bucket: 0 * -inf, discarded
            kld += np.where(has_rest, np.exp(rest) * (rest - lq_rest), 0.0)
    r = np.arange(len(targets))
    nll = -lp[r, targets]
    nll_base = -base.tok_logp[rows].astype(np.float64)
    p_diff = np.exp(-nll) - np.exp(-nll_base)
    same_top = lp.argmax(axis=1) == base.top1[rows]
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
