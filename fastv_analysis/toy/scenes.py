"""Deterministic synthetic scenes and VQA questions for the toy LLaVA.

A scene is a 336 x 336 canvas divided into the 24 x 24 grid of 14-pixel cells that a
CLIP ViT-L/14-336-style vision tower sees as its 576 patches. Every object fills exactly
one cell, so each object is one image token: its colour and its shape (a small circle,
square, triangle or cross drawn inside the cell) are both local to that patch. The two
middle rows and columns stay empty so that left/right and top/bottom are unambiguous.

Question categories (all answers are one word):

* ``color``    "What color is the <shape>?"            (the shape occurs once in the scene)
* ``shape``    "What shape is the <color> object?"     (the colour occurs once)
* ``count``    "How many <color> objects are there?"   (zero .. five)
* ``exist``    "Is there a <color> <shape>?"           (yes / no; a "no" usually has both
  the colour and the shape present on other objects)
* ``position`` "Is the <color> <shape> on the left or right?" / "... at the top or bottom?"

Everything is a pure function of an integer seed: :func:`make_sample` and
:func:`eval_split` give identical images and questions on every machine. The shipped
evaluation split uses seeds ``EVAL_SEED_BASE + i``; the training script draws from
``TRAIN_SEED_BASE + i`` and additionally drops any scene whose object layout equals an
evaluation scene (:func:`scene_key`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 336
CELL = 14
GRID = IMAGE_SIZE // CELL  # 24
BACKGROUND = (128, 128, 128)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 190),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "cross")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
CATEGORIES = ("color", "shape", "count", "exist", "position")
MAX_PER_COLOR = 5
MIN_OBJECTS, MAX_OBJECTS = 2, 5
OBJECT_SIZE = 3  # each object is a 3 x 3 block of identical cells (9 image tokens)
_FREE = [i for i in range(GRID) if i not in (GRID // 2 - 1, GRID // 2)]  # skip middle rows/cols

EVAL_SEED_BASE = 1_000_000_000
TRAIN_SEED_BASE = 0

# Words the tokenizer must know, beyond the answers.
QUESTION_WORDS = (
    "user assistant what color shape is the object how many objects are there "
    "a on left or right at top bottom yes no"
).split()
PUNCT = ("?", ":", ".", ",")


def vocabulary() -> list[str]:
    """All words of prompts, questions and answers (lower case), in a fixed order."""
    words: list[str] = []
    for w in (*QUESTION_WORDS, *PUNCT, *COLORS, *SHAPES, *(s + "s" for s in SHAPES), *NUMBERS):
        if w not in words:
            words.append(w)
    return words


@dataclass(frozen=True)
class Obj:
    """One object: the cell (row, col) of its top-left corner; ``size`` > 1 only in the
    training curriculum, where the object is a size x size block of identical cells."""

    row: int
    col: int
    color: str
    shape: str
    size: int = 1


@dataclass(frozen=True)
class QA:
    text: str
    answer: str
    category: str


def scene_key(objects: list[Obj] | tuple[Obj, ...]) -> tuple:
    """Canonical identity of a scene (two scenes with equal keys render identically)."""
    return tuple(sorted((o.row, o.col, o.color, o.shape, o.size) for o in objects))


def _place_blocks(rng: random.Random, n: int, size: int) -> list[tuple[int, int]]:
    """Top-left cells of up to n non-touching size x size blocks, each inside one quadrant."""
    half = GRID // 2 - 1  # 11 usable cells per quadrant side
    size = min(size, half)
    taken: list[tuple[int, int]] = []
    for _ in range(n):
        for _try in range(100):
            r = rng.randrange(half - size + 1) + rng.choice((0, GRID // 2 + 1))
            c = rng.randrange(half - size + 1) + rng.choice((0, GRID // 2 + 1))
            if all(abs(r - r2) > size or abs(c - c2) > size for r2, c2 in taken):
                taken.append((r, c))
                break
    return taken


def make_scene(rng: random.Random, n_objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS), size: int = OBJECT_SIZE) -> list[Obj]:
    """Random scene with at least one unique shape and one unique colour.

    ``size`` > 1 (training curriculum only) draws each object as a size x size block.
    """
    while True:
        n = rng.randint(*n_objects)
        if size == 1:
            cells = rng.sample([(r, c) for r in _FREE for c in _FREE], n)
        else:
            cells = _place_blocks(rng, n, size)
        # Skewed per-scene frequencies make unique colours/shapes and varied counts common.
        cw = [rng.random() ** 2 + 0.02 for _ in COLORS]
        sw = [rng.random() ** 2 + 0.02 for _ in SHAPES]
        objs = [
            Obj(r, c, rng.choices(list(COLORS), cw)[0], rng.choices(SHAPES, sw)[0], size) for r, c in cells
        ]
        ccount = {k: sum(o.color == k for o in objs) for k in COLORS}
        scount = {k: sum(o.shape == k for o in objs) for k in SHAPES}
        if max(ccount.values()) > MAX_PER_COLOR:
            continue
        if 1 in ccount.values() and 1 in scount.values():
            return objs


def render(objects: list[Obj] | tuple[Obj, ...]) -> Image.Image:
    """Draw a scene as a 336 x 336 RGB image."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    d = ImageDraw.Draw(img)
    for o in objects:
        for dr in range(o.size):
            for dc in range(o.size):
                _draw_cell(d, o.col + dc, o.row + dr, o.shape, COLORS[o.color])
    return img


