"""Tokenizer loading, incremental detokenization and stop-string matching.

`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` (tokenizer.json) and applies
tokenizer_config.json the way transformers' `AutoTokenizer` (v5, fast backend) does:
named special tokens, `added_tokens_decoder`, `extra_special_tokens` /
`additional_special_tokens` and model-specific `*_token` entries. Like transformers v5
(and the Rust engine), the tokenizer.json post-processor decides whether bos/eos are
added; tokenizer_config.json's `add_bos_token` / `add_eos_token` are ignored when
tokenizer.json exists (the `add_bos_token` / `add_eos_token` setters override it, like
transformers' setters). It must produce the same ids
and strings as transformers for the same files; tests/unit/test_tokenization.py checks it.

`IncrementalDetokenizer` turns a stream of token ids into text deltas (the
vLLM / text-generation-inference "prefix/read offset" algorithm), and
`StopStringMatcher` holds back text that might be the start of a stop string.

This module must not import torch or transformers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from mistralrs.errors import ModelLoadError

__all__ = [
    "IncrementalDetokenizer",
    "StopCheck",
    "StopStringMatcher",
    "Tokenizer",
    "read_json_file",
    "special_tokens_map",
    "token_content",
]

# The named special tokens of transformers' tokenizers, in the order it handles them.
SPECIAL_TOKEN_ATTRIBUTES: tuple[str, ...] = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

_REPLACEMENT_CHAR = "\ufffd"


def read_json_file(path: Path, *, error: type[Exception] = ModelLoadError, what: str = "") -> Any:
    """Read a JSON file; a missing, unreadable or malformed file raises `error` with a
    one-line message naming the file (and line/column for syntax errors)."""
    path = Path(path)
    label = f"{what} " if what else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{label}file {path} not found; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {label}file {path}: {_one_line(exc)}; check the file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(
            f"{label}file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg}); fix or re-download the file"
        ) from None


def token_content(value: Any) -> str | None:
    """The text of a special token as written in tokenizer_config.json: a string, or a
    dict (serialised `AddedToken`) with a "content" key. Anything else gives None."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _config_special_tokens(
    cfg: Mapping[str, Any], where: str, error: type[Exception]
) -> tuple[dict[str, Any], list[Any]]:
    """(named special tokens, extra special tokens) of a tokenizer_config.json, the way
    transformers v5 reads them: the standard names, `extra_special_tokens` (or the older
    `additional_special_tokens`) as a list, or as a dict of model-specific named tokens,
    plus any other "*_token" string entry (e.g. "image_token")."""
    named: dict[str, Any] = {}
    for attr in SPECIAL_TOKEN_ATTRIBUTES:
        value = cfg.get(attr)
        if value is None:
            continue
        if token_content(value) is None:
            raise error(f'{where}: {attr} must be a string or an object with "content", got {value!r}; fix the file')
        named[attr] = value
    extra = cfg.get("extra_special_tokens")
    if extra is None:
        extra = cfg.get("additional_special_tokens")
    extra_list: list[Any] = []
    model_specific: dict[str, Any] = {}
    if isinstance(extra, Mapping):
        model_specific.update(extra)
    elif isinstance(extra, (list, tuple)):
        extra_list = [t for t in extra if token_content(t) is not None]
    elif extra is not None:
        raise error(
            f"{where}: extra_special_tokens must be a list or an object, got {type(extra).__name__}; fix the file"
        )
    auto: dict[str, Any] = {}
    for key, value in cfg.items():
        if (
            key.endswith("_token")
            and key not in SPECIAL_TOKEN_ATTRIBUTES
            and key not in ("extra_special_tokens", "additional_special_tokens")
            and isinstance(value, str)
        ):
            auto[key] = value
    for key, value in {**auto, **model_specific}.items():
        if token_content(value) is not None:
            named[key] = value
    return named, extra_list


