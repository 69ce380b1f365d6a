"""GGUF ``smollm3`` files.

llama.cpp's converter (``SmolLM3Model``, a ``LlamaModel``) permutes Q/K rows for its rotary
layout (undone here) and stores nothing about the NoPE layers or the sliding window: llama.cpp's
smollm3 graph hard-codes NoPE on every 4th layer (``n_no_rope_layer_step = 4``, SmolLM3-3B's
``no_rope_layer_interval``) and has no sliding window. The config says exactly that.
"""

from __future__ import annotations

from typing import Any

from mistralrs.gguf.convert import GgufConversion, Hparams, convert_standard

NO_ROPE_LAYER_STEP = 4  # llama.cpp: hparams.n_no_rope_layer_step


def convert(gguf: Any) -> GgufConversion:
    layers = int(Hparams(gguf).require("block_count"))
    return convert_standard(
        gguf, hf_architecture="SmolLM3ForCausalLM", model_type="smollm3", permute_qk=True,
        extra_config={
            "no_rope_layer_interval": NO_ROPE_LAYER_STEP,
            "no_rope_layers": [int((i + 1) % NO_ROPE_LAYER_STEP != 0) for i in range(layers)],
            "use_sliding_window": False,
            "sliding_window": None,
            "layer_types": None,
        },
    )
