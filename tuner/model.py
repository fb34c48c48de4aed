"""LoRA on a frozen GGUF decoder: the training forward, the loss and the backward.

The base model is the runtime's (runtime/llama.py Model: ModelArgs, QTensor weights in the
memory map, RoPE tables); it is never modified and never decoded as a whole. Only the
LoRA matrices train: for a target weight W (n_out, n_in),

    y = x W^T + scale * (x' A^T) B^T,   A (r, n_in), B (n_out, r), scale = alpha / r,

x' being x under inverted dropout. A and B are stored in GGUF row order, so an adapter
trained here applies to the same GGUF in llama.cpp unchanged.

A step runs `forward_backward` on micro-batches: the forward keeps what each backward
needs (or, with grad_checkpoint, only each layer's input, and recomputes the layer during
the backward); the backward walks the layers in reverse through ops.py's hand-written
backward functions, adding d(summed loss)/dA and dB into `grads`. The caller divides by
the number of loss tokens of the whole step (all micro-batches, all ranks), so any split
of a global batch gives the same gradient.
"""

from dataclasses import dataclass

import numpy as np
from pyllm.base import PyllmError
from pyllm.kernels.grad import gather_rows, qmatmul, qmatmul_t
from pyllm.tuner import ops

# --targets short names -> the GGUF tensor each adapts, and the runtime Layer attribute.
TARGETS = {
    "q": ("attn_q", "wq"),
    "k": ("attn_k", "wk"),
    "v": ("attn_v", "wv"),
    "o": ("attn_output", "wo"),
    "gate": ("ffn_gate", "w_gate"),
    "up": ("ffn_up", "w_up"),
    "down": ("ffn_down", "w_down"),
}
_SLOT_IDS = {slot: i for i, slot in enumerate(TARGETS)}
HEAD_CHUNK = 512  # loss tokens per output-layer product: bounds the (tokens, vocab) logits


