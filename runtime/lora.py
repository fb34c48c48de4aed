"""LoRA adapters in llama.cpp's GGUF format: read, check against a base model, apply.

The format (llama.cpp src/llama-adapter.cpp, convert_lora_to_gguf.py): general.type =
"adapter", general.architecture = the base model's, adapter.type = "lora", optional
adapter.lora.alpha (float32; absent = 0 = no alpha scaling). For a base weight W named N
(GGUF shape [n_in, n_out], numpy (n_out, n_in)) the tensors N.lora_a (numpy (r, n_in)) and
N.lora_b (numpy (n_out, r)) add

    W x + scale * B (A x),   scale = user_scale * alpha / r  (user_scale alone when alpha is 0).

Rows are in the base GGUF's order (Llama Q/K rows already permuted for llama.cpp's rope),
so nothing is permuted here. Every tensor must match a weight of the base model; anything
this runtime cannot apply (token embeddings, norm vectors) is refused rather than ignored.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numba import njit, prange
from pyllm.base import PyllmError

# the base weights an adapter may target: the layer products and the output layer
_APPLICABLE = re.compile(r"blk\.(\d+)\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight"
                         r"|output\.weight")


@dataclass
class LoraAdapter:
    path: Path
    architecture: str
    alpha: float  # 0: no alpha scaling (llama.cpp's convention for a missing key)
    tensors: dict = field(default_factory=dict)  # base tensor name -> (A (r, n_in), B (n_out, r)) float32

    def scale(self, name: str, user_scale: float = 1.0) -> float:
        """llama_adapter_lora_weight::get_scale: user_scale * alpha / rank, or user_scale."""
        rank = self.tensors[name][0].shape[0]
        return user_scale * self.alpha / rank if self.alpha else user_scale


def read_adapter(path) -> LoraAdapter:
    """An adapter GGUF, validated on its own (its pairs and shapes); see check_base."""
    from pyllm.kernels.blocks import decodable
    from pyllm.runtime.gguf_file import GGUFFile

    g = GGUFFile(path)
    meta = g.metadata
    kind = meta.get("general.type")
    if kind != "adapter":
        raise PyllmError(f"{g.path}: not a LoRA adapter (general.type is {kind!r}, expected 'adapter')")
    if meta.get("adapter.type") != "lora":
        raise PyllmError(f"{g.path}: adapter.type is {meta.get('adapter.type')!r}, expected 'lora'")
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise PyllmError(f"{g.path}: missing general.architecture")
    pairs: dict = {}
    for name, info in g.tensors.items():
        m = re.fullmatch(r"(.+)\.lora_([ab])", name)
        if not m:
            raise PyllmError(f"{g.path}: tensor {name!r} is not a .lora_a/.lora_b tensor "
                             "(only LoRA pairs are supported)")
        if not decodable(info.qtype) or len(info.dims) != 2:
            raise PyllmError(f"{g.path}: tensor {name} must be a 2-D matrix of a supported type")
        pairs.setdefault(m.group(1), {})[m.group(2)] = g.array(name)  # numpy order, float32
    adapter = LoraAdapter(Path(path), arch, float(meta.get("adapter.lora.alpha", 0.0)))
    for base, ab in sorted(pairs.items()):
        if set(ab) != {"a", "b"}:
            raise PyllmError(f"{g.path}: LoRA tensor pair for {base!r} is missing one component")
        a, b = ab["a"], ab["b"]
        if a.shape[0] != b.shape[1]:
            raise PyllmError(f"{g.path}: {base}: lora_a {a.shape} and lora_b {b.shape} disagree on the rank "
                             "(lora_a must be numpy (r, n_in), lora_b (n_out, r))")
        adapter.tensors[base] = (np.ascontiguousarray(a), np.ascontiguousarray(b))
    if not adapter.tensors:
        raise PyllmError(f"{g.path}: the adapter has no tensors")
    return adapter


def check_base(adapter: LoraAdapter, gguf) -> None:
    """Refuse an adapter that does not fit the base model (a GGUFFile) exactly."""
    arch = gguf.metadata.get("general.architecture")
    if adapter.architecture != arch:
        raise PyllmError(f"{adapter.path}: adapter is for architecture {adapter.architecture!r}, the model is {arch!r}")
    for name, (a, b) in adapter.tensors.items():
        info = gguf.tensors.get(name)
        if info is None:
            raise PyllmError(f"{adapter.path}: LoRA tensor {name!r} does not exist in the base model "
                             "(wrong base model?)")
        if not _APPLICABLE.fullmatch(name):
            raise PyllmError(f"{adapter.path}: LoRA on {name!r} is not supported (only the attention/MLP "
                             "products and output.weight)")
        n_out, n_in = int(np.prod(info.dims[1:])), info.dims[0]
        if a.shape[1] != n_in or b.shape[0] != n_out:
            raise PyllmError(f"{adapter.path}: {name} has shape ({n_out}, {n_in}) in the model, but the adapter's "
                             f"lora_a is {a.shape} and lora_b {b.shape} (wrong base model?)")


def load_adapters(gguf, specs) -> dict:
    """specs [(file, user_scale)] -> {base tensor name: [(A, B, scale), ...]}, all checked."""
    out: dict = {}
    for path, user_scale in specs:
        adapter = read_adapter(path)
        check_base(adapter, gguf)
        for name, (a, b) in adapter.tensors.items():
            out.setdefault(name, []).append((a, b, adapter.scale(name, float(user_scale))))
    return out


# A Numba kernel, not numpy's BLAS: the runtime's kernels run on Numba's OpenMP threads, and
# interleaving them with OpenBLAS's threads (which spin after each product) made a decode
# step with adapters hundreds of times slower on 2 cores.
@njit(cache=True, parallel=True, fastmath=True)
def _add_lora(y, x, a, b, scale):
    # y (n, n_out) += scale * (x (n, n_in) @ a.T (n_in, r)) @ b.T (r, n_out); one token per thread
    r = a.shape[0]
    for t in prange(x.shape[0]):
        xa = np.empty(r, dtype=np.float32)  # (r,)
        for k in range(r):
            s = np.float32(0.0)
            for j in range(x.shape[1]):
                s += a[k, j] * x[t, j]
            xa[k] = s * scale
        for i in range(b.shape[0]):
            s = np.float32(0.0)
            for k in range(r):
                s += b[i, k] * xa[k]
            y[t, i] += s


def apply(y: np.ndarray, x: np.ndarray, deltas) -> np.ndarray:
    """y += scale * (x A^T) B^T for each (A, B, scale): x (n, n_in), y (n, n_out) float32, in place."""
    for a, b, scale in deltas or ():
        _add_lora(y, np.ascontiguousarray(x), a, b, np.float32(scale))
    return y


# -- command-line flags (llama.cpp's) ---------------------------------------------------------


def add_lora_args(p):
    """--lora FILE and --lora-scaled FILE SCALE, each repeatable."""
    p.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="apply a LoRA adapter (GGUF, llama.cpp's format); repeatable")
    p.add_argument("--lora-scaled", action="append", nargs=2, default=[], metavar=("FILE", "SCALE"),
                   help="apply a LoRA adapter with a user scale; repeatable")


def lora_from_args(args) -> list:
    """[(file, scale)] from the flags, for pyllm.load(..., lora=...)."""
    specs = [(f, 1.0) for f in args.lora]
    for f, s in args.lora_scaled:
        try:
            specs.append((f, float(s)))
        except ValueError:
            raise PyllmError(f"--lora-scaled {f} {s}: the scale must be a number") from None
    return specs
