"""A Hugging Face `tokenizers.Tokenizer` rebuilt from a GGUF file's tokenizer metadata.

    gt = tokenizer_from_gguf(gguf_file.metadata, source=str(path))
    gt.tokenizer.encode("Hello").ids, gt.eos_token_ids, gt.chat_template
    Tokenizer(gt.tokenizer, gt.tokenizer_config())   # mistralrs.tokenization.Tokenizer
    gt.to_hf_files(directory)                        # tokenizer.json + tokenizer_config.json

A GGUF carries no tokenizer.json: llama.cpp's converter stores the vocabulary
(`tokenizer.ggml.tokens`, `.scores`, `.token_type`), the BPE merges (`.merges`), the special
token ids, and a tokenizer family (`tokenizer.ggml.model`) plus, for byte-level BPE, the name
of the pre-tokenizer (`tokenizer.ggml.pre`). This module runs that conversion backwards, so
the result tokenizes like llama.cpp does on the same file (and like the original HF tokenizer
wherever llama.cpp does):

- ``llama`` (SentencePiece BPE: Llama 1/2, Mistral, Phi-3, Gemma 1-3 ...): a BPE model with
  byte fallback whose merges are recovered from the vocabulary the way transformers'
  SentencePiece converters do it -- every split of a piece into two pieces is a merge, ranked
  by the piece's score, best first (by id when the file has no usable scores). That is the
  merge order llama.cpp's own SentencePiece tokenizer follows. Normalizer: " " -> "▁", with a
  "▁" prepended to every text segment (as llama.cpp does, also after a special token) unless
  `tokenizer.ggml.add_space_prefix` is false (Gemma).
- ``gemma4`` (SentencePiece-style BPE with merges, on raw UTF-8): spaces -> "▁", newline runs
  split off, byte fallback to ``<0xXX>``.
- ``gpt2`` (byte-level BPE: Llama 3, Qwen, DeepSeek, StarCoder, GPT-2 ...): vocabulary and
  merges as stored, the split regexes llama.cpp uses for `tokenizer.ggml.pre` (see `PRE_TOKENIZERS`)
  followed by the byte-level mapping, and `ignore_merges` where llama.cpp sets it.
- ``bert`` (WordPiece): llama.cpp's "▁word / suffix" spelling turned back into "word / ##suffix".

Token types decide the added tokens: CONTROL and UNKNOWN tokens become special added tokens,
USER_DEFINED ones plain added tokens (matched whole, before the model runs, and shown when
decoding); BYTE tokens ``<0xXX>`` stay in the vocabulary for byte fallback. A file that embeds
its tokenizer.json (`tokenizer.huggingface.json`) is used as is.

Anything else -- no tokenizer metadata, an unknown family -- is a one-line `ModelLoadError`
pointing at ``--tok-model-id`` (take the tokenizer from a Hugging Face repository instead).

Runtime dependencies: `tokenizers`, attrs, numpy and the standard library only.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from mistralrs.errors import ModelLoadError

__all__ = [
    "PRE_TOKENIZERS",
    "GgufTokenizer",
    "tokenizer_from_gguf",
]

log = logging.getLogger("mistralrs.gguf")

# llama.cpp's token types (llama.h `llama_token_type`), as stored in tokenizer.ggml.token_type.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_SPIECE = "\u2581"  # "▁", SentencePiece's visible space

_FIX = "pass --tok-model-id <Hugging Face repo> to take the tokenizer from the original model instead"

# ---------------------------------------------------------------------------------------------
# Pre-tokenizers: llama.cpp's `llm_tokenizer_bpe` regex lists (src/llama-vocab.cpp), per
# `tokenizer.ggml.pre`. llama.cpp applies the expressions of a list one after the other, each
# splitting the pieces the previous one left (matches and the text between them both become
# pieces) -- exactly a sequence of `Split(..., behavior="isolated")`. Where llama.cpp rewrote an
# expression for std::regex (`(?:'[sS]|...)` for `(?i:'s|...)`, look-ahead tricks for \p{Lu} /
# \p{Ll}) the original from the model's tokenizer.json is used, as llama.cpp's comments give it;
# llama.cpp runs its own code for the GPT-2, Llama 3 and Qwen 2 expressions, which implements
# these originals.

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_JAIS2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
    r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_LLM = (  # non-ASCII written as escapes: several of these code points change under NFC
    "[\r\n]",
    r"\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376"
    r"\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    r"\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    r"\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    r"\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
    r"\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    r"\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
    r"\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    r"\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\x{10400}-\x{1044f}\x{104b0}-\x{104d3}\x{104d8}-\x{104fb}"
    r"\x{10c80}-\x{10cb2}\x{10cc0}-\x{10cf2}\x{118a0}-\x{118df}\x{1e900}-\x{1e943}]+",
    r"\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    r"[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    r"\p{N}+",
)
_DEEPSEEK3_LLM = (
    r"\p{N}{1,3}",
    r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_SPARK2_5 = (
    r"\p{N}{1,3}",
    r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]"
    r"|\s+(?!\S)|\s+",
    r"\p{N}",
)
_CASED_WORDS = (  # GPT-4o / Tekken style: an upper-case run then a lower-case run is one word
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+{c}"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*{c}"
)
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (
    _CASED_WORDS.replace("{c}", _CONTRACTIONS)
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = _CASED_WORDS.replace("{c}", "") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_YOUTU = (
    r"[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c\u3001-\u303f"
    r"\ufe30-\ufe4f]+|[\u3105-\u312f]+|[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    _CASED_WORDS.replace("{c}", _CONTRACTIONS) + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_GRANITE_EMB_MULTI = (  # no original given: llama.cpp's expression as is
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PORO = r" ?[^(\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_CHAMELEON = (
    "<sentinel:[0-9]+>",
    "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
    "([\t\n]|    |  )",
    r"\p{N}",
    r"[\p{P}!-/:-@\[-`{-~]",
    _GPT2,
)
_BAILINGMOE = (  # the original, possessive quantifiers included (Oniguruma has them; std::regex does not)
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)
_SEED_CODER = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UFAKZEKA = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_EXAONE_MOE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"
)
_MINICPM5 = (
    r"\p{N}{1,3}",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_NEWLINES = "[^\n]+|[\n]+"
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")


@attrs.frozen
class PreTokenizer:
    """One llama.cpp pre-tokenizer type: its split expressions, in order, and its flags."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is a whole vocabulary entry is not merged
    add_bos: bool | None = None  # llama.cpp's add_bos default for this type (None: the family's)
    byte_level: bool = True  # False: SentencePiece-style BPE on raw UTF-8 ("▁" spaces, <0xXX> fallback)


