"""`EmbeddingService`: one loaded embedding model ready to serve — weights (float or ``--isq``),
tokenizer, the sentence-transformers pipeline and the embedding engine. The HTTP server, the
Python API and the CLI use it as they use `serving.ModelService` for chat models."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from mistralrs.embedding.pipeline import is_sentence_transformers_folder, load_pipeline
from mistralrs.embedding.requests import EmbeddingJob
from mistralrs.errors import ConfigError, InvalidRequest, ModelLoadError
from mistralrs.serving import ServiceOptions, isq_plan, load_quantized, pick_device, resolve_model_files, tokenizer_of

log = logging.getLogger("mistralrs.embedding")


def is_embedding_model(root: Path, config: dict[str, Any], arch: str | None, registry: Any) -> bool:
    """mistral.rs's rule (a sentence-transformers folder is an embedding model), and also a
    config that only an embedding architecture serves (a plain BertModel) or `--arch` naming one."""
    from mistralrs.loading import select_architecture

    if is_sentence_transformers_folder(root):
        return True
    try:
        spec = select_architecture(config, arch, registry)
    except ModelLoadError:
        return False
    return spec.kind_of_model == "embedding"


class EmbeddingService:
    kind = "embedding"

    def __init__(self, opts: ServiceOptions, *, registry: Any = None, files: Any = None) -> None:
        from mistralrs.hub import fetch_model
        from mistralrs.loading import build_attention_backend

        if registry is None:
            from mistralrs.plugins import get_registry

            registry = get_registry()
        if opts.from_uqff or opts.quantized_files or opts.format in ("gguf", "ggml") or opts.write_uqff:
            raise ConfigError("embedding models load from safetensors (optionally with --isq); GGUF and UQFF "
                              "embedding models are not supported")
        self.opts = opts
        self.registry = registry
        self.model_id = opts.model_id
        device = pick_device(registry, cpu=opts.cpu, device=opts.device)
        self.device = device
        if opts.quant and not opts.isq:
            opts.isq = opts.quant
        self.files = files if files is not None else resolve_model_files(opts, fetch_model)
        plan = isq_plan(opts, device, registry)
        self.loaded = load_quantized(self.files, opts, plan, device, registry,
                                     tokenizer=lambda: tokenizer_of(opts, self.files.root), kind="embedding")
        if plan is not None:
            plan.log_summary()
        self.tokenizer = tokenizer_of(opts, self.files.root)
        config = self.loaded.config
        model = self.loaded.model
        self.pipeline = load_pipeline(self.files.root, config, hidden_size=int(config["hidden_size"]),
                                      matryoshka=bool(getattr(model, "matryoshka", False)))
        self.max_model_len = self.pipeline.max_seq_length
        self._truncating = self._truncating_backend(self.pipeline.max_seq_length)
        self.backend = build_attention_backend(self.loaded, name="sdpa", num_blocks=0, device=device,
                                               registry=registry)
        from mistralrs.embedding.engine import EmbeddingEngine

        self.engine = EmbeddingEngine(model, self.backend, self.pipeline, device=device,
                                      max_batch_tokens=max(opts.max_num_batched_tokens, self.max_model_len))
        try:
            self.engine.embed([[0]])
        except Exception as exc:
            self.engine.shutdown()
            raise ModelLoadError(f"{opts.model_id}: a one-token test forward failed ({type(exc).__name__}: {exc}); "
                                 "the model or its plugin is broken") from exc
        log.info("loaded embedding model %s (%s, %s on %s): %d dimensions, pooling %s%s, max_seq_length %d",
                 opts.model_id, self.loaded.arch.name, str(self.loaded.dtype).removeprefix("torch."), device,
                 self.pipeline.dimension, "+".join(self.pipeline.pooling),
                 ", normalized" if self.pipeline.normalize else "", self.max_model_len)

    def _truncating_backend(self, max_len: int) -> Any:
        """A copy of the tokenizer that truncates as sentence-transformers asks transformers to:
        at max_seq_length tokens including the special ones, keeping the start; no padding."""
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_str(self.tokenizer.backend.to_str())
        backend.no_padding()
        backend.enable_truncation(max_length=max_len)
        return backend

    # -- requests ---------------------------------------------------------------------------
    def prompt_for(self, prompt_name: str | None) -> str:
        name = prompt_name or self.pipeline.default_prompt_name
        if name is None:
            return ""
        if name not in self.pipeline.prompts:
            known = ", ".join(repr(p) for p in self.pipeline.prompts) or "none"
            raise InvalidRequest(f"prompt_name {name!r} is not one of this model's prompts ({known})", "prompt_name")
        return self.pipeline.prompts[name]

    def _prompt_length(self, prompt: str) -> int:
        """Leading tokens of the prompt left out of the pooling (sentence-transformers' rule: the
        tokenized prompt's length, less a trailing special token)."""
        ids = self._truncating.encode(prompt, add_special_tokens=True).ids
        return len(ids) - (1 if ids and ids[-1] in self.tokenizer.special_ids else 0)

    def encode_texts(self, texts: Sequence[str], prompt_name: str | None = None) -> tuple[list[list[int]], list[int]]:
        prompt = self.prompt_for(prompt_name)
        inputs = [prompt + t for t in texts]
        if self.pipeline.do_lower_case:
            inputs = [t.lower() for t in inputs]
        seqs = [list(e.ids) for e in self._truncating.encode_batch(inputs, add_special_tokens=True)]
        skip = 0 if self.pipeline.include_prompt or not prompt else self._prompt_length(
            prompt.lower() if self.pipeline.do_lower_case else prompt)
        return seqs, [skip] * len(seqs)

    def check_ids(self, token_ids: Sequence[Sequence[int]], truncate: bool) -> list[list[int]]:
        vocab = self.tokenizer.vocab_size
        emb_rows = int(self.loaded.config.get("vocab_size") or vocab)
        limit = min(vocab, emb_rows) if vocab else emb_rows
        out = []
        for seq in token_ids:
            bad = next((t for t in seq if t >= limit), None)
            if bad is not None:
                raise InvalidRequest(f"token id {bad} is out of range for this model's vocabulary of {limit}", "input")
            if len(seq) > self.max_model_len:
                if not truncate:
                    raise InvalidRequest(
                        f"an input of {len(seq)} tokens is longer than this model's max_seq_length of "
                        f"{self.max_model_len}; shorten it or set truncate_sequence", "input")
                seq = seq[:self.max_model_len]
            out.append(list(seq))
        return out

    def check_dimensions(self, dimensions: int | None) -> None:
        full = self.pipeline.dimension
        if dimensions is None or dimensions == full:
            return
        if dimensions > full:
            raise InvalidRequest(f"dimensions {dimensions} is more than this model's {full}", "dimensions")
        if not self.pipeline.matryoshka:
            raise InvalidRequest(f"{self.model_id} was not trained with Matryoshka truncation, so its embeddings "
                                 f"cannot be shortened; omit dimensions (it gives {full})", "dimensions")

    def start(self, job: EmbeddingJob) -> tuple[Any, int]:
        """Validate and submit a job: (future of the [n, d] float32 embeddings, prompt tokens)."""
        self.check_dimensions(job.dimensions)
        if job.texts is not None:
            seqs, skip = self.encode_texts(job.texts, job.prompt_name)
        else:
            if job.prompt_name is not None:
                raise InvalidRequest("prompt_name applies to text input, not token ids", "prompt_name")
            seqs, skip = self.check_ids(job.token_ids or (), job.truncate_sequence), None
        future = self.engine.submit(seqs, skip)
        return future, sum(len(s) for s in seqs)

    def finish(self, job: EmbeddingJob, vectors: Any) -> Any:
        """The engine's embeddings with `dimensions` applied (re-normalized if the model normalizes)."""
        if job.dimensions is None or job.dimensions >= vectors.shape[-1]:
            return vectors
        import torch

        cut = vectors[:, :job.dimensions]
        return torch.nn.functional.normalize(cut, p=2, dim=-1) if self.pipeline.normalize else cut

    def embed(self, job: EmbeddingJob) -> tuple[Any, int]:
        """Blocking: (embeddings [n, d] float32, prompt tokens)."""
        future, tokens = self.start(job)
        return self.finish(job, future.result()), tokens

    def shutdown(self) -> None:
        self.engine.shutdown()
