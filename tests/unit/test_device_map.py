"""Device mapping: parsing -n, the topology's device keys, the automatic fit with fake device
capacities, and a device-mapped model (two CPU groups, one in fp32) giving the same greedy tokens."""

from __future__ import annotations

import pytest

from mistralrs import device_map as dm
from mistralrs.errors import ConfigError

GB = 1024**3


def test_parse_device_layers_forms():
    assert dm.parse_device_layers("0:16;1:16", accelerator="cuda") == [("cuda:0", 16), ("cuda:1", 16)]
    assert dm.parse_device_layers("16", accelerator="cuda") == [("cuda:0", 16)]
    assert dm.parse_device_layers("cpu:2; cuda[1]:3", accelerator="cuda") == [("cpu", 2), ("cuda:1", 3)]
    assert dm.parse_device_layers("cpu:1;cpu:1", accelerator=None) == [("cpu", 1), ("cpu", 1)]


@pytest.mark.parametrize("text,needle", [
    ("0:4", "device ordinal 0 names a GPU"),
    ("cpu", "is not ORD:NUM"),
    ("gpu:3", "unknown device 'gpu'"),
    ("", "is empty"),
])
def test_parse_device_layers_errors(text, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        dm.parse_device_layers(text, accelerator=None)
    assert "\n" not in str(info.value)


def test_manual_plan_rest_on_cpu_in_fp32():
    plan = dm.plan_from_device_layers([("cuda:0", 2), ("cuda:1", 1)], 5)
    assert plan.groups == ("cuda:0", "cuda:1", "cpu")
    assert plan.layer_group == (0, 0, 1, 2, 2)
    assert plan.primary == plan.head == "cuda:0"
    assert plan.float32_groups == {2}
    assert [r["layers"] for r in plan.summary()[:3]] == ["0-1", "2", "3-4"]
    with pytest.raises(ConfigError, match="places 6 layers but the model has 5"):
        dm.plan_from_device_layers([("cuda:0", 6)], 5)


def test_cpu_only_plan_keeps_model_dtype():
    plan = dm.plan_from_device_layers([("cpu", 1), ("cpu", 1)], 2)
    assert plan.float32_groups == frozenset() and not plan.trivial


def test_topology_device_keys():
    from mistralrs.topology import parse_topology

    topo = parse_topology("0-2: {device: 'cuda[0]'}\n2-4: {device: 'cuda[1]'}\n4-6: {device: cpu}\n"
                          "'/lm_head\\./': {device: cpu}\n")
    plan = dm.plan_from_topology(topo, 6, primary="cuda:0", accelerator="cuda")
    assert plan.groups == ("cuda:0", "cuda:1", "cpu") and plan.layer_group == (0, 0, 1, 1, 2, 2)
    assert plan.head == "cpu" and plan.primary == "cuda:0" and plan.float32_groups == {2}
    assert dm.plan_from_topology(parse_topology("0-2: {isq: q4k}\n"), 6, primary="cuda:0",
                                 accelerator="cuda") is None


def _sizes(layers=8, layer_gb=1.0, non_mapped_gb=1.0, **kw):
    return dm.ModelSizes(layer_bytes=(int(layer_gb * GB),) * layers, non_mapped_bytes=int(non_mapped_gb * GB),
                         kv_bytes_per_token=kw.pop("kv", 4096), hidden_size=4096, intermediate_size=14336,
                         num_heads=32, vocab_size=128256, **kw)


def test_auto_plan_everything_fits_on_first_gpu():
    plan = dm.auto_plan(_sizes(), [dm.DeviceCapacity("cuda:0", 40 * GB), dm.DeviceCapacity("cuda:1", 40 * GB)],
                        max_seq_len=4096, max_batch_size=1)
    assert plan.trivial and plan.primary == "cuda:0"


def test_auto_plan_spills_to_second_gpu_then_cpu():
    sizes = _sizes(layers=8)
    seq, batch = 4096, 1
    act = dm.activation_bytes(sizes, seq, batch)
    kv = dm.kv_bytes_per_layer(sizes, seq, batch)
    logits = batch * sizes.vocab_size * 4
    # GPU 0: room for the reservations and exactly 3 layers (+ their KV); GPU 1: 2 layers
    gpu0 = int((act + sizes.non_mapped_bytes + logits + 3 * (GB + kv) + 100) / dm.USABLE_FRACTION) + 1
    gpu1 = int((act + 2 * (GB + kv) + 100) / dm.USABLE_FRACTION) + 1
    plan = dm.auto_plan(sizes, [dm.DeviceCapacity("cuda:0", gpu0), dm.DeviceCapacity("cuda:1", gpu1)],
                        max_seq_len=seq, max_batch_size=batch, cpu_free_bytes=64 * GB)
    assert plan.groups == ("cuda:0", "cuda:1", "cpu")
    assert plan.layer_group == (0, 0, 0, 1, 1, 2, 2, 2)
    assert plan.float32_groups == {2}


def test_auto_plan_reservation_grows_with_seq_len_and_batch():
    caps = [dm.DeviceCapacity("cuda:0", 16 * GB)]
    small = dm.auto_plan(_sizes(kv=16384), caps, max_seq_len=512, max_batch_size=1, cpu_free_bytes=256 * GB)
    big = dm.auto_plan(_sizes(kv=16384), caps, max_seq_len=8192, max_batch_size=4, cpu_free_bytes=256 * GB)
    on_gpu = lambda p: sum(1 for g in p.layer_group if p.groups[g] != "cpu")  # noqa: E731
    assert on_gpu(small) > on_gpu(big)


def test_auto_plan_errors_name_the_problem():
    with pytest.raises(ConfigError, match="embeddings, head and activations alone need"):
        dm.auto_plan(_sizes(non_mapped_gb=10), [dm.DeviceCapacity("cuda:0", 4 * GB)])
    with pytest.raises(ConfigError, match="does not fit: layers 1-7 need"):
        dm.auto_plan(_sizes(non_mapped_gb=0.1), [dm.DeviceCapacity("cuda:0", 2 * GB)], max_seq_len=128,
                     cpu_free_bytes=4 * GB)


def test_no_accelerator_means_cpu():
    plan = dm.auto_plan(_sizes(layers=3), [dm.DeviceCapacity("cpu", 64 * GB)])
    assert plan.trivial and plan.primary == "cpu"


def test_model_sizes_of_a_meta_model(tmp_path):
    import torch

    from mistralrs.loading import LoadContext, build_model, read_config, select_architecture
    from tests.helpers.tiny_models import write_tiny_llama

    d = write_tiny_llama(tmp_path / "m", layers=3)
    config = read_config(d / "config.json")
    spec = select_architecture(config)
    model = build_model(spec, config, LoadContext(config=config, dtype=torch.float32, device=torch.device("cpu")))
    sizes = dm.model_sizes(model, model.kv_cache_shape())
    assert sizes.num_layers == 3 and len(set(sizes.layer_bytes)) == 1
    per_layer = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    assert sizes.layer_bytes[0] == per_layer
    # K and V: 2 kv heads x 16 dims x 2 x 4 bytes
    assert sizes.kv_bytes_per_token == 2 * 16 * 2 * 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.helpers.tiny_models import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("dm") / "llama", layers=4)


