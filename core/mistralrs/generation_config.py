"""A model's generation_config.json: default sampling parameters and stop tokens.

`load_generation_config(path_or_dir)` reads the file (a missing file gives all-None
defaults) into a frozen `GenerationDefaults`. `merge_eos(...)` combines the eos ids of
config.json, generation_config.json and the tokenizer into the set of stop tokens
(Llama 3 lists several eos ids in generation_config.json only, Qwen lists
<|im_end|> and <|endoftext|>, ...).

This module must not import torch or transformers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from mistralrs.errors import ModelLoadError

__all__ = ["GenerationDefaults", "load_generation_config", "merge_eos"]

GENERATION_CONFIG_FILE = "generation_config.json"


@attrs.frozen
class GenerationDefaults:
    """Defaults from generation_config.json. Every field is None when not set."""

    eos_token_ids: tuple[int, ...] | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    do_sample: bool | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None

    def sampling_defaults(self) -> dict[str, Any]:
        """The sampling fields that are set, as a dict (for filling unset request fields).

        When the file says `do_sample: false` the model's authors intend greedy decoding,
        and transformers then ignores temperature/top_p/top_k/min_p; so do we."""
        out: dict[str, Any] = {}
        sampling = ("temperature", "top_p", "top_k", "min_p")
        for name in (*sampling, "repetition_penalty", "max_new_tokens"):
            value = getattr(self, name)
            if value is None or (self.do_sample is False and name in sampling):
                continue
            out[name] = value
        return out


def _id_list(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(dict.fromkeys(value))
    raise TypeError


def _convert(data: Mapping[str, Any], path: Path) -> GenerationDefaults:
    def bad(key: str, expected: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: {key} must be {expected}, got {data[key]!r}; fix or delete the entry")

    def get_int(key: str) -> int | None:
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(key, "an integer")
        return value

    def get_float(key: str) -> float | None:
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(key, "a number")
        return float(value)

    def get_bool(key: str) -> bool | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise bad(key, "true or false")
        return value

    try:
        eos = _id_list(data.get("eos_token_id"))
    except TypeError:
        raise bad("eos_token_id", "an integer or a list of integers") from None
    return GenerationDefaults(
        eos_token_ids=eos,
        bos_token_id=get_int("bos_token_id"),
        pad_token_id=get_int("pad_token_id"),
        temperature=get_float("temperature"),
        top_p=get_float("top_p"),
        top_k=get_int("top_k"),
        min_p=get_float("min_p"),
        repetition_penalty=get_float("repetition_penalty"),
        do_sample=get_bool("do_sample"),
        max_new_tokens=get_int("max_new_tokens"),
        max_length=get_int("max_length"),
    )


def load_generation_config(path_or_dir: str | Path) -> GenerationDefaults:
    """Read generation_config.json (a file path, or a model directory holding one).

    A missing file gives `GenerationDefaults()` (all None); malformed JSON or a wrongly
    typed entry raises ModelLoadError naming the file (and line)."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / GENERATION_CONFIG_FILE
    if not path.is_file():
        return GenerationDefaults()
    from mistralrs.tokenization import read_json_file

    data = read_json_file(path, what="generation config")
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object; fix or delete the file")
    return _convert(data, path)


def _as_ids(value: int | Iterable[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, bool):
        raise TypeError(f"eos token ids must be integers, got {value!r}")
    if isinstance(value, int):
        return (value,)
    out = []
    for v in value:
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"eos token ids must be integers, got {v!r}")
        out.append(v)
    return tuple(out)


def merge_eos(
    config_json_eos: int | Iterable[int] | None,
    generation_eos: int | Iterable[int] | None,
    tokenizer_eos: int | Iterable[int] | None,
) -> tuple[int, ...]:
    """Union of the eos ids from config.json, generation_config.json and the tokenizer,
    in that order, without duplicates. Each argument may be None, an id or ids."""
    merged: dict[int, None] = {}
    for source in (config_json_eos, generation_eos, tokenizer_eos):
        for i in _as_ids(source):
            merged[i] = None
    return tuple(merged)