def _pre(*regexes: str, **flags: Any) -> PreTokenizer:
    return PreTokenizer(tuple(regexes), **flags)


_P_DEFAULT = _pre(*_DEFAULT)
_P_GPT2 = _pre(_GPT2)
_P_LLAMA3 = _pre(_LLAMA3, ignore_merges=True, add_bos=True)
_P_QWEN2 = _pre(_QWEN2)
_P_STARCODER = _pre(r"\p{N}", _GPT2)
_P_GPT4O = _pre(_GPT4O)
_P_CHATGLM4 = _pre(_LLAMA3)
_P_DEEPSEEK3 = _pre(*_DEEPSEEK3_LLM)
_P_SPM_BPE = _pre(_NEWLINES, byte_level=False)

# `tokenizer.ggml.pre` -> pre-tokenizer, following llama.cpp's `llama_vocab::impl::load`.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _P_DEFAULT,
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"),
        _P_LLAMA3,
    ),
    "dbrx": _pre(_LLAMA3),
    "smaug-bpe": _pre(_LLAMA3),
    "jais-2": _pre(_JAIS2),
    "deepseek-llm": _pre(*_DEEPSEEK_LLM),
    "deepseek-coder": _pre("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}"),
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), _P_DEEPSEEK3),
    "spark2_5": _pre(*_SPARK2_5),
    "youtu": _pre(*_YOUTU, ignore_merges=True),
    "falcon": _pre(r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"),
    **dict.fromkeys(
        ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"),
        _P_STARCODER,
    ),
    **dict.fromkeys(
        (
            "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
            "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "exaone4", "mpt", "olmo", "jais",
            "trillion", "granite-docling",
        ),
        _P_GPT2,
    ),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open", "grok-2"),
        _P_QWEN2,
    ),
    "qwen35": _pre(_QWEN35),
    **dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), _pre(_PORO)),
    "chatglm-bpe": _P_CHATGLM4,
    "glm4": _pre(_LLAMA3, ignore_merges=True),
    "glm5": _pre(_LLAMA3, ignore_merges=True),
    "viking": _pre(_PORO, r"\p{N}"),
    "tekken": _pre(_TEKKEN, ignore_merges=True, add_bos=True),
    "chameleon": _pre(*_CHAMELEON, add_bos=True),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _P_GPT4O),
    "granite-embed-multi-97m": _pre(_GRANITE_EMB_MULTI, ignore_merges=True),
    **dict.fromkeys(("tiny_aya", "cohere2moe"), _pre(r"\d{1,3}(?=(?:\d{3})*\b)", _GPT4O)),
    "superbpe": _pre(r"\p{N}+", r"(?=(\d{3})+(?!\d))"),
    **dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), _pre(_BAILINGMOE)),
    "seed-coder": _pre(_SEED_CODER),
    "ufakzeka": _pre(_UFAKZEKA),
    "laguna": _pre(_NEWLINES, _QWEN2),
    "exaone-moe": _pre(_EXAONE_MOE),
    "minicpm5": _pre(*_MINICPM5, ignore_merges=True),
    **dict.fromkeys(("gemma4", "granite-embed-multi-311m", "sarvam-moe"), _P_SPM_BPE),
}

