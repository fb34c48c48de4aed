"""`pyllm convert`: Hugging Face and llama2.c checkpoints -> GGUF, against oracles.

Oracles: the official llama.cpp conversion ../shared/models/gguf/stories260K.gguf (tensors and
tokenizer must be identical), transformers' logits for tiny random models in tests/fixtures
(made once by tests/fixtures/make_fixtures.py), and SmolLM2's own GGUF vocabulary.
"""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_file
from pyllm.base import GGMLType, PyllmError
from pyllm.convert.gguf_writer import GGUFWriter
from pyllm.convert.hf import convert_hf, permute
from pyllm.convert.llama2c import convert_llama2c
from pyllm.convert.safetensors_file import SafetensorsModel
from pyllm.convert.vocab import detect_pre
from pyllm.runtime.gguf_file import GGUFFile

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")
HPARAM_KEYS = ("general.architecture", "llama.embedding_length", "llama.feed_forward_length",
               "llama.attention.head_count", "llama.attention.head_count_kv", "llama.block_count",
               "llama.rope.dimension_count",
               "llama.attention.layer_norm_rms_epsilon")


def same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


def assert_tensor_equal(ours: GGUFFile, ref: GGUFFile, name: str, ref_name: str | None = None):
    a, b = ours.tensors[name], ref.tensors[ref_name or name]
    assert a.dims == b.dims and a.qtype == b.qtype, name
    assert np.array_equal(ours.raw(name), ref.raw(ref_name or name)), name


def no_leftovers(directory: Path):
    return [p.name for p in directory.iterdir() if p.name.endswith(".partial")]


# -- stories260K: the official conversion is the oracle ------------------------------------

def test_stories_hf_matches_official(tmp_path, stories260k):
    src = shared_file("derived/stories260K-hf")
    out = tmp_path / "s.gguf"
    convert_hf(src, out, "f32")
    ours, ref = GGUFFile(out), GGUFFile(stories260k)
    # tied embeddings: no output.weight (llama.cpp's converter writes none); the official file
    # (from the llama2.c converter) stores the same matrix again.
    assert set(ref.tensors) - set(ours.tensors) == {"output.weight"}
    assert set(ours.tensors) <= set(ref.tensors)
    for name in ours.tensors:  # Q/K permuted back to llama.cpp's layout: byte-identical
        assert_tensor_equal(ours, ref, name)
    assert_tensor_equal(ours, ref, "token_embd.weight", "output.weight")
    for key in TOKENIZER_KEYS + HPARAM_KEYS:
        assert same(ours.metadata[key], ref.metadata[key]), key
    assert ours.metadata["tokenizer.ggml.pre"] == "default"
    assert ours.metadata["general.file_type"] == 0
    assert ours.metadata["llama.context_length"] == 512
    assert ours.metadata["llama.rope.freq_base"] == 10000.0


@pytest.mark.parametrize("tok", ["tok512.bin", "tok512.model", "tok512.model as .bin"])
def test_stories_llama2c_matches_official(tmp_path, stories260k, tok):
    src = shared_file("llama2c/stories260K.bin")
    out = tmp_path / "s.gguf"
    tok_file = shared_file(f"llama2c/{tok.split()[0]}")
    if tok.endswith("as .bin"):  # a SentencePiece protobuf under another name: recognised by parsing it
        tok_file = shutil.copy(tok_file, tmp_path / "tokenizer.bin")
    convert_llama2c(src, out, tok_file, "f32")
    ours, ref = GGUFFile(out), GGUFFile(stories260k)
    assert list(ours.tensors) == list(ref.tensors)  # same names, same order
    for name in ref.tensors:
        assert_tensor_equal(ours, ref, name)
    for key, value in ref.metadata.items():
        if key != "llama.context_length":  # the C++ tool takes it from a flag; we use the header's seq_len
            assert same(ours.metadata[key], value), key
            assert ours.value_types[key] == ref.value_types[key], key
    assert ours.metadata["llama.context_length"] == 512


