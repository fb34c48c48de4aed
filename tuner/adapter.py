"""Adapters out: llama.cpp's LoRA GGUF (see runtime/lora.py for the format and reading)."""

from pyllm.base import GGMLType


def save_adapter(path, weights, architecture: str, alpha: float, name: str | None = None, extra: dict | None = None):
    """Write LoraWeights as an adapter GGUF llama.cpp loads (atomically: temp file + rename).

    weights.a[n] (r, n_in) and weights.b[n] (n_out, r) become n.lora_a / n.lora_b, float32."""
    import numpy as np
    from pyllm.convert.gguf_writer import GGUFWriter

    w = GGUFWriter(path)
    w.add_string("general.architecture", architecture)
    w.add_string("general.type", "adapter")
    if name:
        w.add_string("general.name", name)
    w.add_string("adapter.type", "lora")
    w.add_f32("adapter.lora.alpha", alpha)
    for key, value in (extra or {}).items():
        w.add(key, value)
    for n in weights.names:
        a = np.ascontiguousarray(weights.a[n], dtype=np.float32)
        b = np.ascontiguousarray(weights.b[n], dtype=np.float32)
        w.add_tensor(n + ".lora_a", a.shape, GGMLType.F32, lambda a=a: a)
        w.add_tensor(n + ".lora_b", b.shape, GGMLType.F32, lambda b=b: b)
    w.write()
