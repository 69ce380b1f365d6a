"""Our engine against llama.cpp, side by side, on the same dummy-weight Llama of Llama-3.2-1B's
shape (hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV heads, vocab 128256, tied
embeddings, rope theta 500000 with llama3 rope scaling) on the same number of threads, for the
weight types bf16, q8_0, q4_0 and q4k (llama.cpp: BF16, Q8_0, Q4_0, Q4_K_M).

For each type it prints our figure, llama.cpp's and the ratio (ours / llama.cpp) of:

* prefill tok/s: a 512-token prompt. Ours: the best of ``--reps`` requests for one token (wall
  time); llama.cpp: the best sample of ``llama-bench -p 512`` over REPS runs. By default the two
  sides alternate, one llama-bench run (prefill and decode) before each of our prefill + decode
  reps, so that both are measured in the same minutes (these machines drift by tens of percent
  from one minute to the next); ``--no-interleave`` runs ``llama-bench -r REPS`` first instead.
* decode tok/s at batch 1. Ours: a 16-token prompt, ``--gen-len`` greedy tokens, tokens after the
  first over the time after the first (``Usage.completion_tok_per_sec``), the best of ``--reps``
  requests; llama.cpp: the best sample of ``llama-bench -n GEN_LEN -r REPS`` (generation from an
  empty context).
* q4k only (``--aggregate-types``): aggregate decode tok/s of ``--concurrency`` (16) concurrent
  requests of 16-token prompts and ``--agg-gen-len`` tokens each. Ours: 16 requests submitted
  together to our engine; llama.cpp: ``llama-server -np 16`` (16 slots, continuous batching) and
  16 concurrent ``/completion`` HTTP requests (token-id prompts, ``ignore_eos``). Both count the
  tokens after each request's first over the decode window (from the last first token to the
  last token), as ``benchmarks/engine_speed.py`` does; llama.cpp's first-token times are the
  response times minus the server's ``timings.predicted_ms``. ``llama-batched-bench`` (npp 16,
  ntg AGG_GEN_LEN, npl 16; its S_TG) is reported beside it as the server-free reference. Our side
  runs an unmeasured round of 16 short requests first (decode graphs are captured once per batch size).

The llama.cpp models are GGUF files written directly with the ``gguf`` package (random
normal(0, 0.02) weights in BF16, norms 1, the ``rope_freqs`` tensor convert_hf_to_gguf.py writes
for llama3 rope scaling, and a synthetic 128256-token byte-level BPE vocabulary with Llama 3's
special tokens and pre-tokenizer), then ``llama-quantize`` to Q8_0, Q4_0 and Q4_K_M. They are
cached under ``--cache-dir`` (default ``$QUANT_SPEED_CACHE`` or ``/tmp/mistralrs-quant-speed``).
Our side loads the same shape from a config.json with ``dummy_weights=True`` (as
``benchmarks/engine_speed.py``) and quantizes at load with ISQ (``ServiceOptions(isq=...)``);
when this build has no ISQ (or not the type), the quantized rows of our side say "not available".

llama.cpp is found through ``LLAMA_CPP_DIR`` (binaries in ``$LLAMA_CPP_DIR/bin``); when it is
unset (or ``--skip-llama``), only our side runs and the JSON says so.

The JSON records the load average at the start and the end: on a 2-core machine any other work
skews every figure (llama.cpp's OpenMP threads, which spin at barriers, the most).

    LLAMA_CPP_DIR=/path/to/llama-build python benchmarks/quant_speed.py \\
        [--types bf16,q8_0,q4_0,q4k] [--threads 2] [--skip-llama] [--out benchmarks/results/quant_speed.json]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_speed import LLAMA_3_2_1B  # noqa: E402  - the shape our other benchmarks use

# Llama-3.2-1B's config: the engine_speed shape plus what the real config.json adds.
CONFIG = {
    **LLAMA_3_2_1B,
    "max_position_embeddings": 131072,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": 128001, "initializer_range": 0.02,
    "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
}

TYPES = ("bf16", "q8_0", "q4_0", "q4k")
LLAMA_TYPES = {"bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4k": "Q4_K_M"}
SHORT_PROMPT = 16  # prompt length of the decode measurements


class NotAvailable(Exception):
    """Our engine cannot run this weight type in this build."""


# --------------------------------------------------------------------------------------------
# machine


def write_model_dir(model_dir: Path) -> None:
    """The dummy model our side loads: CONFIG and the demo tokenizer (enough: both engines get token ids)."""
    from mistralrs.demo import demo_model_dir

    (model_dir / "config.json").write_text(json.dumps(CONFIG))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).write_bytes((demo_model_dir() / name).read_bytes())


def machine_info() -> dict:
    cpu, flags = platform.processor() or "unknown", []
    try:
        text = Path("/proc/cpuinfo").read_text()
        if m := re.search(r"^model name\s*:\s*(.+)$", text, re.M):
            cpu = m.group(1).strip()
        if m := re.search(r"^flags\s*:\s*(.+)$", text, re.M):
            wanted = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx_vnni_int8")
            flags = sorted(f for f in m.group(1).split() if f in wanted or f.startswith(("avx512", "amx")))
    except OSError:
        pass
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "cpu": cpu, "cpu_flags": flags, "logical_cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "mistralrs_commit": commit,
        "loadavg_1_5_15": os.getloadavg(),  # other work on the machine skews every figure
    }


def prompt_ids(seed: int, n: int) -> list[int]:
    """The same random token ids for both engines (clear of the special tokens)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(1000, CONFIG["vocab_size"] - 1000) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# our side


