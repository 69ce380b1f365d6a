"""Model sources: Hugging Face Hub ids, local directories, tokens and the hub cache.

`fetch_model` turns the `-m/--model-id` value into a `ModelFiles` record of local paths:

- an existing local directory is used as is;
- otherwise the value must be a Hub repo id (`org/name`). Online, only the files mistralrs
  needs are downloaded (config, safetensors weights, tokenizer and template files); with
  `HF_HUB_OFFLINE` set, files are served from the hub-layout cache only, without any network.

Pickle weights (`.bin`, `.pt`, `.pth`) are never downloaded nor opened: a source with only
pickle weights is refused.

Importing this module is cheap: huggingface_hub is imported inside the functions that need
it, and torch is never imported.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import attrs

from mistralrs.errors import ModelLoadError

__all__ = [
    "ModelFiles",
    "fetch_model",
    "hf_home",
    "hub_cache_dir",
    "is_offline",
    "resolve_token",
]

log = logging.getLogger("mistralrs.hub")

CONFIG = "config.json"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ST_MODULES = "modules.json"  # a sentence-transformers model's module pipeline (docs/embeddings.md)

# Small files fetched whenever the repository has them (weights are chosen separately).
AUX_FILES: tuple[str, ...] = (
    CONFIG,
    WEIGHTS_INDEX,
    TOKENIZER,
    TOKENIZER_CONFIG,
    SPECIAL_TOKENS_MAP,
    GENERATION_CONFIG,
    CHAT_TEMPLATE_JINJA,
    CHAT_TEMPLATE_JSON,
    ST_MODULES,
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
)

PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Pickle files that are training state, not model weights.
_NON_WEIGHT_PICKLES = ("training_args", "optimizer", "scheduler", "rng_state")

TOKEN_SOURCES_HELP = "cache, literal:TOKEN, env:VAR, path:FILE or none"

_TRUTHY = {"1", "true", "yes", "on"}
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# Hugging Face repo naming rules: [A-Za-z0-9._-], no leading/trailing '.' or '-', no '--' or '..'.
_REPO_PART_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$")
_REPO_ID_MAX = 96


# ----------------------------------------------------------------------------- environment


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _env(name: str) -> str | None:
    """An environment variable, or None when unset or blank."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return value


def hf_home() -> Path:
    """`$HF_HOME`, default `~/.cache/huggingface` (read at call time)."""
    value = _env("HF_HOME")
    if value is not None:
        return Path(value).expanduser()
    return Path("~/.cache/huggingface").expanduser()


def hub_cache_dir(hf_cache: str | os.PathLike[str] | None = None) -> Path:
    """The hub cache directory: `--hf-cache` wins, then `HF_HUB_CACHE`, then `$HF_HOME/hub`,
    then `~/.cache/huggingface/hub`. The environment is read at call time."""
    if hf_cache is not None and str(hf_cache).strip():
        return Path(hf_cache).expanduser()
    value = _env("HF_HUB_CACHE")
    if value is not None:
        return Path(value).expanduser()
    return hf_home() / "hub"