def special_tokens_map(cfg: Mapping[str, Any], *, where: str = "tokenizer_config.json") -> dict[str, str]:
    """The named special tokens of a tokenizer_config.json as strings (what transformers
    passes to chat templates as `bos_token`, `eos_token`, ...)."""
    named, _ = _config_special_tokens(cfg, where, ModelLoadError)
    return {k: token_content(v) for k, v in named.items()}  # type: ignore[misc]


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split())


def _added_token(value: Any, *, special: bool | None = None, normalized: bool | None = None):
    """Build a `tokenizers.AddedToken` from a string or a serialised AddedToken dict."""
    from tokenizers import AddedToken

    if isinstance(value, str):
        sp = True if special is None else special
        return AddedToken(value, special=sp, normalized=(not sp) if normalized is None else normalized)
    flags = {
        k: bool(value[k])
        for k in ("single_word", "lstrip", "rstrip", "normalized", "special")
        if k in value and value[k] is not None
    }
    if special is not None and "special" not in flags:
        flags["special"] = special
    return AddedToken(value["content"], **flags)


_GIL_FREE_CHARS = 16384


class Tokenizer:
    """A tokenizer.json + tokenizer_config.json pair, behaving like transformers'
    fast tokenizer for the same files."""

    def __init__(self, backend: Any, config: Mapping[str, Any] | None = None, *, name: str = "tokenizer"):
        self._backend = backend
        self.config: dict[str, Any] = dict(config or {})
        self.name = name
        self._special_tokens: dict[str, str] = {}
        self._extra_special_tokens: list[str] = []
        self._apply_config()
        self._refresh()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (required) and `tokenizer_config.json` (optional) from a
        model directory."""
        directory = Path(path)
        if not directory.is_dir():
            raise ModelLoadError(f"model directory {directory} not found; check the path")
        tokenizer_json = directory / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise ModelLoadError(
                f"{tokenizer_json} not found; the model directory needs a Hugging Face tokenizer.json "
                "(convert a sentencepiece tokenizer.model with transformers first)"
            )
        config_json = directory / "tokenizer_config.json"
        return cls.from_files(tokenizer_json, config_json if config_json.is_file() else None)

    @classmethod
    def from_files(cls, tokenizer_json: str | Path, tokenizer_config_json: str | Path | None = None) -> Tokenizer:
        from tokenizers import Tokenizer as _Backend

        tokenizer_json = Path(tokenizer_json)
        if not tokenizer_json.is_file():
            raise ModelLoadError(f"tokenizer file {tokenizer_json} not found; check the path")
        try:
            backend = _Backend.from_file(str(tokenizer_json))
        except Exception as exc:  # tokenizers raises plain Exception for parse errors
            raise ModelLoadError(
                f"tokenizer file {tokenizer_json} is invalid ({_one_line(exc)}); fix or re-download tokenizer.json"
            ) from None
        config: dict[str, Any] = {}
        if tokenizer_config_json is not None:
            data = read_json_file(Path(tokenizer_config_json), what="tokenizer config")
            if not isinstance(data, dict):
                raise ModelLoadError(
                    f"tokenizer config file {tokenizer_config_json} must hold a JSON object; "
                    "fix or re-download tokenizer_config.json"
                )
            config = data
        return cls(backend, config, name=str(tokenizer_json.parent))

    def _apply_config(self) -> None:
        """Mirror transformers' TokenizersBackend.__init__ + _post_init."""
        cfg = self.config
        backend = self._backend
        where = f"{self.name}/tokenizer_config.json"

        named, extra_list = _config_special_tokens(cfg, where, ModelLoadError)

        # 1. added_tokens_decoder entries, then named/extra specials not yet added
        to_add: list[Any] = []
        decoder = cfg.get("added_tokens_decoder") or {}
        if not isinstance(decoder, Mapping):
            raise ModelLoadError(f"{where}: added_tokens_decoder must be an object; fix the file")

        def _key(item: tuple[str, Any]) -> int:
            try:
                return int(item[0])
            except (TypeError, ValueError):
                raise ModelLoadError(
                    f"{where}: added_tokens_decoder key {item[0]!r} is not a token id; fix the file"
                ) from None

        for _, entry in sorted(decoder.items(), key=_key):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("content"), str):
                raise ModelLoadError(
                    f'{where}: added_tokens_decoder entries need a "content" string, got {entry!r}; fix the file'
                )
            to_add.append(_added_token(entry, special=False))
        existing = {t.content for t in backend.get_added_tokens_decoder().values()}
        queued = {t.content for t in to_add}
        for value in [*named.values(), *extra_list]:
            content = token_content(value)
            if content in existing or content in queued:
                continue
            to_add.append(_added_token(value, special=True))
            queued.add(content)
        if to_add:
            backend.add_tokens(to_add)
        # 2. _post_init: every named / extra special token is added as special
        post = [_added_token(v, special=True, normalized=False) for v in [*named.values(), *extra_list]]
        if post:
            backend.add_special_tokens(post)

        self._special_tokens = {k: token_content(v) for k, v in named.items()}  # type: ignore[misc]
        self._extra_special_tokens = [token_content(v) for v in extra_list]  # type: ignore[misc]

        # 3. add_bos_token / add_eos_token: transformers v5 drops these config entries
        #    whenever tokenizer.json exists (its post-processor decides, as in the Rust
        #    engine), so they are ignored here too. Use the `add_bos_token` /
        #    `add_eos_token` setters to override the post-processor explicitly.

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """Replace the post-processor like transformers' `update_post_processor`."""
        from tokenizers import processors

        bos = self._special_tokens.get("bos_token") or ""
        eos = self._special_tokens.get("eos_token") or ""
        add_bos = add_bos and bool(bos)
        add_eos = add_eos and bool(eos)
        single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
        special = []
        if add_bos:
            special.append((bos, self._backend.token_to_id(bos)))
        if add_eos:
            special.append((eos, self._backend.token_to_id(eos)))
        self._backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    def _refresh(self) -> None:
        added = self._backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        self._added_tokens = {t.content: i for i, t in added.items()}
        self._vocab_size = self._backend.get_vocab_size(with_added_tokens=True)
        self._max_token_chars: int | None = None
        self._model_type = type(self._backend.model).__name__

    # ----------------------------------------------------------------- encoding
    @property
    def backend(self) -> Any:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > _GIL_FREE_CHARS:
            # `encode_batch` releases the GIL (`encode` does not): a long prompt must not stop
            # the server's event loop, or the engine thread, while it is tokenized.
            return list(self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens `text` encodes to, without tokenizing it: no token
        covers more characters than the longest vocabulary entry (4x that here, for normalizers
        that drop characters and unknown-word tokens)."""
        if self._max_token_chars is None:
            self._max_token_chars = max((len(t) for t in self._backend.get_vocab(with_added_tokens=True)), default=1)
        return len(text) // (4 * max(self._max_token_chars, 1))

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [list(e.ids) for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(
        self,
        ids: Iterable[int],
        skip_special_tokens: bool = True,
        *,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = bool(self.config.get("clean_up_tokenization_spaces", False))
        # transformers ignores the clean-up for BPE models (it corrupts their output)
        if clean_up_tokenization_spaces and self._model_type != "BPE":
            text = _clean_up_tokenization(text)
        return text

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self._backend.id_to_token(i) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self._vocab_size

    @property
    def vocab_size(self) -> int:
        """Number of tokens including added tokens (transformers' `len(tokenizer)`)."""
        return self._vocab_size

    # ------------------------------------------------------------ special tokens
    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (bos_token, eos_token, ..., plus model-specific ones such
        as image_token), as transformers exposes them to chat templates."""
        return dict(self._special_tokens)

    @property
    def extra_special_tokens(self) -> list[str]:
        return list(self._extra_special_tokens)

    def _special_id(self, attr: str) -> int | None:
        token = self._special_tokens.get(attr)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special_tokens.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self._special_tokens.get("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of added tokens flagged special: the ones `skip_special_tokens` drops."""
        return self._special_ids

    @property
    def added_tokens(self) -> dict[str, int]:
        """All added tokens (special or not): content -> id."""
        return dict(self._added_tokens)

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` prepends the bos token."""
        bos = self.bos_token_id
        ids = self._backend.encode("", add_special_tokens=True).ids
        return bos is not None and bool(ids) and ids[0] == bos

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        self._set_post_processor(bool(value), self.add_eos_token)

    @property
    def add_eos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` appends the eos token."""
        eos = self.eos_token_id
        ids = self._backend.encode("", add_special_tokens=True).ids
        return eos is not None and bool(ids) and ids[-1] == eos

    @add_eos_token.setter
    def add_eos_token(self, value: bool) -> None:
        self._set_post_processor(self.add_bos_token, bool(value))

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self._vocab_size})"


def _clean_up_tokenization(text: str) -> str:
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


# --------------------------------------------------------------------------- detokenizer
class IncrementalDetokenizer:
    """Turn generated token ids, fed one at a time, into finalised text deltas.

    Uses the prefix/read-offset window of vLLM and text-generation-inference: each step
    decodes only `ids[prefix_offset:]` and `ids[prefix_offset:read_offset]` and emits the
    difference, so the cost per token is bounded by the window (a few tokens), not the
    sequence length. Text that ends in an incomplete UTF-8 sequence (shown by the decoder
    as U+FFFD) is held back until a later token completes it; `flush()` emits whatever is
    left at the end of generation (a genuinely invalid byte then comes out as U+FFFD).

    The concatenation of all deltas plus `flush()` equals
    `tokenizer.decode(all_ids, skip_special_tokens=...)` (without the clean-up of
    tokenization spaces). One exception: a byte-fallback (`<0x..>`) run that turns out
    to be invalid UTF-8 is decoded by `decode()` as one U+FFFD per byte, even for
    characters that were complete before the bad byte arrived; the stream has already
    emitted those characters, and the bad bytes come out as U+FFFD.

    With `prompt_ids`, decoding continues after the prompt, so a leading "▁"
    (sentencepiece) of the first generated token becomes a space as it would inside the
    full text.
    """

    # How many tokens of context to keep before the read offset when starting from a prompt.
    INITIAL_CONTEXT = 6

    def __init__(
        self,
        tokenizer: Tokenizer | Any,
        *,
        skip_special_tokens: bool = True,
        prompt_ids: Sequence[int] | None = None,
    ):
        self._tokenizer = tokenizer
        self._backend = tokenizer.backend if isinstance(tokenizer, Tokenizer) else tokenizer
        self.skip_special_tokens = skip_special_tokens
        if isinstance(tokenizer, Tokenizer):
            self._skip: frozenset[int] = tokenizer.special_ids if skip_special_tokens else frozenset()
        else:
            added = self._backend.get_added_tokens_decoder()
            self._skip = frozenset(i for i, t in added.items() if t.special) if skip_special_tokens else frozenset()
        # Skipped special tokens never reach the window: decoding with them filtered out
        # is what `decode(skip_special_tokens=True)` does, and it keeps window starts on
        # real tokens (decoders such as Strip/Metaspace treat the first token specially).
        context = [i for i in (prompt_ids or ()) if i not in self._skip][-self.INITIAL_CONTEXT :]
        self._ids: list[int] = list(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._num_fed = 0
        self._text_parts: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=False)

    def step(self, token_id: int) -> str:
        """Feed one token id; return the newly finalised text (possibly "")."""
        self._num_fed += 1
        if token_id in self._skip:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT_CHAR):
            delta = new_text[len(prefix_text) :]
            self._advance()
            self._text_parts.append(delta)
            return delta
        return ""

    def _advance(self) -> None:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # Drop ids that can never be decoded again, so memory stays bounded as well.
        if self._prefix_offset > 64:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    __call__ = step

    def feed(self, token_ids: Iterable[int]) -> str:
        """Feed several ids; return the concatenated deltas."""
        return "".join(self.step(t) for t in token_ids)

    def flush(self) -> str:
        """Emit held-back text (e.g. a trailing incomplete byte sequence as U+FFFD)."""
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        delta = new_text[len(prefix_text) :]
        self._advance()
        if delta:
            self._text_parts.append(delta)
        return delta

    @property
    def pending(self) -> bool:
        """True if some fed tokens have not been turned into text yet."""
        return self._read_offset < len(self._ids)

    @property
    def num_tokens(self) -> int:
        return self._num_fed

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._text_parts)


# --------------------------------------------------------------------------- stop strings
class StopCheck(NamedTuple):
    text: str
    """Text that is safe to emit now."""
    stopped: bool
    """True once a stop string was found (generation should end)."""


class StopStringMatcher:
    """Streaming stop-string detection over text deltas.

    `feed(delta)` returns `StopCheck(text, stopped)`: `text` is safe to send to the
    client; a suffix that could still become (the start of) a stop string is held back
    until decided. On a match everything before the *earliest-starting* stop string is
    emitted and `stopped` is True; the stop string itself (and anything after it) is
    never emitted unless `include_stop_str=True`, in which case the stop string is
    emitted too. `flush()` returns the held-back text at the end of generation (cut at a
    stop string if one is complete in it).

    The emitted text always equals the full text truncated before its first stop-string
    occurrence, however the text is split into deltas.
    """

    def __init__(self, stop_strings: Iterable[str] | str | None, *, include_stop_str: bool = False):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        seen: dict[str, None] = {}
        for s in stop_strings or ():
            if not isinstance(s, str):
                raise TypeError(f"stop strings must be str, got {type(s).__name__}")
            if s:
                seen[s] = None
        self.stop_strings: tuple[str, ...] = tuple(seen)
        self.include_stop_str = include_stop_str
        self._max_len = max((len(s) for s in self.stop_strings), default=0)
        self._buffer = ""
        self.stopped = False
        self.stop_string: str | None = None
        """The stop string that matched, once `stopped`."""

    def _earliest_match(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in self.stop_strings:
            i = text.find(s)
            if i != -1 and (best is None or i < best[0] or (i == best[0] and len(s) < len(best[1]))):
                best = (i, s)
        return best

    def _earliest_partial(self, text: str) -> int | None:
        """Earliest index i such that text[i:] is a proper prefix of some stop string."""
        n = len(text)
        for i in range(max(0, n - self._max_len + 1), n):
            tail = text[i:]
            for s in self.stop_strings:
                if len(s) > len(tail) and s.startswith(tail):
                    return i
        return None

    def _stop_at(self, index: int, stop: str) -> StopCheck:
        end = index + len(stop) if self.include_stop_str else index
        out = self._buffer[:end]
        self._buffer = ""
        self.stopped = True
        self.stop_string = stop
        return StopCheck(out, True)

    def feed(self, delta: str) -> StopCheck:
        if self.stopped:
            return StopCheck("", True)
        if not self.stop_strings:
            return StopCheck(delta, False)
        buf = self._buffer + delta
        self._buffer = buf
        match = self._earliest_match(buf)
        partial = self._earliest_partial(buf)
        if match is not None and (partial is None or partial >= match[0]):
            return self._stop_at(*match)
        # Emit up to where a stop string could still start (a longer stop string that
        # starts before a complete match may still complete, so the match must wait).
        cut = len(buf) if partial is None else partial
        out, self._buffer = buf[:cut], buf[cut:]
        return StopCheck(out, False)

    __call__ = feed

    def flush(self) -> str:
        """End of generation: return the held-back text (cut before a complete stop string)."""
        if self.stopped:
            return ""
        buf, self._buffer = self._buffer, ""
        match = self._earliest_match(buf)
        if match is not None:
            self._buffer = buf
            return self._stop_at(*match).text
        return buf

    @property
    def held(self) -> str:
        """Text currently held back."""
        return self._buffer
