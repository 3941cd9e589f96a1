"""Online scoring: at layer K-1 of a prefill, the last prompt token's attention rows are read off
the attention module's call (:mod:`fastv_analysis.attention`), the named inputs a strategy
needs are computed (:mod:`fastv_analysis.probes`), and the strategy registry
(:func:`fastv_analysis.strategies.select`) ranks each element over its own N image tokens and
its own grid. K = 0 keeps a random (or uniform) subset instead; a schedule's later stages rank
what the previous cut kept by the pruned model's attention at their own K-1."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from .. import probes, strategies
from ..adapters import Adapter
from ..attention import rows_from_call
from ..positions import take_positions
from .config import FastVConfig
from .cut import image_attention, kept_token_mask, mask_to_positions, sample_keys
from .prompt import Cut, Prompt


def needed_inputs(config: FastVConfig) -> tuple[str, ...]:
    """The named inputs the configured strategy reads."""
    return strategies.required_inputs(config.method, **dict(config.params))


def needs_hidden(config: FastVConfig) -> bool:
    """Whether the configured strategy reads the residual stream entering layer K-1."""
    return any(n in probes.NEEDS_HIDDEN for n in needed_inputs(config))


def needs_embeddings(config: FastVConfig) -> bool:
    """Whether the configured strategy reads the residual stream entering layer 0."""
    return any(n in probes.NEEDS_EMBEDDINGS for n in needed_inputs(config))


def stack(parts: list) -> strategies.Selection:
    """One Selection from per-element ones of different N (scores zero-padded; kept sets
    of different sizes, newlines kept by policy, padded by repeating their first index)."""
    width = max(p.indices.shape[1] for p in parts)
    return strategies.Selection(
        indices=torch.cat([torch.cat([p.indices, p.indices[:, :1].expand(1, width - p.indices.shape[1])], dim=1)
                           for p in parts]),
        scores=torch.nn.utils.rnn.pad_sequence([p.scores[0] for p in parts], batch_first=True),
        max_head=torch.cat([p.max_head for p in parts]),
        head_importance=torch.cat([p.head_importance for p in parts]),
        method=parts[0].method, alpha=parts[0].alpha, merge=_stack_merges([p.merge for p in parts]))


def _stack_merges(merges: list) -> strategies.Merge | None:
    """The elements' merge plans as one ``[B, N_max]`` plan (padding: dropped, weight 0)."""
    if merges[0] is None:
        return None
    pad = torch.nn.utils.rnn.pad_sequence
    return strategies.Merge(pad([m.assign[0] for m in merges], batch_first=True, padding_value=-1),
                            pad([m.weight[0] for m in merges], batch_first=True))


def _take_tokens(inputs: Mapping[str, torch.Tensor] | None, index, element: int | None = None) -> dict | None:
    """Named inputs restricted to the image tokens ``index`` (of one batch ``element`` when given)."""
    if inputs is None:
        return None
    rows = slice(None) if element is None else slice(element, element + 1)
    return {name: probes.take_tokens(v[rows], name, index) for name, v in inputs.items()}


