"""Every architecture end to end, as a user meets it: `mistralrs run -m DIR -i PROMPT` and the
Python API give the same greedy text as transformers for a tiny random checkpoint with a real
tokenizer and chat template."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.parity import make_tiny_hf_model
from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

# arch name -> (transformers module, config class, model class, config overrides)
ARCHITECTURES = {
    "llama": ("llama", "LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("mistral", "MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": ("qwen2", "Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("qwen3", "Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("gemma", "GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("gemma2", "Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 8}),
    "smollm3": ("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM", {"pad_token_id": None}),
    "phi2": ("phi", "PhiConfig", "PhiForCausalLM", {}),
    "phi3": ("phi3", "Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "starcoder2": ("starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM", {}),
    "mixtral": ("mixtral", "MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                 {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16}),
    "glm4": ("glm4", "Glm4Config", "Glm4ForCausalLM", {"head_dim": 16, "pad_token_id": 0}),
    "granite": ("granite", "GraniteConfig", "GraniteForCausalLM",
                {"embedding_multiplier": 2.0, "attention_multiplier": 0.1, "residual_multiplier": 0.5,
                 "logits_scaling": 2.0}),
    "phi3.5moe": ("phimoe", "PhimoeConfig", "PhimoeForCausalLM", {"num_local_experts": 4, "intermediate_size": 64}),
    "glm4moe": ("glm4_moe", "Glm4MoeConfig", "Glm4MoeForCausalLM",
                {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16,
                 "use_qk_norm": True}),
    "glm4moelite": ("glm4_moe_lite", "Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM",
                    {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                     "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
                     "q_lora_rank": 24, "num_key_value_heads": 4}),
    "granitemoehybrid": ("granitemoehybrid", "GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
                         {"intermediate_size": 32, "shared_intermediate_size": 48, "num_local_experts": 4,
                          "mamba_n_heads": 4, "mamba_d_state": 8, "mamba_chunk_size": 8,
                          "layer_types": ["linear_attention", "full_attention"]}),
    "lfm2": ("lfm2", "Lfm2Config", "Lfm2ForCausalLM",
             {"intermediate_size": 96, "block_multiple_of": 16, "layer_types": ["conv", "full_attention"]}),
    "qwen3next": ("qwen3_next", "Qwen3NextConfig", "Qwen3NextForCausalLM",
                  {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                   "shared_expert_intermediate_size": 24, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                   "linear_key_head_dim": 16, "linear_value_head_dim": 16, "full_attention_interval": 2}),
    "hunyuanv1dense": ("hunyuan_v1_dense", "HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM",
                       {"head_dim": 16, "rope_parameters": {"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0,
                                                            "rope_theta": 10000.0}}),
    "hunyuanv1moe": ("hunyuan_v1_moe", "HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM",
                     {"head_dim": 16, "intermediate_size": 32, "num_experts": 4, "moe_topk": 2}),
    "lfm2_moe": ("lfm2_moe", "Lfm2MoeConfig", "Lfm2MoeForCausalLM",
                 {"intermediate_size": 96, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
                  "num_dense_layers": 1, "layer_types": ["conv", "full_attention"]}),
    "gemma3_text": ("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
                    {"head_dim": 16, "sliding_window": 8, "sliding_window_pattern": 2}),
}

PROMPT = "Write a haiku about the sea"
N_TOKENS = 24


def registered_architectures() -> set[str]:
    from mistralrs.plugins import PluginHost

    return set(PluginHost().registry().architectures.names())


@pytest.fixture(scope="module")
def registered():
    return registered_architectures()


def build(arch: str, tmp_path):
    module, config_name, model_name, overrides = ARCHITECTURES[arch]
    mod = importlib.import_module(f"transformers.models.{module}")
    write_tiny_tokenizer(tmp_path)
    from mistralrs.tokenization import Tokenizer

    tok = Tokenizer.from_dir(tmp_path)
    path, hf = make_tiny_hf_model(
        getattr(mod, config_name), getattr(mod, model_name), tmp_path, vocab_size=tok.vocab_size,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **overrides,
    )
    return path, hf, tok


def hf_greedy_text(hf, tok, ids: list[int]) -> str:
    out = hf.generate(torch.tensor([ids]), max_new_tokens=N_TOKENS, do_sample=False, pad_token_id=0,
                      eos_token_id=tok.eos_token_id)
    new = out[0, len(ids):].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return tok.decode(new)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_cli_and_python_api_match_transformers(arch, tmp_path, registered):
    if arch not in registered:
        pytest.fail(f"architecture {arch!r} is not registered")
    from mistralrs import ChatCompletionRequest, Runner, Which
    from mistralrs.chat_template import ChatTemplate

    path, hf, tok = build(arch, tmp_path)
    template = ChatTemplate.load(path)
    messages = [{"role": "user", "content": PROMPT}]
    ids = tok.encode(template.render(messages, add_generation_prompt=True, bos_token=tok.bos_token,
                                     eos_token=tok.eos_token), add_special_tokens=False)
    expected = hf_greedy_text(hf, tok, ids)

    runner = Runner(which=Which.Plain(model_id=str(path), dtype="f32"), max_seqs=4)
    try:
        res = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=messages, max_tokens=N_TOKENS, temperature=0))
    finally:
        runner.shutdown()
    assert res.choices[0].message.content == expected

    result = subprocess.run(
        [sys.executable, "-m", "mistralrs", "run", "-m", str(path), "--dtype", "f32", "--temperature", "0",
         "--max-tokens", str(N_TOKENS), "-i", PROMPT],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
