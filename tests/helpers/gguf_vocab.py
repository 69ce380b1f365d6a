"""Tiny tokenizers and the GGUF tokenizer metadata llama.cpp's converter makes of them (tests only).

`write_byte_level_tokenizer` / `write_spm_tokenizer` / `write_wordpiece_tokenizer` train small
Hugging Face tokenizers (tokenizer.json + tokenizer_config.json) in the shape of Llama 3 / Qwen 2,
Llama 2 / Mistral and BERT. `convert_to_gguf` then writes a GGUF holding only the tokenizer,
with the metadata llama.cpp's `convert_hf_to_gguf.py` would write for that directory -- ports of
`TextModel.get_vocab_base` + `_set_vocab_gpt2` (byte-level BPE), `_set_vocab_llama_hf`
(SentencePiece BPE from a tokenizer.json), `_create_vocab_sentencepiece` (from a tokenizer.model:
emulated, as the `sentencepiece` package is not a dependency) and BERT's phantom-space vocab --
through gguf-py's own `GGUFWriter`, `SpecialVocab` and `LlamaHfVocab`; `read_metadata` reads it
back with `gguf.GGUFReader`.

`llama_cpp_spm_tokenize` is a direct port of llama.cpp's SentencePiece tokenizer
(`llm_tokenizer_spm_session` plus the special-token partitioning of `llama_vocab::tokenize`),
the oracle for files that only exist as GGUF.
"""

from __future__ import annotations

import heapq
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.helpers.tiny_tokenizer import TRAINING_CORPUS

__all__ = [
    "LLAMA3_SPLIT",
    "QWEN2_SPLIT",
    "convert_to_gguf",
    "llama_cpp_spm_tokenize",
    "read_metadata",
    "write_byte_level_tokenizer",
    "write_spm_tokenizer",
    "write_wordpiece_tokenizer",
]

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Extra training text: whitespace runs, digits, code, accents, CJK, emoji -- so merges exist for them.
_EXTRA = (
    "    four spaces\n\n\n\ttab\t\ttabs\n  \n",
    "x = [1, 22, 333, 4444, 55555]; y = {'a': 1} # comment",
    "naïve façade coöperate Ångström Øresund ŻÓŁĆ",
    "漢字かなカナ한국어 テスト 😀😀 🎉🎉 👍🏽👍🏽",
    "I've we're they'll she'd it's I'm you've",
)


def _corpus() -> list[str]:
    return [line for _ in range(4) for line in (*TRAINING_CORPUS, *_EXTRA)]


def _added_entry(content: str, *, special: bool) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}


def _write_config(directory: Path, tok: Any, config: dict[str, Any]) -> None:
    decoder = {str(i): _added_entry(t.content, special=t.special) for i, t in tok.get_added_tokens_decoder().items()}
    full = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": decoder,
            "clean_up_tokenization_spaces": False, "model_max_length": 4096, **config}
    (directory / "tokenizer_config.json").write_text(json.dumps(full, indent=2, ensure_ascii=False), encoding="utf-8")


# ------------------------------------------------------------------------------ tokenizers
def write_byte_level_tokenizer(
    directory: Path,
    *,
    split: str,
    ignore_merges: bool,
    bos: str | None,
    eos: str,
    specials: Sequence[str],
    added: Sequence[str] = (),
    prepend_bos: bool = False,
    chat_template: str | None = None,
    vocab_size: int = 900,
) -> Path:
    """A Llama 3 / Qwen 2 shaped byte-level BPE (split regex, byte-level, no normalizer)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Like Llama 3 / Qwen 2: special tokens come after the trained vocabulary.
    names = [t for t in (bos, eos, *specials) if t is not None]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(names)])
    if added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    steps = [processors.ByteLevel(trim_offsets=False)]
    if prepend_bos and bos is not None:
        steps.append(processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))],
        ))
    tok.post_processor = processors.Sequence(steps)
    tok.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {"bos_token": bos, "eos_token": eos}
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_config(directory, tok, config)
    return directory


def write_spm_tokenizer(
    directory: Path,
    *,
    control: Sequence[str] = (),
    user_defined: Sequence[str] = (),
    add_bos: bool = True,
    add_eos: bool = False,
    chat_template: str | None = None,
    vocab_size: int = 700,
) -> Path:
    """A Llama 2 / Mistral shaped tokenizer, as transformers' LlamaConverter makes it from a
    tokenizer.model: <unk> <s> </s>, <0x00>..<0xFF>, then "▁" pieces; merges recovered from the
    pieces with transformers' own `generate_merges`; normalizer prepend "▁" + " " -> "▁";
    byte fallback; `control` / `user_defined` tokens added after the pieces."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers.tokenization_utils_base import generate_merges

    directory.mkdir(parents=True, exist_ok=True)
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")  # keep merges away from newlines
    alphabet = sorted({c for line in _corpus() for c in line.replace(" ", "▁")} - {"\n", "\r"})
    # Leave the rarer characters out of the alphabet: they must go through byte fallback.
    alphabet = [c for c in alphabet if ord(c) < 0x3000 or c in "漢字"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[],
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False)
    trainer_tok.train_from_iterator(_corpus(), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]["vocab"]
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        if piece not in vocab and "\n" not in piece:
            vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=generate_merges(vocab), unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>", *control)])
    if user_defined:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    single = ("<s>:0 " if add_bos else "") + "$A:0" + (" </s>:0" if add_eos else "")
    pair = single + (" <s>:1" if add_bos else "") + " $B:1" + (" </s>:1" if add_eos else "")
    specials = ([("<s>", 1)] if add_bos else []) + ([("</s>", 2)] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    tok.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                              "add_bos_token": add_bos, "add_eos_token": add_eos, "legacy": True}
    if control:
        config["additional_special_tokens"] = list(control)
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_config(directory, tok, config)
    return directory