def test_llama2c_f16_and_cli(tmp_path, stories260k):
    from pyllm.cli.main import main

    out = tmp_path / "s16.gguf"
    rc = main(["convert", str(shared_file("llama2c/stories260K.bin")), "-o", str(out),
               "--tokenizer", str(shared_file("llama2c/tok512.bin")), "-q"])
    assert rc == 0
    ours, ref = GGUFFile(out), GGUFFile(stories260k)
    assert ours.metadata["general.file_type"] == 1  # default outtype f16, like llama.cpp's converter
    for name, t in ours.tensors.items():
        if len(t.dims) == 1:
            assert t.qtype == GGMLType.F32
            assert_tensor_equal(ours, ref, name)
        else:
            assert t.qtype == GGMLType.F16
            assert np.array_equal(ours.raw(name).view(np.float16), ref.raw(name).view(np.float32).astype(np.float16))


def write_llama2c_checkpoint(path, vocab, dim=8, hidden=16, layers=1, heads=2, kv_heads=2, seq_len=8, seed=0):
    """A random llama2.c version-0 checkpoint, laid out as llama2.c's run.c reads it (header of
    7 int32, then the float32 arrays; the shared classifier is not stored)."""
    head = dim // heads
    kv_dim = kv_heads * head
    n = (vocab * dim + layers * dim + layers * dim * dim + 2 * layers * kv_dim * dim + layers * dim * dim
         + layers * dim + 3 * layers * hidden * dim + dim + seq_len * head)  # ... rms_final, freq_cis_real+imag
    w = np.random.default_rng(seed).standard_normal(n).astype(np.float32) * 0.1
    path.write_bytes(struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab, seq_len) + w.tobytes())


def write_llama2c_tokenizer(path, pieces, max_token_length=None):
    """llama2.c's tokenizer.bin layout (tokenizer.py export): int32 max_token_length, then per
    piece float32 score, int32 length, bytes."""
    if max_token_length is None:
        max_token_length = max(len(p) for p in pieces)
    out = [struct.pack("<i", max_token_length)]
    for i, p in enumerate(pieces):
        out.append(struct.pack("<fi", -float(i), len(p)) + p)
    path.write_bytes(b"".join(out))


# the first int32 of these files is the longest piece's length; 10 makes its first byte 0x0a,
# which is also how a SentencePiece protobuf starts
@pytest.mark.parametrize("longest", [1, 10, 16, 255])
def test_llama2c_tokenizer_any_longest_piece(tmp_path, longest):
    from pyllm.cli.main import main
    from pyllm.runtime.tokenizer import Tokenizer

    pieces = [b"u", b"b", b"e", b"a", b" ", b"", b"<0x41>"[:longest], b"z" * longest]
    pieces = [p[:longest] for p in pieces]
    ckpt, tok, out = tmp_path / "m.bin", tmp_path / "tok8.bin", tmp_path / "m.gguf"
    write_llama2c_checkpoint(ckpt, len(pieces))
    write_llama2c_tokenizer(tok, pieces)
    assert tok.read_bytes()[0] == longest
    assert main(["convert", str(ckpt), "-o", str(out), "--tokenizer", str(tok), "-q", "--outtype", "f32"]) == 0
    meta = GGUFFile(out).metadata
    # convert-llama2c-to-ggml's load_vocab: ids 0..2 renamed, spaces as U+2581, empty -> control,
    # <0xNN> -> byte; scores as stored
    want = ["<unk>", "<s>", "</s>"] + [p.decode().replace(" ", "\u2581") for p in pieces[3:]]
    assert list(meta["tokenizer.ggml.tokens"]) == want
    assert list(meta["tokenizer.ggml.scores"]) == [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3, 1, 1, 3, 6 if longest >= 4 else 1, 1]  # UNKNOWN, CONTROL, NORMAL, BYTE
    assert list(meta["tokenizer.ggml.token_type"]) == types
    assert Tokenizer.from_metadata(meta).encode("a", add_bos=False) == [4, 3]  # the space prefix, then "a"


