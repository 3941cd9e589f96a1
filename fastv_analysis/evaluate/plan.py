"""What to evaluate: the select stage's rows filtered by the flags (``--agg-layer``, ``--methods``,
``--alphas``, ``--configs``, ``--keep`` / ``--keep-ratio`` budgets, ``--limit``), each sample's
``full`` control, ``--then`` schedules, all checked against the run they come from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from .. import stats
from ..store import open_run

FULL = "full"
"""The unpruned control: keep = N, through the same code path as every pruned set."""

REFERENCE = "avg_all_heads"
"""Original FastV: the second reference of the paired tests."""


@dataclass
class EvalConfig:
    run: str
    agg_layers: list[int] | None = None
    methods: list[str] | None = None
    alphas: list[float] | None = None
    keeps: list[int] | None = None
    max_new_tokens: int | None = None
    device: str = "auto"
    dtype: str | None = None
    limit: int | None = None
    compare_mask: int = 0
    timing_samples: int = 5
    timing_repeats: int = 3
    model: str | None = None
    batch_size: int = 64
    configs: list[str] | None = None  # selection labels ("avg_all_heads@text_mean", ...) to answer; None = all
    keep_ratios: list[float] | None = None  # select --keep-ratio configurations to answer (with keeps: counts)
    then: list[tuple] | None = None  # schedule stages (K, keep count or fraction of the previous cut, method)
    positions: str | None = None  # positions policy of every pruned set; None = each strategy's registered one


def configurations(selections: pl.DataFrame, cfg: EvalConfig, complete=None) -> pl.DataFrame:
    """The selection rows to evaluate, filtered by the flags; one-line error when none match."""
    out = selections
    if cfg.agg_layers:
        missing = sorted(set(cfg.agg_layers) - set(out["agg_layer"].unique().to_list()))
        if missing:
            raise ValueError(f"--agg-layer {missing}: not in {cfg.run}/select/selections.parquet "
                             f"(selected layers: {sorted(out['agg_layer'].unique().to_list())})")
        out = out.filter(pl.col("agg_layer").is_in(cfg.agg_layers))
    where = f"{cfg.run}/select/selections.parquet"
    for flag, column, asked in (("--methods", "method", cfg.methods),
                                ("--alphas", "alpha", [float(a) for a in cfg.alphas or []])):
        present = set(out[column].drop_nulls().unique().to_list())
        missing = [a for a in asked or [] if a not in present]
        if missing:
            raise ValueError(f"{flag} {', '.join(map(str, missing))}: not in {where} "
                             f"(there: {', '.join(map(str, sorted(present)))})")
    if cfg.methods:
        out = out.filter(pl.col("method").is_in(cfg.methods))
    if cfg.configs:
        present = set(out["config"].unique().to_list())
        missing = [c for c in cfg.configs if c not in present]
        if missing:
            raise ValueError(f"--configs {', '.join(missing)}: not in {where} (there: {', '.join(sorted(present))})")
        out = out.filter(pl.col("config").is_in(cfg.configs))
    if cfg.alphas:
        out = out.filter(pl.col("alpha").is_null() | pl.col("alpha").is_in([float(a) for a in cfg.alphas]))
    out = by_budget(out, cfg, where)
    if cfg.limit:
        available = out["sample_id"].unique().sort().to_list()
        first = available[: cfg.limit]
        if complete is not None:  # whole circular groups / MME images, as their metrics need
            first = complete(first, available)
        out = out.filter(pl.col("sample_id").is_in(first))
    if out.height == 0:
        raise ValueError(f"no configuration of {cfg.run}/select/selections.parquet matches the given flags")
    return out


def by_budget(selections: pl.DataFrame, cfg: EvalConfig, where: str) -> pl.DataFrame:
    """The rows of the ``--keep`` counts and ``--keep-ratio`` ratios asked (every row when neither
    is): a ratio's rows keep each sample's own count, so ``--keep`` never picks them."""
    ratio = pl.col("ratio") if "ratio" in selections.columns else pl.lit(None, dtype=pl.Float64)
    if not cfg.keeps and not cfg.keep_ratios:
        return selections
    for flag, column, asked in (("--keep", "keep", cfg.keeps), ("--keep-ratio", "ratio", cfg.keep_ratios)):
        kind = selections.filter(ratio.is_null() if column == "keep" else ratio.is_not_null())
        present = set(kind[column].unique().to_list()) if kind.height else set()
        missing = [a for a in asked or [] if a not in present]
        if missing:
            raise ValueError(f"{flag} {', '.join(f'{a:g}' for a in missing)}: not in {where} "
                             f"(there: {', '.join(f'{a:g}' for a in sorted(present)) or 'none'})")
    return selections.filter((ratio.is_null() & pl.col("keep").is_in(cfg.keeps or []))
                             | ratio.is_in([float(r) for r in cfg.keep_ratios or []]))


def reference_label(name: str, ratio: float | None) -> str:
    """A reference configuration's id at a budget: ``avg_all_heads``, or at a ``--keep-ratio``
    ``avg_all_heads ratio 0.25``."""
    from ..select import ratio_label

    return name if ratio is None else ratio_label(name, ratio)


def stage_spec(stage: tuple, keep: int) -> tuple[int, int, str]:
    """``(K, keep, method)`` of one ``--then`` stage for a previous cut that kept ``keep``: a
    float keep in (0, 1] is that fraction of it (rounded), an int a count (at most ``keep``)."""
    k, amount, method = (*stage, "avg_all_heads")[:3]
    count = int(round(float(amount) * keep)) if isinstance(amount, float) else int(amount)
    return int(k), min(count, keep), str(method)


def schedule_text(stages: list[tuple[int, int, str]]) -> str:
    """How a schedule is named in config labels: ``then max_head K=4 keep 32``."""
    return " ".join(f"then {m} K={k} keep {kp}" for k, kp, m in stages)


def with_schedule(selections: pl.DataFrame, then: list[tuple] | None) -> pl.DataFrame:
    """``selections`` plus, for every row with a kept set, the same first cut followed by the
    ``then`` stages (ranked online by the pruned model, so eval gives their exact answer);
    column ``stages`` (JSON ``[[K, keep, method], ...]``, ``[]`` for one cut), labels /
    selection ids that carry the schedule, and ``base_config``: the label of the first cut
    (the configuration itself for one cut)."""
    out = selections.with_columns(pl.lit("[]").alias("stages"), pl.col("config").alias("base_config"))
    if not then:
        return out
    rows = []
    for row in out.iter_rows(named=True):
        if row["keep"] == 0 or row["method"] == FULL or row.get("merge_assign") is not None:
            continue  # nothing left to rank; the full control stays the unpruned reference; merges cut once
        stages, keep = [], int(row["keep"])
        for stage in then:
            k, keep, method = stage_spec(stage, keep)
            stages.append((k, keep, method))
        if stages[0][0] <= int(row["agg_layer"]):
            raise ValueError(f"--then: stage at K = {stages[0][0]} must come after the first cut at "
                             f"K = {row['agg_layer']}")
        text = schedule_text(stages)
        rows.append({**row, "config": f"{row['config']} {text}", "selection_id": f"{row['selection_id']}|{text}",
                     "stages": json.dumps([list(s) for s in stages])})
    return pl.concat([out, pl.DataFrame(rows, schema=out.schema)]) if rows else out


def with_positions(selections: pl.DataFrame, positions: str | None) -> pl.DataFrame:
    """``selections`` with column ``positions``: ``positions`` for every pruned row, or each
    method's registered policy when None (``full`` keeps every token: original). A compact
    row's label gains `` positions=compact`` and its selection id ``|compact``, so its answers
    and accuracy never mix with the original policy's."""
    from .. import strategies

    if positions is not None and positions not in strategies.POSITIONS:
        raise ValueError(f"--positions must be one of {', '.join(strategies.POSITIONS)}, got {positions!r}")
    methods = selections["method"].unique().to_list()
    policy = {m: "original" if m == FULL else positions or strategies.strategy(m).positions for m in methods}
    compact = pl.col("positions") == "compact"
    return selections.with_columns(pl.col("method").replace_strict(policy, return_dtype=pl.Utf8).alias("positions")
                                   ).with_columns(
        pl.when(compact).then(pl.col("config") + " positions=compact").otherwise(pl.col("config")).alias("config"),
        pl.when(compact).then(pl.col("selection_id") + "|compact").otherwise(pl.col("selection_id"))
        .alias("selection_id"))