def open_ours(qtype: str, args: argparse.Namespace, model_dir: Path, gguf: Path | None = None):
    """A ModelService for `qtype`: bf16 weights, quantized at load (ISQ) for the other types.
    The same code path as benchmarks/engine_speed.py. With `gguf` (``--source gguf``): the very
    file llama.cpp runs, loaded as a GGUF model."""
    import attrs

    from mistralrs.serving import ModelService, ServiceOptions

    ctx = (args.prompt_len + args.gen_len + 64) * (args.concurrency + 1)
    if gguf is not None:
        return ModelService(ServiceOptions(model_id=str(gguf), dtype="bf16", max_seqs=args.concurrency,
                                           pa_context_len=ctx))
    extra = {}
    if qtype != "bf16":
        names = {f.name for f in attrs.fields(ServiceOptions)}
        field = next((n for n in ("isq", "in_situ_quant") if n in names), None)
        if field is None:
            raise NotAvailable("this build has no ISQ (ServiceOptions has no isq field)")
        extra[field] = qtype
    try:
        return ModelService(ServiceOptions(
            model_id=str(model_dir), dtype="bf16", dummy_weights=True, max_seqs=args.concurrency,
            pa_context_len=ctx, **extra,
        ))
    except Exception as e:  # noqa: BLE001 - an unsupported type is a result, not a crash
        if qtype == "bf16":
            raise
        raise NotAvailable(f"{type(e).__name__}: {e}") from e


def _run(engine, reqs: list) -> list:
    from mistralrs import protocol as P

    handles = [engine.submit(r) for r in reqs]
    return [P.collect(h)[0] for h in handles]


def _request(seed: int, n_prompt: int, max_tokens: int):
    from mistralrs.engine.engine import GenerationRequest
    from mistralrs.engine.sampling import SamplingParams

    return GenerationRequest(prompt_ids=prompt_ids(seed, n_prompt), sampling=SamplingParams(temperature=0),
                             max_tokens=max_tokens, ignore_eos=True)


def ours_prefill(svc, prompt_len: int, reps: int, first: int = 0) -> dict:
    """A `prompt_len`-token prompt for one token (distinct prompts: no prefix-cache hits)."""
    rates = []
    for i in range(first, first + reps):
        t = time.perf_counter()
        _run(svc.engine, [_request(100 + i, prompt_len, 1)])
        rates.append(prompt_len / (time.perf_counter() - t))
    return {"tok_per_s": max(rates), "samples": rates}


