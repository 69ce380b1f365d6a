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


def _template(placeholder: str) -> str:
    """VISION_TEMPLATE with another image placeholder (what the family's own template renders)."""
    return VISION_TEMPLATE.replace("<image>\n", placeholder)


GEMMA3_IMAGE_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")


def write_tiny_gemma3_vision(directory: Path, *, seed: int = 0) -> Path:
    """Gemma3ForConditionalGeneration: SigLIP tower (8x8 patches pooled to 16 tokens), Gemma 3
    text model with a sliding layer (window 8, shorter than an image) and a global one."""
    from transformers import (
        AutoTokenizer,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

    directory = Path(directory)
    boi, eoi, soft = GEMMA3_IMAGE_TOKENS
    write_tiny_tokenizer(directory, added_tokens=GEMMA3_IMAGE_TOKENS, chat_template=_template(boi),
                         config_extra={"extra_special_tokens": {"boi_token": boi, "eoi_token": eoi,
                                                                "image_token": soft}})
    tok = AutoTokenizer.from_pretrained(directory)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=56, patch_size=7, vision_use_head=False)
    text = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=1024,
                            query_pre_attn_scalar=16)
    ids = [tok.convert_tokens_to_ids(t) for t in GEMMA3_IMAGE_TOKENS]
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=16, boi_token_index=ids[0],
                          eoi_token_index=ids[1], image_token_index=ids[2])
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    randomize_(model, seed)
    model.save_pretrained(directory)
    Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 56, "width": 56}), tokenizer=tok,
                    image_seq_length=16).save_pretrained(directory)
    return directory


def pixtral_processor_class():
    """transformers' PixtralProcessor. Its module imports the torchvision image processor only
    for `get_resize_output_image_size`, which the PIL image processor module defines identically;
    without torchvision the import is pointed there."""
    import importlib
    import sys

    name = "transformers.models.pixtral.processing_pixtral"
    try:
        return importlib.import_module(name).PixtralProcessor
    except ImportError:
        import types

        from transformers.models.pixtral import image_processing_pil_pixtral as pil

        shim = types.ModuleType("transformers.models.pixtral.image_processing_pixtral")
        shim.get_resize_output_image_size = pil.get_resize_output_image_size
        sys.modules.setdefault(shim.__name__, shim)
        sys.modules.pop(name, None)
        return importlib.import_module(name).PixtralProcessor


def mistral3_processor(directory: Path):
    """The transformers processor of a tiny mistral3 checkpoint (PIL image processor)."""
    import json

    from transformers import AutoTokenizer, PixtralImageProcessorPil

    directory = Path(directory)
    cfg = json.loads((directory / "processor_config.json").read_text())
    image = {k: v for k, v in cfg["image_processor"].items() if k not in ("image_processor_type",)}
    return pixtral_processor_class()(image_processor=PixtralImageProcessorPil(**image),
                                     tokenizer=AutoTokenizer.from_pretrained(directory),
                                     patch_size=cfg["patch_size"], spatial_merge_size=cfg["spatial_merge_size"])


def write_tiny_mistral3(directory: Path, *, seed: int = 0) -> Path:
    """Mistral3ForConditionalGeneration: Pixtral tower (patch 7, images up to 56 px on the long
    side, 2D rope), 2x2 patch merger, Mistral text model."""
    from transformers import (
        AutoTokenizer,
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralImageProcessorPil,
        PixtralVisionConfig,
    )

    from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

    directory = Path(directory)
    write_tiny_tokenizer(directory, added_tokens=("[IMG]", "[IMG_BREAK]", "[IMG_END]"), chat_template=_template("[IMG]"))
    tok = AutoTokenizer.from_pretrained(directory)
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 head_dim=8, patch_size=7, image_size=56)
    text = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         sliding_window=None)
    config = Mistral3Config(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("[IMG]"),
                            spatial_merge_size=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).eval()
    randomize_(model, seed)
    model.save_pretrained(directory)
    pixtral_processor_class()(image_processor=PixtralImageProcessorPil(size={"longest_edge": 56},
                                                                        patch_size={"height": 7, "width": 7}),
                              tokenizer=tok, patch_size=7, spatial_merge_size=2).save_pretrained(directory)
    return directory


def image_inputs(images) -> list:
    """PIL images as the processors take them (`multimodal.images.ImageInput`)."""
    import hashlib

    from mistralrs.multimodal.images import ImageInput

    return [ImageInput(im.convert("RGB"), hashlib.sha256(im.tobytes()).hexdigest(), "test") for im in images]


def ours_logits(service, prompt: str, images) -> tuple[list[int], torch.Tensor, tuple]:
    """(token ids, fp32 logits of every position, MmItems) of one uncached forward of our model
    over `prompt` with `images`, through the service's processor."""
    from mistralrs.loading import build_attention_backend

    ids, items = service.processor.process(prompt, image_inputs(images))
    model = service.loaded.model
    backend = build_attention_backend(service.loaded, name="sdpa", num_blocks=0)
    t = len(ids)
    with torch.inference_mode():
        kwargs = {}
        if items:
            kwargs["mm"] = (torch.tensor([i for it in items for i in range(it.offset, it.end)]),
                            torch.cat([model.embed_multimodal(it) for it in items]))
        hidden = model.forward(torch.tensor(ids), torch.arange(t), backend.batch([0, t], [t]), **kwargs)
        return ids, model.compute_logits(hidden).float(), items


def chat_content(parts: list[dict], images) -> list[dict]:
    """OpenAI content parts: each {"type": "image"} of `parts` becomes the next image as a data: URL."""
    it = iter(images)
    return [{"type": "image_url", "image_url": {"url": data_url(next(it))}} if p["type"] == "image" else p
            for p in parts]


def hf_greedy(service, model, processor, parts: list[dict], images, max_tokens: int) -> str:
    """transformers' greedy continuation of the chat prompt our service renders for `parts`."""
    prompt = service.render_chat([{"role": "user", "content": parts}])
    enc = processor(text=prompt, images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
