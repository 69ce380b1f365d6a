"""One loaded model ready to serve: files, weights, tokenizer, chat template, generation
defaults and the engine. The Python API, the HTTP server and interactive mode are thin layers
over this, so a request means the same thing whichever door it came through.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import attrs

from mistralrs.errors import ConfigError, InvalidRequest, ModelLoadError

log = logging.getLogger("mistralrs.serving")

# CPU default for the KV pool when no --pa-* option is given: what fits in this many bytes.
CPU_DEFAULT_KV_BYTES = 2 * 1024**3
GPU_DEFAULT_MEMORY_FRACTION = 0.9


@attrs.define(kw_only=True)
class ServiceOptions:
    """Everything that shapes how a model is loaded and run (CLI flags, Runner kwargs, TOML)."""

    model_id: str
    kind: str = "auto"  # auto | text | embedding: which service the model gets (mistral.rs's model-type subcommand)
    arch: str | None = None
    dtype: str = "auto"
    device: str | None = None  # None: best available device (cpu unless a GPU is present)
    cpu: bool = False
    revision: str | None = None
    token_source: str = "cache"
    hf_cache: str | None = None
    tokenizer_json: str | None = None
    chat_template: str | None = None
    jinja_explicit: str | None = None
    dummy_weights: bool = False
    # GGUF (docs/gguf.md): --format, -f/--quantized-file, --tok-model-id, --quant
    format: str | None = None  # None: GGUF when -m is a .gguf (or legacy GGML) file or -f / --quant names one
    quantized_files: tuple[str, ...] = attrs.field(default=(), converter=lambda v: tuple(
        p for item in ([v] if isinstance(v, str) else (v or ())) for p in str(item).split(";") if p.strip()))
    tok_model_id: str | None = None
    quant: str | None = None
    gqa: int = 1  # --gqa: a legacy GGML file's grouped-query factor (its KV heads are n_head / gqa)
    # quantization (docs/quantization.md)
    isq: str | None = None  # --isq / in_situ_quant: a type name or a bit count
    isq_organization: str | None = None  # default | moqe
    topology: str | None = None  # --topology YAML: per-layer isq and device
    # device mapping and distribution (docs/distributed.md)
    device_layers: str | None = None  # -n/--device-layers "0:16;1:16"
    max_batch_size: int = 1  # --max-batch-size: the automatic device map's reservation (with max_seq_len)
    tensor_parallel_size: int = 1  # -tp N: N local ranks (or the torchrun world)
    data_parallel_size: int = 1  # --data-parallel-size N: N engine replica processes
    # UQFF (docs/uqff.md): --from-uqff shards (;-separated) instead of the weights; write_uqff: after an
    # ISQ load, save the quantized model as UQFF (a .uqff path or a directory)
    from_uqff: tuple[str, ...] = attrs.field(default=(), converter=lambda v: tuple(
        p for item in ([v] if isinstance(v, str) else (v or ())) for p in str(item).split(";") if p.strip()))
    write_uqff: str | None = None
    # imatrix (docs/quantization.md): importance-weighted ISQ from a file or from calibration text
    imatrix: str | None = None
    calibration_file: str | None = None
    # engine
    max_seqs: int = 16
    max_num_batched_tokens: int = 4096
    max_seq_len: int | None = None
    no_kv_cache: bool = False
    prefix_cache_n: int = 16
    seed: int | None = None
    # KV cache / attention
    attention_backend: str | None = None
    paged_attn: str = "auto"  # auto | on | off
    pa_blk_size: int = 32
    pa_context_len: int | None = None
    pa_memory_mb: int | None = None
    pa_memory_fraction: float | None = None
    pa_cache_type: str = "auto"  # auto | f8e4m3
    log_file: str | None = None  # -l/--log: requests and responses as JSON lines

    def __attrs_post_init__(self) -> None:
        given = [n for n in ("pa_context_len", "pa_memory_mb", "pa_memory_fraction") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(
                f"{' and '.join('--' + g.replace('_', '-') for g in given)} are mutually exclusive; give only one"
            )
        if self.kind not in ("auto", "text", "embedding"):
            raise ConfigError(f"the model kind must be auto, text or embedding, not {self.kind!r}")
        if self.paged_attn not in ("auto", "on", "off"):
            raise ConfigError(f"--paged-attn must be auto, on or off, not {self.paged_attn!r}")
        if self.pa_cache_type not in ("auto", "f8e4m3"):
            raise ConfigError(f"--pa-cache-type must be auto or f8e4m3, not {self.pa_cache_type!r}")
        if self.pa_blk_size not in (8, 16, 32):
            raise ConfigError(f"--pa-blk-size must be 8, 16 or 32, not {self.pa_blk_size}")
        if self.pa_memory_fraction is not None and not 0 < self.pa_memory_fraction <= 1:
            raise ConfigError("--pa-memory-fraction must be in (0, 1]")
        if self.format not in (None, "plain", "gguf", "ggml"):
            raise ConfigError(f"--format must be plain, gguf or ggml, not {self.format!r}")
        if isinstance(self.gqa, bool) or not isinstance(self.gqa, int) or self.gqa < 1:
            raise ConfigError(f"--gqa must be a positive integer, not {self.gqa!r}")
        if self.quant and self.isq:
            raise ConfigError("--quant and --isq conflict; give one")
        if self.from_uqff and (self.isq or self.quant or self.topology):
            flag = "--isq" if self.isq else "--quant" if self.quant else "--topology"
            raise ConfigError(f"--from-uqff and {flag} conflict: a UQFF file is already quantized; give one")
        if self.imatrix and self.calibration_file:
            raise ConfigError("--imatrix and --calibration-file conflict: the calibration text makes an imatrix; give one")
        if (self.imatrix or self.calibration_file) and not (self.isq or self.quant or self.topology):
            flag = "--imatrix" if self.imatrix else "--calibration-file"
            raise ConfigError(f"{flag} guides in-situ quantization; give --isq TYPE with it")
        if self.from_uqff and self.write_uqff:
            raise ConfigError("--from-uqff and write_uqff conflict: the model is already a UQFF file")


def pick_device(registry: Any, *, cpu: bool = False, device: str | None = None) -> str:
    """`--cpu`, else an explicit device, else the highest-priority device plugin that is available."""
    if cpu:
        return "cpu"
    if device:
        check_device(registry, device)
        return device
    for spec in sorted(registry.devices, key=lambda s: -s.priority):
        try:
            if spec.available():
                return spec.device_type
        except Exception:  # noqa: BLE001 - a broken probe must not stop loading
            continue
    return "cpu"


def check_device(registry: Any, device: str) -> None:
    """An explicit device must be one a device plugin provides and is available here: a clear
    ConfigError now (naming why, e.g. a CPU-only torch) rather than a torch error mid-load."""
    from mistralrs.nn.kernels import device_type_of

    kind = device_type_of(device)
    specs = [s for s in registry.devices if s.device_type == kind]
    if not specs:
        known = ", ".join(sorted({s.device_type for s in registry.devices}))
        raise ConfigError(f"--device {device}: no device plugin provides {kind!r} (known: {known})")
    for spec in specs:
        try:
            if spec.available():
                return
        except Exception:  # noqa: BLE001 - a broken probe means "not available"
            continue
    why = ""
    for spec in specs:
        try:
            why = (spec.info() or {}).get("unavailable", "") if spec.info else ""
        except Exception:  # noqa: BLE001
            why = ""
        if why:
            break
    raise ConfigError(f"--device {device}: {kind} is not available on this machine"
                      + (f" ({why})" if why else "") + "; use --cpu, or omit --device to pick the best available")


def isq_plan(opts: ServiceOptions, device: str, registry: Any) -> Any:
    """The per-layer quantizer choice for --isq / --topology (None: nothing to quantize).
    Bad types and topology files fail here, before any weight is read."""
    if not opts.isq and not opts.topology:
        return None
    from mistralrs.nn.kernels import device_type_of
    from mistralrs.quantization import IsqPlan, resolve_isq_type

    kind = device_type_of(device)
    topology = None
    if opts.topology:
        from mistralrs.topology import load_topology

        def validate(name: str) -> str | None:
            try:
                resolve_isq_type(name, device_type=kind, registry=registry, source="isq")
            except ConfigError as exc:
                return str(exc)
            return None

        topology = load_topology(opts.topology, validate_isq=validate)
    plan = IsqPlan(opts.isq, device_type=kind, registry=registry, topology=topology,
                   organization=opts.isq_organization)
    return plan if plan.active else None


def device_map_for(opts: ServiceOptions, device: str) -> Any:
    """What places the layers (`loading.load_model`'s `device_map`): ``-n``, else the topology's
    ``device:`` keys, else on an accelerator the automatic fit (everything on `device` when it
    fits); None on the CPU. A function of the meta-device model, which knows its layer count."""
    from mistralrs import device_map as dm
    from mistralrs.device_placement import decoder_layers
    from mistralrs.nn.kernels import device_type_of

    kind = device_type_of(device)
    accelerator = None if kind == "cpu" else kind
    if opts.device_layers:
        entries = dm.parse_device_layers(opts.device_layers, accelerator=accelerator)
        return lambda model: dm.plan_from_device_layers(entries, len(decoder_layers(model)))
    if opts.topology:
        from mistralrs.topology import load_topology

        topology = load_topology(opts.topology)
        if any(t.device for t in topology_entries(topology)):
            return lambda model: dm.plan_from_topology(topology, len(decoder_layers(model)), primary=device,
                                                       accelerator=accelerator)
    if kind != "cuda" or opts.tensor_parallel_size > 1:  # automatic mapping: CUDA GPUs (then the CPU) only
        return None
    visible = dm.accelerators(kind)
    if not visible:
        return None

    first = device if ":" in device else f"{device}:0" if kind == "cuda" else device

    def automatic(model: Any) -> Any:
        sizes = dm.model_sizes(model, model.kv_cache_shape())
        capacities = dm.free_memory([first, *(d for d in visible if d != first)])
        cpu_free = dm.free_memory(["cpu"])[0].free_bytes
        plan = dm.auto_plan(sizes, capacities, max_seq_len=opts.max_seq_len or 4096,
                            max_batch_size=opts.max_batch_size, cpu_free_bytes=cpu_free)
        if not plan.trivial:
            log.info("automatic device map: %s", "; ".join(f"{r['device']}: {r['layers']}" for r in plan.summary()))
        return plan

    return automatic


def topology_entries(topology: Any) -> list[Any]:
    return [r[2] for r in topology.ranges] + [p[1] for p in topology.patterns]


def _max_model_len(config: Mapping[str, Any], override: int | None) -> int:
    if override:
        return override
    text = config.get("text_config")  # vision-language configs keep the language model's there
    for source in (config, text if isinstance(text, Mapping) else {}):
        for key in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
            if isinstance(source.get(key), int):
                return int(source[key])
    return 4096


def gpu_free_bytes(device: str) -> int:
    """Memory of that GPU ("cuda:1") the KV pool can take once the model is loaded: what the driver reports
    free, plus what torch's caching allocator holds but no tensor uses (freed while loading; the driver
    counts it as used)."""
    import torch

    dev = torch.device(device)
    free, _ = torch.cuda.mem_get_info(dev)
    idle = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    return int(free + max(0, idle))


def kv_cache_blocks(opts: ServiceOptions, *, bytes_per_block: int, device: str, max_model_len: int,
                    reserved_bytes: int = 0) -> int:
    """Blocks in the KV pool, from --pa-context-len / --pa-memory-mb / --pa-memory-fraction or the
    default: on CPU, enough for max_seqs full contexts capped at 2 GiB; on GPUs 90% of free memory.
    `reserved_bytes` (the recurrent state of max_seqs sequences, hybrid models) comes out of a
    memory budget first."""
    bs = opts.pa_blk_size
    if opts.pa_context_len is not None:
        return max(1, -(-opts.pa_context_len // bs))
    if opts.pa_memory_mb is not None:
        return max(1, (opts.pa_memory_mb * 1024 * 1024 - reserved_bytes) // bytes_per_block)
    from mistralrs.nn.kernels import device_type_of

    if device_type_of(device) == "cuda":
        fraction = opts.pa_memory_fraction or GPU_DEFAULT_MEMORY_FRACTION
        return max(1, (int(gpu_free_bytes(device) * fraction) - reserved_bytes) // bytes_per_block)
    if opts.pa_memory_fraction is not None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return max(1, (int(total * opts.pa_memory_fraction) - reserved_bytes) // bytes_per_block)
    wanted = opts.max_seqs * -(-max_model_len // bs)
    return max(1, min(wanted, (CPU_DEFAULT_KV_BYTES - reserved_bytes) // bytes_per_block))


class ModelService:
    """A loaded model plus its engine."""

    kind = "text"  # frontends route chat and completions here (embedding models: EmbeddingService)
    processor: Any = None  # a vision architecture's input processor (images -> tokens + MmItems)

    world: Any = None  # the tensor-parallel `distributed.world.World`, when distributed

    def __init__(self, opts: ServiceOptions, *, registry: Any = None, world: Any = None) -> None:
        from mistralrs.gguf.files import resolve_gguf_source
        from mistralrs.hub import fetch_model, gguf_file_names

        if registry is None:
            from mistralrs.plugins import get_registry

            registry = get_registry()
        self.opts = opts
        self.registry = registry
        self.model_id = opts.model_id
        if opts.data_parallel_size > 1:  # `serve` runs the replicas before any service exists
            raise ConfigError("--data-parallel-size runs engine replicas behind `mistralrs serve`; other commands "
                              "and the Python API run one engine (use -tp to split a model)")

        self.gguf_source = (None if opts.model_id == "demo" or opts.from_uqff
                            else resolve_gguf_source(opts, fetch_model, gguf_file_names))
        if self.gguf_source is None and opts.quant and not opts.isq:
            opts.isq = opts.quant  # --quant on a safetensors model: in-situ quantization to that level
        if self.gguf_source is None and opts.gqa != 1:
            log.warning("--gqa %d is ignored: it applies to legacy GGML files only", opts.gqa)
        device = pick_device(registry, cpu=opts.cpu, device=opts.device)
        self.world = world if world is not None else self._join_world(opts, device)
        if self.world is not None:
            device = self.world.device
            if self.gguf_source is not None or opts.from_uqff:
                raise ConfigError("tensor parallelism splits safetensors models (float, or --isq); a GGUF or UQFF "
                                  "model runs with -tp 1")
            if opts.device_layers:
                raise ConfigError("-n/--device-layers and tensor parallelism conflict; give one")
        if self.gguf_source is not None:
            self._init_gguf(opts, registry, device)
        elif opts.from_uqff:
            self._init_uqff(opts, registry, device, fetch_model)
        else:
            self._init_plain(opts, registry, device, fetch_model)
        self._init_engine(opts, registry, device)

    def _init_plain(self, opts: ServiceOptions, registry: Any, device: str, fetch_model: Any) -> None:
        self._gguf_eog: tuple[int, ...] = ()
        self.files = resolve_model_files(opts, fetch_model)
        plan = isq_plan(opts, device, registry)
        if plan is not None and plan.topology is not None and self.files.config is not None:
            from mistralrs.loading import read_config

            layers = read_config(self.files.config).get("num_hidden_layers")
            if isinstance(layers, int):
                plan.topology.check_layers(layers)
        tensor_parallel = None
        if self.world is not None:
            from mistralrs.distributed.sharding import TensorParallel

            tensor_parallel = TensorParallel(self.world.rank, self.world.size)
        self.loaded = load_quantized(self.files, opts, plan, device, registry,
                                     tokenizer=lambda: tokenizer_of(opts, self.files.root),
                                     tensor_parallel=tensor_parallel)
        if self.world is not None and self.loaded.arch.processor is not None:
            raise ConfigError(f"{opts.model_id}: tensor parallelism does not split vision models yet; use -tp 1")
        if self.loaded.arch.kind_of_model == "embedding":
            raise ConfigError(f"{opts.model_id} is an embedding model ({self.loaded.arch.name}): it makes embeddings, "
                              "not text; serve it (`mistralrs serve -m ...`, POST /v1/embeddings) or use Which.Embedding")
        if plan is not None:
            plan.log_summary()
        if opts.write_uqff:
            self.write_uqff(opts.write_uqff, plan)
        self._init_tokenizer(opts, self.files.root)
        if self.loaded.arch.processor is not None:
            from mistralrs.specs import resolve

            self.processor = resolve(self.loaded.arch.processor)(self.files.root, self.loaded.config, self.tokenizer)

    def write_uqff(self, output: str, plan: Any) -> Path:
        """Save the ISQ-loaded model as UQFF (`output`: a .uqff path or a directory)."""
        from mistralrs.uqff.writer import plan_output, write_metadata, write_shards

        if plan is None or plan.default is None:
            raise ConfigError("write_uqff needs in-situ quantization: give --isq / in_situ_quant with it")
        label = plan.default.name
        out = plan_output(output, [label])
        report = write_shards(self.loaded.model, out.directory, out.stems[label], quant=label, registry=self.registry,
                              targeted=plan.target_name)
        path = write_metadata(self.loaded.model, out.directory, self.files.root, outputs=[report],
                              base_model=self.model_id)
        log.info("UQFF %s written to %s (%s)", label, out.directory, ", ".join(report["shards"]))
        return path

    def _init_uqff(self, opts: ServiceOptions, registry: Any, device: str, fetch_model: Any) -> None:
        """A UQFF model: config, tokenizer and the residual from the -m directory or repository,
        the layers from the --from-uqff shards (docs/uqff.md)."""
        from mistralrs.nn.kernels import device_type_of
        from mistralrs.uqff.loading import load_uqff, resolve_uqff_files

        self._gguf_eog = ()
        kind = device_type_of(device)
        local = Path(opts.model_id).expanduser()
        if local.is_dir():
            self.files = fetch_model(opts.model_id, require_weights=False)
        else:
            names = hub_uqff_names(opts, registry, kind)
            self.files = fetch_model(opts.model_id, revision=opts.revision, token_source=opts.token_source,
                                     hf_cache=opts.hf_cache, require_weights=False, extra_files=names)
        files = resolve_uqff_files(opts.from_uqff, self.files.root, device_type=kind, registry=registry)
        self.loaded = load_uqff(files, config_dir=self.files.root, arch=opts.arch, dtype=opts.dtype, device=device,
                                registry=registry)
        self._init_tokenizer(opts, self.files.root)

    def _init_tokenizer(self, opts: ServiceOptions, root: Path) -> None:
        from mistralrs.chat_template import ChatTemplate
        from mistralrs.generation_config import load_generation_config

        self.tokenizer = tokenizer_of(opts, root)
        self.chat_template = ChatTemplate.load(
            root, chat_template_file=opts.chat_template, jinja_explicit=opts.jinja_explicit,
            model_name=opts.model_id,
        )
        self.generation_defaults = load_generation_config(root)

    def _init_gguf(self, opts: ServiceOptions, registry: Any, device: str) -> None:
        """A GGUF model: weights from the file(s); tokenizer and chat template from --tok-model-id,
        else from the GGUF metadata."""
        from mistralrs.chat_template import ChatTemplate
        from mistralrs.generation_config import GenerationDefaults, load_generation_config
        from mistralrs.gguf.loading import load_gguf
        from mistralrs.tokenization import Tokenizer

        source = self.gguf_source
        assert source is not None
        self._gguf_eog = ()
        if opts.isq:
            raise ConfigError("--isq applies to safetensors models; a GGUF file is already quantized")
        if opts.topology:
            from mistralrs.topology import load_topology

            if any(t.isq for t in topology_entries(load_topology(opts.topology))):
                raise ConfigError(f"{opts.topology}: isq entries apply to safetensors models; a GGUF file is already "
                                  "quantized (its device entries place layers)")
        self.files = None
        self.loaded = load_gguf(source.paths, arch=opts.arch, dtype=opts.dtype, device=device, registry=registry,
                                tokenizer_dir=source.tok_root, gqa=opts.gqa, device_map=device_map_for(opts, device))
        tok_dir = source.tok_root
        if opts.tokenizer_json or tok_dir is not None:
            tok_path = Path(opts.tokenizer_json) if opts.tokenizer_json else tok_dir / "tokenizer.json"  # type: ignore[operator]
            cfg = tok_path.parent / "tokenizer_config.json"
            self.tokenizer = Tokenizer.from_files(tok_path, cfg if cfg.is_file() else None)
            gguf_templates: dict[str, str] = {}
        else:
            from mistralrs.gguf.tokenizer import tokenizer_from_gguf

            built = tokenizer_from_gguf(self.loaded.gguf.metadata, source=str(source.paths[0]))
            self.tokenizer = Tokenizer(built.tokenizer, built.tokenizer_config(), name=source.paths[0].name)
            # the default template and the named ones (tokenizer.chat_template.<name>, e.g. tool_use)
            gguf_templates = {**built.chat_templates, **({"default": built.chat_template} if built.chat_template else {})}
            # llama.cpp's end-of-generation set (eos, eot, eom ...): a Llama 3 file whose eos is
            # <|end_of_text|> still stops at <|eot_id|>
            self._gguf_eog = tuple(int(i) for i in built.eog_token_ids)
        self.chat_template = ChatTemplate.load(
            tok_dir, chat_template_file=opts.chat_template, jinja_explicit=opts.jinja_explicit,
            model_name=opts.model_id,
        )
        if not self.chat_template.available and gguf_templates:
            # the last source in mistral.rs's precedence: tokenizer.chat_template in the GGUF metadata
            specials = {k: v for k, v in (("bos_token", self.tokenizer.bos_token),
                                          ("eos_token", self.tokenizer.eos_token)) if v}
            self.chat_template = ChatTemplate(gguf_templates, source=f"{source.paths[0]} (GGUF metadata)",
                                              special_tokens=specials, model_name=opts.model_id)
        gen_dir = tok_dir or source.root
        self.generation_defaults = load_generation_config(gen_dir) if gen_dir else GenerationDefaults()

    def _init_engine(self, opts: ServiceOptions, registry: Any, device: str) -> None:
        import torch

        from mistralrs.engine.engine import Engine, EngineConfig
        from mistralrs.generation_config import merge_eos
        from mistralrs.loading import build_attention_backend

        config = self.loaded.config
        self.eos_token_ids = merge_eos(
            config.get("eos_token_id"), self.generation_defaults.eos_token_ids, self.tokenizer.eos_token_id
        )
        self.eos_token_ids += tuple(i for i in self._gguf_eog if i not in self.eos_token_ids)
        self.max_model_len = _max_model_len(config, opts.max_seq_len)
        # Attention backend and KV pool.
        kv_dtype = torch.float8_e4m3fn if opts.pa_cache_type == "f8e4m3" else None
        probe = build_attention_backend(
            self.loaded, name=self._backend_name(), num_blocks=0, block_size=opts.pa_blk_size,
            dtype=kv_dtype, device=device, registry=registry,
        )
        recurrent = probe.shape.recurrent
        state_bytes = recurrent.bytes_per_sequence() * opts.max_seqs if recurrent is not None else 0
        num_blocks = 0 if opts.no_kv_cache else kv_cache_blocks(
            opts, bytes_per_block=probe.bytes_per_block(), device=device, max_model_len=self.max_model_len,
            reserved_bytes=state_bytes,
        )
        if self.world is not None:
            from mistralrs.distributed.world import agree_min

            num_blocks = agree_min(num_blocks, self.world)  # every rank's pool has the same block ids
        self.backend = build_attention_backend(
            self.loaded, name=self._backend_name(), num_blocks=num_blocks, block_size=opts.pa_blk_size,
            dtype=kv_dtype, device=device, registry=registry, num_state_slots=opts.max_seqs,
        ) if num_blocks else probe
        self.engine = Engine(
            self.loaded.model, self.backend, self.tokenizer,
            config=EngineConfig(
                max_seqs=opts.max_seqs, max_num_batched_tokens=opts.max_num_batched_tokens,
                block_size=opts.pa_blk_size, prefix_cache_n=0 if opts.no_kv_cache else opts.prefix_cache_n,
                no_kv_cache=opts.no_kv_cache, seed=opts.seed, max_model_len=self.max_model_len,
            ),
            eos_token_ids=self.eos_token_ids,
            generation_defaults=self.generation_defaults,
            device=device,
            vocab_size=config.get("vocab_size"),
            request_log=_request_log(opts.log_file, self.tokenizer),
        )
        if self.world is not None:
            # every rank must run each step's ops (their collectives) exactly once, in step: no decode graphs,
            # whose captures run extra forwards on one rank
            self.engine.runner.graphs, self.engine.graphs_off = None, "tensor parallelism"
        if self.world is not None and self.world.is_leader:
            from mistralrs.distributed.steps import LeaderRunner

            self.engine.runner = LeaderRunner(self.loaded.model, self.backend, device, self.world)
        self.device = device
        self._warm_up()
        log.info(
            "loaded %s (%s, %s on %s) with the %s attention backend, %d KV blocks of %d tokens%s",
            opts.model_id, self.loaded.arch.name, str(self.loaded.dtype).removeprefix("torch."), device,
            self.backend.name, num_blocks, opts.pa_blk_size,
            f", recurrent state for {opts.max_seqs} sequences ({state_bytes / 2**20:.1f} MiB)"
            if state_bytes and num_blocks else "",
        )

    def _warm_up(self) -> None:
        """One 1-token forward (no KV cache) before serving: the first use of the kernels builds or
        loads the native ones (seconds, once per machine), so the first request does not wait for it.
        A model that cannot run one token fails here, at load, with its error."""
        import torch

        dev = self.device
        try:
            with torch.inference_mode():
                zero = torch.zeros(1, dtype=torch.long, device=dev)
                hidden = self.loaded.model.forward(zero, zero, self.backend.batch([0, 1], [1]))
                self.loaded.model.compute_logits(hidden)
        except Exception as exc:
            raise ModelLoadError(
                f"{self.opts.model_id}: a one-token test forward failed ({type(exc).__name__}: {exc}); "
                "the model or its plugin is broken"
            ) from exc

    @staticmethod
    def _join_world(opts: ServiceOptions, device: str) -> Any:
        """`-tp N` or a launcher's environment: join (or create) the tensor-parallel world."""
        from mistralrs.distributed.world import join_world, rendezvous_from_env
        from mistralrs.nn.kernels import device_type_of

        if rendezvous_from_env(opts.tensor_parallel_size) is None:
            return None
        return join_world(opts, device_type_of(device))

    def _backend_name(self) -> str | None:
        if self.opts.attention_backend:
            return self.opts.attention_backend
        if self.opts.paged_attn == "off":
            return "sdpa"
        return None  # the highest-priority backend for this device and dtype

    # -- prompts ----------------------------------------------------------------------------
    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        return self.chat_template.render(
            messages, tools=tools, add_generation_prompt=add_generation_prompt,
            bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token,
            **{k: v for k, v in template_kwargs.items() if v is not None},
        )

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[int]:
        # Templates write BOS themselves; like transformers, add no special tokens here.
        return self.tokenizer.encode(self.render_chat(messages, **kwargs), add_special_tokens=False)

    def encode_prompt(self, text: str, *, add_special_tokens: bool, truncating: bool = False) -> list[int]:
        """A request's prompt as token ids. Unless it is to be truncated, a prompt that cannot
        fit the context even at the vocabulary's longest tokens is refused before tokenizing:
        a 40 MB prompt would otherwise keep a core busy for a minute."""
        if not truncating:
            least = self.tokenizer.min_tokens(text) if hasattr(self.tokenizer, "min_tokens") else 0
            if least >= self.max_model_len:
                from mistralrs.engine.engine import ContextTooLong

                raise ContextTooLong(least, self.max_model_len, at_least=True)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_completion(self, prompt: str | Sequence[int], *, truncating: bool = False) -> list[int]:
        if isinstance(prompt, str):
            return self.encode_prompt(prompt, add_special_tokens=True, truncating=truncating)
        ids = list(prompt)
        if not all(isinstance(t, int) for t in ids):
            raise InvalidRequest("prompt must be a string or a list of token ids", "prompt")
        return ids

    def truncate(self, ids: list[int], max_tokens: int | None) -> list[int]:
        """Keep the end of a prompt so it and max_tokens fit the context (truncate_sequence)."""
        room = self.max_model_len - (max_tokens or 1)
        return ids[-max(room, 1):] if len(ids) > room else ids

    def re_isq(self, isq: str) -> dict[str, int]:
        """Re-quantize the loaded model to `isq` between two engine steps (`requantize`); the type is
        checked here first (a ConfigError naming it). Returns {type: layers}."""
        from mistralrs.nn.kernels import device_type_of
        from mistralrs.quantization import IsqPlan
        from mistralrs.requantize import requantize

        if self.world is not None:
            raise ConfigError("re-ISQ of a tensor-parallel model is not supported; restart it with --isq")
        plan = IsqPlan(isq, device_type=device_type_of(str(self.loaded.device)), registry=self.registry,
                       organization=self.opts.isq_organization, source="ggml_type")
        counts = self.engine.call_between_steps(lambda: requantize(self.loaded.model, plan)).result()
        plan.log_summary()
        log.info("re-ISQ to %s: %s", isq, ", ".join(f"{n} layers {t}" for t, n in sorted(counts.items())))
        return counts

    def shutdown(self) -> None:
        self.engine.shutdown()
        if self.world is not None:
            self.world.closing = True
            stop = getattr(self.engine.runner, "stop_followers", None)
            if stop is not None:
                stop()
            self.world.close()


