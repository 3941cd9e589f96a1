"""``fastv-analyze capture``: run the full model once per sample and cache attention."""

from __future__ import annotations

import sys

import click

from fastv_analysis.probes import STORE_OPTIONS, store_help

from .params import Choices, IntList, threads_option


@click.command("capture")
@threads_option
@click.option("--model", default=None, help="Local path or hub id of a checkpoint of a supported class (LLaVA-1.5, LLaVA-NeXT, "
              "LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, InternVL; README lists them) [default: the embedded toy model in "
              "data/toy-llava].")
@click.option("--data", default=None, help="Question file (.jsonl, LLaVA/lmms convention) or a standard "
              "benchmark's folder/file (see --benchmark) [default: data/toy-vqa/questions.jsonl].")
@click.option("--benchmark", default=None, help="Read --data as this benchmark: scienceqa_img, pope, mme, gqa, "
              "textvqa, vqav2, mmbench (scored by its official rule) [default: detected from the layout, else a "
              "plain question file].")
@click.option("--subsample", type=click.IntRange(min=1), default=None, metavar="N",
              help="A seeded random subset of N questions (a larger N later extends the run).")
@click.option("--subsample-seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to write (or resume).")
@click.option("--agg-layers", type=IntList(), default="2", show_default=True,
              help="Aggregation layer(s) K; the attention of layer K-1 is stored. K = 0 (prune the "
                   "decoder input: the controls and the pre-LLM strategies, which read the --store inputs of a "
                   "layer K >= 1) stores nothing.")
@click.option("--queries", type=click.Choice(["last", "text"]), default="last", show_default=True,
              help="last: the last prompt token's row; text: every text token after the image too.")
@click.option("--store", "store", type=Choices(STORE_OPTIONS), default="", show_default=False,
              help=store_help())
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
@click.option("--dtype", default="auto", show_default=True,
              help="Model dtype: auto (bfloat16/float16 on GPU, float32 on CPU), float32, float16, bfloat16.")
@click.option("--store-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="dtype of the stored attention: float32 ranks exactly as the model does "
              "(H x N x 4 bytes per sample and layer); float16 halves that but can swap near-ties.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N samples.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=10, show_default=True,
              help="Length of the full model's greedy answer.")
@click.option("--prompt-template", default=None,
              help="Used when the processor has no chat template: must contain <image> and {question}, "
                   "e.g. 'USER: <image>\\n{question} ASSISTANT:'.")
@click.option("--part-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Samples per stored part (an interrupted capture redoes at most this many).")
@click.option("--skip-bad", is_flag=True, help="Log bad samples to RUN/errors.jsonl and go on instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Replace a run directory made with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def capture_cmd(model, data, benchmark, subsample, subsample_seed, out, agg_layers, queries, store, device, dtype, store_dtype, batch_size, limit,
                max_new_tokens, prompt_template, part_size, skip_bad, overwrite, quiet):
    """Run the full model once per sample; store its answer and the layer K-1 attention
    that the prompt paid to each image token, per head, under OUT.

    Re-running the same command resumes; under `accelerate launch` or torchrun the
    processes split the samples and write their own shards.
    """
    from fastv_analysis.capture import CaptureConfig, run_capture
    from fastv_analysis.loading import DEFAULT_DATA, DEFAULT_MODEL
    from fastv_analysis.lock import run_lock

    cfg = CaptureConfig(model=model or DEFAULT_MODEL, data=data or DEFAULT_DATA, out=out,
                        agg_layers=list(agg_layers), queries=queries, device=device, dtype=dtype,
                        batch_size=batch_size, limit=limit, skip_bad=skip_bad, max_new_tokens=max_new_tokens,
                        prompt_template=prompt_template, store_dtype=store_dtype, overwrite=overwrite,
                        part_size=part_size, benchmark=benchmark, subsample=subsample,
                        subsample_seed=subsample_seed, store=list(store))
    with run_lock(out, "capture", device):  # one capture per run directory (a launch's ranks share it)
        info = run_capture(cfg, progress=not quiet, command=sys.argv)
    if info["n_samples"] is not None:
        acc = "" if info["accuracy"] is None else f", full-model accuracy {info['accuracy']:.1%}"
        click.echo(f"capture: {info['captured']} new samples ({info['skipped_done']} already done, "
                   f"{info['bad']} bad) in {info['seconds']:.1f}s -> {out} ({info['n_samples']} samples{acc})")
        if info.get("bytes_per_sample"):
            click.echo("stored per sample: " + ", ".join(f"{k} {v:,} B" for k, v in info["bytes_per_sample"].items()))
