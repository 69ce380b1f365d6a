"""The from-config TOML: parsing, defaults, and errors that name the file and the key."""

from __future__ import annotations

import pytest

from mistralrs.config import load_config, service_options
from mistralrs.errors import ConfigError


def write(tmp_path, text: str):
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_full_config_maps_to_service_options(tmp_path):
    cfg = load_config(write(tmp_path, """
command = "serve"
default_model_id = "b"
[global]
seed = 7
log = "req.jsonl"
[server]
port = 8080
host = "127.0.0.1"
[runtime]
max_seqs = 8
prefix_cache_n = 0
[paged_attn]
context_len = 2048
block_size = 16
[[models]]
model_id = "a"
dtype = "f32"
[models.device]
cpu = true
max_seq_len = 1024
[[models]]
model_id = "b"
kind = "text"
[models.format]
format = "plain"
"""))
    assert cfg.server.port == 8080 and cfg.default_model_id == "b" and [m.model_id for m in cfg.models] == ["a", "b"]
    opts = service_options(cfg, cfg.models[0])
    assert (opts.model_id, opts.dtype, opts.cpu, opts.max_seq_len) == ("a", "f32", True, 1024)
    assert (opts.max_seqs, opts.prefix_cache_n, opts.pa_context_len, opts.pa_blk_size) == (8, 0, 2048, 16)
    assert (opts.seed, opts.log_file) == (7, "req.jsonl")


def test_defaults_follow_mistralrs(tmp_path):
    cfg = load_config(write(tmp_path, '[[models]]\nmodel_id = "m"\n'))
    assert cfg.command == "serve" and cfg.server.port == 1234 and cfg.server.host == "0.0.0.0"
    assert cfg.runtime.max_seqs == 32 and cfg.runtime.prefix_cache_n == 16 and cfg.paged_attn.block_size == 32


@pytest.mark.parametrize("text,needle", [
    ('[[models]]\nmodel_id = "m"\nbogus = 1\n', "[[models]] #1: unknown key(s) bogus"),
    ('[runtime]\nmax_seqs = "x"\n[[models]]\nmodel_id = "m"\n', "[runtime] max_seqs: expected an integer"),
    ('[[models]]\nmodel_id = "m"\ndtype = 3\n', "[[models]] #1 dtype: expected a string"),
    ('[[models]]\nkind = "text"\n', "[[models]] #1 model_id: required key missing"),
    ('[global]\nseed = "s"\n[[models]]\nmodel_id = "m"\n', "[global] seed: expected an integer"),
    ('command = "serve"\n', "add at least one [[models]]"),
    ('default_model_id = "x"\n[[models]]\nmodel_id = "m"\n', "default_model_id 'x' is not one of"),
    ('[paged_attn]\ncontext_len = 1\nmemory_mb = 2\n[[models]]\nmodel_id = "m"\n', "mutually exclusive"),
    ('[[models]]\nmodel_id = "m"\nkind = "vision"\n', "needs a plugin that is not installed"),
    ('[[models]]\nmodel_id = "m"\n[models.format]\nmmproj = "x.gguf"\n', "format.mmproj is not supported yet"),
    ('[[models]]\nmodel_id = "m"\n[models.quantization]\nisq_organization = "x"\n', "isq_organization must be default or moqe"),
    ('command = "run"\n[[models]]\nmodel_id = "a"\n[[models]]\nmodel_id = "b"\n', "exactly one"),
    ('[[models]]\nmodel_id = "a"\n[[models]]\nmodel_id = "a"\n', "appears more than once"),
    ("not toml = = 1", "invalid TOML"),
])
def test_errors_name_the_file_and_the_key(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(path) in str(exc.value) and needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