def _greedy(loaded):
    from mistralrs.loading import build_attention_backend, generate_greedy

    backend = build_attention_backend(loaded, num_blocks=8, block_size=16)
    return generate_greedy(loaded, backend, [3, 4, 5, 6, 7, 8], 16), backend


def test_mapped_model_same_tokens_and_per_group_kv_cache(tiny):
    from mistralrs.loading import load_model

    ref, _ = _greedy(load_model(tiny, dtype="f32"))
    plan = dm.plan_from_device_layers(dm.parse_device_layers("cpu:1;cpu:2", accelerator=None), 4)
    mapped = load_model(tiny, dtype="f32", device_map=plan)
    out, backend = _greedy(mapped)
    assert out == ref
    assert backend.name.startswith("mapped[") and [s.shape.num_layers for s in backend.subs] == [1, 2, 1]


def test_fp32_group_in_a_bf16_model(tiny):
    import torch

    from mistralrs.loading import load_model

    plan = dm.Placement(groups=("cpu", "cpu"), layer_group=(0, 0, 1, 1), primary="cpu", head="cpu",
                        float32_groups=frozenset({1}))
    loaded = load_model(tiny, dtype="bf16", device_map=lambda model: plan)
    layers = loaded.model.model.layers
    assert layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
    assert layers[2].mlp.down_proj.weight.dtype == torch.float32
    out, backend = _greedy(loaded)
    assert [s.shape.dtype for s in backend.subs] == [torch.bfloat16, torch.float32]
    assert len(out) == 16


