"""The compiled forward pass of a Llama-family decoder: one call into Numba per batch of tokens.

Decoding a token runs every layer inside one compiled function (`forward`), so Python is
crossed once per token, and nothing is allocated per token: all scratch is preallocated
(Scratch) for up to `max_batch` tokens. Inside, the work is split over the threads in two
parallel kernels only:

- linears: every product of a layer step, as a list of jobs (matrix, first row, last row).
  Products that read the same input run in one parallel region (q, k, v; gate, up), and
  each job calls its matrix's block-type kernel through dispatch.mm_any, compiled for
  just the model's set of types (Q4_K_M mixes Q4_K, Q6_K, Q5_0, Q8_0 ...).
- attention (kernels/ops.py): one job per (token pair, kv head): each K and V row is read
  once for all the query heads of its group (GQA), with the scores in per-thread scratch.

Norms, rope, the SwiGLU and the activation quantization are serial: for one token they are
a few microseconds.

Per layer and token: rmsnorm -> quantize -> [q k v] -> rope, store K/V -> attention ->
quantize -> [o] (+ residual) -> rmsnorm -> quantize -> [gate up] -> silu(gate) * up ->
quantize -> [down] (+ residual). LoRA adapters add s * B (A x) to a product's output right
after its `linears` call, from the same input in float32 (Decoder.set_lora; serial: for a
rank-8 adapter that is ~1% of a token's work).

The K/V cache has one of the types of kernels/kvcache.py (f32, f16, q8_0, q4_0, fp8_e4m3), a compile-time
constant of the step like the weight types: kvcache.store_kv writes it, attention reads it
through kvcache's typed kernels (float32 caches through ops._kv_dot and ops._kv_axpy).
Block-quantized caches are rotated as llama.cpp's are (kvcache.rotation): q and k by a
Walsh-Hadamard matrix after rope, v before it is stored and the attention output after.
"""

import copy
import functools
import os
from collections import namedtuple
from pathlib import Path

import numba
import numpy as np
from numba import literally, njit, prange
from numba.typed import List
from pyllm.kernels import kvcache, ops
from pyllm.kernels.act import new_act, quantize_act
from pyllm.kernels.blocks import act_forms, block_type, type_mask
from pyllm.kernels.cpu import ISA_NAMES, PORTABLE, best_isa
from pyllm.kernels.dispatch import SOURCE_STAMP, decode_row_any, mm_any
from pyllm.kernels.quants import F16_TABLE, QTensor

SLOTS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # the products of one layer
GGUF_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")  # their tensors
Q, K, V, OUT, GATE, UP, DOWN = range(7)
REGIONS = ((Q, K, V), (OUT,), (GATE, UP), (DOWN,))  # products that share an input run together
JOB_ROWS = 16  # rows per parallel job (llama.cpp's chunk)
MAX_BATCH = 256  # tokens per call; longer prompts are evaluated in batches of this many

Plan = namedtuple("Plan", "W meta jobs regions emb emb_qt norms out_norm bias dims eps cos sin f16 lora lora_a lora_b")
Scratch = namedtuple("Scratch", "x h y attn ff act scores acc qq")


# -- small pieces -----------------------------------------------------------------------------


@njit(cache=True)
def _add_bias(y, n, col, bias, off, width):
    if off < 0:
        return
    for t in range(n):
        for j in range(width):
            y[t, col + j] += bias[off + j]


@njit(cache=True, fastmath=True)
def _residual(x, y, n, col, width):
    """x[t] += y[t, col:col + width]."""
    for t in range(n):
        for j in range(width):
            x[t, j] += y[t, col + j]