def write_wordpiece_tokenizer(directory: Path, *, vocab_size: int = 600) -> Path:
    """A BERT (uncased) WordPiece tokenizer: [PAD] [UNK] [CLS] [SEP] [MASK], "##" suffixes."""
    from tokenizers import BertWordPieceTokenizer, processors

    directory.mkdir(parents=True, exist_ok=True)
    bert = BertWordPieceTokenizer(lowercase=True)
    bert.train_from_iterator(_corpus(), vocab_size=vocab_size, min_frequency=2, show_progress=False,
                             special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok = bert._tokenizer
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]")))
    tok.save(str(directory / "tokenizer.json"))
    _write_config(directory, tok, {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                                   "cls_token": "[CLS]", "mask_token": "[MASK]", "do_lower_case": True})
    return directory


# ---------------------------------------------------------------------------- conversion
def _does_token_look_special(token: str) -> bool:
    """convert_hf_to_gguf.py's `TextModel.does_token_look_special`."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def vocab_base(directory: Path, vocab_size: int | None = None) -> tuple[list[str], list[int]]:
    """convert_hf_to_gguf.py's `TextModel.get_vocab_base` (GPT-2 BPE and WordPiece); `vocab_size`
    as config.json's (ids without a token become [PADi])."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    vocab_size = vocab_size or len(tokenizer.vocab)
    reverse = {i: t for t, i in tokenizer.vocab.items()}
    added_vocab = tokenizer.get_added_vocab()
    added_decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added_vocab:
            if not added_decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if added_decoder[i].special or _does_token_look_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("▁", " ")  # pre-normalize user-defined spaces
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _sentencepiece_vocab(directory: Path) -> tuple[list[str], list[float], list[int]]:
    """`_create_vocab_sentencepiece` as it would read a tokenizer.model holding these pieces:
    SentencePiece scores its BPE pieces by merge order (-rank), control / byte / unknown
    pieces score 0; added_tokens_decoder entries are CONTROL or USER_DEFINED (spaces
    pre-normalised), score -1000."""
    import gguf

    doc = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = doc["model"]["vocab"]
    added = {int(k): v for k, v in config.get("added_tokens_decoder", {}).items()}
    n = max([*vocab.values(), *added]) + 1  # config.json's vocab_size: the pieces plus the added tokens
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [-10000.0] * n
    types = [int(gguf.TokenType.UNUSED)] * n
    rank = 0
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        tokens[i] = piece
        if piece == "<unk>":
            types[i] = gguf.TokenType.UNKNOWN
        elif piece in ("<s>", "</s>"):
            types[i] = gguf.TokenType.CONTROL
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            types[i] = gguf.TokenType.BYTE
        else:
            types[i] = gguf.TokenType.NORMAL
            scores[i] = -float(rank)
            rank += 1
        if types[i] != gguf.TokenType.NORMAL:
            scores[i] = 0.0
    for i, entry in sorted(added.items()):
        if tokens[i] == "<unk>":
            continue
        token = entry["content"]
        if entry.get("special") or _does_token_look_special(token):
            types[i] = gguf.TokenType.CONTROL
        else:
            token = token.replace("▁", " ")
            types[i] = gguf.TokenType.USER_DEFINED
        scores[i] = -1000.0
        tokens[i] = token
    return tokens, scores, [int(t) for t in types]


