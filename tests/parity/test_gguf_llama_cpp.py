"""llama.cpp's own converter against the GGUF recipes of the tests and against the GGUF loader.

Skipped unless ``LLAMA_CPP_SRC`` points at a llama.cpp source tree (``convert_hf_to_gguf.py``
and ``conversion/``; CI has none). For parity cases of every architecture with a GGUF
converter (the ones a GGUF file can hold, see each suite's ``gguf_unsupported``), with a tiny
tokenizer added (the real converter needs one):

1. the real converter's F32 and Q8_0 files equal what `tests.helpers.gguf_writer.write_gguf`
   writes: every metadata value (``general.*`` and ``tokenizer.*`` aside), every tensor's name,
   type, shape and bytes. The parity suites' GGUF test runs on the writer's files, so this is
   what makes them files llama.cpp writes;
2. the real converter's files pass that GGUF test (`assert_gguf_matches`, with the case's
   ``gguf_config`` / ``gguf_as``): F32 logits and greedy tokens equal the safetensors model's,
   Q8_0 blocks equal ``--isq q8_0``.
"""

from __future__ import annotations

import importlib
import json

import pytest

from tests.helpers.gguf_writer import convert_with_llama_cpp, gguf_differences, llama_cpp_src, write_gguf
from tests.helpers.parity import assert_gguf_matches
from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

pytestmark = pytest.mark.skipif(llama_cpp_src() is None,
                                reason="set LLAMA_CPP_SRC to a llama.cpp source tree to run its converter")

# case -> the parity module that defines it (in CASES or GGUF_CASES)
CASES = {
    "llama3_tied_bias": "test_llama_family",
    "mistral": "test_llama_family",
    "qwen2": "test_llama_family",
    "qwen3": "test_llama_family",
    "mixtral": "test_moe_glm_family",
    "qwen3moe_sparse": "test_moe_glm_family",
    "glm4": "test_moe_glm_family",
    "glm4_linear_rope_tied": "test_moe_glm_family",
    "phi2_mha": "test_phi_family",
    "phi3": "test_phi_family",
    "phi3_long_partial_tied": "test_phi_family",
    "starcoder2": "test_phi_family",
    "gemma_nobias": "test_gemma_family",
    "gemma2": "test_gemma_family",
    "smollm3": "test_gemma_family",
    "granite": "test_granite_gemma3",
    "gemma3": "test_granite_gemma3",
    "gemma3_default_pattern": "test_granite_gemma3",
    "deepseekv2": "test_deepseek_family",
    "deepseekv3": "test_deepseek_family",
    # (not deepseekv3_fused: llama.cpp's DeepseekV2Model only stacks per-expert tensors and
    # refuses transformers 5's fused gate_up_proj: "Unprocessed experts")
    "gpt_oss": "test_gpt_oss_family",
    "gpt_oss_full_tied": "test_gpt_oss_family",
    "phimoe_hub": "test_phimoe_glm4moe_family",
    "glm4moe": "test_phimoe_glm4moe_family",  # (not glm4moe_fused: Glm4MoeModel stacks only per-expert tensors)
    "glm4moelite_hub": "test_phimoe_glm4moe_family",
    "granitemoehybrid": "test_hybrid_family",
    "granitemoehybrid_dense_rope_tied": "test_hybrid_family",
    "lfm2": "test_hybrid_family",
    "qwen3next": "test_hybrid_family",  # (not phimoe: the converter knows only the Hub's class name)
}


@pytest.mark.parametrize("name", list(CASES))
def test_real_converter_matches_recipe_and_loads(name, tmp_path):
    module = importlib.import_module(f"tests.parity.{CASES[name]}")
    path, _ = {**module.CASES, **getattr(module, "GGUF_CASES", {})}[name](tmp_path / name)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    # GLM-4's converters look up these special tokens
    write_tiny_tokenizer(path, vocab_size=vocab,
                         extra_special=("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|user|>",
                                        "[gMASK]", "<|observation|>"))
    real = {}
    for outtype in ("f32", "q8_0"):
        real[outtype] = convert_with_llama_cpp(path, tmp_path / f"llama-cpp-{outtype}.gguf", outtype=outtype)
        recipe = write_gguf(path, tmp_path / f"recipe-{outtype}.gguf", outtype=outtype)
        diffs = gguf_differences(real[outtype], recipe)
        assert not diffs, f"{name} ({outtype}): llama.cpp's converter and the recipe differ: {diffs[:5]}"
    suite = module.TestParity
    check = tmp_path / "check"
    check.mkdir()
    print(name, assert_gguf_matches(
        path, check, writer=lambda _path, _out, outtype: real[outtype], arch=suite.arch_override.get(name),
        ref_arch=suite.gguf_as.get(name), ref_config=suite.gguf_config.get(name),
        q8_min_cosine=suite.gguf_q8_min_cosine.get(name, 0.99),
    ))


def test_real_converter_keeps_gpt_oss_mxfp4_experts(tmp_path):
    """A GPT-OSS checkpoint with MXFP4 experts (as published): llama.cpp's converter repacks them
    into ggml MXFP4 blocks exactly as the recipe does, and its file loads into the same experts."""
    from tests.parity.test_gpt_oss_family import assert_mxfp4_gguf_matches, mxfp4_checkpoint

    mx, _ = mxfp4_checkpoint(tmp_path)
    write_tiny_tokenizer(mx, vocab_size=json.loads((mx / "config.json").read_text())["vocab_size"])
    for outtype in ("f32", "q8_0"):
        real = convert_with_llama_cpp(mx, tmp_path / f"llama-cpp-{outtype}.gguf", outtype=outtype)
        diffs = gguf_differences(real, write_gguf(mx, tmp_path / f"recipe-{outtype}.gguf", outtype=outtype))
        assert not diffs, f"gpt_oss mxfp4 ({outtype}): llama.cpp's converter and the recipe differ: {diffs[:5]}"
        assert_mxfp4_gguf_matches(mx, real, logits=outtype == "f32")
