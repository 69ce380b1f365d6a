"""Structured output (mistralrs.engine.constraints): request parsing, grammar compilation and
errors, and random walks through the token masks.

The random walks draw every token uniformly among the tokens the mask allows (so they reach
odd corners of the grammar a model would rarely visit) until the grammar finishes or EOS is
drawn, for 20 seeds, on both tiny tokenizers (byte-level BPE and sentencepiece-style byte
fallback), and check the decoded output against an independent validator (jsonschema, json,
re.fullmatch, Python's ast). At every step they also check the mask invariants: EOS allowed
exactly when the grammar accepts, no other special token, no logits-padding id, only EOS once
the grammar is finished, rows without a constraint all True."""

from __future__ import annotations

import ast
import json
import random
import re

import jsonschema
import pytest
import torch

from mistralrs.engine import bitmask, constraint_masks
from mistralrs.engine import constraints as C
from mistralrs.engine.constraints import (
    ConstraintError,
    ConstraintFactory,
    GrammarSpec,
    batch_masks,
    expand_bitmask,
    grammar_from_python,
    grammar_from_request,
)
from mistralrs.engine.sampling import Sampler, SamplingParams, SequenceSamplingState
from mistralrs.errors import InvalidRequest
from mistralrs.tokenization import Tokenizer
from tests.helpers.tiny_tokenizer import write_byte_fallback_tokenizer, write_tiny_tokenizer

pytest.importorskip("llguidance")

SEEDS = range(20)
PAD = 45  # logits wider than the tokenizer: ids [tokenizer vocab, vocab) must never be allowed
MAX_STEPS = 6000

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 1, "maximum": 500},
                "verified": {"type": "boolean"},
                "score": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["id", "verified"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "kind", "owner", "tags"],
    "additionalProperties": False,
}

REGEX = r"(\+|-)?(0|[1-9][0-9]{0,3})(\.[0-9]{1,2})? (apples|pears|[a-z]{2,6})!?"

