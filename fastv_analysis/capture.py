"""The capture stage: one full forward per sample, layer K-1 attention to the image cached.

For every sample the unpruned model answers greedily; during that same generate call an
:class:`~fastv_analysis.attention.AttentionRecorder` on layer K-1 recomputes the
prompt's query rows from the layer's own inputs. Every layer keeps SDPA; nothing asks
for ``output_attentions``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .distributed import SEVERAL_PROCESSES, process_group  # noqa: F401  (SEVERAL_PROCESSES: importable here as before)
from .loading import DEFAULT_DATA, DEFAULT_MODEL, check_template, load_model, sync_device
from .provenance import file_sha256, fingerprint, versions
from .samples import BadSample, Prepared, model_inputs, prepare  # noqa: F401  (importable here as before)
from .scoring import is_correct
from .store import RunWriter, atomic_write_bytes, attention_key, layers_key

_distributed = process_group  # the name before fastv_analysis.distributed

QUERIES = ("last", "text")


@dataclass
class CaptureConfig:
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    out: str = "runs/capture"
    agg_layers: list[int] = field(default_factory=lambda: [2])
    queries: str = "last"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 1
    limit: int | None = None
    skip_bad: bool = False
    max_new_tokens: int = 10
    prompt_template: str | None = None
    store_dtype: str = "float32"
    overwrite: bool = False
    part_size: int = 32
    benchmark: str | None = None  # a fastv_analysis.tasks name; None = detect, else a plain question file
    subsample: int | None = None  # a seeded random subset of N questions (a larger N extends it)
    subsample_seed: int = 0
    store: list[str] = field(default_factory=list)  # extra tensors, see fastv_analysis.probes.STORE_OPTIONS


def text_query_positions(image_pos: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Positions ``[Q]`` of the last Q tokens, Q = the most text tokens after an image in the batch.

    With left padding every prompt ends at ``seq_len - 1``, so prompt b's text after its
    image is exactly the last ``seq_len - 1 - image_pos[b, -1]`` of these positions.
    """
    q = int((seq_len - 1 - image_pos[:, -1]).max())
    return torch.arange(seq_len - q, seq_len)


def _answer_text(answer) -> str:
    """The reference as stored in samples.parquet: an option index as its letter ("A"),
    which the scorer reads back as that option (a digit would read as option text)."""
    return chr(ord("A") + answer) if isinstance(answer, int) else str(answer)


