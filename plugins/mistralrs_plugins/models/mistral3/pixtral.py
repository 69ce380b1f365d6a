"""The Pixtral vision encoder (HF ``PixtralVisionModel``): a patch convolution over an image of
any size (multiples of the patch), RMSNorm, pre-norm blocks with a gated MLP and 2D rotary
positions (each patch's row and column rotate alternate frequency pairs). One image per call:
transformers' block-diagonal mask over a batch of images gives the same result."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.nn.linear import Linear
from mistralrs.nn.mlp import GatedMLP
from mistralrs.nn.norm import RMSNorm


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class PixtralRotary2D:
    """cos/sin [patches, head_dim] for a (rows x cols) grid: rows take the even-indexed
    frequencies, columns the odd ones, as transformers' axial rope. Computed per image in
    float32 (no buffer, so a bf16 model keeps exact frequencies)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        self.head_dim, self.theta = head_dim, theta

    def __call__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim))
        h = torch.arange(rows, device=device).repeat_interleave(cols).float()
        w = torch.arange(cols, device=device).repeat(rows).float()
        freqs = torch.cat([h[:, None] * inv[0::2], w[:, None] * inv[1::2]], dim=-1)
        freqs = torch.cat([freqs, freqs], dim=-1)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


class PixtralAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (Linear(hidden, hidden, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (p(x).view(n, self.heads, self.head_dim).transpose(0, 1) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)
        return self.o_proj(o.transpose(0, 1).reshape(n, -1))


class PixtralLayer(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        hidden = int(cfg["hidden_size"])
        self.attention_norm = RMSNorm(hidden, 1e-5)
        self.attention = PixtralAttention(hidden, int(cfg["num_attention_heads"]))
        self.ffn_norm = RMSNorm(hidden, 1e-5)
        self.feed_forward = GatedMLP(hidden, int(cfg["intermediate_size"]), str(cfg.get("hidden_act", "gelu")))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class PixtralVisionModel(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        self.patch_size = int(cfg["patch_size"])
        self.patch_conv = nn.Conv2d(int(cfg.get("num_channels", 3)), hidden, self.patch_size, stride=self.patch_size,
                                    bias=False)
        self.patch_conv.requires_grad_(False)
        self.ln_pre = RMSNorm(hidden, 1e-5)
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(PixtralLayer(cfg) for _ in range(int(cfg["num_hidden_layers"])))
        rope = cfg.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10_000.0)
        self.rotary = PixtralRotary2D(int(cfg.get("head_dim") or hidden // heads), theta)

    def forward(self, pixels: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """pixels [3, H, W] (H, W multiples of the patch) -> hidden states [embeddings after
        ln_pre, layer 1, ...] each [patches, hidden], patches in row-major order; `upto` stops
        after that many layers."""
        w = self.patch_conv.weight
        grid = self.patch_conv(pixels.to(w.dtype).unsqueeze(0))[0]  # [hidden, rows, cols]
        rows, cols = grid.shape[1:]
        x = self.ln_pre(grid.flatten(1).T)
        cos, sin = self.rotary(rows, cols, x.dtype, x.device)
        states = [x]
        for layer in self.transformer.layers[:upto]:
            x = layer(x, cos, sin)
            states.append(x)
        return states