def _draw_cell(d: ImageDraw.ImageDraw, col: int, row: int, shape: str, fill) -> None:
    """Draw one shape inside the 14 x 14 cell (row, col)."""
    x, y = col * CELL, row * CELL
    if shape == "circle":
        d.ellipse([x + 1, y + 1, x + 12, y + 12], fill=fill)
    elif shape == "square":
        d.rectangle([x + 2, y + 2, x + 11, y + 11], fill=fill)
    elif shape == "triangle":
        d.polygon([(x + 7, y + 1), (x + 13, y + 12), (x + 1, y + 12)], fill=fill)
    elif shape == "cross":
        d.rectangle([x + 5, y + 1, x + 8, y + 12], fill=fill)
        d.rectangle([x + 1, y + 5, x + 12, y + 8], fill=fill)
    else:  # pragma: no cover
        raise ValueError(shape)


def questions_for(objects: list[Obj], rng: random.Random, category: str) -> QA | None:
    """One question of ``category`` about the scene, or None if the scene allows none."""
    colors = [o.color for o in objects]
    shapes = [o.shape for o in objects]
    combos = [(o.color, o.shape) for o in objects]
    if category == "color":
        uniq = [s for s in SHAPES if shapes.count(s) == 1]
        if not uniq:
            return None
        s = rng.choice(uniq)
        return QA(f"What color is the {s}?", colors[shapes.index(s)], category)
    if category == "shape":
        uniq = [c for c in COLORS if colors.count(c) == 1]
        if not uniq:
            return None
        c = rng.choice(uniq)
        return QA(f"What shape is the {c} object?", shapes[colors.index(c)], category)
    if category == "count":
        # Balance the answers: pick the target count first, then a colour having it.
        by_n: dict[int, list[str]] = {}
        for c in COLORS:
            by_n.setdefault(colors.count(c), []).append(c)
        n = rng.choice(sorted(by_n))
        c = rng.choice(by_n[n])
        return QA(f"How many {c} objects are there?", NUMBERS[n], category)
    if category == "exist":
        if rng.random() < 0.5:
            c, s = rng.choice(combos)
            return QA(f"Is there a {c} {s}?", "yes", category)
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in combos]
        hard = [(c, s) for c, s in absent if c in colors and s in shapes]
        c, s = rng.choice(hard or absent)
        return QA(f"Is there a {c} {s}?", "no", category)
    if category == "position":
        uniq = [o for o in objects if combos.count((o.color, o.shape)) == 1]
        if not uniq:
            return None
        o = rng.choice(uniq)
        if rng.random() < 0.5:
            ans = "left" if o.col < GRID // 2 else "right"
            return QA(f"Is the {o.color} {o.shape} on the left or right?", ans, category)
        ans = "top" if o.row < GRID // 2 else "bottom"
        return QA(f"Is the {o.color} {o.shape} at the top or bottom?", ans, category)
    raise ValueError(f"unknown category {category!r}")


def make_sample(seed: int, categories: tuple[str, ...] = CATEGORIES, n_questions: int = 1,
                n_objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS), size: int = OBJECT_SIZE):
    """(objects, [QA, ...]) for one seed: a scene plus up to n_questions of distinct categories."""
    rng = random.Random(seed)
    objs = make_scene(rng, n_objects, size)
    cats = list(categories)
    rng.shuffle(cats)
    qas: list[QA] = []
    for cat in cats:
        qa = questions_for(objs, rng, cat)
        if qa is not None:
            qas.append(qa)
        if len(qas) == n_questions:
            break
    return objs, qas


def eval_split(n_images: int = 240, questions_per_image: int = 2):
    """The shipped evaluation split as a list of (image_index, objects, [QA, ...])."""
    out = []
    for i in range(n_images):
        objs, qas = make_sample(EVAL_SEED_BASE + i, n_questions=questions_per_image)
        out.append((i, objs, qas))
    return out


def train_sample(i: int, exclude: set | frozenset = frozenset(), categories=CATEGORIES,
                 n_objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS), size: int = OBJECT_SIZE):
    """Training sample i (seed space disjoint from the eval split); skips excluded scene keys."""
    k = 0
    while True:
        objs, qas = make_sample(TRAIN_SEED_BASE + i + k * 7_919_000, categories=categories, n_objects=n_objects,
                                size=size)
        if scene_key(objs) not in exclude:
            return objs, qas[0]
        k += 1


def write_eval_split(out_dir: str | Path, n_images: int = 240, questions_per_image: int = 2) -> Path:
    """Write ``questions.jsonl`` and ``images/*.png`` (the shipped toy-vqa split); returns the jsonl path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, objs, qas in eval_split(n_images, questions_per_image):
        name = f"images/scene_{i:04d}.png"
        render(objs).save(out_dir / name, optimize=True)
        for j, qa in enumerate(qas):
            lines.append(
                {
                    "question_id": f"toy-{i:04d}-{j}",
                    "image": name,
                    "text": qa.text,
                    "answer": qa.answer,
                    "category": qa.category,
                }
            )
    path = out_dir / "questions.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path
