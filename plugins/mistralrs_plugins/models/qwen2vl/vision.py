"""The Qwen2-VL vision transformer (HF ``Qwen2VisionTransformerPretrainedModel``): a patch
embedding over (temporal, patch, patch) cubes, pre-LayerNorm blocks with 2-D rotary attention
(height and width halves of each head, positions in merge-block order), and the patch merger
(LayerNorm, then merge_size² neighbouring patches concatenated through a two-layer GELU MLP).
The pieces Qwen2.5-VL and Qwen3-VL share are here too: `PatchEmbed`, `VisionAttention` (full
or segmented attention, segments as ``cu_seqlens``) and `vision_rotary`. One image at a time:
the engine embeds each image once (`embed_multimodal`), and HF's attention never crosses
images, so this is the same computation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs.nn.activation import get_activation
from mistralrs.nn.linear import Linear
from mistralrs.nn.norm import LayerNorm


def vision_position_ids(grid: tuple[int, int, int], merge: int) -> torch.Tensor:
    """(h, w) of every patch [t * h * w, 2], patches in merge-block order (the processor's)."""
    t, h, w = grid
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    hh = hh.reshape(shape).transpose(1, 2).flatten()
    ww = ww.reshape(shape).transpose(1, 2).flatten()
    return torch.stack([hh, ww], dim=-1).repeat(t, 1)


def vision_rotary(grid: tuple[int, int, int], merge: int, head_dim: int, theta: float,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [patches, head_dim] (float32) of the axial 2-D rotary: the first quarter of the
    frequencies rotate by height, the second by width, halves repeated (NeoX layout)."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
    pos = vision_position_ids(grid, merge).to(device)
    freqs = pos[..., None].float() * inv_freq.to(device)  # [N, 2, spatial / 2]
    freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
    freqs = torch.cat([freqs, freqs], dim=-1)
    return freqs.cos(), freqs.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_vision_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D] rotated in float32 (as HF does), cast back."""
    xf = x.float()
    out = xf * cos.unsqueeze(-2) + _rotate_half(xf) * sin.unsqueeze(-2)
    return out.to(x.dtype)


class PatchEmbed(nn.Module):
    """HF's Conv3d with kernel = stride = the (T, P, P) patch: a linear map of each flattened patch."""

    def __init__(self, channels: int, temporal: int, patch: int, dim: int, bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(dim, channels, temporal, patch, patch), requires_grad=False)
        self.proj.bias = nn.Parameter(torch.empty(dim), requires_grad=False) if bias else None
        self.dim = dim

    @classmethod
    def from_config(cls, cfg: dict, dim: int, default_patch: int, bias: bool = False) -> PatchEmbed:
        channels = int(cfg.get("in_channels", cfg.get("in_chans", 3)))  # transformers 4 configs: in_chans
        return cls(channels, int(cfg.get("temporal_patch_size", 2)), int(cfg.get("patch_size", default_patch)),
                   dim, bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixels.to(w.dtype), w.reshape(self.dim, -1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = Linear(dim, 3 * dim, bias=True)
        self.proj = Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
        """Attention within each segment ``[cu_seqlens[i], cu_seqlens[i + 1])`` of x [N, dim]."""
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.heads, self.head_dim).unbind(1)
        q, k = apply_vision_rotary(q, cos, sin), apply_vision_rotary(k, cos, sin)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [heads, N, D]
        outs = [F.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b], scale=self.head_dim ** -0.5)
                for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return self.proj(out.transpose(0, 1).reshape(n, -1))


def frame_seqlens(grid: tuple[int, int, int]) -> list[int]:
    """Segment boundaries of full attention: each temporal frame of the image on its own."""
    t, h, w = grid
    return [i * h * w for i in range(t + 1)]


class VisionMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden, bias=True)
        self.fc2 = Linear(hidden, dim, bias=True)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Qwen2VLVisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_hidden: int, act: str) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, 1e-6)
        self.norm2 = LayerNorm(dim, 1e-6)
        self.attn = VisionAttention(dim, heads)
        self.mlp = VisionMlp(dim, mlp_hidden, act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """ln_q, then merge² patches concatenated -> mlp.0 -> GELU -> mlp.2."""

    def __init__(self, out_dim: int, context_dim: int, merge: int, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.hidden = context_dim * merge * merge
        self.ln_q = norm if norm is not None else LayerNorm(context_dim, 1e-6)
        self.mlp = nn.Sequential(Linear(self.hidden, self.hidden, bias=True), nn.GELU(),
                                 Linear(self.hidden, out_dim, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


def rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


class Qwen2VisionTransformer(nn.Module):
    def __init__(self, cfg: dict, out_dim: int) -> None:
        super().__init__()
        dim, heads = int(cfg.get("embed_dim", 1280)), int(cfg.get("num_heads", 16))
        self.merge = int(cfg.get("spatial_merge_size", 2))
        self.head_dim = dim // heads
        self.theta = rope_theta(cfg)
        self.patch_embed = PatchEmbed.from_config(cfg, dim, 14)
        hidden = int(dim * float(cfg.get("mlp_ratio", 4)))
        act = str(cfg.get("hidden_act", "quick_gelu"))
        self.blocks = nn.ModuleList(Qwen2VLVisionBlock(dim, heads, hidden, act) for _ in range(int(cfg.get("depth", 32))))
        self.merger = PatchMerger(out_dim, dim, self.merge)

    def forward(self, pixels: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """One image's patches [t * h * w, C * T * P * P] -> its tokens [t * h * w / merge², out_dim]."""
        x = self.patch_embed(pixels)
        cos, sin = vision_rotary(grid, self.merge, self.head_dim, self.theta, x.device)
        cu = frame_seqlens(grid)
        for block in self.blocks:
            x = block(x, cos, sin, cu)
        return self.merger(x)
