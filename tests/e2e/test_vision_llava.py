"""LLaVA against transformers on a tiny random checkpoint (CLIP tower + projector + Llama):
logits with no image, one image and two images of different sizes and aspect ratios; greedy
text through the Python API and the server (openai client, data: URLs); the prefix cache never
mixing two images' tokens."""

from __future__ import annotations

import hashlib

import pytest
import torch

from tests.helpers.vision_models import data_url, sample_image, write_tiny_llava

pytest.importorskip("PIL")

PARTS = [{"type": "text", "text": "Look:"}, {"type": "image"}, {"type": "text", "text": " and "}, {"type": "image"},
         {"type": "text", "text": " what is it?"}]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return write_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


@pytest.fixture(scope="module")
def hf(llava_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(llava_dir).eval(), AutoProcessor.from_pretrained(llava_dir)


@pytest.fixture(scope="module")
def runner(llava_dir):
    from mistralrs.api import Runner, Which

    r = Runner(Which.Plain(model_id=str(llava_dir), dtype="f32"), pa_ctxt_len=4096, pa_blk_size=16)
    yield r
    r.shutdown()


def _ours_logits(loaded, processor, prompt, images):
    from mistralrs.loading import build_attention_backend
    from mistralrs.multimodal.images import ImageInput

    inputs = [ImageInput(im.convert("RGB"), hashlib.sha256(im.tobytes()).hexdigest(), "test") for im in images]
    ids, items = processor.process(prompt, inputs)
    backend = build_attention_backend(loaded, name="sdpa", num_blocks=0)
    model = loaded.model
    t = len(ids)
    with torch.inference_mode():
        mm = None
        if items:
            mm = (torch.tensor([i for it in items for i in range(it.offset, it.end)]),
                  torch.cat([model.embed_multimodal(it) for it in items]))
        kwargs = {"mm": mm} if mm is not None else {}
        hidden = model.forward(torch.tensor(ids), torch.arange(t), backend.batch([0, t], [t]), **kwargs)
        return ids, model.compute_logits(hidden)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_logits_match_transformers(llava_dir, hf, runner, n_images):
    model, proc = hf
    images = [sample_image(60, 40, 1), sample_image(30, 50, 2)][:n_images]
    prompt = "Hello " + " and ".join(["<image>"] * n_images) + " what is this?"
    enc = proc(text=prompt, images=images or None, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits[0]
    ids, ours = _ours_logits(runner.service.loaded, runner.service.processor, prompt, images)
    assert ids == enc["input_ids"][0].tolist()
    assert (ours - ref).abs().max().item() < 1e-4


def _chat(runner, images, max_tokens=12):
    from mistralrs.api import ChatCompletionRequest

    content = []
    for part, image in zip([p for p in PARTS], [None, images[0], None, images[1], None]):
        content.append(part if image is None else {"type": "image_url", "image_url": {"url": data_url(image)}})
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0))
    return res.choices[0].message.content


def _hf_greedy(runner, hf, images, max_tokens=12):
    model, proc = hf
    prompt = runner.service.render_chat([{"role": "user", "content": PARTS}])
    enc = proc(text=prompt, images=images, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False)
    return proc.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_greedy_text_matches_and_images_never_share_cache(runner, hf):
    a = [sample_image(60, 40, 1), sample_image(30, 50, 2)]
    b = [sample_image(60, 40, 3), sample_image(30, 50, 4)]
    first = _chat(runner, a)
    assert first == _hf_greedy(runner, hf, a)
    assert _chat(runner, b) == _hf_greedy(runner, hf, b)  # same text and sizes, other pixels: no stale blocks
    assert _chat(runner, a) == first  # and the prefix cache still serves image a's blocks correctly


def test_prefix_hashes_differ_by_image():
    from mistralrs.engine.kv_cache import block_hashes
    from mistralrs.multimodal.inputs import MmItem, hash_tokens

    tokens = [1, 2, 3] + [9] * 8 + [4, 5]
    a, b = MmItem(offset=3, length=8, key="aaa"), MmItem(offset=3, length=8, key="bbb")
    ha, hb = block_hashes(hash_tokens(tokens, (a,)), 4), block_hashes(hash_tokens(tokens, (b,)), 4)
    assert ha[0] != hb[0] and ha != hb  # the first block holds image tokens already
    assert block_hashes(hash_tokens(tokens, (a,)), 4) == ha


