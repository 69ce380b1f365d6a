"""Tiny random checkpoints of the tiling vision-language families, saved by transformers (model +
processor): LLaVA-NeXT (anyres tiles over a CLIP tower) and Idefics3 / SmolVLM (SigLIP-style
tower, pixel-shuffle connector, image split into tiles plus a global image)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.parity import randomize_
from tests.helpers.vision_models import VISION_TEMPLATE

# Idefics3's own template (without its <|begin_of_text|>): "User:<image>text<end_of_utterance>\n".
IDEFICS3_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_TOKENS = ("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                   *(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)))


def _tiny_llama(vocab: int, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, **kw)


def write_tiny_llava_next(directory: Path, *, seed: int = 0) -> Path:
    """CLIP tower over 28-pixel tiles (7-pixel patches: 16 features a tile), grid pinpoints up to
    3 tiles a side, a Llama language model."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

    directory = Path(directory)
    write_tiny_tokenizer(directory, added_tokens=("<image>",), chat_template=VISION_TEMPLATE)
    tok = AutoTokenizer.from_pretrained(directory)
    pinpoints = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84], [84, 56]]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=7, projection_dim=16)
    config = LlavaNextConfig(vision_config=vision, text_config=_tiny_llama(len(tok)),
                             image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                             vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    randomize_(model, seed)
    model.save_pretrained(directory)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                 image_grid_pinpoints=pinpoints)
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=7,
                       vision_feature_select_strategy="default", image_token="<image>",
                       num_additional_image_tokens=1).save_pretrained(directory)
    return directory


def write_tiny_idefics3(directory: Path, *, seed: int = 0, smolvlm: bool = False) -> Path:
    """`smolvlm`: SmolVLMForConditionalGeneration in place of Idefics3ForConditionalGeneration.
    A 28-pixel SigLIP-style tower (7-pixel patches, pixel shuffle by 2: 4 tokens a tile); images
    resized to at most 84 pixels a side and split into 28-pixel tiles plus a global image."""
    from transformers import AutoTokenizer, Idefics3VisionConfig

    if smolvlm:
        from transformers import SmolVLMConfig as Config
        from transformers import SmolVLMForConditionalGeneration as Model
    else:
        from transformers import Idefics3Config as Config
        from transformers import Idefics3ForConditionalGeneration as Model
    # SmolVLMProcessor needs num2words and a torchvision video processor; its image path (processor
    # and image processor) is Idefics3's, so SmolVLM checkpoints here carry Idefics3's.
    from transformers import Idefics3ImageProcessorPil as ImageProcessor
    from transformers import Idefics3Processor as Processor

    from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

    directory = Path(directory)
    write_tiny_tokenizer(directory, added_tokens=IDEFICS3_TOKENS, chat_template=IDEFICS3_TEMPLATE)
    tok = AutoTokenizer.from_pretrained(directory)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=28, patch_size=7).to_dict()
    config = Config(vision_config=vision, text_config=_tiny_llama(len(tok)).to_dict(), scale_factor=2,
                    image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Model(config).eval()
    randomize_(model, seed)
    model.save_pretrained(directory)
    image_processor = ImageProcessor(size={"longest_edge": 84}, max_image_size={"longest_edge": 28})
    Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4).save_pretrained(directory)
    return directory
