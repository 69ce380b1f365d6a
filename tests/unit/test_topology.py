"""The topology YAML (`--topology FILE`): mistral.rs's examples parse, precedence between
ranges and regexes, every input error's one-line message, and layer indices from weight names."""

from __future__ import annotations

import re

import pytest

from mistralrs.errors import ConfigError
from mistralrs.topology import LayerTopology, Topology, layer_index_of, load_topology, parse_topology

# The examples of mistral.rs's README and docs/TOPOLOGY.md, verbatim.
README_ISQ = """\
# Early layers: lower quantization for embeddings
0-8:
  isq: Q3K
# Middle layers: balanced quantization
8-24:
  isq: Q4K
# Final layers: higher quality for output
24-32:
  isq: Q6K
"""

README_REGEX = """\
# Quantize attention layers differently from FFN layers
'/attn\\.q_proj$/':
  isq: Q4K
'/ffn_.*\\.weight$/':
  isq: Q3K
"""

README_DEVICES = """\
0-16:
  isq: Q4K
  device: cuda[0]
16-32:
  isq: Q4K
  device: cuda[1]
# Or offload some layers to CPU for very large models
"""

DOCS_SKIP = """\
0-8:
  isq: Q3K
  device: cuda[0]
8-16:
  isq: Q4K
  device: cpu
16-24:
  isq: Q6K
# Skip 24-28
28-32:
  isq: Q8_0
  device: cuda[0]
"""

# The reference's flow-style example; YAML needs `cuda[N]` quoted inside `{...}`.
REFERENCE_FLOW = """\
0-16:  {device: 'cuda[0]', isq: q4k}
16-32: {device: "cuda[1]", isq: q4k}
'/model\\.layers\\.\\d+\\.self_attn\\..*/': {isq: q8_0}
'/lm_head\\..*/': {device: cpu}
"""


