"""The CLIP vision transformer (HF ``CLIPVisionModel``): patch convolution, class token,
learned positions, pre-LayerNorm, pre-norm blocks with full attention. `forward` returns the
hidden states of every layer (``[0]`` is the embeddings after pre_layrnorm), as transformers'
``output_hidden_states`` gives them, since vision-language models pick a middle layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.nn.activation import get_activation
from mistralrs.nn.linear import Linear
from mistralrs.nn.norm import LayerNorm


class ClipAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj = Linear(hidden, hidden, bias=True)
        self.k_proj = Linear(hidden, hidden, bias=True)
        self.v_proj = Linear(hidden, hidden, bias=True)
        self.out_proj = Linear(hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, -1))


class ClipMlp(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.fc1 = Linear(hidden, intermediate, bias=True)
        self.fc2 = Linear(intermediate, hidden, bias=True)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        hidden, eps = int(cfg["hidden_size"]), float(cfg.get("layer_norm_eps", 1e-5))
        self.self_attn = ClipAttention(hidden, int(cfg["num_attention_heads"]))
        self.layer_norm1 = LayerNorm(hidden, eps)
        self.mlp = ClipMlp(hidden, int(cfg["intermediate_size"]), str(cfg.get("hidden_act", "quick_gelu")))
        self.layer_norm2 = LayerNorm(hidden, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        hidden, patch = int(cfg["hidden_size"]), int(cfg["patch_size"])
        self.patch = patch
        self.class_embedding = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.patch_embedding = nn.Conv2d(int(cfg.get("num_channels", 3)), hidden, patch, stride=patch, bias=False)
        self.patch_embedding.weight.requires_grad_(False)
        positions = (int(cfg["image_size"]) // patch) ** 2 + 1
        self.position_embedding = nn.Embedding(positions, hidden)
        self.position_embedding.weight.requires_grad_(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.patch_embedding.weight
        patches = self.patch_embedding(pixels.to(w.dtype)).flatten(2).transpose(1, 2)  # [B, N, H]
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1)
        return x + self.position_embedding.weight[: x.shape[1]]


class ClipVisionTransformer(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        hidden, eps = int(cfg["hidden_size"]), float(cfg.get("layer_norm_eps", 1e-5))
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = LayerNorm(hidden, eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(ClipLayer(cfg) for _ in range(int(cfg["num_hidden_layers"])))
        self.post_layernorm = LayerNorm(hidden, eps)

    def forward(self, pixels: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Hidden states [embeddings, layer 1, ...]; `upto` stops after that many layers."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        states = [x]
        for layer in self.encoder.layers[:upto]:
            x = layer(x)
            states.append(x)
        return states


class ClipVisionModel(nn.Module):
    """HF's ``CLIPVisionModel``: ``vision_model`` inside (the checkpoint names)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.vision_model = ClipVisionTransformer(cfg)
