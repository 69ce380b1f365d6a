"""An OpenAI embeddings request, validated (`parse_embedding_request`), and its response
(`embedding_response`): shared by the HTTP server and the Python API.

``input``: a string, a list of strings, a list of token ids or a list of such lists.
``encoding_format``: ``float`` (default) or ``base64`` (little-endian float32 bytes, as OpenAI).
``dimensions``: the leading slice of each embedding, for Matryoshka-trained models only.
Extensions: ``truncate_sequence`` (token-id inputs longer than the model's ``max_seq_length``
are cut to it, keeping the start, instead of refused; text is always truncated that way, as
sentence-transformers does) and ``prompt_name`` (one of the model's prompts)."""

from __future__ import annotations

import base64
from typing import Any, Mapping

import attrs

from mistralrs.errors import InvalidRequest


@attrs.frozen(kw_only=True)
class EmbeddingJob:
    texts: tuple[str, ...] | None = None  # text inputs, or
    token_ids: tuple[tuple[int, ...], ...] | None = None  # token-id inputs
    encoding_format: str = "float"
    dimensions: int | None = None
    truncate_sequence: bool = False
    prompt_name: str | None = None

    @property
    def count(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids or ())


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_embedding_request(body: Mapping[str, Any]) -> EmbeddingJob:
    """A validated job, or InvalidRequest naming the field."""
    if "input" not in body or body["input"] is None:
        raise InvalidRequest("input is required: a string, a list of strings or token ids", "input")
    value = body["input"]
    texts: tuple[str, ...] | None = None
    ids: tuple[tuple[int, ...], ...] | None = None
    if isinstance(value, str):
        texts = (value,)
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        texts = tuple(value)
    elif isinstance(value, list) and value and all(_is_int(v) for v in value):
        ids = (tuple(value),)
    elif isinstance(value, list) and value and all(isinstance(v, list) and all(_is_int(t) for t in v) for v in value):
        ids = tuple(tuple(v) for v in value)
    else:
        raise InvalidRequest("input must be a non-empty string, list of strings, list of token ids or list of "
                             "token-id lists", "input")
    if texts is not None and any(not t for t in texts):
        raise InvalidRequest("input must not contain empty strings", "input")
    if ids is not None and any(not s for s in ids):
        raise InvalidRequest("input must not contain empty token-id lists", "input")
    if ids is not None and any(t < 0 for s in ids for t in s):
        raise InvalidRequest("input token ids must be non-negative", "input")
    fmt = body.get("encoding_format", "float")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise InvalidRequest(f"encoding_format must be \"float\" or \"base64\", not {fmt!r}", "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (not _is_int(dims) or dims < 1):
        raise InvalidRequest(f"dimensions must be a positive integer, not {dims!r}", "dimensions")
    truncate = body.get("truncate_sequence", False)
    if not isinstance(truncate, bool):
        raise InvalidRequest("truncate_sequence must be true or false", "truncate_sequence")
    prompt = body.get("prompt_name")
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidRequest("prompt_name must be a string", "prompt_name")
    return EmbeddingJob(texts=texts, token_ids=ids, encoding_format=fmt, dimensions=dims,
                        truncate_sequence=truncate, prompt_name=prompt)


def encode_vector(vector: Any, encoding_format: str) -> list[float] | str:
    """One embedding as the response carries it."""
    import numpy as np

    values = vector.float().numpy()
    if encoding_format == "base64":
        return base64.b64encode(values.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in np.asarray(values, dtype=np.float32)]


def embedding_response(job: EmbeddingJob, vectors: Any, prompt_tokens: int, model: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"object": "embedding", "embedding": encode_vector(v, job.encoding_format), "index": i}
                 for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
