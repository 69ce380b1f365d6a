"""The GGUF container reader against the `gguf` package (writer and reader), and its errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from mistralrs.errors import ModelLoadError
from mistralrs.gguf.files import choose_by_quant, preference, quant_label
from mistralrs.gguf.reader import GgufModel, is_gguf

gguf = pytest.importorskip("gguf")


def _write(path, *, tensors=None, split=None):
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(2)
    w.add_string("general.name", "tiny ☃")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "ü", ""])
    w.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.0, 0.0])
    w.add_array("tokenizer.ggml.token_type", [1, 1, 3, 6])
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_float32("llama.rope.freq_base", 500000.0)
    rng = np.random.default_rng(0)
    for name, (shape, qtype) in (tensors or {"a.weight": ((4, 64), "F32")}).items():
        data = rng.standard_normal(shape).astype(np.float32)
        if qtype == "F32":
            w.add_tensor(name, data)
        elif qtype == "F16":
            w.add_tensor(name, data.astype(np.float16))
        elif qtype == "Q8_0":
            t = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(data, t), raw_dtype=t)
        else:  # gguf cannot quantize k-quants: random block bytes are as good for the container
            t = getattr(gguf.GGMLQuantizationType, qtype)
            bs, ts = gguf.GGML_QUANT_SIZES[t]
            raw = rng.integers(0, 256, (shape[0], shape[1] // bs * ts), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_metadata_and_tensors_match_the_gguf_package(tmp_path):
    path = _write(tmp_path / "m.gguf", tensors={
        "f32.weight": ((3, 64), "F32"), "f16.weight": ((5, 32), "F16"), "q8.weight": ((4, 64), "Q8_0"),
        "q4k.weight": ((2, 256), "Q4_K"), "norm.weight": ((64,), "F32"),
    })
    assert is_gguf(path)
    ref = gguf.GGUFReader(path)
    with GgufModel.open([path]) as m:
        assert m.architecture == "llama"
        assert m.metadata["general.name"] == "tiny ☃"
        assert m.metadata["tokenizer.ggml.tokens"] == ["a", "b", "ü", ""]
        assert m.metadata["tokenizer.ggml.add_bos_token"] is True
        np.testing.assert_array_equal(m.metadata["tokenizer.ggml.scores"], [0.5, -1.0, 2.0, 0.0])
        for t in ref.tensors:
            info = m.tensors[t.name]
            assert info.ggml_type == t.tensor_type.value
            assert info.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
            ours = m.tensor(t.name)
            assert np.array_equal(ours.reshape(-1).view(torch.uint8).numpy(), np.asarray(t.data).reshape(-1).view(np.uint8))
        assert m.tensor("f16.weight").dtype == torch.float16 and m.tensor("f16.weight").shape == (5, 32)
        assert m.tensor("q8.weight").shape == (4, 2 * 34)  # rows of block bytes


def test_split_files_are_found_from_the_first(tmp_path):
    a = _write(tmp_path / "m-00001-of-00002.gguf", tensors={"a.weight": ((2, 32), "F32")})
    _write(tmp_path / "m-00002-of-00002.gguf", tensors={"b.weight": ((2, 32), "F32")})
    with GgufModel.open([a]) as m:
        assert set(m.tensors) == {"a.weight", "b.weight"}
        assert m.tensor("b.weight").shape == (2, 32)
    (tmp_path / "m-00002-of-00002.gguf").unlink()
    with pytest.raises(ModelLoadError, match="part m-00002-of-00002.gguf of the split GGUF model is missing"):
        GgufModel.open([a])


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"GGML" + b[4:], "not a GGUF file"),
    (lambda b: b"lmgg" + b[4:], "legacy GGML file"),
    (lambda b: b[:4] + struct.pack("<I", 3 << 24) + b[8:], "big-endian GGUF file"),
    (lambda b: b[:4] + struct.pack("<I", 1) + b[8:], "GGUF version 1 is not supported"),
    (lambda b: b[:4] + struct.pack("<I", 9) + b[8:], "GGUF version 9 is not supported"),
    (lambda b: b[:40], "truncated or corrupt GGUF file"),
    (lambda b: b[:200], "truncated GGUF file"),
    (lambda b: b[:-100], "beyond the end of the file"),
])
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, mutate, message):
    path = _write(tmp_path / "m.gguf")
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(ModelLoadError, match=message) as err:
        GgufModel.open([path])
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_unknown_tensor_type_names_the_tensor(tmp_path):
    path = _write(tmp_path / "m.gguf", tensors={"odd.weight": ((2, 32), "F32")})
    raw = bytearray(path.read_bytes())
    at = raw.index(b"odd.weight") + len(b"odd.weight") + 4 + 2 * 8  # n_dims u32, two u64 dims
    raw[at:at + 4] = struct.pack("<I", 99)
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match="tensor 'odd.weight' has GGML type id 99"):
        GgufModel.open([path])


def test_quant_labels_and_preference_order():
    assert quant_label("Llama-3.2-1B-Instruct-Q4_K_M.gguf") == "Q4KM"
    assert quant_label("model.Q8_0-00001-of-00002.gguf") == "Q80"
    assert quant_label("x-bf16.gguf") == "BF16"
    names = ["m-Q4_0.gguf", "m-Q4_K_S.gguf", "m-Q4_K_M.gguf", "m-Q8_0.gguf", "m-Q5_K_M-00001-of-00002.gguf",
             "m-Q5_K_M-00002-of-00002.gguf"]
    assert choose_by_quant(names, "4", "repo") == "m-Q4_K_M.gguf"
    assert choose_by_quant(names, "q4", "repo") == "m-Q4_K_M.gguf"
    assert choose_by_quant(["m-Q4_0.gguf", "m-Q4_1.gguf"], "4", "repo") == "m-Q4_1.gguf"
    assert choose_by_quant(names, "q8", "repo") == "m-Q8_0.gguf"
    assert choose_by_quant(names, "Q5_K_M", "repo") == "m-Q5_K_M-00001-of-00002.gguf"
    with pytest.raises(ModelLoadError, match="no GGUF file of that level in repo"):
        choose_by_quant(names, "q6k", "repo")
    for bad in ("auto", "IQ4_XS"):
        with pytest.raises(Exception, match="--quant"):
            preference(bad)
