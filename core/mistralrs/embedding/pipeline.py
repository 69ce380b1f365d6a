"""The sentence-transformers module pipeline of an embedding model, read from its folder and
applied exactly: ``modules.json`` (Transformer → Pooling → Dense … → Normalize),
``sentence_bert_config.json`` (``max_seq_length``, ``do_lower_case``), ``1_Pooling/config.json``
(cls / mean / max / mean_sqrt_len_tokens / weightedmean / lasttoken, ``include_prompt``),
``N_Dense`` (a linear layer and its activation) and ``config_sentence_transformers.json``
(``prompts``, ``default_prompt_name``). A folder without them is a plain transformers model:
sentence-transformers then uses mean pooling, and so does this.

Pooling, Dense and Normalize run in fp32 whatever the model's dtype."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import attrs

from mistralrs.errors import ModelLoadError

log = logging.getLogger("mistralrs.embedding")

ST_CONFIG = "config_sentence_transformers.json"
MODULES = "modules.json"
SBERT_CONFIG = "sentence_bert_config.json"
# Files of a sentence-transformers folder the hub fetch brings besides the model's own.
ST_FILES = (ST_CONFIG, MODULES, SBERT_CONFIG, "README.md")

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Dense activations sentence-transformers restores from their torch class names.
_ACTIVATIONS = {
    "Identity": lambda x: x,
    "Tanh": lambda x: x.tanh(),
    "ReLU": lambda x: x.relu(),
    "Sigmoid": lambda x: x.sigmoid(),
    "SiLU": lambda x: x * x.sigmoid(),
    "GELU": lambda x: __import__("torch").nn.functional.gelu(x),
}


def is_sentence_transformers_folder(root: Path) -> bool:
    return (root / ST_CONFIG).is_file() or (root / MODULES).is_file()


def module_paths(root: Path) -> list[str]:
    """The sub-folders ``modules.json`` names (the hub fetch brings their files)."""
    return [m["path"] for m in _modules(root) if m.get("path")]


@attrs.frozen
class Dense:
    weight: Any  # torch.Tensor [out, in], fp32
    bias: Any
    activation: str

    def __call__(self, x: Any) -> Any:
        import torch.nn.functional as F

        return _ACTIVATIONS[self.activation](F.linear(x, self.weight, self.bias))


@attrs.define(kw_only=True)
class SentencePipeline:
    """What turns a model's hidden states into sentence embeddings."""

    max_seq_length: int
    do_lower_case: bool = False
    pooling: tuple[str, ...] = ("mean",)
    include_prompt: bool = True
    dense: list[Dense] = attrs.field(factory=list)
    normalize: bool = False
    prompts: dict[str, str] = attrs.field(factory=dict)
    default_prompt_name: str | None = None
    dimension: int = 0  # of the final embedding
    matryoshka: bool = False  # trained so that leading slices are embeddings too (`dimensions`)

    def pool(self, hidden: Any, lengths: list[int], skip: list[int]) -> Any:
        """hidden[T, H] (sequences back to back, `lengths` tokens each) -> embeddings[S, D] fp32.
        `skip[i]`: leading prompt tokens of sequence i left out of the pooling (include_prompt=False)."""
        import torch

        out = []
        start = 0
        for n, k in zip(lengths, skip):
            h = hidden[start:start + n].float()
            start += n
            used = h[min(k, n - 1):] if k else h  # sentence-transformers keeps at least one token
            parts = []
            for mode in self.pooling:
                if mode == "cls":
                    parts.append(used[0])
                elif mode == "lasttoken":
                    parts.append(used[-1])
                elif mode == "max":
                    parts.append(used.max(dim=0).values)
                elif mode == "mean":
                    parts.append(used.sum(dim=0) / used.shape[0])
                elif mode == "mean_sqrt_len_tokens":
                    parts.append(used.sum(dim=0) / (used.shape[0] ** 0.5))
                else:  # weightedmean: position i (from 1) weighs i
                    w = torch.arange(1, n + 1, dtype=torch.float32, device=h.device)[-used.shape[0]:, None]
                    parts.append((used * w).sum(dim=0) / w.sum())
            out.append(torch.cat(parts))
        x = torch.stack(out)
        for layer in self.dense:
            x = layer(x)
        if self.normalize:
            x = torch.nn.functional.normalize(x, p=2, dim=-1)
        return x


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}); fix or re-download it") from None


def _modules(root: Path) -> list[dict[str, Any]]:
    path = root / MODULES
    if not path.is_file():
        return []
    data = _read(path)
    if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("type"), str) for m in data):
        raise ModelLoadError(f"{path}: expected a list of modules with a \"type\"; fix or re-download it")
    return sorted(data, key=lambda m: int(m.get("idx", 0)))


