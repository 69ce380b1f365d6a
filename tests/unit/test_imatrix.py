"""Importance matrices (`mistralrs.imatrix`): llama.cpp's legacy and GGUF imatrix files and
mistral.rs's .cimatrix, llama.cpp names mapped to our layers, calibration collection, and the
plumbing into the quantizers (`--imatrix`, `--calibration-file`)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from mistralrs.errors import ConfigError
from mistralrs.imatrix import Imatrix, collect_imatrix, llama_cpp_names, read_imatrix, save_cimatrix
from tests.helpers.tiny_models import write_tiny_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("imatrix") / "llama", hidden_size=256, intermediate_size=512)


def _legacy(path, entries, trailer=True):
    """llama.cpp's legacy .imatrix: {name: (ncall, values)}."""
    out = [struct.pack("<i", len(entries))]
    for name, (ncall, values) in entries.items():
        raw = name.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, len(values)),
                np.asarray(values, dtype=np.float32).tobytes()]
    if trailer:
        ds = b"calib.txt"
        out += [struct.pack("<i", 10), struct.pack("<i", len(ds)), ds]
    path.write_bytes(b"".join(out))
    return path


def test_names_map_to_llama_cpp_tensors():
    assert llama_cpp_names("model.layers.3.self_attn.q_proj") == [("blk.3.attn_q.weight", None),
                                                                   ("blk.3.attn_qkv.weight", None)]
    assert llama_cpp_names("model.layers.0.mlp.down_proj") == [("blk.0.ffn_down.weight", None)]
    assert llama_cpp_names("model.layers.1.block_sparse_moe.experts.5.w3") == [("blk.1.ffn_up_exps.weight", 5)]
    assert llama_cpp_names("model.layers.2.mlp.experts.0.down_proj") == [("blk.2.ffn_down_exps.weight", 0)]
    assert llama_cpp_names("lm_head") == [("output.weight", None)]
    assert llama_cpp_names("model.embed_tokens") == []


def test_legacy_file_values_divided_by_ncall(tmp_path):
    im = read_imatrix(_legacy(tmp_path / "a.imatrix", {
        "blk.0.attn_q.weight": (2, [2.0, 4.0, 6.0, 8.0]),
        "blk.0.ffn_gate_exps.weight": (1, [1.0, 1.0, 5.0, 5.0, 9.0, 9.0]),
        "output.weight": (0, [3.0, 3.0]),
        "blk.1.attn_q.weight": (1, [0.0, 0.0]),
    }))
    assert im.for_layer("model.layers.1.self_attn.q_proj", 2) is None  # all zeros: no weighting
    assert im.for_layer("model.layers.0.self_attn.q_proj", 4).tolist() == [1.0, 2.0, 3.0, 4.0]
    assert im.for_layer("model.layers.0.self_attn.k_proj", 4) is None  # no attn_k, no attn_qkv
    assert im.for_layer("model.layers.0.mlp.experts.1.gate_proj", 2).tolist() == [5.0, 5.0]
    assert im.for_layer("lm_head", 2).tolist() == [3.0, 3.0]
    with pytest.raises(ConfigError, match="has 4 values, the layer takes 8 inputs; the imatrix was made for another"):
        im.for_layer("model.layers.0.self_attn.q_proj", 8)


def test_gguf_imatrix_normalized_per_expert(tmp_path):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch="imatrix")
    w.add_array("imatrix.datasets", ["calib.txt"])
    w.add_uint32("imatrix.chunk_count", 3)
    w.add_uint32("imatrix.chunk_size", 512)
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.array([10.0, 20.0, 30.0], dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight.counts", np.array([10.0], dtype=np.float32))
    w.add_tensor("blk.0.ffn_down_exps.weight.in_sum2", np.array([[4.0, 8.0], [1.0, 1.0]], dtype=np.float32))
    w.add_tensor("blk.0.ffn_down_exps.weight.counts", np.array([[4.0], [0.0]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    im = read_imatrix(tmp_path / "m.gguf")
    assert im.for_layer("model.layers.0.self_attn.q_proj", 3).tolist() == [1.0, 2.0, 3.0]
    assert im.for_layer("model.layers.0.mlp.experts.0.down_proj", 2).tolist() == [1.0, 2.0]
    assert im.for_layer("model.layers.0.mlp.experts.1.down_proj", 2).tolist() == [1.0, 1.0]  # no tokens: ones


def test_cimatrix_round_trip_and_bad_files(tmp_path):
    im = Imatrix(by_layer={"model.layers.0.mlp.up_proj": torch.tensor([1.5, 2.5]), "lm_head": torch.ones(3)})
    back = read_imatrix(save_cimatrix(im, tmp_path / "x.cimatrix"))
    assert back.for_layer("model.layers.0.mlp.up_proj", 2).tolist() == [1.5, 2.5]
    with pytest.raises(ConfigError, match="no such file"):
        read_imatrix(tmp_path / "missing.imatrix")
    (tmp_path / "junk.imatrix").write_bytes(b"\x05\x00\x00\x00abc")
    with pytest.raises(ConfigError) as exc:
        read_imatrix(tmp_path / "junk.imatrix")
    assert "not a readable imatrix" in str(exc.value) and "\n" not in str(exc.value)


def test_calibration_observes_every_layer_input(llama):
    """Every Linear gets the mean over all calibration tokens of its squared input per column
    (gate and up see the same input: the MLP's, unfused for the run)."""
    from mistralrs.loading import load_model
    from mistralrs.nn.linear import linear_layers

    loaded = load_model(llama, dtype=torch.float32)
    inputs = []
    mlp = loaded.model.model.layers[0].mlp
    hook = mlp.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach().clone()))
    im = collect_imatrix(loaded.model, list(range(3, 40)), window=16)  # windows of 16, 16 and 5 tokens
    hook.remove()
    assert set(im.by_layer) == {n for n, _ in linear_layers(loaded.model)}
    x = torch.cat(inputs).reshape(-1, 256)
    assert x.shape[0] == 37
    want = (x * x).mean(0)
    for name in ("gate_proj", "up_proj"):
        torch.testing.assert_close(im.for_layer(f"model.layers.0.mlp.{name}", 256), want)


def test_the_plan_hands_each_method_its_importance(llama, tmp_path):
    from mistralrs.loading import load_model
    from mistralrs.quantization import IsqPlan

    vec = torch.linspace(0.1, 5.0, 256)
    plan = IsqPlan("q4k")
    plan.importance = Imatrix(by_layer={"model.layers.0.self_attn.q_proj": vec})
    loaded = load_model(llama, dtype=torch.float32, quant_method_for=plan.method_for)
    q = loaded.model.model.layers[0].self_attn.q_proj
    assert torch.equal(q.quant_method.importance, vec)
    assert loaded.model.model.layers[0].self_attn.k_proj.quant_method.importance is None
    assert plan.importance.used == {"model.layers.0.self_attn.q_proj"}
    from safetensors.torch import load_file

    from mistralrs_plugins.quant.ggml.formats import quantize

    weight = load_file(str(llama / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q.quant_method.canonical(q), quantize("q4k", weight.float(), importance=vec))
    assert not torch.equal(q.qweight, quantize("q4k", weight.float()))
