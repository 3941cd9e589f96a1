"""What one family module declares, and the registry that collects them.

A family module (``llava``, ``qwen2_vl``, ``internvl``, ...) ends with ``FAMILIES``: one
:class:`Family` per HF class it serves. Loading, the report's geometry and the contract
tests read everything family-specific from here, so adding a family is one module plus
its name in ``adapters.MODULES`` (README, "Adding a family").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from torch import nn

@dataclass(frozen=True)
class Contract:
    """The facts the adapter contract (``tests/test_adapters.py``) checks a family against.

    sizes:          two image sizes ``(width, height)`` that give different numbers of image
                    tokens; None where every image gives the same number (then two 336 px images).
    uniform_keep_2: the uniform control's kept indices at keep 2 for those two images,
                    hand-computed on each image's own grid (:func:`fastv_analysis.layout.lattice_cells`).
    mixed_grids:    ``(rows, cols)`` of the grid of each image of the CLI run's five sizes
                    (56x56, 120x80, 80x120, 56x56, 200x90), where the family's processor fixes it
                    simply (None: checked only structurally).
    """

    sizes: tuple[tuple[int, int], tuple[int, int]] | None
    uniform_keep_2: tuple[tuple[int, ...], tuple[int, ...]]
    mixed_grids: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class Family:
    """One supported HF class.

    name:        the HF class name (``config.architectures``), e.g. ``LlavaForConditionalGeneration``.
    build:       ``build(model) -> Adapter``.
    tiny:        ``tiny(out_dir, seed=0) -> Path``: a tiny random checkpoint of the real class.
    contract:    :class:`Contract`.
    grid_extent: what part of the original image a sample's spatial grid spans: ``crop``, the
                 processor's center crop (LLaVA-1.5's CLIP processor; :mod:`fastv_analysis.grid`
                 places it), or ``image``, the whole image (anyres' unpadded grid, Qwen's
                 smart_resize, InternVL's thumbnail or single tile).
    base_tile:   the off-grid tokens before the grid are one square tile of the whole image (anyres:
                 True); ``"last"``: after the grid (InternVL's thumbnail).
    note:        what is special for pruning in this class (README's table).
    prompt_template: the prompt (with ``<image>`` and ``{question}``) for a checkpoint of this
                 class whose processor has no chat template (PaliGemma); None: LLaVA-1.5's.
    processor:   ``processor(name)`` loads checkpoint ``name``'s processor where transformers' own
                 class cannot be loaded without torchvision (None: the image-only one,
                 :func:`fastv_analysis.loading.image_only_processor`).
    """

    name: str
    build: Callable[[nn.Module], object]
    tiny: Callable[..., Path]
    contract: Contract
    grid_extent: str = "image"
    base_tile: bool | str = False
    note: str = ""
    prompt_template: str | None = None
    processor: Callable[[str], object] | None = None


def lazy(module: str, function: str) -> Callable:
    """``module.function``, imported when first called (tiny recipes import transformers' classes)."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), function)(*args, **kwargs)

    call.__name__ = call.__qualname__ = function
    return call


@cache
def registry() -> dict[str, Family]:
    """HF class name -> :class:`Family`, over ``adapters.MODULES`` in order."""
    from . import MODULES

    out: dict[str, Family] = {}
    for name in MODULES:
        for family in importlib.import_module(f"{__package__}.{name}").FAMILIES:
            if family.name in out:
                raise RuntimeError(f"adapters/{name}.py declares {family.name}, already declared by another module")
            out[family.name] = family
    return out
