"""OpenAI request bodies, validated and turned into engine requests: sampling fields against their
documented ranges, stop strings, messages for the chat template, and the `GenerationRequest`
of a completions body (`InvalidRequest(message, param)` names the bad field)."""

from __future__ import annotations

from typing import Any, Mapping

from mistralrs import json_input
from mistralrs.errors import InvalidRequest
from mistralrs.request_limits import (
    MAX_MESSAGES,
    MAX_N,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    check_count,
    limit_exceeded,
)

# Request fields passed to the chat template (also accepted inside `chat_template_kwargs`).
CHAT_TEMPLATE_KWARGS = ("enable_thinking", "reasoning_effort")


def _num(value: Any, param: str, *, lo: float | None = None, hi: float | None = None, integer: bool = False) -> Any:
    from mistralrs.engine.sampling_params import Bounds

    return _checked(value, param, Bounds(lo, hi, integer=integer))


def _checked(value: Any, param: str, bounds: Any) -> Any:
    """`value` if `bounds` (a `sampling_params.Bounds`) accepts it (None passes), else a 400."""
    if value is None:
        return None
    problem = bounds.problem(value)
    if problem:
        raise InvalidRequest(f"{param} {problem}, got {value!r}", param)
    return value


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false, got {value!r}", name)
    return bool(value)


def sampling_from(body: Mapping[str, Any], *, seed: int | None = None) -> Any:
    """SamplingParams from OpenAI/mistral.rs request fields, each checked against its
    documented range (`sampling_params.FIELD_BOUNDS`)."""
    from mistralrs.engine.sampling_params import FIELD_BOUNDS, LOGIT_BIAS_BOUNDS, SamplingParams

    bias = body.get("logit_bias") or {}
    if not isinstance(bias, Mapping):
        raise InvalidRequest("logit_bias must map token ids to numbers", "logit_bias")
    logit_bias = []
    for key, value in bias.items():
        token = key if isinstance(key, int) and not isinstance(key, bool) else None
        if isinstance(key, str) and key.strip().isdigit():
            token = int(key)
        if token is None or token < 0:
            raise InvalidRequest(f"logit_bias keys must be token ids (non-negative integers), got {key!r}",
                                 "logit_bias")
        if LOGIT_BIAS_BOUNDS.problem(value):
            raise InvalidRequest(f"logit_bias values {LOGIT_BIAS_BOUNDS.problem(value)}, got {value!r}",
                                 "logit_bias")
        logit_bias.append((token, float(value)))
    breakers = body.get("dry_sequence_breakers")
    if breakers is not None and (not isinstance(breakers, list) or not all(isinstance(b, str) for b in breakers)):
        raise InvalidRequest("dry_sequence_breakers must be a list of strings", "dry_sequence_breakers")
    fields = {name: _checked(body.get(name), name, bounds) for name, bounds in FIELD_BOUNDS.items()}
    logprobs = _flag(body, "logprobs")
    top_logprobs = fields.pop("top_logprobs")
    kwargs: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    kwargs.update(
        logit_bias=tuple(logit_bias),
        seed=fields["seed"] if fields["seed"] is not None else seed,
        logprobs=logprobs,
        top_logprobs=top_logprobs if top_logprobs is not None else (1 if logprobs else 0),
    )
    if breakers is not None:
        kwargs["dry_sequence_breakers"] = tuple(breakers)
    return SamplingParams(**kwargs)


def stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        check_count(value, MAX_STOP_STRINGS, "stop", "strings")
        for s in value:
            if len(s) > MAX_STOP_STRING_CHARS:
                raise limit_exceeded(f"stop has a string of {len(s)} characters; the limit is "
                                     f"{MAX_STOP_STRING_CHARS}", "stop")
        return tuple(value)
    raise InvalidRequest("stop must be a string or a list of strings", "stop")


def max_tokens_of(body: Mapping[str, Any], context: int | None = None) -> int | None:
    """The request's `max_tokens` (or `max_completion_tokens`): >= 1, and at most the model's
    context length `context` when given."""
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    value = _num(value, param, lo=1, integer=True)
    if value is not None and context is not None and value > context:
        raise limit_exceeded(f"{param} is {value}; the limit is the model's context length, {context} tokens", param)
    return value


