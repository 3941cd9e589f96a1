"""``run_eval``: the eval stage's order of steps — plan, load the run's model, answer this
process's samples into resumable parts, then (rank 0) assemble, score, tabulate and publish.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass

from ..distributed import process_group
from .answer import answer_samples
from .parts import EvalParts, _settings_key, numerics_key
from .plan import EvalConfig, EvalPlan, plan_eval
from .results import eval_info, predictions, publish, write_tables


@dataclass
class Model:
    """The loaded model of an eval with its name, fingerprint and adapter."""

    name: str
    loaded: object  # fastv_analysis.loading.Loaded
    fingerprint: str
    adapter: object  # fastv_analysis.adapters.Adapter


def load_run_model(plan: EvalPlan, state=None) -> Model:
    """The model of ``plan``'s run (``--model`` may name another copy of it), refused in one
    line when its fingerprint is not the capture's."""
    from ..adapters import get_adapter
    from ..loading import load_model
    from ..provenance import fingerprint

    cfg, config = plan.cfg, plan.run.config
    name = cfg.model or config["model"]
    loaded = load_model(name, cfg.device if state is None else str(state.device), cfg.dtype or config.get("dtype", "auto"))
    model_id = fingerprint(name, loaded.model)
    if model_id != config.get("model_fingerprint"):
        raise ValueError(f"model {name} (fingerprint {model_id}) is not the model of {cfg.run} "
                         f"(fingerprint {config.get('model_fingerprint')})")
    return Model(name, loaded, model_id, get_adapter(loaded.model))


def run_eval(cfg: EvalConfig, progress: bool = True, command: list[str] | None = None) -> dict:
    """Evaluate the select stage's configurations of ``cfg.run``; writes ``RUN/eval/``.

    Under ``accelerate launch`` / ``torchrun`` the processes split the samples (every
    world-th), each writes its own resumable parts, and rank 0 merges them into the same
    tables one process would write; batch-1 timings and the mask check run on rank 0's
    samples only.
    """
    import polars as pl

    plan = plan_eval(cfg)
    rank, world, state = process_group(cfg.device)
    model = load_run_model(plan, state)
    run = plan.run
    key = _settings_key(model.fingerprint, run.config.get("data_sha256", ""), plan.max_new_tokens, plan.selections,
                        numerics_key(model.loaded, model.adapter))
    parts = EvalParts(run.root, key, rank)
    t_start = time.perf_counter()
    answered = answer_samples(model.loaded, model.adapter, plan, parts, rank, world, progress)
    if state is not None:
        state.wait_for_everyone()
        if rank != 0:
            return {"rank": rank, "n_samples": answered.n_samples}
    answers, timing = parts.load()
    tmp = run.root / ".eval.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    config_timing = pl.DataFrame(answered.config_timing, infer_schema_length=None) if answered.config_timing else None
    pred, accuracy = write_tables(plan, predictions(plan, answers), timing, config_timing, model.adapter,
                                  model.name, tmp)
    info = eval_info(plan, model, answered, answers, timing, pred, world, t_start, command)
    out_dir = run.root / "eval"
    publish(tmp, out_dir, info)
    bad = [c["sample_id"] for c in answered.mask_checks if not c["identical"]]
    if bad:
        raise ValueError(f"mask and drop modes gave different answers on sample_ids {bad} (see {out_dir}/eval.json)")
    return {**info, "accuracy": accuracy}
