"""Tests for mistralrs.hub: token sources, cache location, offline/online model resolution.

No network: the hub is a hub-layout cache built in tmp_path, and online mode uses a
monkeypatched huggingface_hub.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

try:
    import mistralrs  # noqa: F401
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "core"))

from mistralrs import hub
from mistralrs.errors import ModelLoadError
from mistralrs.hub import ModelFiles, fetch_model, hub_cache_dir, is_offline, resolve_token

COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT2 = "fedcba9876543210fedcba9876543210fedcba98"
REPO = "acme/tiny-model"

HF_ENV = (
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_TOKEN",
    "HF_HUB_TOKEN",
    "HF_HUB_OFFLINE",
    "HF_HUB_DISABLE_PROGRESS_BARS",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in HF_ENV:
        monkeypatch.delenv(name, raising=False)
    # Never fall back to the real ~/.cache/huggingface of whoever runs the tests.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


# ----------------------------------------------------------------------------- builders


def _tensor_file(path: Path, name: str = "w") -> None:
    save_file({name: np.arange(4, dtype=np.float32).reshape(2, 2)}, str(path))


def _model_files(dir_: Path, *, sharded: bool = False, missing_shard: bool = False) -> None:
    """Write a tiny model into dir_ (config, tokenizer, templates, safetensors weights)."""
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (dir_ / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {}}))
    (dir_ / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    (dir_ / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    (dir_ / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    (dir_ / "chat_template.jinja").write_text("{{ messages }}")
    (dir_ / "chat_template.json").write_text(json.dumps({"chat_template": "x"}))
    if sharded:
        shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        index = {"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1], "c": shards[1]}}
        (dir_ / "model.safetensors.index.json").write_text(json.dumps(index))
        for i, shard in enumerate(shards):
            if missing_shard and i == 1:
                continue
            _tensor_file(dir_ / shard, name="ab"[i])
    else:
        _tensor_file(dir_ / "model.safetensors")


def make_hub_cache(
    cache: Path,
    repo: str = REPO,
    *,
    commit: str = COMMIT,
    refs: tuple[str, ...] = ("main",),
    symlinks: bool = True,
    **kw,
) -> Path:
    """Build `<cache>/models--org--name` like huggingface_hub does; returns the snapshot dir.

    With symlinks=True, files live in blobs/ and the snapshot holds relative symlinks."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    staging = repo_dir / "staging"
    _model_files(staging, **kw)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for f in sorted(staging.iterdir()):
        if symlinks:
            blob = repo_dir / "blobs" / f"{commit[:8]}{abs(hash(f.name)):x}"
            f.rename(blob)
            (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
        else:
            f.rename(snapshot / f.name)
    staging.rmdir()
    for ref in refs:
        ref_file = repo_dir / "refs" / ref
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path) -> Path:
    cache = tmp_path / "hfcache"
    make_hub_cache(cache)
    return cache


# ----------------------------------------------------------------------------- tokens


def test_token_cache_precedence(monkeypatch, tmp_path):
    home = tmp_path / "hfhome"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    assert resolve_token() is None
    (home / "token").write_text("  file-token\n")
    assert resolve_token("cache") == "file-token"
    monkeypatch.setenv("HF_HUB_TOKEN", "hub-token")
    assert resolve_token("cache") == "hub-token"
    monkeypatch.setenv("HF_TOKEN", "main-token")
    assert resolve_token() == "main-token"
    monkeypatch.setenv("HF_TOKEN", "")  # blank counts as unset
    assert resolve_token() == "hub-token"


def test_token_cache_default_home(monkeypatch, tmp_path):
    home = tmp_path / "home" / ".cache" / "huggingface"
    home.mkdir(parents=True)
    (home / "token").write_text("default-home-token")
    assert resolve_token() == "default-home-token"


