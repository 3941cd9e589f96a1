"""Shared-prefix decoding (eval): one prompt runs through layers 0..K-1 once, then C kept sets
from layer K as C rows (:func:`prefill_shared`); :func:`greedy_decode` continues all rows
together. The cache and the decoder's calling conventions come from the model's adapter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..strategies import Merge
from .config import FastVConfig, Stage
from .model import FastVModel, apply_fastv


@dataclass
class SharedPrefill:
    """The state after :func:`prefill_shared`: C rows ready for greedy decoding.

    logits: ``[C, V]`` next-token logits of every kept set; ``past_key_values``: the cache
    (layers < K expanded to batch C); ``attention_mask``: 2D ``[C, S]``; ``fastv``: the
    wrapper whose hooks must stay installed while decoding (closed by :meth:`close`).
    """

    fastv: FastVModel
    logits: torch.Tensor
    past_key_values: object
    attention_mask: torch.Tensor
    prompt_len: int
    position_state: object = None  # what the adapter needs to place decoded tokens (M-RoPE deltas)

    def close(self) -> None:
        self.fastv.remove()

    def __enter__(self) -> "SharedPrefill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@torch.no_grad()
def prefill_shared(
    model: nn.Module, inputs: Mapping, kept_sets: torch.Tensor, agg_layer: int, mode: str = "drop",
    stages: Sequence[Stage] = (), merge: Merge | None = None, positions: str = "original",
) -> SharedPrefill:
    """Run one prompt through layers 0..K-1 once, then each of C kept sets from layer K.

    inputs:    the model inputs of ONE sample (batch 1): input_ids, pixel_values, ...
    kept_sets: ``[C, keep]`` image-token indices, one row per configuration.
    merge:     the sets' merge plans (``assign``/``weight`` ``[C, N]``; a drop row is
               :func:`drop_plan`'s), None when every set is a drop.
    positions: the positions policy of every set (see :class:`FastVConfig`).
    The cache of layers < K is expanded to batch C afterwards, so :func:`greedy_decode`
    continues all C rows together.
    """
    kept_sets = torch.as_tensor(kept_sets, dtype=torch.long)
    kept_sets = kept_sets.unsqueeze(0) if kept_sets.dim() == 1 else kept_sets
    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError(f"prefill_shared takes one sample (batch 1), got batch {input_ids.shape[0]}")
    n_sets = kept_sets.shape[0]
    config = FastVConfig(agg_layer=agg_layer, keep=int(kept_sets.shape[1]), mode=mode, kept=kept_sets,
                         stages=tuple(stages), merge=merge, positions=positions)
    fastv = apply_fastv(model, config)
    try:
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        adapter = fastv.adapter
        cache = adapter.new_cache()
        position_ids, position_state = adapter.prompt_positions(dict(inputs), attention_mask)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        logits = adapter.next_token_logits(fastv, cache, input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, **extra)
        adapter.repeat_cache(cache, range(agg_layer), n_sets)
    except BaseException:
        fastv.remove()
        raise
    return SharedPrefill(
        fastv=fastv,
        logits=logits.expand(n_sets, -1),
        past_key_values=cache,
        attention_mask=attention_mask.expand(n_sets, -1),
        prompt_len=input_ids.shape[1],
        position_state=position_state,
    )


def drop_plan(kept: torch.Tensor, n_image: int) -> Merge:
    """The merge plan of a drop of ``kept`` ``[C, keep]`` (slot j = token ``kept[:, j]``, weight 1),
    for a drop sharing a prefill with merges."""
    kept = torch.as_tensor(kept, dtype=torch.long).reshape(-1, kept.shape[-1])
    assign = torch.full((kept.shape[0], n_image), -1, dtype=torch.long)
    assign.scatter_(1, kept, torch.arange(kept.shape[1]).expand_as(kept).contiguous())
    return Merge(assign, (assign >= 0).float())


@torch.no_grad()
def greedy_decode(
    shared: SharedPrefill, max_new_tokens: int, eos_token_id: int | list[int] | None = None, pad_token_id: int = 0
) -> torch.Tensor:
    """Greedy tokens ``[C, T]`` for every row of a :class:`SharedPrefill` (T <= max_new_tokens).

    Rows that emitted an EOS are padded with ``pad_token_id`` afterwards, as ``generate``
    does; decoding stops when every row has finished. Closes nothing: use ``with``.
    """
    eos = torch.tensor([] if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)), dtype=torch.long)
    logits, mask, cache = shared.logits, shared.attention_mask, shared.past_key_values
    n_rows = logits.shape[0]
    done = torch.zeros(n_rows, dtype=torch.bool, device=logits.device)
    tokens = []
    for step in range(max_new_tokens):
        next_token = logits.argmax(dim=-1)
        next_token = torch.where(done, torch.full_like(next_token, pad_token_id), next_token)
        tokens.append(next_token)
        done = done | torch.isin(next_token, eos.to(next_token.device))
        if done.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(n_rows, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        position_ids = shared.fastv.adapter.decode_positions(mask, shared.position_state)
        logits = shared.fastv.adapter.next_token_logits(shared.fastv, cache, input_ids=next_token[:, None],
                                                        attention_mask=mask, position_ids=position_ids)
    return torch.stack(tokens, dim=1) if tokens else torch.zeros(n_rows, 0, dtype=torch.long, device=logits.device)


def shared_greedy_answers(
    model: nn.Module, inputs: Mapping, kept_sets: torch.Tensor, agg_layer: int, max_new_tokens: int,
    eos_token_id: int | list[int] | None = None, pad_token_id: int = 0, merge: Merge | None = None,
    positions: str = "original",
) -> torch.Tensor:
    """prefill_shared + greedy_decode in one call; hooks removed afterwards."""
    with prefill_shared(model, inputs, kept_sets, agg_layer, merge=merge, positions=positions) as shared:
        return greedy_decode(shared, max_new_tokens, eos_token_id, pad_token_id)
