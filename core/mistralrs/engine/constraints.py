"""Structured output: token-level grammar constraints built on llguidance.

mistral.rs constrains generation with llguidance (`mistralrs-core/src/pipeline/llg.rs`);
this module does the same with llguidance's Python bindings. Request side:

* `grammar_from_request(body)` reads an HTTP request body: OpenAI `response_format`
  (`text` -> no constraint, `json_object` -> the JSON schema `{"type": "object"}`,
  `json_schema` -> its `schema`) or the mistral.rs extension
  `grammar: {"type": "regex" | "json_schema" | "lark" | "llguidance", "value": ...}`.
  The two fields are mutually exclusive (as upstream, even `{"type": "text"}`).
* `grammar_from_python(grammar, grammar_type)` reads the Python API's
  `grammar=str, grammar_type=...` pair.

Both return a `GrammarSpec` (or None) and raise `ConstraintError` (an `InvalidRequest`,
HTTP 400, with `param` naming the field) for malformed fields.

Engine side:

* `ConstraintFactory(tokenizer, vocab_size)` - one per model. It builds llguidance's token
  trie from the tokenizer lazily (on the first `compile`; ~0.2-0.5 s for 32k-56k tokens) and
  `compile(spec)` validates and compiles a grammar (`ConstraintError` naming the problem on
  failure), caching compiled grammars in an LRU keyed by (kind, canonical value).
* `factory.new_state(compiled)` -> `ConstraintState`, one per sequence: `fill_mask(row)`,
  `advance(token)`, `is_finished()`. A fresh state is a `deep_copy` of the compiled
  grammar's pristine matcher, so starting a sequence never recompiles anything.
* `batch_masks(states, vocab_size)` -> the [S, V] bool `allowed_mask` for
  `Sampler.sample` (rows without a constraint all True), or None when no row has one.
  llguidance fills the constrained rows into one int32 bitmask (GIL released; on machines
  with many CPUs through its parallel `LLExecutor`), which is expanded to bool with a couple
  of vectorised numpy/torch ops: ~0.35 ms for 16 JSON-schema rows at a 32k vocabulary.

Token semantics (llguidance's): the mask allows exactly the tokens whose bytes keep the
output a prefix of some string of the grammar; special tokens are never allowed except the
EOS token(s), which are allowed only while the grammar is in an accepting state. Ids past the
tokenizer's vocabulary (logits padding, `vocab_size` > tokenizer size) are never allowed.
When the grammar can not be extended any more (`is_finished()`), only EOS is allowed and the
engine should end the sequence with finish_reason "stop" without sampling again.

The engine loop per decode step is:

    mask = batch_masks([seq.constraint for seq in batch], V)        # None: no constraints
    out = sampler.sample(logits, params, states, allowed_mask=mask)
    for seq, tok in ...: seq.constraint.advance(tok); if seq.constraint.is_finished(): stop

`llguidance` is imported lazily: parsing requests and `batch_masks` over unconstrained rows
work without it; compiling a grammar without it raises `ConstraintError` saying what to install.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch

from mistralrs import json_input
from mistralrs.errors import InvalidRequest

if TYPE_CHECKING:  # pragma: no cover
    from mistralrs.tokenization import Tokenizer

__all__ = [
    "GRAMMAR_KINDS",
    "CompiledGrammar",
    "ConstraintError",
    "ConstraintFactory",
    "ConstraintState",
    "GrammarSpec",
    "batch_masks",
    "expand_bitmask",
    "grammar_from_python",
    "grammar_from_request",
]

log = logging.getLogger(__name__)

GRAMMAR_KINDS: tuple[str, ...] = ("regex", "json_schema", "lark", "llguidance", "json_object")
"""Kinds a `GrammarSpec` may have. `json_object` is `response_format: {"type": "json_object"}`."""
_GRAMMAR_TYPES: tuple[str, ...] = ("regex", "json_schema", "lark", "llguidance")
"""Values of the `grammar.type` request field and of the Python API's `grammar_type`."""
_RESPONSE_FORMATS: tuple[str, ...] = ("text", "json_object", "json_schema")
_JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
_KIND_LABELS = {
    "regex": "regex",
    "json_schema": "JSON schema",
    "json_object": "JSON schema",
    "lark": "Lark grammar",
    "llguidance": "llguidance grammar",
}
_MAX_DETAIL = 400
DEFAULT_CACHE_SIZE = 128


