"""Pre-quantized checkpoints (GPTQ, AWQ, FP8, bitsandbytes, MLX, HQQ, MXFP4) loaded as published:
every layer dequantizes to exactly the weights the packed tensors stand for (packed here by the
published formulas or by the reference library itself, tests/helpers/packed_checkpoints.py);
symmetric 4/8-bit GPTQ runs as q4_0/q8_0 blocks; the model matches the dequantized float model;
bad checkpoints are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mistralrs.errors import ModelLoadError
from tests.helpers.packed_checkpoints import (
    E2M1,
    pack_mxfp4,
    write_bnb,
    write_dequantized,
    write_fp8,
    write_hqq,
    write_mlx,
    write_mxfp4,
    write_packed,
)
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
    "gptq4-asym-g64": dict(fmt="gptq", bits=4, group_size=64, sym=False, fast="affine"),
    "gptq8-asym-g128": dict(fmt="gptq", bits=8, group_size=128, sym=False, fast="affine"),
    "gptq4-asym-whole": dict(fmt="gptq", bits=4, group_size=-1, sym=False, fast="affine"),
    "gptq4-desc-act": dict(fmt="gptq", bits=4, group_size=64, sym=True, desc_act=True, fast=None),
    "gptq2-sym-whole": dict(fmt="gptq", bits=2, group_size=-1, sym=True, fast=None),
    "awq4-g64": dict(fmt="awq", bits=4, group_size=64, sym=False, fast="affine"),
    "awq4-g32": dict(fmt="awq", bits=4, group_size=32, sym=False, fast="affine"),
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
    got = our_logits(loaded, IDS)
    if bits in (4, 8):  # the native affine kernels quantize activations to 8 bits, as llama.cpp does
        assert float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)) > 0.999
    else:  # the reference path: the same float32 arithmetic
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_isq_on_a_prequantized_checkpoint_requantizes_its_weights(llama, tmp_path):
    from mistralrs.nn.linear import describe_methods
    from mistralrs.quantization import IsqPlan

    path, _ = write_packed(llama, tmp_path / "g", "gptq", bits=4, group_size=64, sym=False)
    loaded = _load(path, quant_method_for=IsqPlan("q8_0").method_for)
    assert describe_methods(loaded.model) == {"q8_0": 15}
    path, _ = write_mxfp4(llama, tmp_path / "mx")
    assert describe_methods(_load(path, quant_method_for=IsqPlan("q8_0").method_for).model) == {"q8_0": 15}


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
    assert ("quant_method 'exl2' is not supported; expected one of: afq, awq, bitsandbytes, bitsandbytes_4bit, "
            "bitsandbytes_8bit, fp8, gptq, hqq, mlx, mxfp4") in msg and "config.json" in msg
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


def _same_model(loaded, want_path):
    """Logits (and so greedy tokens) of the loaded checkpoint equal the float model's."""
    want = our_logits(_load(want_path), IDS)
    got = our_logits(loaded, IDS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


HQQ_CASES = {  # nbits, axis, compute dtype: 4/8-bit on axis 0 are the ISQ hqq4/hqq8 layout itself
    "hqq4-axis1": (4, 1, "float32"), "hqq4-axis0": (4, 0, "float32"), "hqq8-axis0": (8, 0, "float32"),
    "hqq3-axis1": (3, 1, "float32"), "hqq2-axis0": (2, 0, "float32"), "hqq1-axis1": (1, 1, "float32"),
    "hqq6-axis1": (6, 1, "float32"), "hqq4-fp16": (4, 1, "float16"),
}


@pytest.mark.parametrize("case", sorted(HQQ_CASES))
def test_hqq_checkpoints_dequantize_as_hqq_does(llama, tmp_path, case):
    pytest.importorskip("hqq")
    from mistralrs_plugins.quant.hqq.method import HqqLinearMethod

    nbits, axis, compute = HQQ_CASES[case]
    path, deq = write_hqq(llama, tmp_path / case, nbits=nbits, axis=axis, compute_dtype=compute)
    loaded = _load(path)
    modules = dict(loaded.model.named_modules())
    for name, w in deq.items():
        layer = modules[name.removesuffix(".weight")]
        method = layer.quant_method
        assert isinstance(method, HqqLinearMethod) and method.describe() == f"hqq{nbits} (groups of 64 along axis {axis})"
        got = method.dequantize(layer).numpy()
        if compute == "float32":
            assert np.array_equal(got, w), name
        else:  # hqq dequantizes in the compute dtype; we take its fp16 scale and zero exactly, in fp32
            np.testing.assert_allclose(got, w, rtol=2e-3, atol=2e-3, err_msg=name)
    assert modules["lm_head"].quant_method.describe() == "unquantized"  # skip_modules
    want = write_dequantized(llama, tmp_path / f"{case}-float",
                             {n: modules[n.removesuffix(".weight")].quant_method.dequantize(
                                 modules[n.removesuffix(".weight")]).numpy() for n in deq})
    _same_model(loaded, want)
    if nbits in (4, 8):  # a UQFF record of the layer (mistral.rs's HqqLayer) reads back to the same weights
        layer = modules["model.layers.0.mlp.up_proj"]
        again = HqqLinearMethod(f"hqq{nbits}")
        state = again.uqff_state(layer.quant_method.uqff_entries(layer), layer.out_features, layer.in_features)
        assert again.axis == axis
        assert torch.equal(again.dequantize(_Layer(state, layer)), layer.quant_method.dequantize(layer))


class _Layer:
    def __init__(self, state, like):
        self.__dict__.update(state)
        self.out_features, self.in_features = like.out_features, like.in_features


def test_hqq_per_layer_configs(llama, tmp_path):
    """transformers' dynamic_config: each layer tag its own bits, group size and axis."""
    pytest.importorskip("hqq")
    tags = {"self_attn.q_proj": dict(nbits=4, group_size=64, axis=1), "self_attn.k_proj": dict(nbits=8, group_size=32, axis=0),
            "self_attn.v_proj": dict(nbits=3, group_size=128, axis=1), "self_attn.o_proj": dict(nbits=2, group_size=64, axis=0),
            "mlp.gate_proj": dict(nbits=4, group_size=128, axis=0), "mlp.up_proj": dict(nbits=1, group_size=32, axis=1),
            "mlp.down_proj": dict(nbits=8, group_size=64, axis=1)}
    path, deq = write_hqq(llama, tmp_path / "dyn", dynamic=tags)
    loaded = _load(path)
    modules = dict(loaded.model.named_modules())
    from mistralrs.nn.linear import describe_methods

    assert describe_methods(loaded.model)["hqq3 (groups of 128 along axis 1)"] == 2
    for name, w in deq.items():
        layer = modules[name.removesuffix(".weight")]
        assert np.array_equal(layer.quant_method.dequantize(layer).numpy(), w), name
    _same_model(loaded, write_dequantized(llama, tmp_path / "dyn-float", deq))


def test_mxfp4_blocks_decode_as_transformers_does():
    """Every e8m0 scale 1..254 (subnormal results included) and every e2m1 code: the GGML mxfp4
    blocks our layers become decode exactly as transformers' convert_moe_packed_tensors."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from mistralrs_plugins.quant.ggml.formats import dequantize
    from mistralrs_plugins.quant.ggml.mxfp4_checkpoint import ggml_mxfp4_blocks

    blocks = np.random.default_rng(0).integers(0, 256, (3, 85, 8, 16)).astype(np.uint8)
    scales = np.resize(np.arange(1, 255, dtype=np.uint8), (3, 85, 8))
    want = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    for e in range(3):
        qweight = ggml_mxfp4_blocks(torch.from_numpy(blocks[e]), torch.from_numpy(scales[e]))
        assert torch.equal(dequantize("mxfp4", qweight, 256), want[e].T)
    w = np.random.default_rng(1).normal(size=(40, 256)).astype(np.float32)
    blocks, scales = pack_mxfp4(w)  # the reference packer: every value fits its block's scale
    assert np.abs(E2M1[blocks & 15] * np.exp2(scales.astype(np.float32) - 127)[..., None]).max() <= np.abs(w).max() * 1.5


def test_mxfp4_linear_layers(llama, tmp_path):
    path, deq = write_mxfp4(llama, tmp_path / "mxfp4")
    loaded = _load(path)
    modules = dict(loaded.model.named_modules())
    for name, w in deq.items():
        layer = modules[name.removesuffix(".weight")]
        assert layer.quant_method.qtype == "mxfp4" and layer.quant_method.describe() == "mxfp4 (checkpoint)"
        assert np.array_equal(layer.quant_method.dequantize(layer).numpy(), w), name
    assert modules["lm_head"].quant_method.describe() == "unquantized"
    _same_model(loaded, write_dequantized(llama, tmp_path / "mxfp4-float", deq))


@pytest.mark.parametrize("arch", ["mixtral", "qwen3moe"])
def test_mxfp4_moe_experts_stacked_as_gpt_oss_stores_them(tmp_path, arch):
    """``experts.gate_up_proj_blocks [E, 2I, H/32, 16]`` / ``down_proj_blocks`` (+ ``_scales``)
    split into the per-expert layers, each dequantizing as transformers does."""
    import transformers

    from mistralrs.nn.linear import describe_methods
    from tests.helpers.parity import make_tiny_hf_model

    if arch == "mixtral":
        src, _ = make_tiny_hf_model(transformers.MixtralConfig, transformers.MixtralForCausalLM, tmp_path / "src",
                                    num_local_experts=4, num_experts_per_tok=2, intermediate_size=96)
        names = ("w1", "w3", "w2")
    else:
        src, _ = make_tiny_hf_model(transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, tmp_path / "src",
                                    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16)
        names = ("gate_proj", "up_proj", "down_proj")
    path, deq = write_mxfp4(src, tmp_path / "mxfp4", fused_experts=names, quantized=lambda n: False)
    loaded = _load(path)
    assert describe_methods(loaded.model)["mxfp4 (checkpoint)"] == 2 * 4 * 3  # layers x experts x (gate, up, down)
    modules = dict(loaded.model.named_modules())
    for name, w in deq.items():
        key = name.removesuffix(".weight")
        layer = modules.get(key) or modules[key.replace(".mlp.", ".block_sparse_moe.")]
        assert np.array_equal(layer.quant_method.dequantize(layer).numpy(), w), name
    _same_model(loaded, write_dequantized(src, tmp_path / "float", deq))


def test_bad_hqq_and_mxfp4_checkpoints_are_one_line_errors(llama, tmp_path):
    pytest.importorskip("hqq")
    from safetensors.torch import load_file, save_file

    def error(path, match):
        with pytest.raises(ModelLoadError) as exc:
            _load(path)
        assert "\n" not in str(exc.value), str(exc.value)
        assert any(m in str(exc.value) for m in match.split("|")), str(exc.value)
        return str(exc.value)

    def edit(path, change):
        tensors = load_file(str(path / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(path / "model.safetensors"))

    path, _ = write_hqq(llama, tmp_path / "hqq", nbits=4)
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    bad = {**qc, "quant_config": {**qc["quant_config"], "weight_quant_params": {**qc["quant_config"]["weight_quant_params"], "nbits": 7}}}
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": bad}))
    msg = error(path, "HQQ with 7 bits is not supported (this build reads 1, 2, 3, 4, 5, 6, 8 bits)")
    (path / "config.json").write_text(json.dumps(config))
    edit(path, lambda t: t.update({"model.layers.1.mlp.up_proj.nbits": torch.tensor(7, dtype=torch.int32)}))
    msg = error(path, "layer 'model.layers.1.mlp.up_proj': HQQ with 7 bits is not supported")
    edit(path, lambda t: t.update({"model.layers.1.mlp.up_proj.nbits": torch.tensor(4, dtype=torch.int32),
                                   "model.layers.0.self_attn.o_proj.group_size": torch.tensor(32, dtype=torch.int32)}))
    msg = error(path, "layer 'model.layers.0.self_attn.o_proj'")
    assert "W_q of shape" in msg
    edit(path, lambda t: (t.update({"model.layers.0.self_attn.o_proj.group_size": torch.tensor(64, dtype=torch.int32)}),
                          t.pop("model.layers.1.mlp.down_proj.zero")))
    error(path, "tensor 'model.layers.1.mlp.down_proj.zero' required by llama is missing")

    path, _ = write_mxfp4(llama, tmp_path / "mx")
    edit(path, lambda t: t.pop("model.layers.0.mlp.gate_proj.scales"))
    error(path, "tensor 'model.layers.0.mlp.gate_proj.scales' required by llama is missing")
    edit(path, lambda t: t.update({"model.layers.0.mlp.gate_proj.scales": torch.zeros(512, 8, dtype=torch.uint8),
                                   "model.layers.1.self_attn.q_proj.blocks": torch.zeros(256, 64, dtype=torch.uint8)}))
    msg = error(path, "layer 'model.layers.1.self_attn.q_proj': MXFP4 blocks")


def test_tune_describes_hqq_and_mxfp4_checkpoints():
    from mistralrs.plugins import get_registry
    from mistralrs.prequantized import describe_checkpoint

    hqq = {"quant_method": "hqq", "skip_modules": ["lm_head"], "quant_config": {
        "weight_quant_params": {"nbits": 4, "channel_wise": True, "group_size": 64, "optimize": True, "round_zero": True,
                                "axis": 1, "view_as_float": False},
        "scale_quant_params": None, "zero_quant_params": None, "offload_meta": False}}
    registry = get_registry()
    assert describe_checkpoint({"quantization_config": hqq}, registry) == (
        "hqq (nbits=4, group_size=64, axis=1), loaded as published by the hqq_checkpoint plugin")
    assert describe_checkpoint({"quantization_config": {"quant_method": "mxfp4"}}, registry) == (
        "mxfp4, loaded as published by the mxfp4_checkpoint plugin")
