"""The OpenAI server's route handlers (except the Responses API, in `responses.py`): liveness
and readiness, models, metrics, tokenize/detokenize, the OpenAPI document, and the chat and
text completions endpoints."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from mistralrs import protocol as P
from mistralrs_plugins.frontends.openai_server.common import ApiError, dumps, flag, read_json, stream_settings
from mistralrs_plugins.frontends.openai_server.generation import (
    build_request,
    check_best_of,
    collect_events,
    stream_events,
)
from mistralrs_plugins.frontends.openai_server.state import ARRIVAL, STATE, ServerState


async def alive(request: web.Request) -> web.Response:
    return web.Response(text="OK")


async def health(request: web.Request) -> web.Response:
    """Readiness (llama.cpp's convention): 503 `model_loading` until every model is loaded."""
    state: ServerState = request.app[STATE]
    for name in state.model_ids:
        state.require_service({"model": name}, kind=None)  # the 503 while loading, failed or draining
    return web.Response(text="OK")


def _model_card(state: ServerState, model_id: str) -> dict[str, Any]:
    name = state.resolve_name({"model": model_id})
    svc = state.services.get(name)
    return {
        "id": model_id, "object": "model", "created": state.created, "owned_by": "local",
        "root": name, "status": "loaded" if svc is not None else "failed" if state.load_error else "loading",
        "max_model_len": getattr(svc, "max_model_len", None),
        **state.tools.status(),  # tools_available (+ mcp_tools_count, mcp_servers_connected with MCP)
    }


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.check_not_draining()  # answers while models load (each card's `status`)
    data = [_model_card(state, "default")] + [_model_card(state, m) for m in state.model_ids]
    return web.json_response({"object": "list", "data": data}, dumps=dumps)


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.check_not_draining()  # answers while models load (each card's `status`)
    model = request.match_info["model"]
    state.resolve_name({"model": model})
    return web.json_response(_model_card(state, model), dumps=dumps)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.enable_metrics:
        raise ApiError(503, "metrics are disabled (--disable-metrics)", code="metrics_disabled")
    return web.Response(text=state.metrics.render(), content_type="text/plain",
                        headers={"X-Content-Type-Options": "nosniff"}, charset="utf-8")


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json(request)
    service = state.require_service(body, kind="text" if body.get("messages") is not None else None)
    tok = service.tokenizer
    special = body.get("add_special_tokens")
    if special is not None and not isinstance(special, bool):
        raise ApiError(400, "add_special_tokens must be true or false", param="add_special_tokens")
    if body.get("messages") is not None:
        messages = P.normalize_messages(body["messages"])
        text = service.render_chat(messages, add_generation_prompt=flag(body, "add_generation_prompt", True))
        ids = tok.encode(text, add_special_tokens=bool(special))
    else:
        key = "prompt" if "prompt" in body else "content"
        prompt = body.get(key)
        if not isinstance(prompt, str):
            raise ApiError(400, "send `prompt` (a string) or `messages`", param="prompt")
        ids = tok.encode(prompt, add_special_tokens=True if special is None else special)
    out: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": service.max_model_len}
    if flag(body, "return_token_strs"):
        out["token_strs"] = tok.convert_ids_to_tokens(ids)
    return web.json_response(out, dumps=dumps)


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json(request)
    service = state.require_service(body, kind=None)
    ids = body.get("tokens")
    vocab = int(getattr(service.tokenizer, "vocab_size", 0) or 0)
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ApiError(400, "tokens must be a list of token ids", param="tokens")
    bad = [t for t in ids if t < 0 or (vocab and t >= vocab)]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
    text = service.tokenizer.decode(ids, skip_special_tokens=flag(body, "skip_special_tokens", False))
    return web.json_response({"prompt": text, "content": text}, dumps=dumps)


async def re_isq(request: web.Request) -> web.Response:
    """mistral.rs's ``POST /re_isq {"ggml_type": "Q4K"}``: re-quantize the served model in place
    between two engine steps; answers (as mistral.rs does) ``Re ISQ: "Q4K"`` once it is done."""
    import asyncio

    from mistralrs.errors import ConfigError

    state = request.app[STATE]
    body = await read_json(request)
    value = body.get("ggml_type")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise ApiError(400, 'send `ggml_type`: an ISQ type such as "Q4K" or "Q8_0", or a bit count', param="ggml_type")
    service = state.require_service(body)
    try:
        await asyncio.get_running_loop().run_in_executor(None, service.re_isq, str(value))
    except ConfigError as exc:
        raise ApiError(400, str(exc), param="ggml_type") from None
    return web.Response(text=f'Re ISQ: "{value}"')


async def openapi_json(request: web.Request) -> web.Response:
    from mistralrs_plugins.frontends.openai_server.openapi import openapi_document

    return web.json_response(openapi_document(request.app[STATE]), dumps=dumps)


async def docs(request: web.Request) -> web.Response:
    from mistralrs_plugins.frontends.openai_server.openapi import docs_html, openapi_document

    return web.Response(text=docs_html(openapi_document(request.app[STATE])), content_type="text/html")


# -- embeddings ------------------------------------------------------------------------------
async def embeddings(request: web.Request) -> web.Response:
    """``POST /v1/embeddings``: the request's inputs go to the model's embedding engine, which
    batches them with every other embedding request in flight."""
    import asyncio

    from mistralrs.embedding.requests import embedding_response, parse_embedding_request

    state = request.app[STATE]
    body = await read_json(request)
    service = state.require_service(body, kind="embedding")
    model_name = state.resolve_name(body)
    job = parse_embedding_request(body)
    if job.texts is not None and sum(len(t) for t in job.texts) > 65536:
        future, tokens = await asyncio.to_thread(service.start, job)  # tokenizing a large body off the loop
    else:
        future, tokens = service.start(job)
    vectors = service.finish(job, await asyncio.wrap_future(future))
    state.metrics.prompt_tokens.inc(tokens)
    return web.json_response(embedding_response(job, vectors, tokens, model_name), dumps=dumps)


# -- completions -----------------------------------------------------------------------------
async def chat_completions(request: web.Request) -> web.StreamResponse:
    from mistralrs.chat_plan import prepare_chat

    state = request.app[STATE]
    body = await read_json(request)
    service = state.require_service(body)
    model_name = state.resolve_name(body)
    stream, include_usage = stream_settings(body)
    plan = await build_request(request, prepare_chat, service, body, state.tools)
    gen = plan.request
    check_best_of(gen, stream)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    tracker = state.metrics.tracker(request[ARRIVAL])
    handle = state.submit_chat(service, plan)
    if not stream:
        done, lps = await collect_events(state, handle, tracker)
        resp = P.chat_response(service.tokenizer, done, id=rid, model=model_name, logprobs=gen.logprobs,
                               token_logprobs=lps, plan=plan, records=plan.records)
        return web.json_response(P.to_json(resp), dumps=dumps)
    conv = P.ChatStream(service.tokenizer, id=rid, model=model_name, n=gen.n, logprobs=gen.logprobs, plan=plan)

    def convert(event: Any) -> list[Any]:
        name = type(event).__name__
        if name == "TokenDelta" and event.token_ids:
            tracker.token(event.index, len(event.token_ids))
        out = [P.to_json(chunk) for chunk in conv.chunks_for(event)]
        if name == "RequestDone":
            tracker.done(event)
            if include_usage:
                out.append(P.to_json(conv.usage_chunk(event)))
        return out

    return await stream_events(request, state, handle, convert)


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    service = state.require_service(body)
    model_name = state.resolve_name(body)
    stream, include_usage = stream_settings(body)
    echo = flag(body, "echo")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise ApiError(400, "suffix must be a string", param="suffix")
    gen = await build_request(request, P.build_completion_request, service, body)
    check_best_of(gen, stream)
    echo_text = ""
    if echo:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        echo_text = prompt if isinstance(prompt, str) else service.tokenizer.decode(gen.prompt_ids)
    rid = f"cmpl-{uuid.uuid4().hex}"
    tracker = state.metrics.tracker(request[ARRIVAL])
    handle = state.submit(service, gen)
    if not stream:
        done, lps = await collect_events(state, handle, tracker)
        resp = P.completion_response(service.tokenizer, done, id=rid, model=model_name, logprobs=gen.logprobs,
                                     token_logprobs=lps, echo_prefix=echo_text, suffix=suffix or "")
        return web.json_response(P.to_json(resp), dumps=dumps)
    conv = P.ChatStream(service.tokenizer, id=rid, model=model_name, n=gen.n, logprobs=gen.logprobs,
                        completion=True)
    conv.text_offset_start = len(echo_text)

    def text_chunk(index: int, text: str) -> dict[str, Any]:
        return P.to_json(P.CompletionResponse(
            id=rid, created=conv.created, model=model_name,
            choices=[P.CompletionChoice(finish_reason=None, index=index, text=text)],
        ))

    head = [text_chunk(i, echo_text) for i in range(gen.n)] if echo_text else []

    def convert(event: Any) -> list[Any]:
        name = type(event).__name__
        if name == "TokenDelta" and event.token_ids:
            tracker.token(event.index, len(event.token_ids))
        out = []
        if name == "ChoiceFinished" and suffix:
            out.append(text_chunk(event.index, suffix))
        out += [P.to_json(chunk) for chunk in conv.chunks_for(event)]
        if name == "RequestDone":
            tracker.done(event)
            if include_usage:
                out.append(P.to_json(conv.usage_chunk(event)))
        return out

    return await stream_events(request, state, handle, convert, head=head)

