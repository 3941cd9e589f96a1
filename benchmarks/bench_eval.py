"""Benchmark the pruned model and the eval stage, each side by side with its baseline.

Part 1: forward (prefill) time of ``mode="drop"`` (pruned tokens physically removed) vs
``mode="mask"`` (kept in place, masked out as keys, as the reference implementation did)
at K = 2, keep 64 of 576, timed side by side in one run, interleaved, median of repeats.
Also the unpruned model for scale, and FastV's theoretical FLOP ratio.

Part 2: the eval of 3 methods (avg_all_heads, max_head, weighted_combination) x 4 alphas
(0.25, 0.5, 0.75, 1.0; alpha only varies weighted_combination, so 6 rankings) x 4 keeps
(192, 128, 64, 16) at K = 2 on ``--samples`` samples, timed two ways on the same model
and samples, interleaved sample by sample:

(a) ours: :func:`fastv_analysis.evaluate.evaluate_sample` on the kept sets that
    :func:`fastv_analysis.select.replay` chose from layer-1 attention recorded in float32
    (``AttentionRecorder`` during a capture-style full ``generate``, timed separately):
    distinct sets only (``selection_id``), one ``prefill_shared`` + ``greedy_decode``
    batch per keep;
(b) naive: one ``generate(max_new_tokens=M, do_sample=False)`` per sample and
    configuration with FastV inside (one :func:`apply_fastv` wrapper per sample, its
    ``.fastv`` method/alpha/keep switched at run time), ranking inside the model.

Both must give the same kept sets and the same answers; the script checks it and prints
the forward counts and the theoretical reason for the ratio.

Model: ``data/toy-llava`` when it exists, else a random-weight model of the toy's shape
(``fastv_analysis.toy.checkpoint.build_config()``, saved to a temp dir and loaded back
through ``fastv_analysis.loading.load_model``). Questions: ``data/toy-vqa/questions.jsonl``
when it exists, else random-colour 336 x 336 images with toy-vocabulary questions.

    python benchmarks/bench_eval.py [--samples 50] [--max-new-tokens 3] [--repeats 7] [--threads 1]

Part 1 also prints the vision tower's share and the floor no pruning goes below (the tower
and layers 0..K-1 run at full length; FastV's FLOP ratio counts the decoder only).

Targets: drop <= 0.5x of mask; eval time (ours/naive) <= 0.4. Last two lines:
``eval time ratio (ours/naive): <r>`` and ``eval speed-up vs naive: <ratio>x``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastv_analysis.adapters import get_adapter
from fastv_analysis.flops import equivalent_image_tokens, flops_ratio, layer_flops
from fastv_analysis.loading import sync_device
from fastv_analysis.pruning import FastVConfig, apply_fastv
from fastv_analysis.testing import timed, toy_or_random_checkpoint

DATA = Path(__file__).resolve().parents[1] / "data"
TOY = DATA / "toy-llava"
TOY_QUESTIONS = DATA / "toy-vqa" / "questions.jsonl"

METHODS = ("avg_all_heads", "max_head", "weighted_combination")
ALPHAS = (0.25, 0.5, 0.75, 1.0)
KEEPS = (192, 128, 64, 16)


def resolve_questions(data: str | None, n: int, tmp: Path) -> tuple[str, str]:
    """(path, description): the given file, the shipped toy set, or n random-colour images."""
    if data:
        return data, data
    if TOY_QUESTIONS.exists():
        return str(TOY_QUESTIONS), str(TOY_QUESTIONS)
    from PIL import Image

    from fastv_analysis.toy.scenes import CELL, COLORS, GRID, NUMBERS, SHAPES

    rng = random.Random(0)
    nprng = np.random.default_rng(0)
    folder = tmp / "random-vqa"
    folder.mkdir(parents=True, exist_ok=True)
    colors = list(COLORS)
    lines = []
    for i in range(n):
        cells = nprng.integers(0, 256, size=(GRID, GRID, 3), dtype=np.uint8)  # one colour per patch
        pixels = np.repeat(np.repeat(cells, CELL, axis=0), CELL, axis=1)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
        c, sh = rng.choice(colors), rng.choice(SHAPES)
        text, answer = rng.choice([
            (f"What color is the {sh}?", c), (f"What shape is the {c} object?", sh),
            (f"How many {c} objects are there?", rng.choice(NUMBERS)),
            (f"Is there a {c} {sh}?", rng.choice(["yes", "no"])),
            (f"Is the {c} {sh} on the left or right?", rng.choice(["left", "right"])),
        ])
        lines.append(json.dumps({"question_id": i, "image": f"{i:04d}.png", "text": text, "answer": answer}))
    path = folder / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path), f"{n} random-colour 336 x 336 images, toy-vocabulary questions (data/toy-vqa absent)"


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


class Stopwatch:
    """Wall seconds spent inside one module's forward, per run (hooks; CUDA synchronised)."""

    def __init__(self, module, device):
        self.device, self.start, self.seconds = device, 0.0, 0.0
        self.handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, module, args):
        sync_device(self.device)
        self.start = time.perf_counter()

    def _post(self, module, args, output):
        sync_device(self.device)
        self.seconds += time.perf_counter() - self.start

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def part1(model, name: str, args, device, dtype) -> list[str]:
    """Drop vs mask prefill; returns the printed lines."""
    adapter = get_adapter(model)
    inputs = llava_inputs(model, args.batch, args.before, args.after, device, dtype)
    n_tokens = inputs["input_ids"].shape[1]
    n_image = int((inputs["input_ids"][0] == adapter.image_token_id).sum())

    # One wrapper, switched at run time: two wrappers on one model would both fire.
    settings = {"full": dict(use_fast_v=False), "mask": dict(mode="mask"), "drop": dict(mode="drop")}
    times: dict[str, list[float]] = {k: [] for k in settings}
    vision: dict[str, list[float]] = {k: [] for k in settings}  # the vision tower's share of each forward
    watch = Stopwatch(adapter.vision_tower, device)
    with apply_fastv(model, FastVConfig(agg_layer=args.agg_layer, keep=args.keep)) as fastv, torch.inference_mode():

        def run(key: str) -> None:
            fastv.fastv.use_fast_v = settings[key].get("use_fast_v", True)
            fastv.fastv.mode = settings[key].get("mode", "drop")
            fastv(**inputs, use_cache=False)

        for key in settings:  # warm-up
            run(key)
        watch.take()
        for _ in range(args.repeats):
            for key in settings:
                times[key].append(timed(lambda: run(key), device))
                vision[key].append(watch.take())
    watch.remove()

    median = {k: statistics.median(v) for k, v in times.items()}
    rest = {k: statistics.median(t - v for t, v in zip(times[k], vision[k])) for k in settings}  # past the tower
    layers = adapter.num_layers
    # drop cannot go below: the tower, and layers 0..K-1 at full length (1/layers of the rest each)
    floor = (statistics.median(vision["mask"]) + rest["mask"] * args.agg_layer / layers) / median["mask"]
    ratio = flops_ratio(n_tokens, n_image, args.keep, adapter.num_layers, args.agg_layer,
                        adapter.hidden_size, adapter.intermediate_size)
    eq_tokens = equivalent_image_tokens(n_image, args.keep, adapter.num_layers, args.agg_layer)
    lines = [f"== part 1: drop vs mask prefill; model: {name}; device {device}, {args.dtype}, "
             f"{torch.get_num_threads()} threads",
             f"prompt: batch {args.batch} x {n_tokens} tokens ({n_image} image); K={args.agg_layer}, keep {args.keep}",
             f"{'':6s} {'prefill ms (median of ' + str(args.repeats) + ')':>30s}"]
    lines += [f"{key:6s} {1000 * median[key]:30.2f}" for key in settings]
    lines += [f"drop/full prefill time: {median['drop'] / median['full']:.3f}x; "
              f"mask/full: {median['mask'] / median['full']:.3f}x",
              f"theoretical FLOP ratio (FastV formula, decoder only): {ratio:.3f}; "
              f"equivalent image tokens {eq_tokens:.1f} of {n_image}",
              f"vision tower: {1000 * statistics.median(vision['mask']):.2f} ms of mask's forward; without it "
              f"drop/mask: {rest['drop'] / rest['mask']:.3f}x; floor of drop/mask (tower + layers 0..K-1 "
              f"unpruned, the pruned layers free): {floor:.3f}x",
              f"drop/mask prefill time: {median['drop'] / median['mask']:.3f}x (target <= 0.5)"]
    for line in lines:
        print(line, flush=True)
    return lines