def error(text: str, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        parse_topology(text, "topology.yml", **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith("topology.yml: "), message
    return message


# --- the examples ---------------------------------------------------------------------------


def test_readme_isq_example():
    topo = parse_topology(README_ISQ, "isq.yml")
    assert topo.path == "isq.yml"
    assert topo.ranges == (
        (0, 8, LayerTopology(isq="q3k"), "0-8"),
        (8, 24, LayerTopology(isq="q4k"), "8-24"),
        (24, 32, LayerTopology(isq="q6k"), "24-32"),
    )
    assert topo.patterns == ()
    assert topo.isq_for("model.layers.0.self_attn.q_proj.weight") == "q3k"
    assert topo.isq_for("model.layers.7.mlp.down_proj.weight") == "q3k"
    assert topo.isq_for("model.layers.8.mlp.down_proj.weight") == "q4k"
    assert topo.isq_for("model.layers.31.mlp.down_proj.weight") == "q6k"
    assert topo.isq_for("model.embed_tokens.weight") is None
    assert topo.isq_for("lm_head.weight") is None
    assert topo.device_for("model.layers.3.mlp.up_proj.weight") is None
    topo.check_layers(32)


def test_readme_regex_example():
    topo = parse_topology(README_REGEX)
    assert topo.ranges == ()
    assert [(p.pattern, e, s) for p, e, s in topo.patterns] == [
        (r"attn\.q_proj$", LayerTopology(isq="q4k"), r"/attn\.q_proj$/"),
        (r"ffn_.*\.weight$", LayerTopology(isq="q3k"), r"/ffn_.*\.weight$/"),
    ]
    assert topo.isq_for("blk.3.attn.q_proj") == "q4k"
    assert topo.isq_for("blk.3.ffn_up.weight") == "q3k"
    assert topo.isq_for("model.layers.3.self_attn.q_proj.weight") is None  # `$` anchors the q_proj regex
    assert topo.for_weight("model.layers.3.mlp.up_proj.weight") is None


def test_readme_device_example():
    topo = parse_topology(README_DEVICES)
    assert topo.for_weight("model.layers.15.mlp.up_proj.weight") == LayerTopology("q4k", "cuda[0]")
    assert topo.for_weight("model.layers.16.mlp.up_proj.weight") == LayerTopology("q4k", "cuda[1]")
    assert topo.device_for("model.norm.weight") is None


def test_docs_example_with_a_gap():
    topo = parse_topology(DOCS_SKIP)
    assert topo.for_weight("model.layers.9.mlp.up_proj.weight") == LayerTopology("q4k", "cpu")
    assert topo.for_weight("model.layers.20.mlp.up_proj.weight") == LayerTopology("q6k", None)
    assert topo.for_weight("model.layers.25.mlp.up_proj.weight") is None  # not covered
    assert topo.for_weight("model.layers.30.mlp.up_proj.weight") == LayerTopology("q8_0", "cuda[0]")
    assert topo.for_layer(25) is None and topo.for_layer(28) == LayerTopology("q8_0", "cuda[0]")


def test_reference_flow_mappings():
    topo = parse_topology(REFERENCE_FLOW)
    # the regex's isq overrides the range's; the range's device stays
    assert topo.for_weight("model.layers.3.self_attn.q_proj.weight") == LayerTopology("q8_0", "cuda[0]")
    assert topo.for_weight("model.layers.20.self_attn.o_proj.weight") == LayerTopology("q8_0", "cuda[1]")
    assert topo.for_weight("model.layers.20.mlp.gate_proj.weight") == LayerTopology("q4k", "cuda[1]")
    # outside the decoder stack only regexes apply
    assert topo.for_weight("lm_head.weight") == LayerTopology(None, "cpu")
    assert topo.for_weight("model.embed_tokens.weight") is None


def test_load_topology_reads_a_file(tmp_path):
    path = tmp_path / "isq.yml"
    path.write_text(README_ISQ, encoding="utf-8")
    topo = load_topology(path)
    assert topo.path == str(path)
    assert len(topo.ranges) == 3
    assert load_topology(str(path)) == topo


# --- selectors and values -------------------------------------------------------------------


def test_bare_index_and_int_keys():
    topo = parse_topology("12:\n  isq: q4k\n'13':\n  isq: Q6K\n'14 - 16':\n  device: cpu\n")
    assert topo.ranges == (
        (12, 13, LayerTopology(isq="q4k"), "12"),
        (13, 14, LayerTopology(isq="q6k"), "13"),
        (14, 16, LayerTopology(device="cpu"), "14 - 16"),
    )
    assert topo.isq_for("x", 12) == "q4k"
    assert topo.isq_for("x", 11) is None


def test_isq_is_lowercased_and_device_forms():
    topo = parse_topology("0-1: {isq: Q8_0, device: 'metal[2]'}\n1-2:\n  device: cuda[10]\n2: {device: cpu}\n")
    assert [e for _, _, e, _ in topo.ranges] == [
        LayerTopology("q8_0", "metal[2]"),
        LayerTopology(None, "cuda[10]"),
        LayerTopology(None, "cpu"),
    ]


def test_explicit_null_field_is_absent():
    topo = parse_topology("0-4:\n  isq:\n  device: cpu\n")
    assert topo.ranges[0][2] == LayerTopology(None, "cpu")


def test_empty_mapping_is_an_empty_topology():
    topo = parse_topology("{}")
    assert topo == Topology(path="<topology>", ranges=(), patterns=())
    assert topo.for_weight("model.layers.0.mlp.up_proj.weight") is None


def test_validate_isq_is_called_with_the_lowercase_name():
    seen = []

    def validate(name):
        seen.append(name)
        return None

    parse_topology("0-4: {isq: Q4K}\n'/x/': {isq: HQQ8}\n", validate_isq=validate)
    assert seen == ["q4k", "hqq8"]


# --- precedence -----------------------------------------------------------------------------


def test_later_regex_wins_among_regexes():
    # mistral.rs's test: regexes are evaluated in file order, the last match wins
    topo = parse_topology("'/ffn\\./':\n  isq: Q4K\n'/ffn\\.weight$/':\n  isq: Q6K\n")
    assert topo.isq_for("model.layers.2.ffn.weight") == "q6k"
    assert topo.isq_for("model.layers.2.ffn.bias") == "q4k"
    assert topo.isq_for("model.layers.2.attn.weight") is None


def test_the_last_matching_regex_entry_wins_whole():
    topo = parse_topology("'/mlp/': {isq: q4k, device: cpu}\n'/down_proj/': {isq: q8_0}\n")
    assert topo.for_weight("model.layers.0.mlp.down_proj.weight") == LayerTopology("q8_0", None)
    assert topo.for_weight("model.layers.0.mlp.up_proj.weight") == LayerTopology("q4k", "cpu")


def test_regex_overrides_range_field_by_field():
    topo = parse_topology("0-4: {isq: q4k, device: 'cuda[0]'}\n'/q_proj/': {device: cpu}\n'/k_proj/': {isq: q8_0}\n")
    assert topo.for_weight("model.layers.1.self_attn.q_proj.weight") == LayerTopology("q4k", "cpu")
    assert topo.for_weight("model.layers.1.self_attn.k_proj.weight") == LayerTopology("q8_0", "cuda[0]")
    assert topo.for_weight("model.layers.1.self_attn.v_proj.weight") == LayerTopology("q4k", "cuda[0]")
    assert topo.for_weight("model.layers.9.self_attn.k_proj.weight") == LayerTopology("q8_0", None)


def test_regex_declared_before_range_still_wins():
    topo = parse_topology("'/q_proj/': {isq: q8_0}\n0-4: {isq: q4k}\n")
    assert topo.isq_for("model.layers.1.self_attn.q_proj.weight") == "q8_0"


def test_regex_is_searched_not_anchored():
    topo = parse_topology("'/self_attn/': {isq: q8_0}\n")
    assert topo.isq_for("model.layers.1.self_attn.q_proj.weight") == "q8_0"


def test_explicit_layer_index_overrides_the_name():
    topo = parse_topology("0-4: {isq: q4k}\n4-8: {isq: q6k}\n")
    assert topo.isq_for("model.layers.1.mlp.up_proj.weight", 5) == "q6k"
    assert topo.isq_for("lm_head.weight", 2) == "q4k"
    assert topo.device_for("model.layers.1.mlp.up_proj.weight", 2) is None


def test_adjacent_ranges_do_not_overlap():
    topo = parse_topology("0-4: {isq: q4k}\n4-8: {isq: q6k}\n8: {isq: q8_0}\n")
    assert [topo.isq_for("w", i) for i in (3, 4, 7, 8, 9)] == ["q4k", "q6k", "q6k", "q8_0", None]


def test_check_layers():
    topo = parse_topology("0-16: {isq: q4k}\n16-40: {isq: q6k}\n", "topo.yml")
    topo.check_layers(40)
    with pytest.raises(ConfigError) as info:
        topo.check_layers(32)
    message = str(info.value)
    assert message.startswith("topo.yml: ") and "'16-40'" in message and "32 layers" in message
    assert "\n" not in message
    parse_topology("'/x/': {isq: q4k}\n").check_layers(0)


# --- errors ---------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yml"
    with pytest.raises(ConfigError, match=r"nope\.yml: topology file not found; check the --topology path"):
        load_topology(path)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_topology(tmp_path)


def test_file_not_utf8(tmp_path):
    path = tmp_path / "bin.yml"
    path.write_bytes(b"0-4:\n  isq: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_topology(path)


def test_not_yaml():
    message = error("0-4: {isq: q4k\n8-12: [\n")
    assert "not valid YAML" in message and "line " in message


def test_unquoted_device_in_flow_mapping_gets_a_hint():
    message = error("0-16: {device: cuda[0], isq: q4k}\n")
    assert "not valid YAML" in message and "quote the device" in message


def test_not_a_mapping():
    assert "got a list" in error("- 0-4\n- 4-8\n")
    assert "got a string" in error("just text")
    assert "got an empty file" in error("")
    assert "got an empty file" in error("# only a comment\n")


def test_bad_range_text():
    message = error("0-4-8: {isq: q4k}\n")
    assert message == (
        "topology.yml: selector '0-4-8' is not a layer range, index or regex; "
        "write START-END (e.g. 0-8, end exclusive), a layer index (e.g. 12) or /REGEX/"
    )
    assert "'abc'" in error("abc: {isq: q4k}\n")
    assert "'/x'" in error("'/x': {isq: q4k}\n")
    assert "is not a layer range" in error("1.5: {isq: q4k}\n")
    assert "is not a layer range" in error("true: {isq: q4k}\n")


def test_negative_numbers():
    assert "negative layer number" in error("-3: {isq: q4k}\n")
    assert "'-1-4'" in error("'-1-4': {isq: q4k}\n")
    assert "negative layer number" in error("'2--4': {isq: q4k}\n")


def test_start_not_below_end():
    assert error("16-8:\n  isq: q4k\n") == (
        "topology.yml: range '16-8' has start >= end; write START-END with START < END (end exclusive)"
    )
    assert "start >= end" in error("4-4: {isq: q4k}\n")


def test_overlapping_ranges_name_both_selectors():
    message = error("0-8: {isq: q4k}\n8-16: {isq: q6k}\n4-12: {isq: q8_0}\n")
    assert message == (
        "topology.yml: ranges '0-8' and '4-12' overlap (layers 4-7); "
        "give each layer at most one range (use a /regex/ to override single weights)"
    )
    assert "(layer 5)" in error("0-8: {isq: q4k}\n5: {device: cpu}\n")
    assert "'12' and '12-13'" in error("12: {isq: q4k}\n12-13: {isq: q6k}\n")


def test_invalid_regex_carries_re_message():
    message = error("'/[unclosed/': {isq: q4k}\n")
    with pytest.raises(re.error) as info:
        re.compile("[unclosed")
    assert f"regex '/[unclosed/' is invalid ({info.value})" in message


def test_unknown_device():
    message = error("0-4: {device: gpu}\n")
    assert message == "topology.yml: '0-4': unknown device 'gpu'; write cpu, cuda[N] or metal[N] (e.g. cuda[0])"
    assert "unknown device 'cuda'" in error("0-4: {device: cuda}\n")
    assert "unknown device 'CPU'" in error("0-4: {device: CPU}\n")
    assert "unknown device 0" in error("0-4: {device: 0}\n")


def test_unknown_key():
    message = error("0-4: {isq: q4k, dev: cpu}\n")
    assert message == "topology.yml: '0-4' has unknown key 'dev'; an entry takes only isq and device"


def test_empty_entry():
    expected = "topology.yml: '0-4' is empty; give it isq and/or device"
    assert error("0-4:\n").startswith(expected)
    assert error("0-4: {}\n").startswith(expected)
    assert error("0-4: {isq: null}\n").startswith(expected)
    assert error("'/x/':\n").startswith("topology.yml: '/x/' is empty")


def test_entry_not_a_mapping():
    assert "must be a mapping with isq and/or device, got a string" in error("0-4: q4k\n")


def test_isq_not_a_string():
    message = error("0-4: {isq: 4}\n")
    assert message == "topology.yml: '0-4': isq 4 is not an ISQ type name; write a name such as q4k or q8_0"
    assert "is not an ISQ type name" in error("0-4: {isq: [q4k]}\n")
    assert "is not an ISQ type name" in error("0-4: {isq: ''}\n")


def test_validate_isq_failure():
    def validate(name):
        return None if name == "q4k" else f"unknown ISQ type {name!r};\nchoose one of q4k, q8_0"

    parse_topology("0-4: {isq: Q4K}\n", validate_isq=validate)
    message = error("0-4: {isq: Q9K}\n", validate_isq=validate)
    assert message == "topology.yml: '0-4': isq 'q9k': unknown ISQ type 'q9k'; choose one of q4k, q8_0"
    assert error("'/a/': {isq: bad}\n", validate_isq=validate).startswith("topology.yml: '/a/': isq 'bad'")


def test_load_topology_errors_name_the_path(tmp_path):
    path = tmp_path / "t.yml"
    path.write_text("8-4: {isq: q4k}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_topology(path)
    assert str(info.value).startswith(f"{path}: range '8-4'")


# --- layer_index_of -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("model.layers.12.mlp.down_proj.weight", 12),
        ("model.layers.0.self_attn.q_proj.weight", 0),
        ("model.layers.3.block_sparse_moe.experts.7.w1.weight", 3),
        ("model.layers.5.mlp.experts.12.gate_proj.weight", 5),
        ("transformer.h.3.attn.c_attn.weight", 3),
        ("model.decoder.layers.5.fc1.weight", 5),
        ("blocks.2.attn.qkv.weight", 2),
        ("language_model.model.layers.31.input_layernorm.weight", 31),
        ("encoder.layers.1.decoder.layers.4.x.weight", 4),
        ("model.layers.7", 7),
        ("model.embed_tokens.weight", None),
        ("model.norm.weight", None),
        ("lm_head.weight", None),
        ("transformer.wte.weight", None),
        ("model.layers.weight", None),
        ("model.layers.x.mlp.weight", None),
        ("", None),
    ],
)
def test_layer_index_of(name, index):
    assert layer_index_of(name) == index
