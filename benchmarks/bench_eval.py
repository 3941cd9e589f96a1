"""Benchmark the pruned model: FastV drop vs mask prefill, next to FastV's FLOP ratio.

Part 1 (this file so far): forward (prefill) time of ``mode="drop"`` (pruned tokens
physically removed) vs ``mode="mask"`` (kept in place, masked out as keys, as the
reference implementation did) at K = 2, keep 64 of 576, timed side by side in one run,
interleaved, median of repeats. Also the unpruned model for scale.

Model: ``data/toy-llava`` when it exists, else a random LLaVA of the toy's shape
(336 px / patch 14 = 576 image tokens, 8-layer Llama decoder of width 128).

    python benchmarks/bench_eval.py [--model data/toy-llava] [--batch 1] [--repeats 7]

Target: drop <= 0.5x of mask. Last line: ``drop/mask prefill time: <ratio>x``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from fastv_analysis.adapters import get_adapter
from fastv_analysis.flops import equivalent_image_tokens, flops_ratio
from fastv_analysis.pruning import FastVConfig, apply_fastv

TOY = Path(__file__).resolve().parents[1] / "data" / "toy-llava"


def random_toy_shaped_llava(device, dtype):
    """A random LlavaForConditionalGeneration with 576 image tokens and a small 8-layer decoder."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=1, num_attention_heads=2, projection_dim=32)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=511, image_seq_length=576,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).to(device=device, dtype=dtype).eval()


def load(model_path: str | None, device, dtype):
    from transformers import LlavaForConditionalGeneration

    path = Path(model_path) if model_path else TOY
    if path.exists():
        model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa", dtype=dtype)
        return model.to(device).eval(), str(path)
    return random_toy_shaped_llava(device, dtype), "random LLaVA (576 image tokens, 8 x 128 decoder)"


def llava_inputs(model, batch: int, before: int, after: int, device, dtype) -> dict:
    """LLaVA-1.5-shaped prompt: ``before`` text tokens, the image span, ``after`` text tokens."""
    config = model.config
    n_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    vocab = config.text_config.vocab_size
    text = torch.randint(5, vocab, (batch, before + after), generator=g)
    text[text == config.image_token_id] = 5
    image = torch.full((batch, n_image), config.image_token_id)
    input_ids = torch.cat([text[:, :before], image, text[:, before:]], dim=1)
    size = config.vision_config.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=g)
    return {"input_ids": input_ids.to(device), "pixel_values": pixel_values.to(device=device, dtype=dtype)}


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--agg-layer", type=int, default=2)
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--before", type=int, default=35, help="text tokens before the image (LLaVA-1.5: 35)")
    parser.add_argument("--after", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, name = load(args.model, device, dtype)
    adapter = get_adapter(model)
    inputs = llava_inputs(model, args.batch, args.before, args.after, device, dtype)
    n_tokens = inputs["input_ids"].shape[1]
    n_image = int((inputs["input_ids"][0] == adapter.image_token_id).sum())

    # One wrapper, switched at run time: two wrappers on one model would both fire.
    settings = {"full": dict(use_fast_v=False), "mask": dict(mode="mask"), "drop": dict(mode="drop")}
    times: dict[str, list[float]] = {k: [] for k in settings}
    with apply_fastv(model, FastVConfig(agg_layer=args.agg_layer, keep=args.keep)) as fastv, torch.inference_mode():

        def run(key: str) -> None:
            fastv.fastv.use_fast_v = settings[key].get("use_fast_v", True)
            fastv.fastv.mode = settings[key].get("mode", "drop")
            fastv(**inputs, use_cache=False)

        for key in settings:  # warm-up
            run(key)
        for _ in range(args.repeats):
            for key in settings:
                times[key].append(timed(lambda: run(key), device))

    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = flops_ratio(n_tokens, n_image, args.keep, adapter.num_layers, args.agg_layer,
                        adapter.hidden_size, adapter.intermediate_size)
    eq_tokens = equivalent_image_tokens(n_image, args.keep, adapter.num_layers, args.agg_layer)
    print(f"model: {name}; device {device}, {args.dtype}, {torch.get_num_threads()} threads")
    print(f"prompt: batch {args.batch} x {n_tokens} tokens ({n_image} image); K={args.agg_layer}, keep {args.keep}")
    print(f"{'':6s} {'prefill ms (median of ' + str(args.repeats) + ')':>30s}")
    for key in settings:
        print(f"{key:6s} {1000 * median[key]:30.2f}")
    print(f"drop/full prefill time: {median['drop'] / median['full']:.3f}x; "
          f"mask/full: {median['mask'] / median['full']:.3f}x")
    print(f"theoretical FLOP ratio (FastV formula, decoder only): {ratio:.3f}; "
          f"equivalent image tokens {eq_tokens:.1f} of {n_image}")
    print(f"drop/mask prefill time: {median['drop'] / median['mask']:.3f}x")


if __name__ == "__main__":
    main()
