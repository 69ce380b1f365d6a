"""First-party tool-call and reasoning parsers.

Each parser is one package: its ``__init__`` registers it (cheap: imports only
`mistralrs.specs` / `mistralrs.parsing`) and its implementation lives in the package's
``parser`` module, which the core imports on first use:

- ``hermes``   `<tool_call>{json}</tool_call>` (Qwen 2/2.5/3, Hermes, SmolLM3)
- ``llama3``   bare JSON / ``<|python_tag|>`` JSON, ``;``-separated (Llama 3.1+)
- ``mistral``  ``[TOOL_CALLS][...]`` and ``[TOOL_CALLS]name[ARGS]{...}``
- ``deepseek`` ``<｜tool▁calls▁begin｜>...`` (DeepSeek V3 / V3.1)
- ``json_fallback`` (spec name ``json``) a JSON call as the whole output; the fallback
- ``think``    ``<think>...</think>`` reasoning (Qwen3, DeepSeek-R1, SmolLM3, QwQ, GLM)
"""