def capture_batch(loaded, batch: list[Prepared], cfg: CaptureConfig, store_dtype: torch.dtype):
    """Answer and record one batch; returns (index rows, tensors by name)."""
    from . import probes
    from .adapters import get_adapter
    from .attention import AttentionRecorder, take_positions
    from .pruning import image_positions, last_token_positions

    adapter = get_adapter(loaded.model)
    processor = loaded.processor
    inputs = model_inputs(loaded, batch)
    image_pos = image_positions(inputs["input_ids"], adapter.image_token_id)  # [B, N]
    seq_len = inputs["input_ids"].shape[1]
    queries = "last" if cfg.queries == "last" else text_query_positions(image_pos, seq_len)
    ranked = [k for k in cfg.agg_layers if k >= 1]  # K = 0 ranks nothing: nothing to record
    layers = [k - 1 for k in ranked]
    named = [n for n in cfg.store if n in probes.NAMES]
    all_layers = "layers" in cfg.store
    recorded = sorted(set(layers) | (set(range(adapter.num_layers)) if all_layers else set()))
    n_image = torch.full((len(batch),), image_pos.shape[1], device=image_pos.device)
    query_pos = last_token_positions(inputs.get("attention_mask"), len(batch), seq_len, image_pos.device)
    t0 = time.perf_counter()
    with torch.inference_mode(), AttentionRecorder(loaded.model, recorded, queries) as rec, \
            probes.InputsRecorder(loaded.model, layers if named else [], named, image_pos, n_image, query_pos,
                                  inputs.get("attention_mask"), inputs.get("image_sizes")) as extra:
        out = loaded.model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                    pad_token_id=processor.tokenizer.pad_token_id)
    sync_device(loaded.device)
    seconds = (time.perf_counter() - t0) / len(batch)
    answers = processor.batch_decode(out[:, seq_len:], skip_special_tokens=True)
    prompt_tokens = inputs["attention_mask"].sum(dim=1)
    rows, tensors = [], {}
    for b, p in enumerate(batch):
        q = p.question
        prediction = answers[b].strip()
        rows.append({
            "sample_id": p.sample_id, "question_id": str(q.question_id), "image": str(q.image),
            "question": q.text, "answer": _answer_text(q.answer), "category": q.category or "",
            "prediction": prediction, "correct": is_correct(prediction, q.answer, q.choices),
            "image_start": int(image_pos[b, 0] - (seq_len - prompt_tokens[b])),  # in the unpadded prompt
            "n_image_tokens": int(image_pos.shape[1]), "prompt_tokens": int(prompt_tokens[b]), "capture_seconds": seconds,
            "image_width": int(p.image.size[0]), "image_height": int(p.image.size[1]), "objects": q.objects,
            **adapter.token_layouts({**p.inputs, **adapter.layout_inputs(processor, [p.image])},
                                    [int(image_pos.shape[1])])[0].to_row(),
        })
    for k, layer in zip(ranked, layers):
        cols = take_positions(rec.rows[layer], image_pos, dim=-1).to(store_dtype).cpu()  # [B, H, Q, N]
        for b, p in enumerate(batch):
            tensors[attention_key(p.sample_id, k, "last")] = cols[b, :, -1, :].clone()
            if cfg.queries == "text":
                n_after = int(seq_len - 1 - image_pos[b, -1])
                tensors[attention_key(p.sample_id, k, "text")] = cols[b, :, cols.shape[2] - n_after :, :].clone()
            for name, value in extra.inputs.get(layer, {}).items():
                dtype = torch.float32 if name in probes.FLOAT32_NAMES else store_dtype  # exact prompt positions
                tensors[attention_key(p.sample_id, k, name)] = value[b].to(dtype).cpu().clone()
    if all_layers:  # [L, H, N]: the last prompt token's image attention at every layer
        stacked = torch.stack([take_positions(rec.rows[i][:, :, -1, :], image_pos, dim=-1)
                               for i in range(adapter.num_layers)], dim=1).to(store_dtype).cpu()
        for b, p in enumerate(batch):
            tensors[layers_key(p.sample_id)] = stacked[b].clone()
    return rows, tensors


def merge_errors(root: Path) -> None:
    """The per-process errors-R.jsonl files become one errors.jsonl, ordered by sample."""
    parts = sorted(root.glob("errors-*.jsonl"))
    lines = [line for p in parts for line in p.read_text().splitlines() if line.strip()]
    target = root / "errors.jsonl"
    if lines:
        lines.sort(key=lambda line: json.loads(line)["sample_id"])
        atomic_write_bytes(target, ("\n".join(lines) + "\n").encode())
    else:
        target.unlink(missing_ok=True)
    for p in parts:
        p.unlink()


def _checked_settings(cfg: CaptureConfig) -> torch.dtype:
    """One-line errors for flags that cannot work (``cfg.store`` sorted on the way); the
    dtype attention is stored in."""
    from .probes import STORE_OPTIONS

    if cfg.queries not in QUERIES:
        raise ValueError(f"--queries must be one of {', '.join(QUERIES)}, got {cfg.queries!r}")
    unknown = sorted(set(cfg.store) - set(STORE_OPTIONS))
    if unknown:
        raise ValueError(f"--store {','.join(unknown)}: expected some of {', '.join(STORE_OPTIONS)}")
    cfg.store = sorted(set(cfg.store))
    if cfg.prompt_template is not None:
        check_template(cfg.prompt_template)
    dtype = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.store_dtype)
    if dtype is None:
        raise ValueError(f"--store-dtype must be float16, bfloat16 or float32, got {cfg.store_dtype!r}")
    if cfg.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    return dtype


