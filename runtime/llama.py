"""The Llama-family decoder (llama, Llama-3, SmolLM, TinyLlama, llama2.c, mistral, qwen2).

Weights stay as raw GGUF blocks in the memory map; every product reads them directly.
The KV cache is preallocated for n_ctx positions. The network itself runs in one compiled
call per batch of tokens (kernels/forward.py: the prompt in batches, then each new token
alone), with activations quantized to int8 for the products as llama.cpp does.
"""

import threading
from dataclasses import dataclass, field

import numpy as np
from pyllm.base import PyllmError
from pyllm.kernels import kvcache
from pyllm.kernels.forward import Decoder
from pyllm.kernels.quants import QTensor
from pyllm.runtime.gguf_file import GGUFFile
from pyllm.runtime.rope import SCALING_TYPES, RopeScaling, rope_tables

ARCHITECTURES = ("llama", "mistral", "qwen2")

# The {arch}.* keys, by what pyllm does with them. llama.cpp reads these for llama/qwen2
# (src/llama-model.cpp load_hparams, src/models/llama.cpp, qwen2.cpp); a key that is not
# listed, or one of _UNUSED_AT with another value, is refused: it would change the model.
_READ = {
    "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "attention.key_length",
    "attention.value_length", "rope.dimension_count", "rope.freq_base", "rope.scaling.type", "rope.scaling.factor",
    "rope.scale_linear", "rope.scaling.original_context_length", "rope.scaling.attn_factor",
    "rope.scaling.yarn_ext_factor",  # accepted at llama.cpp's value for the type (1 for yarn, else 0)
    "attention.sliding_window",  # checked against n_ctx in Model.from_gguf
    "attention.scale",  # accepted when it is 1/sqrt(head_dim), what pyllm (and llama.cpp for these) use
}
# no effect on a causal decoder's logits: names (vocab_size sizes the type label), training notes
_INFORMATIONAL = {"vocab_size", "rope.scaling.finetuned", "pooling_type", "classifier.pooling_type"}
# accepted only with the value that means "not used" (llama.cpp's default)
_UNUSED_AT = {
    "expert_count": 0, "expert_used_count": 0, "expert_group_count": 0, "expert_group_used_count": 0,
    "nextn_predict_layers": 0, "attention.causal": True, "attention.max_alibi_bias": 0.0,
    "attention.clamp_kqv": 0.0, "rope.scaling.alpha": 0.0, "rope.scaling.yarn_log_multiplier": 0.0,
    "rope.scaling.yarn_attn_factor": 1.0, "rope.scaling.yarn_beta_fast": 32.0, "rope.scaling.yarn_beta_slow": 1.0,
    "final_logit_softcapping": 0.0, "attn_logit_softcapping": 0.0,
    "logit_scale": 1.0, "embedding_scale": 1.0, "residual_scale": 1.0,
}


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
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)  # linear / YaRN context extension
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases
    attention_out_bias: bool = False  # attn_output.bias (Llama with attention_bias=true)
    sliding_window: int = 0  # 0: none

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> "ModelArgs":
        meta = gguf.metadata
        arch = meta.get("general.architecture")
        if arch is None:
            raise PyllmError(f"{gguf.path}: missing required key general.architecture")
        if arch not in ARCHITECTURES:
            raise PyllmError(f"{gguf.path}: unsupported architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
        prefix = f"{arch}."

        def refuse(name, value, why="pyllm does not implement it"):
            raise PyllmError(f"{gguf.path}: unsupported {prefix}{name} = {_show(value)} ({why})")

        for k, value in meta.items():
            name = k[len(prefix):] if k.startswith(prefix) else None
            if name is None or name in _READ or name in _INFORMATIONAL:
                continue
            if name not in _UNUSED_AT:
                refuse(name, value, "an option pyllm does not know; running without it could be wrong")
            if not _equal(value, _UNUSED_AT[name]):
                refuse(name, value)

        def key(name, default=None, kind=int):
            value = meta.get(prefix + name, default)
            if value is None:
                raise PyllmError(f"{gguf.path}: missing required key {prefix}{name}")
            if isinstance(value, (list, np.ndarray)):  # llama.cpp allows per-layer arrays here
                if len(value) == 0 or not all(_equal(v, value[0]) for v in value):
                    refuse(name, value, "per-layer values are not supported")
                value = value[0]
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise PyllmError(f"{gguf.path}: {prefix}{name} must be a number, got {_show(value)}") from None

        n_heads = key("attention.head_count")
        n_kv = key("attention.head_count_kv", n_heads)
        hidden = key("embedding_length")
        if n_heads <= 0 or n_kv <= 0 or n_heads % n_kv:
            raise PyllmError(f"{gguf.path}: {n_heads} attention heads cannot share {n_kv} key/value heads")
        head_dim = key("attention.key_length", hidden // n_heads)
        if key("attention.value_length", head_dim) != head_dim:
            refuse("attention.value_length", meta[prefix + "attention.value_length"],
                   f"values of another size than keys ({head_dim})")
        rope_dim = key("rope.dimension_count", head_dim)
        if rope_dim != head_dim:  # llama.cpp refuses it too for llama ("invalid n_rot") and qwen2
            refuse("rope.dimension_count", rope_dim, f"partial rotary embedding of a {head_dim}-dim head")
        n_ctx_train = key("context_length")
        rope_scaling = _rope_scaling(gguf, arch, key, refuse, n_ctx_train)
        attn_scale = meta.get(prefix + "attention.scale")
        if attn_scale not in (None, 0.0) and not np.isclose(attn_scale, head_dim ** -0.5, rtol=1e-6):
            refuse("attention.scale", attn_scale, f"pyllm scales attention by 1/sqrt({head_dim})")
        embd = gguf.tensors.get("token_embd.weight")
        if embd is None:
            raise PyllmError(f"{gguf.path}: missing tensor token_embd.weight")
        return cls(
            model_type=arch,
            hidden_size=hidden,
            intermediate_size=key("feed_forward_length"),
            num_hidden_layers=key("block_count"),
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            vocab_size=int(embd.dims[1]) if len(embd.dims) == 2 else 0,
            max_position_embeddings=n_ctx_train,
            rms_norm_eps=key("attention.layer_norm_rms_epsilon", kind=float),
            rope_theta=key("rope.freq_base", 10000.0, float),
            rope_dim=rope_dim,
            # llama.cpp: qwen2 uses NEOX rope; llama/mistral GGUFs have permuted Q/K for "normal" rope.
            rope_neox=arch == "qwen2",
            rope_scaling=rope_scaling,
            tie_word_embeddings="output.weight" not in gguf.tensors,
            attention_bias="blk.0.attn_q.bias" in gguf.tensors,
            attention_out_bias="blk.0.attn_output.bias" in gguf.tensors,
            sliding_window=key("attention.sliding_window", 0),
        )


def _rope_scaling(gguf, arch, key, refuse, n_ctx_train) -> RopeScaling:
    """rope.scaling.* as llama.cpp reads them: the type defaults to linear (so a bare factor,
    or the old rope.scale_linear, still scales), a factor of 0 means 1."""
    kind = gguf.metadata.get(f"{arch}.rope.scaling.type", "linear")
    if kind not in SCALING_TYPES:
        refuse("rope.scaling.type", kind, f"supported: {', '.join(SCALING_TYPES)}")
    if f"{arch}.rope.scaling.factor" in gguf.metadata:
        factor = key("rope.scaling.factor", kind=float)
    else:  # the old key name
        factor = key("rope.scale_linear", 0.0, float)
    if factor < 0 or not np.isfinite(factor):
        refuse("rope.scaling.factor", factor, "it must be positive")
    factor = 1.0 if factor == 0.0 else factor
    if kind == "none":
        factor = 1.0  # llama.cpp never scales with type none
    ext = gguf.metadata.get(f"{arch}.rope.scaling.yarn_ext_factor")
    if ext is not None and not (ext < 0 or _equal(ext, 1.0 if kind == "yarn" else 0.0)):
        refuse("rope.scaling.yarn_ext_factor", ext, "pyllm does not implement it")
    orig = key("rope.scaling.original_context_length", n_ctx_train)
    if kind == "yarn" and orig <= 0:
        refuse("rope.scaling.original_context_length", orig, "YaRN needs the pre-training context")
    attn_factor = key("rope.scaling.attn_factor", 1.0, float)
    return RopeScaling(type=kind if factor != 1.0 or kind == "yarn" else "none", factor=factor,
                       original_context_length=orig, attn_factor=attn_factor)


def _equal(value, want) -> bool:
    if isinstance(want, bool) or isinstance(value, (bool, str)):
        return value is want or value == want
    try:
        return bool(np.isclose(float(value), float(want), rtol=1e-6, atol=0.0))
    except (TypeError, ValueError):
        return False


def _show(value) -> str:
    if isinstance(value, (list, np.ndarray)):
        items = list(value[:4])
        return "[" + ", ".join(str(v) for v in items) + (", ..." if len(value) > 4 else "") + "]"
    return repr(value) if isinstance(value, str) else str(value)


_LAYER_TENSORS = {
    "attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_norm.weight",
    "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "attn_q.bias", "attn_k.bias", "attn_v.bias",
}
_GLOBAL_TENSORS = {"token_embd.weight", "output_norm.weight", "output.weight"}


def _is_used(name: str, a: ModelArgs) -> bool:
    """Whether the forward pass reads tensor `name`: the tensors llama.cpp's llama / qwen2
    load, less the variants pyllm does not implement (MLP biases, fused qkv, output.bias)."""
    if name in _GLOBAL_TENSORS:
        return True
    if name == "rope_freqs.weight":
        return a.model_type != "qwen2"  # llama.cpp's qwen2 does not load it
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < a.num_hidden_layers:
        return parts[2] in _LAYER_TENSORS or (parts[2] == "attn_output.bias" and a.model_type != "qwen2")
    return False


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
    bo: np.ndarray | None = None  # attn_output.bias  (hidden,)


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
    k_cache: np.ndarray = field(repr=False, default=None)  # (layers, n_kv, n_ctx, row): kernels/kvcache.py
    v_cache: np.ndarray = field(repr=False, default=None)
    tokens: list = field(default_factory=list)
    n_evaluated: int = 0  # tokens run through the network since load (for stats and tests)
    lora: dict = field(default_factory=dict)  # {base tensor name: [(A, B, scale)]}: runtime/lora.py
    _decoder: Decoder = field(repr=False, default=None)
    _warming: tuple = field(repr=False, default=None)  # (thread, [its exception]) of warmup(background=True)

    @property
    def metadata(self) -> dict:
        return self.gguf.metadata

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, tokenizer, n_ctx: int, cache_type_k: str = kvcache.DEFAULT,
                  cache_type_v: str = kvcache.DEFAULT) -> "Model":
        """The model of gguf with a K/V cache of n_ctx positions of types cache_type_k, cache_type_v
        (kernels/kvcache.py: f32, f16, q8_0, q4_0, fp8_e4m3)."""
        a = ModelArgs.from_gguf(gguf)
        type_k, type_v = kvcache.kv_type(cache_type_k), kvcache.kv_type(cache_type_v)
        kvcache.check_head_dim(type_k, a.head_dim, "K")
        kvcache.check_head_dim(type_v, a.head_dim, "V")
        if a.sliding_window and n_ctx > a.sliding_window:
            raise PyllmError(f"{gguf.path}: the model attends over a sliding window of {a.sliding_window} tokens, "
                             f"which pyllm does not implement; use a context of at most that (-c {a.sliding_window})")
        # every tensor must be one the forward pass uses (llama.cpp refuses a wrong tensor count)
        for name in gguf.tensors:
            if not _is_used(name, a):
                raise PyllmError(f"{gguf.path}: tensor {name} is not used by pyllm's {a.model_type} model "
                                 "(an unsupported variant?); refusing to run without it")

        def weight(name, rows, cols):
            if name not in gguf.tensors:
                raise PyllmError(f"{gguf.path}: missing tensor {name}")
            t = gguf.qtensor(name)
            if len(gguf.tensors[name].dims) != 2 or t.shape != (rows, cols):
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
            biases = [p + f"attn_{x}.bias" in gguf.tensors for x in "qkv"]
            if any(biases) and not all(biases):
                raise PyllmError(f"{gguf.path}: layer {i} has biases for only some of attn_q/attn_k/attn_v; "
                                 "pyllm needs all three or none")
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
                    bo=vector(p + "attn_output.bias", d, required=False),
                )
            )
        token_embd = weight("token_embd.weight", a.vocab_size, d)
        output = token_embd if a.tie_word_embeddings else weight("output.weight", a.vocab_size, d)
        freq_factors = vector("rope_freqs.weight", a.rope_dim // 2, required=False)  # Llama-3 rope scaling
        cos, sin = rope_tables(n_ctx, a.rope_dim, a.rope_theta, a.rope_scaling, freq_factors)
        cache = (a.num_hidden_layers, a.num_key_value_heads, n_ctx, hd)
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
            k_cache=kvcache.new_cache(type_k, *cache, which="K"),
            v_cache=kvcache.new_cache(type_v, *cache, which="V"),
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
        self.finish_warmup()
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
                 "bo": L.bo}
                for L in self.layers
            ]
            self._decoder = Decoder(
                token_embd=self.token_embd, layers=layers, output_norm=self.output_norm, output=self.output,
                eps=a.rms_norm_eps, n_heads=a.num_attention_heads, n_kv=a.num_key_value_heads, head_dim=a.head_dim,
                rope_dim=a.rope_dim, neox=a.rope_neox, cos=self.rope_cos, sin=self.rope_sin,
                k_cache=self.k_cache, v_cache=self.v_cache,
            )
            self._decoder.set_lora(self.lora)
        return self._decoder

    def set_lora(self, deltas: dict):
        """Apply LoRA adapters: {base tensor name: [(A, B, scale)]} (runtime/lora.py
        load_adapters); {} removes them. The cache is dropped: its K/V came from other weights."""
        self.finish_warmup()
        self.lora = dict(deltas)
        if self._decoder is not None:
            self._decoder.set_lora(self.lora)
        self.reset()

    def eval(self, ids, all_logits: bool = False) -> np.ndarray:
        """Append ids to the cache; return the logits after the last one: (vocab,), or with
        all_logits the logits after each of them: (len(ids), vocab)."""
        logits = self._forward(ids, all_logits)
        return logits if all_logits else logits[0]

    def warmup(self, progress=None, background: bool = False):
        """Pack the weights and compile (or load from Numba's cache) the model's step now, so
        that first-token latency measures the model, not the JIT. progress(message) is called
        when the kernels are really being compiled (not in the cache: first run only).

        background: do it in a thread and return at once; the first evaluation waits for it
        (finish_warmup). A chat shows its prompt while the step loads (~1 s) or compiles (a
        first run's 30-40 s, `compiling`) and its user types."""
        self.finish_warmup()
        decoder = self.decoder
        self.reset()  # the warm-up token overwrites cache position 0
        self.n_evaluated = 0
        if not background:
            decoder.compile(progress)
            return
        error = []

        def run():
            try:
                decoder.compile(progress)
            except BaseException as e:  # noqa: BLE001 -- raised again in the thread that waits for it
                error.append(e)

        thread = threading.Thread(target=run, name="pyllm-warmup")
        thread.start()
        self._warming = (thread, error)

    @property
    def warming(self) -> bool:
        """A background warm-up is still running."""
        return self._warming is not None and self._warming[0].is_alive()

    @property
    def compiling(self) -> bool:
        """A background warm-up is compiling the step, which was not in the cache (first run)."""
        return self.warming and not self.decoder.cached

    def finish_warmup(self, timeout: float | None = None) -> bool:
        """Wait for a background warm-up (at most timeout seconds); True when none is left.
        Its error, if it failed, is raised here."""
        if self._warming is None:
            return True
        thread, error = self._warming
        thread.join(timeout)
        if thread.is_alive():
            return False
        self._warming = None
        if error:
            raise error[0]
        return True

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

    @property
    def cache_types(self) -> tuple:
        """The K and V cache types' names, e.g. ('f16', 'f16')."""
        hd = self.args.head_dim
        return kvcache.cache_type(self.k_cache, hd).name, kvcache.cache_type(self.v_cache, hd).name

    @property
    def kv_bytes_per_token(self) -> int:
        """K/V cache bytes per cached token (all layers)."""
        a = self.args
        return kvcache.bytes_per_token(*self.cache_types, a.num_hidden_layers, a.num_key_value_heads, a.head_dim)

    # -- the Python API ------------------------------------------------------------------

    def create_chat_completion(self, messages, **kw):
        """The assistant's reply to messages in OpenAI's shapes: see runtime/chat.py."""
        from pyllm.runtime.chat import create_chat_completion

        return create_chat_completion(self, messages, **kw)
