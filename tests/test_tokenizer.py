"""Tokenizer tests against oracles only: llama.cpp's test vectors, sentencepiece and HF tokenizers.

No expected id is typed by hand: every expectation comes from a reference implementation
(or from the vocabulary itself, looked up by token text).
"""

import copy
import functools
import json
import subprocess

import pytest
from conftest import shared_file
from pyllm.base import PyllmError
from pyllm.runtime.gguf_file import GGUFFile
from pyllm.runtime.tokenizer import IncrementalDecoder, Tokenizer

TEXTS = ("tinyshakespeare.txt", "tinystories_valid_head.txt", "wikitext-2-raw-wiki.test.raw")

# tricky strings: digits, contractions, whitespace runs, newlines, CRLF, non-ASCII
EXTRA = [
    "", " ", "  ", "\n", "\n\n\n", "\t", " \t\n", "Hello world", " Hello world", "Hello  world ", "Hello\n\nworld\n",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "3 33 333 3333 33333 333333 1234567890 3.14159 1,000,000 v2.0.1",
    "line one\r\nline two\r\n\r\n  indented\tTAB",
    "héllo wörld façade naïve Ελληνικά Русский текст",
    "日本語のテキスト 中文文本 한국어 텍스트",
    "emoji 🦙🤖 👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "math ½ ∑ x² ≤ ∞ — “quotes” ‘single’ … ¿qué? ¡sí!",
    "```python\ndef f(x):\n    return x ** 2  # square\n```",
    "ｆｕｌｌｗｉｄｔｈ　ｓｐａｃｅ\u3000and\u00a0nbsp\u2028sep\x1cx\x85y",
]


def _read(name: str) -> str:
    with open(shared_file(f"text/{name}"), encoding="utf-8", newline="") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def _samples(n_lines: int = 200, chunk: int = 8000, n_chunks: int = 3) -> list:
    """First n_lines lines (with their line endings) of each text, a few whole chunks, EXTRA."""
    out = list(EXTRA)
    for name in TEXTS:
        text = _read(name)
        out += text.splitlines(keepends=True)[:n_lines]
        for k in range(n_chunks):
            start = (k + 1) * len(text) // (n_chunks + 1)
            out.append(text[start : start + chunk])
    return tuple(out)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _sentencepiece(rel: str):
    """A SentencePieceProcessor for a .model file, with remove_extra_whitespaces forced off.

    llama.cpp's SPM tokenizer never collapses whitespace (GGUF files do not record that
    normalizer flag), while tok512.model leaves it at its default (on). The flag is
    NormalizerSpec field 4 inside ModelProto field 3; a later occurrence of a scalar field
    overrides an earlier one in protobuf, so appending `4: false` is enough.
    """
    spm = pytest.importorskip("sentencepiece")
    data = shared_file(rel).read_bytes()
    out, i = bytearray(), 0
    while i < len(data):
        start = i
        key = 0
        shift = 0
        while True:
            c = data[i]
            i += 1
            key |= (c & 0x7F) << shift
            shift += 7
            if c < 0x80:
                break
        wire = key & 7
        if wire == 0:
            while data[i] & 0x80:
                i += 1
            i += 1
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n = shift = 0
            while True:
                c = data[i]
                i += 1
                n |= (c & 0x7F) << shift
                shift += 7
                if c < 0x80:
                    break
            if key >> 3 == 3:  # normalizer_spec
                body = data[i : i + n] + b"\x20\x00"
                out += _varint(key) + _varint(len(body)) + body
                i += n
                continue
            i += n
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        out += data[start:i]
    return spm.SentencePieceProcessor(model_proto=bytes(out))


def _tok(path) -> Tokenizer:
    return Tokenizer.from_metadata(GGUFFile(path).metadata)


@pytest.fixture(scope="module")
def llama_spm():
    return _tok(shared_file("gguf-vocab/ggml-vocab-llama-spm.gguf"))


@pytest.fixture(scope="module")
def smol(smollm2):
    return _tok(smollm2)


@pytest.fixture(scope="module")
def smol_meta(smollm2):
    return GGUFFile(smollm2).metadata


