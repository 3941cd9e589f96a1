"""Standard benchmarks as researchers have them on disk, scored the official way.

One module per benchmark (lmms-eval style), each a reader for LLaVA's evaluation layout
(``docs/Evaluation.md``) plus the benchmark's own metric, as pure functions::

    task = get_task("pope")                       # or get_task(detect(path))
    questions = task.read(path, image_root=None, limit=None)      # list[data.Question]
    answers = read_answers("answers.jsonl", questions)           # {question_id: model text}
    result = task.score(questions, answers)                       # TaskScore
    result.headline, result.metrics, result.per_question, result.long

``Question.question_id`` is the benchmark's own id (MME: ``<llava id>#<line>``), ``text`` the
LLaVA-1.5 prompt text (no ``<image>``), ``answer`` the reference, ``category`` the
split / subtask / category, ``choices`` the options (ScienceQA, MMBench), ``meta`` what
scoring needs (e.g. the ten human answers).
"""

from __future__ import annotations

from pathlib import Path

from . import gqa, mmbench, mme, pope, scienceqa, textvqa, vqav2
from .base import Task, TaskScore, answer_record, read_answers

TASKS: dict[str, Task] = {m.TASK.name: m.TASK for m in (scienceqa, pope, mme, gqa, textvqa, vqav2, mmbench)}

__all__ = ["TASKS", "Task", "TaskScore", "answer_record", "detect", "get_task", "read_answers"]


def get_task(name: str) -> Task:
    """The registered task ``name``; a one-line ValueError listing the supported names otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown benchmark {name!r}; supported: {', '.join(TASKS)}")
    return TASKS[name]


def detect(path: str | Path) -> str | None:
    """The benchmark whose layout ``path`` (its folder or main file) unambiguously has, else None."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".tsv" and path.name.startswith("mmbench"):
            return "mmbench"
        names = {path.name}
    elif path.is_dir():
        names = {p.name for p in path.iterdir()}
        if any(n.startswith("mmbench") and n.endswith(".tsv") for n in names):
            names.add("mmbench_dev_20230712.tsv")
    else:
        return None
    found = [task.name for task in TASKS.values() if names & set(task.markers)]
    return found[0] if len(found) == 1 else None
