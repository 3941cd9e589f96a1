"""lmms-eval plug-in, the part that needs no lmms-eval: ``--model_args`` parsing, the prompts
lmms-eval sends turned into our question file, and the files the plug-in writes.

``pip install -e ".[lmms]"`` registers ``--model fastv`` through the entry-point group
``lmms_eval.models`` (lmms-eval 0.7.3, ``lmms_eval/models/registry_v2.py``): the entry point is
:func:`manifests`; the model class is :class:`fastv_analysis.lmms_model.FastV`, the only module
that imports lmms-eval. A run::

    lmms-eval --model fastv --model_args pretrained=PATH,agg_layer=2,keep=64,method=avg_all_heads \\
        --tasks pope --batch_size 1

Model args (comma list; lmms-eval parses numbers itself): ``pretrained`` (a checkpoint of a
supported family), ``agg_layer``, ``keep``, ``method`` (any registered strategy), ``alpha``,
``seed``, ``mode`` (drop | mask), ``newline``, ``query`` (the strategy's query variant),
``stages`` (later cuts ``K:KEEP[:METHOD]`` joined by ``+``, e.g. ``8:32+16:16:max_head``),
``positions`` (original | compact: the positions policy from the cut on; default the method's
registered policy, as ``fastv-analyze eval``, original in mask mode),
``dtype``, ``prompt_template``, ``answer_field`` (the doc field
holding the reference, default ``answer``), ``id_field`` (the doc field with the question id,
default ``question_id``), ``capture_dir`` (also write our capture of the prompts lmms-eval sent:
``fastv-analyze select / eval / report`` then run on it), ``answers_dir`` (per-sample
predictions: LLaVA answers file, predictions.parquet with the kept indices, the question file).
``use_fast_v=false`` (or ``keep`` = every image token) answers with nothing pruned.
Multiple-choice (``loglikelihood``) tasks score each option by the pruned model, the context
ranked by its last token (:meth:`fastv_analysis.lmms_model.FastV.loglikelihood_scores`). lmms-eval's own
``--batch_size N`` (requests answered together, mixed image sizes allowed) and ``--device`` reach
the model as ``batch_size`` / ``device``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

PLUGIN_MODEL = "fastv"
PROMPTS_DIR = "lmms-prompts"  # inside capture_dir / answers_dir: the question file and images
ANSWERS_DIR = "answers"  # one LLaVA answers file per task: answers/<task>.jsonl
PREDICTIONS_FILE = "predictions.parquet"


def manifests():
    """The ``lmms_eval.models`` entry point: lmms-eval's ModelManifest of ``--model fastv``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=PLUGIN_MODEL, simple_class_path="fastv_analysis.lmms_model.FastV")]


@dataclass
class PluginOptions:
    """``--model_args`` of ``--model fastv`` (see the module docstring)."""

    pretrained: str
    agg_layer: int = 2
    keep: int = 64
    method: str = "avg_all_heads"
    alpha: float = 0.5
    seed: int = 0
    mode: str = "drop"
    newline: str = "prune"
    query: str | None = None
    stages: str | None = None
    positions: str | None = None
    use_fast_v: bool = True
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 1
    prompt_template: str | None = None
    answer_field: str = "answer"
    id_field: str = "question_id"
    capture_dir: str | None = None
    answers_dir: str | None = None
    extra: dict = field(default_factory=dict)

    def fastv_config(self):
        """The :class:`~fastv_analysis.pruning.FastVConfig` these options ask for (validated)."""
        from .pruning import FastVConfig, Stage

        stages = []
        for part in (self.stages or "").split("+"):
            if not part.strip():
                continue
            bits = part.strip().split(":")
            try:
                stages.append(Stage(int(bits[0]), int(bits[1]), *(bits[2:3] or ["avg_all_heads"])))
            except (ValueError, IndexError):
                raise ValueError(f"--model_args stages={self.stages}: expected K:KEEP[:METHOD] joined by '+', "
                                 f"got {part!r}") from None
        try:
            return FastVConfig(agg_layer=self.agg_layer, keep=self.keep, method=self.method, alpha=float(self.alpha),
                               seed=self.seed, mode=self.mode, newline=self.newline, use_fast_v=self.use_fast_v,
                               params={"query": self.query} if self.query else {}, stages=tuple(stages),
                               positions=self._positions())
        except ValueError as err:
            raise ValueError(f"--model_args: {err}") from None

    def _positions(self) -> str:
        """The positions policy asked for, else the method's registered one (original in mask mode)."""
        if self.positions is not None:
            return self.positions
        from . import strategies

        return strategies.strategy(self.method).positions if self.mode == "drop" else "original"


