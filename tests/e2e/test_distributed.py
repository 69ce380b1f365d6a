"""Tensor parallelism over 2 local gloo ranks: the same logits (fp32 tolerance) and greedy tokens
as one process for a dense, a GQA, a MoE and an ISQ-quantized model; the Python API and `serve`
with ``-tp 2``; a dying rank fails requests clearly and the server exits; `torchrun`-style env."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import server_process
from tests.helpers.tensor_parallel import child_pids, run_model, run_split, write_tiny_models

MODELS = ("dense", "gqa", "mqa", "moe", "q8_0")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("tp"))


@pytest.fixture(scope="module")
def split(tiny, tmp_path_factory):
    return run_split(tiny, 2, tmp_path_factory.mktemp("tp-out") / "rank0.pt")


@pytest.mark.slow  # two processes load four models (~35 s on two shared cores)
@pytest.mark.parametrize("name", MODELS)
def test_two_ranks_match_one_process(tiny, split, name):
    import torch

    model_dir, isq = tiny[name]
    logits, tokens, methods = run_model(model_dir, isq)
    split_logits, split_tokens, split_methods = split[name]
    assert split_methods == methods  # q8_0: every linear quantized on both sides
    assert split_logits.shape == logits.shape
    torch.testing.assert_close(split_logits, logits, atol=1e-4, rtol=1e-4)
    assert split_tokens == tokens


def test_heads_not_divisible_is_one_line_error(tiny):
    from mistralrs.distributed.sharding import TensorParallel
    from mistralrs.errors import ConfigError
    from mistralrs.loading import load_model

    with pytest.raises(ConfigError, match=r"tensor parallel size 3 must divide the attention heads: the model has 4 "
                                          r"query and 2 key/value heads; choose a -tp that divides 4") as info:
        load_model(tiny["gqa"][0], dtype="f32", tensor_parallel=TensorParallel(0, 3))
    assert "\n" not in str(info.value)


def _chat(url: str, content: str, max_tokens: int = 10, timeout: float = 60) -> dict:
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, **json.loads(exc.read() or b"{}")}


@pytest.mark.parametrize("name", ["moe", pytest.param("dense", marks=pytest.mark.slow),
                                  pytest.param("gqa", marks=pytest.mark.slow), pytest.param("q8_0", marks=pytest.mark.slow)])
def test_python_api_tp2_same_answers(tiny, name):
    from mistralrs import ChatCompletionRequest, Runner, Which

    model_dir, isq = tiny[name]

    def answers(**kw):
        runner = Runner(Which.Plain(model_id=str(model_dir), dtype="f32"), cpu=True, in_situ_quant=isq, **kw)
        try:
            out = []
            for text in ("hello there", "the sea is"):
                res = runner.send_chat_completion_request(ChatCompletionRequest(
                    messages=[{"role": "user", "content": text}], max_tokens=10, temperature=0, logprobs=True))
                choice = res.choices[0]
                out.append((choice.message.content, [t.logprob for t in choice.logprobs.content]))
            return out
        finally:
            runner.shutdown()

    one, two = answers(), answers(tensor_parallel_size=2)
    for (text1, lp1), (text2, lp2) in zip(one, two):
        assert text1 == text2
        assert lp1 == pytest.approx(lp2, abs=1e-4)


class Serve:
    """`mistralrs serve ... --port 0`: URL from its first line, stderr kept, stopped at the end."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, argv: list[str] | None = None) -> None:
        argv = argv or [sys.executable, "-m", "mistralrs", "serve", *args, "--port", "0", "--host", "127.0.0.1"]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})})
        self.lines: list[str] = []
        m = None
        for _ in range(20):  # torchrun prints a banner first
            line = self.proc.stderr.readline()
            self.lines.append(line)
            m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            if m or not line:
                break
        if not m:
            self.proc.kill()
            pytest.fail(f"no serving line in {self.lines!r}")
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        self.url = f"http://127.0.0.1:{m.group(1)}"
        server_process.wait_healthy(self.url, self.proc)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in getattr(self, "children", []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "gqa", "moe", "q8_0"])
