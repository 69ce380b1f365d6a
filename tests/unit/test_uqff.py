"""UQFF files (docs/uqff.md): compatibility both ways with an independent writer/reader that
follows mistral.rs's 1.2.0 layout (tests/helpers/uqff_files.py), shards and siblings, and bad
files as one-line errors naming the file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mistralrs.errors import ModelLoadError
from tests.helpers.parity import our_logits
from tests.helpers.tiny_models import write_tiny_llama
from tests.helpers.uqff_files import read_report, read_uqff, write_uqff_q8_0

IDS = torch.tensor([3, 17, 5, 42, 8, 9, 60, 2, 11, 7])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tied 2-layer Llama whose widths (256, 512) every GGML type takes."""
    return write_tiny_llama(tmp_path_factory.mktemp("uqff") / "llama", hidden_size=256, intermediate_size=512,
                            tie_word_embeddings=True)


def _isq(path, isq, **kw):
    from mistralrs.loading import load_model
    from mistralrs.quantization import IsqPlan

    plan = IsqPlan(isq)
    return load_model(path, dtype=torch.float32, quant_method_for=plan.method_for, **kw), plan


def _write(loaded, plan, out, isq, **kw):
    from mistralrs.uqff.writer import write_metadata, write_shards

    report = write_shards(loaded.model, out, isq, quant=isq, targeted=plan.target_name, **kw)
    write_metadata(loaded.model, out, loaded.model_dir, outputs=[report])
    return report


def _load(out, value, **kw):
    from mistralrs.uqff.loading import load_uqff, resolve_uqff_files

    return load_uqff(resolve_uqff_files(value, out), dtype=torch.float32, **kw)


@pytest.fixture(scope="module")
def q4k_dir(llama, tmp_path_factory):
    loaded, plan = _isq(llama, "q4k")
    out = tmp_path_factory.mktemp("q4k")
    _write(loaded, plan, out, "q4k")
    return out, our_logits(loaded, IDS)


# --------------------------------------------------------------------- compatibility, both ways


def _is_linear(key: str) -> bool:
    return key.endswith(("_proj", "lm_head")) or key.endswith("embed_tokens")


def test_an_independently_written_q8_0_file_loads_to_the_isq_logits(llama, tmp_path):
    """Q8_0 blocks from gguf.quants (bit-exact with our ISQ), the tied table as a record (1.2)."""
    shard = write_uqff_q8_0(llama, tmp_path / "indep", quantized=_is_linear)
    got = _load(tmp_path / "indep", shard.name)
    want, _ = _isq(llama, "q8_0")
    assert got.model.model.embed_tokens.weight is None  # the table stayed quantized
    assert torch.equal(our_logits(got, IDS), our_logits(want, IDS))


def test_unquantized_records_and_a_1_1_residual_table(llama, tmp_path):
    """UQFF 1.1: float layers as family-1 records, the token table in the residual file."""
    shard = write_uqff_q8_0(llama, tmp_path / "u", quantized=lambda k: False,
                            unquantized=lambda k: k.endswith("_proj"), version=(1, 1, 0))
    from mistralrs.loading import load_model

    got = _load(tmp_path / "u", shard.name)
    assert torch.equal(our_logits(got, IDS), our_logits(load_model(llama, dtype=torch.float32), IDS))