@njit(cache=True, fastmath=True)
def _add_lora(P, m, x, n, y):
    """y[t, col:col + rows] += B (A x[t]) for matrix m's adapters (P.lora[m] = rank, offset of
    A (rank, cols) in P.lora_a, offset of B (rows, rank) in P.lora_b, scales folded into B)."""
    r = P.lora[m, 0]
    if r == 0:
        return
    rows, cols, col = P.meta[m, 1], P.meta[m, 2], P.meta[m, 3]
    a = P.lora_a[P.lora[m, 1]:P.lora[m, 1] + r * cols].reshape((r, cols))  # (rank, cols)
    b = P.lora_b[P.lora[m, 2]:P.lora[m, 2] + rows * r].reshape((rows, r))  # (rows, rank)
    xa = np.empty(r, np.float32)  # (rank,)
    for t in range(n):
        for k in range(r):
            s = np.float32(0.0)
            for j in range(cols):
                s += a[k, j] * x[t, j]
            xa[k] = s
        for i in range(rows):
            s = np.float32(0.0)
            for k in range(r):
                s += b[i, k] * xa[k]
            y[t, col + i] += s


# -- the step ---------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def _linears(mask, isa, W, meta, jobs, j0, j1, act, n, out):
    """Jobs j0..j1 over the threads: out[:n, meta column + rows] = act[:n] @ W[m][rows].T.
    mask (the model's block types) and isa are compile-time constants (literally)."""
    literally(mask)
    literally(isa)
    for j in prange(j0, j1):
        m = jobs[j, 0]
        mm_any(mask, isa, meta[m, 0], W[m], jobs[j, 1], jobs[j, 2], act, 0, n, out, meta[m, 3])


@njit(cache=True)
def _quantize_rows(forms, x, n, cols, act, f16):
    literally(forms)
    for t in range(n):
        quantize_act(x[t], act, t, cols, forms, f16)


# For profiles only (benchmarks/profile_step.py): steps that leave out a part of the work.
SKIP_PRODUCTS, SKIP_ATTENTION, SKIP_OTHER = 1, 2, 4


