"""LLaVA-NeXT against transformers on a tiny random checkpoint (CLIP tower over anyres tiles,
image_newline, Llama): the image processor's pixels and token counts for images of many sizes
and aspect ratios; logits with no image, one image and two images of different sizes; greedy
text through the Python API and through `mistralrs serve --arch llava_next` with the openai
client."""

from __future__ import annotations

import pytest
import torch

from tests.e2e.test_vision_llava import PARTS, _chat, _hf_greedy, _ours_logits
from tests.helpers.vision_models import data_url, sample_image
from tests.helpers.vision_models_tiled import write_tiny_llava_next

pytest.importorskip("PIL")

SIZES = [(60, 40), (30, 50), (28, 28), (100, 20), (13, 90), (57, 57), (200, 150), (1, 1), (84, 56)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llava_next(tmp_path_factory.mktemp("llava-next") / "tiny-llava-next")


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def runner(model_dir):
    from mistralrs.api import Runner, Which

    r = Runner(Which.Plain(model_id=str(model_dir), dtype="f32"), pa_ctxt_len=4096, pa_blk_size=16)
    yield r
    r.shutdown()


def test_image_processor_matches_transformers(hf, runner):
    from mistralrs.multimodal.images import ImageInput

    _, proc = hf
    ours = runner.service.processor
    for seed, (w, h) in enumerate(SIZES):
        image = sample_image(w, h, seed)
        ref = proc(text="<image>", images=[image], return_tensors="pt")
        length, data = ours.image_item(ImageInput(image, "x", "test"))
        assert length == int((ref["input_ids"][0] == ours.image_token_id).sum()), (w, h)
        assert data["image_size"] == tuple(ref["image_sizes"][0].tolist())
        pixels = ref["pixel_values"][0]
        assert data["pixel_values"].shape == pixels.shape, (w, h)
        assert torch.equal(data["pixel_values"], pixels), (w, h)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_logits_match_transformers(hf, runner, n_images):
    model, proc = hf
    images = [sample_image(60, 40, 1), sample_image(30, 50, 2)][:n_images]
    prompt = "Hello " + " and ".join(["<image>"] * n_images) + " what is this?"
    enc = proc(text=prompt, images=images or None, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits[0]
    ids, ours = _ours_logits(runner.service.loaded, runner.service.processor, prompt, images)
    assert ids == enc["input_ids"][0].tolist()
    assert (ours - ref).abs().max().item() < 1e-4


def test_greedy_text_matches_transformers(runner, hf):
    a = [sample_image(60, 40, 1), sample_image(20, 70, 2)]
    b = [sample_image(60, 40, 3), sample_image(20, 70, 4)]
    first = _chat(runner, a)
    assert first == _hf_greedy(runner, hf, a)
    assert _chat(runner, b) == _hf_greedy(runner, hf, b)  # other pixels, same sizes: no stale cache blocks
    assert _chat(runner, a) == first


def test_serve_openai_client(model_dir, runner, hf):
    openai = pytest.importorskip("openai")
    from tests.e2e.conftest import serve_process

    images = [sample_image(45, 70, 5), sample_image(90, 30, 6)]
    content = [part if part["type"] == "text" else {"type": "image_url", "image_url": {"url": data_url(images[i // 2])}}
               for i, part in enumerate(PARTS)]
    with serve_process("-m", str(model_dir), "--arch", "llava_next", "--dtype", "f32") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        res = client.chat.completions.create(model="default", messages=[{"role": "user", "content": content}],
                                             max_tokens=12, temperature=0)
        assert res.choices[0].message.content == _hf_greedy(runner, hf, images)


def test_isq_quantized_model_answers(model_dir):
    """--isq q8_0: the quantized Linear layers (language model, projector) take images too."""
    from mistralrs.api import Runner, Which

    r = Runner(Which.Plain(model_id=str(model_dir), dtype="f32"), in_situ_quant="q8_0", pa_ctxt_len=4096,
               pa_blk_size=16)
    try:
        assert _chat(r, [sample_image(60, 40, 1), sample_image(20, 70, 2)], max_tokens=4) is not None
    finally:
        r.shutdown()
