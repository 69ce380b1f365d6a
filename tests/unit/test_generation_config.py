"""generation_config.json loading and eos merging."""

from __future__ import annotations

import json

import attrs
import pytest

from mistralrs.errors import ModelLoadError
from mistralrs.generation_config import GenerationDefaults, load_generation_config, merge_eos

LLAMA31 = {
    "bos_token_id": 128000,
    "do_sample": True,
    "eos_token_id": [128001, 128008, 128009],
    "temperature": 0.6,
    "top_p": 0.9,
    "transformers_version": "4.43.0.dev0",
}

QWEN3 = {
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
    "min_p": 0,
    "repetition_penalty": 1.05,
    "max_new_tokens": 2048,
}


def _write(tmp_path, data, name="generation_config.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2), encoding="utf-8")
    return path


def test_llama_style_file_from_dir_and_path(tmp_path):
    path = _write(tmp_path, LLAMA31)
    for arg in (tmp_path, path, str(path)):
        g = load_generation_config(arg)
        assert g.eos_token_ids == (128001, 128008, 128009)
        assert g.bos_token_id == 128000 and g.do_sample is True
        assert g.temperature == 0.6 and g.top_p == 0.9
        assert g.top_k is None and g.min_p is None and g.pad_token_id is None and g.max_new_tokens is None


def test_qwen_style_file(tmp_path):
    g = load_generation_config(_write(tmp_path, QWEN3))
    assert g == GenerationDefaults(
        eos_token_ids=(151645, 151643),
        bos_token_id=151643,
        pad_token_id=151643,
        temperature=0.6,
        top_p=0.95,
        top_k=20,
        min_p=0.0,
        repetition_penalty=1.05,
        do_sample=True,
        max_new_tokens=2048,
    )
    assert isinstance(g.min_p, float)
    assert g.sampling_defaults() == {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "min_p": 0.0,
        "repetition_penalty": 1.05,
        "max_new_tokens": 2048,
    }


def test_single_int_eos_and_duplicates(tmp_path):
    assert load_generation_config(_write(tmp_path, {"eos_token_id": 2})).eos_token_ids == (2,)
    assert load_generation_config(_write(tmp_path, {"eos_token_id": [2, 2, 7]})).eos_token_ids == (2, 7)
    assert load_generation_config(_write(tmp_path, {"eos_token_id": None})).eos_token_ids is None


def test_missing_file_gives_all_none(tmp_path):
    g = load_generation_config(tmp_path)
    assert g == GenerationDefaults()
    assert all(v is None for v in attrs.asdict(g).values())
    assert load_generation_config(tmp_path / "nope.json") == GenerationDefaults()
    assert g.sampling_defaults() == {}


def test_frozen(tmp_path):
    g = load_generation_config(_write(tmp_path, LLAMA31))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        g.temperature = 1.0  # type: ignore[misc]


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write(tmp_path, '{\n  "temperature": 0.7,\n  "top_p": ,\n}')
    with pytest.raises(ModelLoadError) as info:
        load_generation_config(tmp_path)
    msg = str(info.value)
    assert str(path) in msg and "line 3" in msg and "\n" not in msg


def test_wrong_types_are_model_load_errors(tmp_path):
    for bad in (
        {"eos_token_id": "2"},
        {"eos_token_id": [1, "x"]},
        {"eos_token_id": True},
        {"temperature": "hot"},
        {"top_k": 1.5},
        {"do_sample": "yes"},
        [1, 2],
    ):
        with pytest.raises(ModelLoadError) as info:
            load_generation_config(_write(tmp_path, bad))
        assert "generation_config.json" in str(info.value)


def test_do_sample_false_means_greedy_defaults(tmp_path):
    g = load_generation_config(
        _write(tmp_path, {"do_sample": False, "temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1})
    )
    assert g.temperature == 0.6  # the raw value is kept...
    assert g.sampling_defaults() == {"repetition_penalty": 1.1}  # ...but not applied


def test_merge_eos():
    assert merge_eos(None, None, None) == ()
    assert merge_eos(2, None, 2) == (2,)
    assert merge_eos([128001, 128009], (128001, 128008, 128009), 128009) == (128001, 128009, 128008)
    assert merge_eos(None, [151645, 151643], 151645) == (151645, 151643)
    assert merge_eos(1, [], [3, None]) == (1, 3)
    with pytest.raises(TypeError):
        merge_eos("2", None, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        merge_eos(True, None, None)  # type: ignore[arg-type]
