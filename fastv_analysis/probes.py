"""The named inputs of the strategies beyond FastV's last-token rows, from layer K-1.

One function computes them from what hooks see at layer K-1 (the attention module's call
and the residual stream entering the layer), so capture stores exactly what online
pruning ranks by, and select replays exactly what ``apply_fastv`` would do:

* ``attention_no_rope``   ``[B, H, N]``: the last prompt token's rows without RoPE (FEATHER);
* ``attention_text_mean`` ``[B, H, N]``: rows averaged over the instruction tokens (after the image);
* ``attention_all_mean``  ``[B, H, N]``: rows averaged over every real prompt token (the
  FastV paper's "attention received"); causally masked entries count as 0;
* ``hidden_norm``         ``[B, N]``: L2 norm of each image token's residual stream entering
  layer K-1 (attention sinks carry norms far above the rest);
* ``sketch``              ``[B, N, 64]``: that residual stream times a fixed Gaussian
  matrix (seed :data:`SKETCH_SEED`, entries N(0, 1/64)), which keeps cosine similarities
  in expectation (Johnson-Lindenstrauss), for diversity-aware selection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .positions import take_positions

NAMES = ("attention_no_rope", "attention_text_mean", "attention_all_mean", "hidden_norm", "sketch")
NEEDS_HIDDEN = ("hidden_norm", "sketch")
SKETCH_DIM = 64
SKETCH_SEED = 0
QUERY_BLOCK = 256  # query rows recomputed at once for the mean rows (bounds memory at O(256 x S) per head)


def take_tokens(x: torch.Tensor, name: str, index) -> torch.Tensor:
    """A named input restricted to some image tokens: its token dim is 1 for the sketch
    ``[S, N, D]``, the last one for the rows ``[S, H, N]`` and the norms ``[S, N]``."""
    return x[:, index] if name == "sketch" else x[..., index]


def sketch_matrix(hidden_size: int, device=None) -> torch.Tensor:
    """The fixed ``[D, 64]`` projection (float32): the same on every machine and run."""
    g = torch.Generator().manual_seed(SKETCH_SEED)
    return (torch.randn(hidden_size, SKETCH_DIM, generator=g) / SKETCH_DIM ** 0.5).to(device)


def query_masks(image_pos: torch.Tensor, n_image: torch.Tensor, attention_mask: torch.Tensor | None,
                seq_len: int) -> dict[str, torch.Tensor]:
    """Bool ``[B, S]`` query rows of the two mean queries: the real prompt tokens (all), and
    those after each element's last image token (text: the instruction)."""
    batch = image_pos.shape[0]
    positions = torch.arange(seq_len, device=image_pos.device).expand(batch, -1)
    real = torch.ones(batch, seq_len, dtype=torch.bool, device=image_pos.device) if attention_mask is None or \
        attention_mask.dim() != 2 else attention_mask.to(image_pos.device).bool()
    last_image = image_pos.gather(1, (n_image - 1)[:, None])
    return {"attention_all_mean": real, "attention_text_mean": real & (positions > last_image)}


@torch.no_grad()
def layer_inputs(adapter, module, call, hidden_in: torch.Tensor | None, image_pos: torch.Tensor,
                 n_image: torch.Tensor, query_pos: torch.Tensor, attention_mask: torch.Tensor | None,
                 names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The requested :data:`NAMES` for a batch, image columns padded to ``image_pos``'s width.

    ``call``: layer K-1's attention call (:class:`~fastv_analysis.adapters.AttentionCall`);
    ``hidden_in``: ``[B, S, D]`` residual stream entering layer K-1 (for the hidden-state
    names); ``query_pos``: ``[B, 1]`` each element's last real token.
    """
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown layer input(s) {', '.join(unknown)}: expected {', '.join(NAMES)}")
    out: dict[str, torch.Tensor] = {}
    hidden = call.hidden_states
    batch, seq_len, _ = hidden.shape
    if "attention_no_rope" in names:
        rows = adapter.attention_rows(module, call, query_pos, rope=False)[:, :, 0, :]
        out["attention_no_rope"] = take_positions(rows, image_pos, dim=2)
    means = [n for n in ("attention_text_mean", "attention_all_mean") if n in names]
    if means:
        masks = query_masks(image_pos, n_image, attention_mask, seq_len)
        sums = {n: torch.zeros(batch, adapter.num_heads, seq_len, device=hidden.device) for n in means}
        for start in range(0, seq_len, QUERY_BLOCK):
            block = torch.arange(start, min(start + QUERY_BLOCK, seq_len), device=hidden.device).expand(batch, -1)
            rows = adapter.attention_rows(module, call, block)  # [B, H, q, S]
            for n in means:
                weight = masks[n][:, start : start + block.shape[1]].float()  # [B, q]
                sums[n] += torch.einsum("bhqs,bq->bhs", rows, weight)
        for n in means:
            count = masks[n].sum(dim=1).clamp(min=1).float()[:, None, None]
            out[n] = take_positions(sums[n] / count, image_pos, dim=2)
    if any(n in names for n in NEEDS_HIDDEN):
        if hidden_in is None:
            raise adapter.missing("the residual stream entering layer K-1", "the layer inputs probe")
        image_hidden = take_positions(hidden_in, image_pos, dim=1).float()  # [B, N, D]
        if "hidden_norm" in names:
            out["hidden_norm"] = image_hidden.norm(dim=-1)
        if "sketch" in names:
            out["sketch"] = image_hidden @ sketch_matrix(image_hidden.shape[-1], image_hidden.device)
    return out


STORE_OPTIONS = NAMES + ("layers",)
"""capture's ``--store`` choices: the named inputs above (per aggregation layer) and
``layers``, the last prompt token's image attention at every layer ``[L, H, N]`` (how the
ranking evolves with depth)."""


class InputsRecorder:
    """Record :func:`layer_inputs` at layers K-1 during the prefill of ``generate`` (capture).

    ``image_pos`` / ``n_image`` / ``attention_mask`` describe the batch that will run; the
    hooks are removed on exit and record nothing during decoding.
    """

    def __init__(self, model, layers, names, image_pos, n_image, query_pos, attention_mask):
        from .adapters import get_adapter

        self.adapter = get_adapter(model)
        self.layers, self.names = [int(i) for i in layers], list(names)
        self.image_pos, self.n_image, self.query_pos, self.mask = image_pos, n_image, query_pos, attention_mask
        self.inputs: dict[int, dict[str, torch.Tensor]] = {}
        self._hidden: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "InputsRecorder":
        adapter = self.adapter
        for layer in self.layers:
            def stash(module, args, kwargs, layer=layer):
                hidden = adapter.layer_call(args, kwargs).hidden_states
                if hidden.shape[1] > 1:
                    self._hidden[layer] = hidden

            def record(module, args, kwargs, output, layer=layer):
                call = adapter.attention_call(args, kwargs)
                if call.hidden_states.shape[1] > 1:
                    self.inputs[layer] = layer_inputs(adapter, module, call, self._hidden.get(layer), self.image_pos,
                                                      self.n_image, self.query_pos, self.mask, self.names)

            self._handles.append(adapter.layers[layer].register_forward_pre_hook(stash, with_kwargs=True))
            self._handles.append(adapter.attention(layer).register_forward_hook(record, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._hidden = [], {}
