"""A sequence: one choice of one request, as the scheduler and the model runner see it."""

from __future__ import annotations

import enum
import itertools
from typing import Any

import attrs


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@attrs.define(eq=False)
class Sequence:
    request: Any = attrs.field(repr=False)  # the engine's request state (owns sampling params, stop criteria, output sink)
    prompt_ids: list[int]
    index: int = 0  # choice index within the request
    id: int = attrs.field(factory=lambda: next(_ids))
    output_ids: list[int] = attrs.field(factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    blocks: list[int] = attrs.field(factory=list)
    hashes: list[int] = attrs.field(factory=list)  # chained hashes of full blocks, computed lazily
    registered_blocks: int = 0  # full blocks already published to the prefix cache
    state_slot: int | None = None  # recurrent-state slot while running (models with recurrent layers)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    computed_total: int = 0  # tokens actually run through the model (for metrics/tests)
    preemptions: int = 0
    finish_reason: str | None = None
    params: Any = attrs.field(default=None, repr=False)  # SamplingParams
    sampling_state: Any = attrs.field(default=None, repr=False)
    detok: Any = attrs.field(default=None, repr=False)
    stopper: Any = attrs.field(default=None, repr=False)
    constraint: Any = attrs.field(default=None, repr=False)  # constraints.ConstraintState
    text: str = ""
    logprobs: list[Any] = attrs.field(factory=list)
    arrival: float = 0.0
    first_token_time: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the KV cache (the whole prompt at first, then 1 per decode step)."""
        return len(self) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