def _render_tool_calls(calls: Any, i: int) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` in the form chat templates expect: `{"id", "type":
    "function", "function": {"name", "arguments"}}` with `arguments` a dict (requests carry
    it as a JSON string; HF templates iterate or `tojson` it). A string that is not a JSON
    object stays a string."""

    if not isinstance(calls, list):
        raise InvalidRequest(f"messages[{i}].tool_calls must be a list", "messages")
    out = []
    for j, call in enumerate(calls):
        if not isinstance(call, Mapping):
            raise InvalidRequest(f"messages[{i}].tool_calls[{j}] must be an object", "messages")
        nested = call.get("function")
        fn: Mapping[str, Any] = nested if isinstance(nested, Mapping) else call
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"messages[{i}].tool_calls[{j}] needs a function name", "messages")
        args = fn.get("arguments", fn.get("parameters"))
        if isinstance(args, str):
            try:
                parsed = json_input.loads(args) if args.strip() else {}
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                args = parsed
        elif args is None:
            args = {}
        elif not isinstance(args, Mapping):
            raise InvalidRequest(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON string "
                                 "or an object", "messages")
        rendered: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
        if call.get("id") is not None:
            rendered["id"] = call["id"]
        out.append(rendered)
    return out


def normalize_messages(messages: Any, *, image_parts: bool = False) -> list[dict[str, Any]]:
    """Messages as plain dicts ready for the chat template: a string is one user message;
    text parts are joined; assistant `tool_calls` get their arguments as objects. With
    `image_parts` (a vision model, after `multimodal.messages.pull_images`) contents stay lists of
    text and ``{"type": "image"}`` parts, as vision chat templates expect."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of messages or a string", "messages")
    check_count(messages, MAX_MESSAGES, "messages", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must be an object with a string 'role'", "messages")
        msg = dict(m)
        content = msg.get("content")
        if isinstance(content, list) and image_parts:
            for part in content:
                if not isinstance(part, Mapping) or part.get("type") not in ("text", "image"):
                    kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                    raise InvalidRequest(f"messages[{i}].content has a {kind!r} part; this model takes text and "
                                         "image parts", "messages")
        elif isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                    raise InvalidRequest(
                        f"messages[{i}].content has a {kind!r} part; this model takes text parts only", "messages"
                    )
                texts.append(part["text"])
            msg["content"] = " ".join(texts)
        elif content is None and not msg.get("tool_calls"):
            if msg["role"] != "assistant":
                raise InvalidRequest(f"messages[{i}].content is missing", "messages")
        elif content is not None and not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string or a list of parts", "messages")
        if msg.get("tool_calls") is not None:
            if msg["role"] != "assistant":
                raise InvalidRequest(f"messages[{i}]: only assistant messages carry tool_calls", "messages")
            msg["tool_calls"] = _render_tool_calls(msg["tool_calls"], i)
        if "reasoning" in msg and "reasoning_content" not in msg:
            msg["reasoning_content"] = msg.pop("reasoning")
        out.append(msg)
    return out


def build_completion_request(service: Any, body: Mapping[str, Any]) -> Any:
    """A validated `GenerationRequest` from a (legacy) completions body."""
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        # Legacy completions: `logprobs` is the number of top logprobs per token (0-20).
        top = _num(logprobs, "logprobs", lo=0, hi=20, integer=True)
        body = {**body, "logprobs": True, "top_logprobs": top}
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, (str, list)) or (isinstance(prompt, str) and not prompt):
        raise InvalidRequest("prompt must be a non-empty string or a list of token ids", "prompt")
    ids = service.encode_completion(prompt, truncating=bool(body.get("truncate_sequence")))
    return generation_request(service, body, ids)


_FROM_BODY: Any = object()


def generation_request(service: Any, body: Mapping[str, Any], ids: list[int], *, grammar: Any = _FROM_BODY,
                       skip_special_tokens: bool = True) -> Any:
    """The engine's `GenerationRequest` for prompt `ids` and the body's sampling, stop and length
    fields; `grammar` defaults to the body's `response_format` / `grammar`."""
    from mistralrs.engine.engine import ContextTooLong, GenerationRequest
    from mistralrs.engine.grammar_specs import grammar_from_request

    if grammar is _FROM_BODY:
        grammar = grammar_from_request(body)

    context = getattr(service, "max_model_len", None)
    max_tokens = max_tokens_of(body, context if isinstance(context, int) else None)
    n = _num(body.get("n", 1), "n", lo=1, hi=MAX_N, integer=True)
    best_of = _num(body.get("best_of"), "best_of", lo=1, hi=MAX_N, integer=True)
    if best_of is not None and best_of < n:
        raise InvalidRequest("best_of must be >= n", "best_of")
    if body.get("truncate_sequence"):
        ids = service.truncate(ids, max_tokens)
    if len(ids) >= service.max_model_len:
        raise ContextTooLong(len(ids), service.max_model_len)
    stop_ids = body.get("stop_token_ids") or ()
    if not isinstance(stop_ids, (list, tuple)) or not all(isinstance(t, int) for t in stop_ids):
        raise InvalidRequest("stop_token_ids must be a list of integers", "stop_token_ids")
    sampling = sampling_from(body)
    return GenerationRequest(
        prompt_ids=ids,
        sampling=sampling,
        max_tokens=max_tokens,
        stop_strings=stop_strings(body.get("stop")),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=bool(body.get("ignore_eos", False)),
        n=n,
        best_of=best_of if best_of and best_of > n else None,
        logprobs=sampling.logprobs,
        top_logprobs=sampling.top_logprobs,
        grammar=grammar,
        skip_special_tokens=skip_special_tokens,
    )