def parse_targets(text) -> tuple:
    """'q,k,v,o' (or a sequence of names) -> ('q', 'k', 'v', 'o'), checked and in a fixed order."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise PyllmError(f"--targets: unknown target {bad[0]!r}; choose from {','.join(TARGETS)}" if bad
                         else "--targets: no target given")
    return tuple(t for t in TARGETS if t in names)


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = ("q", "k", "v", "o")

    def __post_init__(self):
        if self.rank < 1:
            raise PyllmError(f"--rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise PyllmError(f"--dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraWeights:
    """Every A and B as a view into one flat vector, so the optimizer, the all-reduce and
    gradient clipping each see a single array. names: the adapted GGUF tensors, in order."""

    def __init__(self, shapes: dict, rank: int, dtype, flat: np.ndarray | None = None):
        self.shapes, self.rank = dict(shapes), rank  # name -> (n_out, n_in)
        self.names = list(shapes)
        size = sum(rank * (o + i) for o, i in shapes.values())
        self.flat = np.zeros(size, dtype=dtype) if flat is None else flat
        if self.flat.shape != (size,):
            raise ValueError(f"flat vector has {self.flat.size} values, the adapter needs {size}")
        self.a, self.b = {}, {}
        at = 0
        for name, (n_out, n_in) in shapes.items():
            self.a[name] = self.flat[at:at + rank * n_in].reshape(rank, n_in)  # (r, n_in)
            at += rank * n_in
            self.b[name] = self.flat[at:at + n_out * rank].reshape(n_out, rank)  # (n_out, r)
            at += n_out * rank

    def like(self, flat: np.ndarray | None = None) -> "LoraWeights":
        """The same layout over another vector (zeros by default): gradients, Adam moments."""
        return LoraWeights(self.shapes, self.rank, self.flat.dtype, flat)

    def init(self, rng: np.random.Generator):
        """PEFT's initialisation: A ~ U(-1/sqrt(n_in), 1/sqrt(n_in)) (kaiming_uniform with
        a = sqrt(5)), B = 0, so training starts from the base model exactly."""
        for name in self.names:
            n_in = self.shapes[name][1]
            bound = 1.0 / np.sqrt(n_in)
            self.a[name][...] = rng.uniform(-bound, bound, size=self.a[name].shape)
            self.b[name][...] = 0.0


class LoraModel:
    """A frozen runtime Model plus trainable LoRA weights.

    dtype: float32 (training) or float64 (gradient checks). bf16: every matrix product with
    bfloat16-rounded operands and float32 accumulation; the LoRA weights stay float32
    (master weights)."""

    def __init__(self, base, spec: LoraSpec, dtype=np.float32, bf16: bool = False, grad_checkpoint: bool = False,
                 seed: int = 0):
        if bf16 and dtype != np.float32:
            raise ValueError("bf16 mixed precision keeps float32 master weights")
        self.base, self.spec, self.args = base, spec, base.args
        self.dtype, self.bf16, self.grad_checkpoint = np.dtype(dtype), bf16, grad_checkpoint
        self.seed = seed
        self.mm = ops.bf16_matmul if bf16 else np.matmul
        a = self.args
        if a.num_attention_heads % a.num_key_value_heads:
            raise PyllmError("query heads must be a multiple of key/value heads")

        def cast(v):
            return None if v is None else np.asarray(v, dtype=self.dtype)

        self.norms = [(cast(L.attn_norm), cast(L.ffn_norm)) for L in base.layers]
        self.biases = [(cast(L.bq), cast(L.bk), cast(L.bv)) for L in base.layers]
        self.output_norm = cast(base.output_norm)
        self.cos, self.sin = cast(base.rope_cos), cast(base.rope_sin)  # (n_ctx, rope_dim/2)
        shapes = {}
        for i, L in enumerate(base.layers):
            for t in spec.targets:
                gguf_name, attr = TARGETS[t]
                shapes[f"blk.{i}.{gguf_name}.weight"] = getattr(L, attr).shape
        self.weights = LoraWeights(shapes, spec.rank, np.float32 if bf16 else self.dtype)
        self.grads = self.weights.like()
        self.input_grad = None  # d loss / d embeddings of the last backward, when asked for

    @property
    def max_len(self) -> int:
        return self.cos.shape[0]

    # -- the LoRA'd linear --------------------------------------------------------------

    def _dropout_keep(self, keys, step_key, li, slot, rows, n_in):
        """Inverted-dropout multipliers (B*rows, n_in), or None. Each sequence's mask comes
        from its own seed (seed, step, example index, layer, target): the same however the
        batch is split over micro-batches and ranks, and again when a layer is recomputed."""
        p = self.spec.dropout
        if p == 0.0 or step_key is None:
            return None
        keep = np.empty((len(keys) * rows, n_in), dtype=self.dtype)
        for j, key in enumerate(keys):
            rng = np.random.default_rng([self.seed, step_key, key, li, _SLOT_IDS[slot]])
            keep[j * rows:(j + 1) * rows] = (rng.random((rows, n_in)) >= p) / (1.0 - p)
        return keep

    def _linear(self, li, slot, w, x, bias, cache, ctx):
        name = f"blk.{li}.{w_name(slot)}.weight"
        y = qmatmul(w, x, self.bf16)  # (N, n_out)
        if bias is not None:
            y += bias
        if name in self.weights.a:
            keep = self._dropout_keep(ctx["keys"], ctx["step"], li, slot, ctx["rows"], x.shape[1])
            d, xa = ops.lora(x, self.weights.a[name], self.weights.b[name], self.spec.scale, keep, self.mm)
            y += d
            cache["lora_" + slot] = (xa, keep)
        return y

    def _linear_backward(self, li, slot, w, dy, x, cache, grads, need_dx=True):
        name = f"blk.{li}.{w_name(slot)}.weight"
        dx = qmatmul_t(w, dy, self.bf16) if need_dx else None
        if name in self.weights.a:
            xa, keep = cache["lora_" + slot]
            dxl, da, db = ops.lora_backward(dy, x, self.weights.a[name], self.weights.b[name], self.spec.scale,
                                            xa, keep, self.mm)
            grads.a[name] += da
            grads.b[name] += db
            if need_dx:
                dx += dxl
        return dx

    # -- one decoder layer ------------------------------------------------------------------

    def _layer(self, li, x, ctx):
        """x (B, T, D) -> the layer's output and what its backward needs."""
        a, L = self.args, self.base.layers[li]
        nb, T, D = x.shape
        H, KV, hd = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        attn_norm, ffn_norm = self.norms[li]
        bq, bk, bv = self.biases[li]
        c = {}
        xf = x.reshape(-1, D)  # (N, D)
        h1, r1 = ops.rmsnorm(xf, attn_norm, a.rms_norm_eps)
        q = self._linear(li, "q", L.wq, h1, bq, c, ctx).reshape(nb, T, H, hd)
        k = self._linear(li, "k", L.wk, h1, bk, c, ctx).reshape(nb, T, KV, hd)
        v = self._linear(li, "v", L.wv, h1, bv, c, ctx).reshape(nb, T, KV, hd)
        cos, sin = self.cos[:T], self.sin[:T]
        q = ops.rope(q, cos, sin, a.rope_neox)
        k = ops.rope(k, cos, sin, a.rope_neox)
        att, p = ops.attention(q, k, v, self.mm)  # (B, T, H*hd)
        att = att.reshape(-1, H * hd)
        x2 = xf + self._linear(li, "o", L.wo, att, None, c, ctx)
        h2, r2 = ops.rmsnorm(x2, ffn_norm, a.rms_norm_eps)
        g = self._linear(li, "gate", L.w_gate, h2, None, c, ctx)  # (N, F)
        u = self._linear(li, "up", L.w_up, h2, None, c, ctx)
        act = ops.swiglu(g, u)
        x3 = x2 + self._linear(li, "down", L.w_down, act, None, c, ctx)
        c.update(x=xf, h1=h1, r1=r1, q=q, k=k, v=v, p=p, att=att, x2=x2, h2=h2, r2=r2, g=g, u=u, act=act)
        return x3.reshape(nb, T, D), c

    def _layer_backward(self, li, dx3, c, need_dx, grads):
        """d layer output (N, D) -> d layer input (N, D) (None when not needed); LoRA grads added."""
        a, L = self.args, self.base.layers[li]
        nb, T, H, hd = c["q"].shape
        attn_norm, ffn_norm = self.norms[li]
        dact = self._linear_backward(li, "down", L.w_down, dx3, c["act"], c, grads)
        dg, du = ops.swiglu_backward(dact, c["g"], c["u"])
        dh2 = self._linear_backward(li, "gate", L.w_gate, dg, c["h2"], c, grads)
        dh2 += self._linear_backward(li, "up", L.w_up, du, c["h2"], c, grads)
        dx2 = dx3 + ops.rmsnorm_backward(dh2, c["x2"], ffn_norm, c["r2"])
        datt = self._linear_backward(li, "o", L.wo, dx2, c["att"], c, grads)
        dq, dk, dv = ops.attention_backward(datt, c["q"], c["k"], c["v"], c["p"], self.mm)
        cos, sin = self.cos[:T], self.sin[:T]
        dq = ops.rope_backward(dq, cos, sin, a.rope_neox).reshape(nb * T, -1)
        dk = ops.rope_backward(dk, cos, sin, a.rope_neox).reshape(nb * T, -1)
        dv = dv.reshape(nb * T, -1)
        dh1 = self._linear_backward(li, "q", L.wq, dq, c["h1"], c, grads, need_dx)
        dh1_k = self._linear_backward(li, "k", L.wk, dk, c["h1"], c, grads, need_dx)
        dh1_v = self._linear_backward(li, "v", L.wv, dv, c["h1"], c, grads, need_dx)
        if not need_dx:
            return None
        dh1 += dh1_k
        dh1 += dh1_v
        return dx2 + ops.rmsnorm_backward(dh1, c["x"], attn_norm, c["r1"])

    # -- the output layer and the loss ------------------------------------------------------

    def _head(self, x, batch, grad: bool):
        """Summed cross-entropy over the batch's loss tokens, and d loss / d x (N, D).

        Only loss tokens go through the output layer (prompt and padding positions never
        need logits), HEAD_CHUNK of them at a time."""
        D = x.shape[-1]
        xf = x.reshape(-1, D)
        rows = np.flatnonzero(batch.mask.reshape(-1))
        targets = batch.targets.reshape(-1)[rows]
        h, r = ops.rmsnorm(xf[rows], self.output_norm, self.args.rms_norm_eps)
        dh = np.empty_like(h) if grad else None
        loss = 0.0
        for c0 in range(0, len(rows), HEAD_CHUNK):
            c1 = min(len(rows), c0 + HEAD_CHUNK)
            logits = qmatmul(self.base.output, h[c0:c1], self.bf16)  # (chunk, vocab)
            part, dlogits = ops.cross_entropy(logits, targets[c0:c1])
            loss += part
            if grad:
                dh[c0:c1] = qmatmul_t(self.base.output, dlogits, self.bf16)
        if not grad:
            return loss, None
        dx = np.zeros_like(xf)
        dx[rows] = ops.rmsnorm_backward(dh, xf[rows], self.output_norm, r)
        return loss, dx

    # -- whole passes -------------------------------------------------------------------

    def _embed(self, batch):
        nb, T = batch.inputs.shape
        if T > self.max_len:
            raise PyllmError(f"sequence of {T} positions exceeds the model's {self.max_len}")
        return gather_rows(self.base.token_embd, batch.inputs, self.dtype).reshape(nb, T, -1)

    def _ctx(self, batch, step_key):
        return {"keys": list(batch.keys), "step": step_key, "rows": batch.inputs.shape[1]}

    def loss(self, batch) -> float:
        """Summed loss of a batch, no dropout, no gradients (validation)."""
        x = self._embed(batch)
        ctx = self._ctx(batch, None)
        for li in range(len(self.base.layers)):
            x, _ = self._layer(li, x, ctx)
        return self._head(x, batch, grad=False)[0]

    def forward_backward(self, batch, step_key: int = 0, need_input_grad: bool = False, grads=None) -> float:
        """Summed loss of a batch; d(summed loss)/d LoRA weights added into grads
        (default self.grads).

        step_key seeds the dropout masks (the optimizer step); need_input_grad also keeps
        d loss / d embeddings in self.input_grad (B, T, D) for the gradient checks."""
        grads = self.grads if grads is None else grads
        x = self._embed(batch)
        ctx = self._ctx(batch, step_key)
        saved = []
        for li in range(len(self.base.layers)):
            x_in = x
            x, cache = self._layer(li, x, ctx)
            saved.append(x_in if self.grad_checkpoint else cache)
        loss, dx = self._head(x, batch, grad=True)
        del x
        for li in reversed(range(len(self.base.layers))):
            cache = self._layer(li, saved[li], ctx)[1] if self.grad_checkpoint else saved[li]
            saved[li] = None  # free this layer's activations as soon as its backward is done
            dx = self._layer_backward(li, dx, cache, li > 0 or need_input_grad, grads)
        self.input_grad = dx.reshape(batch.inputs.shape + (-1,)) if need_input_grad else None
        return loss

    # -- one batch over several threads ------------------------------------------------------
    # On a few cores, sharing a batch's sequences among threads (each with one BLAS thread)
    # beats one batch on multi-threaded BLAS: every op runs in parallel, not only the
    # products (numpy's products and ufuncs and the trainer's Numba kernels release the
    # GIL), and no thread waits at a BLAS barrier. Each shard decodes the weights itself.
    # The result is the same up to float32 rounding (shards' gradients add in a fixed order).

    def _on_threads(self, batch, workers: int, run) -> list:
        """[run(shard, i) for each shard of batch], shard i on thread i."""
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        shards = batch.split(workers)
        if len(shards) == 1:
            return [run(batch, 0)]
        if getattr(self, "_pool", None) is None or self._pool._max_workers < len(shards):
            self._pool = ThreadPoolExecutor(len(shards), thread_name_prefix="pyllm-tuner")
        with threadpool_limits(1, "blas"):
            jobs = [self._pool.submit(run, s, i) for i, s in enumerate(shards)]
            return [j.result() for j in jobs]

    def forward_backward_threads(self, batch, step_key: int, workers: int) -> float:
        """forward_backward with the batch's sequences shared among `workers` threads."""
        if len(batch.keys) == 1 or workers == 1:
            return self.forward_backward(batch, step_key)
        if len(getattr(self, "_shard_grads", ())) < workers:
            self._shard_grads = [self.weights.like() for _ in range(workers)]
        for g in self._shard_grads:
            g.flat[...] = 0.0
        losses = self._on_threads(batch, workers,
                                  lambda s, i: self.forward_backward(s, step_key, False, self._shard_grads[i]))
        for g in self._shard_grads[:len(losses)]:
            self.grads.flat += g.flat
        return float(sum(losses))

    def loss_threads(self, batch, workers: int) -> float:
        """loss() with the batch's sequences shared among `workers` threads."""
        return float(sum(self._on_threads(batch, workers, lambda s, i: self.loss(s))))


def w_name(slot: str) -> str:
    """GGUF name of a target slot: 'q' -> 'attn_q'."""
    return TARGETS[slot][0]
