"""Vision speed on a dummy-weight model of Qwen2.5-VL-3B's shape (ViT: 32 blocks, hidden 1280,
window attention; language model: hidden 2048, 36 layers, 16 heads, 2 KV heads, intermediate
11008, vocab 151936) — or fewer layers given on the command line.

Reports the time to first token for one 448×448 image (256 image tokens) and a short text
prompt, the vision encoder's share of it, how many times the encoder ran per request (it must be
once, not per decode step), and batch-1 decode tok/s with that image in the context next to a
text-only prompt of the same length on the same model. Prints a table and writes JSON.

    python benchmarks/vision_speed.py [--dtype bf16] [--threads 2] [--layers 36] [--vision-depth 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

QWEN2_5_VL_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
    "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": True, "hidden_act": "silu",
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31]},
}
PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_processor_type": "Qwen2VLImageProcessor"}


def _model_dir(directory: Path, config: dict) -> None:
    """config.json, the image processor config, and the demo tokenizer with ``<|image_pad|>`` added."""
    from mistralrs.demo import demo_model_dir

    tok = json.loads((demo_model_dir() / "tokenizer.json").read_text())
    image_id = max(len(tok["model"]["vocab"]), *(t["id"] + 1 for t in tok["added_tokens"]))
    tok["added_tokens"].append({"id": image_id, "content": "<|image_pad|>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (directory / "tokenizer.json").write_text(json.dumps(tok))
    (directory / "tokenizer_config.json").write_bytes((demo_model_dir() / "tokenizer_config.json").read_bytes())
    (directory / "config.json").write_text(json.dumps({**config, "image_token_id": image_id}))
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=None, help="override the language model's num_hidden_layers")
    ap.add_argument("--vision-depth", type=int, default=None, help="override the ViT's depth")
    ap.add_argument("--image", type=int, default=448, help="image side in pixels")
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/vision_speed.json")
    args = ap.parse_args()

    import os

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the CLI does; before torch allocates
    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mistralrs import protocol as P
    from mistralrs.engine.engine import GenerationRequest
    from mistralrs.engine.sampling import SamplingParams
    from mistralrs.multimodal.images import ImageInput
    from mistralrs.serving import ModelService, ServiceOptions

    config = json.loads(json.dumps(QWEN2_5_VL_3B))
    if args.layers:
        config["num_hidden_layers"] = args.layers
    if args.vision_depth:
        config["vision_config"]["depth"] = args.vision_depth
        config["vision_config"]["fullatt_block_indexes"] = [
            i for i in config["vision_config"]["fullatt_block_indexes"] if i < args.vision_depth]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        _model_dir(model_dir, config)
        svc = ModelService(ServiceOptions(model_id=str(model_dir), dtype=args.dtype, dummy_weights=True, max_seqs=4,
                                          pa_context_len=4096))
    engine, model = svc.engine, svc.loaded.model
    greedy = SamplingParams(temperature=0)

    encodes: list[float] = []
    embed = model.embed_multimodal

    def timed_embed(item):
        t = time.perf_counter()
        out = embed(item)
        encodes.append(time.perf_counter() - t)
        return out

    model.embed_multimodal = timed_embed

    def image(seed: int) -> ImageInput:
        rng = np.random.default_rng(seed)
        pixels = rng.integers(0, 255, (args.image, args.image, 3), dtype=np.uint8)
        return ImageInput(Image.fromarray(pixels), f"bench-{seed}", "bench")

    prompt = "<|im_start|>user\n<|image_pad|>Describe this picture in one short sentence, please.<|im_end|>\n"

    def request(seed: int, max_tokens: int, with_image: bool = True) -> tuple[GenerationRequest, int]:
        ids, items = svc.processor.process(prompt, [image(seed)])
        if not with_image:  # the same length, text only
            ids, items = [(1000 + 7 * i) % 800 + 9 for i in range(len(ids))], ()
        return GenerationRequest(prompt_ids=ids, sampling=greedy, max_tokens=max_tokens, ignore_eos=True,
                                 mm=items), len(ids)

    def run(req: GenerationRequest):
        return P.collect(engine.submit(req))[0]

    run(request(0, 2)[0])  # warm-up

    ttft, encoder = [], []
    for seed in (1, 2):  # different images: no prefix-cache hit
        encodes.clear()
        req, prompt_len = request(seed, 1)
        t = time.perf_counter()
        run(req)
        ttft.append(time.perf_counter() - t)
        encoder.append(sum(encodes))

    encodes.clear()
    req, _ = request(3, args.gen_len)
    with_image = run(req)
    calls = len(encodes)
    text_only = run(request(4, args.gen_len, with_image=False)[0])
    image_tokens = sum(item.length for item in req.mm)
    svc.shutdown()

    out = {
        "config": {"hidden_size": config["hidden_size"], "num_hidden_layers": config["num_hidden_layers"],
                   "vision_depth": config["vision_config"]["depth"], "vision_hidden": config["vision_config"]["hidden_size"]},
        "dtype": str(svc.loaded.dtype).removeprefix("torch."),
        "threads": args.threads,
        "image": f"{args.image}x{args.image}",
        "image_tokens": image_tokens,
        "prompt_tokens": prompt_len,
        "ttft_s": min(ttft),
        "encoder_s": statistics.mean(encoder),
        "encoder_share_of_ttft": statistics.mean(encoder) / min(ttft),
        "encoder_calls_per_request": calls,
        "decode_tok_per_s_with_image": with_image.usage.completion_tok_per_sec,
        "decode_tok_per_s_text_only": text_only.usage.completion_tok_per_sec,
    }
    print(f"{'image tokens / prompt tokens':34}{image_tokens:>6} / {prompt_len}")
    print(f"{'time to first token':34}{out['ttft_s']:10.2f} s")
    print(f"{'  of which vision encoder':34}{out['encoder_s']:10.2f} s   ({100 * out['encoder_share_of_ttft']:.0f}%)")
    print(f"{'encoder runs per request':34}{calls:10d}   ({args.gen_len} tokens generated)")
    print(f"{'decode tok/s, image in context':34}{out['decode_tok_per_s_with_image']:10.2f}")
    print(f"{'decode tok/s, text only':34}{out['decode_tok_per_s_text_only']:10.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