def convert_to_gguf(
    directory: Path,
    out: Path,
    kind: str,
    *,
    pre: str | None = None,
    arch: str = "llama",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `out`, a GGUF with the tokenizer metadata llama.cpp's converter writes for the HF
    tokenizer in `directory`. `kind`: "gpt2" (`_set_vocab_gpt2`), "llama_hf" (`_set_vocab_llama_hf`),
    "sentencepiece" (`_set_vocab_sentencepiece`), "bert" (BertModel.set_vocab). `extra`: more
    key/values (bool, int, str) written as the converter of a specific architecture would."""
    import gguf

    writer = gguf.GGUFWriter(out, arch)
    writer.add_name(directory.name)
    if kind == "gpt2":
        tokens, types = vocab_base(directory)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or "default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(directory, load_merges=True)
    elif kind == "llama_hf":
        vocab = gguf.LlamaHfVocab(directory)
        rows = list(vocab.all_tokens())
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list([r[0] for r in rows])
        writer.add_token_scores([r[1] for r in rows])
        writer.add_token_types([int(r[2]) for r in rows])
        special = gguf.SpecialVocab(directory, n_vocab=len(rows))
    elif kind == "sentencepiece":
        tokens, scores, types = _sentencepiece_vocab(directory)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(directory, n_vocab=len(tokens))
    elif kind == "bert":
        tokens, types = vocab_base(directory)

        def phantom(tok: str, kind: int) -> str:
            if kind == gguf.TokenType.CONTROL:
                return tok
            return tok[2:] if tok.startswith("##") else "▁" + tok

        writer.add_token_type_count(2)
        writer.add_tokenizer_model("bert")
        writer.add_tokenizer_pre(pre or "default")
        writer.add_token_list([phantom(t, k) for t, k in zip(tokens, types)])
        writer.add_token_types(types)
        special = gguf.SpecialVocab(directory, n_vocab=len(tokens))
    else:
        raise ValueError(kind)
    special.add_to_gguf(writer, quiet=True)
    for key, value in (extra or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, str(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def read_metadata(path: Path) -> dict[str, Any]:
    """Every metadata key of a (small) GGUF file, through `gguf.GGUFReader`."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


# ------------------------------------------------------------------ llama.cpp's SPM tokenizer
def llama_cpp_spm_tokenize(metadata: Mapping[str, Any], text: str, *, parse_special: bool = True) -> list[int]:
    """llama.cpp's `llama_vocab::tokenize(text, add_special=false, parse_special)` for a
    "llama" (SentencePiece) vocabulary: special tokens partitioned out longest first (control
    and unknown ones only with `parse_special`), " " prepended to every text fragment that
    starts the text or follows a token (when add_space_prefix), spaces -> "▁", then the
    SentencePiece merge loop -- the highest-scoring adjacent pair whose text is a token, the
    leftmost of equals -- and byte tokens for what no token covers."""
    tokens = list(metadata["tokenizer.ggml.tokens"])
    types = [int(t) for t in metadata["tokenizer.ggml.token_type"]]
    scores = [float(s) for s in metadata["tokenizer.ggml.scores"]]
    ids = {t: i for i, t in enumerate(tokens)}
    add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    wanted = (3, 4, 2) if parse_special else (4,)
    specials = sorted((i for i, k in enumerate(types) if k in wanted), key=lambda i: -len(tokens[i].encode()))

    fragments: list[str | int] = [text] if text else []
    for sid in specials:
        piece = tokens[sid]
        out: list[str | int] = []
        for frag in fragments:
            if not isinstance(frag, str):
                out.append(frag)
                continue
            parts = frag.split(piece)
            for j, part in enumerate(parts):
                if part:
                    out.append(part)
                if j < len(parts) - 1:
                    out.append(sid)
        fragments = out

    result: list[int] = []
    prev_special = True
    for frag in fragments:
        if isinstance(frag, int):
            result.append(frag)
            prev_special = True
            continue
        piece = (" " if add_prefix and prev_special else "") + frag
        result.extend(_spm_session(piece.replace(" ", "▁"), ids, scores))
        prev_special = False
    return result


def _spm_session(text: str, ids: Mapping[str, int], scores: Sequence[float]) -> list[int]:
    symbols = list(text)  # UTF-8 characters; merged symbols hold their text, "" when absorbed
    nxt = list(range(1, len(symbols))) + [-1]
    prv = list(range(-1, len(symbols) - 1))
    queue: list[tuple[float, int, int, int]] = []
    rev_merge: dict[str, tuple[str, str]] = {}

    def add(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        joined = symbols[left] + symbols[right]
        tid = ids.get(joined)
        if tid is None:
            return
        heapq.heappush(queue, (-scores[tid], left, right, len(joined)))
        rev_merge[joined] = (symbols[left], symbols[right])

    for i in range(1, len(symbols)):
        add(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if not symbols[left] or not symbols[right] or len(symbols[left]) + len(symbols[right]) != size:
            continue
        symbols[left] += symbols[right]
        symbols[right] = ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        add(prv[left], left)
        add(left, nxt[left])

    out: list[int] = []

    def resegment(piece: str) -> None:
        tid = ids.get(piece)
        if tid is not None:
            out.append(tid)
        elif piece in rev_merge:
            resegment(rev_merge[piece][0])
            resegment(rev_merge[piece][1])
        else:
            out.extend(ids[f"<0x{b:02X}>"] for b in piece.encode("utf-8"))

    i = 0 if symbols else -1
    while i != -1:
        if symbols[i]:
            resegment(symbols[i])
        i = nxt[i]
    return out