def ours_decode(svc, gen_len: int, reps: int = 1, first: int = 0) -> dict:
    """Batch 1: tokens after the first over the time after the first; the best of `reps` requests (as
    llama-bench's best sample: on a shared machine the best is the least disturbed)."""
    rates, tokens = [], 0
    for i in range(first, first + max(1, reps)):
        done = _run(svc.engine, [_request(200 + i, SHORT_PROMPT, gen_len)])[0]
        rates.append(done.usage.completion_tok_per_sec or 0.0)
        tokens = done.usage.completion_tokens
    return {"tok_per_s": max(rates), "samples": rates, "tokens": tokens}


def ours_aggregate(svc, concurrency: int, gen_len: int) -> dict:
    """`concurrency` requests submitted together; the decode window as engine_speed.py. A short round of the
    same size runs first, unmeasured: the engine captures a decode graph once per batch size and process
    (docs/engine.md), as llama-server warms up before it serves."""
    _run(svc.engine, [_request(900 + i, SHORT_PROMPT, 4) for i in range(concurrency)])
    reqs = [_request(300 + i, SHORT_PROMPT, gen_len) for i in range(concurrency)]
    t = time.perf_counter()
    results = _run(svc.engine, reqs)
    wall = time.perf_counter() - t
    first = max(r.usage.time_to_first_token or 0.0 for r in results)
    last = max(r.usage.total_seconds for r in results)
    return {
        "tok_per_s": sum(r.usage.completion_tokens - 1 for r in results) / (last - first),
        "end_to_end_tok_per_s": sum(r.usage.completion_tokens for r in results) / wall,
        "concurrency": concurrency, "gen_len": gen_len,
    }


def _our_kernels() -> dict[str, str]:
    """Which registered kernel our side runs for each quantized matmul op on this CPU."""
    try:
        from mistralrs.plugins import get_registry

        reg = get_registry()
        return {op: reg.kernel(op, "cpu").name for op in ("qmatmul_q4_0", "qmatmul_q8_0", "qmatmul_q4k", "qmatmul_q6k")}
    except Exception as e:  # noqa: BLE001 - informational only
        return {"error": f"{type(e).__name__}: {e}"}


def _model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers as loaded (after ISQ), shared storage once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def _merged(parts: list[dict]) -> dict:
    """Single-rep measurements as one: every sample, the best as ``tok_per_s``."""
    samples = [x for p in parts for x in p["samples"]]
    return {**parts[-1], "tok_per_s": max(samples), "samples": samples}


def run_ours(qtype: str, args: argparse.Namespace, model_dir: Path, aggregate: bool, gguf: Path | None = None,
             before_rep: Callable[[int], None] | None = None) -> dict:
    """Our side; `before_rep(i)` (llama.cpp's rep i, when interleaved) runs before each prefill + decode rep."""
    try:
        t = time.perf_counter()
        svc = open_ours(qtype, args, model_dir, gguf)
    except NotAvailable as e:
        print(f"  ours {qtype}: not available ({e})", flush=True)
        return {"available": False, "error": f"not available: {e}"}
    try:
        out = {"available": True, "load_seconds": time.perf_counter() - t,
               "model_bytes": _model_bytes(svc.loaded.model), "attention_backend": svc.backend.name}
        _run(svc.engine, [_request(0, 64, 4)])  # warm-up
        prefill, decode = [], []
        for i in range(args.reps):
            if before_rep is not None:
                before_rep(i)
            prefill.append(ours_prefill(svc, args.prompt_len, 1, first=i))
            decode.append(ours_decode(svc, args.gen_len, 1, first=i))
        out["prefill"], out["decode"] = _merged(prefill), _merged(decode)
        if aggregate:
            out["aggregate"] = ours_aggregate(svc, args.concurrency, args.agg_gen_len)
        return out
    finally:
        svc.shutdown()
        del svc
        gc.collect()


