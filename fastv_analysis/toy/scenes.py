"""Deterministic synthetic scenes and VQA questions for the toy LLaVA.

A scene is a 336 x 336 canvas divided into the 24 x 24 grid of 14-pixel cells that a
CLIP ViT-L/14-336-style vision tower sees as its 576 patches. It holds one to four
identical objects (one colour, one shape), each a 5 x 5 block of cells (25 image tokens),
all on the same side of the two empty middle columns. Every cell of an object is filled
with the object's colour and carries its shape as a darker glyph, so colour and shape
add up inside each patch (a glyph drawn *in* the colour would multiply them) and every
object token carries the object's colour by itself.

Question categories (all answers are one word):

* ``color``  "What color is the object?" / "What color are the objects?"
* ``count``  "How many objects are there?"            (one .. four)
* ``exist``  "Is there a <color> object?"             (yes / no, balanced)

Why these three: every earlier toy asked about *one* object among several (colour of the
<shape>, shape of the <colour> object, left/right of an object), and none of those got
far from its answer prior in up to 90 CPU minutes of training (README's toy section lists the
runs). Questions about the whole group are learned in minutes, and ``count`` keeps the
answer spread over every object token, so pruning image tokens costs accuracy.

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
BACKGROUND = (0, 0, 0)

# Fill colours; the shape glyph is the fill minus GLYPH_SHADE (never clipped).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (200, 70, 70),
    "green": (70, 180, 80),
    "blue": (70, 90, 210),
    "yellow": (200, 190, 70),
    "purple": (160, 80, 190),
    "white": (200, 200, 200),
}
GLYPH_SHADE = 65
SHAPES = ("circle", "square", "triangle", "cross")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
CATEGORIES = ("color", "count", "exist")
MIN_OBJECTS, MAX_OBJECTS = 1, 4
OBJECT_SIZE = 5  # each object is a 5 x 5 block of identical cells (25 image tokens)
HALF = GRID // 2 - 1  # 11 usable columns each side of the empty middle columns 11 and 12

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
    """One object: the cell (row, col) of its top-left corner; a size x size block of cells."""

    row: int
    col: int
    color: str
    shape: str
    size: int = OBJECT_SIZE


@dataclass(frozen=True)
class QA:
    text: str
    answer: str
    category: str


def scene_key(objects: list[Obj] | tuple[Obj, ...]) -> tuple:
    """Canonical identity of a scene (two scenes with equal keys render identically)."""
    return tuple(sorted((o.row, o.col, o.color, o.shape, o.size) for o in objects))


def _place_blocks(rng: random.Random, n: int, size: int, side: int) -> list[tuple[int, int]]:
    """Top-left cells of n non-touching size x size blocks inside one half (0 left, 1 right)."""
    while True:  # restart when an unlucky early placement leaves no room
        taken: list[tuple[int, int]] = []
        for _try in range(200):
            r = rng.randrange(GRID - size + 1)
            c = rng.randrange(HALF - size + 1) + side * (GRID - HALF)
            if all(abs(r - r2) > size or abs(c - c2) > size for r2, c2 in taken):
                taken.append((r, c))
                if len(taken) == n:
                    return taken


def make_scene(rng: random.Random) -> list[Obj]:
    """Random scene: n identical objects (one colour, one shape) on one side of the canvas."""
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    color, shape, side = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.randrange(2)
    return [Obj(r, c, color, shape) for r, c in _place_blocks(rng, n, OBJECT_SIZE, side)]


def render(objects: list[Obj] | tuple[Obj, ...]) -> Image.Image:
    """Draw a scene as a 336 x 336 RGB image."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    d = ImageDraw.Draw(img)
    for o in objects:
        fill = COLORS[o.color]
        glyph = tuple(v - GLYPH_SHADE for v in fill)
        d.rectangle([o.col * CELL, o.row * CELL, (o.col + o.size) * CELL - 1, (o.row + o.size) * CELL - 1], fill=fill)
        for dr in range(o.size):
            for dc in range(o.size):
                _draw_cell(d, o.col + dc, o.row + dr, o.shape, glyph)
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


def questions_for(objects: list[Obj], rng: random.Random, category: str) -> QA:
    """One question of ``category`` about the scene (every category fits every scene)."""
    n = len(objects)
    color = objects[0].color
    if category == "color":
        text = "What color is the object?" if n == 1 else "What color are the objects?"
        return QA(text, color, category)
    if category == "count":
        return QA("How many objects are there?", NUMBERS[n], category)
    if category == "exist":
        asked = color if rng.random() < 0.5 else rng.choice([c for c in COLORS if c != color])
        return QA(f"Is there a {asked} object?", "yes" if asked == color else "no", category)
    raise ValueError(f"unknown category {category!r}")


def make_sample(seed: int, categories: tuple[str, ...] = CATEGORIES, n_questions: int = 1):
    """(objects, [QA, ...]) for one seed: a scene plus up to n_questions of distinct categories."""
    rng = random.Random(seed)
    objs = make_scene(rng)
    cats = list(categories)
    rng.shuffle(cats)
    qas = [questions_for(objs, rng, cat) for cat in cats[:n_questions]]
    return objs, qas


def eval_split(n_images: int = 240, questions_per_image: int = 2):
    """The shipped evaluation split as a list of (image_index, objects, [QA, ...])."""
    out = []
    for i in range(n_images):
        objs, qas = make_sample(EVAL_SEED_BASE + i, n_questions=questions_per_image)
        out.append((i, objs, qas))
    return out


def train_sample(i: int, exclude: set | frozenset = frozenset()):
    """Training sample i (seed space disjoint from the eval split); skips excluded scene keys."""
    k = 0
    while True:
        objs, qas = make_sample(TRAIN_SEED_BASE + i + k * 7_919_000)
        if scene_key(objs) not in exclude:
            return objs, qas[0]
        k += 1


def object_boxes(objects: list[Obj] | tuple[Obj, ...]) -> list[list[int]]:
    """Each object's box ``[x0, y0, x1, y1]`` in image pixels (x1, y1 exclusive): the
    ground truth of which image tokens lie on an object."""
    return [[o.col * CELL, o.row * CELL, (o.col + o.size) * CELL, (o.row + o.size) * CELL] for o in objects]


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
                    "objects": object_boxes(objs),
                }
            )
    path = out_dir / "questions.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path