# llama.cpp's per-token-text overrides of end-of-generation (llama-vocab.cpp, "special_eog_ids").
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
})

# The named special tokens: (tokenizer_config.json key, GGUF metadata key).
_NAMED_TOKENS = (
    ("bos_token", "tokenizer.ggml.bos_token_id"),
    ("eos_token", "tokenizer.ggml.eos_token_id"),
    ("unk_token", "tokenizer.ggml.unknown_token_id"),
    ("pad_token", "tokenizer.ggml.padding_token_id"),
    ("sep_token", "tokenizer.ggml.seperator_token_id"),
    ("cls_token", "tokenizer.ggml.cls_token_id"),
    ("mask_token", "tokenizer.ggml.mask_token_id"),
)


# ---------------------------------------------------------------------------------------------
@attrs.define(kw_only=True, eq=False)
class GgufTokenizer:
    """The tokenizer of a GGUF file, plus what tokenizer_config.json would have said."""

    tokenizer: Any  # tokenizers.Tokenizer
    model: str  # tokenizer.ggml.model
    pre: str | None = None  # tokenizer.ggml.pre
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    eos_token_ids: list[int] = attrs.field(factory=list)  # eos, then eot / eom when the file names them
    eog_token_ids: list[int] = attrs.field(factory=list)  # llama.cpp's end-of-generation set (by token text too)
    unk_token_id: int | None = None
    pad_token_id: int | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    chat_template: str | None = None
    chat_templates: dict[str, str] = attrs.field(factory=dict)  # named ones: tokenizer.chat_template.<name>
    special_tokens: dict[str, str] = attrs.field(factory=dict)  # bos_token, eos_token, ... -> text
    model_max_length: int | None = None

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def unk_token(self) -> str | None:
        return self.special_tokens.get("unk_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    def tokenizer_config(self) -> dict[str, Any]:
        """The tokenizer_config.json for `tokenizer` (what `mistralrs.tokenization.Tokenizer`
        and transformers read next to a tokenizer.json)."""
        added = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self.tokenizer.get_added_tokens_decoder().items())
        }
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": added,
            **self.special_tokens,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_templates:
            default = {"default": self.chat_template} if self.chat_template is not None else {}
            config["chat_template"] = [{"name": k, "template": v} for k, v in {**default, **self.chat_templates}.items()]
        elif self.chat_template is not None:
            config["chat_template"] = self.chat_template
        if self.model_max_length:
            config["model_max_length"] = self.model_max_length
        return config

    def to_hf_files(self, directory: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json into `directory` (created if
        needed); returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(
            json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False), encoding="utf-8"
        )
        return directory