# --------------------------------------------------------------------------------------------
# the llama.cpp model


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character map (byte-level BPE)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def synthetic_vocab(n_regular: int = 128000, n_special: int = 256) -> tuple[list[str], list[int], list[str]]:
    """A valid byte-level BPE vocabulary of Llama 3's size: the 256 bytes, every byte pair, then
    pair+byte triples up to `n_regular`, each with its merge; then Llama 3's special tokens."""
    b = _byte_chars()
    tokens, merges = list(b), []
    pairs = [x + y for x in b for y in b]
    for p in pairs:
        tokens.append(p)
        merges.append(f"{p[0]} {p[1]}")
    for k in range(n_regular - len(tokens)):
        p, c = pairs[k // 256], b[k % 256]
        tokens.append(p + c)
        merges.append(f"{p} {c}")
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>",
             8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>"}
    tokens += [named.get(i, f"<|reserved_special_token_{i}|>") for i in range(n_special)]
    types = [1] * n_regular + [3] * n_special  # NORMAL, CONTROL
    return tokens, types, merges


def llama3_rope_factors(cfg: dict) -> list[float]:
    """The `rope_freqs` tensor convert_hf_to_gguf.py writes for llama3 rope scaling."""
    import math

    rs, dim = cfg["rope_scaling"], cfg["head_dim"]
    low_wl = rs["original_max_position_embeddings"] / rs["low_freq_factor"]
    high_wl = rs["original_max_position_embeddings"] / rs["high_freq_factor"]
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * cfg["rope_theta"] ** (i / dim)
        if wavelen < high_wl:
            out.append(1.0)
        elif wavelen > low_wl:
            out.append(rs["factor"])
        else:
            smooth = (rs["original_max_position_embeddings"] / wavelen - rs["low_freq_factor"]) / (
                rs["high_freq_factor"] - rs["low_freq_factor"])
            out.append(1 / ((1 - smooth) / rs["factor"] + smooth))
    return out


def write_bf16_gguf(path: Path, cfg: dict, seed: int = 0) -> None:
    """The dummy model as a BF16 GGUF (F32 norms and rope factors), the tensors and metadata
    convert_hf_to_gguf.py writes for a Llama 3.2 checkpoint, streamed tensor by tensor."""
    import gguf
    import numpy as np
    import torch

    h, inter, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    nh, nkv, hd, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]
    shapes: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (vocab, h), "bf16")]
    for i in range(L):
        shapes += [
            (f"blk.{i}.attn_norm.weight", (h,), "ones"),
            (f"blk.{i}.attn_q.weight", (nh * hd, h), "bf16"),
            (f"blk.{i}.attn_k.weight", (nkv * hd, h), "bf16"),
            (f"blk.{i}.attn_v.weight", (nkv * hd, h), "bf16"),
            (f"blk.{i}.attn_output.weight", (h, nh * hd), "bf16"),
            (f"blk.{i}.ffn_norm.weight", (h,), "ones"),
            (f"blk.{i}.ffn_gate.weight", (inter, h), "bf16"),
            (f"blk.{i}.ffn_up.weight", (inter, h), "bf16"),
            (f"blk.{i}.ffn_down.weight", (h, inter), "bf16"),
        ]
    shapes += [("output_norm.weight", (h,), "ones"), ("rope_freqs.weight", (hd // 2,), "rope")]

    w = gguf.GGUFWriter(None, "llama")
    w.add_type("model")
    w.add_name("dummy Llama-3.2-1B shape")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_block_count(L)
    w.add_feed_forward_length(inter)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = synthetic_vocab(vocab - 256, 256)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(True)
    for name, shape, kind in shapes:
        if kind == "bf16":
            w.add_tensor_info(name, shape, np.dtype(np.uint16), 2 * int(np.prod(shape)),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    g = torch.Generator().manual_seed(seed)
    for _name, shape, kind in shapes:
        if kind == "bf16":
            t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            w.write_tensor_data(t.view(torch.int16).numpy().view(np.uint16))
        elif kind == "ones":
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            w.write_tensor_data(np.asarray(llama3_rope_factors(cfg), dtype=np.float32))
    w.close()


def llama_bin(llama_dir: Path, name: str) -> Path:
    for p in (llama_dir / "bin" / name, llama_dir / name):
        if p.exists():
            return p
    raise FileNotFoundError(f"{name} not found in {llama_dir}/bin")


def make_ggufs(llama_dir: Path, cache: Path, types: list[str], threads: int) -> dict[str, Path]:
    """BF16 GGUF written once, the others quantized from it with llama-quantize (cached)."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = {t: cache / f"llama-3.2-1b-shape-{LLAMA_TYPES[t]}.gguf" for t in TYPES}
    if not paths["bf16"].exists():
        print(f"writing {paths['bf16']} ...", flush=True)
        tmp = paths["bf16"].with_suffix(".tmp")
        write_bf16_gguf(tmp, CONFIG)
        tmp.rename(paths["bf16"])
    for t in types:
        if t != "bf16" and not paths[t].exists():
            print(f"llama-quantize -> {paths[t]} ...", flush=True)
            tmp = paths[t].with_suffix(".tmp")
            subprocess.run([str(llama_bin(llama_dir, "llama-quantize")), str(paths["bf16"]), str(tmp), LLAMA_TYPES[t],
                            str(threads)], check=True, stdout=subprocess.DEVNULL)
            tmp.rename(paths[t])
    return {t: paths[t] for t in types}


# --------------------------------------------------------------------------------------------
# llama.cpp's side


def llama_bench(llama_dir: Path, model: Path, threads: int, prompt_len: int, gen_len: int, reps: int) -> dict:
    """`llama-bench -p PROMPT_LEN -n GEN_LEN`: pp and tg rates (best sample, mean beside it)."""
    cmd = [str(llama_bin(llama_dir, "llama-bench")), "-m", str(model), "-t", str(threads), "-p", str(prompt_len),
           "-n", str(gen_len), "-r", str(reps), "-o", "json"]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    out: dict = {"command": " ".join(cmd[1:])}
    for row in json.loads(res.stdout):
        key = "prefill" if row["n_prompt"] else "decode"
        out[key] = {"tok_per_s": max(row["samples_ts"]), "mean_tok_per_s": row["avg_ts"],
                    "stddev_tok_per_s": row["stddev_ts"], "samples": row["samples_ts"]}
        out["build"] = {k: row.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends",
                                                "flash_attn", "n_batch", "n_ubatch", "type_k", "type_v")}
        out["model_size"] = row.get("model_size")
    return out


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class _LlamaServer:
    """``llama-server`` on a free port, up once /health answers 200; stopped on exit."""

    def __init__(self, llama_dir: Path, model: Path, threads: int, log_path: Path, *extra: str,
                 poll: float = 0.5, deadline: float = 300) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.cmd = [str(llama_bin(llama_dir, "llama-server")), "-m", str(model), "-t", str(threads), *extra,
                    "--host", "127.0.0.1", "--port", str(port)]
        self.base = f"http://127.0.0.1:{port}"
        self.log_path, self.poll, self.deadline = log_path, poll, deadline

    def __enter__(self) -> _LlamaServer:
        self.started = time.perf_counter()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.deadline
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.ready_seconds = time.perf_counter() - self.started
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not become healthy; see {self.log_path}")
            time.sleep(self.poll)

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def llama_server_aggregate(llama_dir: Path, model: Path, threads: int, concurrency: int, gen_len: int,
                           log_path: Path) -> dict:
    """`llama-server -np CONCURRENCY` and CONCURRENCY concurrent /completion requests."""
    ctx = concurrency * (SHORT_PROMPT + gen_len + 64)
    with _LlamaServer(llama_dir, model, threads, log_path, "-tb", str(threads), "-np", str(concurrency),
                      "-c", str(ctx)) as server:
        base, cmd = server.base, server.cmd

        def complete(seed: int, n: int) -> tuple[dict, float]:
            body = {"prompt": prompt_ids(seed, SHORT_PROMPT), "n_predict": n, "ignore_eos": True,
                    "temperature": 0, "cache_prompt": False, "stream": False}
            res = _post(base + "/completion", body, timeout=3600)
            return res, time.perf_counter()

        complete(0, 4)  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda i: complete(300 + i, gen_len), range(concurrency)))
        wall = time.perf_counter() - start
        ends = [t - start for _, t in results]
        firsts = [end - r["timings"]["predicted_ms"] / 1e3 for (r, _), end in zip(results, ends)]
        n = [r["timings"]["predicted_n"] for r, _ in results]
        return {
            "tok_per_s": sum(k - 1 for k in n) / (max(ends) - max(firsts)),
            "end_to_end_tok_per_s": sum(n) / wall,
            "per_request_tok_per_s": [r["timings"]["predicted_per_second"] for r, _ in results],
            "concurrency": concurrency, "gen_len": gen_len, "command": " ".join(cmd[1:]),
        }


def llama_load_seconds(llama_dir: Path, model: Path, threads: int, log_path: Path) -> float:
    """Seconds from starting ``llama-server`` on `model` to its /health answering 200 (its load
    time, with the page cache as warm as ours)."""
    with _LlamaServer(llama_dir, model, threads, log_path, "-c", "2048", poll=0.05) as server:
        return server.ready_seconds


def llama_batched_bench(llama_dir: Path, model: Path, threads: int, concurrency: int, gen_len: int) -> dict:
    """`llama-batched-bench -npp 16 -ntg GEN_LEN -npl CONCURRENCY`: S_TG, the aggregate
    generation rate with no server in between."""
    ctx = concurrency * (SHORT_PROMPT + gen_len + 64)
    cmd = [str(llama_bin(llama_dir, "llama-batched-bench")), "-m", str(model), "-t", str(threads), "-tb", str(threads),
           "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(SHORT_PROMPT), "-ntg", str(gen_len),
           "-npl", str(concurrency), "--output-format", "jsonl"]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    lines = (res.stdout + "\n" + res.stderr).splitlines()
    rows = [r for r in (json.loads(x) for x in lines if x.startswith("{")) if "speed_tg" in r]
    row = rows[-1]
    return {"tok_per_s": row["speed_tg"], "prefill_tok_per_s": row["speed_pp"], "flash_attn": row.get("flash_attn"),
            "command": " ".join(cmd[1:])}


def llama_bench_merged(reps: list[dict]) -> dict:
    """`llama_bench` runs of one rep each (interleaved with ours) as one result."""
    out = dict(reps[-1])
    out["command"] = f"{reps[-1]['command']} (x{len(reps)}, interleaved with ours)"
    for key in ("prefill", "decode"):
        samples = [x for r in reps for x in r[key]["samples"]]
        out[key] = {"tok_per_s": max(samples), "mean_tok_per_s": statistics.mean(samples),
                    "stddev_tok_per_s": statistics.pstdev(samples), "samples": samples}
    return out


def run_llama(qtype: str, args: argparse.Namespace, llama_dir: Path, model: Path, aggregate: bool,
              bench: dict | None = None) -> dict:
    """llama.cpp's side; `bench`: its llama-bench figures already measured (interleaved with ours)."""
    out = {"type": LLAMA_TYPES[qtype], "gguf": str(model), "file_bytes": model.stat().st_size}
    if args.source == "gguf":
        out["load_seconds"] = llama_load_seconds(llama_dir, model, args.threads,
                                                 Path(args.cache_dir) / f"llama-server-load-{qtype}.log")
    if bench is None:
        bench = llama_bench(llama_dir, model, args.threads, args.prompt_len, args.gen_len, args.reps)
    out.update(bench)
    if aggregate:
        out["aggregate"] = llama_server_aggregate(llama_dir, model, args.threads, args.concurrency, args.agg_gen_len,
                                                  Path(args.cache_dir) / f"llama-server-{qtype}.log")
        try:
            out["aggregate_batched_bench"] = llama_batched_bench(llama_dir, model, args.threads, args.concurrency,
                                                                 args.agg_gen_len)
        except (FileNotFoundError, subprocess.CalledProcessError, KeyError, IndexError, ValueError) as e:
            out["aggregate_batched_bench"] = {"error": f"{type(e).__name__}: {e}"}
    return out


# --------------------------------------------------------------------------------------------


METRICS = (("prefill", "prefill tok/s"), ("decode", "decode tok/s (batch 1)"), ("aggregate", "aggregate decode tok/s"))


def compare(ours: dict, llama: dict | None, aggregate: bool) -> dict:
    rows = {}
    for key, _ in METRICS:
        if key == "aggregate" and not aggregate:
            continue
        o = ours.get(key, {}).get("tok_per_s") if ours.get("available") else None
        ll = (llama or {}).get(key, {}).get("tok_per_s")
        rows[key] = {"ours": o, "llama_cpp": ll, "ratio": o / ll if o and ll else None}
    return rows


def print_table(results: dict) -> None:
    def f(x, width):
        return f"{x:{width}.2f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"

    print(f"\n{'type':6} {'metric':30} {'ours':>10} {'llama.cpp':>10} {'ratio':>7}")
    for qtype, r in results.items():
        for key, label in METRICS:
            if key in r["compare"]:
                c = r["compare"][key]
                if key == "aggregate":
                    label = f"{label} (x{r['concurrency']})"
                print(f"{qtype:6} {label:30} {f(c['ours'], 10)} {f(c['llama_cpp'], 10)} {f(c['ratio'], 7)}")
        if not r["ours"].get("available"):
            print(f"{'':6} ours: {r['ours']['error']}")
        ll_load = (r.get("llama_cpp") or {}).get("load_seconds")
        if ll_load is not None and r["ours"].get("load_seconds") is not None:
            print(f"{qtype:6} {'load seconds':30} {f(r['ours']['load_seconds'], 10)} {f(ll_load, 10)} "
                  f"{f(r['ours']['load_seconds'] / ll_load, 7)}")
        bb = (r.get("llama_cpp") or {}).get("aggregate_batched_bench")
        if bb and "tok_per_s" in bb:
            print(f"{'':6} {'  llama-batched-bench S_TG':30} {'':>10} {bb['tok_per_s']:10.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES), help=f"comma-separated, of {', '.join(TYPES)}")
    ap.add_argument("--aggregate-types", default="q4k", help="types that also get the concurrent-decode row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-llama", action="store_true", help="run only our side")
    ap.add_argument("--skip-ours", action="store_true", help="run only llama.cpp's side")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128, help="batch-1 decode tokens (llama-bench -n)")
    ap.add_argument("--agg-gen-len", type=int, default=64, help="tokens per request of the concurrent decode")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3, help="prefill and decode repetitions (ours) and llama-bench -r")
    ap.add_argument("--no-interleave", action="store_true",
                    help="run llama-bench's reps all before ours (default: one of its reps before each of ours)")
    ap.add_argument("--cache-dir", default=os.environ.get("QUANT_SPEED_CACHE",
                                                         str(Path(tempfile.gettempdir()) / "mistralrs-quant-speed")),
                    help="where the GGUF files and server logs go (not the repo)")
    ap.add_argument("--source", choices=["isq", "gguf"], default="isq",
                    help="our side: the bf16 model quantized at load (isq), or the same GGUF files llama.cpp runs")
    ap.add_argument("--out", default=None, help="default benchmarks/results/quant_speed[_gguf].json")
    args = ap.parse_args()
    if args.out is None:
        args.out = "benchmarks/results/quant_speed.json" if args.source == "isq" else "benchmarks/results/gguf_speed.json"
    if args.source == "gguf" and (args.skip_llama or not os.environ.get("LLAMA_CPP_DIR")):
        ap.error("--source gguf loads the GGUF files llama.cpp makes: set LLAMA_CPP_DIR")
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    if bad := [t for t in types if t not in TYPES]:
        ap.error(f"unknown type(s) {bad}; choose from {', '.join(TYPES)}")
    aggregate_types = {t.strip() for t in args.aggregate_types.split(",") if t.strip()}

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the CLI does; before torch allocates
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    machine = machine_info()
    if machine["loadavg_1_5_15"][0] > 0.5:
        print(f"warning: load average {machine['loadavg_1_5_15'][0]:.2f}: other work will skew the figures", flush=True)

    llama_dir = None
    llama_note = None
    if args.skip_llama:
        llama_note = "skipped (--skip-llama)"
    elif not os.environ.get("LLAMA_CPP_DIR"):
        llama_note = "LLAMA_CPP_DIR is unset: only our side was run"
    else:
        llama_dir = Path(os.environ["LLAMA_CPP_DIR"])
    if llama_note:
        print(f"llama.cpp: {llama_note}", flush=True)

    ggufs = make_ggufs(llama_dir, Path(args.cache_dir), types, args.threads) if llama_dir else {}

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        write_model_dir(model_dir)
        for qtype in types:
            agg = qtype in aggregate_types
            print(f"== {qtype}", flush=True)
            gguf = ggufs[qtype] if args.source == "gguf" else None
            llama: dict | None
            if llama_dir and not args.skip_ours and not args.no_interleave:
                # One llama-bench rep before each of our reps: the machine's speed drifts by tens of percent
                # over minutes, and alternating puts both sides in the same minutes.
                reps: list[dict] = []
                model = ggufs[qtype]

                def llama_rep(_i: int, reps: list[dict] = reps, model: Path = model) -> None:
                    reps.append(llama_bench(llama_dir, model, args.threads, args.prompt_len, args.gen_len, 1))

                ours = run_ours(qtype, args, model_dir, agg, gguf, before_rep=llama_rep)
                llama = run_llama(qtype, args, llama_dir, ggufs[qtype], agg, llama_bench_merged(reps) if reps else None)
            else:
                llama = run_llama(qtype, args, llama_dir, ggufs[qtype], agg) if llama_dir else None
                ours = {"available": False, "error": "skipped (--skip-ours)"} if args.skip_ours else \
                    run_ours(qtype, args, model_dir, agg, gguf)
            results[qtype] = {"concurrency": args.concurrency if agg else None, "ours": ours, "llama_cpp": llama,
                              "compare": compare(ours, llama, agg)}
            print_table({qtype: results[qtype]})

    out = {
        "machine": {**machine, "loadavg_at_end": os.getloadavg()},
        "threads": args.threads,
        "model": {k: CONFIG[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                          "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
                                          "rope_theta", "rope_scaling")},
        "settings": {"source": args.source, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "agg_gen_len": args.agg_gen_len,
                     "concurrency": args.concurrency, "reps": args.reps, "decode_prompt_len": SHORT_PROMPT,
                     "interleaved": bool(llama_dir) and not args.skip_ours and not args.no_interleave,
                     "aggregate_llama_cpp": "llama-server -np CONCURRENCY, concurrent /completion requests "
                                            "(llama-batched-bench S_TG beside it)",
                     "ratio": "ours / llama.cpp"},
        "our_kernels": _our_kernels(),
        "llama_cpp": {"dir": str(llama_dir), "gguf": {t: str(p) for t, p in ggufs.items()},
                      # a libggml-cpu of another build (e.g. without AMX) shadows the one in dir/bin
                      "ld_library_path": os.environ.get("LD_LIBRARY_PATH")} if llama_dir
        else {"note": llama_note},
        "results": results,
    }
    print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
