"""Tiny sentence-transformers folders for tests: random-weight EmbeddingGemma, Qwen3-Embedding
and BERT checkpoints (saved by transformers, as their hub models are: base model classes, no
``model.`` prefix) with their module pipelines (modules.json, pooling, dense, normalize,
prompts), loadable by `sentence_transformers.SentenceTransformer` and by mistralrs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests.helpers.parity import randomize_

ST_TYPES = {
    "transformer": "sentence_transformers.models.Transformer",
    "pooling": "sentence_transformers.models.Pooling",
    "dense": "sentence_transformers.models.Dense",
    "normalize": "sentence_transformers.models.Normalize",
}


def _json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def write_st_modules(directory: Path, *, hidden: int, max_seq_length: int, pooling: str = "mean",
                     include_prompt: bool = True, dense: tuple[tuple[int, str], ...] = (), normalize: bool = True,
                     prompts: dict[str, str] | None = None, do_lower_case: bool = False, seed: int = 0) -> None:
    """modules.json and the module folders. `dense`: (out_features, activation class name) per layer."""
    from safetensors.torch import save_file

    modules = [{"idx": 0, "name": "0", "path": "", "type": ST_TYPES["transformer"]},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_TYPES["pooling"]}]
    _json(directory / "1_Pooling" / "config.json", {"word_embedding_dimension": hidden, "pooling_mode": pooling,
                                                    "include_prompt": include_prompt})
    gen = torch.Generator().manual_seed(seed)
    width = hidden
    for out, act in dense:
        idx = len(modules)
        folder = f"{idx}_Dense"
        modules.append({"idx": idx, "name": str(idx), "path": folder, "type": ST_TYPES["dense"]})
        _json(directory / folder / "config.json", {"in_features": width, "out_features": out, "bias": act != "Identity",
                                                   "activation_function": f"torch.nn.modules.{'linear' if act == 'Identity' else 'activation'}.{act}"})
        tensors = {"linear.weight": torch.randn(out, width, generator=gen) * width ** -0.5}
        if act != "Identity":
            tensors["linear.bias"] = torch.randn(out, generator=gen) * 0.1
        save_file(tensors, str(directory / folder / "model.safetensors"))
        width = out
    if normalize:
        idx = len(modules)
        modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize", "type": ST_TYPES["normalize"]})
        (directory / f"{idx}_Normalize").mkdir(parents=True, exist_ok=True)
    _json(directory / "modules.json", modules)
    _json(directory / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": do_lower_case})
    _json(directory / "config_sentence_transformers.json", {
        "__version__": {"sentence_transformers": "5.1.0"}, "prompts": prompts or {}, "default_prompt_name": None,
        "similarity_fn_name": "cosine"})


def _save(model: Any, directory: Path, seed: int) -> None:
    model = model.to(torch.float32).eval()
    randomize_(model, seed)
    model.save_pretrained(directory)


def _bos_eos_tokenizer(directory: Path, *, bos: bool, eos: str) -> None:
    from tests.helpers.tiny_tokenizer import write_tiny_tokenizer

    write_tiny_tokenizer(directory, chat_template=None, prepend_bos=bos, eos_token=eos)
    data = json.loads((directory / "tokenizer.json").read_text())
    vocab = {t["content"]: t["id"] for t in data["added_tokens"]}
    single = ([{"SpecialToken": {"id": "<s>", "type_id": 0}}] if bos else []) + [
        {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": eos, "type_id": 0}}]
    specials = {eos: {"id": eos, "ids": [vocab[eos]], "tokens": [eos]}}
    if bos:
        specials["<s>"] = {"id": "<s>", "ids": [vocab["<s>"]], "tokens": ["<s>"]}
    data["post_processor"] = {"type": "TemplateProcessing", "single": single, "pair": single, "special_tokens": specials}
    (directory / "tokenizer.json").write_text(json.dumps(data))


def write_tiny_embeddinggemma(directory: Path, *, seed: int = 0, sliding_window: int = 4) -> Path:
    """Gemma3TextModel with bidirectional attention, mean pooling, two Dense layers and Normalize."""
    from transformers import Gemma3TextConfig, Gemma3TextModel

    directory = Path(directory)
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=520, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], query_pre_attn_scalar=16,
        use_bidirectional_attention=True, rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        pad_token_id=2, bos_token_id=0, eos_token_id=1,
    )
    config.architectures = ["Gemma3TextModel"]
    _save(Gemma3TextModel(config), directory, seed)
    _bos_eos_tokenizer(directory, bos=True, eos="</s>")
    write_st_modules(directory, hidden=64, max_seq_length=48, pooling="mean",
                     dense=((128, "Identity"), (64, "Identity")), normalize=True,
                     prompts={"query": "task: search result | query: ", "document": "title: none | text: "})
    return directory


def write_tiny_qwen3_embedding(directory: Path, *, seed: int = 0) -> Path:
    """Qwen3Model with last-token pooling (the tokenizer appends the end-of-text token) and Normalize."""
    from transformers import Qwen3Config, Qwen3Model

    directory = Path(directory)
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=520, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=2, eos_token_id=1)
    config.architectures = ["Qwen3ForCausalLM"]
    _save(Qwen3Model(config), directory, seed)
    _bos_eos_tokenizer(directory, bos=False, eos="</s>")
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**cfg, "padding_side": "left"}))
    write_st_modules(directory, hidden=64, max_seq_length=40, pooling="lasttoken", normalize=True,
                     prompts={"query": "Instruct: Given a web search query, retrieve relevant passages\nQuery:",
                              "document": ""})
    return directory


def write_tiny_bert(directory: Path, *, seed: int = 0, pooling: str = "cls", include_prompt: bool = False,
                    dense: tuple[tuple[int, str], ...] = ((48, "Tanh"),)) -> Path:
    """BertModel, uncased WordPiece, CLS pooling without the prompt, a Tanh Dense layer, no Normalize."""
    from transformers import BertConfig, BertModel

    from tests.helpers.gguf_vocab import write_wordpiece_tokenizer

    directory = Path(directory)
    torch.manual_seed(seed)
    write_wordpiece_tokenizer(directory, vocab_size=600)
    vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    config = BertConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, hidden_act="gelu")
    config.architectures = ["BertModel"]
    _save(BertModel(config, add_pooling_layer=True), directory, seed)
    write_st_modules(directory, hidden=64, max_seq_length=32, pooling=pooling, include_prompt=include_prompt,
                     dense=dense, normalize=False, do_lower_case=True,
                     prompts={"query": "query: ", "passage": "passage: "})
    return directory


def write_tiny_xlm_roberta(directory: Path, *, seed: int = 0) -> Path:
    """XLMRobertaModel (positions after the padding id), mean pooling and Normalize, as the
    multilingual E5 / paraphrase-multilingual models are built."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from tests.helpers.gguf_vocab import write_wordpiece_tokenizer

    directory = Path(directory)
    torch.manual_seed(seed)
    write_wordpiece_tokenizer(directory, vocab_size=600)
    vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    config = XLMRobertaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=130, type_vocab_size=1, pad_token_id=0)
    config.architectures = ["XLMRobertaModel"]
    _save(XLMRobertaModel(config, add_pooling_layer=False), directory, seed)
    write_st_modules(directory, hidden=64, max_seq_length=40, pooling="mean", normalize=True,
                     prompts={"query": "query: ", "passage": "passage: "})
    return directory
