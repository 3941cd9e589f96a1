"""Which configurations a section shows: plain cuts, one per method (weighted_combination at its
alpha nearest 0.5), the smallest keep.
"""

from __future__ import annotations

import polars as pl

from ..strategies import METHODS as METHOD_ORDER


def primary_alpha(accuracy: pl.DataFrame) -> float | None:
    alphas = accuracy.filter(pl.col("method") == "weighted_combination")["alpha"].unique().drop_nulls().to_list()
    if not alphas:
        return None
    return min(alphas, key=lambda a: abs(a - 0.5))


PLAIN = (~pl.col("config").str.contains("@", literal=True) & ~pl.col("config").str.contains(" then ", literal=True)
         & ~pl.col("config").str.contains(" ratio ", literal=True))

"""Configurations on the last token's rows with one cut of a --keep count: the query variants
(``@text_mean``) and schedules (``... then ...``) share their method name and have sections of
their own; a --keep-ratio's (``... ratio 0.25``) has no single count to sit on a keep axis (its
rows are in the tables, keep null, and in the overlap heatmap)."""


def primary_only(alpha: float | None) -> pl.Expr:
    """Rows of every method but weighted_combination, and weighted_combination at ``alpha``
    (none when None); plain configurations only (:data:`PLAIN`)."""
    wc = pl.col("alpha") == alpha if alpha is not None else pl.lit(False)
    return ((pl.col("method") != "weighted_combination") | wc) & PLAIN


def shown_configs(frame: pl.DataFrame) -> list[str]:
    """One configuration per method in METHOD_ORDER (weighted_combination at its alpha nearest 0.5)."""
    alpha = primary_alpha(frame)
    present = frame.filter(primary_only(alpha))
    configs = present["config"].unique().sort().to_list()
    return [c for m in METHOD_ORDER for c in configs if c.split("(")[0] == m]


def one_config_per_method(selections: pl.DataFrame, keep: int | None = None, agg_layer: int | None = None):
    """The selections of one layer and keep (default: the smallest keep > 0), one configuration
    per method (weighted_combination at its alpha nearest 0.5), at ``agg_layer`` (default: the
    first K > 0, where the attention ranks; K = 0 replays only the controls); returns (rows,
    layer, keep, configs)."""
    ranked = selections.filter(pl.col("agg_layer") > 0)["agg_layer"]
    layer = agg_layer if agg_layer is not None else (ranked.min() if ranked.len() else selections["agg_layer"].min())
    sel = selections.filter(pl.col("agg_layer") == layer)
    keeps = sorted(sel["keep"].unique().to_list())
    keep = keep if keep is not None else next((k for k in keeps if k > 0), keeps[0])
    sel = sel.filter(pl.col("keep") == keep)
    alpha = primary_alpha(sel)
    sel = sel.filter(primary_only(alpha))
    configs = [c for m in METHOD_ORDER for c in sel["config"].unique().sort().to_list() if c.split("(")[0] == m]
    return sel, layer, keep, configs


def smallest_keep(frame: pl.DataFrame) -> int | None:
    keeps = [k for k in frame["keep"].unique().to_list() if k > 0]
    return min(keeps) if keeps else None


def strategy_configs(frame: pl.DataFrame) -> list[str]:
    """Every strategy's configuration on the last token's rows (no ``@query`` variants),
    weighted_combination at its alpha nearest 0.5; the original five methods first."""
    from ..strategies import ALL_METHODS

    alpha = primary_alpha(frame)
    configs = frame.filter(primary_only(alpha))["config"].unique().sort().to_list()
    configs = [c for c in configs if "@" not in c and c != "full"]
    order = list(METHOD_ORDER) + [m for m in ALL_METHODS if m not in METHOD_ORDER]
    rank = {m: i for i, m in enumerate(order)}
    return sorted(configs, key=lambda c: (rank.get(c.split("(")[0], len(order)), c))
