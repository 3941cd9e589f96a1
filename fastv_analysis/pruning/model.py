"""What a user holds: :class:`FastVModel`, the unmodified model called or generated through, its
live config under ``.fastv``, the last prefill's read-outs under the reference
implementation's names, and ``remove()`` / ``with`` to take the hooks off; :func:`apply_fastv`
builds it."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import fields, replace

import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from .config import FastVConfig
from .hooks import FastVHooks
from .prompt import Prompt


class FastVModel:
    """A VLM with FastV hooks installed; ``.fastv`` is the live config.

    Call it, ``forward`` or ``generate`` it like the wrapped model. After every prefill:
    ``last_selection_metadata``, ``last_gen_kept_indices`` ``[B, n_kept]`` (sequence
    positions kept) and ``last_gen_attention_mask`` (bool ``[B, S]``, True = kept), under
    the reference implementation's names. ``with apply_fastv(...) as m:`` or ``m.remove()``
    takes every hook off again.
    """

    def __init__(self, model: nn.Module, config: FastVConfig):
        self.model = model
        self.adapter: Adapter = get_adapter(model)
        self.adapter.check_attention_implementation()
        config.validate(self.adapter.num_layers)
        self._hooks = FastVHooks(model, self.adapter, config)
        self._installed = ExitStack()
        self._installed.enter_context(self._hooks.installed())

    @property
    def fastv(self) -> FastVConfig:
        return self._hooks.config

    @fastv.setter
    def fastv(self, config: FastVConfig) -> None:
        self._hooks.config = config

    @property
    def prompt(self) -> Prompt | None:
        """What the last prefill decided (None after :meth:`remove`)."""
        return self._hooks.prompt

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    __call__ = forward

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def force_kept(self, indices: torch.Tensor | None) -> None:
        """Use these image-token indices ``[B, keep]`` (or ``[keep]``) instead of ranking."""
        if indices is not None:
            indices = torch.as_tensor(indices, dtype=torch.long)
            indices = indices.unsqueeze(0) if indices.dim() == 1 else indices
            self.fastv.keep = int(indices.shape[1])
        self.fastv.kept = indices

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before :func:`apply_fastv`."""
        self._installed.close()

    def __enter__(self) -> "FastVModel":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __getattr__(self, name):
        # only reached for names the wrapper lacks: config, device, generation_config, ...
        if name in ("model", "_hooks", "_installed"):
            raise AttributeError(name)
        return getattr(self.model, name)

    # -- read-outs of the last prefill ------------------------------------------------------

    @property
    def last_selection_metadata(self) -> dict | None:
        prompt = self.prompt
        if prompt is None:
            return None
        if prompt.selection is not None:
            return prompt.selection.metadata()
        return {"method": "given", "alpha": None, "max_head_idx": None, "head_importance": None,
                "kept_indices": prompt.given}

    @property
    def last_gen_kept_indices(self) -> torch.Tensor | None:
        """Sequence positions the last layers keep (the schedule's last cut)."""
        prompt = self.prompt
        if prompt is None:
            return None
        return prompt.later[-1].kept_positions if prompt.later else prompt.kept_positions

    @property
    def last_gen_attention_mask(self) -> torch.Tensor | None:
        prompt = self.prompt
        if prompt is None:
            return None
        return prompt.later[-1].kept_mask if prompt.later else prompt.kept_mask

    @property
    def last_stage_kept(self) -> list[torch.Tensor] | None:
        """``[B, keep]`` image-token indices each cut of the schedule kept, first cut first."""
        prompt = self.prompt
        if prompt is None or prompt.kept_image is None:
            return None
        return [prompt.kept_image] + [cut.kept_image for cut in prompt.later]

    @property
    def last_image_attention(self) -> torch.Tensor | None:
        """``[B, H, N]`` float32 last-token attention at layer K-1 that was ranked."""
        return None if self.prompt is None else self.prompt.image_rows


def apply_fastv(model: nn.Module, config: FastVConfig | Mapping | None = None, **overrides) -> FastVModel:
    """Install FastV on ``model`` (unchanged otherwise); returns the wrapper that owns the hooks."""
    if config is None:
        config = FastVConfig(**overrides)
    elif isinstance(config, Mapping):
        config = FastVConfig.from_dict({**config, **overrides})
    elif overrides:  # apply_fastv(model, cfg, mode="mask"): a copy of cfg with those fields changed
        unknown = sorted(set(overrides) - {f.name for f in fields(FastVConfig)})
        if unknown:
            raise ValueError(f"unknown FastV config key(s) {', '.join(unknown)}")
        config = replace(config, **overrides)
    return FastVModel(model, config)
