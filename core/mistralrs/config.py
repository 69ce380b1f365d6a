"""The TOML file of `mistralrs from-config` (mistral.rs's format), parsed with cattrs.

    command = "serve"
    default_model_id = "Qwen/Qwen3-4B"
    [global]      seed, log, token_source
    [server]      host, port, api_key, max_tool_rounds, disable_metrics, ...
    [runtime]     max_seqs, max_num_batched_tokens, no_kv_cache, prefix_cache_n, chat_template, ...
    [paged_attn]  mode, context_len, memory_mb, memory_fraction, block_size, cache_type
    [[models]]    kind, model_id, tokenizer, arch, dtype, chat_template, jinja_explicit,
                  [models.format], [models.quantization], [models.device], [models.adapter]

Every error names the file and the key (`config.toml: [[models]] #2 dtype: ...`).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, override

from mistralrs.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@attrs.define(kw_only=True)
class GlobalSection:
    seed: int | None = None
    log: str | None = None
    token_source: str = "cache"


@attrs.define(kw_only=True)
class ServerSection:
    host: str = "0.0.0.0"
    port: int = 1234
    api_key: str | None = None
    ui: bool | None = None
    no_ui: bool = False
    mcp_port: int | None = None
    max_tool_rounds: int | None = None
    tool_dispatch_url: str | None = None
    disable_access_log: bool = False
    access_log_format: str = "text"
    access_log_health: bool = False
    disable_request_id_header: bool = False
    disable_metrics: bool = False


@attrs.define(kw_only=True)
class RuntimeSection:
    max_seqs: int = 32
    max_num_batched_tokens: int = 4096
    no_kv_cache: bool = False
    prefix_cache_n: int = 16
    chat_template: str | None = None
    jinja_explicit: str | None = None
    # Accepted by mistral.rs; not available in this build (rejected when set).
    matformer_config_path: str | None = None
    matformer_slice_name: str | None = None
    mtp_model: str | None = None
    mtp_n_predict: int | None = None
    mcp_config: str | None = None
    agent: bool = False
    enable_search: bool = False
    search_embedding_model: str | None = None
    enable_code_execution: bool = False
    enable_shell: bool = False


@attrs.define(kw_only=True)
class PagedAttnSection:
    mode: str = "auto"
    context_len: int | None = None
    memory_mb: int | None = None
    memory_fraction: float | None = None
    block_size: int = 32
    cache_type: str = "auto"


@attrs.define(kw_only=True)
class ModelFormat:
    format: str | None = None
    quantized_file: str | None = None
    mmproj: str | None = None
    tok_model_id: str | None = None
    gqa: int | None = None


@attrs.define(kw_only=True)
class ModelQuantization:
    quant: str | None = None
    isq: str | None = None
    in_situ_quant: str | None = None
    from_uqff: str | None = None
    isq_organization: str | None = None
    imatrix: str | None = None
    calibration_file: str | None = None


@attrs.define(kw_only=True)
class ModelDevice:
    cpu: bool = False
    device_layers: list[str] | None = None
    topology: str | None = None
    hf_cache: str | None = None
    max_seq_len: int | None = None
    max_batch_size: int | None = None


@attrs.define(kw_only=True)
class ModelEntry:
    model_id: str
    kind: str = "auto"
    tokenizer: str | None = None
    arch: str | None = None
    dtype: str = "auto"
    revision: str | None = None
    chat_template: str | None = None
    jinja_explicit: str | None = None
    dummy_weights: bool = False
    format: ModelFormat = attrs.field(factory=ModelFormat)
    quantization: ModelQuantization = attrs.field(factory=ModelQuantization)
    device: ModelDevice = attrs.field(factory=ModelDevice)
    adapter: dict[str, Any] | None = None
    multimodal: dict[str, Any] | None = None


@attrs.define(kw_only=True)
class FromConfig:
    command: str = "serve"
    default_model_id: str | None = None
    enable_thinking: bool | None = None
    thinking: bool | None = None
    reasoning_effort: str | None = None
    global_: GlobalSection = attrs.field(factory=GlobalSection)
    server: ServerSection = attrs.field(factory=ServerSection)
    runtime: RuntimeSection = attrs.field(factory=RuntimeSection)
    paged_attn: PagedAttnSection = attrs.field(factory=PagedAttnSection)
    sandbox: dict[str, Any] | None = None
    models: list[ModelEntry] = attrs.field(factory=list)
    path: str = "config.toml"


def _converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)

    def strict_int(value: Any, _: type) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value

    def strict_float(value: Any, _: type) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)

    def strict_bool(value: Any, _: type) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value

    def strict_str(value: Any, _: type) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value

    conv.register_structure_hook(int, strict_int)
    conv.register_structure_hook(float, strict_float)
    conv.register_structure_hook(bool, strict_bool)
    conv.register_structure_hook(str, strict_str)
    conv.register_structure_hook(
        FromConfig,
        make_dict_structure_fn(FromConfig, conv, _cattrs_forbid_extra_keys=True,
                               global_=override(rename="global"), path=override(omit=True)),
    )
    return conv


_CONVERTER = _converter()


def _format_exception(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"unknown key(s) {', '.join(sorted(exc.extra_fields))}"
    if isinstance(exc, KeyError):
        return "required key missing"
    return str(exc) or type(exc).__name__


def _readable_path(path: str) -> str:
    """`$.models[1].dtype` -> `[[models]] #2 dtype`; `$.runtime.max_seqs` -> `[runtime] max_seqs`."""
    path = path.removeprefix("$").lstrip(".")
    path = re.sub(r"^models\[(\d+)\]\.?", lambda m: f"[[models]] #{int(m.group(1)) + 1} ", path)
    path = re.sub(r"^(global_?|server|runtime|paged_attn)\.?", lambda m: f"[{m.group(1).rstrip('_')}] ", path)
    return path.strip() or "top level"


def _errors(exc: BaseException) -> list[str]:
    out = []
    for line in cattrs.transform_error(exc, format_exception=_format_exception):
        message, _, path = line.rpartition(" @ ")
        out.append(f"{_readable_path(path)}: {message}")
    return out


def load_config(path: str | Path) -> FromConfig:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    try:
        cfg = _CONVERTER.structure(data, FromConfig)
    except Exception as exc:  # noqa: BLE001 - cattrs groups errors; report them all on one line
        raise ConfigError(f"{p}: " + "; ".join(_errors(exc))) from None
    cfg.path = str(p)
    validate(cfg)
    return cfg


SUPPORTED_KINDS = ("auto", "text", "embedding")


def validate(cfg: FromConfig) -> None:
    where = cfg.path

    def fail(message: str) -> None:
        raise ConfigError(f"{where}: {message}")

    if cfg.command not in ("serve", "run"):
        fail(f"command must be \"serve\" or \"run\", not {cfg.command!r}")
    if not cfg.models:
        fail("add at least one [[models]] table with a model_id")
    ids = [m.model_id for m in cfg.models]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        fail(f"[[models]] model_id {dupes[0]!r} appears more than once")
    if cfg.default_model_id is not None and cfg.default_model_id not in ids:
        fail(f"default_model_id {cfg.default_model_id!r} is not one of the [[models]] ids ({', '.join(ids)})")
    if cfg.command == "run" and len(cfg.models) > 1:
        fail("command = \"run\" takes exactly one [[models]] entry")
    pa = cfg.paged_attn
    given = [k for k in ("context_len", "memory_mb", "memory_fraction") if getattr(pa, k) is not None]
    if len(given) > 1:
        fail(f"[paged_attn] {' and '.join(given)} are mutually exclusive")
    if pa.mode not in ("auto", "on", "off"):
        fail(f"[paged_attn] mode must be auto, on or off, not {pa.mode!r}")
    if pa.block_size not in (8, 16, 32):
        fail(f"[paged_attn] block_size must be 8, 16 or 32, not {pa.block_size}")
    if pa.cache_type not in ("auto", "f8e4m3"):
        fail(f"[paged_attn] cache_type must be auto or f8e4m3, not {pa.cache_type!r}")
    rt = cfg.runtime
    mcp_port = cfg.server.mcp_port
    if mcp_port is not None and not (0 <= mcp_port <= 65535 and (mcp_port != cfg.server.port or mcp_port == 0)):
        fail(f"[server] mcp_port must be a port number (0-65535) other than [server] port, not {mcp_port}")
    if cfg.command == "run" and mcp_port is not None:
        fail("[server] mcp_port needs command = \"serve\"")
    for key in ("matformer_config_path", "matformer_slice_name", "mtp_model", "mtp_n_predict"):
        if getattr(rt, key) is not None:
            fail(f"[runtime] {key} is not supported yet in this build; remove it")
    if rt.search_embedding_model is not None and not rt.enable_search:
        fail("[runtime] search_embedding_model reranks web search results; set enable_search = true with it")
    for key in ("agent", "enable_code_execution", "enable_shell"):
        if getattr(rt, key):
            fail(f"[runtime] {key} is not supported yet in this build; remove it")
    for i, m in enumerate(cfg.models, 1):
        label = f"[[models]] #{i} ({m.model_id})"
        if m.kind not in SUPPORTED_KINDS:
            fail(f"{label} kind {m.kind!r} needs a plugin that is not installed (supported: {', '.join(SUPPORTED_KINDS)})")
        if m.dtype not in ("auto", "bf16", "f16", "f32"):
            fail(f"{label} dtype must be auto, bf16, f16 or f32, not {m.dtype!r}")
        for section, obj in (("format", m.format), ("quantization", m.quantization)):
            for f in attrs.fields(type(obj)):
                value = getattr(obj, f.name)
                if value is None or (section == "format" and f.name == "format" and value == "plain"):
                    continue
                if section == "quantization" and f.name in ("isq", "in_situ_quant", "isq_organization", "quant",
                                                            "from_uqff", "imatrix", "calibration_file"):
                    continue
                if section == "format" and f.name in ("format", "quantized_file", "tok_model_id", "gqa"):
                    continue
                fail(f"{label} {section}.{f.name} is not supported yet in this build; remove it")
        if m.format.gqa is not None and m.format.gqa < 1:
            fail(f"{label} format.gqa must be a positive integer, not {m.format.gqa}")
        q = m.quantization
        if q.isq and q.in_situ_quant and q.isq.lower() != q.in_situ_quant.lower():
            fail(f"{label} quantization.isq and quantization.in_situ_quant disagree; give one")
        if q.isq_organization not in (None, "default", "moqe"):
            fail(f"{label} quantization.isq_organization must be default or moqe, not {q.isq_organization!r}")
        if m.adapter or m.multimodal:
            fail(f"{label} {'adapter' if m.adapter else 'multimodal'} settings are not supported yet in this build")


def service_options(cfg: FromConfig, model: ModelEntry) -> Any:
    """`ServiceOptions` for one [[models]] entry, with the shared sections applied."""
    from mistralrs.serving import ServiceOptions

    pa, rt = cfg.paged_attn, cfg.runtime
    return ServiceOptions(
        model_id=model.model_id,
        kind=model.kind,
        arch=model.arch,
        dtype=model.dtype,
        cpu=model.device.cpu,
        revision=model.revision,
        token_source=cfg.global_.token_source,
        hf_cache=model.device.hf_cache,
        tokenizer_json=model.tokenizer,
        chat_template=model.chat_template or rt.chat_template,
        jinja_explicit=model.jinja_explicit or rt.jinja_explicit,
        dummy_weights=model.dummy_weights,
        format=model.format.format,
        quantized_files=model.format.quantized_file or (),
        tok_model_id=model.format.tok_model_id,
        gqa=model.format.gqa if model.format.gqa is not None else 1,
        quant=model.quantization.quant,
        isq=model.quantization.isq or model.quantization.in_situ_quant,
        isq_organization=model.quantization.isq_organization,
        from_uqff=model.quantization.from_uqff or (),
        imatrix=model.quantization.imatrix,
        calibration_file=model.quantization.calibration_file,
        topology=model.device.topology,
        device_layers=";".join(model.device.device_layers) if model.device.device_layers else None,
        max_batch_size=model.device.max_batch_size or 1,
        max_seqs=rt.max_seqs,
        max_num_batched_tokens=rt.max_num_batched_tokens,
        max_seq_len=model.device.max_seq_len,
        no_kv_cache=rt.no_kv_cache,
        prefix_cache_n=rt.prefix_cache_n,
        seed=cfg.global_.seed,
        paged_attn=pa.mode,
        pa_blk_size=pa.block_size,
        pa_context_len=pa.context_len,
        pa_memory_mb=pa.memory_mb,
        pa_memory_fraction=pa.memory_fraction,
        pa_cache_type=pa.cache_type,
        log_file=cfg.global_.log,
    )