# ---------------------------------------------------------------------------------------------
def tokenizer_from_gguf(metadata: Mapping[str, Any], *, source: str = "GGUF file") -> GgufTokenizer:
    """Build the tokenizer a GGUF file's metadata describes (see the module docstring).
    `metadata` maps GGUF keys to plain values; arrays may be lists or numpy arrays."""
    model = metadata.get("tokenizer.ggml.model")
    tokens_raw = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(model, str) or not model or tokens_raw is None or len(tokens_raw) == 0:
        missing = "tokenizer.ggml.model" if not isinstance(model, str) or not model else "tokenizer.ggml.tokens"
        raise ModelLoadError(f"{source} carries no tokenizer (no {missing} metadata); {_FIX}")
    if model in ("none", "no_vocab"):
        raise ModelLoadError(f"{source} has no vocabulary (tokenizer.ggml.model is {model!r}); {_FIX}")
    builder = _BUILDERS.get(model)
    if builder is None:
        raise ModelLoadError(
            f"{source}: tokenizer family {model!r} (tokenizer.ggml.model) is not supported "
            f"(supported: {', '.join(sorted(_BUILDERS))}); {_FIX}"
        )
    gc_was_enabled = gc.isenabled()
    gc.disable()  # hundreds of thousands of small tuples: the cyclic collector only slows this down
    try:
        return _build(metadata, model, builder, source)
    finally:
        if gc_was_enabled:
            gc.enable()


def _build(metadata: Mapping[str, Any], model: str, builder: Any, source: str) -> GgufTokenizer:
    vocab = _Vocab.read(metadata, source)
    pre = metadata.get("tokenizer.ggml.pre")
    pre = pre if isinstance(pre, str) and pre else None

    embedded = metadata.get("tokenizer.huggingface.json")
    if isinstance(embedded, str) and embedded.strip():
        backend = _from_embedded_json(embedded, source)
        add_bos, add_eos = _add_flags(metadata, model, pre)
        return _finish(backend, vocab, metadata, model, pre, add_bos, add_eos, embedded=True)
    backend, add_bos, add_eos = builder(vocab, metadata, pre, source)
    return _finish(backend, vocab, metadata, model, pre, add_bos, add_eos, embedded=False)


# ---------------------------------------------------------------------------------------------
class _Vocab:
    """tokens / types / scores of the file, checked; `ids` (text -> id) built once."""

    def __init__(self, tokens: list[str], types: list[int], scores: Any) -> None:
        self.tokens = tokens
        self.types = types
        self.scores = scores  # numpy float array or None
        self._ids: dict[str, int] | None = None

    @property
    def ids(self) -> dict[str, int]:
        if self._ids is None:
            self._ids = {t: i for i, t in enumerate(self.tokens)}
        return self._ids

    def of_types(self, *types: int) -> list[int]:
        import numpy as np

        return np.flatnonzero(np.isin(np.asarray(self.types), types)).tolist()

    @classmethod
    def read(cls, metadata: Mapping[str, Any], source: str) -> _Vocab:
        import numpy as np

        raw = metadata["tokenizer.ggml.tokens"]
        tokens = list(raw)
        if set(map(type, tokens)) != {str}:
            tokens = [t if isinstance(t, str) else bytes(t).decode("utf-8", "replace") for t in tokens]
        n = len(tokens)
        ids = {t: i for i, t in enumerate(tokens)}
        if len(ids) != n or "" in ids:
            # llama.cpp renames empty tokens; a duplicate would make the id <-> text map ambiguous.
            seen: set[str] = set()
            for i, t in enumerate(tokens):
                if not t or t in seen:
                    name = f"[EMPTY_{i}]" if not t else f"[DUPLICATE_{i}]"
                    log.warning("%s: token %d %r renamed to %r", source, i, t, name)
                    tokens[i] = t = name
                seen.add(t)
            ids = {t: i for i, t in enumerate(tokens)}
        types_raw = metadata.get("tokenizer.ggml.token_type")
        if types_raw is None:
            types = [TOKEN_NORMAL] * n
        else:
            types = np.asarray(types_raw, dtype=np.int64).ravel().tolist()
            if len(types) < n:
                raise ModelLoadError(
                    f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens; the file is damaged"
                )
            types = types[:n]
        scores_raw = metadata.get("tokenizer.ggml.scores")
        scores = None
        if scores_raw is not None:
            scores = np.asarray(scores_raw, dtype=np.float64).ravel()
            if len(scores) < n:
                raise ModelLoadError(
                    f"{source}: tokenizer.ggml.scores has {len(scores)} entries for {n} tokens; the file is damaged"
                )
            scores = scores[:n]
        vocab = cls(tokens, types, scores)
        vocab._ids = ids
        return vocab