class ForwardCounter:
    """Counts top-level model forwards (a prefill or one decode step each) into the current bucket."""

    def __init__(self, model):
        self.counts: dict[str, int] = {}
        self.bucket = None
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        if self.bucket is not None:
            self.counts[self.bucket] = self.counts.get(self.bucket, 0) + 1

    def __call__(self, bucket):
        self.bucket = bucket
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bucket = None


def part2(loaded, name: str, questions_path: str, qdesc: str, args) -> None:
    """Eval of methods x alphas x keeps: ours (evaluate_sample on replayed kept sets) vs naive."""
    from fastv_analysis.attention import AttentionRecorder, take_positions
    from fastv_analysis.capture import BadSample, CaptureConfig, prepare
    from fastv_analysis.data import load_questions
    from fastv_analysis.evaluate import evaluate_sample
    from fastv_analysis.pruning import image_positions
    from fastv_analysis.select import replay, score_configs

    model, processor, device = loaded.model, loaded.processor, loaded.device
    adapter = get_adapter(model)
    k = args.agg_layer
    m_new = args.max_new_tokens
    configs = [(sc, keep) for sc in score_configs(METHODS, ALPHAS) for keep in KEEPS]
    cfg = CaptureConfig(model=name, data=questions_path, agg_layers=[k], max_new_tokens=m_new)
    max_tokens = int(getattr(model.config.text_config, "max_position_embeddings", 1 << 30))
    prepared = []
    for sid, q in enumerate(load_questions(questions_path)):
        if len(prepared) == args.samples:
            break
        try:
            prepared.append(prepare(sid, q, processor, cfg, max_tokens, adapter.image_token_id))
        except BadSample as err:
            print(f"skipped: {err}")
    pad = processor.tokenizer.pad_token_id or 0
    counter = ForwardCounter(model)

    def capture_and_select(p):
        """Capture-style full generate with layer K-1 recorded (float32), then replay."""
        inputs = processor(text=[p.prompt], images=[p.image], return_tensors="pt")
        inputs = {key: v.to(device) for key, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
        with AttentionRecorder(model, [k - 1], "last") as rec:
            model.generate(**inputs, max_new_tokens=m_new, do_sample=False, pad_token_id=pad)
        image_pos = image_positions(inputs["input_ids"], adapter.image_token_id)
        attention = take_positions(rec.rows[k - 1].float(), image_pos, dim=-1)[:, :, -1, :]  # [1, H, N]
        t0 = time.perf_counter()
        rows = replay(attention.cpu(), METHODS, ALPHAS, KEEPS, sample_ids=[p.sample_id], agg_layer=k)
        return rows, time.perf_counter() - t0

    def ours(p, rows):
        return evaluate_sample(loaded, p, rows, m_new)

    def naive(p):
        """One generate per configuration, FastV ranking inside; returns {(config, keep): (answer, kept)}."""
        inputs = processor(text=[p.prompt], images=[p.image], return_tensors="pt")
        inputs = {key: v.to(device) for key, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
        seq_len = inputs["input_ids"].shape[1]
        image_pos = image_positions(inputs["input_ids"], adapter.image_token_id)[0]
        out = {}
        with apply_fastv(model, FastVConfig(agg_layer=k, keep=KEEPS[0])) as fm:
            for sc, keep in configs:
                fm.fastv.method = sc.method
                fm.fastv.alpha = sc.alpha if sc.alpha is not None else 0.5
                fm.fastv.keep = keep
                tokens = fm.generate(**inputs, max_new_tokens=m_new, do_sample=False, pad_token_id=pad)
                kept = fm.last_gen_attention_mask[0, image_pos].nonzero().flatten().tolist()
                out[sc.label, keep] = (processor.batch_decode(tokens[:, seq_len:], skip_special_tokens=True)[0].strip(),
                                       kept)
        return out

    with torch.inference_mode():  # warm-up on the first sample, untimed
        rows, _ = capture_and_select(prepared[0])
        ours(prepared[0], rows)
        naive(prepared[0])

    t_capture = t_select = t_ours = t_naive = 0.0
    n_prefill_ours = n_sets_ours = n_calls_naive = 0
    sets_per_keep: dict[int, list[int]] = {keep: [] for keep in KEEPS}
    mismatched_answers, mismatched_sets, compared = [], 0, 0
    prompt_tokens = []
    with torch.inference_mode():
        for i, p in enumerate(prepared):
            with counter("capture"):
                t0 = time.perf_counter()
                rows, sel_seconds = capture_and_select(p)
                sync_device(device)
                t_capture += time.perf_counter() - t0 - sel_seconds
                t_select += sel_seconds

            def run_ours():
                with counter("ours"):
                    t0 = time.perf_counter()
                    result = ours(p, rows)
                    sync_device(device)
                    return result, time.perf_counter() - t0

            def run_naive():
                with counter("naive"):
                    t0 = time.perf_counter()
                    result = naive(p)
                    sync_device(device)
                    return result, time.perf_counter() - t0

            if i % 2 == 0:  # alternate the order, so neither way always runs on a warmer cache
                ((answers, timings), s_ours), (naive_out, s_naive) = run_ours(), run_naive()
            else:
                (naive_out, s_naive), ((answers, timings), s_ours) = run_naive(), run_ours()
            t_ours += s_ours
            t_naive += s_naive
            n_prefill_ours += len(timings)
            n_sets_ours += sum(t["n_sets"] for t in timings)
            n_calls_naive += len(naive_out)
            for t in timings:
                sets_per_keep[t["keep"]].append(t["n_sets"])
            prompt_tokens.append(len(processor(text=[p.prompt], images=[p.image])["input_ids"][0]))
            for row in rows.iter_rows(named=True):
                ans_b, kept_b = naive_out[row["config"], row["keep"]]
                ans_a = answers[k, row["selection_id"]]
                compared += 1
                mismatched_sets += kept_b != list(row["kept"])
                if ans_a != ans_b:
                    mismatched_answers.append((p.sample_id, row["config"], row["keep"], ans_a, ans_b))
    counter.handle.remove()

    n = len(prepared)
    c = counter.counts
    ratio = t_ours / t_naive
    # Decoder prefill FLOPs by FastV's formula, per sample: (a) one pass through layers < K
    # per keep and one row per distinct set from layer K on; (b) every configuration alone.
    n_tok = round(sum(prompt_tokens) / n)
    n_img = int(model.config.image_seq_length)
    d, mlp, n_layers = adapter.hidden_size, adapter.intermediate_size, adapter.num_layers
    full_part = k * layer_flops(n_tok, d, mlp)

    def pruned_part(keep):
        return (n_layers - k) * layer_flops(n_tok - n_img + keep, d, mlp)

    mean_sets = {keep: sum(v) / len(v) for keep, v in sets_per_keep.items()}
    flops_ours = sum(full_part + mean_sets[keep] * pruned_part(keep) for keep in KEEPS)
    flops_naive = sum(full_part + pruned_part(keep) for _, keep in configs)
    print(f"== part 2: eval of {len(METHODS)} methods x {len(ALPHAS)} alphas x {len(KEEPS)} keeps "
          f"({len(configs) // len(KEEPS)} rankings x {len(KEEPS)} keeps = {len(configs)} configurations; alpha only "
          f"varies weighted_combination), K={k}, max_new_tokens {m_new}")
    print(f"model: {name}; questions: {qdesc}; {n} samples; device {device}, {str(loaded.dtype)[6:]}, "
          f"{torch.get_num_threads()} threads")
    print(f"capture (full generate + layer-{k - 1} attention, float32), not part of either way: {t_capture:.2f} s; "
          f"select.replay: {t_select:.3f} s")
    print(f"{'':32s} {'seconds':>9s} {'ms/sample':>10s} {'prefills':>9s} {'model forwards':>15s} {'rows':>6s}")
    print(f"{'(a) ours: evaluate_sample':32s} {t_ours:9.2f} {1e3 * t_ours / n:10.1f} {n_prefill_ours:9d} "
          f"{c.get('ours', 0):15d} {n_sets_ours:6d}")
    print(f"{'(b) naive: generate per config':32s} {t_naive:9.2f} {1e3 * t_naive / n:10.1f} {n_calls_naive:9d} "
          f"{c.get('naive', 0):15d} {n_calls_naive:6d}")
    print(f"agreement (a) vs (b) on {compared} sample x configuration pairs: kept sets differ in {mismatched_sets}, "
          f"answers differ in {len(mismatched_answers)}")
    for mm in mismatched_answers[:5]:
        print(f"  mismatch: sample {mm[0]}, {mm[1]}, keep {mm[2]}: ours {mm[3]!r} vs naive {mm[4]!r}")
    print("distinct kept sets per sample and keep (of 6 rankings): "
          + ", ".join(f"keep {keep}: {mean_sets[keep]:.2f}" for keep in KEEPS))
    print(f"why: per sample, (b) runs {len(configs)} generate calls, each a full prefill (vision tower, layers "
          f"0..{k - 1} over all {n_tok} tokens, layers {k}..{n_layers - 1} over the kept ones) and its own "
          f"{m_new - 1}-step decode loop;")
    print(f"     (a) runs {len(KEEPS)} prefills, one per keep: vision tower and layers 0..{k - 1} once, layers "
          f"{k}.. batched over that keep's distinct kept sets, then one batched decode loop;")
    print(f"     equal sets are answered once: weighted_combination(alpha=0.25 = 1/H, H={adapter.num_heads}) "
          f"ranks exactly like avg_all_heads, alpha=1.0 exactly like max_head.")
    print(f"theoretical decoder prefill FLOPs (FastV formula) ours/naive: {flops_ours / flops_naive:.3f}; "
          f"model calls ours/naive: {n_prefill_ours / n_calls_naive:.3f} prefills, "
          f"{c.get('ours', 0) / max(c.get('naive', 1), 1):.3f} forwards (per-call overhead: vision tower, generate, "
          f"hooks, is paid per call)")
    print(f"including capture + select (ours needs them; the naive way does not): "
          f"{(t_ours + t_capture + t_select) / t_naive:.3f}")
    print(f"eval time ratio (ours/naive): {ratio:.3f} (target <= 0.4)")
    print(f"eval speed-up vs naive: {t_naive / t_ours:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="default: data/toy-llava, else a random model of its shape")
    parser.add_argument("--data", default=None, help="question file; default: data/toy-vqa/questions.jsonl, "
                                                      "else random-colour images")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--agg-layer", type=int, default=2)
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--before", type=int, default=35, help="text tokens before the image (LLaVA-1.5: 35)")
    parser.add_argument("--after", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1, as README measures: with 2 on a 2-core machine the "
                             "small pruned matmuls gain little from a second thread and the ratio swings)")
    parser.add_argument("--skip-part1", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastv_analysis.loading import load_model

    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        model_path, name = (args.model, args.model) if args.model else toy_or_random_checkpoint(Path(tmp))
        questions_path, qdesc = resolve_questions(args.data, args.samples, Path(tmp))
        loaded = load_model(model_path, args.device, args.dtype)
        if not args.skip_part1:
            part1(loaded.model, name, args, loaded.device, loaded.dtype)
        part2(loaded, name, questions_path, qdesc, args)


if __name__ == "__main__":
    main()
