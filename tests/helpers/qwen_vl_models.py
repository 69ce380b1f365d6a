"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints saved by transformers (model +
processor + a tiny tokenizer with the Qwen vision tokens and a Qwen-style chat template),
loadable by transformers and mistralrs."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.parity import randomize_

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# Qwen2-VL's template, reduced: each image part renders as <|vision_start|><|image_pad|><|vision_end|>.
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# processor: patch 4, merge 2 -> sides are multiples of 8; at most 96 patches (24 tokens) per image
PROCESSOR = dict(patch_size=4, temporal_patch_size=2, merge_size=2,
                 size={"shortest_edge": 8 * 8, "longest_edge": 8 * 8 * 24})


def _tokenizer(directory: Path):
    from transformers import AutoTokenizer

    from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

    write_tiny_tokenizer(directory, chat_template=QWEN_VL_TEMPLATE, eos_token="<|im_end|>",
                         extra_special=("<|im_start|>", *VISION_TOKENS))
    return AutoTokenizer.from_pretrained(directory)


def _token_ids(tok) -> dict:
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def _save(directory: Path, model, seed: int) -> Path:
    """The model and its image processor (the full processor wants a video processor, which needs
    torchvision: tests expand the placeholders as Qwen2VLProcessor does, `hf_inputs`)."""
    from transformers import Qwen2VLImageProcessorPil

    model.eval()
    randomize_(model, seed)
    model.save_pretrained(directory)
    Qwen2VLImageProcessorPil(**PROCESSOR).save_pretrained(directory)
    return directory


def hf_inputs(directory: Path, prompt: str, images: list) -> dict:
    """What transformers' Qwen2VLProcessor gives for a prompt and images: each <|image_pad|>
    repeated grid_t * grid_h * grid_w / merge² times, then tokenized; pixel_values,
    image_grid_thw and mm_token_type_ids."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(directory)
    out: dict = {}
    if images:
        ip = Qwen2VLImageProcessorPil.from_pretrained(directory)
        out = dict(ip(images=images, return_tensors="pt"))
        parts = prompt.split("<|image_pad|>")
        counts = [int(g.prod()) // ip.merge_size ** 2 for g in out["image_grid_thw"]]
        prompt = parts[0] + "".join("<|image_pad|>" * c + rest for c, rest in zip(counts, parts[1:]))
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out["input_ids"] = ids
    out["attention_mask"] = torch.ones_like(ids)
    out["mm_token_type_ids"] = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).int()
    return out


def _text(tok, **extra) -> dict:
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), **extra)


def write_tiny_qwen2vl(directory: Path, *, seed: int = 0) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    directory = Path(directory)
    tok = _tokenizer(directory)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2)
    text = _text(tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    config = Qwen2VLConfig(vision_config=vision, text_config=text, **_token_ids(tok))
    torch.manual_seed(seed)
    return _save(directory, Qwen2VLForConditionalGeneration(config), seed)


def write_tiny_qwen2_5vl(directory: Path, *, seed: int = 0) -> Path:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    directory = Path(directory)
    tok = _tokenizer(directory)
    # window 16 pixels = 2x2 merged tokens: several windows per image, and partial ones at the edges
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, window_size=16, fullatt_block_indexes=[1])
    text = _text(tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    # tied embeddings, as Qwen2.5-VL-3B
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=True, **_token_ids(tok))
    torch.manual_seed(seed)
    return _save(directory, Qwen2_5_VLForConditionalGeneration(config), seed)


def write_tiny_qwen3vl(directory: Path, *, seed: int = 0) -> Path:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    directory = Path(directory)
    tok = _tokenizer(directory)
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1])
    text = _text(tok, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    config = Qwen3VLConfig(vision_config=vision, text_config=text, **_token_ids(tok))
    torch.manual_seed(seed)
    return _save(directory, Qwen3VLForConditionalGeneration(config), seed)
