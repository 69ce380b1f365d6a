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

The pieces live in smaller modules, all re-exported here: `grammar_specs` (the request side),
`constraint_factory` (ConstraintFactory, ConstraintState), `constraint_masks` (batch_masks) and
`bitmask` (bitmask expansion).
"""

from __future__ import annotations

from mistralrs.engine.bitmask import expand_bitmask
from mistralrs.engine.constraint_factory import (
    DEFAULT_CACHE_SIZE,
    CompiledGrammar,
    ConstraintFactory,
    ConstraintState,
)
from mistralrs.engine.constraint_masks import PARALLEL_MIN_CPUS, batch_masks
from mistralrs.engine.grammar_specs import (
    GRAMMAR_KINDS,
    ConstraintError,
    GrammarSpec,
    grammar_from_python,
    grammar_from_request,
)

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "GRAMMAR_KINDS",
    "PARALLEL_MIN_CPUS",
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
