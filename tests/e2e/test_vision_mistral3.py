"""Mistral 3 with images against transformers on a tiny random checkpoint (Pixtral encoder with
2D rope, 2x2 patch merger, Mistral text): pixel values (Pixtral's resize to patch multiples
within longest_edge), the [IMG]/[IMG_BREAK]/[IMG_END] layout and fp32 logits with no image, one
image and two images of different sizes and aspect ratios; greedy text through the Python API
and through `mistralrs serve` with the openai client."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.vision_models import (
    chat_content,
    hf_greedy,
    mistral3_processor,
    ours_logits,
    sample_image,
    write_tiny_mistral3,
)

pytest.importorskip("PIL")

PARTS = [{"type": "text", "text": "Look:"}, {"type": "image"}, {"type": "text", "text": " and "}, {"type": "image"},
         {"type": "text", "text": " what is it?"}]
# shrunk to fit 56 px (60x40 -> 56x42; 30x90 -> 28x56) and enlarged to patch multiples (20x20 -> 28x28)
IMAGES_A = [sample_image(60, 40, 1), sample_image(30, 90, 2)]
IMAGES_B = [sample_image(20, 20, 3), sample_image(60, 40, 4)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_mistral3(tmp_path_factory.mktemp("mistral3") / "tiny-mistral3")


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import Mistral3ForConditionalGeneration

    return Mistral3ForConditionalGeneration.from_pretrained(model_dir).eval(), mistral3_processor(model_dir)


@pytest.fixture(scope="module")
def runner(model_dir):
    from mistralrs.api import Runner, Which

    r = Runner(Which.Plain(model_id=str(model_dir), dtype="f32"), pa_ctxt_len=4096, pa_blk_size=16)
    yield r
    r.shutdown()


@pytest.mark.parametrize("images", [[], IMAGES_A[:1], IMAGES_A, IMAGES_B], ids=["none", "one", "two", "two-other"])
def test_processor_and_logits_match_transformers(hf, runner, images):
    model, proc = hf
    prompt = "Hello " + " and ".join(["[IMG]"] * len(images)) + " what is this?"
    enc = proc(text=prompt, images=images or None, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits[0]
    assert runner.service.loaded.arch.name == "mistral3"  # auto-detected from architectures[0]
    ids, ours, items = ours_logits(runner.service, prompt, images)
    assert ids == enc["input_ids"][0].tolist()
    for k, item in enumerate(items):
        h, w = enc["image_sizes"][k].tolist()
        assert item.data["pixel_values"].shape == (3, h, w)
        assert torch.allclose(item.data["pixel_values"], enc["pixel_values"][k, :, :h, :w], atol=1e-6)
        assert ids[item.end - 1] == proc.image_end_token_id
    assert (ours - ref).abs().max().item() < 1e-4


def _chat(runner, images, max_tokens=12):
    from mistralrs.api import ChatCompletionRequest

    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": chat_content(PARTS, images)}], max_tokens=max_tokens, temperature=0))
    return res.choices[0].message.content


def test_greedy_text_matches_transformers(runner, hf):
    model, proc = hf
    first = _chat(runner, IMAGES_A)
    assert first == hf_greedy(runner.service, model, proc, PARTS, IMAGES_A, 12)
    assert _chat(runner, IMAGES_B) == hf_greedy(runner.service, model, proc, PARTS, IMAGES_B, 12)
    assert _chat(runner, IMAGES_A) == first  # and from the prefix cache


def test_serve_openai_client(model_dir, runner, hf):
    openai = pytest.importorskip("openai")
    from tests.e2e.conftest import serve_process

    model, proc = hf
    with serve_process("-m", str(model_dir), "--dtype", "f32") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        res = client.chat.completions.create(model="default", max_tokens=12, temperature=0, messages=[
            {"role": "user", "content": chat_content(PARTS, IMAGES_B)}])
        assert res.choices[0].message.content == hf_greedy(runner.service, model, proc, PARTS, IMAGES_B, 12)
        text_only = client.chat.completions.create(model="default", max_tokens=6, temperature=0,
                                                   messages=[{"role": "user", "content": "what is it?"}])
        assert text_only.choices[0].message.content == hf_greedy(
            runner.service, model, proc, [{"type": "text", "text": "what is it?"}], [], 6)


def test_placeholder_count_must_match_images(runner):
    from mistralrs.errors import InvalidRequest
    from tests.helpers.vision_models import image_inputs

    with pytest.raises(InvalidRequest, match="2 image placeholders for 1 images"):
        runner.service.processor.process("[IMG] and [IMG]", image_inputs(IMAGES_A[:1]))