@pytest.fixture(scope="module")
def hf_smol():
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(shared_file("hf/SmolLM2-135M-Instruct/tokenizer.json")))


# --- SentencePiece ("llama") ------------------------------------------------------------------

def test_llama_cpp_test_vectors(llama_spm):
    """llama.cpp's test-tokenizer-0 vectors: add_special=false, parse_special=false."""
    path = shared_file("gguf-vocab/ggml-vocab-llama-spm.gguf")
    inputs = path.with_name(path.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = path.with_name(path.name + ".out").read_text(encoding="utf-8").split("\n")
    if inputs and inputs[-1] == "":
        inputs.pop()
    outputs = outputs[: len(inputs)]
    assert len(inputs) == len(outputs) and len(inputs) > 40
    for text, line in zip(inputs, outputs):
        expected = [int(x) for x in line.split()]
        assert llama_spm.encode(text, add_bos=False, parse_special=False) == expected, repr(text)


@pytest.mark.parametrize("model_file,gguf_file", [
    ("llama2c/tokenizer.model", "gguf-vocab/ggml-vocab-llama-spm.gguf"),
    ("llama2c/tok512.model", "gguf/stories260K.gguf"),
])
def test_spm_matches_sentencepiece(model_file, gguf_file):
    sp = _sentencepiece(model_file)
    tok = _tok(shared_file(gguf_file))
    assert tok.model == "llama" and tok.n_vocab == sp.get_piece_size()
    assert (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id())
    assert tok.add_bos and not tok.add_eos
    for text in _samples():
        ref = sp.encode(text)
        assert tok.encode(text, add_bos=False) == ref, repr(text[:80])
        ids = tok.encode(text)
        assert ids == [sp.bos_id()] + ref
        assert tok.decode(ids) == sp.decode(ref) == text, repr(text[:80])
        assert tok.encode(text, add_bos=True, add_eos=True) == [sp.bos_id()] + ref + [sp.eos_id()]
    # sentencepiece does not parse special tokens: neither do we with parse_special=False
    for text in ["Hi <s> there</s>", "<unk><s>x", "a <0x41> b"]:
        assert tok.encode(text, add_bos=False, parse_special=False) == sp.encode(text)


def test_spm_whole_text_matches_sentencepiece(llama_spm):
    sp = _sentencepiece("llama2c/tokenizer.model")
    text = _read("wikitext-2-raw-wiki.test.raw")[:150_000]
    ids = llama_spm.encode(text, add_bos=False)
    assert ids == sp.encode(text)
    assert llama_spm.decode([llama_spm.bos_id] + ids) == text


def test_spm_special_tokens_and_pieces(llama_spm):
    tok = llama_spm
    bos, eos = tok.bos_id, tok.eos_id
    assert tok.token_text(bos) == "<s>" and tok.is_control(bos) and tok.is_control(eos)
    # parse_special splits control tokens out; the text after one gets the space prefix again
    hello = _sentencepiece("llama2c/tokenizer.model").encode("Hello")  # the reference's ids
    assert tok.encode("<s>Hello", add_bos=False) == [bos] + hello
    assert tok.encode("Hello</s><s>Hello", add_bos=False) == hello + [eos, bos] + hello
    assert tok.encode("") == [bos] and tok.encode("", add_bos=False) == []
    # token bytes
    assert tok.token_bytes(tok.token_to_id["▁Hello"]) == b" Hello"
    assert tok.token_bytes(tok.token_to_id["<0x0A>"]) == b"\n"
    assert tok.token_bytes(bos) == b"" and tok.token_text(tok.token_to_id["▁Hello"]) == "▁Hello"
    assert tok.decode([bos, tok.token_to_id["▁Hello"], eos]) == "Hello"
    assert tok.decode([bos, tok.token_to_id["▁Hello"], eos], skip_special=False) == "<s> Hello</s>"
    assert tok.decode([tok.token_to_id["<0xE6>"]]) == "\ufffd"
    assert tok.eog_ids == frozenset({eos})


# --- byte-level BPE ("gpt2") ------------------------------------------------------------------

def test_bpe_matches_hf_tokenizers(smol, hf_smol):
    assert smol.model == "gpt2" and smol.n_vocab == hf_smol.get_vocab_size()
    assert smol.add_bos is False and smol.add_eos is False
    for text in _samples():
        ref = hf_smol.encode(text, add_special_tokens=False).ids
        ids = smol.encode(text)
        assert ids == ref, repr(text[:80])
        assert smol.decode(ids) == hf_smol.decode(ref) == text


def test_bpe_special_tokens(smol, hf_smol):
    chat = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n"
            "<|im_start|>user\nWhat's 12+30? Don't  say\t\n\n<|im_end|>\n<|im_start|>assistant\n")
    for text in [chat, "<|endoftext|>x<|im_end|><|im_end|>", "a<|im_start|>", "<|im_start|><|im_start|>user"]:
        ref = hf_smol.encode(text, add_special_tokens=False).ids
        ids = smol.encode(text)
        assert ids == ref
        assert smol.decode(ids, skip_special=False) == text
        assert smol.decode(ids) == hf_smol.decode(ref, skip_special_tokens=True)
    im_start = smol.token_to_id["<|im_start|>"]
    assert smol.is_control(im_start) and smol.token_bytes(im_start) == b""
    # without parse_special the markers are plain text
    plain = smol.encode("<|im_start|>", parse_special=False)
    assert im_start not in plain and smol.decode(plain) == "<|im_start|>"