def _pooling_modes(cfg: dict[str, Any], where: Path) -> tuple[str, ...]:
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = tuple(m for key, m in _LEGACY_POOLING.items() if cfg.get(key))
        modes = modes or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        raise ModelLoadError(f"{where}: pooling mode {bad[0]!r} is not one of {', '.join(POOLING_MODES)}")
    return modes


def _dense(folder: Path) -> Dense:
    import torch

    cfg = _read(folder / "config.json")
    act = str(cfg.get("activation_function") or "torch.nn.modules.activation.Tanh").rsplit(".", 1)[-1]
    if act not in _ACTIVATIONS:
        raise ModelLoadError(f"{folder}/config.json: Dense activation {cfg.get('activation_function')!r} is not "
                             f"supported (supported: {', '.join(_ACTIVATIONS)})")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ModelLoadError(f"{folder} has no model.safetensors for its Dense layer (pickled weights are never "
                             "loaded); convert the module to safetensors")
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    weight = tensors.get("linear.weight")
    if weight is None:
        raise ModelLoadError(f"{weights}: no linear.weight tensor; is it a sentence-transformers Dense module?")
    bias = tensors.get("linear.bias")
    shape = (int(cfg.get("out_features", weight.shape[0])), int(cfg.get("in_features", weight.shape[1])))
    if tuple(weight.shape) != shape:
        raise ModelLoadError(f"{weights}: linear.weight is {tuple(weight.shape)}, config.json says {shape}")
    return Dense(weight.to(torch.float32), None if bias is None else bias.to(torch.float32), act)


def _mentions_matryoshka(root: Path) -> bool:
    """Model cards of Matryoshka-trained models name the loss (MatryoshkaLoss) or the tag."""
    card = root / "README.md"
    try:
        text = card.read_text(encoding="utf-8", errors="replace")[:200_000] if card.is_file() else ""
    except OSError:
        return False
    return re.search(r"matryoshka", text, re.IGNORECASE) is not None


def load_pipeline(root: Path, config: dict[str, Any], *, hidden_size: int, matryoshka: bool = False) -> SentencePipeline:
    """The pipeline of the model folder `root` (config.json's dict in `config`). `matryoshka`: the
    architecture's models are Matryoshka-trained whatever their card says."""
    modules = _modules(root)
    sbert = _read(root / SBERT_CONFIG) if (root / SBERT_CONFIG).is_file() else {}
    st = _read(root / ST_CONFIG) if (root / ST_CONFIG).is_file() else {}
    max_len = sbert.get("max_seq_length")
    if not isinstance(max_len, int) or max_len <= 0:
        max_len = int(config.get("max_position_embeddings") or 512)
    pipe = SentencePipeline(max_seq_length=max_len, do_lower_case=bool(sbert.get("do_lower_case", False)),
                            dimension=hidden_size)
    if not modules:
        log.info("%s has no modules.json: mean pooling, as sentence-transformers uses for a plain model", root)
    pooled = False
    for m in modules:
        kind = m["type"].rsplit(".", 1)[-1]
        folder = root / m.get("path", "")
        if kind == "Transformer" or kind.endswith("Transformer"):
            continue
        if kind == "Pooling":
            cfg = _read(folder / "config.json") if (folder / "config.json").is_file() else {}
            pipe.pooling = _pooling_modes(cfg, folder / "config.json")
            pipe.include_prompt = bool(cfg.get("include_prompt", True))
            pipe.dimension = hidden_size * len(pipe.pooling)
            pooled = True
        elif kind == "Dense":
            layer = _dense(folder)
            if layer.weight.shape[1] != pipe.dimension:
                raise ModelLoadError(f"{folder}: the Dense layer takes {layer.weight.shape[1]} features but the "
                                     f"pipeline gives it {pipe.dimension}")
            pipe.dense.append(layer)
            pipe.dimension = int(layer.weight.shape[0])
        elif kind == "Normalize":
            pipe.normalize = True
        else:
            raise ModelLoadError(f"{root / MODULES}: module {m['type']!r} is not supported (supported: Transformer, "
                                 "Pooling, Dense, Normalize)")
    if modules and not pooled:
        raise ModelLoadError(f"{root / MODULES} has no Pooling module; an embedding model needs one")
    prompts = st.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ModelLoadError(f"{root / ST_CONFIG}: \"prompts\" must map names to strings")
    pipe.prompts = dict(prompts)
    default = st.get("default_prompt_name")
    if default is not None and default not in pipe.prompts:
        raise ModelLoadError(f"{root / ST_CONFIG}: default_prompt_name {default!r} is not one of the prompts")
    pipe.default_prompt_name = default
    pipe.matryoshka = matryoshka or _mentions_matryoshka(root)
    return pipe