def _token_id(metadata: Mapping[str, Any], key: str, n: int, default: int | None = None) -> int | None:
    value = metadata.get(key)
    if value is None:
        return default if default is not None and 0 <= default < n else None
    try:
        value = int(value)
    except (TypeError, ValueError):
        return None
    return value if 0 <= value < n else (default if default is not None and 0 <= default < n else None)


def _flag(metadata: Mapping[str, Any], key: str, default: bool) -> bool:
    value = metadata.get(key)
    return bool(value) if value is not None else default


def _add_flags(metadata: Mapping[str, Any], model: str, pre: str | None) -> tuple[bool, bool]:
    """add_bos / add_eos: the file's flags, else llama.cpp's defaults for the family."""
    if model == "llama":
        bos, eos = True, False
    elif model == "bert":
        bos, eos = True, False
    elif model == "t5":
        bos, eos = False, True
    else:
        spec = PRE_TOKENIZERS.get(pre or "default")
        bos, eos = bool(spec is not None and spec.add_bos), False
    bos = _flag(metadata, "tokenizer.ggml.add_bos_token", bos)
    eos = _flag(metadata, "tokenizer.ggml.add_eos_token", eos)
    if model == "gemma4" or pre == "gemma4":
        bos = True  # llama.cpp forces it (ggml-org/llama.cpp#21500)
    return bos, eos


def _from_embedded_json(text: str, source: str) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises plain Exception
        raise ModelLoadError(
            f"{source}: the embedded tokenizer.huggingface.json is invalid ({' '.join(str(exc).split())}); {_FIX}"
        ) from None


def _added_tokens(vocab: _Vocab, metadata: Mapping[str, Any], promote: set[int]) -> list[Any]:
    """CONTROL / UNKNOWN tokens (and `promote`) as special added tokens, USER_DEFINED ones
    as plain added tokens, all matched on the raw text (llama.cpp's `tokenizer_st_partition`)."""
    from tokenizers import AddedToken

    name = str(metadata.get("general.name") or "").lower()
    phi3 = "phi-3" in name or "phi3" in name  # llama.cpp strips spaces right of Phi-3's special tokens
    out = []
    wanted = vocab.of_types(TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED)
    extra = {i for i in promote if vocab.types[i] in (TOKEN_NORMAL, TOKEN_UNUSED)}
    for i in sorted({*wanted, *extra}):
        text, kind = vocab.tokens[i], vocab.types[i]
        if i in extra:
            kind = TOKEN_CONTROL
        if text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            kind = TOKEN_USER_DEFINED  # llama.cpp always renders gpt-oss' channel markers
        rstrip = phi3 and (text == "</s>" or text not in ("<unk>", "<s>", "<|endoftext|>"))
        out.append((i, AddedToken(text, special=kind != TOKEN_USER_DEFINED, normalized=False, rstrip=rstrip)))
    return [t for _, t in out]


def _post_processor(backend: Any, add_bos: bool, add_eos: bool, bos: str | None, eos: str | None,
                    byte_level: bool = False, bert_pairs: bool = False) -> Any:
    from tokenizers import processors

    add_bos = add_bos and bos is not None
    add_eos = add_eos and eos is not None
    steps: list[Any] = [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    if add_bos or add_eos:
        b, e = bos or "", eos or ""
        single = f"{(b + ':0 ') if add_bos else ''}$A:0{(' ' + e + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + b + ':1') if add_bos and not bert_pairs else ''} $B:1{(' ' + e + ':1') if add_eos else ''}"
        specials = []
        if add_bos:
            specials.append((bos, backend.token_to_id(bos)))
        if add_eos and eos != bos:
            specials.append((eos, backend.token_to_id(eos)))
        steps.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials))
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else processors.Sequence(steps)


# ---------------------------------------------------------------------------------------------
# SentencePiece BPE ("llama")

_GEMMA_ARCHS = frozenset({"gemma", "gemma2", "gemma3", "gemma3n", "gemma-embedding", "codegemma", "recurrentgemma"})