_BOOL = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def parse_options(args: dict) -> PluginOptions:
    """``PluginOptions`` from lmms-eval's parsed ``--model_args`` (and its added ``batch_size``,
    ``device``); unknown keys and wrong types are refused in one line naming the key."""
    known = {f.name: f for f in fields(PluginOptions) if f.name != "extra"}
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ValueError(f"--model_args: unknown key(s) {', '.join(unknown)} for --model {PLUGIN_MODEL}; "
                         f"expected {', '.join(known)}")
    if args.get("pretrained") in (None, ""):
        raise ValueError(f"--model_args: pretrained=PATH is required for --model {PLUGIN_MODEL}")
    values = {}
    for key, value in args.items():
        if value is None:
            continue
        kind = known[key].type
        try:
            if kind in ("int", int):
                values[key] = int(value)
            elif kind in ("float", float):
                values[key] = float(value)
            elif kind in ("bool", bool):
                values[key] = value if isinstance(value, bool) else _BOOL[str(value).lower()]
            else:
                values[key] = str(value)
        except (ValueError, KeyError):
            raise ValueError(f"--model_args {key}={value!r}: expected {kind}") from None
    return PluginOptions(**values)


def answer_text(doc: dict, answer_field: str) -> str:
    """The doc's reference as our question file stores it: an option index as its letter."""
    value = doc.get(answer_field) if isinstance(doc, dict) else None
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        return chr(ord("A") + value)
    return str(value)


def question_id(doc: dict, id_field: str, task: str, doc_id: int) -> str:
    """The doc's own question id (so benchmark scorers find it), else ``task/doc_id``."""
    value = doc.get(id_field) if isinstance(doc, dict) else None
    return f"{task}/{doc_id}" if value is None else str(value)


def sample_ids(keys: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """Sample id of every (task, doc_id) of the whole launch: its place in sorted order, so each
    rank numbers its requests as one process would, and as the written question file lines."""
    return {key: i for i, key in enumerate(sorted(set(keys)))}


def image_name(task: str, doc_id: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task)
    return f"images/{safe}-{doc_id}.png"


def write_questions(folder: Path, records: list[dict]) -> Path:
    """The question file of the prompts lmms-eval sent, one line per sample in sample-id order
    (images were saved next to it by each rank)."""
    from .store import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({k: r[k] for k in ("question_id", "image", "text", "answer", "category")})
             for r in sorted(records, key=lambda r: r["sample_id"])]
    path = folder / "questions.jsonl"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def write_answers(folder: Path, records: list[dict], model_id: str, config: dict) -> None:
    """answers/<task>.jsonl (LLaVA's answers file: ``fastv-analyze score --answers``), predictions.parquet
    (one row per sample: its ids, the configuration with its positions policy, the prediction and
    the kept image-token indices) and the question file."""
    import hashlib

    import polars as pl

    from .store import atomic_write_bytes, atomic_write_parquet

    records = sorted(records, key=lambda r: r["sample_id"])
    write_questions(folder / PROMPTS_DIR, records)
    for task in dict.fromkeys(r["task"] for r in records):
        lines = [json.dumps({"question_id": r["question_id"], "prompt": r["text"], "text": r["prediction"],
                             "answer_id": hashlib.blake2b(f"{task}/{r['doc_id']}".encode(), digest_size=8).hexdigest(),
                             "model_id": model_id, "metadata": {**config, "task": task, "doc_id": r["doc_id"]}})
                 for r in records if r["task"] == task]
        (folder / ANSWERS_DIR).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / ANSWERS_DIR / f"{task}.jsonl", ("\n".join(lines) + "\n").encode())
    columns = ("sample_id", "question_id", "task", "doc_id", "prediction", "n_image_tokens", "kept")
    frame = pl.DataFrame({c: [r[c] for r in records] for c in columns},
                         schema={"sample_id": pl.Int64, "question_id": pl.Utf8, "task": pl.Utf8, "doc_id": pl.Int64,
                                 "prediction": pl.Utf8, "n_image_tokens": pl.Int64, "kept": pl.List(pl.Int64)})
    frame = frame.with_columns(pl.lit(config["agg_layer"]).alias("agg_layer"), pl.lit(config["keep"]).alias("keep"),
                               pl.lit(config["method"]).alias("method"), pl.lit(config["alpha"]).alias("alpha"),
                               pl.lit(config.get("positions", "original")).alias("positions"),
                               pl.col("kept").list.len().alias("n_kept"))
    atomic_write_parquet(frame, folder / PREDICTIONS_FILE)


def truncate(text: str, until: list[str]) -> str:
    """lmms-eval's stop sequences: the text before the first one."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
