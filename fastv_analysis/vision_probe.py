"""The vision-side named inputs (VisionZip, VisPruner), read inside the vision tower.

One :class:`VisionTap` records them while the tower encodes, for capture (``--store``) and
for online pruning alike, per LLM image token (image order, then token order):

* ``vision_attention`` ``[N]``: attention at the layer whose output feeds the LLM, heads
  averaged. Towers with a CLS token (LLaVA-1.5's CLIP, feature layer -2 as the authors):
  the CLS row over the patches (a one-layer toy tower whose features are its embeddings:
  layer 0's); LLaVA-NeXT: per tile, laid out as the model packs its tiles (the
  ``image_newline`` tokens, which no patch feeds, get zeros: never dominant, cosine 0). Towers without one (Qwen2-VL / Qwen2.5-VL): the mean
  attention each patch receives (over all queries, at the last block, which is full
  attention in Qwen2.5-VL, as LightCompress), then averaged over the 2 x 2 patches the
  PatchMerger makes one LLM token.
* ``vision_keys`` ``[N, d]``: that layer's keys averaged over heads (CLIP: raw ``k_proj``
  as the authors' ``metric``; Qwen: after RoPE, as LightCompress), averaged over merged patches.
* ``vision_features`` ``[N, D]``: CLIP: the patch features of the feature layer (what the
  projector gets, VisPruner's de-duplication features); Qwen: the merger's output (the
  LLM-input embeddings, as LightCompress's VisPruner).

The tower-specific hooks live behind the adapters (:mod:`fastv_analysis.adapters.vision`);
attention rows are recomputed from the attention module's own q / k projections (the tower
keeps its SDPA kernel). Other families (LLaVA-OneVision, InternVL, SigLIP towers, ...)
raise a one-line error once a strategy needs these inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

NAMES = ("vision_attention", "vision_keys", "vision_features")


class VisionTap:
    """Hooks on the vision tower recording :data:`NAMES` per encoded image.

    ``wanted()`` says, when the tower runs, which names to record (empty: nothing is
    computed); ``images`` holds, after a forward, one dict per image of ``[n_tokens, ...]``.
    """

    def __init__(self, adapter, wanted: Callable[[], Sequence[str]]):
        self.adapter, self.wanted = adapter, wanted
        self.images: list[dict[str, torch.Tensor]] = []
        self.part: dict[str, torch.Tensor] = {}  # what the tower's hooks computed so far in this forward
        self.image_sizes = None  # the prompt's image sizes (processor output), for towers that tile (LLaVA-NeXT)
        self._convert: Callable | None = None

    def install(self) -> list:
        """The tower's hooks, by the adapter's ``vision_kind`` (:mod:`fastv_analysis.adapters.vision`)."""
        from .adapters.vision import HOOKS

        return HOOKS[self.adapter.vision_kind](self.adapter, self)

    def finish(self, parts: dict[str, torch.Tensor], counts: Sequence[int] | None = None) -> None:
        """The tower has run: ``parts`` ``{name: [images, n, ...]}`` (or, with ``counts``, every
        image's tokens concatenated ``[sum(counts), ...]``) become :attr:`images`."""
        names = self.wanted()
        if counts is not None:
            parts = {n: v.split(list(counts)) for n, v in parts.items()}
        count = len(next(iter(parts.values()))) if parts else 0
        self.images = [{n: v[j].detach() for n, v in parts.items() if n in names} for j in range(count)]

    def finish_later(self, convert: Callable) -> None:
        """The tower has run, but its per-tile values become per-image ones only with the
        prompt's :attr:`image_sizes`: ``convert(image_sizes)`` -> ``{name: [images][n, ...]}``."""
        self.images, self._convert = [], convert

    def clear(self) -> None:
        """Forget what the tower recorded (a prompt's recording serves that prompt only)."""
        self.images, self.part, self._convert = [], {}, None

    def __enter__(self) -> "VisionTap":
        self._handles = self.install()
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    # -- per sample -----------------------------------------------------------------------------

    def per_sample(self, names: Sequence[str], n_image: Sequence[int], device=None) -> dict[str, torch.Tensor]:
        """``{name: [B, N_max, ...]}`` for a batch whose element b has ``n_image[b]`` image
        tokens from one image each (zero padding past N_b)."""
        names = [n for n in names if n in NAMES]
        if not names:
            return {}
        if self._convert is not None:
            if self.image_sizes is None:
                raise ValueError(f"{self.adapter.architecture}: the vision inputs need the processor's image_sizes")
            self.finish(self._convert(self.image_sizes))
            self._convert = None
        if len(self.images) != len(n_image) or any(
                self.images[b][names[0]].shape[0] != int(n) for b, n in enumerate(n_image)):
            got = [int(im[names[0]].shape[0]) for im in self.images]
            raise ValueError(f"{self.adapter.architecture}: the vision tower encoded images of {got} tokens, the "
                             f"prompts hold {list(map(int, n_image))}: the vision inputs need one image per prompt")
        out = {}
        for n in names:
            rows = [im[n] for im in self.images]
            out[n] = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(device)
        return out