def test_serve_tp2_same_tokens_as_one_process(tiny, name):
    model_dir, isq = tiny[name]
    answers = {}
    for tp in ("1", "2"):
        server = Serve("-m", str(model_dir), "--dtype", "f32", "-tp", tp, *(("--isq", isq) if isq else ()))
        try:
            answers[tp] = [_chat(server.url, q)["choices"][0]["message"]["content"] for q in ("hi", "tell me more")]
        finally:
            server.close()
        assert server.proc.returncode == 0, "".join(server.lines)
    assert answers["1"] == answers["2"]


@pytest.mark.slow
def test_rank_dying_fails_requests_and_server_exits(tiny):
    server = Serve("-m", str(tiny["gqa"][0]), "--dtype", "f32", "-tp", "2")
    try:
        workers = child_pids(server.proc.pid)
        server.children = workers
        ranks = [p for p in workers if "run_named" in Path(f"/proc/{p}/cmdline").read_text(errors="ignore")]
        assert ranks, "no worker process"
        assert "choices" in _chat(server.url, "hi")
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
        failed = _chat(server.url, "hi again", timeout=60)
        assert "choices" not in failed
        text = json.dumps(failed)
        assert "tensor-parallel" in text or "tensor parallelism" in text, text
        server.proc.wait(60)  # exits by itself: no hang
        assert server.proc.returncode == 1
        assert any("tensor-parallel" in line or "tensor parallelism" in line for line in server.lines)
    finally:
        server.close()


def test_mn_variables_map_onto_rendezvous():
    from mistralrs.distributed.world import rendezvous_from_env
    from mistralrs.errors import ConfigError

    head = rendezvous_from_env(1, {"MISTRALRS_MN_GLOBAL_WORLD_SIZE": "16", "MISTRALRS_MN_LOCAL_WORLD_SIZE": "8",
                                   "MISTRALRS_MN_HEAD_NUM_WORKERS": "1", "MISTRALRS_MN_HEAD_PORT": "29400"})
    assert (head.world_size, head.node_rank, head.local_world_size, head.master_port) == (16, 0, 8, 29400)
    worker = rendezvous_from_env(1, {"MISTRALRS_MN_GLOBAL_WORLD_SIZE": "16", "MISTRALRS_MN_LOCAL_WORLD_SIZE": "8",
                                     "MISTRALRS_MN_WORKER_SERVER_ADDR": "10.0.0.1:29400",
                                     "MISTRALRS_MN_WORKER_ID": "0"})
    assert (worker.master_addr, worker.master_port, worker.node_rank) == ("10.0.0.1", 29400, 1)
    torchrun = rendezvous_from_env(1, {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
                                       "MASTER_PORT": "1234", "LOCAL_WORLD_SIZE": "2"})
    assert torchrun.torchrun and (torchrun.rank, torchrun.world_size, torchrun.master_port) == (2, 4, 1234)
    assert rendezvous_from_env(1, {}) is None
    assert rendezvous_from_env(2, {}).world_size == 2
    with pytest.raises(ConfigError, match="HEAD_NUM_WORKERS=2 worker nodes x 8 local ranks"):
        rendezvous_from_env(1, {"MISTRALRS_MN_GLOBAL_WORLD_SIZE": "16", "MISTRALRS_MN_LOCAL_WORLD_SIZE": "8",
                                "MISTRALRS_MN_HEAD_NUM_WORKERS": "2", "MISTRALRS_MN_HEAD_PORT": "1"})


def _one_process_answer(model: str) -> str:
    one = Serve("-m", model, "--dtype", "f32")
    try:
        return _chat(one.url, "hi")["choices"][0]["message"]["content"]
    finally:
        one.close()


def _two_launches(first: list[str], second: list[str], env1: dict, env2: dict, model: str, *,
                  launcher_exit: bool = True) -> str:
    """Start the follower side, then the serving side (its stderr gives the URL); ask; stop.
    `launcher_exit` False: the serving side's launcher (torchrun) reports SIGTERM as a failure
    itself, so only mistralrs's clean stop is checked there."""
    follower = subprocess.Popen(second, env={**os.environ, "HF_HUB_OFFLINE": "1", **env2},
                                stderr=subprocess.PIPE, text=True)
    try:
        server = Serve(argv=first, env=env1)
        try:
            answer = _chat(server.url, "hi")["choices"][0]["message"]["content"]
        finally:
            server.close()
        time.sleep(0.5)  # the reader thread collects the last lines
        assert "mistralrs: stopped\n" in server.lines, "".join(server.lines)
        if launcher_exit:
            assert server.proc.returncode == 0, "".join(server.lines)
        follower.wait(90)
        assert follower.returncode == 0, follower.stderr.read()
        return answer
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