def is_offline() -> bool:
    """True when `HF_HUB_OFFLINE` is 1/true/yes/on (case-insensitive)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


# ----------------------------------------------------------------------------- tokens


def resolve_token(source: str = "cache") -> str | None:
    """Resolve a Hugging Face token from a mistral.rs `--token-source`.

    - `cache` (default): `HF_TOKEN`, then `HF_HUB_TOKEN`, then the file `$HF_HOME/token`
      (as written by `mistralrs login`); None when none is set.
    - `literal:TOKEN`: TOKEN itself.
    - `env:VAR`: the value of environment variable VAR (error if unset or empty).
    - `path:FILE`: the contents of FILE, stripped (error if missing, unreadable or empty).
    - `none`: no token.
    """
    if not isinstance(source, str):
        raise ModelLoadError(f"invalid token source {source!r}; expected one of {TOKEN_SOURCES_HELP}")
    src = source.strip()
    if src == "none":
        return None
    if src == "cache":
        for name in ("HF_TOKEN", "HF_HUB_TOKEN"):
            value = _env(name)
            if value is not None:
                return value.strip()
        token_file = hf_home() / "token"
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as exc:
            raise ModelLoadError(
                f"cannot read the cached Hugging Face token {token_file}: "
                f"{_one_line(exc.strerror or exc)}; fix its permissions or use --token-source none"
            ) from exc
        return token or None
    kind, sep, arg = src.partition(":")
    if sep:
        if kind == "literal":
            token = arg.strip()
            if not token:
                raise ModelLoadError(
                    "token source 'literal:' has an empty token; use literal:TOKEN or --token-source none"
                )
            return token
        if kind == "env":
            var = arg.strip()
            if not var:
                raise ModelLoadError("token source 'env:' names no variable; use env:VAR, e.g. env:HF_TOKEN")
            value = os.environ.get(var)
            if value is None:
                raise ModelLoadError(
                    f"token source env:{var}: environment variable {var} is not set; "
                    "set it or choose another --token-source"
                )
            if not value.strip():
                raise ModelLoadError(
                    f"token source env:{var}: environment variable {var} is empty; "
                    "set it or choose another --token-source"
                )
            return value.strip()
        if kind == "path":
            if not arg.strip():
                raise ModelLoadError("token source 'path:' names no file; use path:FILE, e.g. path:~/.hf_token")
            path = Path(arg.strip()).expanduser()
            try:
                token = path.read_text(encoding="utf-8").strip()
            except FileNotFoundError as exc:
                raise ModelLoadError(f"token file {path} does not exist; fix the path:FILE token source") from exc
            except OSError as exc:
                raise ModelLoadError(
                    f"cannot read token file {path}: {_one_line(exc.strerror or exc)}; fix the path:FILE token source"
                ) from exc
            if not token:
                raise ModelLoadError(f"token file {path} is empty; write the token into it")
            return token
    raise ModelLoadError(f"invalid token source {source!r}; expected one of {TOKEN_SOURCES_HELP}")


def _hf_token_arg(token: str | None) -> str | bool:
    # False (not None) so huggingface_hub does not fall back to its own token lookup
    # when the user chose `--token-source none` or no token was found.
    return token if token else False


# ----------------------------------------------------------------------------- result


@attrs.frozen
class ModelFiles:
    """Local paths of a model's files. Optional files are None when absent.

    `revision` is the resolved commit hash for hub models (None for local directories)."""

    model_id: str
    root: Path
    config: Path | None = None
    weights: tuple[Path, ...] = ()
    weights_index: Path | None = None
    tokenizer: Path | None = None
    tokenizer_config: Path | None = None
    generation_config: Path | None = None
    chat_template: Path | None = None
    special_tokens_map: Path | None = None
    gguf: tuple[Path, ...] = ()
    revision: str | None = None
    is_local: bool = False


# ----------------------------------------------------------------------------- model ids


def _looks_like_path(model_id: str) -> bool:
    if model_id in (".", "..") or model_id.startswith(("/", "./", "../", "~")):
        return True
    if os.path.isabs(model_id):
        return True
    if os.altsep and model_id.startswith((f".{os.altsep}", f"..{os.altsep}")):
        return True
    if any(s in model_id for s in (os.sep, os.altsep) if s):
        # "exists partially": some leading part of the path is an existing local entry.
        parent = Path(model_id).parent
        while str(parent) not in ("", "."):
            if parent.exists():
                return True
            parent = parent.parent
    return False


def _validate_repo_id(model_id: str) -> tuple[str, str]:
    hint = (
        f"model {model_id!r} is neither an existing local directory nor a Hugging Face repo id; "
        "pass a directory path or an id of the form org/name (e.g. Qwen/Qwen3-4B)"
    )
    parts = model_id.split("/")
    if len(parts) != 2 or len(model_id) > _REPO_ID_MAX:
        raise ModelLoadError(hint)
    for part in parts:
        if not _REPO_PART_RE.match(part) or "--" in part or ".." in part:
            raise ModelLoadError(hint)
    return parts[0], parts[1]


def _repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


# ----------------------------------------------------------------------------- file selection


def _is_pickle_weight(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    # legacy GGML files are *.bin too (llama-2-7b.ggmlv3.q4_0.bin); their loader checks the magic
    return base.endswith(PICKLE_SUFFIXES) and not base.startswith(_NON_WEIGHT_PICKLES) and "ggml" not in base.lower()


def _default_shards(safetensors: Iterable[str]) -> list[str]:
    """Top-level safetensors to load when there is no index. Mistral's native
    `consolidated*.safetensors` duplicate the HF-format weights when both exist."""
    names = sorted(set(safetensors))
    hf = [n for n in names if not n.startswith("consolidated")]
    return hf or names


def _read_index(path: Path, where: str) -> list[str]:
    """The shard file names referenced by a `model.safetensors.index.json`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{WEIGHTS_INDEX} of {where} is not valid JSON ({_one_line(exc)}); re-download the model"
        ) from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelLoadError(f"{WEIGHTS_INDEX} of {where} has no valid 'weight_map'; re-download the model")
    return sorted(set(weight_map.values()))


