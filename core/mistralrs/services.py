"""Which service a model gets: `embedding.service.EmbeddingService` for embedding models
(a sentence-transformers folder, an embedding-only architecture, or ``kind="embedding"``),
else `serving.ModelService`. Every frontend opens models through `open_service`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mistralrs.errors import ModelLoadError
from mistralrs.serving import ModelService, ServiceOptions


def _maybe_safetensors(opts: ServiceOptions) -> bool:
    """False for sources that are (or, with --quant, may be) GGUF, legacy GGML, UQFF or the demo model."""
    if opts.model_id == "demo" or opts.from_uqff or opts.quantized_files or opts.quant or opts.format in ("gguf", "ggml"):
        return False
    return not Path(opts.model_id).expanduser().is_file()


def open_service(opts: ServiceOptions, *, registry: Any = None) -> Any:
    """Load the model `opts` names into the service that serves its kind."""
    if opts.kind == "text" or (opts.kind == "auto" and not _maybe_safetensors(opts)):
        return ModelService(opts, registry=registry)
    from mistralrs.embedding.service import EmbeddingService, is_embedding_model
    from mistralrs.hub import fetch_model
    from mistralrs.loading import read_config
    from mistralrs.serving import resolve_model_files

    if registry is None:
        from mistralrs.plugins import get_registry

        registry = get_registry()
    if opts.kind == "embedding":
        return EmbeddingService(opts, registry=registry)
    try:
        files = resolve_model_files(opts, fetch_model)
    except ModelLoadError:
        return ModelService(opts, registry=registry)  # which reports the source's problem its own way
    config = read_config(files.config) if files.config is not None else {}
    if is_embedding_model(files.root, config, opts.arch, registry):
        return EmbeddingService(opts, registry=registry, files=files)
    return ModelService(opts, registry=registry)