def run_capture(cfg: CaptureConfig, progress: bool = True, command: list[str] | None = None, loaded=None) -> dict:
    """Capture every sample of ``cfg.data`` into the run directory ``cfg.out`` (resumable;
    a larger ``limit`` later extends it). ``loaded``: the model ``cfg.model`` already loaded
    (the lmms-eval plug-in's), instead of loading it again."""
    from .benchmark import questions_fingerprint, resolve_benchmark, run_questions, sample_order

    store_dtype = _checked_settings(cfg)
    cfg.data = str(Path(cfg.data).resolve())  # later stages run from anywhere: store paths resolvable
    if Path(cfg.model).exists():
        cfg.model = str(Path(cfg.model).resolve())
    bad_lines: list[dict] = []
    cfg.benchmark = resolve_benchmark(cfg.data, cfg.benchmark)
    image_root = str(Path(cfg.out).resolve() / "benchmark-images") if cfg.benchmark == "mmbench" else None
    questions = run_questions(cfg.data, cfg.benchmark, image_root, bad_lines if cfg.skip_bad else None,
                              missing_images_ok=cfg.skip_bad)
    order = sample_order(questions, cfg.subsample, cfg.subsample_seed, cfg.limit)
    rank, world, state = process_group(cfg.device)
    if loaded is None:
        loaded = load_model(cfg.model, cfg.device if state is None else str(state.device), cfg.dtype)
    from .adapters import get_adapter

    adapter = get_adapter(loaded.model)
    for k in cfg.agg_layers:
        if not 0 <= k < adapter.num_layers:
            raise ValueError(f"--agg-layers {k}: must be in 0..{adapter.num_layers - 1} (layer K-1 is ranked, "
                             f"layers K.. are pruned, K = 0 prunes the input; the model has {adapter.num_layers})")
    max_tokens = adapter.max_positions
    run_config = {
        "stage": "capture",
        "model": cfg.model,
        "model_fingerprint": fingerprint(cfg.model, loaded.model),
        "architecture": adapter.architecture,
        "data": str(cfg.data),
        "data_relative": os.path.relpath(cfg.data, Path(cfg.out).resolve()),
        "data_sha256": file_sha256(cfg.data) if cfg.benchmark is None else questions_fingerprint(questions),
        "benchmark": cfg.benchmark,
        "image_root": image_root,
        "subsample": cfg.subsample,
        "subsample_seed": cfg.subsample_seed,
        "agg_layers": sorted(cfg.agg_layers),
        "queries": cfg.queries,
        "store": cfg.store,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "store_dtype": cfg.store_dtype,
        "max_new_tokens": cfg.max_new_tokens,
        "prompt_template": cfg.prompt_template,
        "limit": cfg.limit,
        "num_heads": adapter.num_heads,
        "num_layers": adapter.num_layers,
        "versions": versions(),
        "command": command or sys.argv,
        "settings": asdict(cfg),
    }
    # rank 0 checks (or, with --overwrite, replaces) the run directory before the other
    # ranks compare their settings with its run.json; otherwise they race it
    out_dir = Path(cfg.out)
    fresh = not (out_dir / "run.json").exists() or cfg.overwrite
    created = not out_dir.exists()
    with state.main_process_first() if state is not None else contextlib.nullcontext():
        writer = RunWriter(cfg.out, run_config, overwrite=cfg.overwrite and rank == 0, rank=rank)
    if state is not None:
        state.wait_for_everyone()
    for line in writer.repaired:  # damaged or missing parts, removed: their samples are captured again
        print(f"capture: {line}", file=sys.stderr)
    try:
        info = _capture_samples(cfg, writer, questions, order, bad_lines, loaded, adapter, max_tokens, store_dtype,
                                rank, world, state, progress)
    except BaseException:
        if fresh and rank == 0 and not writer.done_sample_ids():
            _remove_empty_run(out_dir, created)  # a run that captured nothing leaves nothing behind
        raise
    if info["n_samples"] == 0 and rank == 0:
        first = info.pop("first_error", None)
        if fresh:
            _remove_empty_run(out_dir, created)
        raise ValueError(f"{cfg.data}: no sample could be captured ({info['bad']} bad"
                         f"{'; first: ' + first if first else ''})")
    info.pop("first_error", None)
    info["repaired"] = writer.repaired
    return info


def _benchmark_scores(benchmark: str, questions, samples, out_dir: Path):
    """The full model's answers scored by the benchmark's own rule (``correct``, ``score``)."""
    import polars as pl

    from .benchmark import score_answers
    from .store import atomic_write_parquet

    answers = dict(zip(samples["question_id"].to_list(), samples["prediction"].to_list()))
    per_question, _ = score_answers(benchmark, questions, answers)
    scored = samples.drop("correct", "score", strict=False).join(
        per_question.select("question_id", "score", "correct"), on="question_id", how="left")
    scored = scored.select(samples.columns + [c for c in ("score",) if c not in samples.columns])
    atomic_write_parquet(scored, out_dir / "samples.parquet")
    return scored.with_columns(pl.col("correct").fill_null(False))