def with_full_control(selections: pl.DataFrame, layouts: dict) -> pl.DataFrame:
    """``selections`` plus one ``full`` row (every image token kept) per sample and layer;
    ``layouts``: sample_id -> its :class:`~fastv_analysis.layout.TokenLayout`."""
    from ..select import selection_ids

    base = selections.unique(["sample_id", "agg_layer"], keep="first", maintain_order=True).sort(
        "sample_id", "agg_layer")
    rows = []
    for sid, layer in base.select("sample_id", "agg_layer").iter_rows():
        n = layouts[sid].n_tokens
        kept = np.arange(n)[None]
        rows.append({"sample_id": sid, "agg_layer": layer, "method": FULL, "alpha": None, "config": FULL,
                     "keep": n, "keep_ratio": 1.0, "kept": list(range(n)), "max_head": None,
                     "selection_id": selection_ids(kept)[0],
                     **{k: float(v[0]) for k, v in stats.spatial_stats(kept, layouts[sid]).items()}})
    full = pl.DataFrame(rows, schema_overrides={"alpha": pl.Float64, "max_head": pl.Int64,
                                                "kept": pl.List(pl.Int32)})
    full = full.select([pl.col(c).cast(selections.schema[c]) if c in full.columns
                        else pl.lit(None, dtype=selections.schema[c]).alias(c) for c in selections.columns])
    return pl.concat([selections, full])


