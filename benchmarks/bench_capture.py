"""Benchmark the capture stage: capture vs the plain model, and bytes stored per sample.

Timed side by side in one run, interleaved sample by sample (the order alternates),
repeated ``--rounds`` times, median of the per-round totals:

(a) capture   ``capture_batch`` exactly as ``run_capture`` calls it: processor, ``generate``
              with an ``AttentionRecorder`` on layer K-1 (SDPA everywhere), image columns
              cut out and copied to the store dtype;
(b) plain     the same processor call and the same greedy ``generate`` (SDPA), no recorder;
(c) prefill   one forward of a processed prompt, with vs without the recorder.

Then one real ``run_capture`` (``--queries last``) into a temporary run directory, for the
bytes stored per sample: size of ``attention/*.safetensors`` / samples, next to the bound
H x N x (bytes of the store dtype) per sample and layer (float32 by default: 4).

Model: ``data/toy-llava`` when it exists, else a random-weight checkpoint of the toy's
size (``fastv_analysis.toy.checkpoint.build_config()``: 8 layers, width 128, 576 image
tokens) saved to a temporary folder. Data: ``data/toy-vqa/questions.jsonl`` when it
exists, else a small question file with random images.

    OMP_NUM_THREADS=1 python benchmarks/bench_capture.py [--samples 40] [--rounds 3]

Target: capture / plain <= 1.3. Last line: ``capture overhead: <ratio>x``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fastv_analysis.attention import AttentionRecorder
from fastv_analysis.capture import CaptureConfig, capture_batch, prepare, run_capture
from fastv_analysis.data import load_questions
from fastv_analysis.loading import DEFAULT_DATA, load_model
from fastv_analysis.testing import timed, toy_or_random_checkpoint, write_random_questions

def plain_batch(loaded, batch, cfg: CaptureConfig) -> list[str]:
    """What capture_batch does for the answer alone: processor + greedy generate, no recorder."""
    processor = loaded.processor
    inputs = processor(text=[p.prompt for p in batch], images=[p.image for p in batch], return_tensors="pt",
                       padding=True)
    inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
    seq_len = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                    pad_token_id=processor.tokenizer.pad_token_id)
    return processor.batch_decode(out[:, seq_len:], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="default: data/toy-llava, else a random toy-sized checkpoint")
    parser.add_argument("--data", default=None, help="default: data/toy-vqa/questions.jsonl, else random images")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill-repeats", type=int, default=10, help="prefill pairs per round")
    parser.add_argument("--agg-layer", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_capture-") as tmp:
        tmp = Path(tmp)
        model_path, model_name = (args.model, args.model) if args.model else toy_or_random_checkpoint(tmp)
        data_path = Path(args.data or DEFAULT_DATA)
        if data_path.exists() or args.data:
            data_name = str(data_path)
        else:
            data_path = write_random_questions(tmp / "data", args.samples)
            data_name = f"{args.samples} questions on random images"

        cfg = CaptureConfig(model=str(model_path), data=str(data_path), out=str(tmp / "run"),
                            agg_layers=[args.agg_layer], queries="last", device=args.device, dtype=args.dtype,
                            batch_size=args.batch_size, limit=args.samples, max_new_tokens=args.max_new_tokens)
        loaded = load_model(cfg.model, cfg.device, cfg.dtype)
        device = loaded.device
        store_dtype = getattr(torch, cfg.store_dtype)  # capture's default
        max_tokens = int(getattr(loaded.model.config.text_config, "max_position_embeddings", 1 << 30))
        image_token_id = loaded.model.config.image_token_id
        questions = load_questions(cfg.data)[: args.samples]
        prepared = [prepare(i, q, loaded.processor, cfg, max_tokens, image_token_id) for i, q in enumerate(questions)]
        batches = [prepared[i : i + args.batch_size] for i in range(0, len(prepared), args.batch_size)]

        # (a) vs (b): interleaved per batch, order alternating, median over rounds of the round totals
        modes = {
            "capture": lambda b: capture_batch(loaded, b, cfg, store_dtype),
            "plain": lambda b: plain_batch(loaded, b, cfg),
        }
        for fn in modes.values():  # warm-up
            fn(batches[0])
        totals: dict[str, list[float]] = {k: [] for k in modes}
        for r in range(args.rounds):
            acc = dict.fromkeys(modes, 0.0)
            for i, batch in enumerate(batches):
                order = list(modes) if (i + r) % 2 == 0 else list(modes)[::-1]
                for key in order:
                    acc[key] += timed(lambda: modes[key](batch), device)
            for key in modes:
                totals[key].append(acc[key])
        gen = {k: statistics.median(v) for k, v in totals.items()}

        # (c) one prefill forward of sample 0's prompt, with vs without the recorder
        proc = loaded.processor
        inputs = proc(text=[prepared[0].prompt], images=[prepared[0].image], return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
        layer = args.agg_layer - 1

        def forward_recorded():
            with AttentionRecorder(loaded.model, [layer], "last") as rec:
                loaded.model(**inputs)
            assert layer in rec.rows

        prefill_modes = {"recorder": forward_recorded, "plain": lambda: loaded.model(**inputs)}
        prefill: dict[str, list[float]] = {k: [] for k in prefill_modes}
        with torch.inference_mode():
            for fn in prefill_modes.values():
                fn()
            for r in range(args.rounds * args.prefill_repeats):
                for key in (list(prefill_modes) if r % 2 == 0 else list(prefill_modes)[::-1]):
                    prefill[key].append(timed(prefill_modes[key], device))
        pre = {k: statistics.median(v) for k, v in prefill.items()}

        # bytes: one real run_capture (--queries last) into a fresh run directory
        t0 = time.perf_counter()
        info = run_capture(cfg, progress=False, command=["bench_capture.py"])
        e2e = time.perf_counter() - t0
        run_dir = Path(cfg.out)
        n_stored = info["n_samples"]
        tensor_bytes = sum(p.stat().st_size for p in (run_dir / "attention").glob("*.safetensors"))
        payload_bytes = 0
        from safetensors import safe_open

        for part in (run_dir / "attention").glob("*.safetensors"):
            with safe_open(str(part), framework="pt") as f:
                payload_bytes += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
        index_bytes = sum(p.stat().st_size for p in (run_dir / "attention").glob("*.parquet"))
        heads = loaded.model.config.text_config.num_attention_heads
        n_image = int((proc(text=[prepared[0].prompt], images=[prepared[0].image], return_tensors="pt")["input_ids"]
                       == image_token_id).sum())
        bound = heads * n_image * store_dtype.itemsize  # per sample and layer, --queries last
        per_sample = tensor_bytes / n_stored / len(cfg.agg_layers)
        payload = payload_bytes / n_stored / len(cfg.agg_layers)
        prompt_len = inputs["input_ids"].shape[1]

    n = len(prepared)
    ratio = gen["capture"] / gen["plain"]
    print(f"model: {model_name}; device {device}, {str(loaded.dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"data: {data_name}; {n} samples, batch size {args.batch_size}, prompt ~{prompt_len} tokens "
          f"({n_image} image), max_new_tokens {args.max_new_tokens}, K={args.agg_layer} (layer {layer} recorded)")
    print(f"{'':28s} {'ms/sample':>10s}   (median of {args.rounds} interleaved rounds)")
    print(f"{'(a) capture (generate+rec)':28s} {1000 * gen['capture'] / n:10.2f}")
    print(f"{'(b) plain generate (SDPA)':28s} {1000 * gen['plain'] / n:10.2f}")
    print(f"{'(c) prefill with recorder':28s} {1000 * pre['recorder']:10.2f}   "
          f"(median of {len(prefill['recorder'])})")
    print(f"{'    prefill plain':28s} {1000 * pre['plain']:10.2f}")
    print(f"{'run_capture end to end':28s} {1000 * e2e / n:10.2f}   (one pass, incl. load/fingerprint/writes)")
    print(f"prefill with / without recorder: {pre['recorder'] / pre['plain']:.3f}x")
    print(f"stored: {per_sample:.0f} bytes/sample/layer in attention/*.safetensors "
          f"(tensor payload {payload:.0f}; bound H {heads} x N {n_image} x {store_dtype.itemsize} = {bound}: "
          f"{'within' if per_sample <= bound else f'+{per_sample - bound:.0f} B safetensors header'}); "
          f"index parts {index_bytes / n_stored:.0f} bytes/sample")
    print(f"capture / plain generate: {ratio:.3f}x (target <= 1.3)")
    print(f"capture overhead: {ratio:.3f}x")


if __name__ == "__main__":
    main()