ARITH_LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /0|[1-9][0-9]{0,3}/
"""

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}
LLGUIDANCE_GRAMMAR = {
    "grammars": [
        {"lark_grammar": 'start: "Reasoning: " /[a-z ]{1,20}/ "\\nJSON: " @answer'},
        {"name": "answer", "json_schema": ANSWER_SCHEMA},
    ]
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(write_tiny_tokenizer(tmp_path_factory.mktemp("bl")))


@pytest.fixture(scope="module")
def byte_fallback(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(write_byte_fallback_tokenizer(tmp_path_factory.mktemp("bf")))


@pytest.fixture(scope="module", params=["byte_level", "byte_fallback"])
def factory(request) -> ConstraintFactory:
    tok = request.getfixturevalue(request.param)
    return ConstraintFactory(tok, tok.vocab_size + PAD)


# --------------------------------------------------------------------------- random walks


def check_row(factory: ConstraintFactory, state: C.ConstraintState, row: torch.Tensor) -> list[int]:
    """Mask invariants for one constrained row; returns the allowed ids."""
    tok = factory.tokenizer
    allowed = row.nonzero().flatten().tolist()
    assert allowed, "a constrained row must allow something"
    assert max(allowed) < tok.vocab_size, "logits-padding ids must never be allowed"
    eos = set(factory.eos_token_ids)
    specials = set(tok.special_ids) - eos
    assert not specials & set(allowed), "special tokens other than EOS must never be allowed"
    assert bool(eos & set(allowed)) == state.is_accepting(), "EOS allowed exactly when the grammar accepts"
    if state.is_finished():
        assert set(allowed) <= eos
    return allowed


def random_walks(factory: ConstraintFactory, spec: GrammarSpec, seeds=SEEDS) -> list[list[int]]:
    """Walk one sequence per seed, all in one batch (finished rows become None, i.e.
    unconstrained rows), drawing each token uniformly among the allowed ones."""
    compiled = factory.compile(spec)
    states: list[C.ConstraintState | None] = [factory.new_state(compiled) for _ in seeds]
    rngs = [random.Random(s) for s in seeds]
    outputs: list[list[int]] = [[] for _ in seeds]
    V = factory.vocab_size
    for step in range(MAX_STEPS):
        if all(s is None for s in states):
            break
        mask = batch_masks(states, V)
        assert mask is not None and mask.shape == (len(states), V) and mask.dtype == torch.bool
        for i, state in enumerate(states):
            if state is None:
                assert bool(mask[i].all()), "unconstrained rows are all True"
                continue
            if step < 3 and i < 2:  # the single-row path agrees with the batched one
                row = torch.zeros(V, dtype=torch.bool)
                state.fill_mask(row)
                assert torch.equal(row, mask[i])
            allowed = check_row(factory, state, mask[i])
            token = rngs[i].choice(allowed)
            if token in factory.eos_token_ids:
                states[i] = None
                continue
            state.advance(token)
            outputs[i].append(token)
            if state.is_finished():
                states[i] = None
    else:
        pytest.fail(f"random walks did not finish within {MAX_STEPS} steps")
    return outputs


def decoded(factory: ConstraintFactory, tokens: list[int]) -> str:
    """The text the user gets, checked against the bytes llguidance constrained (the
    sentencepiece decoder strips the leading space of the first "▁" piece)."""
    text = factory.tokenizer.decode(tokens, skip_special_tokens=False)
    seen = factory.ll_tokenizer.decode_bytes(tokens).decode("utf-8")
    assert text == seen or (seen.startswith(" ") and text == seen[1:]), (text, seen)
    return text


def test_json_schema_walks_validate(factory):
    spec = grammar_from_request(
        {"response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}}
    )
    outs = random_walks(factory, spec)
    kinds = set()
    for tokens in outs:
        value = json.loads(decoded(factory, tokens))
        jsonschema.validate(value, SCHEMA)
        kinds.add(value["kind"])
    assert len(kinds) > 1  # the walks really are random


def test_json_object_walks_parse(factory):
    spec = grammar_from_request({"response_format": {"type": "json_object"}})
    assert spec.kind == "json_object"
    for tokens in random_walks(factory, spec):
        assert isinstance(json.loads(decoded(factory, tokens)), dict)


def test_regex_walks_fullmatch(factory):
    spec = grammar_from_request({"grammar": {"type": "regex", "value": REGEX}})
    texts = [decoded(factory, t) for t in random_walks(factory, spec)]
    for text in texts:
        assert re.fullmatch(REGEX, text), text
    assert len(set(texts)) > 10


def _arith_ok(text: str) -> bool:
    """The text is an arithmetic expression of integer literals, + - * / and parentheses."""
    tree = ast.parse(text, mode="eval")
    allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
    for node in ast.walk(tree):
        if not isinstance(node, allowed):
            return False
        if isinstance(node, ast.Constant) and type(node.value) is not int:
            return False
    return True


def test_lark_walks_parse(factory):
    spec = grammar_from_request({"grammar": {"type": "lark", "value": ARITH_LARK}})
    texts = [decoded(factory, t) for t in random_walks(factory, spec)]
    for text in texts:
        assert _arith_ok(text), text
    assert any(ch in "".join(texts) for ch in "+-*/")


def test_llguidance_native_grammar_walks(factory):
    spec = grammar_from_request({"grammar": {"type": "llguidance", "value": LLGUIDANCE_GRAMMAR}})
    for tokens in random_walks(factory, spec):
        text = decoded(factory, tokens)
        m = re.fullmatch(r"Reasoning: [a-z ]{1,20}\nJSON: (.*)", text, flags=re.S)
        assert m, text
        jsonschema.validate(json.loads(m.group(1)), ANSWER_SCHEMA)


def test_python_api_grammar_walks(factory):
    spec = grammar_from_python(json.dumps(SCHEMA), "json_schema")
    for tokens in random_walks(factory, spec, seeds=range(5)):
        jsonschema.validate(json.loads(decoded(factory, tokens)), SCHEMA)


# --------------------------------------------------------------------------- mask details


def test_eos_allowed_only_when_accepting(byte_level):
    f = ConstraintFactory(byte_level, byte_level.vocab_size)
    eos = byte_level.eos_token_id
    st = f.new_state(f.compile(GrammarSpec("regex", "a+b?")))
    row = torch.empty(f.vocab_size, dtype=torch.bool)
    st.fill_mask(row)
    assert not row[eos] and not st.is_accepting()
    a = byte_level.encode("a", add_special_tokens=False)
    assert len(a) == 1
    st.advance(a[0])
    st.fill_mask(row)
    assert row[eos] and st.is_accepting() and not st.is_finished()
    assert row[a[0]]  # still extendable
    b = byte_level.encode("b", add_special_tokens=False)
    st.advance(b[0])
    assert st.is_finished() and st.is_accepting()
    st.fill_mask(row)
    assert row.nonzero().flatten().tolist() == [eos]
    st.advance(eos)  # the engine may feed the EOS it sampled
    assert st.is_finished()


def test_several_eos_ids(byte_level):
    im_end = byte_level.token_to_id("<|im_end|>")
    eos = byte_level.eos_token_id
    f = ConstraintFactory(byte_level, byte_level.vocab_size, eos_token_ids=[eos, im_end])
    st = f.new_state(GrammarSpec("regex", "x*"))
    row = st.allowed_tokens().tolist()
    assert eos in row and im_end in row
    assert not set(byte_level.special_ids) - {eos, im_end} & set(row)


@pytest.fixture(params=["numpy", "torch"])
def expansion(request, monkeypatch):
    """Run a test with the numpy mask expansion and with the torch-only fallback."""
    if request.param == "torch":
        monkeypatch.setattr(bitmask, "_np", None)
    return request.param


def test_padding_ids_never_allowed_even_for_wider_rows(byte_fallback, expansion):
    tok = byte_fallback
    f = ConstraintFactory(tok, tok.vocab_size + 100)
    st = f.new_state(GrammarSpec("regex", "(.|\n)*"))  # allows (nearly) every real token
    for width in (f.vocab_size, tok.vocab_size + 164, tok.vocab_size + 500):  # caller's logits wider still
        mask = batch_masks([st, None], width)
        assert mask.shape == (2, width)
        assert not mask[0, tok.vocab_size :].any()
        assert mask[0, : tok.vocab_size].sum() > tok.vocab_size // 2
        assert mask[1].all()
        row = torch.ones(width, dtype=torch.bool)
        st.fill_mask(row)
        assert torch.equal(row, mask[0])
        assert torch.equal(batch_masks([st], width)[0], mask[0])


@pytest.mark.parametrize("parallel", [None, False, True])
def test_batch_masks_unconstrained_rows_and_none(byte_level, expansion, parallel):
    f = ConstraintFactory(byte_level, byte_level.vocab_size + 3)
    V = f.vocab_size
    assert batch_masks([None, None], V) is None
    assert batch_masks([], V) is None
    compiled = f.compile(GrammarSpec("regex", "[0-9]+"))
    s1, s2 = f.new_state(compiled), f.new_state(compiled)
    s2.advance(byte_level.encode("7", add_special_tokens=False)[0])
    for layout in ([None, s1, None, s2], [s1, s2, None], [None, s1, s2], [s2], [s1, s2, s1]):
        mask = batch_masks(layout, V, parallel=parallel)
        assert mask.shape == (len(layout), V)
        for i, st in enumerate(layout):
            if st is None:
                assert mask[i].all()
            else:
                row = torch.zeros(V, dtype=torch.bool)
                st.fill_mask(row)
                assert torch.equal(mask[i], row)
    m = batch_masks([s1, s2], V, parallel=parallel)
    eos = byte_level.eos_token_id
    assert not m[0, eos] and m[1, eos]


def test_masks_feed_the_sampler(byte_level):
    f = ConstraintFactory(byte_level, byte_level.vocab_size + 8)
    V = f.vocab_size
    compiled = f.compile(GrammarSpec("regex", "(yes|no|maybe)"))
    cstates = [f.new_state(compiled), None, f.new_state(compiled)]
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_p=0.9),
    ]
    sstates = [SequenceSamplingState([1, 2, 3], seed=i) for i in range(3)]
    texts = ["", "", ""]
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        mask = batch_masks(cstates, V)
        if mask is None:
            break
        logits = torch.randn(3, V, generator=g) * 5
        out = Sampler().sample(logits, params, sstates, allowed_mask=mask)
        toks = out.token_ids
        for i, (st, t) in enumerate(zip(cstates, toks)):
            assert mask[i, t]
            sstates[i].append(t)
            if st is None:
                continue
            if t == byte_level.eos_token_id:
                cstates[i] = None
                continue
            st.advance(t)
            texts[i] += byte_level.decode([t])
            if st.is_finished():
                cstates[i] = None
    assert texts[0] in ("yes", "no", "maybe") and texts[2] in ("yes", "no", "maybe")


def test_expand_bitmask_matches_bit_arithmetic():
    g = torch.Generator().manual_seed(1)
    bm = torch.randint(-(2**31), 2**31 - 1, (5, 7), generator=g, dtype=torch.int64).to(torch.int32)
    ref = ((bm.unsqueeze(-1).to(torch.int64) >> torch.arange(32)) & 1).bool().reshape(5, -1)
    assert torch.equal(expand_bitmask(bm), ref)
    assert torch.equal(expand_bitmask(bm, 200), ref[:, :200])
    assert torch.equal(expand_bitmask(bm[0], 33), ref[0, :33])


def test_expand_bitmask_without_numpy(monkeypatch):
    monkeypatch.setattr(bitmask, "_np", None)
    test_expand_bitmask_matches_bit_arithmetic()


def test_advance_rejects_disallowed_token(byte_level):
    f = ConstraintFactory(byte_level, byte_level.vocab_size)
    st = f.new_state(GrammarSpec("regex", "[0-9]+"))
    letter = byte_level.encode("a", add_special_tokens=False)[0]
    with pytest.raises(ConstraintError, match="internal error") as exc:
        st.advance(letter)
    assert "\n" not in str(exc.value) and "<state>" not in str(exc.value)
    # the state is then finished with an error, and its mask allows only EOS (the sequence ends)
    assert st.is_finished() and st.error and "\n" not in st.error
    assert st.allowed_tokens().tolist() == [byte_level.eos_token_id]
    with pytest.raises(ConstraintError):
        f.new_state(GrammarSpec("regex", "x")).advance(10**7)


def test_rollback_copy_and_validate_tokens(byte_level):
    f = ConstraintFactory(byte_level, byte_level.vocab_size)
    st = f.new_state(GrammarSpec("regex", "ab(c|d)"))
    ids = [byte_level.encode(ch, add_special_tokens=False)[0] for ch in "abcd"]
    before = st.allowed_tokens()
    assert st.validate_tokens([ids[0], ids[1], ids[3]]) == 3
    assert st.validate_tokens([ids[1]]) == 0
    st.advance(ids[0])
    twin = st.copy()
    st.advance(ids[1])
    st.rollback(2)
    assert torch.equal(st.allowed_tokens(), before) and st.num_consumed == 0
    twin.advance(ids[1])
    twin.advance(ids[3])
    assert twin.is_finished()
    with pytest.raises(ConstraintError):
        st.rollback(1)


def test_compile_cache_is_lru(byte_level):
    f = ConstraintFactory(byte_level, byte_level.vocab_size, cache_size=2)
    a1 = f.compile(GrammarSpec("regex", "a"))
    assert f.compile(GrammarSpec("regex", "a")) is a1
    # the same schema from response_format and from grammar share one compiled grammar
    s1 = f.compile(GrammarSpec("json_schema", {"type": "object"}, "response_format"))
    s2 = f.compile(GrammarSpec("json_object", {"type": "object"}, "response_format"))
    assert s2.template is s1.template
    f.compile(GrammarSpec("regex", "b"))  # evicts "a" (least recently used)
    assert f.cache_info() == {"size": 2, "max_size": 2}
    assert f.compile(GrammarSpec("regex", "a")) is not a1
    # states are independent copies of the cached template
    c = f.compile(GrammarSpec("regex", "[0-9]+"))
    s, t = f.new_state(c), f.new_state(c)
    s.advance(byte_level.encode("1", add_special_tokens=False)[0])
    assert s.is_accepting() and not t.is_accepting()


def test_state_from_another_factory_is_rejected(byte_level, byte_fallback):
    f1 = ConstraintFactory(byte_level, byte_level.vocab_size)
    f2 = ConstraintFactory(byte_fallback, byte_fallback.vocab_size)
    with pytest.raises(ValueError):
        f2.new_state(f1.compile(GrammarSpec("regex", "a")))


# --------------------------------------------------------------------------- invalid grammars


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
            "response_format",
            "foo",
        ),
        (
            {"grammar": {"type": "json_schema", "value": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}},
            "grammar",
            "nope",
        ),
        (
            {"grammar": {"type": "json_schema", "value": {"type": "integer", "minimum": 5, "maximum": 1}}},
            "grammar",
            "minimum",
        ),
        ({"grammar": {"type": "regex", "value": "[a-"}}, "grammar", "unclosed character class"),
        ({"grammar": {"type": "regex", "value": "(ab"}}, "grammar", "unclosed group"),
        ({"grammar": {"type": "lark", "value": "start: foo"}}, "grammar", "foo"),
        ({"grammar": {"type": "lark", "value": "start: /[/"}}, "grammar", "regex"),
        (
            {"grammar": {"type": "llguidance", "value": {"grammars": [{"lark_grammar": "start: @missing"}]}}},
            "grammar",
            "missing",
        ),
    ],
)
def test_invalid_grammars_raise_one_line_errors(byte_level, body, param, needle):
    f = ConstraintFactory(byte_level, byte_level.vocab_size)
    spec = grammar_from_request(body)
    with pytest.raises(ConstraintError) as exc:
        f.compile(spec)
    err = exc.value
    assert isinstance(err, InvalidRequest) and err.http_status == 400
    assert err.param == param
    msg = str(err)
    assert "\n" not in msg and needle in msg and param in msg
    assert len(msg) < 500


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{oops"}}},
            "response_format",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": ["json_object"]}, "response_format"),
        ({"grammar": {"type": "ebnf", "value": "x"}}, "grammar"),
        ({"grammar": {"type": "regex"}}, "grammar"),
        ({"grammar": {"type": "regex", "value": 5}}, "grammar"),
        ({"grammar": {"type": "lark", "value": "  "}}, "grammar"),
        ({"grammar": {"type": "llguidance", "value": {"no": "grammars"}}}, "grammar"),
        ({"grammar": {"type": "llguidance", "value": "not json"}}, "grammar"),
        ({"grammar": "a+"}, "grammar"),
    ],
)
def test_malformed_request_fields(body, param):
    with pytest.raises(ConstraintError) as exc:
        grammar_from_request(body)
    assert exc.value.param == param
    assert "\n" not in str(exc.value)


# --------------------------------------------------------------------------- request parsing


def test_response_format_and_grammar_are_exclusive():
    with pytest.raises(ConstraintError, match="mutually exclusive") as exc:
        grammar_from_request({"response_format": {"type": "json_object"}, "grammar": {"type": "regex", "value": "a"}})
    assert "grammar" in str(exc.value) and "response_format" in str(exc.value)
    with pytest.raises(ConstraintError, match="mutually exclusive"):  # as upstream, even "text"
        grammar_from_request({"response_format": {"type": "text"}, "grammar": {"type": "regex", "value": "a"}})
    # null fields are absent fields
    assert grammar_from_request({"response_format": None, "grammar": {"type": "regex", "value": "a"}}).kind == "regex"


def test_request_parsing():
    assert grammar_from_request({}) is None
    assert grammar_from_request({"messages": [], "response_format": {"type": "text"}}) is None
    assert grammar_from_request({"grammar": None}) is None
    spec = grammar_from_request({"response_format": {"type": "json_object"}})
    assert spec == GrammarSpec("json_object", {"type": "object"}, "response_format")
    spec = grammar_from_request(
        {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}}
    )
    assert spec.kind == "json_schema" and spec.value == SCHEMA and spec.param == "response_format"
    spec = grammar_from_request(
        {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": json.dumps(SCHEMA)}}}
    )
    assert spec.value == SCHEMA
    spec = grammar_from_request({"grammar": {"type": "json_schema", "value": SCHEMA}})
    assert (spec.kind, spec.param) == ("json_schema", "grammar")
    assert grammar_from_request({"grammar": {"type": "lark", "value": ARITH_LARK}}).value == ARITH_LARK
    spec = grammar_from_request({"grammar": {"type": "llguidance", "value": json.dumps(LLGUIDANCE_GRAMMAR)}})
    assert spec.value == LLGUIDANCE_GRAMMAR
    # key order of a schema is kept in the cache key (it decides the generated field order)
    k1 = GrammarSpec("json_schema", {"a": 1, "b": 2}).key
    k2 = GrammarSpec("json_schema", {"b": 2, "a": 1}).key
    assert k1 != k2
    assert hash(spec) == hash(GrammarSpec("llguidance", {}, "grammar"))  # value is not hashed


def test_python_api_parsing():
    assert grammar_from_python(None, None) is None
    assert grammar_from_python("[0-9]+", "regex") == GrammarSpec("regex", "[0-9]+")
    assert grammar_from_python(json.dumps(SCHEMA), "json_schema").value == SCHEMA
    assert grammar_from_python(ARITH_LARK, "lark").kind == "lark"
    assert grammar_from_python(json.dumps(LLGUIDANCE_GRAMMAR), "llguidance").value == LLGUIDANCE_GRAMMAR
    with pytest.raises(ConstraintError, match="grammar_type"):
        grammar_from_python("a", None)
    with pytest.raises(ConstraintError, match="grammar"):
        grammar_from_python(None, "regex")
    with pytest.raises(ConstraintError, match="must be one of") as exc:
        grammar_from_python("a", "gbnf")
    assert exc.value.param == "grammar_type"
    with pytest.raises(ConstraintError, match="not valid JSON"):
        grammar_from_python("{", "json_schema")


def test_bool_schema_and_json_object_compile(byte_level):
    f = ConstraintFactory(byte_level, byte_level.vocab_size)
    assert f.compile(grammar_from_python("true", "json_schema")).spec.value is True
    outs = random_walks(
        f, GrammarSpec("json_schema", {"type": "array", "items": {"type": "integer"}, "maxItems": 3}), range(5)
    )
    for tokens in outs:
        value = json.loads(byte_level.decode(tokens))
        assert isinstance(value, list) and len(value) <= 3 and all(type(v) is int for v in value)


def test_parallel_default_follows_env_and_cpu_count(monkeypatch):
    monkeypatch.delenv("MISTRALRS_GRAMMAR_THREADS", raising=False)
    monkeypatch.setattr(constraint_masks.os, "cpu_count", lambda: 2)
    assert not constraint_masks._parallel_default()
    monkeypatch.setattr(constraint_masks.os, "cpu_count", lambda: 64)
    assert constraint_masks._parallel_default() and constraint_masks._executor_threads() == 32
    monkeypatch.setenv("MISTRALRS_GRAMMAR_THREADS", "1")
    assert not constraint_masks._parallel_default()
    monkeypatch.setenv("MISTRALRS_GRAMMAR_THREADS", "4")
    assert constraint_masks._parallel_default() and constraint_masks._executor_threads() == 4
