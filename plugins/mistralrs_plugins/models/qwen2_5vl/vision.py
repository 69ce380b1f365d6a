"""The Qwen2.5-VL vision transformer (HF ``Qwen2_5_VisionTransformerPretrainedModel``): Qwen2-VL's
patch embedding and 2-D rotary, RMSNorm blocks with a gated SiLU MLP, window attention (the
merged grid cut into window_size / (merge * patch) squares; patches reordered window by window)
except in the ``fullatt_block_indexes`` blocks, and a patch merger with an RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.nn.activation import get_activation
from mistralrs.nn.linear import Linear
from mistralrs.nn.norm import RMSNorm
from mistralrs_plugins.models.qwen2vl.vision import (
    PatchEmbed,
    PatchMerger,
    VisionAttention,
    frame_seqlens,
    rope_theta,
    vision_rotary,
)


def window_index(grid: tuple[int, int, int], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """(order of the merged patches window by window, window boundaries in patches), as
    transformers' ``get_vision_window_index`` for one image."""
    t, h, w = grid
    lh, lw = h // merge, w // merge
    index = torch.arange(t * lh * lw).reshape(t, lh, lw)
    pad_h, pad_w = window - lh % window, window - lw % window
    nh, nw = (lh + pad_h) // window, (lw + pad_w) // window
    padded = F.pad(index, (0, pad_w, 0, pad_h), "constant", -100)
    padded = padded.reshape(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, window, window)
    seqlens = (padded != -100).sum([2, 3]).reshape(-1)
    flat = padded.reshape(-1)
    bounds = [0] + (seqlens.cumsum(0) * merge * merge).tolist()
    return flat[flat != -100], [b for i, b in enumerate(bounds) if i == 0 or b != bounds[i - 1]]


class GatedMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=True)
        self.up_proj = Linear(dim, hidden, bias=True)
        self.down_proj = Linear(hidden, dim, bias=True)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Qwen2_5VLVisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, act: str) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, 1e-6)
        self.norm2 = RMSNorm(dim, 1e-6)
        self.attn = VisionAttention(dim, heads)
        self.mlp = GatedMlp(dim, hidden, act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class Qwen2_5VisionTransformer(nn.Module):
    def __init__(self, cfg: dict, out_dim: int) -> None:
        super().__init__()
        dim, heads = int(cfg.get("hidden_size", 1280)), int(cfg.get("num_heads", 16))
        self.merge = int(cfg.get("spatial_merge_size", 2))
        self.patch = int(cfg.get("patch_size", 14))
        self.window = int(cfg.get("window_size", 112)) // self.merge // self.patch
        self.full_blocks = {int(i) for i in cfg.get("fullatt_block_indexes", (7, 15, 23, 31))}
        self.head_dim = dim // heads
        self.theta = rope_theta(cfg)
        self.patch_embed = PatchEmbed.from_config(cfg, dim, 14)
        hidden, act = int(cfg.get("intermediate_size", 3420)), str(cfg.get("hidden_act", "silu"))
        self.blocks = nn.ModuleList(Qwen2_5VLVisionBlock(dim, heads, hidden, act)
                                    for _ in range(int(cfg.get("depth", 32))))
        self.merger = PatchMerger(out_dim, dim, self.merge, norm=RMSNorm(dim, 1e-6))

    def forward(self, pixels: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """One image's patches -> its tokens [t * h * w / merge², out_dim]."""
        x = self.patch_embed(pixels)
        cos, sin = vision_rotary(grid, self.merge, self.head_dim, self.theta, x.device)
        order, windows = window_index(grid, self.merge, self.window)
        order = order.to(x.device)
        unit = self.merge * self.merge

        def by_window(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0] // unit, unit, -1)[order].reshape(t.shape[0], -1)

        x, cos, sin = by_window(x), by_window(cos), by_window(sin)
        full = frame_seqlens(grid)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full if i in self.full_blocks else windows)
        return self.merger(x)[torch.argsort(order)]