@functools.cache
def _compiled(mask: int, forms: int, isa: int, emb_mask: int, ops_isa: int, kt: int, vt: int, rotate: bool,
              lora: bool, skip: int = 0):
    """forward() for one set of weight types (bit mask), activation forms and kernel levels
    (isa for the products, ops_isa for attention and the SwiGLU, which need head_dim and
    feed_forward_length multiples of 8 above PORTABLE) and K/V cache types (kt, vt: codes of
    kernels/kvcache.py): a closure over these integers only,
    so Numba caches one compiled step per such set. rotate (any cache rotated, kvcache.rotation)
    and lora (any adapter set) are constants too: a step without them does not compile their
    code (Numba prunes a branch on a constant; ~1.5 s and ~2 s of a first compile). skip (0 but
    in profiles) leaves out parts of the work: SKIP_PRODUCTS etc."""
    stamp = SOURCE_STAMP  # a free variable: a changed kernel file is a new cache key
    products, attention, other = not skip & SKIP_PRODUCTS, not skip & SKIP_ATTENTION, not skip & SKIP_OTHER

    # Cached like every kernel. Note: the step loaded from Numba's cache rounds differently from
    # the same step compiled in the process (stories260K F32: logits differ by ~5e-7 relative),
    # and the int8 activations amplify that over 30 layers (SmolLM2 Q4_1: per-position cosine
    # down to 0.98 between the two, as a 1e-6 relative change of the norm weights gives 0.996);
    # both are valid evaluations. Cause of the rounding difference not found.
    @njit(cache=True)
    def forward(ids, start, P, S, kc, vc, logits, mode):
        if stamp < 0:
            return
        n = ids.shape[0]
        n_layers, hidden, n_heads, n_kv, head_dim, rope_dim, neox, ff = (
            P.dims[0], P.dims[1], P.dims[2], P.dims[3], P.dims[4], P.dims[5], P.dims[6], P.dims[7])
        rot_k, rot_v = P.dims[8], P.dims[9]  # Walsh-Hadamard sizes of quantized caches (0: none)
        qd, kvd = n_heads * head_dim, n_kv * head_dim
        meta, y, x, h, act, f16 = P.meta, S.y, S.x, S.h, S.act, P.f16
        for t in range(n):
            decode_row_any(emb_mask, P.emb_qt, P.emb[ids[t]], hidden, f16, x[t])
        for li in range(n_layers):
            base, R = 7 * li, P.regions[li]  # R[r] = (first job, end) of region r
            qc, kc_, vc_ = meta[base + Q, 3], meta[base + K, 3], meta[base + V, 3]
            # attention block: x += Wo attention(rope(Wq h), rope(Wk h), Wv h), h = rmsnorm(x)
            if other:
                ops.rmsnorm(x[:n], P.norms[li, 0], P.eps, h[:n])
                _quantize_rows(forms, h, n, hidden, act, f16)
            if products:
                _linears(mask, isa, P.W, meta, P.jobs, R[0, 0], R[0, 1], act, n, y)
            for s in range(3):
                if lora:
                    _add_lora(P, base + s, h, n, y)
                _add_bias(y, n, meta[base + s, 3], P.bias, meta[base + s, 4], meta[base + s, 1])
            if other:
                ops.rope(y[:n, qc:qc + qd], n_heads, head_dim, rope_dim, start, P.cos, P.sin, neox)
                ops.rope(y[:n, kc_:kc_ + kvd], n_kv, head_dim, rope_dim, start, P.cos, P.sin, neox)
                if rotate and rot_k:  # q.k is unchanged: H is orthonormal
                    ops.hadamard(y[:n, qc:qc + qd], n, qd, rot_k)
                    ops.hadamard(y[:n, kc_:kc_ + kvd], n, kvd, rot_k)
                if rotate and rot_v:
                    ops.hadamard(y[:n, vc_:vc_ + kvd], n, kvd, rot_v)
                kvcache.store_kv(kt, vt, y[:n, kc_:kc_ + kvd], y[:n, vc_:vc_ + kvd], kc[li], vc[li], start, f16)
            if attention:
                ops.attention_kv_at(ops_isa, kt, vt, y, qc, n, kc[li], vc[li], start, S.scores, S.acc, S.qq, f16,
                                 S.attn)
            if other:
                if rotate and rot_v:  # the output is a sum of rotated values: H H = I undoes it
                    ops.hadamard(S.attn, n, qd, rot_v)
                _quantize_rows(forms, S.attn, n, qd, act, f16)
            if products:
                _linears(mask, isa, P.W, meta, P.jobs, R[1, 0], R[1, 1], act, n, y)
            if lora:
                _add_lora(P, base + OUT, S.attn, n, y)
            _add_bias(y, n, meta[base + OUT, 3], P.bias, meta[base + OUT, 4], hidden)
            _residual(x, y, n, meta[base + OUT, 3], hidden)
            # feed-forward block: x += W_down (silu(W_gate h) * W_up h), h = rmsnorm(x)
            if other:
                ops.rmsnorm(x[:n], P.norms[li, 1], P.eps, h[:n])
                _quantize_rows(forms, h, n, hidden, act, f16)
            if products:
                _linears(mask, isa, P.W, meta, P.jobs, R[2, 0], R[2, 1], act, n, y)
            if lora:
                _add_lora(P, base + GATE, h, n, y)
                _add_lora(P, base + UP, h, n, y)
            _add_bias(y, n, meta[base + GATE, 3], P.bias, meta[base + GATE, 4], ff)
            _add_bias(y, n, meta[base + UP, 3], P.bias, meta[base + UP, 4], ff)
            if other:
                ops.silu_mul_at(ops_isa, y, n, meta[base + GATE, 3], meta[base + UP, 3], ff, S.ff)
                _quantize_rows(forms, S.ff, n, ff, act, f16)
            if products:
                _linears(mask, isa, P.W, meta, P.jobs, R[3, 0], R[3, 1], act, n, y)
            if lora:
                _add_lora(P, base + DOWN, S.ff, n, y)
            _add_bias(y, n, meta[base + DOWN, 3], P.bias, meta[base + DOWN, 4], hidden)
            _residual(x, y, n, meta[base + DOWN, 3], hidden)
        # output (mode 0: none, 1: the last token's logits, 2: every token's)
        if mode == 0:
            return
        first = n - 1 if mode == 1 else 0
        if other:
            ops.rmsnorm(x[first:n], P.out_norm, P.eps, h[:n - first])
            _quantize_rows(forms, h, n - first, hidden, act, f16)
        if products:
            j0, j1 = P.regions[n_layers, 0, 0], P.regions[n_layers, 0, 1]
            _linears(mask, isa, P.W, meta, P.jobs, j0, j1, act, n - first, logits)
        if lora:
            _add_lora(P, 7 * n_layers, h, n - first, logits)

    return forward


