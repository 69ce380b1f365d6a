"""Gemma 3 with images against transformers on a tiny random checkpoint (SigLIP tower, pooled
projector, Gemma 3 text with a sliding and a global layer): pixel values, token expansion and
fp32 logits with no image, one image and two images of different sizes; the image tokens'
bidirectional attention (transformers' token_type_ids mask); greedy text through the Python API
(also with prefill chunked around the images) and through `mistralrs serve` with the openai client."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.vision_models import (
    chat_content,
    hf_greedy,
    ours_logits,
    sample_image,
    write_tiny_gemma3_vision,
)

pytest.importorskip("PIL")

PARTS = [{"type": "text", "text": "Look:"}, {"type": "image"}, {"type": "text", "text": " and "}, {"type": "image"},
         {"type": "text", "text": " what is it?"}]
IMAGES_A = [sample_image(60, 40, 1), sample_image(30, 50, 2)]
IMAGES_B = [sample_image(60, 40, 3), sample_image(30, 50, 4)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_gemma3_vision(tmp_path_factory.mktemp("gemma3v") / "tiny-gemma3-vision")


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def runner(model_dir):
    from mistralrs.api import Runner, Which

    r = Runner(Which.Plain(model_id=str(model_dir), dtype="f32"), pa_ctxt_len=4096, pa_blk_size=16)
    yield r
    r.shutdown()


def _prompt(n: int) -> str:
    return "Hello " + " and ".join(["<start_of_image>"] * n) + " what is this?"


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_processor_and_logits_match_transformers(hf, runner, n_images):
    model, proc = hf
    images = IMAGES_A[:n_images]
    enc = proc(text=_prompt(n_images), images=images or None, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits[0]
    assert runner.service.loaded.arch.name == "gemma3"  # auto-detected from architectures[0]
    ids, ours, items = ours_logits(runner.service, _prompt(n_images), images)
    assert ids == enc["input_ids"][0].tolist()
    assert [it.offset for it in items] == [i for i, t in enumerate(enc["token_type_ids"][0].tolist())
                                           if t == 1 and (i == 0 or enc["token_type_ids"][0, i - 1] == 0)]
    for k, item in enumerate(items):
        assert torch.allclose(item.data["pixel_values"], enc["pixel_values"][k], atol=1e-6)
    assert (ours - ref).abs().max().item() < 1e-4


def test_image_tokens_attend_bidirectionally(hf, runner, monkeypatch):
    """Without the image tokens' bidirectional ranges, our logits leave transformers'."""
    import mistralrs_plugins.models.gemma3.vision as vision

    model, proc = hf
    enc = proc(text=_prompt(1), images=IMAGES_A[:1], return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits[0]
    monkeypatch.setattr(vision, "consecutive_runs", lambda *a: ())
    _, causal_only, _ = ours_logits(runner.service, _prompt(1), IMAGES_A[:1])
    assert (causal_only - ref).abs().max().item() > 1e-2


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
    assert _chat(runner, IMAGES_A) == first  # the prefix cache serves image A's (bidirectional) blocks


def test_chunked_prefill_keeps_images_whole(model_dir, runner):
    """Prefill in chunks of 12 tokens (an image is 16): chunks stop before an image or take all
    of it, so its bidirectional range is never split; the text is the unchunked one's."""
    from mistralrs.api import Runner, Which

    chunked = Runner(Which.Plain(model_id=str(model_dir), dtype="f32"), pa_ctxt_len=4096, pa_blk_size=16,
                     max_num_batched_tokens=12, prefix_cache_n=0)
    try:
        assert _chat(chunked, IMAGES_A) == _chat(runner, IMAGES_A)
    finally:
        chunked.shutdown()


def test_serve_openai_client(model_dir, runner, hf):
    openai = pytest.importorskip("openai")
    from tests.e2e.conftest import serve_process

    model, proc = hf
    with serve_process("-m", str(model_dir), "--arch", "gemma3", "--dtype", "f32") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        res = client.chat.completions.create(model="default", max_tokens=12, temperature=0, messages=[
            {"role": "user", "content": chat_content(PARTS, IMAGES_A)}])
        assert res.choices[0].message.content == hf_greedy(runner.service, model, proc, PARTS, IMAGES_A, 12)
        text_only = client.chat.completions.create(model="default", max_tokens=6, temperature=0,
                                                   messages=[{"role": "user", "content": "what is it?"}])
        assert text_only.choices[0].message.content == hf_greedy(
            runner.service, model, proc, [{"type": "text", "text": "what is it?"}], [], 6)


def test_placeholder_count_must_match_images(runner):
    from mistralrs.errors import InvalidRequest
    from tests.helpers.vision_models import image_inputs

    with pytest.raises(InvalidRequest, match="1 image placeholders for 2 images"):
        runner.service.processor.process(_prompt(1), image_inputs(IMAGES_A))