@dataclass(frozen=True)
class Ranker:
    """The live config, the model's adapter and the pixels the vision tower encoded in this
    forward (the random control's sample keys hash them): everything ranking reads besides
    the prompt."""

    config: FastVConfig
    adapter: Adapter
    pixels: torch.Tensor | None = None
    vision: object = None  # the VisionTap that recorded this prefill's vision tower (vision-side inputs)

    def keys(self, prompt: Prompt) -> list[int]:
        """Keys of the random control, computed once the image has been encoded."""
        if prompt.keys is None:
            ids = self.config.sample_ids  # its length was checked when the prompt began
            if ids is not None:
                prompt.keys = [int(i) for i in ids]
            else:
                prompt.keys = sample_keys(prompt.input_ids, prompt.attention_mask, self.pixels)
        return prompt.keys

    def select(self, prompt: Prompt, rows: torch.Tensor, inputs: Mapping[str, torch.Tensor] | None = None,
               method: str | None = None) -> strategies.Selection:
        """Rank ``rows`` ``[B, H, N_max]`` with ``method`` (default: the configured one, with
        its parameters), each element over its own N_b image tokens and its own grid (one
        call for the whole batch when every element has the same N and nothing depends on
        the grid)."""
        config = self.config
        method = method or config.method
        params = dict(config.params) if method == config.method else {}
        keys = self.keys(prompt) if method == "random" else None

        def one(r, k, named=None, layout=None):
            return strategies.select(r, method, config.keep, alpha=config.alpha, seed=config.seed,
                                     sample_keys=k, inputs=named, layout=layout, **params)

        by_grid = method in strategies.LAYOUT_METHODS or config.newline == "keep"
        if not prompt.ragged and not by_grid:
            return one(rows, keys, inputs)
        layouts = self.adapter.token_layouts(prompt.inputs or {}, prompt.n_image.tolist()) if by_grid else None
        return stack([
            self._select_element(one, rows[b:b + 1, :, :n], None if keys is None else keys[b:b + 1],
                                 _take_tokens(inputs, slice(0, n), b), None if layouts is None else layouts[b])
            for b, n in enumerate(prompt.n_image.tolist())])

    def _select_element(self, one, rows: torch.Tensor, keys, named, layout) -> strategies.Selection:
        """One element's selection over its own tokens; with ``newline="keep"`` the patch tokens
        are ranked and the newline tokens added back, outside the budget."""
        if self.config.newline != "keep" or layout is None or not len(layout.newline):
            return one(rows, keys, named, layout)
        newline = torch.from_numpy(layout.newline).to(rows.device)
        idx, patch_layout = layout.patches()
        patches = torch.from_numpy(idx).to(rows.device)
        sel = one(rows[..., patches], keys, _take_tokens(named, patches), patch_layout)
        kept = torch.cat([patches[sel.indices[0]], newline]).sort().values[None]
        scores = torch.zeros(1, rows.shape[-1], dtype=sel.scores.dtype, device=rows.device)
        return replace(sel, indices=kept, scores=scores.index_copy(1, patches, sel.scores))

    def at_input(self, prompt: Prompt, embeds: torch.Tensor | None) -> None:
        """K = 0: no layer-K attention to rank by. A strategy read before the LLM (``where``
        "input" / "vision") ranks the decoder's input ``embeds`` ``[B, S, D]``; ``uniform``
        keeps its lattice (as select does at K = 0); every other method a per-sample random
        subset of the image tokens."""
        rows = torch.zeros(prompt.image_pos.shape[0], 1, prompt.image_pos.shape[1])
        spec = strategies.strategy(self.config.method)
        inputs = None
        if spec.where != "llm":
            method = spec.name
            inputs = self._input_side(prompt, embeds)
        else:
            method = "uniform" if self.config.method == "uniform" else "random"
        prompt.selection = self.select(prompt, rows, inputs, method=method)
        prompt.choose(prompt.selection.indices.to(prompt.image_pos.device), prompt.selection.merge)

    def _input_side(self, prompt: Prompt, embeds: torch.Tensor | None) -> dict | None:
        """The named inputs of a pre-LLM strategy at K = 0: the image tokens' and the instruction's
        LLM-input embeddings from the decoder's input ``embeds`` (what enters layer 0), the
        vision-side ones from the :class:`~fastv_analysis.vision_probe.VisionTap` that recorded
        this prefill's tower (it runs before the decoder)."""
        needs = needed_inputs(self.config)
        if not needs:
            return None
        other = [n for n in needs if n not in ("embeddings", "instruction") + probes.VISION_NAMES]
        if other:
            raise ValueError(f"{self.config.method} at agg_layer=0 needs {', '.join(other)}, which only layer K >= 1 "
                             "computes online")
        out = {}
        if any(n in needs for n in ("embeddings", "instruction")):
            if embeds is None:
                raise self.adapter.missing("inputs_embeds", "the text decoder at K = 0")
            if "embeddings" in needs:
                out["embeddings"] = take_positions(embeds, prompt.image_pos, dim=1).float()
            if "instruction" in needs:
                text = probes.query_masks(prompt.image_pos, prompt.n_image, prompt.attention_mask,
                                          embeds.shape[1])["attention_text_mean"]
                out["instruction"] = probes.instruction_embedding(embeds, text)
        if any(n in needs for n in probes.VISION_NAMES):
            if self.vision is None:
                raise self.adapter.missing("the vision tower's recording", "the vision inputs at K = 0")
            out.update(self.vision.per_sample(needs, prompt.n_image.tolist(), prompt.image_pos.device))
        return out

    @torch.no_grad()
    def first_cut(self, prompt: Prompt, module, args, kwargs) -> None:
        """Layer K-1's attention call: rank the image tokens by the last prompt token's rows (and
        the strategy's named inputs) and decide the first cut."""
        adapter = self.adapter
        rows = rows_from_call(adapter, module, args, kwargs, prompt.query_pos)[:, :, 0, :]
        image_rows = image_attention(rows, prompt.image_pos)
        if prompt.ragged:  # the padding of each row repeats its last token: zero it
            image_rows = image_rows * probes.image_mask(prompt.image_pos, prompt.n_image)[:, None, :]
        prompt.image_rows = image_rows
        needs = needed_inputs(self.config)
        if any(n in probes.NEEDS_OUTPUT for n in needs):  # decided when layer K begins: finish_cut
            prompt.pending = (module, adapter.attention_call(args, kwargs), needs)
            return
        self._cut(prompt, module, adapter.attention_call(args, kwargs), needs)

    def _cut(self, prompt: Prompt, module, call, needs, hidden_out: torch.Tensor | None = None) -> None:
        inputs = None
        if needs:
            inputs = probes.layer_inputs(self.adapter, module, call, prompt.hidden_in, prompt.image_pos,
                                         prompt.n_image, prompt.query_pos, prompt.attention_mask, needs,
                                         embeds=prompt.embeds_in, hidden_out=hidden_out, vision=self.vision)
        prompt.selection = self.select(prompt, prompt.image_rows, inputs)
        prompt.choose(prompt.selection.indices.to(prompt.image_pos.device), prompt.selection.merge)

    @torch.no_grad()
    def finish_cut(self, prompt: Prompt, hidden_out: torch.Tensor) -> None:
        """Layer K's call: the first cut of a strategy that reads layer K-1's output (DART)."""
        module, call, needs = prompt.pending
        prompt.pending = None
        self._cut(prompt, module, call, needs, hidden_out)

    @torch.no_grad()
    def later_cut(self, prompt: Prompt, c: int, module, args, kwargs) -> None:
        """Stage c (1, 2, ...) of the schedule at layer K_c - 1: rank the tokens the previous
        cut kept by this layer's attention in the pruned model, keep stage.keep of them."""
        stage = prompt.stages[c - 1]
        prev_pos = prompt.kept_positions if c == 1 else prompt.later[c - 2].kept_positions
        prev_image = prompt.kept_image if c == 1 else prompt.later[c - 2].kept_image
        batch = prev_pos.shape[0]
        image_pos = prompt.image_pos.expand(batch, -1)
        orig = image_pos.gather(1, prev_image.expand(batch, -1))  # [B, k] sequence positions
        query = prompt.query_pos.expand(batch, -1)
        if prompt.mode == "drop":  # this layer runs on the previous cut's positions
            orig = torch.searchsorted(prev_pos, orig.contiguous())
            query = torch.searchsorted(prev_pos, query.contiguous())
        rows = rows_from_call(self.adapter, module, args, kwargs, query)[:, :, 0, :]
        image_rows = take_positions(rows, orig, dim=2)
        keys = None
        if stage.method == "random":
            keys = self.keys(prompt)
            keys = keys * batch if len(keys) == 1 else keys
        sel = strategies.select(image_rows, stage.method, stage.keep, alpha=stage.alpha, seed=self.config.seed + c,
                                sample_keys=keys, **dict(stage.params))
        kept_image = prev_image.expand(batch, -1).gather(1, sel.indices.to(prev_image.device)).sort(dim=1).values
        kept_mask = kept_token_mask(prompt.seq_len, image_pos, kept_image)
        positions = mask_to_positions(kept_mask)
        prompt.later.append(Cut(stage.agg_layer, kept_image, kept_mask, positions,
                                torch.searchsorted(prev_pos.contiguous(), positions)))

    def on_attention(self, prompt: Prompt, layer: int, module, args, kwargs) -> None:
        """A prefill's attention call at ``layer``: decide the cut whose K-1 it is, if any."""
        if prompt.stages and prompt.kept_mask is not None:
            c = len(prompt.later) + 1  # the next undecided stage
            if c <= len(prompt.stages) and layer == prompt.stages[c - 1].agg_layer - 1:
                self.later_cut(prompt, c, module, args, kwargs)
            return
        if prompt.kept_mask is None and layer == prompt.agg_layer - 1:
            self.first_cut(prompt, module, args, kwargs)