def test_llama2c_tokenizer_truncated_or_wrong_size(tmp_path, capsys):
    from pyllm.cli.main import main

    pieces = [b"u", b"b", b"e", b"ab", b"cd", b"ef", b"gh", b"ij"]
    ckpt, tok, out = tmp_path / "m.bin", tmp_path / "tok8.bin", tmp_path / "m.gguf"
    write_llama2c_checkpoint(ckpt, len(pieces))
    write_llama2c_tokenizer(tok, pieces)
    full = tok.read_bytes()
    for data, reason in ((full[:-5], "truncated"), (full[:7], "truncated"), (full + full[4:14], "bytes left after")):
        tok.write_bytes(data)
        assert main(["convert", str(ckpt), "-o", str(out), "--tokenizer", str(tok), "-q"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {tok}: not a llama2.c tokenizer (") and reason in err, err
        assert "not a SentencePiece model" in err and "\n" not in err
        assert not out.exists() and not no_leftovers(tmp_path)


# -- tiny random HF models: transformers' logits are the oracle ----------------------------

@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen2-yarn", "llama-bias"])
def test_tiny_hf_logits_match_transformers(tmp_path, arch):
    """qwen2-yarn: YaRN rope scaling over 320 positions, past its 256-token original context;
    llama-bias: attention_bias=true, so attn_output.bias too."""
    import pyllm

    src = FIXTURES / f"tiny-{arch}"
    out = tmp_path / f"{arch}.gguf"
    convert_hf(src, out, "f32")
    ref = np.load(src / "logits.npz")
    model = pyllm.load(out, cache_type_k="f32", cache_type_v="f32")  # float32 throughout, as transformers ran
    logits = model.logits([int(i) for i in ref["ids"]])
    assert np.abs(logits - ref["logits"]).max() <= 1e-4


def test_tiny_hf_metadata_and_layout(tmp_path):
    cfg = {a: json.loads((FIXTURES / f"tiny-{a}" / "config.json").read_text()) for a in ("llama", "mistral", "qwen2")}
    g = {}
    for a in cfg:
        convert_hf(FIXTURES / f"tiny-{a}", tmp_path / f"{a}.gguf", "f32")
        g[a] = GGUFFile(tmp_path / f"{a}.gguf")
    # MistralForCausalLM is written as llama (convert_hf_to_gguf.py registers it on LlamaModel)
    assert [g[a].architecture for a in ("llama", "mistral", "qwen2")] == ["llama", "llama", "qwen2"]
    assert g["mistral"].metadata["llama.attention.head_count_kv"] == 2
    assert g["qwen2"].metadata["qwen2.rope.freq_base"] == 1e6
    assert "qwen2.rope.dimension_count" not in g["qwen2"].metadata  # Qwen2Model does not write it
    # llama3 rope scaling -> rope_freqs.weight (head_dim / 2 factors between 1 and 8)
    f = g["llama"].array("rope_freqs.weight")
    assert f.shape == (8,) and f[0] == 1.0 and f[-1] == 8.0
    # tied embeddings: no output.weight; untied: output.weight
    assert "output.weight" not in g["qwen2"].tensors and "output.weight" in g["llama"].tensors
    # qwen2 biases, unpermuted (NEOX rope); llama q permuted
    st = SafetensorsModel(FIXTURES / "tiny-qwen2")
    q = st["model.layers.0.self_attn.q_proj.weight"].to_f32()
    assert np.array_equal(g["qwen2"].array("blk.0.attn_q.weight"), q)
    assert np.array_equal(g["qwen2"].array("blk.1.attn_k.bias"), st["model.layers.1.self_attn.k_proj.bias"].to_f32())
    st = SafetensorsModel(FIXTURES / "tiny-mistral")  # sharded, f16
    assert len(st.files) == 2
    k = st["model.layers.1.self_attn.k_proj.weight"].to_f32()
    assert np.array_equal(g["mistral"].array("blk.1.attn_k.weight"), permute(k, 2))
    # tokenizer: SentencePiece + tokenizer_config.json (special ids, add_bos, chat template)
    m = g["llama"].metadata
    assert m["tokenizer.ggml.model"] == "llama" and len(m["tokenizer.ggml.tokens"]) == 512
    assert m["tokenizer.ggml.bos_token_id"] == 1 and m["tokenizer.ggml.add_bos_token"] is True
    assert m["tokenizer.ggml.add_eos_token"] is False
    assert m["tokenizer.chat_template"].startswith("{% for m in messages %}")
    assert m["general.file_type"] == 0 and m["general.quantization_version"] == 2
    assert m["general.name"]


def test_tiny_hf_outtypes(tmp_path):
    src = FIXTURES / "tiny-llama"  # bf16 weights
    st = SafetensorsModel(src)
    for outtype, qtype in (("f16", GGMLType.F16), ("bf16", GGMLType.BF16), ("q8_0", GGMLType.Q8_0)):
        out = tmp_path / f"{outtype}.gguf"
        convert_hf(src, out, outtype)
        g = GGUFFile(out)
        for name, t in g.tensors.items():
            want = GGMLType.F32 if len(t.dims) == 1 else qtype
            assert t.qtype == want, (outtype, name)
        if qtype == GGMLType.BF16:  # bf16 -> bf16 is lossless
            raw = st["model.layers.0.mlp.down_proj.weight"].raw()
            assert np.array_equal(g.raw("blk.0.ffn_down.weight").view(np.uint16).reshape(raw.shape), raw)


def test_rope_scaling_and_options_written_or_refused(tmp_path):
    """YaRN and linear keys as llama.cpp's converter writes them; options that neither GGUF nor
    llama.cpp's llama/qwen2 carry are refused, so no file runs without them."""
    out = tmp_path / "v.gguf"
    convert_hf(FIXTURES / "tiny-qwen2-yarn", out, vocab_only=True)
    m = GGUFFile(out).metadata
    assert (m["qwen2.rope.scaling.type"], m["qwen2.rope.scaling.factor"]) == ("yarn", 4.0)
    assert m["qwen2.rope.scaling.original_context_length"] == 256 and m["qwen2.context_length"] == 1024
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256}
    refused = [
        ("tiny-qwen2", {"rope_parameters": {**yarn, "beta_fast": 16}}, "beta_fast = 16 is not supported"),
        ("tiny-qwen2", {"rope_parameters": {**yarn, "attention_factor": 1.0}}, "attention_factor = 1.0 is not supp"),
        ("tiny-qwen2", {"rope_parameters": {**yarn, "mscale": 0.7, "mscale_all_dim": 0.7}}, "mscale = 0.7"),
        ("tiny-qwen2", {"rope_parameters": {**yarn, "truncate": False}}, "truncate = False"),
        ("tiny-qwen2", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}},
         "rope_scaling type 'dynamic' is not supported"),
        ("tiny-qwen2", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e6}},
         "rope_scaling type 'llama3' is not supported"),
        ("tiny-llama", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "'longrope' is not supp"),
        ("tiny-qwen2", {"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window is not supported"),
        ("tiny-llama", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ]
    for name, change, match in refused:
        d = _copy_fixture(tmp_path / name, name)
        _edit_config(d, **change)
        with pytest.raises(PyllmError, match=match):
            convert_hf(d, tmp_path / "o.gguf")
        assert not (tmp_path / "o.gguf").exists()
    d = _copy_fixture(tmp_path / "m", "tiny-mistral")
    _edit_config(d, sliding_window=128, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    convert_hf(d, out, vocab_only=True)
    m = GGUFFile(out).metadata
    assert m["llama.attention.sliding_window"] == 128  # pyllm then keeps the context within it
    assert (m["llama.rope.scaling.type"], m["llama.rope.scaling.factor"]) == ("linear", 2.0)


def test_llama3_rope_factors_formula():
    from pyllm.convert.hf import llama3_rope_factors

    hp = {"hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 500000.0,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}}
    f = llama3_rope_factors(hp)
    assert f.shape == (64,) and f.dtype == np.float32
    assert f[0] == 1.0 and f[-1] == 8.0 and np.all(np.diff(f) >= 0)


# -- vocabularies ----------------------------------------------------------------------------

def test_gpt2_vocab_matches_smollm2_gguf(tmp_path, smollm2):
    src = shared_file("hf/SmolLM2-135M-Instruct")
    out = tmp_path / "vocab.gguf"
    convert_hf(src, out, vocab_only=True)
    ours, ref = GGUFFile(out), GGUFFile(smollm2)
    assert not ours.tensors
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.vocab_size", "llama.rope.dimension_count"):
        assert same(ours.metadata[key], ref.metadata[key]), key
        assert ours.value_types[key] == ref.value_types[key], key
    assert ours.metadata["tokenizer.ggml.pre"] == "smollm"


def test_gpt2_vocab_tokenizer_config(tmp_path, smollm2):
    """The shared copy has no tokenizer_config.json; rebuild SmolLM2's and check the keys it drives."""
    ref = GGUFFile(smollm2).metadata
    d = tmp_path / "smol"
    d.mkdir()
    src = shared_file("hf/SmolLM2-135M-Instruct")
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(src / f, d / f)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "chat_template": ref["tokenizer.chat_template"]}))
    out = tmp_path / "v.gguf"
    convert_hf(d, out, vocab_only=True)
    ours = GGUFFile(out).metadata
    for key in ("tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template"):
        assert ours[key] == ref[key], key


