"""Tiny, deterministic tokenizers for tests (no network, < 1 s).

Two flavours:

* `write_tiny_tokenizer(dir)` – a GPT-2/Qwen/Llama-3 style byte-level BPE tokenizer
  trained with the `tokenizers` library on a small built-in corpus (English, code,
  multi-byte unicode), with ChatML-ish added tokens and a ChatML chat template.
* `write_byte_fallback_tokenizer(dir)` – a Llama-2/Mistral style sentencepiece-like
  BPE tokenizer (Metaspace "▁" convention, `<0x00>`..`<0xFF>` byte-fallback tokens,
  `<unk>`/`<s>`/`</s>`) with a Mistral `[INST]` chat template.

Both write `tokenizer.json` and `tokenizer_config.json` into the directory, loadable by
`mistralrs.tokenization.Tokenizer.from_dir` and by `transformers.AutoTokenizer`.

The API of this module is shared by many test files: keep the signatures stable and
only ever add keyword-only parameters with defaults.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

__all__ = [
    "CHATML_TEMPLATE",
    "MISTRAL_TEMPLATE",
    "TRAINING_CORPUS",
    "write_byte_fallback_tokenizer",
    "write_tiny_tokenizer",
]

# A ChatML (Qwen2-like) template, with tool support.
CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{%- if not loop.first %}"
    "{{- '<|im_start|>system\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.get('content') %}{{- '\\n' + message['content'] }}{%- endif %}"
    "{%- for tc in message['tool_calls'] %}"
    "{%- set fn = tc['function'] if tc.get('function') else tc %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Mistral v0.1-style template: alternating user/assistant, raises on a wrong order.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}"
    "{% endfor %}"
)

QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

_DEFAULT = object()  # sentinel: "use the flavour's default chat template"

TRAINING_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! Hello there, how are you doing today?",
    "A language model predicts the next token given the previous tokens.",
    "Tokenizers split text into tokens; detokenizers join them back into text.",
    "The weather is nice today, and the sun is shining over the hills.",
    "Once upon a time, there was a small model that wanted to speak every language.",
    "Streaming responses are sent to the client one chunk at a time.",
    "What is the capital of France? The capital of France is Paris.",
    "Please call the weather tool with the city name and the unit.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "import json\nprint(json.dumps({'key': 'value', 'n': 42}))\n",
    "class Model:\n    def __init__(self, config):\n        self.config = config\n",
    'fn main() {\n    println!("Hello, {}!", name);\n}\n',
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "if (x > 0 && y < 10) { return x * y; } else { return -1; }",
    "Café, naïve, résumé, déjà vu, crème brûlée, élève, été.",
    "Ça va très bien, merci beaucoup ! Où est la bibliothèque ?",
    "中文分词测试。我们喜欢中文和语言模型。你好，世界！",
    "日本語のテキストも少し。こんにちは世界。",
    "Emoji test: 😀 🎉 🚀 👍 ❤️ — with dashes – and “quotes” …",
    "Ελληνικά: γειά σου κόσμε. Русский: привет, мир!",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828",
    "   indented   text\twith\ttabs\nand\r\nwindows newlines  ",
    "<think>Let me think about this step by step.</think> The answer is 42.",
)


def _corpus(repeat: int = 3) -> list[str]:
    return [line for _ in range(repeat) for line in TRAINING_CORPUS]


def _added_token_entry(content: str, *, special: bool) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


@lru_cache(maxsize=16)
def _byte_level_json(
    vocab_size: int, specials: tuple[str, ...], added: tuple[str, ...], prepend_bos: str | None
) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    # Same pipeline as Qwen2/Qwen3's tokenizer.json (NFC, Qwen split regex, byte-level).
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if added:
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    if prepend_bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{prepend_bos} $A",
            pair=f"{prepend_bos} $A {prepend_bos} $B:1",
            special_tokens=[(prepend_bos, tok.token_to_id(prepend_bos))],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def write_tiny_tokenizer(
    directory: Path,
    *,
    vocab_size: int = 512,
    chat_template: str | list[dict[str, str]] | None | object = _DEFAULT,
    bos_token: str | None = "<s>",
    eos_token: str = "</s>",
    extra_special: Sequence[str] = (
        "<|im_start|>",
        "<|im_end|>",
        "<tool_call>",
        "</tool_call>",
        "<think>",
        "</think>",
    ),
    pad_token: str | None = "<pad>",
    added_tokens: Sequence[str] = (),
    prepend_bos: bool = False,
    config_extra: dict | None = None,
) -> Path:
    """Write a byte-level BPE `tokenizer.json` + `tokenizer_config.json` into `directory`.

    Special tokens get the lowest ids in this order: bos, eos, pad, *extra_special (all
    flagged special, so `skip_special_tokens` drops them). `added_tokens` are added as
    NON-special added tokens (like Qwen3's `<think>`), with ids after the trained vocab.
    `chat_template=None` writes no template; the default is `CHATML_TEMPLATE`; a list of
    {"name", "template"} dicts writes named templates (like tool_use).
    `prepend_bos=True` makes encoding prepend `bos_token` (Llama-3 style post-processor).
    `config_extra` is merged into tokenizer_config.json last. Returns `directory`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if chat_template is _DEFAULT:
        chat_template = CHATML_TEMPLATE
    specials: list[str] = []
    for t in (bos_token, eos_token, pad_token, *extra_special):
        if t is not None and t not in specials:
            specials.append(t)
    if prepend_bos and bos_token is None:
        raise ValueError("prepend_bos=True needs a bos_token")
    tok_json = _byte_level_json(vocab_size, tuple(specials), tuple(added_tokens), bos_token if prepend_bos else None)
    (directory / "tokenizer.json").write_text(tok_json, encoding="utf-8")

    parsed = json.loads(tok_json)
    decoder = {str(t["id"]): _added_token_entry(t["content"], special=t["special"]) for t in parsed["added_tokens"]}
    config: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "bos_token": bos_token,
        "eos_token": eos_token,
        "pad_token": pad_token,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    if extra_special:
        config["additional_special_tokens"] = [t for t in extra_special]
    if chat_template is not None:
        config["chat_template"] = chat_template
    if config_extra:
        config.update(config_extra)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return directory


@lru_cache(maxsize=4)
def _byte_fallback_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    # Train merges over "▁"-prefixed words. Only ASCII (plus a couple of Latin-1 letters)
    # enters the alphabet, so CJK, emoji, Greek... must be encoded with byte fallback.
    alphabet = [chr(c) for c in range(32, 127)] + ["▁", "é", "è", "ç"]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    n_special = 3 + 256
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - n_special, len(alphabet) + 1),
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    trainer_tok.train_from_iterator(_corpus(), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]

    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    allowed = set(alphabet)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if piece in vocab or not set(piece) <= allowed:
            continue
        vocab[piece] = len(vocab)
    merges = [m for m in trained["merges"] if (m[0] if isinstance(m, list) else m.split(" ")[0]) in vocab]
    merges = [m if isinstance(m, list) else m.split(" ", 1) for m in merges]
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]

    def added(i: int, content: str) -> dict:
        return {"id": i, **_added_token_entry(content, special=True)}

    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>")],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Metaspace",
            "replacement": "▁",
            "prepend_scheme": "first",
            "split": False,
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    text = json.dumps(doc, ensure_ascii=False)
    Tokenizer.from_str(text)  # validate
    return text


