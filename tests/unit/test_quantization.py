"""ISQ type names, shorthands, the sensitive-tensor policy, organizations and per-layer fallbacks
(mistralrs.quantization) over the registered quantizers."""

from __future__ import annotations

import pytest
import torch

from mistralrs.errors import ConfigError
from mistralrs.nn.linear import Linear
from mistralrs.quantization import IsqPlan, isq_type_names, resolve_isq_type
from mistralrs.topology import parse_topology

GGML = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_1", "q2k", "q3k", "q4k", "q5k", "q6k", "q8k"]


def test_every_ggml_type_is_an_isq_type():
    assert set(GGML) <= set(isq_type_names())


@pytest.mark.parametrize("text,expected", [
    ("q4k", "q4k"), ("Q4K", "q4k"), ("q4_K", "q4k"), (" Q8_0 ", "q8_0"),
    ("2", "q2k"), ("3", "q3k"), ("4", "q4k"), ("5", "q5k"), ("6", "q6k"), ("8", "q8_0"),
])
def test_names_are_case_insensitive_and_shorthands_resolve_per_device(text, expected):
    assert resolve_isq_type(text, device_type="cpu").name == expected


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError) as exc:
        resolve_isq_type("q4kk")
    message = str(exc.value)
    assert message.startswith("--isq 'q4kk' is not a quantization type; choose one of")
    assert all(name in message for name in GGML) and "\n" not in message


def test_unknown_bit_count_names_the_counts():
    with pytest.raises(ConfigError, match=r"--isq 7: no quantization type answers to 7 bits on cpu; use one of 2, 3, 4, 5, 6, 8"):
        resolve_isq_type("7")


def test_a_type_the_device_cannot_run_is_refused():
    with pytest.raises(ConfigError, match=r"--isq q8k cannot run on cuda \(it runs on cpu\)"):
        resolve_isq_type("q8k", device_type="cuda")


def _layer(out_features: int, in_features: int) -> Linear:
    with torch.device("meta"):
        return Linear(in_features, out_features)


def _type(method):
    return None if method is None else method.qtype


def test_sensitive_tensors_are_promoted():
    plan = IsqPlan("q4k")
    assert _type(plan.method_for("model.layers.0.mlp.down_proj", _layer(256, 512))) == "q4k"
    assert _type(plan.method_for("lm_head", _layer(1000, 256))) == "q6k"
    plan = IsqPlan("q8_0")
    assert _type(plan.method_for("lm_head", _layer(1000, 256))) == "q8_0"
    assert _type(IsqPlan("q5k").method_for("lm_head", _layer(1000, 256))) == "q8_0"


def test_shapes_a_type_cannot_take_fall_back_and_are_reported_once():
    plan = IsqPlan("q4k")
    # 96 is not a multiple of 256 (k-quants) but is of 32: llama.cpp's fallback q4k -> q5_0
    for i in range(3):
        assert _type(plan.method_for(f"model.layers.{i}.self_attn.o_proj", _layer(64, 96))) == "q5_0"
    # 48 takes no GGML block size at all: left unquantized
    assert plan.method_for("model.layers.0.self_attn.q_proj", _layer(64, 48)) is None
    lines = plan.report()
    assert len(lines) == 2
    assert lines[0].startswith("3 layer(s) cannot take q4k (e.g. model.layers.0.self_attn.o_proj and 2 more); they use q5_0")
    assert "they use unquantized" in lines[1]


def test_moqe_quantizes_only_routed_experts():
    plan = IsqPlan("q4k", organization="moqe")
    assert _type(plan.method_for("model.layers.0.mlp.experts.3.down_proj", _layer(256, 256))) == "q4k"
    assert plan.method_for("model.layers.0.mlp.shared_expert.down_proj", _layer(256, 256)) is None
    assert plan.method_for("model.layers.0.self_attn.q_proj", _layer(256, 256)) is None
    with pytest.raises(ConfigError, match="--isq-organization 'fast'"):
        IsqPlan("q4k", organization="fast")


def test_topology_pins_override_the_default_and_the_sensitive_policy():
    topo = parse_topology("0-2:\n  isq: q8_0\n'/lm_head/':\n  isq: q4_0\n'/down_proj/':\n  isq: Q6K\n")
    plan = IsqPlan("q4k", topology=topo)
    assert _type(plan.method_for("model.layers.1.self_attn.q_proj", _layer(256, 256))) == "q8_0"
    assert _type(plan.method_for("model.layers.1.mlp.down_proj", _layer(256, 256))) == "q6k"
    assert _type(plan.method_for("model.layers.5.self_attn.q_proj", _layer(256, 256))) == "q4k"
    assert _type(plan.method_for("lm_head", _layer(256, 256))) == "q4_0"
    # a topology alone (no --isq) quantizes only what it pins
    plan = IsqPlan(None, topology=topo)
    assert plan.active
    assert plan.method_for("model.layers.5.self_attn.q_proj", _layer(256, 256)) is None
    assert _type(plan.method_for("model.layers.0.self_attn.q_proj", _layer(256, 256))) == "q8_0"