def test_detect_pre():
    from pyllm.convert.vocab import _LLAMA3_RE, _QWEN2_RE

    def split(regex):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}}

    assert detect_pre(split(_LLAMA3_RE)) == "llama-bpe"
    assert detect_pre(split(_QWEN2_RE)) == "qwen2"
    assert detect_pre({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}) == "gpt-2"
    assert detect_pre(split(r"\s+")) is None


# -- errors: one line, nothing left behind ---------------------------------------------------

def _copy_fixture(tmp_path, name="tiny-llama"):
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d, dirs_exist_ok=True)
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_unsupported_architecture(tmp_path):
    d = _copy_fixture(tmp_path)
    _edit_config(d, architectures=["GPT2LMHeadModel"])
    with pytest.raises(PyllmError,
                       match="unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        convert_hf(d, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_shape_mismatch(tmp_path):
    d = _copy_fixture(tmp_path)
    _edit_config(d, intermediate_size=96)
    with pytest.raises(PyllmError, match="shape mismatch: model.layers.0.mlp.*config.json implies"):
        convert_hf(d, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists() and not no_leftovers(tmp_path)


def test_missing_tokenizer(tmp_path):
    d = _copy_fixture(tmp_path)
    (d / "tokenizer.model").unlink()
    with pytest.raises(PyllmError, match="no tokenizer.model or tokenizer.json"):
        convert_hf(d, tmp_path / "o.gguf")
    lone = tmp_path / "alone" / "stories260K.bin"  # no tok512.bin beside it to fall back on
    lone.parent.mkdir()
    shutil.copy(shared_file("llama2c/stories260K.bin"), lone)
    with pytest.raises(PyllmError, match="needs its tokenizer"):
        convert_llama2c(lone, tmp_path / "o.gguf", None)
    assert not (tmp_path / "o.gguf").exists()


def test_interrupt_leaves_no_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"previous")
    calls = []
    orig = SafetensorsModel.__init__

    def boom(self, *a, **k):
        orig(self, *a, **k)
        t = self.tensors["model.layers.1.mlp.up_proj.weight"]
        t.to_f32 = lambda *x: (calls.append(1), (_ for _ in ()).throw(KeyboardInterrupt()))[1]

    monkeypatch.setattr(SafetensorsModel, "__init__", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_hf(FIXTURES / "tiny-llama", out, "f32")
    assert calls and out.read_bytes() == b"previous"  # the old file is untouched, no temp file left
    assert not no_leftovers(tmp_path)


def test_cli_errors(tmp_path, capsys):
    from pyllm.cli.main import main

    src = FIXTURES / "tiny-llama"
    assert main(["convert", str(src), "-o", str(tmp_path / "o.gguf"), "--outtype", "q9_9"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown type 'q9_9'") and "\n" not in err
    d = _copy_fixture(tmp_path)
    assert main(["convert", str(d), "-o", str(d / "model.safetensors")]) == 1
    assert "refusing to overwrite the input" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nothing"), "-o", str(tmp_path / "o.gguf")]) == 1
    assert not (tmp_path / "o.gguf").exists()


def test_writer_roundtrip(tmp_path):
    """The writer's output reads back with gguf-py's reader (an independent parser)."""
    from gguf import GGUFReader

    w = GGUFWriter(tmp_path / "w.gguf")
    w.add_string("general.architecture", "llama")
    w.add_u32("llama.block_count", 3)
    w.add_array("tokenizer.ggml.tokens", ["a", "b c"], 8)
    x = np.arange(96, dtype=np.float32).reshape(3, 32)
    w.add_tensor("a.weight", x.shape, GGMLType.F32, lambda: x)
    w.add_tensor("b.weight", x.shape, GGMLType.F16, lambda: (x[i:i + 1].astype(np.float16) for i in range(3)))
    w.write()
    r = GGUFReader(tmp_path / "w.gguf")
    assert [t.name for t in r.tensors] == ["a.weight", "b.weight"]
    assert np.array_equal(r.tensors[0].data, x) and np.array_equal(r.tensors[1].data, x.astype(np.float16))
    assert r.fields["llama.block_count"].parts[-1][0] == 3
