"""Idefics3 and SmolVLM against transformers on tiny random checkpoints (SigLIP-style tower over
28-pixel tiles, pixel shuffle, Llama): the image processor's views and the prompt's tile/global
token layout for images of many sizes and aspect ratios and several processor settings; logits
with no image, one image and two images of different sizes; greedy text through the Python API
and through `mistralrs serve --arch idefics3` with the openai client."""

from __future__ import annotations

import pytest
import torch

from tests.e2e.test_vision_llava import PARTS, _chat, _hf_greedy, _ours_logits
from tests.helpers.vision_models import data_url, sample_image
from tests.helpers.vision_models_tiled import write_tiny_idefics3

pytest.importorskip("PIL")

SIZES = [(60, 40), (30, 50), (28, 28), (100, 20), (13, 90), (57, 57), (200, 150), (1, 1), (84, 84)]
IMAGE_SETTINGS = [{}, {"size": {"longest_edge": 28}}, {"do_image_splitting": False},
                  {"size": {"longest_edge": 100}}, {"size": {"height": 50, "width": 70}}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_idefics3(tmp_path_factory.mktemp("idefics3") / "tiny-idefics3")


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    return Idefics3ForConditionalGeneration.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def runner(model_dir):
    from mistralrs.api import Runner, Which

    r = Runner(Which.Plain(model_id=str(model_dir), dtype="f32"), pa_ctxt_len=4096, pa_blk_size=16)
    yield r
    r.shutdown()


@pytest.mark.parametrize("settings", IMAGE_SETTINGS)
def test_processor_matches_transformers(hf, runner, settings):
    import copy

    from mistralrs.multimodal.images import ImageInput
    from mistralrs_plugins.models.idefics3.processor import Idefics3ImageProcessor

    _, proc = hf
    proc = copy.deepcopy(proc)
    ours = copy.copy(runner.service.processor)
    for key, value in settings.items():
        setattr(proc.image_processor, key, value)
    ours.image_processor = Idefics3ImageProcessor({**proc.image_processor.to_dict(), **settings}, 28)
    for seed, (w, h) in enumerate(SIZES):
        image = sample_image(w, h, seed)
        ref = proc(text="Look:<image>, and?", images=[image], return_tensors="pt")
        ids, items = ours.process("Look:<image>, and?", [ImageInput(image, f"img{seed}", "test")])
        assert ids == ref["input_ids"][0].tolist(), (settings, w, h)
        pixels = torch.stack([item.data["pixel_values"] for item in items])
        assert pixels.shape == ref["pixel_values"][0].shape, (settings, w, h)
        assert torch.equal(pixels, ref["pixel_values"][0]), (settings, w, h)
        assert len({item.key for item in items}) == len(items)  # every view its own prefix-cache key


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


def test_smolvlm_logits_match_transformers(tmp_path):
    """SmolVLMForConditionalGeneration is the same model: auto-detected as idefics3."""
    from transformers import AutoProcessor, SmolVLMForConditionalGeneration

    from mistralrs.api import Runner, Which

    directory = write_tiny_idefics3(tmp_path / "tiny-smolvlm", smolvlm=True, seed=1)
    model, proc = SmolVLMForConditionalGeneration.from_pretrained(directory).eval(), AutoProcessor.from_pretrained(directory)
    images = [sample_image(50, 70, 3), sample_image(90, 20, 4)]
    prompt = "Hi <image> then <image> what?"
    enc = proc(text=prompt, images=images, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits[0]
    r = Runner(Which.Plain(model_id=str(directory), dtype="f32"), pa_ctxt_len=4096, pa_blk_size=16)
    try:
        assert r.service.loaded.arch.name == "idefics3"
        ids, ours = _ours_logits(r.service.loaded, r.service.processor, prompt, images)
    finally:
        r.shutdown()
    assert ids == enc["input_ids"][0].tolist()
    assert (ours - ref).abs().max().item() < 1e-4


def test_greedy_text_matches_transformers(runner, hf):
    a = [sample_image(60, 40, 1), sample_image(20, 70, 2)]
    b = [sample_image(60, 40, 3), sample_image(20, 70, 4)]
    first = _chat(runner, a)
    assert first == _hf_greedy(runner, hf, a)
    assert _chat(runner, b) == _hf_greedy(runner, hf, b)  # other pixels, same sizes: no stale cache blocks
    assert _chat(runner, a) == first


def test_chunked_prefill_between_tiles(model_dir, runner, hf):
    """A 9-token prefill budget: chunks stop between tiles (every tile's run is 4 tokens), never
    inside one, and the text is still transformers'."""
    from mistralrs.api import Runner, Which

    images = [sample_image(70, 45, 7), sample_image(25, 25, 8)]
    small = Runner(Which.Plain(model_id=str(model_dir), dtype="f32"), pa_ctxt_len=4096, pa_blk_size=16,
                   max_num_batched_tokens=9)
    try:
        assert _chat(small, images) == _hf_greedy(runner, hf, images)
    finally:
        small.shutdown()


def test_serve_openai_client(model_dir, runner, hf):
    openai = pytest.importorskip("openai")
    from tests.e2e.conftest import serve_process

    images = [sample_image(45, 70, 5), sample_image(90, 30, 6)]
    content = [part if part["type"] == "text" else {"type": "image_url", "image_url": {"url": data_url(images[i // 2])}}
               for i, part in enumerate(PARTS)]
    with serve_process("-m", str(model_dir), "--arch", "idefics3", "--dtype", "f32") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        res = client.chat.completions.create(model="default", messages=[{"role": "user", "content": content}],
                                             max_tokens=12, temperature=0)
        assert res.choices[0].message.content == _hf_greedy(runner, hf, images)
        with pytest.raises(openai.BadRequestError, match="image placeholders"):  # "<image>" typed as text
            client.chat.completions.create(model="default", max_tokens=2, messages=[
                {"role": "user", "content": [{"type": "text", "text": "what is <image>?"}]}])
        assert client.chat.completions.create(model="default", max_tokens=2, messages=[
            {"role": "user", "content": "text only"}]).choices  # and it goes on serving


def test_isq_quantized_model_answers(model_dir):
    """--isq q8_0: the quantized Linear layers (language model, projector) take images too."""
    from mistralrs.api import Runner, Which

    r = Runner(Which.Plain(model_id=str(model_dir), dtype="f32"), in_situ_quant="q8_0", pa_ctxt_len=4096,
               pa_blk_size=16)
    try:
        assert _chat(r, [sample_image(60, 40, 1), sample_image(20, 70, 2)], max_tokens=4) is not None
    finally:
        r.shutdown()
