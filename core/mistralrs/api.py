"""The Python API, with the names and parameters of mistral.rs's Python package.

    from mistralrs import Runner, Which, ChatCompletionRequest
    runner = Runner(which=Which.Plain(model_id="Qwen/Qwen3-0.6B"))
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        model="default", messages=[{"role": "user", "content": "Hello!"}], max_tokens=64))
    print(res.choices[0].message.content)

Requests go through the same validation and engine as the HTTP server.
"""

from __future__ import annotations

import asyncio
import enum
import os
import uuid
from typing import Any, AsyncIterator, Iterator

import attrs

from mistralrs import protocol as P
from mistralrs.errors import ConfigError, NotFoundError
from mistralrs.mcp_config import McpClientConfig, McpServerConfig, McpServerSource

# mistral.rs's Python names for the MCP client config (`Runner(mcp_client_config=...)`).
McpClientConfigPy = McpClientConfig
McpServerConfigPy = McpServerConfig
McpServerSourcePy = McpServerSource


class ModelDType(enum.Enum):
    Auto = "auto"
    BF16 = "bf16"
    F16 = "f16"
    F32 = "f32"


class PagedCacheType(enum.Enum):
    Auto = 0
    F8E4M3 = 1


class Architecture(enum.Enum):
    Mistral = "mistral"
    Gemma = "gemma"
    Mixtral = "mixtral"
    Llama = "llama"
    Phi2 = "phi2"
    Phi3 = "phi3"
    Qwen2 = "qwen2"
    Gemma2 = "gemma2"
    Starcoder2 = "starcoder2"
    Qwen3 = "qwen3"
    GLM4 = "glm4"
    Qwen3Moe = "qwen3moe"
    SmolLm3 = "smollm3"


class EmbeddingArchitecture(enum.Enum):
    EmbeddingGemma = "embeddinggemma"
    Qwen3Embedding = "qwen3embedding"
    Bert = "bert"  # BERT-family sentence-transformers models (all-MiniLM, BGE, E5, GTE)
    Roberta = "roberta"  # RoBERTa / XLM-RoBERTa encoders (BGE-M3, multilingual E5)


class ToolChoice(enum.Enum):
    """`tool_choice` values (mistral.rs names `NoTools` and `Auto`, plus `Required`). A
    request may also pass the OpenAI strings or a named-function dict."""

    NoTools = "none"
    Auto = "auto"
    Required = "required"


