"""What a multimodal prompt carries into the engine besides its token ids: one `MmItem` per
image, the span of placeholder tokens it fills and what the model's encoder needs for it, and
the rotary positions of a sequence's tokens when images take multi-component positions (M-RoPE)."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen(eq=False)
class MmItem:
    """An image in a prompt: tokens ``[offset, offset + length)`` are its placeholders; the
    model's `embed_multimodal(item)` turns `data` (the processor's tensors) into `length`
    embeddings. `key` (the image's content hash) stands for those tokens in the prefix cache,
    so two different images never share cache blocks.

    Multi-component rotary positions (Qwen2-VL's M-RoPE): `positions` (int tensor ``[C,
    length]``) are the rotary positions of the image's tokens relative to the position its
    first token would have as text; `position_span` is how many positions the image takes up,
    so the text after it starts at (first position + span) instead of (+ length). Items
    without them leave positions as token indices (1-D)."""

    offset: int
    length: int
    key: str
    data: dict[str, Any] = attrs.field(factory=dict, repr=False)
    positions: Any = attrs.field(default=None, repr=False)
    position_span: int | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def position_shift(self) -> int:
        """How much later the tokens after this image sit in rotary positions than in indices."""
        return 0 if self.position_span is None else self.position_span - self.length


def hash_tokens(tokens: list[int], items: tuple[MmItem, ...]) -> list[Any]:
    """`tokens` with every image's placeholders replaced by (image hash, index): what prefix-cache
    block hashes are computed over."""
    if not items:
        return tokens
    out: list[Any] = list(tokens)
    for item in items:
        for k in range(item.length):
            if item.offset + k < len(out):
                out[item.offset + k] = (item.key, k)
    return out


def has_mm_positions(items: tuple[MmItem, ...]) -> bool:
    return any(item.positions is not None or item.position_shift for item in items)


def position_delta(items: tuple[MmItem, ...]) -> int:
    """Rotary position minus token index after the last image (transformers' ``rope_deltas``):
    generated tokens sit at index + delta."""
    return sum(item.position_shift for item in items)


def rope_positions(items: tuple[MmItem, ...], start: int, n: int) -> Any:
    """The rotary positions of tokens ``[start, start + n)`` of a sequence whose prompt holds
    `items` (in prompt order): a long tensor ``[n]`` while the range holds no token with
    per-component positions, else ``[C, n]`` (text tokens repeat their position in every
    component). Text after an image continues from the image's span; tokens past the prompt
    (generated ones) continue the same way, at index + `position_delta`."""
    import torch

    end = start + n
    comps = next((int(it.positions.shape[0]) for it in items
                  if it.positions is not None and it.offset < end and it.end > start), 0)
    out = torch.empty((comps or 1, n), dtype=torch.long)
    shift, cursor = 0, start
    for item in items:
        if cursor >= end:
            break
        if item.end <= cursor:
            shift += item.position_shift
            continue
        if item.offset > cursor:  # text before the image
            stop = min(item.offset, end)
            out[:, cursor - start:stop - start] = torch.arange(cursor, stop) + shift
            cursor = stop
            if cursor >= end:
                break
        hi = min(item.end, end)
        base = item.offset + shift
        if item.positions is None:
            out[:, cursor - start:hi - start] = torch.arange(cursor, hi) + shift
        else:
            out[:, cursor - start:hi - start] = item.positions[:, cursor - item.offset:hi - item.offset] + base
        cursor = hi
        shift += item.position_shift
    if cursor < end:
        out[:, cursor - start:] = torch.arange(cursor, end) + shift
    return out if comps else out[0]
