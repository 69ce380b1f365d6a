"""Logprobs in OpenAI's shapes: the engine's `(token_id, logprob, top[, text])` entries as chat
`Logprobs` or legacy-completions parallel lists, and the per-choice collection of entries from
`TokenDelta` events (with the text each token released, so entry texts concatenate to the
output)."""

from __future__ import annotations

from typing import Any, Sequence

from mistralrs.response_types import Logprobs, ResponseLogprob, TopLogprob


def entry_text(tokenizer: Any, entry: Sequence[Any]) -> str:
    """The text of one logprob entry: the text the token released into the output when known
    (4th element, recorded by `collect`/`ChatStream`), else the token decoded alone.

    Using the released text makes the entries' `token` strings concatenate to the content
    exactly, even when a character spans several byte-level tokens or a stop string was cut."""
    if len(entry) > 3 and entry[3] is not None:
        return entry[3]
    return tokenizer.decode([entry[0]], skip_special_tokens=False)


def finite_logprob(value: Any) -> float:
    """A logprob JSON can carry: -inf (a banned token) and NaN become -9999.0, as OpenAI does."""
    value = float(value)
    return value if value > -9999.0 else -9999.0  # also catches NaN (comparisons are False)


def logprobs_of(tokenizer: Any, entries: Sequence[Any]) -> Logprobs:
    """OpenAI chat logprobs from the engine's (token_id, logprob, top[, text]) entries."""
    content = []
    for entry in entries:
        logprob, top = entry[1], entry[2]
        text = entry_text(tokenizer, entry)
        content.append(ResponseLogprob(
            token=text, logprob=finite_logprob(logprob), bytes=list(text.encode("utf-8")),
            top_logprobs=[TopLogprob(int(t), finite_logprob(lp)) for t, lp in top],
        ))
    return Logprobs(content=content)


def with_text(event: Any) -> list[Any]:
    """A TokenDelta's logprob entries with the released text attached (one token per delta,
    which is how the engine emits them; otherwise the tokens are decoded alone)."""
    if len(event.logprobs) == 1:
        return [(*event.logprobs[0][:3], event.text)]
    return list(event.logprobs)


def completion_logprobs(tokenizer: Any, entries: Sequence[Any], *, offset: int = 0) -> dict[str, Any]:
    """Legacy-completions logprobs: parallel lists; `text_offset` is each token's start in the
    choice's text (`offset` = where generated text starts, e.g. after an echoed prompt)."""
    tokens, lps, tops, offsets = [], [], [], []
    for entry in entries:
        text = entry_text(tokenizer, entry)
        tokens.append(text)
        lps.append(finite_logprob(entry[1]))
        tops.append({tokenizer.decode([t], skip_special_tokens=False): finite_logprob(lp) for t, lp in entry[2]})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


class LogprobCollector:
    """Gathers per-choice logprob entries `(token_id, logprob, top, text)` from TokenDeltas.

    Text the engine releases without a token (held back by the detokenizer or a stop-string
    check and flushed when the choice ends) is added to the choice's last entry, so the
    entries' texts always concatenate to the choice's text."""

    def __init__(self) -> None:
        self.entries: dict[int, list[Any]] = {}

    def add(self, event: Any) -> None:
        if event.logprobs:
            self.entries.setdefault(event.index, []).extend(with_text(event))
        elif event.text and self.entries.get(event.index):
            last = self.entries[event.index][-1]
            text = last[3] if len(last) > 3 and last[3] is not None else ""
            self.entries[event.index][-1] = (*last[:3], text + event.text)
