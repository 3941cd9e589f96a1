"""Small fixtures shared by the tests and the benchmarks: random checkpoints and question files.

Nothing here is downloaded: checkpoints are random-weight LLaVAs built from the toy's
config, images are random pixels, questions use the toy vocabulary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

QUESTIONS = [
    "what color is the circle ?",
    "how many objects are there ?",
    "is there a red square ?",
    "what shape is the blue object ?",
    "where is the green cross ?",
]

TOY_DIR = Path(__file__).resolve().parent.parent / "data" / "toy-llava"


def write_random_questions(folder: Path, n: int = 5, seed: int = 0,
                           broken: Callable[[list[str], Path], list[str]] | None = None) -> Path:
    """A question file of ``n`` samples with random-pixel 336 x 336 PNGs (answer "red").

    ``broken(lines, folder)`` may tweak the JSON lines (and files) to make bad input.
    """
    import torch
    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        pixels = (torch.rand(336, 336, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / "images" / f"{i}.png")
        lines.append(json.dumps({"question_id": f"q{i}", "image": f"images/{i}.png", "text": QUESTIONS[i % 5],
                                 "answer": "red", "category": "color"}))
    if broken:
        lines = broken(lines, folder)
    (folder / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "questions.jsonl"


def toy_or_random_checkpoint(tmp: Path, seed: int = 0) -> tuple[str, str]:
    """(path, description): the shipped toy model, else a random-weight LLaVA of its shape."""
    if (TOY_DIR / "config.json").exists():
        return str(TOY_DIR), str(TOY_DIR)
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers import logging as hf_logging

    from .toy.checkpoint import build_config, save_checkpoint

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config()).eval()
    hf_logging.disable_progress_bar()
    try:
        out = save_checkpoint(model, Path(tmp) / "random-toy-llava")
    finally:
        hf_logging.enable_progress_bar()
    return str(out), "random-weight LLaVA of the toy's shape (8 x 128 decoder, 576 image tokens; data/toy-llava absent)"


def timed(fn: Callable[[], object], device) -> float:
    """Wall seconds of ``fn()``, synchronising CUDA before and after."""
    from .loading import sync_device

    sync_device(device)
    start = time.perf_counter()
    fn()
    sync_device(device)
    return time.perf_counter() - start
