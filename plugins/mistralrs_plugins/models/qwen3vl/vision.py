"""The Qwen3-VL vision transformer (HF ``Qwen3VLVisionModel``): a biased patch embedding plus
learned positions bilinearly resampled (align_corners) from a square table to each image's
grid, Qwen2-VL's 2-D rotary attention in LayerNorm blocks with a GELU MLP, the patch merger,
and DeepStack: after the blocks in ``deepstack_visual_indexes`` a merger of its own (LayerNorm
after the merge) turns the hidden states into features the language model adds to the image
tokens' hidden states after its first layers."""

from __future__ import annotations

import torch
from torch import nn

from mistralrs.nn.activation import get_activation
from mistralrs.nn.linear import Linear
from mistralrs.nn.norm import LayerNorm
from mistralrs_plugins.models.qwen2vl.vision import (
    PatchEmbed,
    VisionAttention,
    frame_seqlens,
    rope_theta,
    vision_position_ids,
    vision_rotary,
)


def _bilinear_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two taps into a `side`-long table and their weights for target positions `index` on an
    axis of `size` (align_corners=True), as transformers' ``_interpolation_axis_taps_weights``."""
    src = index.to(torch.float32) * (side - 1) / torch.clamp(torch.tensor(size - 1), min=1)
    floor = torch.floor(src)
    offsets = torch.arange(0, 2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


class VisionMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.linear_fc1 = Linear(dim, hidden, bias=True)
        self.linear_fc2 = Linear(hidden, dim, bias=True)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Qwen3VLVisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, act: str) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, 1e-6)
        self.norm2 = LayerNorm(dim, 1e-6)
        self.attn = VisionAttention(dim, heads)
        self.mlp = VisionMlp(dim, hidden, act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class Qwen3VLPatchMerger(nn.Module):
    """norm (over each patch, or after the merge: `postshuffle`), merge² patches concatenated ->
    linear_fc1 -> GELU -> linear_fc2."""

    def __init__(self, dim: int, out_dim: int, merge: int, postshuffle: bool) -> None:
        super().__init__()
        self.hidden, self.postshuffle = dim * merge * merge, postshuffle
        self.norm = LayerNorm(self.hidden if postshuffle else dim, 1e-6)
        self.linear_fc1 = Linear(self.hidden, self.hidden, bias=True)
        self.linear_fc2 = Linear(self.hidden, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.hidden)) if self.postshuffle else self.norm(x).view(-1, self.hidden)
        return self.linear_fc2(torch.nn.functional.gelu(self.linear_fc1(x)))


class Qwen3VisionTransformer(nn.Module):
    def __init__(self, cfg: dict, out_dim: int) -> None:
        super().__init__()
        dim, heads = int(cfg.get("hidden_size", 1152)), int(cfg.get("num_heads", 16))
        self.merge = int(cfg.get("spatial_merge_size", 2))
        self.head_dim = dim // heads
        self.theta = rope_theta(cfg)
        self.patch_embed = PatchEmbed.from_config(cfg, dim, 16, bias=True)
        positions = int(cfg.get("num_position_embeddings", 2304))
        self.side = int(positions ** 0.5)
        self.pos_embed = nn.Embedding(positions, dim)
        self.pos_embed.weight.requires_grad_(False)
        hidden, act = int(cfg.get("intermediate_size", 4304)), str(cfg.get("hidden_act", "gelu_pytorch_tanh"))
        self.blocks = nn.ModuleList(Qwen3VLVisionBlock(dim, heads, hidden, act) for _ in range(int(cfg.get("depth", 27))))
        self.merger = Qwen3VLPatchMerger(dim, out_dim, self.merge, postshuffle=False)
        self.deepstack_indexes = [int(i) for i in cfg.get("deepstack_visual_indexes", (8, 16, 24))]
        self.deepstack_merger_list = nn.ModuleList(Qwen3VLPatchMerger(dim, out_dim, self.merge, postshuffle=True)
                                                   for _ in self.deepstack_indexes)

    def position_embeddings(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """The learned positions resampled to the grid, patches in merge-block order."""
        rows, cols = vision_position_ids(grid, self.merge).unbind(-1)
        h_taps, h_w = _bilinear_taps(rows, grid[1], self.side)
        w_taps, w_w = _bilinear_taps(cols, grid[2], self.side)
        index = (h_taps[:, :, None] * self.side + w_taps[:, None, :]).reshape(-1, 4)
        weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
        table = self.pos_embed.weight
        return (table[index.to(table.device)] * weights.to(table.device)[:, :, None]).sum(1)

    def forward(self, pixels: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """One image's patches -> [tokens, out_dim * (1 + deepstack layers)]: the merged tokens,
        then each DeepStack layer's features, side by side."""
        x = self.patch_embed(pixels)
        x = x + self.position_embeddings(grid).to(x.dtype)
        cos, sin = vision_rotary(grid, self.merge, self.head_dim, self.theta, x.device)
        cu = frame_seqlens(grid)
        deep = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cu)
            if i in self.deepstack_indexes:
                deep.append(self.deepstack_merger_list[self.deepstack_indexes.index(i)](x))
        return torch.cat([self.merger(x), *deep], dim=-1)
