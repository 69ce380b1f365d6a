"""The SigLIP vision transformer (HF ``SiglipVisionModel``, as Gemma 3 uses it): patch
convolution with bias, learned positions (no class token), CLIP's pre-norm blocks, a final
LayerNorm. No pooling head (``vision_use_head`` is off in Gemma 3; its weights are skipped)."""

from __future__ import annotations

import torch
from torch import nn

from mistralrs.nn.norm import LayerNorm
from mistralrs_plugins.models.llava.clip import ClipLayer


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        hidden, patch = int(cfg["hidden_size"]), int(cfg["patch_size"])
        self.patch_embedding = nn.Conv2d(int(cfg.get("num_channels", 3)), hidden, patch, stride=patch)
        self.patch_embedding.requires_grad_(False)
        self.position_embedding = nn.Embedding((int(cfg["image_size"]) // patch) ** 2, hidden)
        self.position_embedding.weight.requires_grad_(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.patch_embedding.weight
        patches = self.patch_embedding(pixels.to(w.dtype)).flatten(2).transpose(1, 2)  # [B, N, H]
        if patches.shape[1] != self.position_embedding.weight.shape[0]:
            raise ValueError(f"the image gives {patches.shape[1]} patches; the tower has "
                             f"{self.position_embedding.weight.shape[0]} positions")
        return patches + self.position_embedding.weight


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        cfg = {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, **cfg}
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(ClipLayer(cfg) for _ in range(int(cfg["num_hidden_layers"])))
        self.post_layernorm = LayerNorm(int(cfg["hidden_size"]), float(cfg["layer_norm_eps"]))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The last hidden state [B, patches, hidden], after the final LayerNorm."""
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class SiglipVisionModel(nn.Module):
    """HF's ``SiglipVisionModel``: ``vision_model`` inside (the hub checkpoints' names)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)
