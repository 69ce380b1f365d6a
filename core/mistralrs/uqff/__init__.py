"""UQFF files: mistral.rs's format for quantized models (layout 1.2.0; docs/uqff.md).

`container` (file names, version entries, the safetensors writer), `records` (the entries of a
layer record), `writer` (a quantized model -> shards, residual, assets, report), `loading`
(``--from-uqff``: shards -> a ready model)."""
