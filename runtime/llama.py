"""The Llama-family decoder (llama, Llama-3, SmolLM, TinyLlama, llama2.c, mistral, qwen2).

Weights stay as raw GGUF blocks in the memory map; every product reads them directly.
The KV cache is preallocated for n_ctx positions. The network itself runs in one compiled
call per batch of tokens (kernels/forward.py: the prompt in batches, then each new token
alone), with activations quantized to int8 for the products as llama.cpp does.
"""

from dataclasses import dataclass, field

import numpy as np
from pyllm.base import PyllmError
from pyllm.kernels import ops
from pyllm.kernels.forward import Decoder
from pyllm.kernels.quants import QTensor
from pyllm.runtime.gguf_file import GGUFFile

ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass
class ModelArgs:
    """Hyper-parameters, named as in the Hugging Face config."""

    model_type: str  # GGUF general.architecture
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_dim: int = 0  # dims of each head that are rotated (= head_dim for these models)
    rope_neox: bool = False  # rotate (i, i+d/2) pairs instead of (2i, 2i+1)
    rope_linear_scale: float = 1.0  # positions are multiplied by this (linear rope scaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> "ModelArgs":
        meta = gguf.metadata
        arch = meta.get("general.architecture")
        if arch is None:
            raise PyllmError(f"{gguf.path}: missing required key general.architecture")
        if arch not in ARCHITECTURES:
            raise PyllmError(f"{gguf.path}: unsupported architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")

        def key(name, default=None):
            value = meta.get(f"{arch}.{name}", default)
            if value is None:
                raise PyllmError(f"{gguf.path}: missing required key {arch}.{name}")
            return value

        n_heads = int(key("attention.head_count"))
        hidden = int(key("embedding_length"))
        head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // n_heads))
        embd = gguf.tensors.get("token_embd.weight")
        if embd is None:
            raise PyllmError(f"{gguf.path}: missing tensor token_embd.weight")
        scale = 1.0
        if meta.get(f"{arch}.rope.scaling.type") == "linear":
            scale = 1.0 / float(meta.get(f"{arch}.rope.scaling.factor", 1.0))
        return cls(
            model_type=arch,
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_hidden_layers=int(key("block_count")),
            num_attention_heads=n_heads,
            num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            vocab_size=int(embd.dims[1]),
            max_position_embeddings=int(key("context_length")),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_dim=int(meta.get(f"{arch}.rope.dimension_count", head_dim)),
            # llama.cpp: qwen2 uses NEOX rope; llama/mistral GGUFs have permuted Q/K for "normal" rope.
            rope_neox=arch == "qwen2",
            rope_linear_scale=scale,
            tie_word_embeddings="output.weight" not in gguf.tensors,
            attention_bias="blk.0.attn_q.bias" in gguf.tensors,
        )


@dataclass
class Layer:
    attn_norm: np.ndarray  # (hidden,)
    wq: QTensor  # (n_heads*head_dim, hidden)
    wk: QTensor  # (n_kv*head_dim, hidden)
    wv: QTensor  # (n_kv*head_dim, hidden)
    wo: QTensor  # (hidden, n_heads*head_dim)
    ffn_norm: np.ndarray  # (hidden,)
    w_gate: QTensor  # (intermediate, hidden)
    w_up: QTensor  # (intermediate, hidden)
    w_down: QTensor  # (hidden, intermediate)
    bq: np.ndarray | None = None  # qwen2 biases
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None


