"""Adapters out: llama.cpp's LoRA GGUF (runtime/lora.py reads it), Hugging Face PEFT
(adapter_model.safetensors + adapter_config.json), and base + adapter fused into one GGUF."""

from pathlib import Path

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


# -- PEFT (Hugging Face) export ------------------------------------------------------------

# GGUF layer tensor -> the Hugging Face Llama/Qwen2 module it adapts
HF_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def unpermute_rows(w, n_head: int):
    """The inverse of llama.cpp's LlamaModel.permute (convert/hf.py permute): GGUF's
    interleaved-pair rows of each head back to Hugging Face's rotate-half order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def peft_tensors(adapter, base_meta: dict) -> tuple:
    """({safetensors name: array}, target module names) of a LoraAdapter for a base model.

    B's rows of attn_q / attn_k are un-permuted for llama (the GGUF rows were permuted for
    llama.cpp's rope; Hugging Face uses rotate-half); qwen2 GGUFs keep HF's order."""
    import re

    import numpy as np
    from pyllm.base import PyllmError

    arch = base_meta.get("general.architecture")
    n_head = int(base_meta.get(f"{arch}.attention.head_count", 0))
    n_kv = int(base_meta.get(f"{arch}.attention.head_count_kv", n_head))
    out, modules = {}, set()
    for name, (a, b) in adapter.tensors.items():
        if name == "output.weight":
            module = "base_model.model.lm_head"
            modules.add("lm_head")
        else:
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
            if not m or m.group(2) not in HF_MODULES:
                raise PyllmError(f"{adapter.path}: no Hugging Face module for LoRA tensor {name!r}")
            hf = HF_MODULES[m.group(2)]
            module = f"base_model.model.model.layers.{m.group(1)}.{hf}"
            modules.add(hf.split(".")[-1])
            if arch in ("llama", "mistral") and m.group(2) in ("attn_q", "attn_k"):
                b = unpermute_rows(b, n_head if m.group(2) == "attn_q" else n_kv)
        out[f"{module}.lora_A.weight"] = np.ascontiguousarray(a, dtype=np.float32)  # (r, n_in)
        out[f"{module}.lora_B.weight"] = np.ascontiguousarray(b, dtype=np.float32)  # (n_out, r)
    return out, sorted(modules)


def export_peft(adapter_path, base_path, out_dir) -> Path:
    """adapter_model.safetensors + adapter_config.json in out_dir (created if needed), each
    written atomically."""
    import json
    import os
    import tempfile

    from pyllm.base import PyllmError
    from pyllm.runtime.gguf_file import GGUFFile
    from pyllm.runtime.lora import check_base, read_adapter
    from safetensors.numpy import save_file

    adapter = read_adapter(adapter_path)
    base = GGUFFile(base_path)
    check_base(adapter, base)
    ranks = {a.shape[0] for a, _ in adapter.tensors.values()}
    if len(ranks) != 1:
        raise PyllmError(f"{adapter_path}: tensors of different ranks {sorted(ranks)} (PEFT export needs one)")
    rank = ranks.pop()
    tensors, modules = peft_tensors(adapter, base.metadata)
    alpha = adapter.alpha or float(rank)  # no alpha in GGUF means scale 1: PEFT's alpha = r
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": modules, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "base_model_name_or_path": str(base.metadata.get("general.name") or Path(base_path).stem),
    }
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PyllmError(f"cannot create {out_dir}: {e.strerror}") from None

    def atomic(name, write):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=out_dir)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, out_dir / name)
        except BaseException:
            os.unlink(tmp)
            raise

    atomic("adapter_model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic("adapter_config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return out_dir


# -- fusing an adapter into the base weights --------------------------------------------------


def fuse(base_path, specs, out_path, outtype: str | None = None, log=None):
    """A copy of the base GGUF with W + scale * B A for every adapted weight (specs:
    [(adapter.gguf, user_scale)], as pyllm.load's lora=). Each merged tensor is decoded,
    merged in float32 and re-encoded with the runtime's quantizers in its original block
    type, or in --outtype's (a llama.cpp file type, with `pyllm quantize`'s per-tensor mix).
    Returns the QuantizeReport of the written file."""
    import numpy as np
    from pyllm.base import PyllmError
    from pyllm.convert.gguf_writer import GGUFWriter
    from pyllm.convert.quantize import (
        ModelInfo,
        QuantizeReport,
        TensorReport,
        choose_types,
        chunked,
        decode,
        format_tensor_line,
        llama_order,
        parse_file_type,
        same_file,
    )
    from pyllm.runtime.gguf_file import GGUFFile
    from pyllm.runtime.lora import load_adapters

    if same_file(base_path, out_path):
        raise PyllmError(f"refusing to overwrite the base model {base_path}")
    src = GGUFFile(base_path)
    if src.metadata.get("general.type") == "adapter":
        raise PyllmError(f"{src.path}: is an adapter, not a base model")
    deltas = load_adapters(src, specs)
    infos = src.tensors
    shapes = {n: tuple(reversed(t.dims)) for n, t in infos.items()}
    types = {n: t.qtype for n, t in infos.items()}
    w = GGUFWriter(out_path, alignment=src.alignment)
    for key, value in src.metadata.items():
        w.add(key, value, *src.value_types[key])
    if outtype:
        ft = parse_file_type(outtype)
        types = choose_types({n: (shapes[n], t.qtype) for n, t in infos.items()}, ft,
                             ModelInfo.from_metadata(src.metadata))
        w.add_u32("general.file_type", ft.ftype)
        w.add_u32("general.quantization_version", 2)

    def loader(name):
        info, new = infos[name], types[name]
        if name not in deltas and new == info.qtype:
            return lambda: np.array(src.raw(name))
        rows = int(np.prod(shapes[name][:-1], dtype=np.int64)) if len(shapes[name]) > 1 else 1
        cols = shapes[name][-1]
        raw = src.raw(name).reshape(rows, -1)

        def read(r0, r1):
            x = np.array(decode(raw[r0:r1], info.qtype, r1 - r0, cols), dtype=np.float32)  # (r1 - r0, cols)
            for a, b, scale in deltas.get(name, ()):
                x += np.float32(scale) * (b[r0:r1] @ a)
            return x

        return chunked(rows, cols, read, new)

    order = llama_order(infos)
    for name in order:
        w.add_tensor(name, shapes[name], types[name], loader(name))
    report = QuantizeReport()

    def on_tensor(t):
        info = infos[t.name]
        report.tensors.append(TensorReport(t.name, t.shape, info.qtype, t.qtype, info.nbytes, t.nbytes))
        if log:
            log(format_tensor_line(len(report.tensors), len(order), report.tensors[-1])
                + ("  + LoRA" if t.name in deltas else ""))

    w.write(on_tensor=on_tensor)
    return report
