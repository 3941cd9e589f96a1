"""Capture store size per sample: the formula, checked against real captures on tiny checkpoints,
then evaluated at the real checkpoints' N (up to LLaVA-NeXT's 2,880 image tokens).

Per sample and aggregation layer K, with H heads, N image tokens, D the decoder width, L its
layers, s the store dtype's bytes (``--store-dtype``, float32 = 4) and T = DART's text pivots (4):

    last (always), attention_no_rope / _text_mean / _all_mean   H x N x s each
    hidden_norm                                                 N x s
    sketch                                                      N x 64 x s
    embeddings                                                  N x D x s
    dart_image (float32)                                        N x (2 + D) x 4
    dart_text (float32)                                         T x (1 + D) x 4
    layers (once per sample, not per K)                         L x H x N x s

Measured part: ``run_capture`` with ``--store`` every option on five images of different sizes
(so different N) for each family given, on its tiny checkpoint; the bytes it reports per
tensor kind (``bytes_per_sample``: payload, no safetensors header) must equal the formula
summed over the samples' own N, exactly.

    python benchmarks/bench_store_size.py [--families LlavaNextForConditionalGeneration,...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import polars as pl

from fastv_analysis import probes
from fastv_analysis.adapters import registry

SIZES = [(56, 56), (120, 80), (80, 120), (56, 56), (200, 90)]
AGG_LAYERS = [1, 2]

REAL = [  # (model, H, L, D, N, how N arises): the decoder's config values
    ("LLaVA-1.5-7B", 32, 32, 4096, 576, "24 x 24"),
    ("LLaVA-NeXT-7B (most)", 32, 32, 4096, 2880, "5 x 576: base + 4 tiles, the papers' count"),
    ("Qwen2.5-VL-7B (1 MP)", 28, 28, 3584, 1296, "36 x 36 after the 2 x 2 merge"),
    ("InternVL3-8B (12 tiles + thumbnail)", 28, 28, 3584, 3328, "13 x 256"),
    ("Mistral-Small-3.1-24B (1540 px)", 32, 40, 5120, 3080, "55 x 55 [IMG] + 55 breaks"),
]


def kind_bytes(kind: str, heads: int, n: int, dim: int, layers: int, itemsize: int = 4) -> int:
    """Bytes of one stored tensor kind for one sample of ``n`` image tokens (module docstring)."""
    if kind in ("last", "attention_no_rope", "attention_text_mean", "attention_all_mean"):
        return heads * n * itemsize
    if kind == "hidden_norm":
        return n * itemsize
    if kind == "sketch":
        return n * probes.SKETCH_DIM * itemsize
    if kind == "embeddings":
        return n * dim * itemsize
    if kind == "dart_image":
        return n * (2 + dim) * 4
    if kind == "dart_text":
        return probes.DART_TEXT_PIVOTS * (1 + dim) * 4
    if kind == "layers":
        return layers * heads * n * itemsize
    raise ValueError(f"unknown stored kind {kind!r}")


def per_sample(heads: int, n: int, dim: int, layers: int, store: tuple[str, ...], n_agg: int = 1) -> int:
    """Bytes per sample: ``last`` and every ``store`` kind at each of ``n_agg`` layers (``layers`` once)."""
    kinds = ("last", *(k for k in store if k != "layers"))
    return n_agg * sum(kind_bytes(k, heads, n, dim, layers) for k in kinds) + \
        (kind_bytes("layers", heads, n, dim, layers) if "layers" in store else 0)


def measured(arch: str, tmp: Path) -> tuple[dict, dict, int]:
    """(bytes_per_sample the capture reports, the formula's, samples) on ``arch``'s tiny checkpoint."""
    import json

    import numpy as np
    from PIL import Image

    from fastv_analysis.capture import CaptureConfig, run_capture
    from fastv_analysis.loading import load_model

    model = registry()[arch].tiny(tmp / "m", seed=1)
    data = tmp / "d"
    (data / "images").mkdir(parents=True)
    lines = []
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray((np.random.default_rng(i).random((h, w, 3)) * 255).astype("uint8")).save(
            data / "images" / f"{i}.png")
        lines.append(json.dumps({"question_id": f"q{i}", "image": f"images/{i}.png", "text": "what color?",
                                 "answer": "red"}))
    (data / "q.jsonl").write_text("\n".join(lines) + "\n")
    cfg = CaptureConfig(model=str(model), data=str(data / "q.jsonl"), out=str(tmp / "run"), agg_layers=AGG_LAYERS,
                        device="cpu", dtype="float32", max_new_tokens=1, store=list(probes.STORE_OPTIONS))
    info = run_capture(cfg, progress=False, command=["bench_store_size.py"])
    text = load_model(str(model), device="cpu", dtype="float32").model.config.get_text_config()
    heads, dim, layers = text.num_attention_heads, text.hidden_size, text.num_hidden_layers
    ns = pl.read_parquet(tmp / "run" / "samples.parquet")["n_image_tokens"].to_list()
    n_agg = len([k for k in AGG_LAYERS if k >= 1])
    formula = {}
    for kind in info["bytes_per_sample"]:
        times = 1 if kind == "layers" else n_agg
        formula[kind] = round(sum(times * kind_bytes(kind, heads, n, dim, layers) for n in ns) / len(ns))
    return info["bytes_per_sample"], formula, len(ns)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default="LlavaNextForConditionalGeneration,Mistral3ForConditionalGeneration",
                        help="registered HF classes whose tiny checkpoints are captured")
    args = parser.parse_args()
    for arch in args.families.split(","):
        with tempfile.TemporaryDirectory(prefix="bench_store-") as tmp:
            got, formula, n = measured(arch, Path(tmp))
        same = got == formula
        print(f"{arch}: {n} samples, K = {AGG_LAYERS}, --store all: measured == formula: {same}")
        for kind in sorted(got):
            print(f"  {kind:22s} {got[kind]:>10,d} B/sample   formula {formula[kind]:>10,d}")
        assert same, f"{arch}: the capture's bytes differ from the formula"
    print("real checkpoints, per sample and aggregation layer, float32 (MB = 1e6 B):")
    print(f"  {'model':40s} {'H':>3s} {'N':>5s}  {'last':>8s} {'+3 rows':>8s} {'+emb':>8s} {'layers':>8s}")
    for name, heads, layers, dim, n, how in REAL:
        rows = kind_bytes("last", heads, n, dim, layers)
        print(f"  {name:40s} {heads:3d} {n:5d}  {rows / 1e6:8.3f} {4 * rows / 1e6:8.3f} "
              f"{(rows + kind_bytes('embeddings', heads, n, dim, layers)) / 1e6:8.3f} "
              f"{kind_bytes('layers', heads, n, dim, layers) / 1e6:8.2f}   ({how})")


if __name__ == "__main__":
    main()
