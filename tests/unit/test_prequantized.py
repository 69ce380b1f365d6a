"""Pre-quantized checkpoints (GPTQ, AWQ) loaded as published: every layer dequantizes to exactly
the weights the packed tensors stand for (packed here by the published formulas,
tests/helpers/packed_checkpoints.py); symmetric 4/8-bit GPTQ runs as q4_0/q8_0 blocks; the model
matches the dequantized float model; bad checkpoints are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mistralrs.errors import ModelLoadError
from tests.helpers.packed_checkpoints import write_bnb, write_dequantized, write_fp8, write_mlx, write_packed
from tests.helpers.parity import our_logits
from tests.helpers.tiny_models import write_tiny_llama

IDS = torch.tensor([3, 17, 5, 42, 8, 9, 60, 2, 11])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("preq") / "llama", hidden_size=256, intermediate_size=512)


def _load(path, **kw):
    from mistralrs.loading import load_model

    return load_model(path, dtype=torch.float32, **kw)


CASES = {
    "gptq4-sym-g32": dict(fmt="gptq", bits=4, group_size=32, sym=True, fast="q4_0"),
    "gptq4-sym-g128-v2": dict(fmt="gptq", bits=4, group_size=128, sym=True, v2=True, fast="q4_0"),
    "gptq8-sym-g64": dict(fmt="gptq", bits=8, group_size=64, sym=True, fast="q8_0"),
    "gptq4-asym-g64": dict(fmt="gptq", bits=4, group_size=64, sym=False, fast=None),
    "gptq4-desc-act": dict(fmt="gptq", bits=4, group_size=64, sym=True, desc_act=True, fast=None),
    "gptq2-sym-whole": dict(fmt="gptq", bits=2, group_size=-1, sym=True, fast=None),
    "awq4-g64": dict(fmt="awq", bits=4, group_size=64, sym=False, fast=None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_layers_load_to_their_exact_weights(llama, tmp_path, case):
    opts = dict(CASES[case])
    fast = opts.pop("fast")
    fmt = opts.pop("fmt")
    path, deq = write_packed(llama, tmp_path / case, fmt, **opts)
    loaded = _load(path)
    modules = dict(loaded.model.named_modules())
    for name, w in deq.items():
        layer = modules[name.removesuffix(".weight")]
        assert layer.quant_method.qtype == fmt
        assert layer.quant_method.fast == fast, name
        assert np.array_equal(layer.quant_method.dequantize(layer).numpy(), w), name
    assert modules["lm_head"].quant_method.describe() == "unquantized"  # published in float
    want = our_logits(_load(write_dequantized(llama, tmp_path / f"{case}-float", deq)), IDS)
    got = our_logits(loaded, IDS)
    if fast is None:  # the reference path: the same float32 arithmetic
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    else:  # the block kernels quantize activations to 8 bits, as llama.cpp does
        assert float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)) > 0.999


@pytest.mark.parametrize("block", [(128, 128), (96, 160), None], ids=["128x128", "partial-edges", "per-tensor"])
def test_fp8_checkpoints_load_to_their_exact_weights(llama, tmp_path, block):
    path, deq = write_fp8(llama, tmp_path / "fp8", block=block, not_convert=("down_proj",))
    loaded = _load(path)
    modules = dict(loaded.model.named_modules())
    for name, w in deq.items():
        layer = modules[name.removesuffix(".weight")]
        assert np.array_equal(layer.quant_method.dequantize(layer).numpy(), w), name
    assert modules["model.layers.0.mlp.down_proj"].quant_method.describe() == "unquantized"  # modules_to_not_convert
    want = our_logits(_load(write_dequantized(llama, tmp_path / "fp8-float", deq)), IDS)
    torch.testing.assert_close(our_logits(loaded, IDS), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,nested,int8", [("nf4", True, False), ("nf4", False, False), ("fp4", True, False),
                                              (None, False, True)], ids=["nf4-double", "nf4", "fp4-double", "int8"])
def test_bitsandbytes_checkpoints_dequantize_as_bitsandbytes_does(llama, tmp_path, kind, nested, int8):
    pytest.importorskip("bitsandbytes")
    path, deq = write_bnb(llama, tmp_path / "bnb", kind=kind or "nf4", nested=nested, int8=int8)
    loaded = _load(path)
    modules = dict(loaded.model.named_modules())
    for name, w in deq.items():
        layer = modules[name.removesuffix(".weight")]
        assert layer.quant_method.describe() == ("bnb int8" if int8 else f"bnb {kind}")
        np.testing.assert_allclose(layer.quant_method.dequantize(layer).numpy(), w, rtol=1e-6, atol=1e-7, err_msg=name)
    want = our_logits(_load(write_dequantized(llama, tmp_path / "bnb-float", deq)), IDS)
    torch.testing.assert_close(our_logits(loaded, IDS), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 32), (6, 128), (8, 64)])
def test_mlx_checkpoints_with_quantized_embeddings(llama, tmp_path, bits, group_size):
    path, deq = write_mlx(llama, tmp_path / "mlx", bits=bits, group_size=group_size)
    loaded = _load(path)
    modules = dict(loaded.model.named_modules())
    emb = loaded.model.model.embed_tokens
    assert emb.weight is None and emb.quantized_head.quant_method.qtype == f"afq{bits}"  # the table stays packed
    for name, w in deq.items():
        key = name.removesuffix(".weight")
        layer = emb.quantized_head if key == "model.embed_tokens" else modules[key]
        assert np.array_equal(layer.quant_method.dequantize(layer).numpy(), w), name
    want = our_logits(_load(write_dequantized(llama, tmp_path / "mlx-float", deq)), IDS)
    torch.testing.assert_close(our_logits(loaded, IDS), want, atol=1e-4, rtol=1e-4)


def test_isq_on_a_prequantized_checkpoint_requantizes_its_weights(llama, tmp_path):
    from mistralrs.nn.linear import describe_methods
    from mistralrs.quantization import IsqPlan

    path, _ = write_packed(llama, tmp_path / "g", "gptq", bits=4, group_size=64, sym=False)
    loaded = _load(path, quant_method_for=IsqPlan("q8_0").method_for)
    assert describe_methods(loaded.model) == {"q8_0": 15}


def test_bad_checkpoints_are_one_line_errors(llama, tmp_path):
    path, _ = write_packed(llama, tmp_path / "bad", "gptq", bits=4, group_size=32)
    config = json.loads((path / "config.json").read_text())

    def error(cfg):
        (path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ModelLoadError) as exc:
            _load(path)
        assert "\n" not in str(exc.value)
        return str(exc.value)

    msg = error({**config, "quantization_config": {"quant_method": "exl2", "bits": 4}})
    assert "quant_method 'exl2' is not supported; expected one of: afq, awq, bitsandbytes, bitsandbytes_4bit, bitsandbytes_8bit, fp8, gptq, mlx" in msg and "config.json" in msg
    msg = error({**config, "quantization_config": {**config["quantization_config"], "group_size": 64}})
    assert "model.layers.0" in msg and "has shape" in msg and "config.json does not match" in msg  # groups of 32 in the file
    msg = error({**config, "quantization_config": {**config["quantization_config"], "bits": 3}})
    assert "3 bits is not supported" in msg
    from safetensors.numpy import load_file, save_file

    (path / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.qzeros"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model.layers.1.mlp.up_proj.qzeros.*missing"):
        _load(path)