def _remove_empty_run(out_dir: Path, created: bool) -> None:
    """Remove what a capture that stored no sample wrote (run.json, empty folders, logs)."""
    import shutil

    for name in ("run.json", "samples.parquet", "errors.jsonl"):
        (out_dir / name).unlink(missing_ok=True)
    for p in out_dir.glob("errors-*.jsonl"):
        p.unlink()
    shutil.rmtree(out_dir / "attention", ignore_errors=True)
    if created and out_dir.exists() and not any(out_dir.iterdir()):
        out_dir.rmdir()


def _finish(cfg: CaptureConfig, writer, questions, rank: int, state):
    """Once every process is done: rank 0 writes samples.parquet (scored by the benchmark's
    rule) and one errors.jsonl; returns the samples there (None on other ranks)."""
    if state is not None:
        state.wait_for_everyone()
    samples = None
    if rank == 0:
        samples = writer.finalize()
        if cfg.benchmark is not None and samples.height:
            samples = _benchmark_scores(cfg.benchmark, questions, samples, Path(cfg.out))
        merge_errors(Path(cfg.out))
    if state is not None:
        state.wait_for_everyone()
    return samples


def _capture_samples(cfg, writer, questions, order, bad_lines, loaded, adapter, max_tokens, store_dtype, rank,
                     world, state, progress) -> dict:
    """The capture loop of :func:`run_capture`: prepare, batch, record, write parts."""
    from tqdm.auto import tqdm

    from .pruning import is_image_token

    done = writer.done_sample_ids()
    todo = [(i, questions[i]) for i in order if i not in done and i % world == rank]
    errors_path = Path(cfg.out) / f"errors-{rank}.jsonl"
    errors_path.unlink(missing_ok=True)  # bad samples are retried on resume, and logged again
    n_bad = 0
    first_error = bad_lines[0]["error"] if bad_lines else None
    if rank == 0 and bad_lines:
        with open(errors_path, "a") as f:
            f.writelines(json.dumps({"sample_id": -1, **e}) + "\n" for e in bad_lines)
    t_start = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"capture[{rank}]" if world > 1 else "capture", unit="sample",
               disable=not progress)
    pending: list[Prepared] = []
    pending_n = None
    part_rows: list[dict] = []
    part_tensors: dict = {}
    stored_bytes: dict[str, int] = {}  # per stored tensor kind (last, text, attention_no_rope, ..., layers)
    stored_samples = 0

    def flush(final: bool = False):
        """Capture the pending batch; write a part once it holds cfg.part_size samples."""
        nonlocal stored_samples
        if pending:
            rows, tensors = capture_batch(loaded, pending, cfg, store_dtype)
            for key, value in tensors.items():
                kind = key.rsplit("/", 1)[-1]
                stored_bytes[kind] = stored_bytes.get(kind, 0) + value.numel() * value.element_size()
            stored_samples += len(rows)
            part_rows.extend(rows)
            part_tensors.update(tensors)
            bar.update(len(pending))
            pending.clear()
        if part_rows and (final or len(part_rows) >= cfg.part_size):
            writer.write_part(part_rows, part_tensors)
            part_rows.clear()
            part_tensors.clear()

    for sample_id, q in todo:
        try:
            prepared = prepare(sample_id, q, loaded.processor, cfg, max_tokens, adapter.image_token_id)
            n_image = int(is_image_token(prepared.inputs["input_ids"], adapter.image_token_id).sum())
            if pending and n_image != pending_n:  # anyres: a batch holds samples of one N
                flush()
            pending.append(prepared)
            pending_n = n_image
        except BadSample as err:
            if not cfg.skip_bad:
                raise
            n_bad += 1
            first_error = first_error or str(err)
            with open(errors_path, "a") as f:
                f.write(json.dumps({"sample_id": sample_id, "question_id": str(q.question_id),
                                    "file": str(cfg.data), "error": err.reason}) + "\n")
            bar.update(1)
        if len(pending) == cfg.batch_size:
            flush()
    flush(final=True)
    bar.close()
    samples = _finish(cfg, writer, questions, rank, state)
    return {
        "out": str(cfg.out),
        "captured": len(todo) - n_bad,
        "skipped_done": len(done),
        "bad": n_bad + (len(bad_lines) if rank == 0 else 0),  # the lines of errors.jsonl: samples and lines
        "first_error": first_error,
        "seconds": time.perf_counter() - t_start,
        "n_samples": None if samples is None else samples.height,
        "bytes_per_sample": {k: round(v / stored_samples) for k, v in sorted(stored_bytes.items())}
        if stored_samples else {},
        "accuracy": None if samples is None or samples.height == 0 else float(samples["correct"].mean()),
    }
