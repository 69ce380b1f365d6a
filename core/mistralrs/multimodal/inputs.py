"""What a multimodal prompt carries into the engine besides its token ids: one `MmItem` per
image, the span of placeholder tokens it fills and what the model's encoder needs for it."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen(eq=False)
class MmItem:
    """An image in a prompt: tokens ``[offset, offset + length)`` are its placeholders; the
    model's `embed_multimodal(item)` turns `data` (the processor's tensors) into `length`
    embeddings. `key` (the image's content hash) stands for those tokens in the prefix cache,
    so two different images never share cache blocks."""

    offset: int
    length: int
    key: str
    data: dict[str, Any] = attrs.field(factory=dict, repr=False)

    @property
    def end(self) -> int:
        return self.offset + self.length


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
