"""The run directory: cached attention on disk, read back by readable names.

Layout (``RUN/``)::

    run.json                     what produced the run (model, fingerprints, settings, versions)
    samples.parquet              one row per captured sample (see SAMPLE_COLUMNS)
    attention/part-R-NNNNN.safetensors   attention tensors of a batch of samples
    attention/part-R-NNNNN.parquet       the index rows of exactly those samples
    errors.jsonl                 samples skipped with --skip-bad (capture)
    select/ eval/ figures/       written by the later stages

Tensor names inside a part: ``"L{agg_layer}/last"`` -> ``[S_part, H, N]``, the last prompt
token's attention at layer K-1 to the N image tokens, row ``part_row`` of samples.parquet;
with ``--queries text`` also ``"{sample_id}/L{agg_layer}/text"`` -> ``[H, Q, N]`` (every
text token after the image). Readers ask :class:`Run` by sample and layer, never by key.

A part becomes visible only when its .parquet index lands, and both files are written to
a temporary name and renamed: an interrupted capture leaves nothing half-written, and a
re-run skips exactly the samples whose part is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import polars as pl

FORMAT_VERSION = 1

IDENTITY_KEYS = (
    "model",
    "model_fingerprint",
    "data_sha256",
    "agg_layers",
    "queries",
    "store",
    "dtype",
    "max_new_tokens",
    "prompt_template",
    "store_dtype",
    "benchmark",
    "subsample_seed",
)
"""run.json keys that must match for a capture to resume into an existing run. The limit
is not one: a capture with a larger limit (or none) extends the run, a smaller one adds
nothing; data, model and settings decide what a run is."""

SAMPLE_COLUMNS = {
    "sample_id": pl.Int64,
    "question_id": pl.Utf8,
    "image": pl.Utf8,
    "question": pl.Utf8,
    "answer": pl.Utf8,
    "category": pl.Utf8,
    "prediction": pl.Utf8,
    "correct": pl.Boolean,
    "image_start": pl.Int64,
    "n_image_tokens": pl.Int64,
    "prompt_tokens": pl.Int64,
    "shard": pl.Utf8,
    "part_row": pl.Int64,
    "capture_seconds": pl.Float64,
    "image_width": pl.Int64,
    "image_height": pl.Int64,
    "objects": pl.List(pl.List(pl.Float64)),
    "grid_rows": pl.Int64,  # the sample's spatial grid and each image token's cell on it
    "grid_cols": pl.Int64,  # (fastv_analysis.layout: -1 off the grid, -2 a newline token)
    "token_cells": pl.List(pl.Int32),
    "part_sha256": pl.Utf8,  # the sample's part file: its sha256 and size, checked by every reader
    "part_bytes": pl.Int64,
}

STORAGE_COLUMNS = ("shard", "part_row", "part_sha256", "part_bytes")
"""Columns of samples.parquet that say where a sample is stored, not what it is."""

_PART = re.compile(r"^part-(\d+)-(\d+)\.parquet$")
_LAST = re.compile(r"^(\d+)/L(\d+)/last$")


def attention_key(sample_id: int, agg_layer: int, query: str = "last") -> str:
    """Name of one cached tensor: the layer-(K-1) attention used to prune at layer K (or,
    for another ``query``, one of the named inputs of :mod:`fastv_analysis.probes`)."""
    return f"{int(sample_id)}/L{int(agg_layer)}/{query}"


def layers_key(sample_id: int) -> str:
    """Name of a sample's ``[L, H, N]`` last-token image attention at every layer (``--store layers``)."""
    return f"{int(sample_id)}/layers"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling and rename, so readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_write_parquet(df: pl.DataFrame, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    df.write_parquet(tmp)
    os.replace(tmp, path)


def config_differences(old: dict, new: dict, keys: Sequence[str] = IDENTITY_KEYS) -> list[str]:
    """Human-readable list of identity settings that differ between two run configs."""
    return [f"{k}: {old.get(k)!r} (existing) != {new.get(k)!r} (now)" for k in keys if old.get(k) != new.get(k)]


class RunMismatchError(ValueError):
    """An existing run directory was made with other settings."""


class DamagedPartError(ValueError):
    """A stored part is missing, truncated or altered; the message names it and the repair."""


def part_problem(path: Path, sha256: str | None, size: int | None, *, full: bool = True) -> str | None:
    """None when the part file is what its index recorded; else what is wrong with it.
    ``full=False`` checks presence and size only (a stat); ``full`` also hashes the bytes."""
    from .provenance import file_sha256

    if not path.is_file():
        return "is missing"
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"is damaged ({actual:,} bytes, its index says {size:,})"
    if full and sha256 is not None and file_sha256(path) != sha256:
        return "is damaged (its sha256 differs from its index)"
    return None


_CAPTURE_FLAGS = (("benchmark", "--benchmark", None), ("queries", "--queries", "last"),
                  ("store_dtype", "--store-dtype", "float32"), ("max_new_tokens", "--max-new-tokens", 10),
                  ("prompt_template", "--prompt-template", None), ("subsample", "--subsample", None),
                  ("subsample_seed", "--subsample-seed", 0), ("limit", "--limit", None))


def capture_command(root: str | Path, config: dict) -> str:
    """The capture command that resumes (and so repairs) the run in ``root``, from its run.json."""
    import shlex

    if "settings" not in config:  # not made by `fastv-analyze capture` (a synthetic run)
        return f"the capture that made {root}, again"
    settings = config["settings"]
    args = ["fastv-analyze", "capture", "--model", config["model"], "--data", config["data"], "--out", str(root),
            "--agg-layers", ",".join(str(k) for k in config["agg_layers"])]
    for key, flag, default in _CAPTURE_FLAGS:
        value = config.get(key, settings.get(key))
        if value is not None and value != default:
            args += [flag, str(value)]
    if config.get("store"):
        args += ["--store", ",".join(config["store"])]
    if settings.get("dtype", "auto") != "auto":
        args += ["--dtype", settings["dtype"]]
    return shlex.join(args)


class RunWriter:
    """Writes a run directory part by part; safe to interrupt and resume.

    ``rank`` separates the parts of processes that capture side by side (accelerate /
    torchrun): each writes its own parts, and :meth:`finalize` merges every index.
    """

    def __init__(self, root: str | Path, config: dict, *, overwrite: bool = False, rank: int = 0):
        self.root = Path(root)
        self.rank = rank
        self.attention_dir = self.root / "attention"
        config = {"format": FORMAT_VERSION, **config}
        run_json = self.root / "run.json"
        if run_json.exists() and not overwrite:
            old = json.loads(run_json.read_text())
            diffs = config_differences(old, config)
            if diffs:
                raise RunMismatchError(
                    f"{self.root} holds a run made with other settings ({'; '.join(diffs)}); "
                    "use another --out or --overwrite"
                )
        elif overwrite and self.root.exists():
            _remove_run_files(self.root)
        self.attention_dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            atomic_write_json(run_json, config)
        self.config = config
        self.repaired = self.drop_damaged_parts() if rank == 0 and not overwrite else []
        self._next = 1 + max((n for r, n in self._parts() if r == rank), default=-1)

    def drop_damaged_parts(self) -> list[str]:
        """Remove every part whose tensor file is missing or differs from its index (or whose
        index is unreadable), so that resuming captures exactly their samples again; returns
        one line per removed part. Each part is read and hashed once."""
        lines = []
        for index in sorted(self.attention_dir.glob("part-*.parquet")):
            tensors = index.with_suffix(".safetensors")
            try:
                rows = pl.read_parquet(index)
            except Exception:  # a damaged index: its samples are not known to be stored
                problem, n = "has an unreadable index", "its"
            else:
                sha = rows["part_sha256"][0] if "part_sha256" in rows.columns and rows.height else None
                size = rows["part_bytes"][0] if "part_bytes" in rows.columns and rows.height else None
                problem, n = part_problem(tensors, sha, size), f"its {rows.height}"
            if problem:
                index.unlink()
                tensors.unlink(missing_ok=True)
                lines.append(f"{tensors.relative_to(self.root)} {problem}: {n} samples are captured again")
        return lines

    def _parts(self) -> list[tuple[int, int]]:
        found = (_PART.match(p.name) for p in self.attention_dir.glob("part-*.parquet"))
        return sorted((int(m[1]), int(m[2])) for m in found if m)

    def done_sample_ids(self) -> set[int]:
        """Samples whose part is complete (tensor file and index both renamed in place)."""
        files = sorted(self.attention_dir.glob("part-*.parquet"))
        if not files:
            return set()
        return set(pl.read_parquet(files, columns=["sample_id"])["sample_id"].to_list())

    def write_part(self, rows: list[dict], tensors: dict) -> str:
        """Store the tensors of some samples and then their index rows; returns the part name.

        The last-token rows of one layer are stacked into one ``L{K}/last`` tensor
        ``[S_part, H, N]`` (row i = ``rows[i]``), so a sample costs H x N x dtype bytes and
        no header entry of its own; other tensors, and rows of samples with different N
        (anyres models), are stored under their own names.
        """
        import torch
        from safetensors.torch import save

        name = f"part-{self.rank:03d}-{self._next:05d}"
        self._next += 1
        position = {int(r["sample_id"]): i for i, r in enumerate(rows)}
        per_layer: dict[int, dict[int, object]] = {}
        out = {}
        for key, value in tensors.items():
            m = _LAST.match(key)
            if m and int(m[1]) in position:
                per_layer.setdefault(int(m[2]), {})[position[int(m[1])]] = value
            else:
                out[key] = value
        for layer, by_row in per_layer.items():
            if len(by_row) == len(rows) and len({tuple(t.shape) for t in by_row.values()}) == 1:
                out[f"L{layer}/last"] = torch.stack([by_row[i] for i in range(len(rows))])
            else:
                out.update({attention_key(rows[i]["sample_id"], layer): v for i, v in by_row.items()})
        blob = save({k: v.contiguous().cpu() for k, v in out.items()})
        atomic_write_bytes(self.attention_dir / f"{name}.safetensors", blob)
        check = {"part_sha256": hashlib.sha256(blob).hexdigest(), "part_bytes": len(blob)}
        frame = pl.DataFrame([{**r, "shard": name, "part_row": i, **check} for i, r in enumerate(rows)],
                             schema_overrides=_present(rows))
        atomic_write_parquet(frame, self.attention_dir / f"{name}.parquet")
        return name

    def finalize(self, extra: dict | None = None) -> pl.DataFrame:
        """Merge every part's index into samples.parquet (sorted, one row per sample)."""
        files = sorted(self.attention_dir.glob("part-*.parquet"))
        samples = (
            pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
            if files
            else pl.DataFrame(schema=SAMPLE_COLUMNS)
        )
        samples = samples.unique("sample_id", keep="first").sort("sample_id")
        atomic_write_parquet(samples, self.root / "samples.parquet")
        if extra:
            atomic_write_json(self.root / "run.json", {**self.config, **extra})
        return samples


def _present(rows: list[dict]) -> dict:
    keys = set().union(*(r.keys() for r in rows), {"part_sha256", "part_bytes"}) if rows else set()
    return {k: t for k, t in SAMPLE_COLUMNS.items() if k in keys}


DERIVED = ("select", "eval", ".eval-parts", ".select.tmp", ".eval.tmp", "figures", "report.html", "report.ipynb",
           "report.json")
"""What the later stages derived from a capture: removed with it on --overwrite."""


def _remove_run_files(root: Path) -> None:
    import shutil

    for p in [root / "run.json", root / "samples.parquet", root / "errors.jsonl"]:
        p.unlink(missing_ok=True)
    for p in (root / "attention").glob("*") if (root / "attention").exists() else []:
        p.unlink()
    for name in DERIVED:
        target = root / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


@dataclass
class Run:
    """A captured run directory, read lazily. Use :func:`open_run`.

    ``samples`` is the polars index (one row per sample); tensors are fetched by name
    with the small methods below, never by raw key arithmetic in callers.
    """

    root: Path
    config: dict
    samples: pl.DataFrame
    _handles: dict = field(default_factory=dict, repr=False)
    _verified: set = field(default_factory=set, repr=False)  # parts whose sha256 matched their index

    @property
    def agg_layers(self) -> list[int]:
        return [int(k) for k in self.config.get("agg_layers", [])]

    @cached_property
    def _shard_of(self) -> dict[int, tuple[str, int]]:
        rows = self.samples["part_row"].to_list() if "part_row" in self.samples.columns else [0] * self.samples.height
        return dict(zip(self.samples["sample_id"].to_list(), zip(self.samples["shard"].to_list(), rows)))

    @cached_property
    def _part_checks(self) -> dict[str, tuple[str | None, int | None]]:
        """Each part's recorded (sha256, bytes); (None, None) for runs stored before checksums."""
        cols = [c for c in ("part_sha256", "part_bytes") if c in self.samples.columns]
        parts = self.samples.select("shard", *cols).unique("shard", keep="first", maintain_order=True)
        return {row["shard"]: (row.get("part_sha256"), row.get("part_bytes")) for row in parts.iter_rows(named=True)}

    def _check_part(self, shard: str, full: bool) -> None:
        if shard in self._verified:
            return
        path = self.attention_dir / f"{shard}.safetensors"
        problem = part_problem(path, *self._part_checks.get(shard, (None, None)), full=full)
        if problem:
            raise DamagedPartError(f"{path} {problem}: run `{capture_command(self.root, self.config)}` to "
                                   "capture its samples again")
        if full:
            self._verified.add(shard)

    def check_parts(self, full: bool = False) -> None:
        """Every part present with its recorded size (a stat each; :func:`open_run` does this);
        ``full``: also hash each part not hashed yet (a reader hashes a part when it first opens it)."""
        for shard in self._part_checks:
            self._check_part(shard, full=full)

    @property
    def sample_ids(self) -> list[int]:
        return self.samples["sample_id"].to_list()

    def _tensor(self, key: str, sample_id: int):
        from safetensors import safe_open

        try:
            shard, row = self._shard_of[int(sample_id)]
        except KeyError:
            raise KeyError(f"sample_id {sample_id} is not in {self.root / 'samples.parquet'}") from None
        if shard not in self._handles:
            self._check_part(shard, full=True)  # hashed once per part and Run
            self._handles[shard] = safe_open(str(self.attention_dir / f"{shard}.safetensors"), framework="pt")
        handle = self._handles[shard]
        if key in handle.keys():
            return handle.get_tensor(key)
        m = _LAST.match(key)
        stacked = m and f"L{m[2]}/last"
        if stacked and stacked in handle.keys():
            return handle.get_slice(stacked)[row]
        raise KeyError(f"{key} not stored in {self.attention_dir / shard}.safetensors")

    @property
    def data_path(self) -> Path:
        """The run's question file: as captured (absolute), else relative to the run
        directory (a run moved together with its data), else the stored path as is."""
        stored = Path(self.config.get("data", ""))
        relative = self.config.get("data_relative")
        if not stored.exists() and relative and (self.root / relative).exists():
            return (self.root / relative).resolve()
        return stored

    @property
    def attention_dir(self) -> Path:
        return self.root / "attention"

    def check_layer(self, agg_layer: int) -> None:
        if int(agg_layer) not in self.agg_layers:
            raise ValueError(
                f"agg layer {agg_layer} was not captured in {self.root} (captured: {self.agg_layers})"
            )

    def last_token_attention(self, sample_id: int, agg_layer: int):
        """float32 ``[H, N]``: last prompt token -> image tokens, layer ``agg_layer - 1``."""
        self.check_layer(agg_layer)
        return self._tensor(attention_key(sample_id, agg_layer, "last"), sample_id).float()

    def text_attention(self, sample_id: int, agg_layer: int):
        """float32 ``[H, Q, N]``: every text token after the image -> image tokens (``--queries text``)."""
        self.check_layer(agg_layer)
        return self._tensor(attention_key(sample_id, agg_layer, "text"), sample_id).float()

    def stack(self, agg_layer: int, sample_ids: Sequence[int]):
        """float32 ``[S, H, N]`` of the given samples' last-token attention."""
        import torch

        tensors = [self.last_token_attention(s, agg_layer) for s in sample_ids]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"samples of {self.root} have different [H, N] shapes {sorted(shapes)}; cannot stack")
        return torch.stack(tensors) if tensors else torch.zeros(0, 0, 0)

    def inputs(self, agg_layer: int, sample_ids: Sequence[int], names: Sequence[str]) -> dict:
        """``{name: [S, ...] float32}`` of the named inputs stored with ``--store`` for layer K."""
        import torch

        self.check_layer(agg_layer)
        stored = set(self.config.get("store") or [])
        out = {}
        for name in names:
            if name not in stored:
                raise ValueError(f"{self.root}: {name} was not captured (capture with --store {name})")
            out[name] = torch.stack([self._tensor(attention_key(s, agg_layer, name), s).float() for s in sample_ids])
        return out

    def inputs_layer(self, agg_layer: int) -> int | None:
        """The layer whose stored inputs a selection at ``agg_layer`` reads: that layer, or at
        K = 0 (nothing stored there) the first captured K >= 1, whose LLM-input inputs
        (``embeddings``, ``instruction``) are the same at every layer; None if there is none."""
        if agg_layer > 0:
            return agg_layer
        return next((k for k in self.agg_layers if k > 0), None)

    def layer_attention(self, sample_id: int):
        """float32 ``[L, H, N]``: the last prompt token's image attention at every layer."""
        if "layers" not in (self.config.get("store") or []):
            raise ValueError(f"{self.root}: per-layer attention was not captured (capture with --store layers)")
        return self._tensor(layers_key(sample_id), sample_id).float()

    def iter_chunks(self, agg_layer: int, chunk_size: int = 256) -> Iterator[tuple[list[int], object]]:
        """Yield ``(sample_ids, [S, H, N])`` chunks so big runs never sit in memory whole."""
        ids = self.sample_ids
        for i in range(0, len(ids), chunk_size):
            chunk = ids[i : i + chunk_size]
            yield chunk, self.stack(agg_layer, chunk)