def _pickle_error(where: str, pickles: Iterable[str]) -> ModelLoadError:
    example = sorted(pickles)[0]
    return ModelLoadError(
        f"{where} has only PyTorch pickle weights ({example}); mistralrs never loads pickle: "
        "use a revision or repository with .safetensors weights, or convert them with "
        "`safetensors.torch.save_file` (e.g. the Hugging Face 'convert to safetensors' space)"
    )


def _collect(
    root: Path,
    *,
    model_id: str,
    where: str,
    revision: str | None,
    is_local: bool,
    require_weights: bool,
    extra: Sequence[Path] = (),
) -> ModelFiles:
    """Build `ModelFiles` from the top-level files of `root`, validating them."""
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise ModelLoadError(f"cannot list model directory {root}: {_one_line(exc.strerror or exc)}") from exc
    # is_file() follows symlinks: a snapshot link whose blob is missing counts as absent.
    files = {p.name: p for p in entries if p.is_file()}

    def get(name: str) -> Path | None:
        return files.get(name)

    index = get(WEIGHTS_INDEX)
    if index is not None:
        weights = []
        for shard in _read_index(index, where):
            path = root / shard
            if not path.is_file():
                raise ModelLoadError(
                    f"shard {shard} referenced by {WEIGHTS_INDEX} is missing from {root}; re-download {model_id}"
                )
            weights.append(path)
        weights_t = tuple(sorted(weights))
    else:
        names = _default_shards(n for n in files if n.endswith(".safetensors"))
        weights_t = tuple(files[n] for n in names)

    gguf = {p for n, p in files.items() if n.endswith(".gguf")}
    gguf.update(p for p in extra if p.name.endswith(".gguf"))
    gguf_t = tuple(sorted(gguf))

    if require_weights and not weights_t and not gguf_t:
        pickles = [n for n in files if _is_pickle_weight(n)]
        if pickles:
            raise _pickle_error(where, pickles)
        raise ModelLoadError(
            f"{where} has no weights (*.safetensors or *.gguf) in {root}; "
            "check the model id/path or download the weights"
        )
    config = get(CONFIG)
    if weights_t and config is None:
        raise ModelLoadError(f"{where} has safetensors weights but no {CONFIG} in {root}; add the model's {CONFIG}")
    return ModelFiles(
        model_id=model_id,
        root=root,
        config=config,
        weights=weights_t,
        weights_index=index,
        tokenizer=get(TOKENIZER),
        tokenizer_config=get(TOKENIZER_CONFIG),
        generation_config=get(GENERATION_CONFIG),
        chat_template=get(CHAT_TEMPLATE_JINJA) or get(CHAT_TEMPLATE_JSON),
        special_tokens_map=get(SPECIAL_TOKENS_MAP),
        gguf=gguf_t,
        revision=revision,
        is_local=is_local,
    )


def _check_extra(root: Path, extra_files: Sequence[str], where: str, hint: str) -> list[Path]:
    from mistralrs.gguf.ggml_legacy import is_legacy_ggml

    paths = []
    for name in extra_files:
        path = root / name
        if _is_pickle_weight(name) and not is_legacy_ggml(path):
            raise ModelLoadError(f"{name} in {where} is a PyTorch pickle file; mistralrs never loads pickle")
        if not path.is_file():
            raise ModelLoadError(f"file {name} is not in {where} ({root}); {hint}")
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- fetch