def _spm_merges(vocab: _Vocab) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces of the vocabulary is a merge (transformers'
    `generate_merges`); best first: by the piece's score, highest first, then by piece id,
    then longer left part first. Without usable scores (all equal: files converted from a
    tokenizer.json), the piece id alone ranks them."""
    import numpy as np

    ids = vocab.ids
    tokens = vocab.tokens
    scores = vocab.scores
    if scores is not None and len(scores) > 0 and bool((scores != scores[0]).any()):
        order = np.lexsort((np.arange(len(tokens)), -scores)).tolist()  # score descending, then id
    else:
        order = range(len(tokens))
    merges: list[tuple[str, str]] = []
    append = merges.append
    for i in order:
        piece = tokens[i]
        for k in range(len(piece) - 1, 0, -1):
            if piece[:k] in ids and piece[k:] in ids:
                append((piece[:k], piece[k:]))
    return merges


def _build_spm(vocab: _Vocab, metadata: Mapping[str, Any], pre: str | None, source: str) -> tuple[Any, bool, bool]:
    from tokenizers import Tokenizer, decoders, models, normalizers

    n = len(vocab.tokens)
    arch = str(metadata.get("general.architecture") or "")
    prefix = _flag(metadata, "tokenizer.ggml.add_space_prefix", arch not in _GEMMA_ARCHS)
    unk = _token_id(metadata, "tokenizer.ggml.unknown_token_id", n, default=0)
    model = models.BPE(
        vocab=vocab.ids,
        merges=_spm_merges(vocab),
        unk_token=vocab.tokens[unk] if unk is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = Tokenizer(model)
    space = normalizers.Replace(" ", _SPIECE)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPIECE), space]) if prefix else space
    backend.pre_tokenizer = None
    steps = [decoders.Replace(_SPIECE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    add_bos, add_eos = _add_flags(metadata, "llama", pre)
    return backend, add_bos, add_eos


# ---------------------------------------------------------------------------------------------
# BPE with merges ("gpt2" byte-level; "gemma4" on raw UTF-8)


def _split_merges(raw: Sequence[Any]) -> list[tuple[str, str]]:
    """tokenizer.ggml.merges entries "left right", split at the first space after the first
    character (llama.cpp's `word.find(' ', 1)`)."""
    merges = []
    for m in raw:
        text = m if isinstance(m, str) else bytes(m).decode("utf-8", "replace")
        cut = text.find(" ", 1)
        merges.append((text[:cut], text[cut + 1 :]) if cut > 0 else (text, ""))
    return merges


def _valid_merges(merges: list[tuple[str, str]], vocab: Mapping[str, int], source: str) -> list[tuple[str, str]]:
    """The merges whose parts and result are tokens (llama.cpp ignores the others)."""
    kept = [(a, b) for a, b in merges if a in vocab and b in vocab and (a + b) in vocab]
    if len(kept) != len(merges):
        log.warning("%s: %d of %d merges name tokens outside the vocabulary; ignored",
                    source, len(merges) - len(kept), len(merges))
    return kept


def _bpe_model(vocab: Mapping[str, int], raw_merges: Sequence[Any], source: str, **kwargs: Any) -> Any:
    """`tokenizers.models.BPE` from tokenizer.ggml.merges. Fast path: split at the first space
    and let tokenizers check the merges; if it refuses one (a token outside the vocabulary, a
    part starting with a space), split them the careful way and drop the bad ones."""
    from tokenizers import models

    try:
        return models.BPE(vocab=dict(vocab), merges=[tuple(m.split(" ", 1)) for m in raw_merges], **kwargs)
    except Exception:  # noqa: BLE001 - tokenizers raises plain Exception / TypeError
        merges = _valid_merges(_split_merges(raw_merges), vocab, source)
        return models.BPE(vocab=dict(vocab), merges=merges, **kwargs)


def _pre_tokenizer_for(pre: str | None, source: str) -> tuple[str, PreTokenizer]:
    if pre is None:
        log.warning("%s: no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer", source)
        return "default", PRE_TOKENIZERS["default"]
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        log.warning(
            "%s: pre-tokenizer %r (tokenizer.ggml.pre) is not known here; splitting text like GPT-2, "
            "which may tokenize differently from the original model (%s)", source, pre, _FIX,
        )
        return "gpt-2", PRE_TOKENIZERS["gpt-2"]
    return pre, spec


def _build_bpe(vocab: _Vocab, metadata: Mapping[str, Any], pre: str | None, source: str) -> tuple[Any, bool, bool]:
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers

    model_name = str(metadata.get("tokenizer.ggml.model"))
    if model_name == "gemma4":
        pre = "gemma4"
    ids = vocab.ids
    raw_merges = metadata.get("tokenizer.ggml.merges")
    if raw_merges is None or len(raw_merges) == 0:
        raise ModelLoadError(f"{source}: a BPE tokenizer without tokenizer.ggml.merges; {_FIX}")
    _, spec = _pre_tokenizer_for(pre, source)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.regexes]
    if spec.byte_level:
        model = _bpe_model(ids, raw_merges, source, ignore_merges=spec.ignore_merges)
        backend = Tokenizer(model)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()
    else:  # SentencePiece-style BPE (Gemma 4): "▁" for spaces, byte fallback to <0xXX>
        unk = _token_id(metadata, "tokenizer.ggml.unknown_token_id", len(vocab.tokens))
        model = _bpe_model(
            ids, raw_merges, source, unk_token=vocab.tokens[unk] if unk is not None else None,
            fuse_unk=True, byte_fallback=True, ignore_merges=spec.ignore_merges,
        )
        backend = Tokenizer(model)
        backend.normalizer = normalizers.Replace(" ", _SPIECE)
        backend.pre_tokenizer = pre_tokenizers.Sequence(splits) if len(splits) > 1 else splits[0]
        backend.decoder = decoders.Sequence([decoders.Replace(_SPIECE, " "), decoders.ByteFallback(), decoders.Fuse()])
    add_bos, add_eos = _add_flags(metadata, model_name, pre)
    return backend, add_bos, add_eos