def open_run(path: str | Path) -> Run:
    """Open a run directory written by ``fastv-analyze capture`` (or :func:`write_synthetic_run`)."""
    root = Path(path)
    run_json, index = root / "run.json", root / "samples.parquet"
    if not run_json.exists():
        raise FileNotFoundError(f"{root} is not a run directory: {run_json} is missing (run `fastv-analyze capture` first)")
    if not index.exists():
        raise FileNotFoundError(f"{index} is missing: the capture of {root} did not finish (re-run it to resume)")
    try:
        config = json.loads(run_json.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{run_json} is not valid JSON: {err}") from None
    try:
        samples = pl.read_parquet(index)
    except Exception as err:  # polars raises several kinds on a truncated or altered file
        raise DamagedPartError(f"{index} is damaged ({err.__class__.__name__}): run "
                               f"`{capture_command(root, config)}` to rebuild it from the parts") from None
    run = Run(root=root, config=config, samples=samples)
    if "shard" in run.samples.columns:
        run.check_parts()
    return run


def write_synthetic_run(root: str | Path, attention: dict, *, part_size: int = 64, config: dict | None = None) -> Run:
    """A run directory from given attention ``{agg_layer: [S, H, N]}``, for tests and benchmarks.

    It goes through the same :class:`RunWriter` as a real capture, so whatever reads
    a real run reads this one.
    """
    layers = sorted(attention)
    n_samples, _, n_tokens = attention[layers[0]].shape
    cfg = {"model": "synthetic", "model_fingerprint": "synthetic", "data_sha256": "synthetic",
           "agg_layers": layers, "queries": "last", "dtype": str(attention[layers[0]].dtype).removeprefix("torch."),
           **(config or {})}
    writer = RunWriter(root, cfg, overwrite=True)
    for start in range(0, n_samples, part_size):
        ids = range(start, min(start + part_size, n_samples))
        rows = [
            {"sample_id": s, "question_id": str(s), "question": "", "answer": "", "prediction": "",
             "correct": True, "image_start": 0, "n_image_tokens": n_tokens, "prompt_tokens": n_tokens}
            for s in ids
        ]
        tensors = {attention_key(s, k): attention[k][s] for s in ids for k in layers}
        writer.write_part(rows, tensors)
    writer.finalize()
    return open_run(root)
