"""pyllm: a llama.cpp-class LLM runtime in Python + Numba. GGUF in, text out, no PyTorch.

    import pyllm
    model = pyllm.load("model.gguf", n_ctx=2048, n_threads=2)
    print(pyllm.generate(model, "Once upon a time", max_tokens=64))

The public names are imported lazily, so `import pyllm` stays fast: Numba and the
kernels load on first use, not at import.
"""

__version__ = "0.1.0"

__all__ = ["load", "load_tokenizer", "generate", "stream_generate", "create_chat_completion", "finetune",
           "PyllmError", "__version__"]

_LAZY = {
    "load": "pyllm.runtime.loader",
    "load_tokenizer": "pyllm.runtime.loader",
    "generate": "pyllm.runtime.generate",
    "stream_generate": "pyllm.runtime.generate",
    "create_chat_completion": "pyllm.runtime.chat",
    "finetune": "pyllm.tuner.trainer",
    "PyllmError": "pyllm.base",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pyllm' has no attribute {name!r}")