@pytest.mark.slow
def test_torchrun_two_nodes_on_one_machine(tiny):
    """docs/distributed.md's torchrun recipe with two "nodes" on this machine (one rank each):
    node 0's rank serves HTTP, node 1's follows; same answer as one process."""
    from mistralrs.distributed.world import free_port

    model = str(tiny["gqa"][0])
    port = str(free_port())

    def torchrun(node: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
                "-m", "mistralrs", "serve", "-m", model, "--cpu", "--dtype", "f32", "--port", "0",
                "--host", "127.0.0.1"]

    two = _two_launches(torchrun(0), torchrun(1), {}, {}, model, launcher_exit=False)
    assert two == _one_process_answer(model)


@pytest.mark.slow
def test_mistralrs_mn_variables_two_nodes_on_one_machine(tiny):
    """docs/distributed.md's MISTRALRS_MN_* recipe: a head node and a worker node (one rank each)."""
    from mistralrs.distributed.world import free_port

    model = str(tiny["gqa"][0])
    port = str(free_port())
    serve = [sys.executable, "-m", "mistralrs", "serve", "-m", model, "--cpu", "--dtype", "f32", "--port", "0",
             "--host", "127.0.0.1"]
    common = {"MISTRALRS_MN_GLOBAL_WORLD_SIZE": "2", "MISTRALRS_MN_LOCAL_WORLD_SIZE": "1"}
    head = {**common, "MISTRALRS_MN_HEAD_NUM_WORKERS": "1", "MISTRALRS_MN_HEAD_PORT": port}
    worker = {**common, "MISTRALRS_MN_WORKER_ID": "0", "MISTRALRS_MN_WORKER_SERVER_ADDR": f"127.0.0.1:{port}"}
    two = _two_launches(serve, serve, head, worker, model)
    assert two == _one_process_answer(model)


# -- data parallelism -------------------------------------------------------------------------

