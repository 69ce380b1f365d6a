"""Idefics3 / SmolVLM: a SigLIP-style vision transformer (patch convolution with bias, learned
positions bucketed onto the tile's patch grid, pre-norm blocks as CLIP's — `llava.clip.ClipLayer`
— and a final LayerNorm, no class token), a connector that pixel-shuffles each tile's patch grid
(``scale_factor``² neighbours into one feature) and projects it without bias, and a registered
text architecture as the language model. One tile (an `MmItem`) at a time: tiles are encoded
independently in transformers too."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralrs.nn.linear import Linear
from mistralrs.nn.norm import LayerNorm
from mistralrs_plugins.models.llava.clip import ClipLayer
from mistralrs_plugins.models.llava.model import VisionLanguageModel, check_length, text_model

VISION_DEFAULTS = {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 16, "image_size": 224, "patch_size": 32, "num_channels": 3,
                   "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}  # Idefics3VisionConfig's


class Idefics3VisionEmbeddings(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        hidden, self.patch = int(cfg["hidden_size"]), int(cfg["patch_size"])
        self.per_side = int(cfg["image_size"]) // self.patch
        self.patch_embedding = nn.Conv2d(int(cfg["num_channels"]), hidden, self.patch, stride=self.patch)
        self.patch_embedding.requires_grad_(False)
        self.position_embedding = nn.Embedding(self.per_side ** 2, hidden)
        self.position_embedding.weight.requires_grad_(False)

    def position_ids(self, rows: int, cols: int, device: Any) -> torch.Tensor:
        """transformers' fractional bucketing of a fully valid rows x cols patch grid onto the
        per_side x per_side position table (the same float ops, so the same buckets)."""
        boundaries = torch.arange(1 / self.per_side, 1.0, 1 / self.per_side, device=device)
        n_rows, n_cols = torch.tensor([rows], device=device), torch.tensor([cols], device=device)
        frac_h = torch.arange(rows, device=device, dtype=torch.float32)[None, :] * (1.0 / n_rows)[:, None]
        frac_w = torch.arange(cols, device=device, dtype=torch.float32)[None, :] * (1.0 / n_cols)[:, None]
        bucket_h = torch.bucketize(torch.clamp(frac_h, max=1.0 - 1e-6), boundaries, right=True)
        bucket_w = torch.bucketize(torch.clamp(frac_w, max=1.0 - 1e-6), boundaries, right=True)
        return (bucket_h[:, :, None] * self.per_side + bucket_w[:, None, :]).reshape(-1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixels.to(w.dtype)).flatten(2).transpose(1, 2)  # [B, N, H]
        ids = self.position_ids(pixels.shape[-2] // self.patch, pixels.shape[-1] // self.patch, x.device)
        return x + self.position_embedding(ids)


class Idefics3VisionTransformer(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.embeddings = Idefics3VisionEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(ClipLayer(cfg) for _ in range(int(cfg["num_hidden_layers"])))
        self.post_layernorm = LayerNorm(int(cfg["hidden_size"]), float(cfg["layer_norm_eps"]))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class Idefics3Connector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.modality_projection = nn.Module()
        self.modality_projection.proj = Linear(vision_hidden * scale ** 2, text_hidden, bias=False)

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """[B, side², D] -> [B, (side / s)², D s²]: each s x s block of patches into one feature,
        in transformers' order."""
        b, n, d = x.shape
        s, side = self.scale, int(n ** 0.5)
        x = x.view(b, side, side // s, d * s).permute(0, 2, 1, 3)
        x = x.reshape(b, side // s, side // s, d * s * s).permute(0, 2, 1, 3)
        return x.reshape(b, n // (s * s), d * s * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.modality_projection.proj(self.pixel_shuffle(x))


class Idefics3ForConditionalGeneration(VisionLanguageModel):
    renames = (
        (r"^model\.text_model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^model\.vision_model\.", "vision_model."),
        (r"^model\.connector\.", "connector."),
    )

    def __init__(self, config: dict, ctx: Any = None) -> None:
        super().__init__()
        vision = {**VISION_DEFAULTS, **(config.get("vision_config") or {})}
        text = {"model_type": "llama", "rms_norm_eps": 1e-5, **(config.get("text_config") or {})}
        if "tie_word_embeddings" in config:  # the composite's own flag decides, as in transformers
            text["tie_word_embeddings"] = config["tie_word_embeddings"]
        self.config = config = {**config, "vision_config": vision, "text_config": text}
        self.vision_model = Idefics3VisionTransformer(vision)
        self.connector = Idefics3Connector(int(vision["hidden_size"]), int(text["hidden_size"]),
                                           int(config.get("scale_factor", 2)))
        self.language_model = text_model(config, ctx)

    def embed_multimodal(self, item: Any) -> torch.Tensor:
        """One tile's embeddings [image_seq_len, text hidden]."""
        # the patch convolution is never quantized (ISQ replaces Linear weights), so it names the device
        pixels = item.data["pixel_values"].to(self.vision_model.embeddings.patch_embedding.weight.device)
        out = self.connector(self.vision_model(pixels.unsqueeze(0) if pixels.dim() == 3 else pixels))
        return check_length(out.reshape(-1, out.shape[-1]), item)
