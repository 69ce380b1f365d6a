"""GGUF (and legacy GGML) model files: the container reader, the tokenizer and config they
carry, and the mapping of llama.cpp's tensor names onto an architecture's checkpoint names.

- `reader`: header, metadata, tensor infos; tensors as views of a read-only mmap.
- `tokenizer`: a `tokenizers.Tokenizer` (and chat template, special ids) from the metadata.
- `convert`: GGUF hyper-parameters -> an HF config dict, GGUF tensor names -> HF names, the
  row transforms llama.cpp's converter applied (Q/K permutation, Gemma's norm offset ...);
  architecture plugins name their converter in `ArchitectureSpec.gguf_converter`.
- `loading`: a GGUF model into the model plugin that loads the safetensors version, its
  quantized tensors installed as they are through the quantizer registered for their type.
- `ggml_legacy`: llama.cpp's legacy GGML Llama files (``ggml``/``ggmf``/``ggjt``) read into the
  same `GgufModel` shape, as llama.cpp's GGML-to-GGUF converter would write them.
"""