@dataclass
class EvalPlan:
    """One eval's work: the run, its questions (capture's list, by sample id) and the
    configuration rows to answer (``full`` controls and schedules included)."""

    cfg: EvalConfig
    run: object  # fastv_analysis.store.Run
    questions: list
    selections: pl.DataFrame
    select_id: str | None
    data_file: str

    @property
    def benchmark(self) -> str | None:
        return self.run.config.get("benchmark")

    @property
    def sample_ids(self) -> list[int]:
        return self.selections["sample_id"].unique().sort().to_list()

    @property
    def max_new_tokens(self) -> int:
        return self.cfg.max_new_tokens or int(self.run.config.get("max_new_tokens", 10))


def _checked_select(cfg: EvalConfig):
    """The run and its select stage's selections.parquet, or a one-line error when select is
    missing, was made from another capture, or is stale."""
    from ..provenance import stale_stages

    run = open_run(cfg.run)
    sel_path = run.root / "select" / "selections.parquet"
    if not sel_path.exists():
        raise FileNotFoundError(f"{sel_path} is missing: run `fastv-analyze select {cfg.run}` first")
    select_info = json.loads((run.root / "select" / "select.json").read_text())
    for key, name in (("run_model_fingerprint", "model_fingerprint"), ("run_data_sha256", "data_sha256")):
        if select_info.get(key) != run.config.get(name):
            raise ValueError(f"{run.root / 'select'} was made from another capture ({name} differs): "
                             f"run `fastv-analyze select {cfg.run}` again")
    stale = stale_stages(run).get("select")
    if stale:
        raise ValueError(stale)
    return run, sel_path


def _run_questions(run) -> tuple[str, list]:
    """The run's question file and capture's question list (a sample ``--skip-bad`` skipped
    for its missing image is not in the run)."""
    from ..benchmark import run_questions

    data_file = str(run.data_path)
    if not Path(data_file).exists():
        raise FileNotFoundError(f"{data_file} (the run's question file) is missing")
    image_root = run.config.get("image_root")
    if image_root and not Path(image_root).exists() and (run.root / "benchmark-images").exists():
        image_root = str(run.root / "benchmark-images")  # a moved run
    return data_file, run_questions(data_file, run.config.get("benchmark"), image_root, errors=[],
                                    missing_images_ok=True)


def plan_eval(cfg: EvalConfig) -> EvalPlan:
    """What ``cfg`` asks of its run: the selections it names plus ``full`` controls and
    schedules, after checking that select and the question file still match the capture."""
    from ..benchmark import complete_groups, questions_fingerprint
    from ..provenance import file_sha256, select_fingerprint
    from ..select import sample_layouts

    run, sel_path = _checked_select(cfg)
    select_id = select_fingerprint(run.root)
    data_file, questions = _run_questions(run)
    selections = configurations(pl.read_parquet(sel_path), cfg,
                                lambda ids, available: complete_groups(ids, questions, available))
    selections = with_schedule(with_full_control(selections, sample_layouts(run.samples)), cfg.then)
    selections = with_positions(selections, cfg.positions)
    benchmark = run.config.get("benchmark")
    now = file_sha256(data_file) if benchmark is None else questions_fingerprint(questions)
    if now != run.config.get("data_sha256"):
        raise ValueError(f"{data_file} changed since the capture of {cfg.run} (sha256 differs)")
    return EvalPlan(cfg, run, questions, selections, select_id, data_file)