def _request_log(path: str | None, tokenizer: Any) -> Any:
    if not path:
        return None
    from mistralrs.engine.request_log import RequestLog

    return RequestLog(path, tokenizer)


def tokenizer_of(opts: ServiceOptions, root: Path) -> Any:
    """The model's tokenizer: -t/--tokenizer, else ``tokenizer.json`` (and its config) in `root`."""
    from mistralrs.tokenization import Tokenizer

    tok_path = Path(opts.tokenizer_json) if opts.tokenizer_json else root / "tokenizer.json"
    if not tok_path.is_file():
        raise ModelLoadError(f"no tokenizer.json for {opts.model_id} (looked at {tok_path}); pass one with -t/--tokenizer")
    cfg = root / "tokenizer_config.json"
    return Tokenizer.from_files(tok_path, cfg if cfg.is_file() else None)


def load_quantized(files: Any, opts: ServiceOptions, plan: Any, device: str, registry: Any, *,
                   tokenizer: Any = None, kind: str | None = None, tensor_parallel: Any = None) -> Any:
    """`load_model` with the ISQ plan (None: float). ``--imatrix``: the plan's quantizers get each
    layer's importance. ``--calibration-file``: the model first loads in float and the text runs
    through it to collect the imatrix; that model is dropped and the ISQ load runs with the
    imatrix, quantizing from the checkpoint's tensors as a plain ``--isq`` load does (peak memory:
    the float model, then the quantized one). `tokenizer` is a function giving the tokenizer.
    `kind`: the architecture kind to choose (``embedding``; None: a generative one first)."""
    from mistralrs.loading import load_model

    device_map = device_map_for(opts, device)

    def load(quant_method_for: Any) -> Any:
        return load_model(files, arch=opts.arch, dtype=opts.dtype, device=device, dummy_weights=opts.dummy_weights,
                          registry=registry, seed=opts.seed or 0, quant_method_for=quant_method_for, kind=kind,
                          device_map=device_map, tensor_parallel=tensor_parallel)

    if plan is not None and opts.imatrix:
        from mistralrs.imatrix import read_imatrix

        plan.importance = read_imatrix(opts.imatrix)
    elif plan is not None and opts.calibration_file:
        import gc

        from mistralrs.imatrix import calibration_ids, collect_imatrix

        assert tokenizer is not None
        ids = calibration_ids(tokenizer(), opts.calibration_file)
        float_model = load(None)
        plan.importance = collect_imatrix(float_model.model, ids, source=f"--calibration-file {opts.calibration_file}")
        del float_model
        gc.collect()
        log.info("imatrix from %d calibration tokens over %d layers", len(ids), len(plan.importance))
    loaded = load(plan.method_for if plan is not None else None)
    if plan is not None and plan.importance is not None:
        log.info("imatrix: %d of %d quantized layers weighted by importance (%s)", len(plan.importance.used),
                 sum(plan.counts.values()), plan.importance.source)
    return loaded


def hub_uqff_names(opts: ServiceOptions, registry: Any, device_type: str) -> list[str]:
    """The files of a Hub repository a --from-uqff load needs (shards, siblings, the residual)."""
    from mistralrs.hub import repo_file_names
    from mistralrs.uqff.loading import shards_in_listing

    listing = repo_file_names(opts.model_id, ".uqff", revision=opts.revision, token_source=opts.token_source,
                              hf_cache=opts.hf_cache)
    return shards_in_listing(opts.from_uqff, listing, device_type=device_type, registry=registry,
                             where=f"repository {opts.model_id}")


def resolve_model_files(opts: ServiceOptions, fetch: Any) -> Any:
    """Model files for an id or directory; `demo` is the packaged offline demo model."""
    if opts.model_id == "demo":
        from mistralrs.demo import demo_model_dir

        opts.dummy_weights = True
        return fetch(str(demo_model_dir()), require_weights=False)
    return fetch(
        opts.model_id, revision=opts.revision, token_source=opts.token_source, hf_cache=opts.hf_cache,
        require_weights=not opts.dummy_weights,
    )