def fetch_model(
    model_id: str,
    *,
    revision: str | None = None,
    token_source: str = "cache",
    hf_cache: str | os.PathLike[str] | None = None,
    require_weights: bool = True,
    progress: bool | None = None,
    extra_files: Sequence[str] = (),
) -> ModelFiles:
    """Resolve `model_id` (a local directory or a Hub repo id `org/name`) to local files.

    Online, downloads only what mistralrs needs into the hub cache (`hub_cache_dir(hf_cache)`);
    when `HF_HUB_OFFLINE` is set, resolves from that cache without any network access.
    `revision` is a branch, tag or commit hash (default `main`; ignored for local directories).
    `require_weights=False` allows sources without weights (e.g. a tokenizer/config source).
    `extra_files` names additional repository files to fetch (e.g. one `.gguf` file).
    `progress`: show download progress bars (None = when stderr is a terminal).
    Every failure raises `ModelLoadError`.
    """
    if not isinstance(model_id, str) or not model_id.strip():
        raise ModelLoadError("no model given; pass -m with a Hugging Face repo id or a local directory")
    model_id = model_id.strip()
    local = Path(model_id).expanduser()
    if local.is_dir():
        if revision:
            log.warning("ignoring revision %s: %s is a local directory", revision, model_id)
        root = local.resolve()
        extra = _check_extra(root, extra_files, f"model directory {model_id}", "check the file name")
        return _collect(
            root,
            model_id=model_id,
            where=f"model directory {model_id}",
            revision=None,
            is_local=True,
            require_weights=require_weights,
            extra=extra,
        )
    if local.exists():
        raise ModelLoadError(
            f"model path {model_id} is a file, not a directory; pass the directory that holds "
            "config.json and the weights (GGUF files go to -f/--quantized-file)"
        )
    if _looks_like_path(model_id):
        raise ModelLoadError(
            f"model path {model_id} does not exist; check the path or pass a Hugging Face repo id (org/name)"
        )
    _validate_repo_id(model_id)
    if revision is not None:
        revision = revision.strip() or None
        if revision is not None and (
            revision.startswith(("/", "\\")) or ".." in revision.replace("\\", "/").split("/")
        ):
            raise ModelLoadError(f"invalid revision {revision!r}; pass a branch, tag or commit hash")
    cache = hub_cache_dir(hf_cache)
    if is_offline():
        return _resolve_from_cache(model_id, revision, cache, require_weights, extra_files)
    token = resolve_token(token_source)
    show = _want_progress(progress)
    return _fetch_online(model_id, revision, cache, token, require_weights, extra_files, show)


# ----------------------------------------------------------------------------- offline


def _cached_commit(repo_dir: Path, revision: str) -> str | None:
    ref = repo_dir / "refs" / revision
    if ref.is_file():
        try:
            commit = ref.read_text(encoding="utf-8").strip()
        except OSError:
            return None
        return commit or None
    if _COMMIT_RE.match(revision) and (repo_dir / "snapshots" / revision).is_dir():
        return revision
    return None


def _resolve_from_cache(
    model_id: str,
    revision: str | None,
    cache: Path,
    require_weights: bool,
    extra_files: Sequence[str],
    *,
    reason: str = "HF_HUB_OFFLINE is set",
    fix: str = "unset HF_HUB_OFFLINE or download the model first",
) -> ModelFiles:
    rev = revision or "main"
    repo_dir = _repo_folder(cache, model_id)
    if not repo_dir.is_dir():
        raise ModelLoadError(f"model {model_id} is not in the Hugging Face cache at {cache} and {reason}; {fix}")
    commit = _cached_commit(repo_dir, rev)
    snapshot = repo_dir / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        raise ModelLoadError(
            f"revision {rev} of model {model_id} is not in the Hugging Face cache at {cache} and {reason}; {fix}"
        )
    where = f"cached model {model_id}@{rev}"
    extra = _check_extra(snapshot, extra_files, where, fix)
    return _collect(
        snapshot,
        model_id=model_id,
        where=where,
        revision=commit,
        is_local=False,
        require_weights=require_weights,
        extra=extra,
    )


# ----------------------------------------------------------------------------- online