@dataclass
class Model:
    """A loaded model with its KV cache. `tokens` are the ids whose K/V the cache holds."""

    args: ModelArgs
    gguf: GGUFFile
    tokenizer: object
    n_ctx: int
    token_embd: QTensor  # (vocab, hidden)
    layers: list
    output_norm: np.ndarray  # (hidden,)
    output: QTensor  # (vocab, hidden); token_embd when the embeddings are tied
    rope_cos: np.ndarray = field(repr=False, default=None)  # (n_ctx, rope_dim/2)
    rope_sin: np.ndarray = field(repr=False, default=None)
    k_cache: np.ndarray = field(repr=False, default=None)  # (layers, n_kv, n_ctx, head_dim)
    v_cache: np.ndarray = field(repr=False, default=None)
    tokens: list = field(default_factory=list)
    n_evaluated: int = 0  # tokens run through the network since load (for stats and tests)
    _decoder: Decoder = field(repr=False, default=None)

    @property
    def metadata(self) -> dict:
        return self.gguf.metadata

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, tokenizer, n_ctx: int) -> "Model":
        a = ModelArgs.from_gguf(gguf)

        def weight(name, rows, cols):
            if name not in gguf.tensors:
                raise PyllmError(f"{gguf.path}: missing tensor {name}")
            t = gguf.qtensor(name)
            if t.shape != (rows, cols):
                raise PyllmError(f"{gguf.path}: tensor {name} has shape {t.shape}, expected {(rows, cols)}")
            return t

        def vector(name, n, required=True):
            if name not in gguf.tensors:
                if required:
                    raise PyllmError(f"{gguf.path}: missing tensor {name}")
                return None
            v = gguf.array(name).reshape(-1)
            if v.shape != (n,):
                raise PyllmError(f"{gguf.path}: tensor {name} has {v.size} values, expected {n}")
            return v

        d, hd, ff = a.hidden_size, a.head_dim, a.intermediate_size
        q_dim, kv_dim = a.num_attention_heads * hd, a.num_key_value_heads * hd
        layers = []
        for i in range(a.num_hidden_layers):
            p = f"blk.{i}."
            layers.append(
                Layer(
                    attn_norm=vector(p + "attn_norm.weight", d),
                    wq=weight(p + "attn_q.weight", q_dim, d),
                    wk=weight(p + "attn_k.weight", kv_dim, d),
                    wv=weight(p + "attn_v.weight", kv_dim, d),
                    wo=weight(p + "attn_output.weight", d, q_dim),
                    ffn_norm=vector(p + "ffn_norm.weight", d),
                    w_gate=weight(p + "ffn_gate.weight", ff, d),
                    w_up=weight(p + "ffn_up.weight", ff, d),
                    w_down=weight(p + "ffn_down.weight", d, ff),
                    bq=vector(p + "attn_q.bias", q_dim, required=False),
                    bk=vector(p + "attn_k.bias", kv_dim, required=False),
                    bv=vector(p + "attn_v.bias", kv_dim, required=False),
                )
            )
        token_embd = weight("token_embd.weight", a.vocab_size, d)
        output = token_embd if a.tie_word_embeddings else weight("output.weight", a.vocab_size, d)
        freq_factors = gguf.array("rope_freqs.weight").reshape(-1) if "rope_freqs.weight" in gguf.tensors else None
        cos, sin = ops.rope_tables(n_ctx, a.rope_dim, a.rope_theta, freq_factors, a.rope_linear_scale)
        cache_shape = (a.num_hidden_layers, a.num_key_value_heads, n_ctx, hd)
        return cls(
            args=a,
            gguf=gguf,
            tokenizer=tokenizer,
            n_ctx=n_ctx,
            token_embd=token_embd,
            layers=layers,
            output_norm=vector("output_norm.weight", d),
            output=output,
            rope_cos=cos,
            rope_sin=sin,
            k_cache=np.zeros(cache_shape, dtype=np.float32),
            v_cache=np.zeros(cache_shape, dtype=np.float32),
        )

    # -- cache bookkeeping -------------------------------------------------------------

    def truncate(self, n: int):
        """Keep the first n cached positions; later evals overwrite the rest."""
        del self.tokens[n:]

    def reset(self):
        self.truncate(0)

    def reuse_prefix(self, ids) -> list:
        """Keep the cached tokens that start ids; return the ids still to evaluate.

        At least one id is always left to evaluate, since its logits are what comes next.
        """
        n = 0
        limit = min(len(self.tokens), len(ids) - 1)
        while n < limit and self.tokens[n] == ids[n]:
            n += 1
        self.truncate(n)
        return list(ids[n:])

    # -- the network ---------------------------------------------------------------------

    def _forward(self, ids, all_logits: bool) -> np.ndarray:
        """Run ids at positions len(tokens)... and return logits (n or 1, vocab)."""
        a = self.args
        start = len(self.tokens)
        n = len(ids)
        if n == 0:
            raise PyllmError("nothing to evaluate: empty token list")
        if start + n > self.n_ctx:
            raise PyllmError(
                f"context is full: {start} cached + {n} new tokens exceeds the context size {self.n_ctx} (raise -c)"
            )
        ids = np.asarray(ids, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= a.vocab_size:
            raise PyllmError(f"token id out of range 0..{a.vocab_size - 1}")
        logits = self.decoder(ids, start, all_logits)  # (n or 1, vocab)
        self.tokens.extend(int(i) for i in ids)
        self.n_evaluated += n
        return logits

    @property
    def decoder(self) -> Decoder:
        """The model packed for the compiled step (kernels/forward.py), built on first use."""
        if self._decoder is None:
            a = self.args
            layers = [
                {"attn_norm": L.attn_norm, "wq": L.wq, "wk": L.wk, "wv": L.wv, "wo": L.wo, "ffn_norm": L.ffn_norm,
                 "w_gate": L.w_gate, "w_up": L.w_up, "w_down": L.w_down, "bq": L.bq, "bk": L.bk, "bv": L.bv,
                 "bo": getattr(L, "bo", None)}
                for L in self.layers
            ]
            self._decoder = Decoder(
                token_embd=self.token_embd, layers=layers, output_norm=self.output_norm, output=self.output,
                eps=a.rms_norm_eps, n_heads=a.num_attention_heads, n_kv=a.num_key_value_heads, head_dim=a.head_dim,
                rope_dim=a.rope_dim, neox=a.rope_neox, cos=self.rope_cos, sin=self.rope_sin,
                k_cache=self.k_cache, v_cache=self.v_cache,
            )
        return self._decoder

    def eval(self, ids) -> np.ndarray:
        """Append ids to the cache; return the logits after the last one: (vocab,)."""
        return self._forward(ids, all_logits=False)[0]

    def warmup(self, progress=None):
        """Compile (or load from Numba's cache) the model's step now, so that first-token
        latency measures the model, not the JIT. progress(message) is called when the
        kernels are really being compiled (an empty cache: first run only)."""
        self.decoder.compile(progress)
        self.reset()
        self.n_evaluated = 0

    def logits(self, ids) -> np.ndarray:
        """Logits at every position of ids, evaluated from an empty cache: (n, vocab)."""
        self.reset()
        return self._forward(ids, all_logits=True)

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(t.dims)) for t in self.gguf.tensors.values())

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.gguf.tensors.values())