def test_token_literal_env_path_none(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "ignored")
    assert resolve_token("literal:abc123") == "abc123"
    monkeypatch.setenv("MY_TOK", " from-env ")
    assert resolve_token("env:MY_TOK") == "from-env"
    tok = tmp_path / "tok.txt"
    tok.write_text("from-file\n")
    assert resolve_token(f"path:{tok}") == "from-file"
    assert resolve_token("none") is None


@pytest.mark.parametrize(
    "source, fragment",
    [
        ("env:NOPE_NOT_SET", "NOPE_NOT_SET is not set"),
        ("path:/definitely/not/here", "/definitely/not/here does not exist"),
        ("literal:", "empty token"),
        ("env:", "names no variable"),
        ("bogus", "literal:TOKEN"),
        ("Cache", "expected one of"),
        ("file:/x", "expected one of"),
    ],
)
def test_token_errors(source, fragment):
    with pytest.raises(ModelLoadError) as info:
        resolve_token(source)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_token_invalid_names_accepted_forms():
    with pytest.raises(ModelLoadError, match=r"cache, literal:TOKEN, env:VAR, path:FILE or none"):
        resolve_token("whatever")


def test_token_empty_file(tmp_path):
    tok = tmp_path / "empty"
    tok.write_text("  \n")
    with pytest.raises(ModelLoadError, match="is empty"):
        resolve_token(f"path:{tok}")


# ----------------------------------------------------------------------------- env helpers


