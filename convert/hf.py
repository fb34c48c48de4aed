"""Hugging Face checkpoint directory -> GGUF, as llama.cpp's convert_hf_to_gguf.py does it
(commit c392e509, Feb 2025), without torch.

Supported: LlamaForCausalLM and MistralForCausalLM (both written as architecture "llama",
as llama.cpp's LlamaModel does), Qwen2ForCausalLM ("qwen2").

- Tensor names: model.layers.N.self_attn.q_proj -> blk.N.attn_q, ... (gguf-py tensor_mapping).
- Llama/Mistral: q_proj/k_proj rows are permuted from HF's rotate-half RoPE layout to the
  interleaved-pair layout llama.cpp's "normal" RoPE expects (LlamaModel.permute). Qwen2 is not
  permuted: llama.cpp runs it with NEOX (rotate-half) RoPE.
- Tensor types: 1-D tensors and *_norm.weight stay F32; --outtype applies to the 2-D weights
  (token_embd too); quantized outtypes use the same per-tensor rules as `pyllm quantize`.
- Llama-3 rope scaling becomes a rope_freqs.weight tensor (LlamaModel.generate_extra_tensors),
  linear and YaRN scaling rope.scaling.* keys; other scalings (dynamic, longrope) are refused.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from pyllm.base import GGMLType, PyllmError
from pyllm.convert import vocab as vocab_mod
from pyllm.convert.gguf_writer import GGUFWriter
from pyllm.convert.quantize import (
    FileType,
    ModelInfo,
    QuantizeReport,
    TensorReport,
    choose_types,
    chunked,
    format_tensor_line,
    parse_file_type,
)
from pyllm.convert.safetensors_file import SafetensorsModel

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "LLaMAForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}

_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# prepare_tensors skips these
_SKIP = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


def map_name(name: str) -> str | None:
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_MAP:
        return f"blk.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    return None


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """LlamaModel.permute: rotate-half rows -> interleaved pairs, head by head.
    w: (n_head * head_dim, ...) or a block of whole heads."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(hp: dict) -> np.ndarray:
    """rope_freqs.weight for rope_type "llama3" (LlamaModel.generate_extra_tensors)."""
    rs = hp["rope_scaling"]
    base = hp.get("rope_theta", 10000.0)
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rs.get("factor", 8.0)
    low_freq_factor = rs.get("low_freq_factor", 1.0)
    high_freq_factor = rs.get("high_freq_factor", 4.0)
    old_context_len = rs.get("original_max_position_embeddings", hp.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    if low_freq_wavelen == high_freq_wavelen:
        raise PyllmError("config.json: llama3 rope_scaling needs low_freq_factor != high_freq_factor")
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < high_freq_wavelen:
            out.append(1)
        elif wavelen > low_freq_wavelen:
            out.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PyllmError(f"{path.parent}: no {path.name} (not a Hugging Face model directory?)") from None
    except (OSError, ValueError) as e:
        raise PyllmError(f"{path}: cannot read it ({e})") from None


class HFModel:
    def __init__(self, directory):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise PyllmError(f"{self.dir}: not a directory")
        self.hp = _read_json(self.dir / "config.json")
        archs = self.hp.get("architectures") or []
        arch_name = archs[0] if archs else None
        if arch_name not in SUPPORTED:
            raise PyllmError(f"unsupported architecture {arch_name!r} in {self.dir / 'config.json'}; "
                             f"supported: {', '.join(sorted(set(SUPPORTED) - {'LLaMAForCausalLM'}))}")
        self.hf_arch = arch_name
        self.arch = SUPPORTED[arch_name]
        hp = self.hp
        # transformers >= 5 writes rope_theta and the scaling inside "rope_parameters"
        rp = hp.get("rope_parameters")
        if isinstance(rp, dict):
            if hp.get("rope_theta") is None and rp.get("rope_theta") is not None:
                hp["rope_theta"] = rp["rope_theta"]
            if not hp.get("rope_scaling") and rp.get("rope_type", rp.get("type", "default")) != "default":
                hp["rope_scaling"] = rp
        try:
            self.n_layer = int(hp["num_hidden_layers"])
            self.hidden = int(hp["hidden_size"])
            self.n_ff = int(hp["intermediate_size"])
            self.n_head = int(hp["num_attention_heads"])
            self.vocab_size = int(hp["vocab_size"])
        except KeyError as e:
            raise PyllmError(f"{self.dir / 'config.json'}: missing {e.args[0]}") from None
        self.n_kv = int(hp.get("num_key_value_heads") or self.n_head)
        self.head_dim = int(hp.get("head_dim") or self.hidden // self.n_head)
        self.tied = bool(hp.get("tie_word_embeddings", False))

    # -- metadata ------------------------------------------------------------------------
    def add_parameters(self, w: GGUFWriter, ft: FileType):
        a, hp = self.arch, self.hp
        # Model.set_gguf_parameters
        w.add_u32(f"{a}.block_count", self.n_layer)
        if (n_ctx := hp.get("max_position_embeddings", hp.get("n_ctx"))) is not None:
            w.add_u32(f"{a}.context_length", n_ctx)
        w.add_u32(f"{a}.embedding_length", self.hidden)
        w.add_u32(f"{a}.feed_forward_length", self.n_ff)
        w.add_u32(f"{a}.attention.head_count", self.n_head)
        if hp.get("num_key_value_heads") is not None:
            w.add_u32(f"{a}.attention.head_count_kv", self.n_kv)
        if hp.get("rope_theta") is not None:
            w.add_f32(f"{a}.rope.freq_base", hp["rope_theta"])
        if hp.get("rms_norm_eps") is not None:
            w.add_f32(f"{a}.attention.layer_norm_rms_epsilon", hp["rms_norm_eps"])
        if hp.get("head_dim") is not None:
            w.add_u32(f"{a}.attention.key_length", hp["head_dim"])
            w.add_u32(f"{a}.attention.value_length", hp["head_dim"])
        w.add_u32("general.file_type", ft.ftype)
        if self.arch == "llama":
            # LlamaModel.set_gguf_parameters
            w.add_u32(f"{a}.vocab_size", self.vocab_size)
            w.add_u32(f"{a}.rope.dimension_count", self.head_dim)
        self.add_rope_scaling(w)
        # options of the checkpoint that change its function: carried, or refused
        cfg = self.dir / "config.json"
        act = hp.get("hidden_act", hp.get("hidden_activation", "silu"))
        if act not in ("silu", "swish"):
            raise PyllmError(f"{cfg}: hidden_act {act!r} is not supported (these models use silu)")
        if self.hf_arch == "MistralForCausalLM" and hp.get("sliding_window"):
            w.add_u32(f"{a}.attention.sliding_window", hp["sliding_window"])  # pyllm keeps the context within it
        if self.arch == "qwen2" and hp.get("use_sliding_window"):
            raise PyllmError(f"{cfg}: use_sliding_window is not supported")

    def add_rope_scaling(self, w: GGUFWriter):
        """rope.scaling.* as TextModel.set_gguf_parameters writes them (conversion/base.py); a
        scaling llama.cpp's llama/qwen2 would not run as transformers does is refused here."""
        a, hp = self.arch, self.hp
        rs = hp.get("rope_scaling") or {}
        kind = rs.get("rope_type", rs.get("type", "default"))
        cfg = self.dir / "config.json"
        if kind in (None, "default"):
            return
        if kind == "llama3" and a == "llama":
            return  # becomes the rope_freqs.weight tensor (plan_tensors)
        if kind not in ("linear", "yarn"):
            raise PyllmError(f"{cfg}: rope_scaling type {kind!r} is not supported (supported: linear, yarn"
                             f"{', llama3' if a == 'llama' else ''})")
        if not isinstance(rs.get("factor"), (int, float)):
            raise PyllmError(f"{cfg}: rope_scaling {kind} needs a numeric factor")
        w.add_string(f"{a}.rope.scaling.type", kind)
        w.add_f32(f"{a}.rope.scaling.factor", rs["factor"])
        if kind == "yarn":
            # llama.cpp's llama/qwen2 take beta_fast 32, beta_slow 1, full extrapolation and the
            # attention factor 0.1 ln(factor) + 1 as fixed; transformers honours these options
            fixed = {"beta_fast": 32, "beta_slow": 1, "extrapolation_factor": 1, "truncate": True}
            for name, value in rs.items():
                if name in fixed and value is not None and value != fixed[name]:
                    raise PyllmError(f"{cfg}: rope_scaling {name} = {value} is not supported "
                                     f"(llama.cpp runs {a} YaRN with {name} = {fixed[name]})")
                if name in ("attention_factor", "attn_factor", "mscale", "mscale_all_dim") and value is not None:
                    raise PyllmError(f"{cfg}: rope_scaling {name} = {value} is not supported "
                                     f"(llama.cpp runs {a} YaRN with the attention factor 0.1 ln(factor) + 1)")
            orig = rs.get("original_max_position_embeddings") or hp.get("max_position_embeddings")
            w.add_u32(f"{a}.rope.scaling.original_context_length", orig)

    def add_general(self, w: GGUFWriter, total_params: int):
        """general.* from the model card and directory name (gguf-py's Metadata, as the converter)."""
        import gguf

        w.add_string("general.type", "model")
        try:
            meta = gguf.Metadata.load(None, self.dir, None, total_params)
        except Exception:  # a malformed model card must not stop a conversion
            meta = gguf.Metadata()
        if not meta.name:
            meta.name = self.dir.name
        if meta.size_label is None and total_params > 0:
            meta.size_label = gguf.size_label(total_params, 0, 0, 0)
        collector = gguf.GGUFWriter(path=None, arch="none")
        meta.set_gguf_meta_model(collector)
        vocab_mod.copy_gguf_kv(w, collector, skip=("general.architecture",))

    def add_vocab(self, w: GGUFWriter, tokenizer: Path | None):
        d = self.dir
        if tokenizer is not None:
            tokenizer = Path(tokenizer)
            if tokenizer.is_dir():
                d, tokenizer = tokenizer, None
            elif not tokenizer.is_file():
                raise PyllmError(f"tokenizer not found: {tokenizer}")
        if tokenizer is None:
            if (d / "tokenizer.model").is_file():
                tokenizer = d / "tokenizer.model"
            elif (d / "tokenizer.json").is_file():
                tokenizer = d / "tokenizer.json"
            else:
                raise PyllmError(f"{d}: no tokenizer.model or tokenizer.json found (pass --tokenizer PATH)")
        tdir = tokenizer.parent
        special_dir = tdir if (tdir / "tokenizer_config.json").is_file() or tdir == self.dir else self.dir
        if tokenizer.suffix == ".json":
            vocab_mod.add_gpt2_vocab(w, tokenizer, self.vocab_size, special_dir=special_dir)
        else:
            vocab_mod.add_spm_vocab(w, tokenizer, self.vocab_size, model_dir=tdir, special_dir=special_dir)
        # LlamaModel.set_vocab extras
        if self.arch == "llama":
            if self.vocab_size == 32016:  # CodeLlama
                for name, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
                    w.add_u32(f"tokenizer.ggml.{name}_token_id", tid)
            cfg = special_dir / "tokenizer_config.json"
            if cfg.is_file():
                tc = _read_json(cfg)
                if "add_prefix_space" in tc:
                    w.add_bool("tokenizer.ggml.add_space_prefix", bool(tc["add_prefix_space"]))
            if self.vocab_size == 49152:  # "granite small models" rule; it is also what SmolLM's GGUFs carry
                w.add_bool("tokenizer.ggml.add_bos_token", False)

    # -- tensors -------------------------------------------------------------------------
    def expected_shape(self, gname: str) -> tuple[int, ...] | None:
        h, hd = self.hidden, self.head_dim
        q, kv = self.n_head * hd, self.n_kv * hd
        table = {
            "token_embd.weight": (self.vocab_size, h), "output.weight": (self.vocab_size, h),
            "output_norm.weight": (h,), "attn_norm.weight": (h,), "ffn_norm.weight": (h,),
            "attn_q.weight": (q, h), "attn_k.weight": (kv, h), "attn_v.weight": (kv, h), "attn_output.weight": (h, q),
            "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,), "attn_output.bias": (h,),
            "ffn_gate.weight": (self.n_ff, h), "ffn_up.weight": (self.n_ff, h), "ffn_down.weight": (h, self.n_ff),
        }
        return table.get(re.sub(r"^blk\.\d+\.", "", gname))

    def plan_tensors(self, st: SafetensorsModel):
        """[(gguf name, shape, read_f32(r0, r1), row_multiple)] in output order."""
        plan = []
        if self.arch == "llama":
            rs = self.hp.get("rope_scaling") or {}
            if rs.get("rope_type", "").lower() == "llama3":
                factors = llama3_rope_factors(self.hp)
                plan.append(("rope_freqs.weight", factors.shape, lambda r0, r1, f=factors: f.reshape(1, -1), 1))
        seen = set()
        for name, t in st.tensors.items():
            if name.endswith(_SKIP):
                continue
            gname = map_name(name)
            if gname is None:
                raise PyllmError(f"cannot map tensor {name!r} of a {self.hf_arch} checkpoint to a GGUF name")
            if gname == "output.weight" and self.tied:
                continue  # tied: llama.cpp uses token_embd for the output
            m = re.match(r"blk\.(\d+)\.", gname)
            if m and int(m.group(1)) >= self.n_layer:
                raise PyllmError(f"tensor {name} is for layer {m.group(1)} but config.json has {self.n_layer} layers")
            want = self.expected_shape(gname)
            if want is not None and tuple(t.shape) != want:
                raise PyllmError(f"shape mismatch: {name} is {list(t.shape)}, config.json implies {list(want)}")
            seen.add(gname)
            plan.append((gname, tuple(t.shape), self._reader(t, gname), self._row_multiple(gname)))
        required = ["token_embd.weight", "output_norm.weight"] + ([] if self.tied else ["output.weight"])
        for i in range(self.n_layer):
            required += [f"blk.{i}.{n}" for n in ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                                                   "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight",
                                                   "ffn_up.weight", "ffn_down.weight")]
        missing = [n for n in required if n not in seen]
        if missing:
            hint = " (lm_head.weight: set tie_word_embeddings?)" if missing == ["output.weight"] else ""
            raise PyllmError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[0]}{hint}")
        return plan

    def _heads(self, gname):
        if self.arch != "llama":
            return None
        if gname.endswith(("attn_q.weight", "attn_q.bias")):
            return self.n_head
        if gname.endswith(("attn_k.weight", "attn_k.bias")):
            return self.n_kv
        return None

    def _row_multiple(self, gname):
        return self.head_dim if self._heads(gname) and gname.endswith(".weight") else 1

    def _reader(self, t, gname):
        n_heads = self._heads(gname)
        if len(t.shape) <= 1:
            def read(r0, r1):
                x = t.to_f32().reshape(-1)
                if n_heads:
                    x = permute(x, n_heads)
                return x.reshape(1, -1)
            return read

        def read(r0, r1):
            x = t.to_f32(r0, r1)
            if n_heads:  # a block of whole heads: permute within each
                x = permute(x, (r1 - r0) // self.head_dim)
            return x.reshape(r1 - r0, -1)

        return read


def convert_hf(src, out, outtype: str = "f16", tokenizer=None, vocab_only: bool = False, progress: bool = False,
               log=None) -> QuantizeReport:
    """Convert a Hugging Face model directory to GGUF file `out`; returns the per-tensor report."""
    model = HFModel(src)
    ft = parse_file_type(outtype)
    w = GGUFWriter(out)
    w.add_string("general.architecture", model.arch)
    plan = [] if vocab_only else model.plan_tensors(SafetensorsModel(model.dir))
    total = sum(int(np.prod(s)) for _, s, _, _ in plan)
    model.add_general(w, total)
    model.add_parameters(w, ft)
    model.add_vocab(w, tokenizer)
    w.add_u32("general.quantization_version", 2)
    if vocab_only:
        w.remove("general.file_type")

    info = ModelInfo(model.arch, model.n_layer, model.n_head, model.n_kv)
    shapes = {name: shape for name, shape, _, _ in plan}
    types = choose_types({n: (s, GGMLType.F32) for n, s in shapes.items()}, ft, info)
    for name, shape, read, mult in plan:
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        w.add_tensor(name, shape, types[name], chunked(rows, shape[-1], read, types[name], row_multiple=mult))

    report = QuantizeReport()
    src_bytes = {}
    st_types = {}
    if plan:
        st = SafetensorsModel(model.dir)
        for hf_name, t in st.tensors.items():
            g = map_name(hf_name)
            if g:
                src_bytes[g], st_types[g] = t.nbytes, t.dtype

    def on_tensor(t):
        tin = {"F16": GGMLType.F16, "BF16": GGMLType.BF16}.get(st_types.get(t.name), GGMLType.F32)
        r = TensorReport(t.name, t.shape, tin, t.qtype, src_bytes.get(t.name, t.nbytes), t.nbytes)
        report.tensors.append(r)
        if log:
            log(format_tensor_line(len(report.tensors), len(plan), r))

    w.write(progress=progress, on_tensor=on_tensor, description=f"convert {ft.name}")
    return report