def test_our_records_read_with_the_documented_layout(llama, tmp_path):
    """Every GGML record dequantizes with gguf.quants to what the layer computes with; the tied
    table is a Q6_K record (sensitive-tensor policy) and is not in the residual."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from safetensors import safe_open

    loaded, plan = _isq(llama, "q4k")
    out = tmp_path / "ours"
    report = _write(loaded, plan, out, "q4k")
    records = read_uqff(out / "q4k-0.uqff")
    modules = dict(loaded.model.named_modules())
    assert set(records) == {n for n, m in modules.items() if n.endswith("_proj")} | {"model.embed_tokens"}
    for key, rec in records.items():
        assert int(rec["weight.format"].item()) == 0 and rec["weight.format"].dtype == torch.uint8
        assert rec["weight"].dtype == torch.uint8 and rec["weight"].dim() == 1
        assert rec["weight.dtype"].dtype == torch.uint32 and rec["weight.dtype"].dim() == 0
        out_f, in_f = (int(v) for v in rec["weight.shape"].tolist())
        kind = GGMLQuantizationType(int(rec["weight.dtype"].item()))
        w = dequantize(rec["weight"].numpy().reshape(out_f, -1), kind)
        layer = modules[key].quantized_head if key == "model.embed_tokens" else modules[key]
        assert np.array_equal(w, layer.quant_method.dequantize(layer).numpy()), key
    assert GGMLQuantizationType(int(records["model.embed_tokens"]["weight.dtype"].item())).name == "Q6_K"
    with safe_open(str(out / "residual.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                                    "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
                                    "model.norm.weight"]
    assert report["actual_counts"] == {"q4k": 14, "q6k": 1}
    on_disk = read_report(out)
    assert on_disk["uqff_version"] == "1.2.0" and on_disk["outputs"][0]["shards"] == ["q4k-0.uqff"]
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 256


@pytest.mark.parametrize("isq", ["afq4", "hqq4", "fp8", "f8q8"])
def test_other_families_write_mistral_rs_records(llama, tmp_path, isq):
    """AFQ codes as U32 words, HQQ / FP8 / F8Q8 with their documented fields; the model loads
    back to the ISQ logits."""
    loaded, plan = _isq(llama, isq)
    _write(loaded, plan, tmp_path, isq)
    rec = read_uqff(tmp_path / f"{isq}-0.uqff")["model.layers.0.mlp.down_proj"]  # [256, 512]
    fields = sorted(k for k in rec if k.startswith("weight."))
    if isq == "afq4":
        assert int(rec["weight.format"].item()) == 4
        assert rec["weight"].dtype == torch.uint32 and list(rec["weight"].shape) == [256, 512 * 4 // 32]
        assert int(rec["weight.bits"].item()) == 4 and int(rec["weight.group_size"].item()) == 64
        assert rec["weight.bits"].dtype == rec["weight.group_size"].dtype == torch.uint8
        words = rec["weight"].numpy().view(np.uint32)
        codes = (words[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & 15  # 8 codes per word, LSB first
        w = codes.reshape(256, 8, 64) * rec["weight.scales"].float().numpy()[..., None] \
            + rec["weight.biases"].float().numpy()[..., None]
        layer = dict(loaded.model.named_modules())["model.layers.0.mlp.down_proj"]
        assert np.allclose(w.reshape(256, 512), layer.quant_method.dequantize(layer).numpy(), atol=1e-6)
    elif isq == "hqq4":
        assert int(rec["weight.format"].item()) == 2
        assert fields == ["weight.axis", "weight.bits", "weight.channel_wise", "weight.format", "weight.group_size",
                          "weight.optimization_steps", "weight.round_zeros", "weight.scales", "weight.shape",
                          "weight.zeros"]
        assert rec["weight.shape"].tolist() == [256, 512] and int(rec["weight.group_size"].item()) == 64
    elif isq == "fp8":
        assert int(rec["weight.format"].item()) == 3
        assert rec["weight"].dtype == torch.float8_e4m3fn and list(rec["weight"].shape) == [256, 512]
        assert float(rec["weight.quant_scale"]) == pytest.approx(1 / float(rec["weight.dequant_w_scale"]))
        assert int(rec["weight.dtype"].item()) == 9
    else:
        assert int(rec["weight.format"].item()) == 5
        assert int(rec["weight.num_blocks"].item()) == 256 * 512 // 32
        assert rec["weight"].numel() == 256 * 512 // 32 * 33
    got = _load(tmp_path, isq)
    assert torch.equal(our_logits(got, IDS), our_logits(loaded, IDS))


def test_stacked_experts_as_mistral_rs_writes_them(tmp_path):
    """A Mixtral whose experts are stacked records ``experts.gate_proj|up_proj|down_proj``
    [E, out, in] (from w1 / w3 / w2) loads to the per-expert ISQ model's logits; our writer
    stacks them the same way."""
    transformers = pytest.importorskip("transformers")
    from tests.helpers.parity import make_tiny_hf_model

    path, _hf = make_tiny_hf_model(transformers.MixtralConfig, transformers.MixtralForCausalLM, tmp_path / "mix",
                                   num_local_experts=3, num_experts_per_tok=2)
    config = json.loads((path / "config.json").read_text())
    layers, experts = config["num_hidden_layers"], config["num_local_experts"]
    stacked = {}
    for i in range(layers):
        p = f"model.layers.{i}.block_sparse_moe.experts"
        for canonical, name in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            stacked[f"{p}.{canonical}"] = [f"{p}.{e}.{name}.weight" for e in range(experts)]
    quantized = lambda k: k.endswith(("_proj", "lm_head", "block_sparse_moe.gate"))  # noqa: E731
    shard = write_uqff_q8_0(path, tmp_path / "indep", quantized=quantized, stacked=stacked)
    ids = torch.tensor([1, 5, 9, 3, 7])
    want, plan = _isq(path, "q8_0")
    assert torch.equal(our_logits(_load(tmp_path / "indep", shard.name), ids), our_logits(want, ids))
    _write(want, plan, tmp_path / "ours", "q8_0")
    records = read_uqff(tmp_path / "ours" / "q8_0-0.uqff")
    gate = records["model.layers.0.block_sparse_moe.experts.gate_proj"]
    assert gate["weight.shape"].tolist()[0] == experts and not any(".experts.0." in k for k in records)
    assert torch.equal(our_logits(_load(tmp_path / "ours", "q8_0"), ids), our_logits(want, ids))


# ------------------------------------------------------------------------ shards and discovery


def test_shards_cut_at_the_cap_and_any_shard_brings_its_siblings(llama, tmp_path):
    loaded, plan = _isq(llama, "q4k")
    report = _write(loaded, plan, tmp_path, "q4k", max_shard_bytes=300_000)
    assert len(report["shards"]) >= 3 and report["shards"][0] == "q4k-0.uqff"
    want = our_logits(loaded, IDS)
    for value in ("q4k-0.uqff", report["shards"][-1], "q4k", "4", str(tmp_path / "q4k-1.uqff")):
        assert torch.equal(our_logits(_load(tmp_path, value), IDS), want), value


def test_several_types_in_one_directory_share_the_residual(llama, tmp_path):
    from mistralrs.uqff.loading import resolve_uqff_files

    for isq in ("q4k", "q8_0"):
        loaded, plan = _isq(llama, isq)
        _write(loaded, plan, tmp_path, isq)
    assert [p.name for p in resolve_uqff_files("q8_0-0.uqff;q4k", tmp_path)] == ["q8_0-0.uqff", "q4k-0.uqff"]
    assert torch.equal(our_logits(_load(tmp_path, "q8_0"), IDS), our_logits(loaded, IDS))


# -------------------------------------------------------------------------------- bad files


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _error(out, value="q4k-0.uqff"):
    with pytest.raises(ModelLoadError) as exc:
        _load(out, value)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_a_truncated_shard(q4k_dir, tmp_path):
    out = _copy(q4k_dir[0], tmp_path / "t")
    shard = out / "q4k-0.uqff"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    msg = _error(out)
    assert str(shard) in msg and "truncated or corrupt" in msg


def test_a_missing_residual_file(q4k_dir, tmp_path):
    out = _copy(q4k_dir[0], tmp_path / "r")
    (out / "residual.safetensors").unlink()
    msg = _error(out)
    assert "residual.safetensors" in msg and "missing" in msg


def test_a_shard_of_another_model(q4k_dir, tmp_path):
    out = _copy(q4k_dir[0], tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    msg = _error(out)
    assert "q4k-0.uqff" in msg and "model.layers.1" in msg and "another model" in msg
    (out / "config.json").write_text(json.dumps({**config, "intermediate_size": 768}))
    msg = _error(out)
    assert "does not match config.json" in msg


def test_an_unknown_format_record(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    shard = write_uqff_q8_0(llama, tmp_path / "f", quantized=_is_linear)
    tensors = load_file(str(shard))
    tensors["model.layers.0.mlp.up_proj.weight.format"] = torch.tensor(9, dtype=torch.uint8)
    save_file(tensors, str(shard))
    msg = _error(tmp_path / "f", shard.name)
    assert shard.name in msg and "format record 9" in msg and "model.layers.0.mlp.up_proj" in msg


@pytest.mark.parametrize("version,needle", [((1, 3, 0), "UQFF version 1.3.0"), ((2, 0, 0), "UQFF version 2.0.0"),
                                            (None, "no UQFF version entries")])
def test_a_newer_or_missing_version_is_refused(llama, tmp_path, version, needle):
    from safetensors.torch import load_file, save_file

    shard = write_uqff_q8_0(llama, tmp_path / "v", quantized=_is_linear, version=version or (1, 2, 0))
    if version is None:
        tensors = {k: v for k, v in load_file(str(shard)).items() if not k.startswith("uqff.version")}
        save_file(tensors, str(shard))
    msg = _error(tmp_path / "v", shard.name)
    assert needle in msg and shard.name in msg
    if version is not None:
        assert "up to 1.2" in msg


def test_a_missing_file_names_where_it_looked(q4k_dir):
    msg = _error(q4k_dir[0], "q5k-0.uqff")
    assert "q5k-0.uqff" in msg and str(q4k_dir[0]) in msg
