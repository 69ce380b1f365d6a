"""Structured output, engine side: `ConstraintFactory` compiles grammars with llguidance for one
tokenizer (validated, LRU-cached) and makes a `ConstraintState` per sequence (its next-token
mask, `advance`, `is_finished`). llguidance is imported on first use."""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch

from mistralrs.engine.bitmask import copy_rows, rows_from_bitmask
from mistralrs.engine.grammar_specs import KIND_LABELS, ConstraintError, GrammarSpec

if TYPE_CHECKING:  # pragma: no cover
    from mistralrs.tokenization import Tokenizer

log = logging.getLogger("mistralrs.engine.constraints")

_MAX_DETAIL = 400
DEFAULT_CACHE_SIZE = 128


def llg_module() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ConstraintError(
            "structured output (grammar / response_format) needs the llguidance package; "
            "install it with `pip install llguidance`",
            param=None,
        ) from None
    return llguidance


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
    label = KIND_LABELS[spec.kind]
    where = "response_format" if spec.param == "response_format" else spec.param
    return ConstraintError(f"invalid {label} in {where}: {_one_line_error(detail, spec.kind)}", param=spec.param)


def _top_level_grammar(spec: GrammarSpec) -> str:
    """The llguidance grammar (JSON text) for a spec; ConstraintError when llguidance
    rejects its form outright (compile errors surface when the matcher is built)."""
    llg = llg_module()
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
        llg = llg_module()
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
        llg = llg_module()
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
            log.warning("%s %s: %s", spec.param, KIND_LABELS[spec.kind], w)
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
        copy_rows(out_row, rows_from_bitmask(self._buf.unsqueeze(0), self.factory, out_row.shape[0])[0])

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
                f"internal error: token {token_id} was not allowed by the {KIND_LABELS[self.spec.kind]} "
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