def write_byte_fallback_tokenizer(
    directory: Path,
    *,
    vocab_size: int = 640,
    chat_template: str | None | object = _DEFAULT,
    add_bos_token: bool | None = True,
    add_eos_token: bool | None = False,
    config_extra: dict | None = None,
) -> Path:
    """Write a Llama-2/Mistral style tokenizer (`<unk>`=0, `<s>`=1, `</s>`=2, then
    `<0x00>`..`<0xFF>` = 3..258, then "▁"-pieces) into `directory`.

    `add_bos_token`/`add_eos_token` are written to tokenizer_config.json unless None
    (the tokenizer.json post-processor itself prepends `<s>`). The default chat template
    is `MISTRAL_TEMPLATE`. Returns `directory`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if chat_template is _DEFAULT:
        chat_template = MISTRAL_TEMPLATE
    (directory / "tokenizer.json").write_text(_byte_fallback_json(vocab_size), encoding="utf-8")
    config: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(i): _added_token_entry(t, special=True) for i, t in enumerate(("<unk>", "<s>", "</s>"))
        },
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 4096,
    }
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    if add_eos_token is not None:
        config["add_eos_token"] = add_eos_token
    if chat_template is not None:
        config["chat_template"] = chat_template
    if config_extra:
        config.update(config_extra)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return directory