class ConstraintError(InvalidRequest):
    """An invalid structured-output request (bad `response_format` / `grammar`, a schema,
    regex or grammar that does not compile), or a constraint misused by the engine."""

    def __init__(self, message: str, param: str | None = "grammar", code: str | None = None):
        super().__init__(message, param=param, code=code)


# --------------------------------------------------------------------------- request parsing


def _canonical_value(kind: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    # Keep key order: JSON schema property order decides the generated field order.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=False)


@attrs.frozen
class GrammarSpec:
    """What a request asks the output to match, before compilation.

    `value` is a str for "regex" and "lark", a JSON value (dict, or bool for a schema) for
    "json_schema", "json_object" and "llguidance". `param` is the request field it came from
    ("response_format" or "grammar"), used to name it in errors."""

    kind: str = attrs.field(validator=attrs.validators.in_(GRAMMAR_KINDS))
    value: Any = attrs.field(hash=False)
    param: str = "grammar"

    @property
    def key(self) -> tuple[str, str]:
        """Cache key: (kind, canonical text of the value). `json_object` shares the key of the
        equivalent `json_schema` so both use one compiled grammar."""
        kind = "json_schema" if self.kind == "json_object" else self.kind
        return (kind, _canonical_value(kind, self.value))


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse_json_text(text: str, what: str, param: str) -> Any:
    try:
        return json_input.loads(text)
    except json.JSONDecodeError as exc:
        raise ConstraintError(
            f"{what} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); pass a JSON document",
            param=param,
        ) from None


def _schema_value(value: Any, what: str, param: str) -> Any:
    if isinstance(value, str):
        value = _parse_json_text(value, what, param)
    if isinstance(value, bool) or isinstance(value, Mapping):
        return value if isinstance(value, bool) else dict(value)
    raise ConstraintError(f"{what} must be a JSON object, got {_type_name(value)}", param=param)


def _llguidance_value(value: Any, what: str, param: str) -> dict[str, Any]:
    if isinstance(value, str):
        value = _parse_json_text(value, what, param)
    if not isinstance(value, Mapping):
        raise ConstraintError(
            f'{what} must be a JSON object like {{"grammars": [...]}}, got {_type_name(value)}', param=param
        )
    if not isinstance(value.get("grammars"), list) or not value["grammars"]:
        raise ConstraintError(f'{what} needs a non-empty "grammars" list', param=param)
    return dict(value)


def _spec_for(kind: str, value: Any, *, param: str, what: str) -> GrammarSpec:
    if kind in ("regex", "lark"):
        if not isinstance(value, str):
            raise ConstraintError(f"{what} must be a string, got {_type_name(value)}", param=param)
        if kind == "lark" and not value.strip():
            raise ConstraintError(f"{what} is empty", param=param)
        return GrammarSpec(kind, value, param)
    if kind == "json_schema":
        return GrammarSpec(kind, _schema_value(value, what, param), param)
    if kind == "llguidance":
        return GrammarSpec(kind, _llguidance_value(value, what, param), param)
    raise AssertionError(kind)  # pragma: no cover


def grammar_from_request(body: Mapping[str, Any]) -> GrammarSpec | None:
    """The constraint an HTTP request body asks for (chat completions, completions), or None.

    * `response_format`: `{"type": "text"}` -> None; `{"type": "json_object"}` -> any JSON
      object; `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` -> the
      schema (`name`/`strict`/`description` are accepted and ignored: output always follows
      the schema strictly).
    * `grammar` [mistral.rs extension]: `{"type": "regex" | "json_schema" | "lark" |
      "llguidance", "value": ...}`.

    A null field is the same as an absent one. Both fields at once is an error, as upstream."""
    if not isinstance(body, Mapping):
        raise ConstraintError(f"request body must be a JSON object, got {_type_name(body)}", param=None)
    rf = body.get("response_format")
    grammar = body.get("grammar")
    if rf is not None and grammar is not None:
        raise ConstraintError(
            "`grammar` and `response_format` are mutually exclusive; send only one of them", param="grammar"
        )
    if grammar is not None:
        return _grammar_field(grammar)
    if rf is not None:
        return _response_format_field(rf)
    return None


def _grammar_field(grammar: Any) -> GrammarSpec:
    param = "grammar"
    if not isinstance(grammar, Mapping):
        raise ConstraintError(
            f'grammar must be an object {{"type": ..., "value": ...}}, got {_type_name(grammar)}', param=param
        )
    kind = grammar.get("type")
    if kind not in _GRAMMAR_TYPES:
        raise ConstraintError(
            f"grammar.type must be one of {', '.join(repr(k) for k in _GRAMMAR_TYPES)}, got {kind!r}", param=param
        )
    if "value" not in grammar or grammar["value"] is None:
        raise ConstraintError(f'grammar of type {kind!r} needs a "value"', param=param)
    return _spec_for(kind, grammar["value"], param=param, what=f"grammar.value ({_KIND_LABELS[kind]})")


def _response_format_field(rf: Any) -> GrammarSpec | None:
    param = "response_format"
    if isinstance(rf, str):  # lenient: "json_object" / "text" as a bare string
        rf = {"type": rf}
    if not isinstance(rf, Mapping):
        raise ConstraintError(f'response_format must be an object {{"type": ...}}, got {_type_name(rf)}', param=param)
    kind = rf.get("type")
    if kind not in _RESPONSE_FORMATS:
        raise ConstraintError(
            f"response_format.type must be one of {', '.join(repr(k) for k in _RESPONSE_FORMATS)}, got {kind!r}",
            param=param,
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", dict(_JSON_OBJECT_SCHEMA), param)
    js = rf.get("json_schema")
    if not isinstance(js, Mapping):
        raise ConstraintError(
            'response_format of type "json_schema" needs a "json_schema" object {"name": ..., "schema": {...}}',
            param=param,
        )
    name = js.get("name")
    if name is not None and not isinstance(name, str):
        raise ConstraintError(f"response_format.json_schema.name must be a string, got {_type_name(name)}", param=param)
    if js.get("schema") is None:
        raise ConstraintError('response_format.json_schema needs a "schema"', param=param)
    return _spec_for("json_schema", js["schema"], param=param, what="response_format.json_schema.schema")


def grammar_from_python(grammar: str | None, grammar_type: str | None) -> GrammarSpec | None:
    """The constraint of the Python API's `grammar` / `grammar_type` pair, or None.

    `grammar_type` is "regex", "lark", "json_schema" (grammar is the schema as JSON text) or
    "llguidance" (grammar is the JSON text of a `{"grammars": [...]}` object). Giving one
    without the other is an error, as in mistral.rs' Python bindings."""
    if grammar is None and grammar_type is None:
        return None
    if grammar is None:
        raise ConstraintError(f"grammar_type={grammar_type!r} is given but grammar is not", param="grammar")
    if grammar_type is None:
        raise ConstraintError(
            f"grammar is given but grammar_type is not; set it to one of {', '.join(repr(k) for k in _GRAMMAR_TYPES)}",
            param="grammar_type",
        )
    if grammar_type not in _GRAMMAR_TYPES:
        raise ConstraintError(
            f"grammar_type must be one of {', '.join(repr(k) for k in _GRAMMAR_TYPES)}, got {grammar_type!r}",
            param="grammar_type",
        )
    # (a dict passed for json_schema / llguidance is accepted as the parsed JSON)
    return _spec_for(grammar_type, grammar, param="grammar", what=f"grammar ({_KIND_LABELS[grammar_type]})")


# --------------------------------------------------------------------------- llguidance glue


def _llg():
    try:
        import llguidance
    except ImportError:
        raise ConstraintError(
            "structured output (grammar / response_format) needs the llguidance package; "
            "install it with `pip install llguidance`",
            param=None,
        ) from None
    return llguidance


_EXECUTOR: Any = None
_EXECUTOR_LOCK = threading.Lock()


PARALLEL_MIN_CPUS = 8
"""`batch_masks` uses llguidance's thread pool by default only on machines with at least this
many CPUs. Filling the 16 masks of a JSON-schema batch takes ~0.1-0.3 ms sequentially at a
32k vocabulary; on a small, busy machine waking the pool's threads costs more than it saves
(2 CPUs: p95 3-17 ms with the pool, by load, against 0.5-0.8 ms without; see
benchmarks/constraints.py)."""


def _executor_threads() -> int:
    """Threads of the mask executor: $MISTRALRS_GRAMMAR_THREADS, else the CPU count (max 32)."""
    threads = os.environ.get("MISTRALRS_GRAMMAR_THREADS")
    try:
        return max(1, int(threads)) if threads else max(1, min(32, os.cpu_count() or 1))
    except ValueError:
        return 1


def _parallel_default() -> bool:
    """Use the executor? $MISTRALRS_GRAMMAR_THREADS > 1 forces it on (= 1 off); else only on
    machines with PARALLEL_MIN_CPUS or more CPUs."""
    if os.environ.get("MISTRALRS_GRAMMAR_THREADS"):
        return _executor_threads() > 1
    return (os.cpu_count() or 1) >= PARALLEL_MIN_CPUS


def _executor() -> Any:
    """The process-wide llguidance executor (a Rust thread pool) for parallel mask filling."""
    global _EXECUTOR
    if _EXECUTOR is None:
        with _EXECUTOR_LOCK:
            if _EXECUTOR is None:
                _EXECUTOR = _llg().LLExecutor(num_threads=_executor_threads())
    return _EXECUTOR


_INDENTED = re.compile(r"^\s")
_POSITION = re.compile(r"^at \d+\(\d+\):\s*")


def _one_line_error(text: str, kind: str) -> str:
    """llguidance errors are multi-line (message, then an indented excerpt with a caret):
    keep the unindented lines, joined. For regex / JSON schema the "at L(C)" position refers
    to llguidance's generated wrapper grammar, so it is dropped."""
    text = re.split(r"<state>|<non-verbose/>|<grammar>", str(text))[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not _INDENTED.match(ln)]
    msg = " ".join(lines) if lines else " ".join(text.split())
    if kind != "lark":
        msg = _POSITION.sub("", msg)
    msg = msg.rstrip(":; ")
    if len(msg) > _MAX_DETAIL:
        msg = msg[: _MAX_DETAIL - 3] + "..."
    return msg or "unknown error"


def _invalid(spec: GrammarSpec, detail: str) -> ConstraintError:
    label = _KIND_LABELS[spec.kind]
    where = "response_format" if spec.param == "response_format" else spec.param
    return ConstraintError(f"invalid {label} in {where}: {_one_line_error(detail, spec.kind)}", param=spec.param)


def _top_level_grammar(spec: GrammarSpec) -> str:
    """The llguidance grammar (JSON text) for a spec; ConstraintError when llguidance
    rejects its form outright (compile errors surface when the matcher is built)."""
    llg = _llg()
    kind, value = spec.kind, spec.value
    try:
        if kind == "regex":
            return llg.LLMatcher.grammar_from_regex(value)
        if kind == "lark":
            return llg.LLMatcher.grammar_from_lark(value)
        if kind in ("json_schema", "json_object"):
            return llg.LLMatcher.grammar_from_json_schema(value if isinstance(value, str) else json.dumps(value))
        if kind == "llguidance":
            return value if isinstance(value, str) else json.dumps(value)
    except (ValueError, TypeError) as exc:
        raise _invalid(spec, str(exc)) from None
    raise AssertionError(kind)  # pragma: no cover


@attrs.frozen(eq=False)
class CompiledGrammar:
    """A validated grammar bound to one factory (tokenizer). `template` is an llguidance
    matcher in its start state that no sequence uses: states are deep copies of it."""

    spec: GrammarSpec
    grammar: str
    template: Any = attrs.field(repr=False)
    factory: ConstraintFactory = attrs.field(repr=False)
    warnings: tuple[str, ...] = ()


class ConstraintFactory:
    """Compiles grammars for one tokenizer / model vocabulary and makes per-sequence states.

    `vocab_size` is the width of the model's logits. It may exceed the tokenizer's vocabulary
    (embedding padding): those ids are never allowed. `eos_token_ids` (default: the tokenizer's
    eos token) are the tokens a constrained sequence may end with once the grammar accepts;
    pass the model's generation_config eos ids when it has several. Thread-safe."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        *,
        eos_token_ids: Iterable[int] | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.tokenizer_vocab_size = int(tokenizer.vocab_size)
        # llguidance's vocabulary must cover every tokenizer id; its masks are cut to vocab_size.
        self.n_vocab = max(self.vocab_size, self.tokenizer_vocab_size)
        self.mask_words = (self.n_vocab + 31) // 32
        if eos_token_ids is None:
            eos = tokenizer.eos_token_id
            eos_token_ids = [] if eos is None else [eos]
        self.eos_token_ids: tuple[int, ...] = tuple(
            dict.fromkeys(int(t) for t in eos_token_ids if 0 <= int(t) < min(self.vocab_size, self.n_vocab))
        )
        self.cache_size = max(0, int(cache_size))
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._lltok: Any = None
        self._lltok_lock = threading.Lock()

    # ------------------------------------------------------------------ tokenizer
    @property
    def ll_tokenizer(self) -> Any:
        """llguidance's `LLTokenizer` (token trie) for this tokenizer, built on first use."""
        if self._lltok is None:
            with self._lltok_lock:
                if self._lltok is None:
                    self._lltok = self._build_ll_tokenizer()
        return self._lltok

    def _build_ll_tokenizer(self) -> Any:
        llg = _llg()
        backend = copy.copy(self.tokenizer.backend)
        # As llguidance.hf.from_tokenizer: padding/truncation must not leak into the trie.
        backend.no_padding()
        backend.no_truncation()
        eos: list[int] | None = list(self.eos_token_ids) or None
        try:
            return llg.LLTokenizer(backend.to_str(), n_vocab=self.n_vocab, eos_token=eos)
        except Exception as exc:  # noqa: BLE001 - llguidance raises plain exceptions
            raise ConstraintError(
                f"structured output is not supported with this tokenizer: {_one_line_error(str(exc), 'lark')}",
                param=None,
            ) from None

    # -------------------------------------------------------------------- compile
    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Validate and compile `spec` (cached). ConstraintError with a one-line message
        naming the problem and `param` = the request field when it does not compile."""
        if not isinstance(spec, GrammarSpec):
            raise TypeError(f"compile() takes a GrammarSpec, got {type(spec).__name__}")
        key = spec.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit if hit.spec.param == spec.param else attrs.evolve(hit, spec=spec)
        compiled = self._compile(spec)
        if self.cache_size:
            with self._lock:
                self._cache[key] = compiled
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GrammarSpec) -> CompiledGrammar:
        llg = _llg()
        grammar = _top_level_grammar(spec)
        lltok = self.ll_tokenizer
        # The matcher constructor never raises for grammar errors: it enters an error state.
        # verbose_errors=False: runtime errors must not echo the parser state and the whole
        # grammar (which may be a user's private schema) into messages and logs.
        matcher = llg.LLMatcher(lltok, grammar, log_level=0, limits=llg.LLParserLimits(verbose_errors=False))
        if matcher.is_error():
            raise _invalid(spec, matcher.get_error())
        warnings = tuple(matcher.get_grammar_warnings())
        for w in warnings:
            log.warning("%s %s: %s", spec.param, _KIND_LABELS[spec.kind], w)
        return CompiledGrammar(spec=spec, grammar=grammar, template=matcher, factory=self, warnings=warnings)

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"size": len(self._cache), "max_size": self.cache_size}

    # ---------------------------------------------------------------------- state
    def new_state(self, compiled: CompiledGrammar | GrammarSpec) -> ConstraintState:
        """A fresh per-sequence state (a spec is compiled first)."""
        if isinstance(compiled, GrammarSpec):
            compiled = self.compile(compiled)
        if compiled.factory is not self:
            raise ValueError("the grammar was compiled by another ConstraintFactory (another tokenizer)")
        return ConstraintState(self, compiled, compiled.template.deep_copy())

    def __repr__(self) -> str:
        return (
            f"ConstraintFactory(vocab_size={self.vocab_size}, tokenizer_vocab_size={self.tokenizer_vocab_size}, "
            f"eos_token_ids={list(self.eos_token_ids)})"
        )


# --------------------------------------------------------------------------- masks

_LITTLE_ENDIAN = sys.byteorder == "little"
# _BYTE_BITS[b] = the 8 bits of byte value b, least significant first.
_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()

_np: Any
try:  # numpy's unpackbits is the fastest expansion (~30 us for 16 x 32k); torch is the fallback
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is optional
    _np = None


def _mask_bytes(bitmask: torch.Tensor) -> torch.Tensor:
    """[R, W] int32 words -> [R, 4W] uint8, byte k holding tokens 8k..8k+7 (LSB first)."""
    if _LITTLE_ENDIAN:
        return bitmask.contiguous().view(torch.uint8)
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int32)  # pragma: no cover - big-endian hosts
    return ((bitmask.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(bitmask.shape[0], -1)


def expand_bitmask(bitmask: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Expand llguidance's int32 bitmask [R, W] (bit j of word i = token 32*i + j) into a
    contiguous bool tensor [R, width] (width <= 32*W; default 32*W). Vectorised: numpy's
    `unpackbits` over a uint8 view of the words, or (without numpy) a 256-entry lookup table
    gathered with one `index_select`."""
    if bitmask.dim() == 1:
        return expand_bitmask(bitmask.unsqueeze(0), width)[0]
    rows, words = bitmask.shape
    width = 32 * words if width is None else int(width)
    if not 0 <= width <= 32 * words:
        raise ValueError(f"width {width} exceeds the {32 * words} bits of the mask")
    as_bytes = _mask_bytes(bitmask.cpu())
    if _np is not None:
        bits = _np.unpackbits(as_bytes.numpy(), axis=1, count=width, bitorder="little")
        return torch.from_numpy(bits.view(_np.bool_))
    bits = _BYTE_BITS.index_select(0, as_bytes.reshape(-1).int()).view(rows, 32 * words)
    return bits[:, :width].contiguous()


class ConstraintState:
    """The grammar state of one sequence (an llguidance matcher)."""

    __slots__ = ("factory", "compiled", "_matcher", "_buf", "_consumed")

    def __init__(self, factory: ConstraintFactory, compiled: CompiledGrammar, matcher: Any) -> None:
        self.factory = factory
        self.compiled = compiled
        self._matcher = matcher
        self._buf: torch.Tensor | None = None
        self._consumed = 0

    @property
    def matcher(self) -> Any:
        """The underlying `llguidance.LLMatcher`."""
        return self._matcher

    @property
    def spec(self) -> GrammarSpec:
        return self.compiled.spec

    @property
    def num_consumed(self) -> int:
        return self._consumed

    # ---------------------------------------------------------------- masks
    def fill_bitmask(self, out: torch.Tensor) -> None:
        """Compute the next-token bitmask into `out` (int32 [mask_words], CPU, contiguous)."""
        if (
            out.dtype != torch.int32
            or out.dim() != 1
            or out.numel() != self.factory.mask_words
            or not out.is_contiguous()
        ):
            raise ValueError(f"fill_bitmask needs a contiguous int32 [{self.factory.mask_words}] CPU tensor")
        self._matcher.unsafe_compute_mask_ptr(out.data_ptr(), out.numel() * 4)

    def fill_mask(self, out_row: torch.Tensor) -> None:
        """Write the allowed next tokens into `out_row` ([V] bool; True = allowed). EOS is
        allowed only when the output so far is accepted by the grammar; once the grammar is
        finished only EOS is allowed. Ids >= the tokenizer's vocabulary are never allowed."""
        if out_row.dim() != 1:
            raise ValueError(f"fill_mask needs a 1-D row, got shape {tuple(out_row.shape)}")
        if self._buf is None:
            self._buf = torch.empty(self.factory.mask_words, dtype=torch.int32)
        self.fill_bitmask(self._buf)
        _copy_rows(out_row, _rows_from_bitmask(self._buf.unsqueeze(0), self.factory, out_row.shape[0])[0])

    def allowed_tokens(self) -> torch.Tensor:
        """Ids of the allowed next tokens (debugging / tests)."""
        row = torch.empty(self.factory.vocab_size, dtype=torch.bool)
        self.fill_mask(row)
        return row.nonzero().flatten()

    # --------------------------------------------------------------- advance
    def advance(self, token_id: int) -> None:
        """Consume the sampled token. Raises ConstraintError (an engine bug: the token was not
        allowed by the mask) when the grammar rejects it; the state is then unusable."""
        token_id = int(token_id)
        if not 0 <= token_id < self.factory.n_vocab:
            raise ConstraintError(
                f"internal error: token id {token_id} is outside the vocabulary (size {self.factory.n_vocab})",
                param=None,
            )
        if not self._matcher.consume_token(token_id):
            raise ConstraintError(
                f"internal error: token {token_id} was not allowed by the {_KIND_LABELS[self.spec.kind]} "
                f"constraint: {_one_line_error(self._matcher.get_error(), 'lark')}",
                param=None,
            )
        self._consumed += 1

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` advances (speculative decoding)."""
        if num_tokens <= 0:
            return
        if num_tokens > self._consumed or not self._matcher.rollback(num_tokens):
            raise ConstraintError(f"internal error: cannot roll back {num_tokens} tokens", param=None)
        self._consumed -= num_tokens

    def validate_tokens(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` (a draft) the grammar accepts in a row from the current state."""
        return int(self._matcher.validate_tokens([int(t) for t in tokens]))

    # ---------------------------------------------------------------- status
    def is_finished(self) -> bool:
        """The grammar can not be extended (or EOS was consumed): end the sequence ("stop")."""
        return bool(self._matcher.is_stopped())

    def is_accepting(self) -> bool:
        """The output so far is a complete match (EOS is allowed)."""
        return bool(self._matcher.is_accepting())

    @property
    def error(self) -> str | None:
        """llguidance's error (one line) when the matcher is in its error state, else None.
        A matcher in error (a rejected token, or a parser limit hit at run time) is finished
        and its mask allows only EOS, so the sequence ends; the engine may log this."""
        err = self._matcher.get_error()
        return _one_line_error(err, "lark") if err else None

    def copy(self) -> ConstraintState:
        """An independent copy (e.g. for `n` > 1 choices forked after the prompt)."""
        clone = ConstraintState(self.factory, self.compiled, self._matcher.deep_copy())
        clone._consumed = self._consumed
        return clone

    def __repr__(self) -> str:
        return (
            f"ConstraintState(kind={self.spec.kind!r}, consumed={self._consumed}, "
            f"accepting={self.is_accepting()}, finished={self.is_finished()})"
        )


def _rows_from_bitmask(bitmask: torch.Tensor, factory: ConstraintFactory, width: int) -> torch.Tensor:
    """Expand `bitmask` [R, W] into fresh, contiguous bool rows [R, width]. The logits-padding
    ids (past the tokenizer's vocabulary) and columns past the factory's vocab_size (a caller
    with wider logits) are False.

    With numpy every step is a single-threaded numpy op: torch would spread these small
    copies over its intra-op pool, and waking that pool costs milliseconds on a busy machine."""
    rows_n, words = bitmask.shape
    bits = 32 * words
    keep = min(width, factory.vocab_size, factory.tokenizer_vocab_size)
    if _np is not None:
        packed = _mask_bytes(bitmask.cpu()).numpy()
        if width <= bits:
            rows = _np.unpackbits(packed, axis=1, count=width, bitorder="little").view(_np.bool_)
        else:
            rows = _np.zeros((rows_n, width), dtype=_np.bool_)
            rows[:, :bits] = _np.unpackbits(packed, axis=1, bitorder="little").view(_np.bool_)
        if keep < width:
            rows[:, keep:] = False
        return torch.from_numpy(rows)
    out = torch.zeros(rows_n, width, dtype=torch.bool)
    out[:, :keep] = expand_bitmask(bitmask, keep)
    return out


def _copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src for CPU bool tensors (numpy when possible, see `_rows_from_bitmask`)."""
    if _np is not None and dst.device.type == "cpu":
        _np.copyto(dst.numpy(), src.numpy())
    else:
        dst.copy_(src)


def batch_masks(
    states: Sequence[ConstraintState | None], vocab_size: int, *, parallel: bool | None = None
) -> torch.Tensor | None:
    """The [S, vocab_size] bool allowed-token mask of a batch (row i for states[i]): rows
    whose state is None are all True. None when no row has a constraint.

    All constrained rows of one factory are filled into one int32 bitmask (llguidance releases
    the GIL), then expanded to bool with vectorised ops. With `parallel` the rows are filled by
    one `LLExecutor` call (llguidance's Rust thread pool, parallel over sequences), else one
    after the other in the calling thread. Default: parallel on machines with at least
    `PARALLEL_MIN_CPUS` CPUs, or as $MISTRALRS_GRAMMAR_THREADS says (> 1: a pool of that
    many threads; 1: sequential).

    Safe to call from a worker thread (e.g. to overlap with the forward pass) as long as
    nothing advances the same states meanwhile."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return None
    vocab_size = int(vocab_size)
    groups: dict[int, list[int]] = {}
    for i in rows:
        groups.setdefault(id(states[i].factory), []).append(i)  # type: ignore[union-attr]
    out: torch.Tensor | None = None
    for idx in groups.values():
        factory = states[idx[0]].factory  # type: ignore[union-attr]
        # One fill per distinct state (a state listed twice would be borrowed twice by the pool).
        slot: dict[int, int] = {}
        unique: list[ConstraintState] = []
        for i in idx:
            if slot.setdefault(id(states[i]), len(unique)) == len(unique):
                unique.append(states[i])  # type: ignore[arg-type]
        bitmask = torch.empty(len(unique), factory.mask_words, dtype=torch.int32)
        use_par = parallel if parallel is not None else (len(unique) > 1 and _parallel_default())
        if not use_par or len(unique) == 1:
            for k, st in enumerate(unique):
                st.fill_bitmask(bitmask[k])
        else:
            matchers = [(st._matcher, k) for k, st in enumerate(unique)]
            _executor().unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), factory.mask_words * 4, len(unique))
        if len(unique) < len(idx):
            bitmask = bitmask[[slot[id(states[i])] for i in idx]]
        block = _rows_from_bitmask(bitmask, factory, vocab_size)
        if len(idx) == len(states):  # every row constrained by one factory: no copy
            return block
        if out is None:
            out = (
                torch.from_numpy(_np.ones((len(states), vocab_size), dtype=_np.bool_))
                if _np is not None
                else torch.ones(len(states), vocab_size, dtype=torch.bool)
            )
        if idx[-1] - idx[0] + 1 == len(idx):  # contiguous rows
            _copy_rows(out[idx[0] : idx[-1] + 1], block)
        elif _np is not None:
            out.numpy()[idx] = block.numpy()
        else:
            out.index_copy_(0, torch.tensor(idx, dtype=torch.long), block)
    return out
