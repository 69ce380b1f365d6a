"""Per-request sampling parameters and the ranges the API accepts for them.

`SamplingParams` is what the sampler reads; it refuses values that cannot be sampled with
(non-finite numbers, a repetition penalty <= 0). `FIELD_BOUNDS` is the one table of the
documented ranges: the HTTP/Python API validates request fields with it (a 400 naming the
field) and the OpenAPI document is written from it, so the two cannot disagree.
No torch here: validating a request does not need it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

GREEDY_EPS = 1e-7
"""Temperatures below this (including 0 and negatives) mean greedy decoding."""
MAX_TOP_LOGPROBS = 20


# --------------------------------------------------------------------------- API ranges


@attrs.frozen
class Bounds:
    """The accepted values of one numeric request field."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is excluded
    integer: bool = False

    def problem(self, value: Any) -> str | None:
        """Why `value` is not accepted (a phrase such as "must be a number"), or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.integer and not isinstance(value, int)):
            return "must be an integer" if self.integer else "must be a number"
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        low_ok = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        if low_ok and (self.hi is None or value <= self.hi):
            return None
        return f"must be {self.describe()}"

    def describe(self) -> str:
        lo = None if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is None:
            return lo or "a number"
        if lo is None:
            return f"<= {self.hi:g}"
        if self.lo_open:
            return f"{lo} and <= {self.hi:g}"
        return f"between {self.lo:g} and {self.hi:g}"

    def schema(self) -> dict[str, Any]:
        """The JSON-schema fragment (OpenAPI 3.1) for this range."""
        out: dict[str, Any] = {"type": "integer" if self.integer else "number"}
        if self.lo is not None:
            out["exclusiveMinimum" if self.lo_open else "minimum"] = self.lo
        if self.hi is not None:
            out["maximum"] = self.hi
        return out


FIELD_BOUNDS: dict[str, Bounds] = {
    "temperature": Bounds(0, 2),
    "top_k": Bounds(integer=True),
    "top_p": Bounds(0, 1),
    "min_p": Bounds(0, 1),
    # Past 100 a penalty changes nothing more, and a huge one overflows float32.
    "repetition_penalty": Bounds(0, 100, lo_open=True),
    "frequency_penalty": Bounds(-2, 2),
    "presence_penalty": Bounds(-2, 2),
    "dry_multiplier": Bounds(0, 100),
    "dry_base": Bounds(1, 100),
    "dry_allowed_length": Bounds(0, integer=True),
    "top_logprobs": Bounds(0, MAX_TOP_LOGPROBS, integer=True),
    "seed": Bounds(integer=True),
}
"""The documented range of every numeric sampling field of a request."""

LOGIT_BIAS_BOUNDS = Bounds(-100, 100)


# --------------------------------------------------------------------------- params


def _bias_converter(value: Any) -> tuple[tuple[int, float], ...]:
    """Accept {token: bias} (keys may be strings, as in OpenAI JSON) or (token, bias) pairs."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    return tuple((int(token), float(bias)) for token, bias in items)