def test_hub_cache_dir_precedence(monkeypatch, tmp_path):
    assert hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hub_cache_dir() == tmp_path / "hfhome" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    assert hub_cache_dir() == tmp_path / "hubcache"
    assert hub_cache_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert hub_cache_dir("~/c") == tmp_path / "home" / "c"


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "On"])
def test_is_offline_true(monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert is_offline()


@pytest.mark.parametrize("value", ["0", "false", "", "no", "off", "2"])
def test_is_offline_false(monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert not is_offline()


def test_is_offline_unset():
    assert not is_offline()


def test_import_is_cheap():
    import subprocess

    code = (
        "import sys; import mistralrs.hub; "
        "bad = [m for m in ('torch', 'huggingface_hub') if m in sys.modules]; "
        "assert not bad, bad"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(hub.__file__).resolve().parents[1]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ----------------------------------------------------------------------------- offline


def _assert_full(files: ModelFiles, snapshot: Path) -> None:
    assert files.root == snapshot
    assert files.config == snapshot / "config.json"
    assert files.weights == (snapshot / "model.safetensors",)
    assert files.weights_index is None
    assert files.tokenizer == snapshot / "tokenizer.json"
    assert files.tokenizer_config == snapshot / "tokenizer_config.json"
    assert files.generation_config == snapshot / "generation_config.json"
    assert files.special_tokens_map == snapshot / "special_tokens_map.json"
    assert files.chat_template == snapshot / "chat_template.jinja"
    assert files.gguf == ()
    assert files.is_local is False
    assert files.revision == COMMIT
    assert files.model_id == REPO
    # the files are readable through the snapshot symlinks
    assert json.loads(files.config.read_text())["architectures"] == ["LlamaForCausalLM"]


def _no_network(monkeypatch):
    """Make any huggingface_hub network entry point fail loudly."""
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("network access attempted in offline mode")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", boom)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", boom)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", boom)


def test_offline_via_hf_cache_arg(monkeypatch, hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_network(monkeypatch)
    files = fetch_model(REPO, hf_cache=str(hub_cache))
    _assert_full(files, hub_cache / f"models--acme--tiny-model/snapshots/{COMMIT}")


def test_offline_via_hf_hub_cache(monkeypatch, hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    _no_network(monkeypatch)
    files = fetch_model(REPO)
    _assert_full(files, hub_cache / f"models--acme--tiny-model/snapshots/{COMMIT}")


def test_offline_via_hf_home(monkeypatch, tmp_path):
    home = tmp_path / "hfhome"
    snapshot = make_hub_cache(home / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    files = fetch_model(REPO)
    _assert_full(files, snapshot)


def test_offline_plain_files_without_symlinks(monkeypatch, tmp_path):
    cache = tmp_path / "plain"
    snapshot = make_hub_cache(cache, symlinks=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _assert_full(fetch_model(REPO, hf_cache=cache), snapshot)


def test_offline_revision_branch_and_commit(monkeypatch, hub_cache):
    dev = make_hub_cache(hub_cache, commit=COMMIT2, refs=("dev",), sharded=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_branch = fetch_model(REPO, revision="dev", hf_cache=hub_cache)
    assert by_branch.root == dev
    assert by_branch.revision == COMMIT2
    assert by_branch.weights_index == dev / "model.safetensors.index.json"
    assert [p.name for p in by_branch.weights] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    by_commit = fetch_model(REPO, revision=COMMIT2, hf_cache=hub_cache)
    assert by_commit.root == dev
    assert by_commit.revision == COMMIT2
    # main is still the other commit
    assert fetch_model(REPO, hf_cache=hub_cache).revision == COMMIT


def test_offline_unknown_revision(monkeypatch, hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="revision v9 of model acme/tiny-model is not in"):
        fetch_model(REPO, revision="v9", hf_cache=hub_cache)


def test_offline_miss_message(monkeypatch, tmp_path):
    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_network(monkeypatch)
    with pytest.raises(ModelLoadError) as info:
        fetch_model("acme/other", hf_cache=cache)
    message = str(info.value)
    assert "acme/other" in message
    assert f"not in the Hugging Face cache at {cache}" in message
    assert "HF_HUB_OFFLINE" in message
    assert "download the model first" in message
    assert "\n" not in message


def test_offline_broken_symlink_counts_as_missing(monkeypatch, hub_cache):
    snapshot = hub_cache / f"models--acme--tiny-model/snapshots/{COMMIT}"
    blob = (snapshot / "model.safetensors").resolve()
    blob.unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no weights"):
        fetch_model(REPO, hf_cache=hub_cache)
    files = fetch_model(REPO, hf_cache=hub_cache, require_weights=False)
    assert files.weights == ()
    assert files.tokenizer == snapshot / "tokenizer.json"


def test_offline_sharded_missing_shard(monkeypatch, tmp_path):
    cache = tmp_path / "c"
    make_hub_cache(cache, sharded=True, missing_shard=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        fetch_model(REPO, hf_cache=cache)


# ----------------------------------------------------------------------------- local dirs


def test_local_directory(tmp_path):
    model = tmp_path / "my-model"
    _model_files(model)
    (model / "chat_template.jinja").unlink()
    (model / "extra.gguf").write_bytes(b"GGUF")
    files = fetch_model(str(model), revision="ignored")
    assert files.is_local is True
    assert files.root == model
    assert files.revision is None
    assert files.weights == (model / "model.safetensors",)
    assert files.chat_template == model / "chat_template.json"
    assert files.gguf == (model / "extra.gguf",)


def test_local_relative_directory(tmp_path):
    _model_files(tmp_path / "models" / "m")
    files = fetch_model("./models/m")
    assert files.root == (tmp_path / "models" / "m").resolve()
    # a relative path without ./ that exists is local too (checked before hub ids)
    assert fetch_model("models/m").is_local


def test_local_sharded(tmp_path):
    model = tmp_path / "sharded"
    _model_files(model, sharded=True)
    files = fetch_model(str(model))
    assert files.weights_index == model / "model.safetensors.index.json"
    assert len(files.weights) == 2
    assert list(files.weights) == sorted(files.weights)


def test_local_sharded_missing_shard(tmp_path):
    model = tmp_path / "sharded"
    _model_files(model, sharded=True, missing_shard=True)
    with pytest.raises(ModelLoadError) as info:
        fetch_model(str(model))
    assert "model-00002-of-00002.safetensors" in str(info.value)
    assert str(model) in str(info.value)


def test_local_bad_index_json(tmp_path):
    model = tmp_path / "bad"
    _model_files(model, sharded=True)
    (model / "model.safetensors.index.json").write_text("{nope")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        fetch_model(str(model))


def test_local_missing_config(tmp_path):
    model = tmp_path / "noconfig"
    _model_files(model)
    (model / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no config\.json in .*noconfig"):
        fetch_model(str(model))


def test_local_no_weights(tmp_path):
    model = tmp_path / "tok-only"
    model.mkdir()
    (model / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no weights"):
        fetch_model(str(model))
    files = fetch_model(str(model), require_weights=False)
    assert files.weights == () and files.config is None
    assert files.tokenizer == model / "tokenizer.json"


def test_consolidated_ignored_when_hf_weights_exist(tmp_path):
    model = tmp_path / "mistral"
    _model_files(model)
    _tensor_file(model / "consolidated.safetensors")
    assert [p.name for p in fetch_model(str(model)).weights] == ["model.safetensors"]


@pytest.mark.parametrize("weight", ["pytorch_model.bin", "model.pt", "consolidated.00.pth"])
def test_pickle_only_directory_refused(tmp_path, weight):
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / weight).write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(ModelLoadError) as info:
        fetch_model(str(model))
    message = str(info.value)
    assert "only PyTorch pickle weights" in message
    assert "never loads pickle" in message
    assert weight in message
    assert "\n" not in message


def test_pickle_with_safetensors_is_fine(tmp_path):
    model = tmp_path / "both"
    _model_files(model)
    (model / "pytorch_model.bin").write_bytes(b"x")
    assert fetch_model(str(model)).weights == (model / "model.safetensors",)


@pytest.mark.parametrize("path", ["/no/such/dir", "./missing", "../missing", "~/missing-model"])
def test_nonexistent_path(path):
    with pytest.raises(ModelLoadError, match=r"model path .* does not exist"):
        fetch_model(path)


def test_path_with_existing_parent_is_a_path(tmp_path):
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelLoadError, match="model path models/gone does not exist"):
        fetch_model("models/gone")


def test_file_is_not_a_model_dir(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="is a file, not a directory"):
        fetch_model(str(tmp_path / "x.gguf"))


@pytest.mark.parametrize(
    "bad", ["justaname", "a/b/c", "org/", "org/na me", "org/-bad", "org/x--y", "org/a..b", "-org/x"]
)
def test_malformed_repo_id(monkeypatch, bad):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        fetch_model(bad)
    assert "org/name" in str(info.value)


def test_empty_model_id():
    with pytest.raises(ModelLoadError, match="no model given"):
        fetch_model("  ")


# ----------------------------------------------------------------------------- online (mocked)


class FakeHub:
    """Stands in for huggingface_hub's list_repo_files / hf_hub_download."""

    def __init__(self, files: dict[str, bytes], commit: str = COMMIT):
        self.files = files
        self.commit = commit
        self.downloads: list[tuple[str, str | None]] = []
        self.list_calls: list[dict] = []
        self.tokens: set = set()

    def install(self, monkeypatch):
        import huggingface_hub

        hub_self = self

        def list_repo_files(api, repo_id, *, revision=None, repo_type=None, token=None):
            hub_self.list_calls.append({"repo_id": repo_id, "revision": revision, "token": token})
            return sorted(hub_self.files)

        def hf_hub_download(repo_id, filename, *, revision=None, cache_dir=None, token=None, **kw):
            assert not filename.endswith((".bin", ".pt", ".pth")), f"asked for pickle {filename}"
            hub_self.downloads.append((filename, revision))
            hub_self.tokens.add(token)
            repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
            if revision is not None and revision != hub_self.commit:
                (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
                (repo_dir / "refs" / revision).write_text(hub_self.commit)
            elif revision is None:
                (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
                (repo_dir / "refs" / "main").write_text(hub_self.commit)
            target = repo_dir / "snapshots" / hub_self.commit / filename
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(hub_self.files[filename])
            return str(target)

        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
        return self


def _repo_contents(tmp_path: Path, *, sharded: bool = True) -> dict[str, bytes]:
    src = tmp_path / "src"
    _model_files(src, sharded=sharded)
    contents = {p.name: p.read_bytes() for p in src.iterdir()}
    contents.update(
        {
            "pytorch_model.bin": b"pickle",
            "pytorch_model.bin.index.json": b"{}",
            "consolidated.safetensors": contents.get("model-00001-of-00002.safetensors", b""),
            "original/consolidated.00.pth": b"pickle",
            "README.md": b"# readme",
            ".gitattributes": b"",
            "model-q4.gguf": b"GGUF",
            "merges.txt": b"",
        }
    )
    return contents


def test_online_downloads_only_needed_files(monkeypatch, tmp_path):
    fake = FakeHub(_repo_contents(tmp_path)).install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "secret")
    cache = tmp_path / "cache"
    files = fetch_model(REPO, hf_cache=str(cache), progress=False)
    names = [name for name, _ in fake.downloads]
    assert sorted(names) == sorted(
        [
            "config.json",
            "model.safetensors.index.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
            "chat_template.jinja",
            "chat_template.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ]
    )
    assert not any(n.endswith((".bin", ".pth", ".gguf", ".md")) or n.startswith("consolidated") for n in names)
    # first request follows the branch, the rest is pinned to the resolved commit
    assert fake.downloads[0] == ("config.json", None)
    assert all(rev == COMMIT for _, rev in fake.downloads[1:])
    assert fake.tokens == {"secret"}
    snapshot = cache / f"models--acme--tiny-model/snapshots/{COMMIT}"
    assert files.root == snapshot
    assert files.revision == COMMIT
    assert files.is_local is False
    assert [p.name for p in files.weights] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    # what was downloaded is then usable offline from the same cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch_model(REPO, hf_cache=str(cache)) == files


def test_online_revision_and_no_token(monkeypatch, tmp_path):
    fake = FakeHub(_repo_contents(tmp_path, sharded=False)).install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "secret")
    cache = tmp_path / "cache"
    files = fetch_model(REPO, revision="v1.0", token_source="none", hf_cache=cache, progress=False)
    assert fake.list_calls[0]["revision"] == "v1.0"
    assert fake.downloads[0][1] == "v1.0"
    assert fake.tokens == {False}  # never huggingface_hub's own token lookup
    assert [p.name for p in files.weights] == ["model.safetensors"]
    assert "consolidated.safetensors" not in [n for n, _ in fake.downloads]
    assert (cache / "models--acme--tiny-model/refs/v1.0").read_text() == COMMIT


def test_online_pickle_only_repo_refused(monkeypatch, tmp_path):
    fake = FakeHub({"config.json": b"{}", "pytorch_model.bin": b"x", "tokenizer.json": b"{}"}).install(monkeypatch)
    with pytest.raises(ModelLoadError, match="only PyTorch pickle weights"):
        fetch_model(REPO, hf_cache=tmp_path / "c", progress=False)
    assert fake.downloads == []


def test_online_pickle_repo_ok_without_weights(monkeypatch, tmp_path):
    fake = FakeHub({"config.json": b"{}", "pytorch_model.bin": b"x", "tokenizer.json": b"{}"}).install(monkeypatch)
    files = fetch_model(REPO, hf_cache=tmp_path / "c", progress=False, require_weights=False)
    assert sorted(n for n, _ in fake.downloads) == ["config.json", "tokenizer.json"]
    assert files.weights == () and files.tokenizer is not None


def test_online_index_missing_shard(monkeypatch, tmp_path):
    contents = _repo_contents(tmp_path)
    del contents["model-00002-of-00002.safetensors"]
    fake = FakeHub(contents).install(monkeypatch)
    with pytest.raises(ModelLoadError, match="shard model-00002-of-00002.safetensors"):
        fetch_model(REPO, hf_cache=tmp_path / "c", progress=False)
    assert not any(n.endswith(".safetensors") for n, _ in fake.downloads)


def test_online_gguf_only_repo(monkeypatch, tmp_path):
    fake = FakeHub({"a.Q4_K_M.gguf": b"GGUF", "a.Q8_0.gguf": b"GGUF", "README.md": b""}).install(monkeypatch)
    with pytest.raises(ModelLoadError, match="only GGUF weights .*-f/--quantized-file"):
        fetch_model(REPO, hf_cache=tmp_path / "c", progress=False)
    files = fetch_model(REPO, hf_cache=tmp_path / "c", progress=False, extra_files=["a.Q8_0.gguf"])
    assert [p.name for p in files.gguf] == ["a.Q8_0.gguf"]
    assert [n for n, _ in fake.downloads] == ["a.Q8_0.gguf"]


def _http_error(cls_name: str, status: int):
    import httpx2
    import huggingface_hub.errors as errors

    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/x"))
    return getattr(errors, cls_name)(f"{status} Client Error", response=response)


@pytest.mark.parametrize(
    "exc_factory, fragment",
    [
        (
            lambda: _http_error("RepositoryNotFoundError", 404),
            "not found or private; check the id or pass a token with --token-source",
        ),
        (lambda: _http_error("GatedRepoError", 403), "is gated"),
        (lambda: _http_error("RevisionNotFoundError", 404), "revision main not found"),
        (lambda: _http_error("HfHubHTTPError", 401), "denied (HTTP 401)"),
        (lambda: _http_error("HfHubHTTPError", 500), "failed with HTTP 500"),
        (lambda: ConnectionError("no route to host"), "set HF_HUB_OFFLINE=1"),
    ],
)
def test_online_errors_are_one_line(monkeypatch, tmp_path, exc_factory, fragment):
    import huggingface_hub

    def list_repo_files(*a, **k):
        raise exc_factory()

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    with pytest.raises(ModelLoadError) as info:
        fetch_model(REPO, hf_cache=tmp_path / "empty", progress=False)
    message = str(info.value)
    assert fragment in message
    assert REPO in message
    assert "\n" not in message


def test_online_connection_error_falls_back_to_cache(monkeypatch, hub_cache):
    import huggingface_hub

    def list_repo_files(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    files = fetch_model(REPO, hf_cache=hub_cache, progress=False)
    assert files.revision == COMMIT


def test_online_download_error_names_file(monkeypatch, tmp_path):
    import huggingface_hub

    FakeHub({"config.json": b"{}", "model.safetensors": b""}).install(monkeypatch)

    def hf_hub_download(repo_id, filename, **kw):
        raise _http_error("RemoteEntryNotFoundError", 404)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    with pytest.raises(ModelLoadError, match="file config.json not found in repository acme/tiny-model"):
        fetch_model(REPO, hf_cache=tmp_path / "c", progress=False)


def test_progress_bars_toggled_and_restored(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    enable_progress_bars()
    FakeHub({"config.json": b"{}", "model.safetensors": b""}).install(monkeypatch)
    real = huggingface_hub.hf_hub_download
    seen = []

    def spy(*a, **k):
        seen.append(are_progress_bars_disabled())
        return real(*a, **k)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    fetch_model(REPO, hf_cache=tmp_path / "c", progress=False)
    assert seen and all(seen)
    assert not are_progress_bars_disabled()  # restored
    seen.clear()
    fetch_model(REPO, hf_cache=tmp_path / "c", progress=True)
    assert seen and not any(seen)


@pytest.mark.parametrize("revision", ["../../etc", "/abs", "a/../../b"])
def test_invalid_revision(monkeypatch, hub_cache, revision):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="invalid revision"):
        fetch_model(REPO, revision=revision, hf_cache=hub_cache)


def test_offline_pr_revision(monkeypatch, hub_cache):
    snapshot = make_hub_cache(hub_cache, commit=COMMIT2, refs=("refs/pr/3",))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch_model(REPO, revision="refs/pr/3", hf_cache=hub_cache).root == snapshot