def _want_progress(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Switch huggingface_hub's progress bars on/off for the duration, then restore."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is not None:
        yield  # the environment variable has priority in huggingface_hub
        return
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    if enabled == (not was_disabled):
        yield
        return
    (enable_progress_bars if enabled else disable_progress_bars)()
    try:
        yield
    finally:
        (disable_progress_bars if was_disabled else enable_progress_bars)()


def _is_connection_error(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError"}:
        return True
    if names & {"TransportError", "RequestError", "ConnectError", "ConnectTimeout", "Timeout"}:
        return True
    return isinstance(exc, (ConnectionError, TimeoutError))


def _hub_error(exc: BaseException, model_id: str, revision: str | None, filename: str | None = None) -> ModelLoadError:
    """One-line ModelLoadError for a huggingface_hub failure."""
    names = {c.__name__ for c in type(exc).__mro__}
    rev = revision or "main"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if "GatedRepoError" in names:
        msg = (
            f"repository {model_id} is gated; accept its terms on huggingface.co and pass a token "
            "with --token-source (or set HF_TOKEN / run `mistralrs login`)"
        )
    elif "RepositoryNotFoundError" in names:
        msg = f"repository {model_id} not found or private; check the id or pass a token with --token-source"
    elif "RevisionNotFoundError" in names:
        msg = f"revision {rev} not found in repository {model_id}; check --revision"
    elif "DisabledRepoError" in names:
        msg = f"repository {model_id} has been disabled on the Hugging Face Hub"
    elif "RemoteEntryNotFoundError" in names or (
        "EntryNotFoundError" in names and "LocalEntryNotFoundError" not in names
    ):
        msg = f"file {filename or '?'} not found in repository {model_id} at revision {rev}"
    elif status in (401, 403):
        msg = f"access to repository {model_id} denied (HTTP {status}); pass a valid token with --token-source"
    elif status == 429:
        msg = f"the Hugging Face Hub rate-limited requests for {model_id} (HTTP 429); retry later or pass a token"
    elif _is_connection_error(exc):
        what = f"download {filename} of {model_id}" if filename else f"reach the Hugging Face Hub for {model_id}"
        msg = (
            f"could not {what} and it is not cached ({type(exc).__name__}); "
            "check your connection, or set HF_HUB_OFFLINE=1 to use the local cache"
        )
    elif status is not None:
        msg = f"Hugging Face Hub request for {model_id} failed with HTTP {status}; retry later"
    else:
        msg = f"fetching {model_id} from the Hugging Face Hub failed: {type(exc).__name__}: {exc}"
    return ModelLoadError(_one_line(msg))


def _snapshot_commit(path: Path) -> str | None:
    """The commit of a `.../snapshots/<commit>/<file>` path returned by hf_hub_download."""
    parent = path.parent
    if parent.parent.name == "snapshots" and _COMMIT_RE.match(parent.name):
        return parent.name
    return None


def _st_module_files(modules_json: Path, available: set[str]) -> list[str]:
    """A sentence-transformers repository's module folders' configs and safetensors weights (the
    pooling, dense and normalize layers), and its model card (it says whether the model was
    Matryoshka-trained)."""
    try:
        modules = json.loads(modules_json.read_text(encoding="utf-8"))
        folders = {m["path"].strip("/") for m in modules if isinstance(m, dict) and m.get("path")}
    except (OSError, ValueError, TypeError, AttributeError):
        return []  # the embedding loader reports a broken modules.json with its path
    wanted = [f for f in sorted(available) if "/" in f and f.rsplit("/", 1)[0] in folders
              and f.endswith((".json", ".safetensors"))]
    return wanted + (["README.md"] if "README.md" in available else [])


def _fetch_online(
    model_id: str,
    revision: str | None,
    cache: Path,
    token: str | None,
    require_weights: bool,
    extra_files: Sequence[str],
    show_progress: bool,
) -> ModelFiles:
    import huggingface_hub as hf

    hf_token = _hf_token_arg(token)
    try:
        listing = list(hf.HfApi(token=hf_token).list_repo_files(model_id, revision=revision, token=hf_token))
    except Exception as exc:  # noqa: BLE001 - mapped to a one-line ModelLoadError
        if _is_connection_error(exc):
            # Like huggingface_hub itself: with the Hub unreachable, fall back to the cache.
            try:
                files = _resolve_from_cache(
                    model_id,
                    revision,
                    cache,
                    require_weights,
                    extra_files,
                    reason="the Hugging Face Hub is unreachable",
                    fix="check your connection",
                )
            except ModelLoadError:
                raise _hub_error(exc, model_id, revision) from exc
            log.warning("Hugging Face Hub unreachable; using cached %s from %s", model_id, files.root)
            return files
        raise _hub_error(exc, model_id, revision) from exc

    available = set(listing)
    top = {f for f in available if "/" not in f}
    where = f"repository {model_id}" + (f"@{revision}" if revision else "")
    safetensors = sorted(f for f in top if f.endswith(".safetensors"))
    ggufs = sorted(f for f in available if f.endswith(".gguf"))
    wanted_gguf = [f for f in extra_files if f.endswith(".gguf")]
    for name in extra_files:
        if _is_pickle_weight(name):
            raise ModelLoadError(f"{name} in {where} is a PyTorch pickle file; mistralrs never loads pickle")
        if name not in available:
            raise ModelLoadError(f"file {name} not found in {where}; check the file name")
    if require_weights and not safetensors and not ggufs:
        pickles = [f for f in available if _is_pickle_weight(f)]
        if pickles:
            raise _pickle_error(where, pickles)
        raise ModelLoadError(f"{where} has no weights (*.safetensors or *.gguf); check the model id and --revision")
    if safetensors and CONFIG not in top:
        raise ModelLoadError(f"{where} has safetensors weights but no {CONFIG}; it is not a loadable model")

    if require_weights and not safetensors and not wanted_gguf:
        shown = ", ".join(ggufs[:3]) + (", ..." if len(ggufs) > 3 else "")
        raise ModelLoadError(f"{where} has only GGUF weights ({shown}); choose one with -f/--quantized-file")

    aux = [f for f in AUX_FILES if f in top]
    if not aux and not safetensors and not extra_files:
        raise ModelLoadError(f"{where} has none of the files mistralrs needs ({CONFIG}, {TOKENIZER}, weights)")

    state: dict[str, str | None] = {"rev": revision, "root": None}

    def download(filename: str) -> Path:
        try:
            path = Path(
                hf.hf_hub_download(
                    model_id,
                    filename,
                    revision=state["rev"],
                    cache_dir=str(cache),
                    token=hf_token,
                )
            )
        except Exception as exc:  # noqa: BLE001
            raise _hub_error(exc, model_id, revision, filename) from exc
        commit = _snapshot_commit(path)
        if commit is not None and state["rev"] != commit:
            # Pin the rest of the download to the commit the first file came from: consistent
            # files, and cached files are then served without further requests.
            state["rev"] = commit
        if state["root"] is None:
            state["root"] = str(path.parents[filename.count("/")])
        return path

    with _progress_bars(show_progress):
        downloaded: list[Path] = [download(f) for f in aux]
        if ST_MODULES in top:
            st_paths = next(p for p in downloaded if p.name == ST_MODULES)
            downloaded.extend(download(f) for f in _st_module_files(st_paths, available))
        if WEIGHTS_INDEX in top:
            index_path = next(p for p in downloaded if p.name == WEIGHTS_INDEX)
            shards = _read_index(index_path, where)
            for shard in shards:
                if shard not in available:
                    raise ModelLoadError(
                        f"shard {shard} referenced by {WEIGHTS_INDEX} is missing from {where}; "
                        "the repository is incomplete, try another --revision"
                    )
        else:
            shards = _default_shards(safetensors)
        if shards:
            log.info("fetching %d weight file(s) of %s", len(shards), model_id)
        downloaded.extend(download(f) for f in shards)
        extra_paths = [download(f) for f in extra_files]

    root = Path(state["root"]) if state["root"] else _repo_folder(cache, model_id)
    commit = state["rev"] if state["rev"] and _COMMIT_RE.match(state["rev"]) else revision
    return _collect(
        root,
        model_id=model_id,
        where=where,
        revision=commit,
        is_local=False,
        require_weights=require_weights,
        extra=extra_paths,
    )


def repo_file_names(
    model_id: str,
    suffix: str,
    *,
    revision: str | None = None,
    token_source: str = "cache",
    hf_cache: str | os.PathLike[str] | None = None,
) -> list[str]:
    """The files ending in `suffix` (``.gguf``, ``.uqff``) of a local directory or a Hub repository
    (names relative to its root), without downloading them: the choice among them comes first."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        return sorted(str(p.relative_to(local)) for p in local.rglob("*" + suffix))
    _validate_repo_id(model_id)
    cache = hub_cache_dir(hf_cache)
    if is_offline():
        repo_dir = _repo_folder(cache, model_id)
        commit = _cached_commit(repo_dir, revision or "main") if repo_dir.is_dir() else None
        snapshot = repo_dir / "snapshots" / commit if commit else None
        if snapshot is None or not snapshot.is_dir():
            raise ModelLoadError(
                f"model {model_id} is not in the Hugging Face cache at {cache} and HF_HUB_OFFLINE is set; "
                "unset HF_HUB_OFFLINE or download the model first"
            )
        return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*" + suffix))
    import huggingface_hub as hf

    hf_token = _hf_token_arg(resolve_token(token_source))
    try:
        listing = hf.HfApi(token=hf_token).list_repo_files(model_id, revision=revision, token=hf_token)
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(exc, model_id, revision) from exc
    return sorted(f for f in listing if f.endswith(suffix))


def gguf_file_names(
    model_id: str,
    *,
    revision: str | None = None,
    token_source: str = "cache",
    hf_cache: str | os.PathLike[str] | None = None,
) -> list[str]:
    """The ``.gguf`` files of a local directory or a Hub repository (`repo_file_names`)."""
    return repo_file_names(model_id, ".gguf", revision=revision, token_source=token_source, hf_cache=hf_cache)
