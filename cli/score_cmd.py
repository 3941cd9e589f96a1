"""``fastv-analyze score``: a benchmark's official metrics for a LLaVA answers file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from fastv_analysis.tasks import TASKS
from fastv_analysis.tasks.lmms_eval_rules import RULES, with_rules


@click.command("score")
@click.option("--benchmark", type=click.Choice(list(TASKS)), default=None,
              help="Benchmark name; default: recognised from the --data layout.")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="The benchmark folder (LLaVA's playground/data/eval/<name> layout) or its question file.")
@click.option("--answers", required=True, type=click.Path(path_type=Path),
              help="Answers, one JSON object a line with question_id and text (LLaVA's answers file).")
@click.option("--allow-missing", is_flag=True,
              help="Score only the answered questions instead of refusing when some have no answer.")
@click.option("--rules", type=click.Choice(list(RULES)), default="official", show_default=True,
              help="Scoring rules: the official scripts', or lmms-eval's task utils (v0.7.2), which many "
                   "papers quote; README says what changes per benchmark.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the metrics as JSON here.")
def score_cmd(benchmark, data, answers, allow_missing, rules, out):
    """Score ANSWERS on a standard benchmark the official way (or lmms-eval's, with --rules lmms-eval)
    and print its metrics, headline first.

    Benchmarks: scienceqa_img, pope, mme, gqa, textvqa, vqav2, mmbench. Metrics are
    percentages (MME: points). Images are not needed for scoring.
    """
    from fastv_analysis.store import atomic_write_bytes
    from fastv_analysis.tasks import detect, get_task, read_answers

    if benchmark is None:
        if not data.exists():
            raise FileNotFoundError(f"benchmark data {data} does not exist")
        benchmark = detect(data)
        if benchmark is None:
            raise ValueError(f"cannot tell the benchmark from {data}; pass --benchmark ({', '.join(TASKS)})")
    task = with_rules(get_task(benchmark), rules)
    questions = task.read(data, check_images=False)
    given = read_answers(answers, questions)
    result = task.score(questions, given, missing="skip" if allow_missing else "error",
                        skip_hint="--allow-missing scores the answered ones")
    name, value = result.headline
    click.echo(f"{task.name}: {name} = {value:.2f}  ({result.per_question.height} questions; {task.title})")
    for key, v in result.metrics.items():
        if key != name:
            metric = key.rsplit("/", 1)[-1]
            count = metric in ("n", "tp", "fp", "tn", "fn") or metric.startswith("n_")
            click.echo(f"  {key:<44} {'nan' if math.isnan(v) else f'{v:.0f}' if count else f'{v:.2f}'}")
    note = task.order_note(questions, list(given)) if task.order_note else None
    if note:
        click.echo(note)
    if out is not None:
        payload = result.to_json() | {"rules": rules, "data": str(data), "answers": str(answers)}
        atomic_write_bytes(out, (json.dumps(payload, indent=2) + "\n").encode())  # temp name + rename; headline first
        click.echo(f"-> {out}")
