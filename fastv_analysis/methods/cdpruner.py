"""CDPruner (Zhang et al., NeurIPS'25): conditional DPP over the LLM-input image tokens, greedy MAP.

Authors' code: Theia-4869/CDPruner@9541616 (``llava/model/llava_arch.py``,
``LlavaMetaForCausalLM.encode_images``; fidelity: tests/test_text_methods.py).

The authors' relevance reads CLIP's *text* tower: the mean negative cosine between the CLIP
patch embeddings (post-layernorm, visual projection) and the CLIP text embeddings of the
question, min-max normalised. Their released code covers LLaVA-1.5 / LLaVA-NeXT only (CLIP
towers); Hugging Face's LLaVA classes carry no CLIP text tower and Qwen2.5-VL has none at
all, so here the relevance is computed in the LLM's input space instead: the mean negative
cosine between each image token's LLM-input embedding (post-projector) and the LLM-input
embeddings of the instruction tokens (everything after the image), min-max normalised as
the authors do. The same choice as openvino.genai's CDPruner port for Qwen2-VL / LLaVA
(post-projector image embeddings against the LLM's text embeddings). The DPP itself is the
authors': kernel ``L = r_i * cos(f_i, f_j) * r_j`` on the post-projector features, T steps
of fast greedy MAP inference.

Families: the kernel and the relevance span all of a sample's N image tokens. The authors'
LLaVA-NeXT code runs the DPP per tile (T tokens from each of the base image and its crops,
relevance normalised over all tiles together); here one DPP chooses ``keep`` tokens over
every tile (and the ``image_newline`` tokens, unless eval keeps them outside the budget).
Qwen2.5-VL: the post-merger tokens, as they enter the LLM. The selection reads layer-0
inputs only, so it is the same whatever K it is replayed at.
"""

from __future__ import annotations

import math

import torch

from ..strategies import _Ctx, _positional, _Result, register

EXHAUSTED = 1e-4
"""A greedy step whose best conditional gain is at most this share of the sample's largest
initial gain has run out of rank (the kernel has rank <= D, the embedding width): the
authors' loop then takes the square root of rounding noise (NaN once it is negative); here
the remaining picks go to the unpicked tokens by descending relevance (ties: lower index)."""


def cdpruner_relevance(embeddings: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
    """``[..., N]`` CDPruner's relevance of each image token: ``-(unit(x) @ instruction)`` (the
    mean negative cosine to the instruction tokens, ``instruction`` being the mean of their
    unit embeddings, see :func:`fastv_analysis.probes.instruction_embedding`), then
    ``(r - min + 1e-6) / (max - min)`` over the sample's N tokens (the authors' normalisation,
    1e-6 in the numerator only; they normalise over the whole batch, i.e. over all of a
    sample's tiles together, which for one sample is the same)."""
    x = embeddings.float()
    unit = x / x.norm(dim=-1, keepdim=True)
    r = -(unit @ instruction.float()[..., None])[..., 0]
    low, high = r.min(dim=-1, keepdim=True).values, r.max(dim=-1, keepdim=True).values
    return (r - low + 1e-6) / (high - low)


def cdpruner_order(features: torch.Tensor, relevance: torch.Tensor, depth: int | None = None) -> torch.Tensor:
    """``[..., depth]`` the greedy MAP picks of the conditional DPP, in pick order.

    Kernel ``L = r_i * S_ij * r_j`` with ``S`` the cosine similarity of ``features`` (rows
    divided by their raw norm, float32) and ``r`` = ``relevance``; each step picks the token
    with the largest conditional gain ``d_i^2`` (first maximum on ties) and updates the gains
    by the new Cholesky row (Chen et al.'s fast MAP, as the authors). Past rank exhaustion
    (:data:`EXHAUSTED`) the picks follow descending relevance. The first ``d`` picks do not
    depend on ``depth``.
    """
    batch_shape, n = features.shape[:-2], features.shape[-2]
    depth = n if depth is None else depth
    f = features.reshape(-1, n, features.shape[-1]).float()
    unit = f / f.norm(dim=-1, keepdim=True)
    r = relevance.reshape(-1, n).float()
    kernel = r[:, :, None] * torch.bmm(unit, unit.transpose(1, 2)) * r[:, None, :]  # [S, N, N]
    count, device = kernel.shape[0], kernel.device
    order = torch.empty(count, depth, dtype=torch.long, device=device)
    rows = torch.arange(count, device=device)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # [S, N]
    floor = EXHAUSTED * gains.max(dim=-1).values
    fallback = r.clone()  # relevance of the unpicked tokens, -inf once picked
    exhausted = torch.zeros(count, dtype=torch.bool, device=device)
    cis = torch.zeros(depth, count, n, device=device)
    for i in range(depth):
        best, j = gains.max(dim=-1)
        exhausted |= ~(best > floor)
        j = torch.where(exhausted, fallback.max(dim=-1).indices, j)
        order[:, i] = j
        fallback[rows, j] = -math.inf
        e = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])) / \
            torch.sqrt(gains[rows, j].clamp(min=torch.finfo(gains.dtype).tiny))[:, None]
        cis[i] = torch.where(exhausted[:, None], 0.0, e)
        gains -= cis[i] ** 2
        gains[rows, j] = -math.inf
    return order.reshape(*batch_shape, depth)


@register("cdpruner", "ranking", needs=("embeddings", "instruction"), where="input", positions="compact",
          doc="CDPruner (before the LLM): conditional DPP, greedy MAP, on the post-projector embeddings; relevance = "
              "mean negative cosine to the instruction's LLM-input embeddings (the authors use CLIP's text tower, "
              "absent from HF LLaVA / Qwen2.5-VL); positions: compact, as the authors' code.")
def _cdpruner(ctx: _Ctx, keep: int | None) -> _Result:
    """:func:`cdpruner_order` of ``inputs["embeddings"]`` conditioned on
    :func:`cdpruner_relevance`; the greedy order is the ranking (positional scores, as
    divprune; only the first ``keep`` picks are made when a keep is given)."""
    emb = ctx.inputs["embeddings"]
    order = cdpruner_order(emb, cdpruner_relevance(emb, ctx.inputs["instruction"]), keep)
    return _Result(_positional(order.to(ctx.attention.device), ctx.attention.dtype, emb.shape[-2]))
