"""load() and load_tokenizer(): the two ways into a GGUF file."""

from importlib import resources
from pathlib import Path

from pyllm.base import PyllmError
from pyllm.runtime.gguf_file import GGUFFile

DEFAULT_MODEL = "stories260K.gguf"  # ships inside the package (MIT), see models/README.md
DEFAULT_CTX = 4096  # llama.cpp's default; a model's own context may be smaller


def bundled_model() -> Path:
    return Path(str(resources.files("pyllm.models").joinpath(DEFAULT_MODEL)))


def load_tokenizer(path):
    """The tokenizer of a GGUF file (vocab-only files work too)."""
    from pyllm.runtime.tokenizer import Tokenizer

    return Tokenizer.from_metadata(GGUFFile(path).metadata)


def load(path=None, n_ctx: int | None = None, n_threads: int | None = None, lora=None,
         cache_type_k: str | None = None, cache_type_v: str | None = None):
    """Open a GGUF model for inference.

    path: a .gguf file (None: the bundled stories260K). n_ctx: positions in the KV cache
    (default min(4096, the model's context)). n_threads: kernel threads (default all cores).
    lora: LoRA adapters to apply, [(adapter.gguf, scale), ...] (llama.cpp's format).
    cache_type_k, cache_type_v: the K/V cache types, as llama.cpp's -ctk/-ctv: f32, f16 (the
    default), q8_0, q4_0, fp8_e4m3 (kernels/kvcache.py).
    """
    from pyllm.kernels import kvcache, set_threads
    from pyllm.runtime.llama import Model
    from pyllm.runtime.tokenizer import Tokenizer

    type_k = kvcache.kv_type(cache_type_k or kvcache.DEFAULT)  # bad names fail before the file is read
    type_v = kvcache.kv_type(cache_type_v or kvcache.DEFAULT)
    gguf = GGUFFile(bundled_model() if path is None else path)
    if not gguf.tensors:
        raise PyllmError(f"{gguf.path}: has no tensors (a vocab-only file?); it can tokenize but not generate")
    tokenizer = Tokenizer.from_metadata(gguf.metadata)
    arch = gguf.architecture
    train_ctx = int(gguf.metadata.get(f"{arch}.context_length", DEFAULT_CTX))
    if n_ctx is None or n_ctx == 0:
        n_ctx = min(DEFAULT_CTX, train_ctx)
    if n_ctx < 1:
        raise PyllmError(f"context size must be positive, got {n_ctx}")
    set_threads(n_threads)
    model = Model.from_gguf(gguf, tokenizer, n_ctx, type_k.name, type_v.name)
    if lora:
        from pyllm.runtime.lora import load_adapters

        model.set_lora(load_adapters(gguf, [(f, 1.0) if isinstance(f, (str, Path)) else f for f in lora]))
    return model