def test_server_openai_client_with_images(llava_dir, runner, hf):
    openai = pytest.importorskip("openai")
    from tests.e2e.conftest import start_server

    srv = start_server(runner.service)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        a = [sample_image(60, 40, 1), sample_image(30, 50, 2)]
        content = [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": data_url(a[0])}},
                   {"type": "text", "text": " and "}, {"type": "image_url", "image_url": {"url": data_url(a[1], "JPEG")}},
                   {"type": "text", "text": " what is it?"}]
        res = client.chat.completions.create(model="default", messages=[{"role": "user", "content": content}],
                                             max_tokens=12, temperature=0)
        assert res.choices[0].message.content  # JPEG decoding differs from PNG's pixels, so no exact text here
        bad = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]
        with pytest.raises(openai.BadRequestError, match="not a readable image"):
            client.chat.completions.create(model="default", messages=[{"role": "user", "content": bad}], max_tokens=2)
        missing = [{"type": "image_url", "image_url": {"url": "/no/such/image.png"}}]
        with pytest.raises(openai.BadRequestError, match="neither a data: URL"):
            client.chat.completions.create(model="default", messages=[{"role": "user", "content": missing}], max_tokens=2)
        assert client.chat.completions.create(model="default", messages=[{"role": "user", "content": "text only"}],
                                              max_tokens=2).choices  # and it goes on serving
        resp = client.responses.create(model="default", max_output_tokens=4, input=[{"role": "user", "content": [
            {"type": "input_text", "text": "What is it?"}, {"type": "input_image", "image_url": data_url(a[0])}]}])
        assert resp.output_text is not None
        anthropic = pytest.importorskip("anthropic")
        claude = anthropic.Anthropic(base_url=srv.url, api_key="none", max_retries=0)
        png = data_url(a[0]).split(",", 1)[1]
        msg = claude.messages.create(model="default", max_tokens=12, extra_body={"temperature": 0}, messages=[
            {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                      "data": png}}]}])
        via_chat = client.chat.completions.create(model="default", max_tokens=12, temperature=0, messages=[
            {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                         {"type": "image_url", "image_url": {"url": data_url(a[0])}}]}])
        assert msg.content[0].text == via_chat.choices[0].message.content  # the same request through both APIs
    finally:
        srv.stop()


def test_text_only_model_refuses_images(server):
    from tests.e2e.test_from_config import call

    status, err = call(server.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}], "max_tokens": 2})
    assert status == 400 and "text parts only" in err["error"]["message"]


def test_interactive_run_detects_image_paths(runner, hf, tmp_path):
    """`mistralrs run` on a vision model: an image path in the line is sent as an image part."""
    import io

    from mistralrs.api import ChatCompletionRequest
    from mistralrs_plugins.frontends.interactive.chat import InteractiveChat

    image = sample_image(45, 30, 5)
    path = tmp_path / "photo.png"
    image.save(path)
    out = io.StringIO()
    chat = InteractiveChat(runner.service, out=out, sampling={"temperature": 0}, max_tokens=8)
    answer = chat.answer(f"describe {path} briefly")
    assert chat.history[0]["content"][0] == {"type": "image_url", "image_url": {"url": str(path)}}
    expected = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                               {"type": "text", "text": "describe  briefly"}]}],
        max_tokens=8, temperature=0)).choices[0].message.content
    assert answer == expected


def test_isq_quantizes_the_language_model_only(llava_dir):
    """As mistral.rs: --isq leaves the vision tower and the projector in float."""
    from mistralrs.loading import load_model
    from mistralrs.nn.linear import linear_layers
    from mistralrs.quantization import IsqPlan

    plan = IsqPlan("q8_0")
    loaded = load_model(str(llava_dir), dtype="f32", quant_method_for=plan.method_for)
    methods = {name: layer.quant_method.describe() for name, layer in linear_layers(loaded.model)}
    assert any(n.startswith("language_model.") and "q8_0" in m for n, m in methods.items())
    outside = {n: m for n, m in methods.items() if not n.startswith("language_model.")}
    assert outside and all(m == "unquantized" for m in outside.values()), outside