def test_runner_with_num_device_layers(tiny):
    from mistralrs import ChatCompletionRequest, Runner, Which

    def answer(**kw):
        runner = Runner(Which.Plain(model_id=str(tiny), dtype="f32"), cpu=True, **kw)
        try:
            res = runner.send_chat_completion_request(ChatCompletionRequest(
                messages=[{"role": "user", "content": "hello there"}], max_tokens=12, temperature=0))
            return res.choices[0].message.content
        finally:
            runner.shutdown()

    assert answer(num_device_layers=["cpu:2", "cpu:2"]) == answer()


def test_capacities_and_spec():
    caps = dm.parse_capacities("cuda:0=24GB; 1=1.5GiB")
    assert caps == [dm.DeviceCapacity("cuda:0", 24 * 10**9), dm.DeviceCapacity("cuda:1", int(1.5 * 2**30))]
    with pytest.raises(ConfigError, match="is not DEVICE=SIZE"):
        dm.parse_capacities("cuda:0")
    plan = dm.plan_from_device_layers([("cuda:0", 2), ("cuda:1", 3)], 7)
    assert dm.device_layers_spec(plan) == "0:2;1:3"
    assert dm.tensor_parallel_sizes(32, 8) == [1, 2, 4, 8]


def test_tune_proposes_a_mapping(tiny):
    import json
    import subprocess
    import sys

    # bf16 pinned: the 300 KB budgets are sized for it, and "auto" is f32 on CPUs without native bf16
    out = subprocess.run([sys.executable, "-m", "mistralrs", "tune", "-m", str(tiny), "--json", "--max-seq-len", "64",
                          "--dtype", "bf16", "--plan-devices", "cuda:0=300KB;cuda:1=300KB"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    dmap = json.loads(out.stdout)["device_map"]
    assert dmap["tensor_parallel_sizes"] == [1, 2]
    assert dmap["device_layers"] and [r["device"] for r in dmap["plan"]][:2] == ["cuda:0", "cuda:1"]
    # the proposed -n covers every layer the plan put on a GPU
    assert sum(int(e.split(":")[1]) for e in dmap["device_layers"].split(";")) == 4


def test_doctor_reports_the_distributed_setup():
    from mistralrs.distributed.world import distributed_report

    report = distributed_report({"WORLD_SIZE": "2", "RANK": "1", "MASTER_PORT": "7"})
    assert report["available"] and report["backends"]["gloo"]
    assert report["source"] == "torchrun" and report["rendezvous"]["world_size"] == 2
    bad = distributed_report({"MISTRALRS_MN_GLOBAL_WORLD_SIZE": "4"})
    assert "MISTRALRS_MN_HEAD_PORT" in bad["error"]


def test_gguf_model_device_mapped(tiny, tmp_path):
    """A GGUF file (q8_0 blocks) mapped over two CPU groups gives the unmapped model's tokens."""
    from mistralrs.gguf.loading import load_gguf
    from tests.helpers.gguf_writer import write_gguf

    path = write_gguf(tiny, tmp_path / "tiny-Q8_0.gguf", outtype="q8_0")
    ref, _ = _greedy(load_gguf(path, dtype="f32"))
    plan = dm.plan_from_device_layers(dm.parse_device_layers("cpu:3", accelerator=None), 4)
    out, backend = _greedy(load_gguf(path, dtype="f32", device_map=plan))
    assert out == ref and [s.shape.num_layers for s in backend.subs] == [3, 1]
