"""The GGUF reader against gguf-py's GGUFReader (the oracle), and its errors on bad files."""

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from pyllm.base import PyllmError
from pyllm.runtime.gguf_file import GGUFFile


def _oracle_value(field):
    if field.types[0].name == "ARRAY":
        if field.types[1].name == "STRING":
            return [bytes(field.parts[i]).decode() for i in field.data]
        return np.concatenate([field.parts[i] for i in field.data]) if field.data else np.array([])
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0].name == "STRING" else value[0]


@pytest.mark.parametrize("rel", ["gguf/stories260K.gguf", "gguf-vocab/ggml-vocab-llama-spm.gguf"])
def test_metadata_and_tensors_match_gguf_py(rel):
    from conftest import shared_file

    path = shared_file(rel)
    ours, oracle = GGUFFile(path), GGUFReader(path)
    for key, field in oracle.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = _oracle_value(field)
        got = ours.metadata[key]
        if isinstance(expected, np.ndarray):
            np.testing.assert_array_equal(got, expected)
        elif isinstance(expected, float) or isinstance(expected, np.floating):
            assert got == pytest.approx(float(expected))
        else:
            assert got == expected, key
    assert set(ours.tensors) == {t.name for t in oracle.tensors}
    for t in oracle.tensors:
        np.testing.assert_array_equal(ours.raw(t.name), np.asarray(t.data).view(np.uint8).reshape(-1))
        assert ours.tensors[t.name].dims == tuple(int(d) for d in t.shape)


def _write(path, tensors=(), kv=None, alignment=None):
    w = GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    for k, v in (kv or {}).items():
        w.add_string(k, v)
    for name, arr, raw_dtype in tensors:
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_alignment_and_zero_copy(tmp_path):
    path = tmp_path / "a.gguf"
    a = np.arange(64, dtype=np.float32).reshape(2, 32)
    b = np.arange(10, dtype=np.float32)
    _write(path, [("a", a, None), ("b", b, None)], alignment=64)
    g = GGUFFile(path)
    assert g.alignment == 64 and g.data_offset % 64 == 0
    np.testing.assert_array_equal(g.array("a"), a)
    np.testing.assert_array_equal(g.array("b"), b)
    assert not g.raw("a").flags.owndata  # a view into the map, not a copy


def test_errors_are_one_line(tmp_path):
    good = tmp_path / "good.gguf"
    _write(good, [("w", np.ones((4, 32), dtype=np.float32), None)], kv={"general.name": "x"})
    data = good.read_bytes()

    cases = {
        "magic": b"GGML" + data[4:],
        "version": data[:4] + (7).to_bytes(4, "little") + data[8:],
        "truncated header": data[:30],
        "truncated data": data[:-8],
        "block type": None,
    }
    # An unknown block type: patch the tensor's type id (the u32 before its u64 offset).
    name_at = data.index(b"\x01\x00\x00\x00\x00\x00\x00\x00w") + 9
    type_at = name_at + 4 + 8 * 2
    cases["block type"] = data[:type_at] + (99).to_bytes(4, "little") + data[type_at + 4 :]
    expect = {
        "magic": "bad magic",
        "version": "unsupported GGUF version 7",
        "truncated header": "truncated",
        "truncated data": "truncated",
        "block type": "unsupported block type 99",
    }
    for case, blob in cases.items():
        bad = tmp_path / f"{case}.gguf"
        bad.write_bytes(blob)
        with pytest.raises(PyllmError) as e:
            GGUFFile(bad)
        assert expect[case] in str(e.value) and "\n" not in str(e.value), case
    with pytest.raises(PyllmError, match="not found"):
        GGUFFile(tmp_path / "missing.gguf")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(PyllmError, match="bad magic"):
        GGUFFile(empty)
