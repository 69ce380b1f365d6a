"""Which GGUF file(s) a command means: ``-m``, ``-f``, ``--quant`` and ``--tok-model-id``.

- ``-m model.gguf`` (a file path): that file (split parts are found from the first); a file
  of another name with ``--format gguf``/``ggml``, or one that starts with a legacy GGML magic.
- ``-m REPO_OR_DIR -f NAME[;NAME2...]``: names inside the repository / directory (a path that
  exists as given is taken as it is).
- ``-m REPO_OR_DIR --quant LEVEL``: one file of many, chosen by mistral.rs's preference order
  (``4``/``q4`` -> Q4_K_M, Q4_K_S, Q4_K_L, Q4_1, Q4_0, Q4_K; ``8``/``q8`` -> Q8_0, Q8_K; ``q4k`` ->
  Q4_K_M, Q4_K_S, Q4_K_L, Q4_K; or an exact label such as ``Q5_K_M``). IQ types and ``auto`` are
  refused, as mistral.rs does.
- ``-m REPO_OR_DIR`` holding exactly one GGUF model: that one.
- ``--tok-model-id ID``: the tokenizer, its config and the chat template come from that HF
  repository / directory instead of the GGUF metadata.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from mistralrs.errors import ConfigError, ModelLoadError

_LABEL_RE = re.compile(r"(?i)(?:^|[-_.])((?:I?Q\d(?:_[A-Z0-9]+)*)|BF16|F16|F32)(?=[-_.]|$)")
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


@attrs.frozen
class GgufSource:
    """The GGUF file(s) of a model and where its tokenizer comes from."""

    paths: tuple[Path, ...]
    root: Path  # the directory the files are in (generation_config.json etc. may sit there)
    tok_root: Path | None = None  # --tok-model-id: tokenizer.json, tokenizer_config.json, templates


def quant_label(filename: str) -> str | None:
    """The quantization label of a GGUF file name, normalized (``model-Q4_K_M.gguf`` -> ``Q4KM``)."""
    name = Path(filename).name
    name = _SPLIT_RE.sub(".gguf", name)
    found = _LABEL_RE.findall(name.removesuffix(".gguf"))
    return found[-1].upper().replace("_", "") if found else None


def preference(level: str) -> list[str]:
    """The normalized labels `--quant LEVEL` accepts, most preferred first."""
    key = level.strip().upper().replace("_", "").replace("-", "")
    if key in ("", "AUTO"):
        raise ConfigError("--quant auto is not available for GGUF models; name a level (e.g. 4, q8, Q4_K_M)")
    if key.startswith("IQ"):
        raise ConfigError(f"--quant {level}: IQ quantizations are not selectable with --quant; pass the file with -f")
    m = re.fullmatch(r"Q?(\d)", key)
    if m:
        n = m.group(1)
        if n == "8":
            return ["Q80", "Q8K"]
        return [f"Q{n}KM", f"Q{n}KS", f"Q{n}KL", f"Q{n}1", f"Q{n}0", f"Q{n}K"]
    m = re.fullmatch(r"Q(\d)K", key)
    if m:
        n = m.group(1)
        return [f"Q{n}KM", f"Q{n}KS", f"Q{n}KL", f"Q{n}K"]
    return [key]


def choose_by_quant(names: Sequence[str], level: str, where: str) -> str:
    """The file `--quant LEVEL` picks among `names` (first parts of split files only)."""
    candidates = [n for n in names if not _SPLIT_RE.search(n) or _SPLIT_RE.search(n).group(1) == "00001"]  # type: ignore[union-attr]
    labels = {n: quant_label(n) for n in candidates}
    for wanted in preference(level):
        for name in candidates:
            if labels[name] == wanted:
                return name
    have = ", ".join(sorted({lab for lab in labels.values() if lab})) or "none recognisable"
    raise ModelLoadError(f"--quant {level}: no GGUF file of that level in {where} (levels there: {have}); "
                         "pick another level or name the file with -f")


def _split_parts(name: str, names: Sequence[str]) -> list[str]:
    m = _SPLIT_RE.search(name)
    if not m:
        return [name]
    stem = name[:m.start()]
    count = int(m.group(2))
    return [f"{stem}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def resolve_gguf_source(opts: Any, fetch: Callable[..., Any], list_ggufs: Callable[..., list[str]]) -> GgufSource | None:
    """The GGUF files `opts` name (None when this is not a GGUF load). `fetch` is
    `hub.fetch_model`, `list_ggufs` `hub.gguf_file_names`."""
    model_id = opts.model_id
    files = [f.strip() for f in opts.quantized_files if f.strip()]
    fmt = opts.format
    tok_root = None
    if opts.tok_model_id:
        tok_root = fetch(opts.tok_model_id, revision=opts.revision, token_source=opts.token_source,
                         hf_cache=opts.hf_cache, require_weights=False).root
    as_file = Path(model_id).expanduser()
    if as_file.is_file():
        from mistralrs.gguf.ggml_legacy import is_legacy_ggml
        from mistralrs.gguf.reader import is_gguf

        # the format is the file's magic, whatever its name (a .gguf suffix alone proves nothing)
        if as_file.suffix.lower() != ".gguf" and fmt not in ("gguf", "ggml") and not (
                is_gguf(as_file) or is_legacy_ggml(as_file)):
            raise ModelLoadError(f"model path {model_id} is a file but neither GGUF nor GGML; pass a model "
                                 "directory (config.json and safetensors weights) or a .gguf file")
        return GgufSource(paths=(as_file.resolve(),), root=as_file.resolve().parent, tok_root=tok_root)
    if fmt == "plain" or (not files and fmt is None and not opts.quant):
        return None
    kw = dict(revision=opts.revision, token_source=opts.token_source, hf_cache=opts.hf_cache)
    if not files and fmt == "ggml":
        raise ModelLoadError(f"--format ggml: name the legacy GGML file in {model_id} with -f, or pass its path to -m")
    if not files:
        names = list_ggufs(model_id, **kw)
        if not names:
            if opts.quant and fmt is None:
                return None  # --quant on a safetensors model: the ISQ fallback
            raise ModelLoadError(f"{model_id} has no .gguf file; pass one with -f/--quantized-file")
        firsts = [n for n in names if not _SPLIT_RE.search(n) or n.endswith("-00001-of-" + n[-10:-5] + ".gguf")]
        if opts.quant:
            files = [choose_by_quant(names, opts.quant, model_id)]
        elif len(firsts) == 1:
            files = firsts
        else:
            shown = ", ".join(firsts[:4]) + (", ..." if len(firsts) > 4 else "")
            raise ModelLoadError(f"{model_id} holds several GGUF models ({shown}); choose one with -f or --quant")
    local: list[Path] = []
    wanted: list[str] = []
    for name in files:
        p = Path(name).expanduser()
        if p.is_absolute() or (p.is_file() and not Path(model_id).is_dir()):
            if not p.is_file():
                raise ModelLoadError(f"GGUF file {name} not found; check the path given to -f/--quantized-file")
            local.append(p.resolve())
        else:
            wanted.extend(_split_parts(name, ()))
    root = local[0].parent if local else None
    if wanted:
        model_files = fetch(model_id, extra_files=wanted, require_weights=False, **kw)
        by_name = {p.name: p for p in model_files.gguf}
        root = model_files.root
        for name in wanted:
            path = root / name
            if not path.is_file():
                path = by_name.get(Path(name).name, path)
            if not path.is_file():
                raise ModelLoadError(f"GGUF file {name} is not in {model_id}; check the name given to -f")
            if _SPLIT_RE.search(name) and not name.endswith(f"-00001-of-{_SPLIT_RE.search(name).group(2)}.gguf"):  # type: ignore[union-attr]
                continue  # later parts are found from the first
            local.append(path)
    assert root is not None
    return GgufSource(paths=tuple(local), root=root, tok_root=tok_root)