def _breakers_converter(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _check_top_logprobs(_inst: Any, _attr: Any, value: int) -> None:
    if not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {value}")


def _check_repetition_penalty(_inst: Any, attr: Any, value: float | None) -> None:
    _finite(_inst, attr, value)
    if value is not None and not value > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {value}")


def _finite(_inst: Any, attr: Any, value: float | None) -> None:
    # NaN passes every comparison test, so it would reach the sampler and break the step.
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{attr.name} must be a finite number, got {value}")


def _check_dry_base(_inst: Any, attr: Any, value: float) -> None:
    _finite(_inst, attr, value)
    if value < 1:
        raise ValueError(f"dry_base must be >= 1, got {value}")


def _check_bias(_inst: Any, _attr: Any, value: tuple[tuple[int, float], ...]) -> None:
    for token, bias in value:
        if token < 0 or not math.isfinite(bias):
            raise ValueError(f"logit_bias needs token ids >= 0 and finite biases, got {token}: {bias}")


_DEFAULTED = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
_SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p")


@attrs.frozen(kw_only=True)
class SamplingParams:
    """Per-request sampling parameters. None means "use the model default" (see `with_defaults`)."""

    temperature: float | None = attrs.field(default=None, validator=_finite)
    """None -> generation_config, else 1.0; below 1e-7 (0 included) -> greedy."""
    top_k: int | None = None
    """<= 0 (or >= vocab size) disables; 1 -> greedy."""
    top_p: float | None = attrs.field(default=None, validator=_finite)
    """Outside (0, 1) disables."""
    min_p: float | None = attrs.field(default=None, validator=_finite)
    """Outside (0, 1) disables. Keeps tokens with p > min_p * max p (strict, as mistral.rs)."""
    repetition_penalty: float | None = attrs.field(default=None, validator=_check_repetition_penalty)
    """llama.cpp style over prompt + output tokens: positive logits /= p, others *= p. 1.0 off."""
    frequency_penalty: float = attrs.field(default=0.0, validator=_finite)
    """logit -= count(token in the generated output) * frequency_penalty."""
    presence_penalty: float = attrs.field(default=0.0, validator=_finite)
    """logit -= presence_penalty if the token appears in the generated output."""
    dry_multiplier: float = attrs.field(default=0.0, validator=_finite)
    """DRY strength; 0 disables DRY."""
    dry_base: float = attrs.field(default=1.75, validator=_check_dry_base)
    dry_allowed_length: int = 2
    dry_sequence_breakers: tuple[str, ...] = attrs.field(default=("\n", ":", '"', "*"), converter=_breakers_converter)
    logit_bias: tuple[tuple[int, float], ...] = attrs.field(default=(), converter=_bias_converter,
                                                            validator=_check_bias)
    """(token_id, bias) pairs added to the logits; a dict {token_id: bias} is accepted too."""
    seed: int | None = None
    """Per-request seed: the same tokens whatever else is in the batch."""
    logprobs: bool = False
    top_logprobs: int = attrs.field(default=0, validator=_check_top_logprobs)
    """0..20 most likely tokens to report with their logprobs (implies logprobs)."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingParams:
        """Build from a mapping (e.g. request fields); None values mean "not set", unknown keys
        are ignored, `logit_bias` may be a {token_id: bias} dict with string keys."""
        names = {a.name for a in attrs.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names and v is not None}
        return cls(**kwargs)

    def with_defaults(self, defaults: Any) -> SamplingParams:
        """Fill the unset (None) temperature/top_k/top_p/min_p/repetition_penalty from
        `defaults` (e.g. a `GenerationDefaults`; any attribute may be missing or None).

        When `defaults.do_sample` is False (generation_config.json asks for greedy decoding,
        which transformers honours), its temperature/top_k/top_p/min_p are ignored and an
        unset temperature becomes 0 (greedy)."""
        if defaults is None:
            return self
        greedy_default = getattr(defaults, "do_sample", None) is False
        changes: dict[str, Any] = {}
        for name in _DEFAULTED:
            if getattr(self, name) is not None:
                continue
            if greedy_default and name in _SAMPLING_ONLY:
                continue
            value = getattr(defaults, name, None)
            if value is not None:
                changes[name] = value
        if greedy_default and self.temperature is None:
            changes["temperature"] = 0.0
        return attrs.evolve(self, **changes) if changes else self

    @property
    def is_greedy(self) -> bool:
        return (self.temperature is not None and self.temperature < GREEDY_EPS) or self.top_k == 1

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    @property
    def uses_penalties(self) -> bool:
        return bool(
            self.dry_multiplier != 0
            or self.frequency_penalty != 0
            or self.presence_penalty != 0
            or (self.repetition_penalty is not None and self.repetition_penalty != 1.0)
            or self.logit_bias
        )