def _enum_value(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


class Which:
    """Model selections (mistral.rs `Which` variants)."""

    @attrs.define(kw_only=True)
    class Plain:
        model_id: str
        arch: Architecture | str | None = None
        tokenizer_json: str | None = None
        dtype: ModelDType | str = ModelDType.Auto
        hf_cache_path: str | None = None
        revision: str | None = None
        topology: str | None = None
        organization: str | None = None  # ISQ organization: "default" | "moqe"
        from_uqff: Any = None
        write_uqff: str | None = None
        imatrix: str | None = None  # importance matrix for in_situ_quant (.imatrix / GGUF imatrix / .cimatrix)
        calibration_file: str | None = None  # a text run through the model at load to make the imatrix
        dummy_weights: bool = False

    @attrs.define(kw_only=True)
    class Embedding:
        """An embedding model (a sentence-transformers folder or repository, or a bare encoder):
        served through `Runner.send_embedding_request`. `arch` defaults to config.json's."""

        model_id: str
        arch: EmbeddingArchitecture | str | None = None
        tokenizer_json: str | None = None
        dtype: ModelDType | str = ModelDType.Auto
        hf_cache_path: str | None = None
        revision: str | None = None
        topology: str | None = None
        from_uqff: Any = None
        write_uqff: str | None = None
        imatrix: str | None = None
        calibration_file: str | None = None
        dummy_weights: bool = False
        organization: str | None = None

    @attrs.define(kw_only=True)
    class GGUF:
        """A GGUF model: `quantized_filename` (one name, a ;-separated string or a list) inside
        `quantized_model_id` (a Hub repo or directory; or a path to the .gguf itself); the
        tokenizer and chat template from `tok_model_id` when given, else the file's metadata."""

        quantized_model_id: str
        quantized_filename: str | list[str] | None = None
        tok_model_id: str | None = None
        tokenizer_json: str | None = None
        dtype: ModelDType | str = ModelDType.Auto
        topology: str | None = None
        hf_cache_path: str | None = None
        revision: str | None = None

    @attrs.define(kw_only=True)
    class GGML:
        """A legacy GGML (ggml/ggmf/ggjt) Llama file: `quantized_filename` inside `quantized_model_id`
        (a Hub repo or directory; or a path to the file itself). `gqa` is its grouped-query factor
        (n_head / n_kv_head: 8 for Llama 2 70B), which the file does not store. The tokenizer comes
        from `tok_model_id` when given (mistral.rs requires it), else from the file's vocabulary."""

        quantized_model_id: str
        quantized_filename: str | None = None
        tok_model_id: str | None = None
        tokenizer_json: str | None = None
        gqa: int = attrs.field(default=1)
        topology: str | None = None
        dtype: ModelDType | str = ModelDType.Auto
        hf_cache_path: str | None = None
        revision: str | None = None

        @gqa.validator
        def _check_gqa(self, _attribute: Any, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Which.GGML(gqa=...) must be a positive integer, not {value!r}")


def _source_options(which: Any) -> dict[str, Any]:
    """The ServiceOptions fields that say where a `Which` model comes from."""
    if isinstance(which, (Which.GGUF, Which.GGML)):
        if which.topology:
            raise ConfigError(f"Which.{type(which).__name__}(topology=...): topologies apply to safetensors models; "
                              "remove it")
        files = which.quantized_filename
        return dict(
            model_id=which.quantized_model_id, format="ggml" if isinstance(which, Which.GGML) else "gguf",
            tok_model_id=which.tok_model_id, gqa=getattr(which, "gqa", 1),
            quantized_files=tuple(files) if isinstance(files, (list, tuple)) else (files or ()),
        )
    return dict(
        model_id=which.model_id, arch=_enum_value(which.arch), dummy_weights=which.dummy_weights,
        isq_organization=which.organization, topology=which.topology,
        from_uqff=_uqff_files(which.from_uqff), write_uqff=str(which.write_uqff) if which.write_uqff else None,
        imatrix=which.imatrix, calibration_file=which.calibration_file,
    )


def _search_options(value: Any) -> Any:
    """WebSearchOptions as a dict: attrs/dataclass objects and plain dicts are both accepted."""
    if value is None or isinstance(value, dict):
        return value
    if attrs.has(type(value)):
        return attrs.asdict(value)
    return dict(vars(value))


def which_cache(which: Any) -> str | None:
    return getattr(which, "hf_cache_path", None)


def _uqff_files(value: Any) -> tuple[str, ...]:
    """`from_uqff`: one path, a ;-separated string, or a list of paths."""
    if not value:
        return ()
    if isinstance(value, (str, os.PathLike)):
        return (str(value),)
    return tuple(str(v) for v in value)


@attrs.define(kw_only=True)
class EmbeddingRequest:
    """mistral.rs's `EmbeddingRequest`: `input` is a string, a list of strings, a list of token ids
    or a list of such lists. Extensions: `dimensions` (Matryoshka models), `prompt_name` (one of
    the model's sentence-transformers prompts, e.g. "query")."""

    input: Any
    truncate_sequence: bool = False
    dimensions: int | None = None
    prompt_name: str | None = None

    def to_body(self) -> dict[str, Any]:
        body = {"input": self.input, "truncate_sequence": self.truncate_sequence}
        body.update({k: v for k, v in (("dimensions", self.dimensions), ("prompt_name", self.prompt_name))
                     if v is not None})
        return body


@attrs.define(kw_only=True)
class ChatCompletionRequest:
    messages: Any
    model: str = "default"
    logprobs: bool = False
    n_choices: int = 1
    logit_bias: dict[int, float] | None = None
    top_logprobs: int | None = None
    max_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop_seqs: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    min_p: float | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_sequence_breakers: list[str] | None = None
    enable_thinking: bool | None = None
    reasoning_effort: str | None = None
    truncate_sequence: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    tool_schemas: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    max_tool_rounds: int | None = None
    response_format: Any = None
    chat_template_kwargs: dict[str, Any] | None = None
    grammar: str | None = None
    grammar_type: str | None = None
    web_search_options: Any = None  # a dict (or {}) with enable_search=True: the web-search tools for this request

    def to_body(self) -> dict[str, Any]:
        import json

        body = {
            "web_search_options": _search_options(self.web_search_options),
            "messages": self.messages, "model": self.model, "logprobs": self.logprobs, "n": self.n_choices,
            "logit_bias": self.logit_bias, "top_logprobs": self.top_logprobs, "max_tokens": self.max_tokens,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty, "stop": self.stop_seqs, "temperature": self.temperature,
            "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p, "dry_multiplier": self.dry_multiplier,
            "dry_base": self.dry_base, "dry_allowed_length": self.dry_allowed_length,
            "dry_sequence_breakers": self.dry_sequence_breakers, "enable_thinking": self.enable_thinking,
            "reasoning_effort": self.reasoning_effort, "truncate_sequence": self.truncate_sequence,
            "ignore_eos": self.ignore_eos, "seed": self.seed,
        }
        tools = [json.loads(s) if isinstance(s, str) else s for s in self.tool_schemas or ()]
        tools += list(self.tools or ())
        if tools:
            body["tools"] = tools
        body["tool_choice"] = _enum_value(self.tool_choice)
        body["max_tool_rounds"] = self.max_tool_rounds
        body["response_format"] = self.response_format
        body["chat_template_kwargs"] = self.chat_template_kwargs
        body["grammar"] = _grammar_field(self.grammar, self.grammar_type)
        return {k: v for k, v in body.items() if v is not None}


@attrs.define(kw_only=True)
class CompletionRequest:
    prompt: Any
    model: str = "default"
    best_of: int | None = None
    echo_prompt: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = None
    n_choices: int = 1
    stop_seqs: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    suffix: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_sequence_breakers: list[str] | None = None
    truncate_sequence: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    stream: bool = False
    grammar: str | None = None
    grammar_type: str | None = None

    def to_body(self) -> dict[str, Any]:
        body = {
            "prompt": self.prompt, "model": self.model, "best_of": self.best_of, "echo": self.echo_prompt,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty, "logit_bias": self.logit_bias,
            "max_tokens": self.max_tokens, "n": self.n_choices, "stop": self.stop_seqs,
            "temperature": self.temperature, "top_p": self.top_p, "suffix": self.suffix, "top_k": self.top_k,
            "min_p": self.min_p, "dry_multiplier": self.dry_multiplier, "dry_base": self.dry_base,
            "dry_allowed_length": self.dry_allowed_length, "dry_sequence_breakers": self.dry_sequence_breakers,
            "truncate_sequence": self.truncate_sequence, "ignore_eos": self.ignore_eos, "seed": self.seed,
            "logprobs": self.logprobs, "top_logprobs": self.top_logprobs,
            "grammar": _grammar_field(self.grammar, self.grammar_type),
        }
        return {k: v for k, v in body.items() if v is not None}


def _grammar_field(grammar: Any, grammar_type: Any) -> dict[str, Any] | None:
    """The HTTP `grammar` field of the Python API's `grammar` / `grammar_type` pair
    (validated here so errors name `grammar_type`)."""
    from mistralrs.engine.grammar_specs import grammar_from_python

    spec = grammar_from_python(grammar, _enum_value(grammar_type))
    return None if spec is None else {"type": spec.kind, "value": spec.value}


class Runner:
    """Loads one model and serves requests to it (in-process)."""

    def __init__(
        self,
        which: Any,
        max_seqs: int = 16,
        no_kv_cache: bool = False,
        prefix_cache_n: int = 16,
        token_source: str = "cache",
        chat_template: str | None = None,
        jinja_explicit: str | None = None,
        in_situ_quant: str | None = None,
        pa_gpu_mem: int | None = None,
        pa_gpu_mem_usage: float | None = None,
        pa_ctxt_len: int | None = None,
        pa_blk_size: int | None = None,
        pa_cache_type: PagedCacheType | None = None,
        no_paged_attn: bool = False,
        paged_attn: bool = False,
        seed: int | None = None,
        max_num_batched_tokens: int = 4096,
        cpu: bool = False,
        attention_backend: str | None = None,
        tool_callbacks: dict[str, Any] | None = None,
        tool_parser: str | None = None,
        reasoning_parser: str | None = None,
        enable_tool_sources: bool | list[str] = False,
        max_tool_rounds: int = 8,
        enable_search: bool = False,
        search_embedding_model: str | None = None,
        search_callback: Any = None,
        search_backend: str | None = None,
        mcp_client_config: Any = None,
        num_device_layers: list[str] | str | None = None,
        max_batch_size: int = 1,
        tensor_parallel_size: int = 1,
        **unsupported: Any,
    ) -> None:
        from mistralrs.services import open_service
        from mistralrs.serving import ServiceOptions
        from mistralrs.tool_choice import ToolConfig

        if not isinstance(which, (Which.Plain, Which.GGUF, Which.GGML, Which.Embedding)):
            raise ConfigError(f"{type(which).__name__} models are not supported yet; use Which.Plain, Which.GGUF, "
                              "Which.GGML or Which.Embedding")
        given = {k for k, v in unsupported.items() if v not in (None, False)}
        if given:
            raise ConfigError(f"Runner options not supported yet: {', '.join(sorted(given))}")
        # mistral.rs priority: ctxt_len > gpu_mem_usage > gpu_mem.
        if pa_ctxt_len is not None:
            pa_gpu_mem_usage = pa_gpu_mem = None
        elif pa_gpu_mem_usage is not None:
            pa_gpu_mem = None
        source = _source_options(which)
        opts = ServiceOptions(
            **source,
            kind="embedding" if isinstance(which, Which.Embedding) else "auto",
            dtype=_enum_value(which.dtype),
            tokenizer_json=which.tokenizer_json,
            hf_cache=which.hf_cache_path,
            revision=which.revision,
            isq=None if in_situ_quant is None else str(_enum_value(in_situ_quant)),
            token_source=token_source,
            chat_template=chat_template,
            jinja_explicit=jinja_explicit,
            max_seqs=max_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            no_kv_cache=no_kv_cache,
            prefix_cache_n=prefix_cache_n,
            seed=seed,
            cpu=cpu,
            attention_backend=attention_backend,
            paged_attn="off" if no_paged_attn else ("on" if paged_attn else "auto"),
            pa_blk_size=pa_blk_size or 32,
            pa_context_len=pa_ctxt_len,
            pa_memory_mb=pa_gpu_mem,
            pa_memory_fraction=pa_gpu_mem_usage,
            pa_cache_type="f8e4m3" if pa_cache_type == PagedCacheType.F8E4M3 else "auto",
            # mistral.rs passes "0:16;1:16" as ["0:16", "1:16"]
            device_layers=";".join(num_device_layers) if isinstance(num_device_layers, (list, tuple))
            else num_device_layers,
            max_batch_size=max_batch_size,
            tensor_parallel_size=tensor_parallel_size,
        )
        from mistralrs.plugins import get_registry
        from mistralrs.tools import build_toolbox

        search = None
        if (search_embedding_model or search_callback is not None or search_backend) and not enable_search:
            raise ConfigError("search_embedding_model, search_callback and search_backend need enable_search=True")
        if enable_search:
            from mistralrs.web_search.search import CallbackBackend, WebSearch, backend_from_registry

            if search_callback is not None and not callable(search_callback):
                raise ConfigError("search_callback must be callable: fn(query) -> [{title, description, url, content}]")
            search = WebSearch(CallbackBackend(search_callback) if search_callback is not None
                               else backend_from_registry(get_registry(), search_backend))
        # MCP servers (McpClientConfig, a dict or a JSON path) join the enabled tool sources.
        toolbox = build_toolbox(get_registry(), enable_tool_sources, mcp_config=mcp_client_config)
        self.tools = ToolConfig(tool_parser=tool_parser, reasoning_parser=reasoning_parser,
                                callbacks=dict(tool_callbacks or {}), toolbox=toolbox, max_tool_rounds=max_tool_rounds,
                                search=search)
        try:
            self.service = open_service(opts)
            if search is not None and search_embedding_model:
                search.load_reranker(search_embedding_model, cpu=cpu, hf_cache=which_cache(which),
                                     token_source=token_source)
        except BaseException:
            self.tools.close()
            raise
        self.model_id = opts.model_id

    def _require(self, kind: str) -> None:
        served = getattr(self.service, "kind", "text")
        if served == kind:
            return
        from mistralrs.errors import InvalidRequest

        if served == "embedding":
            raise InvalidRequest(f"{self.model_id} is an embedding model: use send_embedding_request, not chat or "
                                 "completions", "model")
        raise InvalidRequest(f"{self.model_id} is a {served} model and cannot make embeddings; load an embedding "
                             "model (Which.Embedding) for send_embedding_request", "model")

    # -- embeddings ---------------------------------------------------------------------------
    def send_embedding_request(self, request: EmbeddingRequest, model_id: str | None = None) -> list[list[float]]:
        """One embedding per input, as lists of floats (batched with other requests in flight)."""
        from mistralrs.embedding.requests import parse_embedding_request

        self._check_model(model_id)
        self._require("embedding")
        job = parse_embedding_request(request.to_body())
        vectors, _ = self.service.embed(job)
        return [[float(x) for x in row] for row in vectors.tolist()]

    # -- chat ---------------------------------------------------------------------------------
    def _chat(self, request: ChatCompletionRequest, loop: asyncio.AbstractEventLoop | None = None) -> Any:
        from mistralrs.chat_plan import prepare_chat
        from mistralrs.tool_loop import ToolLoop

        self._require("text")
        plan = prepare_chat(self.service, request.to_body(), self.tools)
        handle = ToolLoop(plan, lambda gen: self.service.engine.submit(gen, loop=loop))
        stream = P.ChatStream(self.service.tokenizer, id=f"chatcmpl-{uuid.uuid4().hex}", model=self.model_id,
                              n=plan.request.n, logprobs=plan.request.logprobs, plan=plan)
        return plan, handle, stream

    def _chat_response(self, plan: Any, stream: P.ChatStream, done: Any, lps: Any) -> Any:
        return P.chat_response(self.service.tokenizer, done, id=stream.id, model=self.model_id,
                               logprobs=plan.request.logprobs, token_logprobs=lps, plan=plan, records=plan.records)

    def _check_model(self, model_id: str | None) -> None:
        """A Runner serves one model: naming another is an error, not silently ignored."""
        if model_id is not None and model_id not in (self.model_id, "default"):
            raise NotFoundError(f"this Runner serves {self.model_id!r}, not {model_id!r}; "
                                "make a Runner per model (or omit model_id)")

    def send_chat_completion_request(self, request: ChatCompletionRequest, model_id: str | None = None) -> Any:
        """A `ChatCompletionResponse`, or an iterator of `ChatCompletionChunkResponse` when stream=True.

        Tool calls come back in `message.tool_calls`; calls to `tool_callbacks` and to tool
        sources run here and generation goes on (`agentic_tool_calls` lists them)."""
        self._check_model(model_id)
        plan, handle, stream = self._chat(request)
        if request.stream:
            return self._stream(handle, stream)
        done, lps = P.collect(handle)
        return self._chat_response(plan, stream, done, lps)

    def send_completion_request(self, request: CompletionRequest, model_id: str | None = None) -> Any:
        self._check_model(model_id)
        self._require("text")
        body = request.to_body()
        gen = P.build_completion_request(self.service, body)
        handle = self.service.engine.submit(gen)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if request.stream:
            return self._stream(handle, P.ChatStream(self.service.tokenizer, id=rid, model=self.model_id,
                                                    n=gen.n, logprobs=gen.logprobs, completion=True))
        done, lps = P.collect(handle)
        echo = request.prompt if request.echo_prompt and isinstance(request.prompt, str) else ""
        return P.completion_response(self.service.tokenizer, done, id=rid, model=self.model_id,
                                     logprobs=gen.logprobs, token_logprobs=lps, echo_prefix=echo,
                                     suffix=request.suffix or "")

    @staticmethod
    def _stream(handle: Any, stream: P.ChatStream) -> Iterator[Any]:
        from mistralrs.engine.engine import RequestDone, RequestFailed

        try:
            for event in handle:
                if isinstance(event, RequestFailed):
                    raise event.error
                yield from stream.chunks_for(event)
                if isinstance(event, RequestDone):
                    yield stream.usage_chunk(event)
        finally:
            if not handle.done:
                handle.cancel()

    # -- asyncio variants (for servers and async apps) -------------------------------------------
    async def send_chat_completion_request_async(self, request: ChatCompletionRequest) -> Any:
        plan, handle, stream = self._chat(request, loop=asyncio.get_running_loop())
        if request.stream:
            return self._astream(handle, stream)
        done, lps = await _acollect(handle)
        return self._chat_response(plan, stream, done, lps)

    async def send_completion_request_async(self, request: CompletionRequest) -> Any:
        gen = P.build_completion_request(self.service, request.to_body())
        handle = self.service.engine.submit(gen, loop=asyncio.get_running_loop())
        done, lps = await _acollect(handle)
        return P.completion_response(self.service.tokenizer, done, id=f"cmpl-{uuid.uuid4().hex}",
                                     model=self.model_id, logprobs=gen.logprobs, token_logprobs=lps)

    @staticmethod
    async def _astream(handle: Any, stream: P.ChatStream) -> AsyncIterator[Any]:
        from mistralrs.engine.engine import RequestDone, RequestFailed

        async for event in handle:
            if isinstance(event, RequestFailed):
                raise event.error
            for chunk in stream.chunks_for(event):
                yield chunk
            if isinstance(event, RequestDone):
                yield stream.usage_chunk(event)

    # -- re-quantization --------------------------------------------------------------------------
    def send_re_isq(self, dtype: Any, model_id: str | None = None) -> dict[str, int]:
        """Re-quantize the model in place to `dtype` (an ISQ type name or bit count), between two
        engine steps: requests in flight continue with the new weights. Returns {type: layers}."""
        self._check_model(model_id)
        return self.service.re_isq(str(_enum_value(dtype)))

    # -- tokenizer and limits -------------------------------------------------------------------
    def tokenize_text(self, text: str, add_special_tokens: bool = True, enable_thinking: bool | None = None,
                      model_id: str | None = None) -> list[int]:
        self._check_model(model_id)
        return self.service.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize_text(self, tokens: list[int], skip_special_tokens: bool = True, model_id: str | None = None) -> str:
        self._check_model(model_id)
        return self.service.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def max_sequence_length(self, model_id: str | None = None) -> int:
        self._check_model(model_id)
        return self.service.max_model_len

    def list_models(self) -> list[str]:
        return [self.model_id]

    def get_default_model_id(self) -> str:
        return self.model_id

    def shutdown(self) -> None:
        self.service.shutdown()
        self.tools.close()  # MCP sessions and their child processes

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


_acollect = P.acollect