def test_router_affinity_and_load():
    from mistralrs.distributed.replicas import Router, affinity_key

    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    k1 = affinity_key("/v1/chat/completions", {"model": "m", "messages": conv})
    k2 = affinity_key("/v1/chat/completions", {"model": "m", "messages": [
        *conv, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]})
    assert k1 == k2  # the next turn of a conversation keeps its key
    assert k1 != affinity_key("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert affinity_key("/v1/responses", {"previous_response_id": "resp_1", "input": "x"}) == "resp:resp_1"
    router = Router(2, slack=1)
    first = router.pick(k1)
    router.started(first)
    assert router.pick(k1) == first  # one in flight: within the slack
    router.started(first)
    router.started(first)
    assert router.pick(k1) != first  # overloaded: the least-loaded replica, which the key now follows
    router.down(1 - first)
    assert router.pick("other") == first
    router.down(first)
    with pytest.raises(RuntimeError, match="every data-parallel replica is down"):
        router.pick(k1)


def _concurrent(url: str, prompts: list[str]) -> list[tuple[str, str]]:
    results: list = [None] * len(prompts)

    def one(i: int) -> None:
        body = json.dumps({"model": "default", "messages": [{"role": "user", "content": prompts[i]}],
                           "max_tokens": 12, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            results[i] = (json.loads(r.read())["choices"][0]["message"]["content"],
                          r.headers.get("x-mistralrs-replica", ""))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return results


@pytest.mark.slow
def test_data_parallel_two_replicas_same_answers(tiny):
    model = str(tiny["gqa"][0])
    prompts = [f"question number {i}" for i in range(8)]
    one = Serve("-m", model, "--dtype", "f32")
    try:
        expected = [text for text, _ in _concurrent(one.url, prompts)]
    finally:
        one.close()
    two = Serve("-m", model, "--dtype", "f32", "--data-parallel-size", "2")
    try:
        got = _concurrent(two.url, prompts)
        assert [text for text, _ in got] == expected
        assert {replica for _, replica in got} == {"0", "1"}  # the load was spread
        # one conversation keeps its replica (prefix affinity)
        seen = {_concurrent(two.url, [prompts[0]])[0][1] for _ in range(3)}
        assert len(seen) == 1
        with urllib.request.urlopen(two.url + "/health", timeout=10) as r:
            health = json.loads(r.read())
        assert [rep["alive"] for rep in health["replicas"]] == [True, True]
    finally:
        two.close()
    assert two.proc.returncode == 0, "".join(two.lines)


ARCHS = ("phi2", "gemma2", "qwen3moe", "starcoder2", "granite", "gemma3_text", "qwen2")


@pytest.fixture(scope="module")
def arch_split(tmp_path_factory):
    import importlib

    from tests.helpers.parity import make_tiny_hf_model
    from tests.parity.test_end_to_end import ARCHITECTURES

    root = tmp_path_factory.mktemp("tp-archs")
    models = {}
    for name in ARCHS:
        mod, cfg_cls, model_cls, over = ARCHITECTURES[name]
        m = importlib.import_module(f"transformers.models.{mod}")
        path, _ = make_tiny_hf_model(getattr(m, cfg_cls), getattr(m, model_cls), root / name, **over)
        models[name] = (path, None)
    return models, run_split(models, 2, root / "rank0.pt", timeout=400)


@pytest.mark.slow  # seven architectures in two processes (~60 s)
@pytest.mark.parametrize("name", ARCHS)
def test_two_ranks_match_one_process_across_architectures(arch_split, name):
    """Biases (row-parallel added once, Phi-2's head), parallel attention + MLP (Phi-2), sliding
    windows and softcaps (Gemma 2/3), a family's embedding multiplier (Granite), Qwen3-MoE experts."""
    import torch

    models, split = arch_split
    logits, tokens, _ = run_model(*models[name])
    split_logits, split_tokens, _ = split[name]
    torch.testing.assert_close(split_logits, logits, atol=1e-4, rtol=1e-4)
    assert split_tokens == tokens


def test_unsplittable_modules_are_named():
    """Fused projections (Phi-3's qkv_proj) are a one-line error naming the module."""
    import importlib

    import torch

    from mistralrs.distributed.sharding import TensorParallel
    from mistralrs.errors import ConfigError
    from mistralrs.loading import LoadContext, build_model, select_architecture
    from tests.helpers.parity import TINY_DEFAULTS
    from tests.parity.test_end_to_end import ARCHITECTURES

    mod, cfg_cls, _, over = ARCHITECTURES["phi3"]
    config = getattr(importlib.import_module(f"transformers.models.{mod}"), cfg_cls)(**{**TINY_DEFAULTS, **over})
    config = config.to_dict()
    spec = select_architecture(config)
    with pytest.raises(ConfigError, match=r"does not know how to split 'model\.layers\.0\.self_attn\.qkv_proj'"):
        build_model(spec, config, LoadContext(config=config, dtype=torch.float32, device=torch.device("meta"),
                                              arch=spec, tensor_parallel=TensorParallel(0, 2)))


@pytest.mark.slow
def test_data_parallel_replica_dying_is_taken_out(tiny):
    two = Serve("-m", str(tiny["gqa"][0]), "--dtype", "f32", "--data-parallel-size", "2")
    try:
        replicas = [p for p in child_pids(two.proc.pid)
                    if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="ignore")]
        assert len(replicas) == 2
        two.children = replicas
        os.kill(replicas[0], signal.SIGKILL)
        deadline = time.time() + 30
        alive = [True, True]
        while time.time() < deadline and all(alive):
            with urllib.request.urlopen(two.url + "/health", timeout=10) as r:
                alive = [rep["alive"] for rep in json.loads(r.read())["replicas"]]
            time.sleep(0.3)
        assert sorted(alive) == [False, True]
        answers = _concurrent(two.url, ["a", "b", "c"])
        assert all(text is not None for text, _ in answers)
        assert {replica for _, replica in answers} == {str(alive.index(True))}
    finally:
        two.close()
    assert any("data-parallel replica" in line and "exited" in line for line in two.lines), "".join(two.lines)