# ---------------------------------------------------------------------------------------------
# WordPiece ("bert")


def _build_wordpiece(vocab: _Vocab, metadata: Mapping[str, Any], pre: str | None,
                     source: str) -> tuple[Any, bool, bool]:
    """llama.cpp's converter spells a word-initial piece "▁word" and a continuation "word"
    (no "##"); control tokens ([CLS] ...) are left alone. Undo that."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab.tokens = _respell_wordpiece(vocab)
    vocab._ids = None
    n = len(vocab.tokens)
    unk = _token_id(metadata, "tokenizer.ggml.unknown_token_id", n, default=100)
    backend = Tokenizer(
        models.WordPiece(
            vocab={t: i for i, t in enumerate(vocab.tokens)},
            unk_token=vocab.tokens[unk] if unk is not None else "[UNK]",
            max_input_chars_per_word=100,
        )
    )
    lowercase = _flag(metadata, "tokenizer.ggml.normalizer.lowercase", True)
    strip_accents = _flag(metadata, "tokenizer.ggml.normalizer.strip_accents", lowercase)
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    add_bos, add_eos = _add_flags(metadata, "bert", pre)
    return backend, add_bos, add_eos


def _respell_wordpiece(vocab: _Vocab) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for i, (text, kind) in enumerate(zip(vocab.tokens, vocab.types)):
        if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED, TOKEN_UNUSED):
            word = text
        elif text.startswith(_SPIECE):
            word = text[1:] or text
        else:
            word = "##" + text
        if word in seen:
            word = f"[DUPLICATE_{i}]"
        seen.add(word)
        out.append(word)
    return out


_BUILDERS = {
    "llama": _build_spm,
    "gpt2": _build_bpe,
    "gemma4": _build_bpe,
    "bert": _build_wordpiece,
}


# ---------------------------------------------------------------------------------------------
def _finish(backend: Any, vocab: _Vocab, metadata: Mapping[str, Any], model: str, pre: str | None,
            add_bos: bool, add_eos: bool, embedded: bool) -> GgufTokenizer:
    n = len(vocab.tokens)
    defaults = {"llama": (1, 2, 0), "bert": (101, None, 100)}.get(model, (None, None, None))
    ids: dict[str, int | None] = {}
    for name, key in _NAMED_TOKENS:
        default = None
        if name == "bos_token":
            default = defaults[0]
        elif name == "eos_token":
            default = defaults[1]
        elif name == "unk_token":
            default = defaults[2]
        ids[name] = _token_id(metadata, key, n, default)
    if model == "bert" and ids["bos_token"] is None:
        ids["bos_token"] = ids["cls_token"]
    if model == "bert" and ids["eos_token"] is None:
        ids["eos_token"] = ids["sep_token"]
    eos_ids: list[int] = []
    for i in (ids["eos_token"], _token_id(metadata, "tokenizer.ggml.eot_token_id", n),
              _token_id(metadata, "tokenizer.ggml.eom_token_id", n)):
        if i is not None and i not in eos_ids:
            eos_ids.append(i)

    if not embedded:
        # bos / eos / eot / eom are special even where an old converter typed them NORMAL
        # (tokenizer_config.json names bos and eos, which makes them special there anyway).
        promote = {i for i in (ids["bos_token"], *eos_ids) if i is not None}
        added = _added_tokens(vocab, metadata, promote)
        specials = [t for t in added if t.special]
        plain = [t for t in added if not t.special]
        if specials:
            backend.add_special_tokens(specials)
        if plain:
            backend.add_tokens(plain)

    # The named tokens tokenizer_config.json will list: bos/eos always (their ids must resolve);
    # the others only when the file marks them special, because naming a token there makes
    # it a special added token, and an ordinary token ("!" as padding) must stay ordinary.
    special_tokens: dict[str, str] = {}
    for name, _ in _NAMED_TOKENS:
        i = ids[name]
        if i is None:
            continue
        if name in ("bos_token", "eos_token") or vocab.types[i] in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
            special_tokens[name] = backend.id_to_token(i) or vocab.tokens[i]

    bos = special_tokens.get("bos_token")
    eos = special_tokens.get("eos_token")
    if model == "bert":
        bos = special_tokens.get("cls_token", bos)
        eos = special_tokens.get("sep_token", eos)
        add_eos = _flag(metadata, "tokenizer.ggml.add_sep_token", True)
    if not embedded:
        backend.post_processor = _post_processor(backend, add_bos, add_eos, bos, eos, bert_pairs=model == "bert",
                                                 byte_level=model == "gpt2" and _byte_level(pre))

    templates: dict[str, str] = {}
    for key, value in metadata.items():
        if key.startswith("tokenizer.chat_template.") and isinstance(value, str):
            templates[key[len("tokenizer.chat_template."):]] = value
    template = metadata.get("tokenizer.chat_template")
    arch = metadata.get("general.architecture")
    context = metadata.get(f"{arch}.context_length") if isinstance(arch, str) else None

    return GgufTokenizer(
        tokenizer=backend,
        model=model,
        pre=pre,
        bos_token_id=ids["bos_token"],
        eos_token_id=ids["eos_token"],
        eos_token_ids=eos_ids,
        eog_token_ids=_eog_ids(vocab, eos_ids),
        unk_token_id=ids["unk_token"],
        pad_token_id=ids["pad_token"],
        add_bos_token=bool(add_bos and bos is not None),
        add_eos_token=bool(add_eos and eos is not None),
        chat_template=template if isinstance(template, str) else None,
        chat_templates=templates,
        special_tokens=special_tokens,
        model_max_length=int(context) if isinstance(context, (int, float)) and context > 0 else None,
    )


def _byte_level(pre: str | None) -> bool:
    spec = PRE_TOKENIZERS.get(pre or "default")
    return spec is None or spec.byte_level


def _eog_ids(vocab: _Vocab, eos_ids: list[int]) -> list[int]:
    """llama.cpp's end-of-generation ids: the named ones plus tokens recognised by their text,
    without "<|end|>" when "<|return|>" and "<|call|>" exist (gpt-oss) and without "</s>"
    where it is an ordinary token (Gemma 4, PLaMo)."""
    by_text = {t: vocab.ids[t] for t in _EOG_TEXTS if t in vocab.ids}
    found = set(by_text.values())
    if "<|end|>" in by_text and (
        ("<|return|>" in by_text and "<|call|>" in by_text) or ("<|calls|>" in by_text and "<|flush|>" in by_text)
    ):
        found.discard(by_text["<|end|>"])
    if "</s>" in by_text and ("<|tool_response>" in by_text or "<|plamo:eos|>" in vocab.ids):
        found.discard(by_text["</s>"])
    ordered = list(eos_ids)
    ordered.extend(sorted(i for i in found if i not in ordered))
    return ordered
