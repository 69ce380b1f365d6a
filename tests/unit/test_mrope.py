"""Multimodal rotary positions: `multimodal.inputs.rope_positions` (the layout of a sequence's
rotary positions around images with M-RoPE offsets, in any chunking) and M-RoPE in
`nn.rotary.RotaryEmbedding` (section and interleaved layouts; plain RoPE for 1-D positions)."""

from __future__ import annotations

import pytest
import torch

from mistralrs.multimodal.inputs import MmItem, has_mm_positions, position_delta, rope_positions


def _image(offset: int, h: int, w: int) -> MmItem:
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([torch.zeros(h * w, dtype=torch.long), hh.flatten(), ww.flatten()])
    return MmItem(offset=offset, length=h * w, key=f"img{offset}", positions=pos, position_span=max(h, w))


def _reference(items, total):
    """transformers' get_rope_index for the same layout, written the long way."""
    cols, pos, i = [], 0, 0
    for item in items:
        while i < item.offset:
            cols.append([pos] * 3)
            pos, i = pos + 1, i + 1
        cols.extend((item.positions.T + pos).tolist())
        pos, i = pos + item.position_span, item.end
    while i < total:
        cols.append([pos] * 3)
        pos, i = pos + 1, i + 1
    return torch.tensor(cols).T


def test_positions_match_transformers_layout_in_any_chunking():
    items = (_image(3, 2, 3), _image(12, 4, 2))  # tokens 3..8 and 12..19
    total = 26
    ref = _reference(items, total)
    assert torch.equal(rope_positions(items, 0, total), ref)
    for chunk in (1, 4, 7):
        parts = [rope_positions(items, s, min(chunk, total - s)) for s in range(0, total, chunk)]
        got = torch.cat([p if p.dim() == 2 else p.expand(3, -1) for p in parts], dim=1)
        assert torch.equal(got, ref), chunk
    # generated tokens continue at index + delta, 1-D (no image in range)
    delta = position_delta(items)
    assert delta == (3 - 6) + (4 - 8)
    tail = rope_positions(items, 30, 2)
    assert tail.dim() == 1 and tail.tolist() == [30 + delta, 31 + delta]


def test_items_without_positions_keep_indices():
    items = (MmItem(offset=2, length=5, key="llava"),)
    assert not has_mm_positions(items) and position_delta(items) == 0
    assert rope_positions(items, 0, 10).tolist() == list(range(10))


@pytest.mark.parametrize("interleaved", [False, True])
def test_mrope_rotary(interleaved):
    from mistralrs.nn.rotary import RotaryEmbedding

    config = {"model_type": "x", "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3],
                                                  "mrope_interleaved": interleaved}, "rope_theta": 10000.0}
    rope = RotaryEmbedding.from_config(config, head_dim=16)
    plain = RotaryEmbedding(16)
    pos = torch.tensor([0, 5, 9, 40])
    # text: every component the same position -> plain RoPE, and 1-D positions are plain RoPE too
    for p in (pos, pos.expand(3, -1).clone()):
        c, s = rope.cos_sin(p)
        c0, s0 = plain.cos_sin(pos)
        assert torch.equal(c, c0) and torch.equal(s, s0)
    # each frequency takes its component's angle (transformers' layouts)
    thw = torch.stack([pos, pos + 1, pos + 2])
    cos, _ = rope.cos_sin(thw)
    angles = thw[..., None].float() * plain.inv_freq  # [3, T, 8]
    if interleaved:
        comp = [0, 1, 2, 0, 1, 2, 0, 1]
    else:
        comp = [0, 0, 1, 1, 1, 2, 2, 2]
    expected = torch.stack([angles[c, :, i] for i, c in enumerate(comp)], dim=-1).cos()
    assert torch.equal(cos, expected)


def test_mrope_section_must_fit_the_rotary_dim():
    from mistralrs.errors import ModelLoadError
    from mistralrs.nn.rotary import RotaryEmbedding

    with pytest.raises(ModelLoadError, match="mrope_section"):
        RotaryEmbedding.from_config({"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}, head_dim=16)
