"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL with the window-attention vision
transformer (`.vision`); the same processor, M-RoPE language model (qwen2) and checkpoint names."""

from __future__ import annotations

from torch import nn

from mistralrs_plugins.models.qwen2_5vl.vision import Qwen2_5VisionTransformer
from mistralrs_plugins.models.qwen2vl.model import QwenVLBase


class Qwen2_5VLForConditionalGeneration(QwenVLBase):
    def build_vision(self, vision: dict, text_hidden: int) -> nn.Module:
        return Qwen2_5VisionTransformer(vision, int(vision.get("out_hidden_size", text_hidden)))
