"""Tiny random vision-language checkpoints saved by transformers (model + processor), loadable
by transformers and mistralrs, and test images as PIL images or data: URLs."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import torch

from tests.helpers.parity import randomize_

# A LLaVA-style template: each image part renders as the <image> placeholder.
VISION_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def sample_image(width: int, height: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def data_url(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    mime = {"JPEG": "jpeg"}.get(fmt, fmt.lower())
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def write_tiny_llava(directory: Path, *, seed: int = 0) -> Path:
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

    directory = Path(directory)
    write_tiny_tokenizer(directory, added_tokens=("<image>",), chat_template=VISION_TEMPLATE)
    tok = AutoTokenizer.from_pretrained(directory)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=7, projection_dim=16)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    randomize_(model, seed)
    model.save_pretrained(directory)
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
                   tokenizer=tok, patch_size=7, vision_feature_select_strategy="default", image_token="<image>",
                   num_additional_image_tokens=1).save_pretrained(directory)
    return directory
