"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL against transformers on tiny random checkpoints: the image
processor's patches and grids, logits with no image, one image and two images of different
sizes and aspect ratios (M-RoPE positions included); greedy text through the Python API (also
with chunked prefill and two requests batched together) and the server (openai client)."""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch

from tests.helpers.qwen_vl_models import hf_inputs, write_tiny_qwen2_5vl, write_tiny_qwen2vl, write_tiny_qwen3vl
from tests.helpers.vision_models import data_url, sample_image

pytest.importorskip("PIL")

FAMILIES = {
    "qwen2vl": (write_tiny_qwen2vl, "Qwen2VLForConditionalGeneration"),
    "qwen2_5vl": (write_tiny_qwen2_5vl, "Qwen2_5_VLForConditionalGeneration"),
    "qwen3vl": (write_tiny_qwen3vl, "Qwen3VLForConditionalGeneration"),
}
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PARTS = [{"type": "text", "text": "Look:"}, {"type": "image"}, {"type": "text", "text": " and "}, {"type": "image"},
         {"type": "text", "text": " what is it?"}]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    import transformers

    from mistralrs.api import Runner, Which

    write, hf_class = FAMILIES[request.param]
    directory = write(tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}")
    hf = getattr(transformers, hf_class).from_pretrained(directory).eval()
    runner = Runner(Which.Plain(model_id=str(directory), dtype="f32"), pa_ctxt_len=4096, pa_blk_size=16)
    yield request.param, directory, hf, runner
    runner.shutdown()


def _ours_logits(service, prompt, images):
    from mistralrs.loading import build_attention_backend
    from mistralrs.multimodal.images import ImageInput
    from mistralrs.multimodal.inputs import rope_positions

    inputs = [ImageInput(im.convert("RGB"), hashlib.sha256(im.tobytes()).hexdigest(), "test") for im in images]
    ids, items = service.processor.process(prompt, inputs)
    backend = build_attention_backend(service.loaded, name="sdpa", num_blocks=0)
    model, t = service.loaded.model, len(ids)
    with torch.inference_mode():
        mm = None
        if items:
            mm = (torch.tensor([i for it in items for i in range(it.offset, it.end)]),
                  torch.cat([model.embed_multimodal(it) for it in items]))
        hidden = model.forward(torch.tensor(ids), rope_positions(items, 0, t), backend.batch([0, t], [t]), mm=mm)
        return ids, items, model.compute_logits(hidden)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_logits_match_transformers(family, n_images):
    _, directory, hf, runner = family
    images = [sample_image(60, 40, 1), sample_image(30, 50, 2)][:n_images]
    prompt = "Hello " + " and ".join([IMAGE] * n_images) + " what is this?"
    enc = hf_inputs(directory, prompt, images)
    with torch.no_grad():
        ref = hf(**enc).logits[0]
    ids, items, ours = _ours_logits(runner.service, prompt, images)
    assert ids == enc["input_ids"][0].tolist()
    assert runner.service.max_model_len == 1024  # text_config.max_position_embeddings
    assert runner.service.loaded.model.tied_embeddings == (family[0] == "qwen2_5vl")  # as Qwen2.5-VL-3B
    if images:  # the image processor: same patches, same grids
        assert torch.equal(torch.cat([it.data["pixel_values"] for it in items]), enc["pixel_values"])
        assert [list(it.data["grid_thw"]) for it in items] == enc["image_grid_thw"].tolist()
        assert items[0].positions.shape[0] == 3 and items[0].position_span != items[0].length
    assert (ours - ref).abs().max().item() < 1e-4


def _content(images):
    content = []
    for part, image in zip(PARTS, [None, images[0], None, images[1], None]):
        content.append(part if image is None else {"type": "image_url", "image_url": {"url": data_url(image)}})
    return content


def _chat(runner, images, max_tokens=12):
    from mistralrs.api import ChatCompletionRequest

    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": _content(images)}], max_tokens=max_tokens, temperature=0))
    return res.choices[0].message.content


def _hf_greedy(family, images, max_tokens=12):
    _, directory, hf, runner = family
    from transformers import AutoTokenizer

    prompt = runner.service.render_chat([{"role": "user", "content": PARTS}])
    enc = hf_inputs(directory, prompt, images)
    out = hf.generate(**enc, max_new_tokens=max_tokens, do_sample=False)
    return AutoTokenizer.from_pretrained(directory).decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_greedy_text_matches_and_images_never_share_cache(family, monkeypatch):
    runner = family[3]
    a = [sample_image(60, 40, 1), sample_image(30, 50, 2)]
    b = [sample_image(60, 40, 3), sample_image(30, 50, 4)]
    model, calls = runner.service.loaded.model, []
    encode = model.embed_multimodal
    monkeypatch.setattr(model, "embed_multimodal", lambda item: calls.append(item.key) or encode(item))
    first = _chat(runner, a)
    assert len(calls) == 2  # each image encoded once, not per prefill chunk or decode step
    monkeypatch.undo()
    assert first == _hf_greedy(family, a)
    assert _chat(runner, b) == _hf_greedy(family, b)  # same text and sizes, other pixels: no stale blocks
    assert _chat(runner, a) == first  # and the prefix cache still serves image a's blocks correctly


def test_chunked_prefill_and_batching_keep_positions(family):
    """Prefill chunks of at most 32 tokens (never inside an image) and two requests in one batch
    give the same greedy text as transformers: positions and the rope delta survive both."""
    from mistralrs.api import Runner, Which

    name, directory = family[0], family[1]
    runner = Runner(Which.Plain(model_id=str(directory), dtype="f32"), pa_ctxt_len=4096, pa_blk_size=16,
                    max_num_batched_tokens=32, prefix_cache_n=0)
    try:
        sets = [[sample_image(60, 40, 5), sample_image(30, 50, 6)], [sample_image(40, 40, 7), sample_image(50, 20, 8)]]
        out: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, _chat(runner, sets[i]))) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [out[0], out[1]] == [_hf_greedy(family, s) for s in sets], name
    finally:
        runner.shutdown()


def test_server_openai_client(family):
    """`mistralrs serve -m DIR --arch NAME` as a user starts it, the openai client sending images."""
    openai = pytest.importorskip("openai")
    from tests.e2e.conftest import serve_process

    name, directory = family[0], family[1]
    with serve_process("-m", str(directory), "--arch", name, "--dtype", "f32", "--pa-context-len", "2048") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        a = [sample_image(60, 40, 1), sample_image(30, 50, 2)]
        res = client.chat.completions.create(model="default", messages=[{"role": "user", "content": _content(a)}],
                                             max_tokens=12, temperature=0)
        assert res.choices[0].message.content == _hf_greedy(family, a)
        text = client.chat.completions.create(model="default", max_tokens=8, temperature=0,
                                              messages=[{"role": "user", "content": "no image here"}])
        assert text.choices[0].message.content is not None
        bad = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]
        with pytest.raises(openai.BadRequestError, match="not a readable image"):
            client.chat.completions.create(model="default", messages=[{"role": "user", "content": bad}], max_tokens=2)
        thin = [{"type": "image_url", "image_url": {"url": data_url(sample_image(402, 2, 3))}}]
        with pytest.raises(openai.BadRequestError, match="too elongated"):  # transformers refuses it too
            client.chat.completions.create(model="default", messages=[{"role": "user", "content": thin}], max_tokens=2)
        stream = client.chat.completions.create(model="default", messages=[{"role": "user", "content": _content(a)}],
                                                max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == res.choices[0].message.content


def test_hub_config_layout(family, tmp_path):
    """Checkpoints published with transformers 4 keep the text keys at the top level with
    ``rope_scaling: {type: mrope}``, ``in_chans`` in vision_config and min/max_pixels in the
    preprocessor config (Qwen2-VL, Qwen2.5-VL; Qwen3-VL's are nested): same model, same logits."""
    import json
    import shutil

    from mistralrs.api import Runner, Which

    name, directory, hf, runner = family
    if name == "qwen3vl":
        pytest.skip("Qwen3-VL checkpoints are published with a nested text_config")
    flat = tmp_path / "flat"
    shutil.copytree(directory, flat)
    config = json.loads((flat / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    text.pop("model_type")
    config.update(text, rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    config["vision_config"]["in_chans"] = config["vision_config"].pop("in_channels", 3)
    config["vision_config"]["model_type"] = config["model_type"]
    (flat / "config.json").write_text(json.dumps(config))
    pre = json.loads((flat / "preprocessor_config.json").read_text())
    size = pre.pop("size")
    pre.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    (flat / "preprocessor_config.json").write_text(json.dumps(pre))
    other = Runner(Which.Plain(model_id=str(flat), dtype="f32"), pa_ctxt_len=1024, pa_blk_size=16)
    try:
        assert other.service.loaded.arch.name == name and other.service.max_model_len == 1024
        images = [sample_image(60, 40, 1), sample_image(30, 50, 2)]
        prompt = "Hello " + " and ".join([IMAGE] * 2) + " what is this?"
        _, _, ours = _ours_logits(other.service, prompt, images)
        _, _, nested = _ours_logits(runner.service, prompt, images)
        assert torch.equal(ours, nested)
    finally:
        other.shutdown()