def test_smollm2_eog_ids(smol):
    im_end = smol.token_to_id["<|im_end|>"]
    assert smol.eos_id is not None and smol.eos_id in smol.eog_ids
    assert im_end in smol.eog_ids
    assert smol.token_to_id["<|endoftext|>"] in smol.eog_ids
    assert smol.token_to_id["<|im_start|>"] not in smol.eog_ids


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("pre,split,ignore_merges", [("llama-bpe", LLAMA3_SPLIT, True), ("qwen2", QWEN2_SPLIT, False)])
def test_bpe_other_pre_tokenizers(smol_meta, pre, split, ignore_merges):
    """SmolLM2's vocabulary with another pre-tokenizer, against HF with the same vocabulary and
    the pre-tokenizer of Llama 3 / Qwen2's tokenizer.json (Split regex, then ByteLevel without regex)."""
    tokenizers = pytest.importorskip("tokenizers")
    spec = json.loads(shared_file("hf/SmolLM2-135M-Instruct/tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    spec["model"]["ignore_merges"] = ignore_merges
    hf = tokenizers.Tokenizer.from_str(json.dumps(spec))
    meta = copy.copy(smol_meta)
    meta["tokenizer.ggml.pre"] = pre
    meta.pop("tokenizer.ggml.add_bos_token", None)
    tok = Tokenizer.from_metadata(meta)
    assert tok.add_bos is (pre == "llama-bpe")  # llama.cpp's default for Llama 3
    for text in _samples(n_lines=100, chunk=4000, n_chunks=2):
        ref = hf.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_bos=False) == ref, repr(text[:80])


# Pre-tokenizers as their model family's tokenizer.json defines them (copied from the public
# files: openai-community/gpt2 and tiiuae/falcon-7b on the Hugging Face hub).
HF_PRE_TOKENIZERS = {
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "falcon": {"type": "Sequence", "pretokenizers": [
        {"type": "Punctuation", "behavior": "Contiguous"},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        {"type": "Digits", "individual_digits": False},
        {"type": "Split", "pattern": {"Regex": "[0-9][0-9][0-9]"}, "behavior": "Isolated", "invert": False}]},
}


@pytest.mark.parametrize("pre", sorted(HF_PRE_TOKENIZERS))
def test_bpe_family_pre_tokenizers_match_hf(smol_meta, pre):
    """SmolLM2's vocabulary under the GPT-2 / Falcon pre-tokenizer, against HF tokenizers with
    that family's tokenizer.json pre_tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    spec = json.loads(shared_file("hf/SmolLM2-135M-Instruct/tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = HF_PRE_TOKENIZERS[pre]
    hf = tokenizers.Tokenizer.from_str(json.dumps(spec))
    meta = dict(smol_meta)
    meta["tokenizer.ggml.pre"] = pre
    tok = Tokenizer.from_metadata(meta)
    texts = _samples(n_lines=100, chunk=4000, n_chunks=2)
    if pre == "falcon":
        # HF runs Falcon's Digits step on the byte-mapped text, where the bytes B2 B3 B9 BC BD BE
        # stand for the numeric characters ² ³ ¹ ¼ ½ ¾, so it splits inside e.g. "м" (D0 BC);
        # llama.cpp's falcon regexes (which pyllm follows, tested against llama-tokenize) do not.
        texts = [t for t in texts if not set(t.encode("utf-8")) & {0xB2, 0xB3, 0xB9, 0xBC, 0xBD, 0xBE}]
        assert len(texts) > 300
    for text in texts:
        assert tok.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False).ids, repr(text[:80])


def _pre_names(canonical: bool) -> list:
    """tokenizer.ggml.pre names pyllm accepts: one per regex set (canonical), or all the others."""
    from pyllm.runtime.tokenizer import PRE_ALIASES

    first = {}
    for name in sorted(n for n in PRE_ALIASES if n):
        first.setdefault(PRE_ALIASES[name], name)
    names = set(first.values())
    return sorted(names if canonical else set(n for n in PRE_ALIASES if n) - names)


def _check_against_llama_tokenize(tmp_path, gguf_path, pre, text):
    """pyllm's ids for text with SmolLM2's vocabulary named `pre` equal llama-tokenize's
    (parse_special off, no BOS); on a difference, say where."""
    from conftest import llama_cpp_tool
    from pyllm.base import ValueType
    from pyllm.convert.gguf_writer import GGUFWriter

    g = GGUFFile(gguf_path)
    vocab = tmp_path / f"vocab-{pre}.gguf"
    w = GGUFWriter(vocab)
    for key, value in g.metadata.items():
        w.add(key, value, *g.value_types[key])
    w.add("tokenizer.ggml.pre", pre, ValueType.STRING)
    w.write()
    f = tmp_path / "text.txt"
    f.write_bytes(text.encode("utf-8"))
    proc = subprocess.run([str(llama_cpp_tool("llama-tokenize")), "-m", str(vocab), "-f", str(f), "--ids",
                           "--no-bos", "--no-escape"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    meta = dict(g.metadata)
    meta["tokenizer.ggml.pre"] = pre
    tok = Tokenizer.from_metadata(meta)
    ours = tok.encode(text, add_bos=False, parse_special=False)
    if ours != theirs:
        i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise AssertionError(f"{pre}: first difference at token {i}: ours {tok.decode(ours[i:i + 8])!r}, "
                             f"llama.cpp {tok.decode(theirs[i:i + 8])!r}, after {tok.decode(ours[max(0, i - 8):i])!r}")


@pytest.mark.parametrize("pre", _pre_names(canonical=True))
def test_pre_tokenizers_match_llama_tokenize(tmp_path, smollm2, pre):
    """Each pre-tokenizer regex set tokenizes as llama.cpp's own llama-tokenize does, on one
    text holding every sample (the tricky strings, lines and chunks of the three texts)."""
    _check_against_llama_tokenize(tmp_path, smollm2, pre, "\n".join(_samples(n_lines=60, chunk=3000, n_chunks=1)))


def test_pre_tokenizer_aliases_match_llama_tokenize(tmp_path, smollm2):
    """Every other tokenizer.ggml.pre name pyllm maps onto one of those sets is that set in
    llama.cpp too (on the tricky strings)."""
    for pre in _pre_names(canonical=False):
        _check_against_llama_tokenize(tmp_path, smollm2, pre, "\n".join(EXTRA))


def test_every_pre_tokenizer_round_trips(smol_meta):
    """Each pre-tokenizer regex set compiles and loses no text (unmatched text is kept as words)."""
    from pyllm.runtime.tokenizer import PRE_ALIASES

    names = {}
    for name, key in PRE_ALIASES.items():
        names.setdefault(key, name)  # one tokenizer.ggml.pre value per regex set
    for name in names.values():
        meta = dict(smol_meta)
        meta["tokenizer.ggml.pre"] = name
        tok = Tokenizer.from_metadata(meta)
        for text in EXTRA:
            assert tok.decode(tok.encode(text, add_bos=False)) == text, (name, text)


def test_unknown_pre_tokenizer_warns_and_uses_gpt2(smol_meta, capsys):
    meta = dict(smol_meta)
    meta["tokenizer.ggml.pre"] = "no-such-pre"
    tok = Tokenizer.from_metadata(meta)
    assert "no-such-pre" in capsys.readouterr().err
    assert tok.pre == "gpt2"
    text = "Hello world, it's 2024!\n"
    assert tok.decode(tok.encode(text)) == text


# --- streaming ------------------------------------------------------------------------------

STREAM_TEXTS = [
    "Café déjà vu — naïve façade. 日本語のテキスト。 🦙🤖👍🏽 👨‍👩‍👧 ok",
    "  leading spaces, ½ ∑ x² ≤ ∞\n\n新しい行 🇫🇷🇯🇵 end ",
    "plain ASCII text.",
]


@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_incremental_decoder(which, request):
    if which == "spm":
        tok = request.getfixturevalue("llama_spm")
    else:
        tok = request.getfixturevalue("smol")
    for text in STREAM_TEXTS:
        for ids in (tok.encode(text), tok.encode(text, add_bos=False)):
            dec = IncrementalDecoder(tok)
            pieces = [dec.add(i) for i in ids] + [dec.flush()]
            assert "".join(pieces) == tok.decode(ids)
            for p in pieces:
                assert "\ufffd" not in p
                p.encode("utf-8")  # no lone surrogates
        ids = tok.encode(text, add_bos=True) if tok.bos_id is not None else tok.encode(text)
        dec = IncrementalDecoder(tok)
        assert "".join([dec.add(i) for i in ids] + [dec.flush()]) == text
    # multi-byte characters split over byte-fallback / byte-level tokens never come out halved
    ids = tok.encode("a🦙b", add_bos=False)
    assert len(ids) > 3
    dec = IncrementalDecoder(tok)
    pieces = [dec.add(i) for i in ids] + [dec.flush()]
    assert sum("🦙" in p for p in pieces) == 1 and not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
    # an incomplete character at the end becomes U+FFFD at flush, as decode() does
    def incomplete(i):
        try:
            tok.token_bytes(i).decode("utf-8")
            return False
        except UnicodeDecodeError:
            return True

    half = [i for i in tok.encode("🦙日", add_bos=False) if incomplete(i)]
    assert half
    dec = IncrementalDecoder(tok)
    assert dec.add(half[0]) == ""
    assert dec.flush() == "\ufffd" == tok.decode(half[:1])


def test_spm_stream_keeps_space_of_generated_tokens(llama_spm):
    """Generation streams tokens that follow a prompt: only a piece right after BOS loses its space."""
    tok = llama_spm
    cont = tok.encode(" there was a dog", add_bos=False)
    dec = IncrementalDecoder(tok)
    assert "".join(dec.add(i) for i in cont[1:]) + dec.flush() == tok.decode(cont[1:])
    assert tok.decode(cont[1:]).startswith(" ")


# --- metadata -------------------------------------------------------------------------------

def test_stories260k_metadata(stories260k):
    tok = _tok(stories260k)
    assert tok.model == "llama" and tok.n_vocab == 512
    assert tok.add_bos and not tok.add_eos and tok.add_space_prefix
    assert tok.token_text(tok.bos_id) == "<s>" and tok.token_text(tok.eos_id) == "</s>"
    assert tok.eos_id in tok.eog_ids


def test_bad_metadata_raises(smol_meta):
    base = {"tokenizer.ggml.tokens": ["<unk>", "a"], "tokenizer.ggml.model": "bert"}
    with pytest.raises(PyllmError, match="bert"):
        Tokenizer.from_metadata(base)
    with pytest.raises(PyllmError):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "llama"})
    with pytest.raises(PyllmError):
        Tokenizer.from_metadata({"tokenizer.ggml.tokens": ["a"]})
    meta = dict(smol_meta)
    del meta["tokenizer.ggml.merges"]
    with pytest.raises(PyllmError, match="merges"):
        Tokenizer.from_metadata(meta)
