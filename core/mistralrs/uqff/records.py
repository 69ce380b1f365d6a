"""The pieces of a UQFF layer record that every family uses: its scalar and vector entries.

A record is ``{suffix: tensor}`` for one layer key (``weight``, ``weight.<field>``, ``bias``),
as `QuantizedLinearMethod.uqff_entries` returns it and the reader hands it back. Scalars are
0-d tensors (U8 or U32 in the file), vectors 1-d U32. Quantizer plugins build and read their
records with these helpers; a record that does not fit raises ValueError naming the entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

FORMAT = "weight.format"  # the U8 family tag of every record


def u8(value: int) -> torch.Tensor:
    return torch.tensor(int(value), dtype=torch.uint8)


def u32(value: int) -> torch.Tensor:
    return torch.tensor(int(value), dtype=torch.uint32)


def u32_vec(values: Iterable[int]) -> torch.Tensor:
    return torch.tensor([int(v) for v in values], dtype=torch.uint32)


def scalar(entries: Mapping[str, torch.Tensor], suffix: str) -> int:
    """The integer of a scalar entry; ValueError when it is missing or not a scalar."""
    t = entries.get(suffix)
    if t is None:
        raise ValueError(f"the record has no {suffix!r} entry")
    if t.dim() != 0 or t.is_floating_point():
        raise ValueError(f"the record's {suffix!r} entry is not an integer scalar (shape {list(t.shape)})")
    return int(t.item())


def vector(entries: Mapping[str, torch.Tensor], suffix: str) -> list[int]:
    t = entries.get(suffix)
    if t is None:
        raise ValueError(f"the record has no {suffix!r} entry")
    if t.dim() != 1 or t.is_floating_point():
        raise ValueError(f"the record's {suffix!r} entry is not an integer vector")
    return [int(v) for v in t.tolist()]


def tensor(entries: Mapping[str, torch.Tensor], suffix: str) -> torch.Tensor:
    t = entries.get(suffix)
    if t is None:
        raise ValueError(f"the record has no {suffix!r} entry")
    return t


def require_exactly(entries: Mapping[str, torch.Tensor], suffixes: Iterable[str]) -> None:
    """The record's ``weight*`` entries (besides the format tag) are exactly `suffixes`, as
    mistral.rs recognises a family's records."""
    wanted = set(suffixes)
    have = {k for k in entries if k == "weight" or k.startswith("weight.")} - {FORMAT}
    if have != wanted:
        missing, extra = sorted(wanted - have), sorted(have - wanted)
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)}"] if extra else [])
        raise ValueError(f"the record's entries do not match its format ({'; '.join(parts)})")


def check_shape(shape: list[int], out_features: int, in_features: int) -> None:
    if list(shape) != [out_features, in_features]:
        raise ValueError(f"a weight of shape {list(shape)} given to a layer of shape [{out_features}, {in_features}]")