# -- packing a model for the step -------------------------------------------------------------


# The typed List of weights is made and grown in compiled code, which Numba caches: typed.List's
# own Python-side methods (empty_list, append) are compiled anew in every process (measured
# ~0.6-1.3 s of each warm start).
@njit(cache=True)
def _list_of(a):
    out = List()
    out.append(a)
    return out


@njit(cache=True)
def _append(items, a):
    items.append(a)
    return items


def _file_stamp() -> str:
    """This file's mtime and size: what Numba's cache index of the step (defined here) checks."""
    st = os.stat(__file__)
    return f"{st.st_mtime} {st.st_size}"


def _readonly(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


class Decoder:
    """A model's weights packed for the compiled step, its scratch, and the step itself.

    layers: per layer a dict with QTensors wq wk wv wo w_gate w_up w_down, float32 vectors
    attn_norm and ffn_norm, and optional biases bq bk bv bo (None or absent: no bias).
    k_cache, v_cache: caches made by kernels/kvcache.py new_cache (float32 (layers, n_kv, n_ctx,
    head_dim) for f32, uint8 rows of the type's blocks otherwise), owned by the caller.
    """

    def __init__(self, *, token_embd: QTensor, layers: list, output_norm, output: QTensor, eps: float,
                 n_heads: int, n_kv: int, head_dim: int, rope_dim: int, neox: bool, cos, sin,
                 k_cache, v_cache, isa: int | None = None, skip: int = 0):
        hidden = token_embd.cols
        ff = layers[0]["w_gate"].rows
        qd, kvd = n_heads * head_dim, n_kv * head_dim
        mats, biases = [], []
        for L in layers:
            biases += [L.get("bq"), L.get("bk"), L.get("bv"), L.get("bo"), None, None, None]
            mats += [L[s] for s in SLOTS]
        mats.append(output)
        biases.append(None)
        # output columns of each product in the shared buffer y: [q | k | v | o | gate | up | down]
        cols = [0, qd, qd + kvd, qd + 2 * kvd, qd + 2 * kvd + hidden, qd + 2 * kvd + hidden + ff,
                qd + 2 * kvd + hidden + 2 * ff]
        self.y_cols = cols[-1] + hidden
        self.isa = best_isa() if isa is None else isa
        meta = np.zeros((len(mats), 5), np.int64)  # qtype, rows, cols, output column, bias offset
        bias_parts, at = [], 0
        for i, (m, b) in enumerate(zip(mats, biases)):
            layout = block_type(m.qtype).layout(m.rows, self.isa)  # repacked into it by pack()
            meta[i, :3] = int(m.qtype) if layout is None else layout, m.rows, m.cols
            meta[i, 3] = cols[i % 7] if i < len(mats) - 1 else 0
            meta[i, 4] = -1
            if b is not None:
                meta[i, 4] = at
                bias_parts.append(np.asarray(b, np.float32).reshape(-1))
                at += bias_parts[-1].size
        jobs, regions = [], np.zeros((len(layers) + 1, 4, 2), np.int64)
        for li in range(len(layers)):
            for ri, slots in enumerate(REGIONS):
                regions[li, ri, 0] = len(jobs)
                for s in slots:
                    m = 7 * li + s
                    jobs += [(m, r, min(r + JOB_ROWS, mats[m].rows)) for r in range(0, mats[m].rows, JOB_ROWS)]
                regions[li, ri, 1] = len(jobs)
        m = len(mats) - 1
        regions[len(layers), 0, 0] = len(jobs)
        jobs += [(m, r, min(r + 4 * JOB_ROWS, output.rows)) for r in range(0, output.rows, 4 * JOB_ROWS)]
        regions[len(layers), 0, 1] = len(jobs)
        self.qtypes = sorted({int(q) for q in meta[:, 0]})
        self._mats = mats  # until pack()
        self.plan = Plan(
            W=None, meta=meta, jobs=np.array(jobs, np.int64), regions=regions,
            emb=_readonly(token_embd.data), emb_qt=int(token_embd.qtype),
            norms=np.stack([np.stack([L["attn_norm"], L["ffn_norm"]]) for L in layers]).astype(np.float32),
            out_norm=np.asarray(output_norm, np.float32), bias=np.concatenate(bias_parts or [np.zeros(1, np.float32)]),
            dims=np.array([len(layers), hidden, n_heads, n_kv, head_dim, rope_dim, int(neox), ff,
                           kvcache.rotation(kvcache.cache_type(k_cache, head_dim), head_dim, "K"),
                           kvcache.rotation(kvcache.cache_type(v_cache, head_dim), head_dim, "V")], np.int64),
            eps=np.float32(eps), cos=cos, sin=sin, f16=F16_TABLE,
            lora=np.zeros((len(mats), 3), np.int64), lora_a=np.zeros(1, np.float32), lora_b=np.zeros(1, np.float32),
        )
        self.n_layers = len(layers)
        self.k_cache, self.v_cache = k_cache, v_cache
        self.vocab = output.rows
        ops_isa = self.isa if head_dim % 8 == 0 and ff % 8 == 0 else PORTABLE
        self.type_k = kvcache.cache_type(k_cache, head_dim)
        self.type_v = kvcache.cache_type(v_cache, head_dim)
        rotate = bool(self.plan.dims[8] or self.plan.dims[9])
        self._key = (type_mask(self.qtypes), act_forms(self.qtypes), self.isa, type_mask([token_embd.qtype]), ops_isa,
                     self.type_k.code, self.type_v.code, rotate)
        self._skip = skip
        self.step = _compiled(*self._key, False, skip)
        self._scratch = None
        self._batch = 0

    def pack(self):
        """Hand the weights to the step, each repacked into its layout (meta) where it has one:
        one pass over the weights, their first read from the map (~0.1-0.7 s for SmolLM2). Done
        once, by compile() or the first call, so that building a Decoder touches no weights."""
        if self.plan.W is not None:
            return
        W = None
        for i, m in enumerate(self._mats):
            data = np.ascontiguousarray(m.data)
            if self.plan.meta[i, 0] != int(m.qtype):
                data = block_type(m.qtype).repacked(data, self.isa)[1]
            W = _list_of(_readonly(data)) if W is None else _append(W, _readonly(data))
        self.plan = self.plan._replace(W=W)
        self._mats = None

    def set_lora(self, deltas: dict):
        """LoRA adapters {base tensor name ("blk.3.attn_q.weight", "output.weight"): [(A (rank, cols),
        B (rows, rank), scale), ...]} ({} for none): several on one matrix become one of the
        summed rank, each scale folded into its B."""
        index = {f"blk.{li}.{g}.weight": 7 * li + s for li in range(self.n_layers) for s, g in enumerate(GGUF_NAMES)}
        index["output.weight"] = 7 * self.n_layers
        table = np.zeros_like(self.plan.lora)
        a_parts, b_parts, at_a, at_b = [np.zeros(1, np.float32)], [np.zeros(1, np.float32)], 1, 1
        for name, items in deltas.items():
            m = index.get(name)
            if m is None:
                raise ValueError(f"no product named {name} in this model")
            if not items:
                continue
            rows, cols = self.plan.meta[m, 1], self.plan.meta[m, 2]
            a = np.concatenate([np.asarray(A, np.float32).reshape(-1, cols) for A, _, _ in items])  # (rank, cols)
            b = np.concatenate([np.asarray(B, np.float32).reshape(rows, -1) * np.float32(s)
                                for _, B, s in items], axis=1)  # (rows, rank)
            table[m] = a.shape[0], at_a, at_b
            a_parts.append(a.reshape(-1))
            b_parts.append(np.ascontiguousarray(b).reshape(-1))
            at_a, at_b = at_a + a.size, at_b + b.size
        self.plan = self.plan._replace(lora=table, lora_a=np.concatenate(a_parts), lora_b=np.concatenate(b_parts))
        self.step = _compiled(*self._key, bool(table[:, 0].any()), self._skip)

    def without(self, skip: int) -> "Decoder":
        """The same packed model and caches with a step that leaves out parts of the work
        (SKIP_PRODUCTS, SKIP_ATTENTION, SKIP_OTHER): for profiles only."""
        self.pack()
        d = copy.copy(self)
        d._skip = skip
        d.step = _compiled(*self._key, bool(self.plan.lora[:, 0].any()), skip)
        return d

    @property
    def kernels(self) -> str:
        """The weight types and kernel level, e.g. 'Q4_0, Q8_0 (avx2)'."""
        return f"{', '.join(block_type(q).name for q in self.qtypes)} ({ISA_NAMES[self.isa]})"

    def scratch(self, n: int) -> Scratch:
        """Scratch for batches of up to n tokens, grown (never shrunk) as needed."""
        if n > self._batch:
            p = self.plan
            hidden, n_heads, n_kv, head_dim, ff = (int(p.dims[1]), int(p.dims[2]), int(p.dims[3]),
                                                   int(p.dims[4]), int(p.dims[7]))
            group, n_ctx, threads = n_heads // n_kv, self.k_cache.shape[2], numba.config.NUMBA_NUM_THREADS
            widest = max(hidden, n_heads * head_dim, ff)
            self._scratch = Scratch(
                x=np.zeros((n, hidden), np.float32), h=np.zeros((n, hidden), np.float32),
                y=np.zeros((n, self.y_cols), np.float32), attn=np.zeros((n, n_heads * head_dim), np.float32),
                ff=np.zeros((n, ff), np.float32), act=new_act(n, -(-widest // 256) * 256),
                scores=np.zeros((threads, group, n_ctx), np.float32),
                acc=np.zeros((threads, group, head_dim), np.float32),
                qq=np.zeros((threads, group, max(kvcache.row_bytes("q8_0", head_dim), 34)), np.uint8),
            )
            self._batch = n
        return self._scratch

    def __call__(self, ids: np.ndarray, start: int, all_logits: bool) -> np.ndarray:
        """Run ids (int64) at positions start.. ; logits (len(ids) or 1, vocab)."""
        self.pack()
        n = len(ids)
        out = np.empty((n if all_logits else 1, self.vocab), np.float32)
        for b in range(0, n, MAX_BATCH):
            chunk = ids[b:b + MAX_BATCH]
            mode = 2 if all_logits else (1 if b + MAX_BATCH >= n else 0)
            target = out[b:b + len(chunk)] if all_logits else out
            self.step(chunk, start + b, self.plan, self.scratch(len(chunk)), self.k_cache, self.v_cache, target, mode)
        return out

    @property
    def cached(self) -> bool:
        """Whether this step is in Numba's cache (for these sources), so that compile() only
        loads it. Numba has no public way to ask: the first compile leaves a marker beside its
        cache, holding what Numba's index of the step checks (this file's mtime and size: a
        touched file is compiled again). Where it cannot be written, every start is a first run."""
        try:
            return self._marker().read_text() == _file_stamp()
        except OSError:
            return False

    def _marker(self) -> Path:
        key = (*self._key, bool(self.plan.lora[:, 0].any()), self._skip)
        return Path(numba.config.CACHE_DIR) / "steps" / ("forward-" + "-".join(str(int(k)) for k in key))

    def compile(self, progress=None):
        """Pack the weights and compile the step (or load it from Numba's cache) by running one
        token at position 0. progress(message) is called first when the step is not cached
        (first run only: the compile takes 20-60 s)."""
        if progress is not None and not self.cached:
            progress(f"compiling kernels for {self.kernels}, first run only")
        self(np.zeros(1, np.int64), 0, False)
        marker = self._marker()
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(_file_stamp())
        except OSError:
            pass
