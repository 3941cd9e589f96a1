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
  in expectation (Johnson-Lindenstrauss), for diversity-aware selection;
* ``embeddings``          ``[B, N, D]``: the image tokens as they enter the LLM (the
  residual stream entering layer 0: post-projector), what DivPrune reads;
* ``dart_image``          ``[B, N, 2 + D]``: per image token its position in the unpadded
  prompt, the L1 norm of its layer K-1 key after RoPE (heads concatenated), and the model's
  final norm applied to its layer K-1 output (what DART's pivots and similarity read);
* ``dart_text``           ``[B, T, 1 + D]``: the :data:`DART_TEXT_PIVOTS` instruction tokens
  (everything after the image) with the largest such key L1 norm, in that order: position,
  final-normed layer K-1 output;
* ``instruction``         ``[B, D]``: the mean of the instruction tokens' (everything after the
  image up to the last real token) L2-normalised LLM-input embeddings, so that
  ``-(unit(embedding) @ instruction)`` is each image token's mean negative cosine to the
  instruction tokens: CDPruner's relevance, computed in the LLM's input space;
* ``attention_raters``    ``[B, H, N]``: layer K-1's attention rows averaged over SparseVLM's
  text raters (:func:`sparsevlm_raters`, chosen once from the layer-0 embeddings);
* ``hidden_out``          ``[B, N, D]``: the image tokens' residual stream entering layer K
  (layer K-1's output), what SparseVLM's recycling clusters and merges.
The DART inputs and ``hidden_out`` need layer K-1's *output*, so they are computed when layer K begins.
The vision-side inputs ``vision_attention`` / ``vision_keys`` / ``vision_features`` are read
inside the vision tower (:mod:`fastv_analysis.vision_probe`) and handed to :func:`layer_inputs`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .positions import take_positions
from .vision_probe import NAMES as VISION_NAMES
from .vision_probe import VisionTap

NAMES = ("attention_no_rope", "attention_text_mean", "attention_all_mean", "hidden_norm", "sketch", "embeddings",
         "dart_image", "dart_text", "instruction", "attention_raters", "hidden_out") + VISION_NAMES
NEEDS_HIDDEN = ("hidden_norm", "sketch")
NEEDS_EMBEDDINGS = ("embeddings", "instruction", "attention_raters")
NEEDS_OUTPUT = ("dart_image", "dart_text", "hidden_out")
"""Names read off layer K-1's output (the residual stream entering layer K)."""
TOKEN_DIM_1 = ("sketch", "embeddings", "dart_image", "hidden_out", "vision_keys", "vision_features")
"""Names whose image-token dim is 1 (``[S, N, ...]``); ``dart_text`` and ``instruction`` have none."""
NO_TOKEN_DIM = ("dart_text", "instruction")
FLOAT32_NAMES = ("dart_image", "dart_text")
"""Stored float32 whatever ``--store-dtype``: float16 holds prompt positions exactly only up to 2,048."""
DART_TEXT_PIVOTS = 4  # DART's pivot_text_token default (xqy1111111/DART eval scripts)
SKETCH_DIM = 64
SKETCH_SEED = 0
QUERY_BLOCK = 256  # query rows recomputed at once for the mean rows (bounds memory at O(256 x S) per head)


def take_tokens(x: torch.Tensor, name: str, index) -> torch.Tensor:
    """A named input restricted to some image tokens: its token dim is 1 for the sketch
    ``[S, N, D]``, the last one for the rows ``[S, H, N]`` and the norms ``[S, N]``."""
    if name in NO_TOKEN_DIM:
        return x
    return x[:, index] if name in TOKEN_DIM_1 else x[..., index]


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


def image_mask(image_pos: torch.Tensor, n_image: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, N]``: which of ``image_pos``'s columns are real image tokens (a ragged
    batch pads each element's columns up to the widest)."""
    return torch.arange(image_pos.shape[1], device=image_pos.device)[None] < n_image.to(image_pos.device)[:, None]


def instruction_embedding(embeds: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` float32: the mean over the ``text`` tokens (bool ``[B, S]``) of the rows of
    ``embeds`` ``[B, S, D]`` divided by their L2 norm (CDPruner's text side, see the module
    docstring)."""
    unit = embeds.float() / embeds.float().norm(dim=-1, keepdim=True)
    weight = text.to(unit.dtype)
    return torch.einsum("bsd,bs->bd", unit, weight) / weight.sum(dim=1).clamp(min=1)[:, None]


def sparsevlm_raters(embeds: torch.Tensor, image_pos: torch.Tensor, n_image: torch.Tensor,
                     text: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, S]``: SparseVLM v1.0's text raters (Gumpest/SparseVLMs@26a5f48, the model's
    forward), chosen from the layer-0 embeddings: each image token's softmax over the text
    tokens of its dot products with them, averaged over the image tokens; a text token rates
    when that average is strictly above its mean over the text. ``text``: bool ``[B, S]``,
    the tokens after the image (the authors take every token after it)."""
    x = embeds.float()
    img = take_positions(x, image_pos, dim=1)  # [B, N, D]
    logits = torch.einsum("bnd,bsd->bns", img, x).masked_fill(~text[:, None, :], -torch.inf)
    valid = image_mask(image_pos, n_image).float()  # [B, N]
    share = torch.einsum("bns,bn->bs", logits.softmax(dim=-1), valid) / valid.sum(dim=1)[:, None]
    mean = (share * text).sum(dim=1, keepdim=True) / text.sum(dim=1, keepdim=True).clamp(min=1)
    return text & (share > mean)


@torch.no_grad()
def layer_inputs(adapter, module, call, hidden_in: torch.Tensor | None, image_pos: torch.Tensor,
                 n_image: torch.Tensor, query_pos: torch.Tensor, attention_mask: torch.Tensor | None,
                 names: Sequence[str], embeds: torch.Tensor | None = None,
                 hidden_out: torch.Tensor | None = None, vision: VisionTap | None = None) -> dict[str, torch.Tensor]:
    """The requested :data:`NAMES` for a batch, image columns padded to ``image_pos``'s width.

    ``call``: layer K-1's attention call (:class:`~fastv_analysis.adapters.AttentionCall`);
    ``hidden_in``: ``[B, S, D]`` residual stream entering layer K-1 (for the hidden-state
    names); ``query_pos``: ``[B, 1]`` each element's last real token; ``vision``: the tap that recorded this forward's tower.
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
    masks = query_masks(image_pos, n_image, attention_mask, seq_len)
    if any(n in names for n in NEEDS_EMBEDDINGS) and embeds is None:
        raise adapter.missing("the residual stream entering layer 0", "the layer inputs probe")
    if "attention_raters" in names:
        masks["attention_raters"] = sparsevlm_raters(embeds, image_pos, n_image, masks["attention_text_mean"])
    means = [n for n in ("attention_text_mean", "attention_all_mean", "attention_raters") if n in names]
    if means:
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
    if "embeddings" in names:
        out["embeddings"] = take_positions(embeds, image_pos, dim=1).float()
    if "instruction" in names:
        out["instruction"] = instruction_embedding(embeds, masks["attention_text_mean"])
    if any(n in names for n in VISION_NAMES):
        if vision is None:
            raise adapter.missing("the vision tower's recording", "the vision inputs probe")
        out.update(vision.per_sample(names, n_image.tolist(), hidden.device))
    if any(n in names for n in NEEDS_OUTPUT):
        if hidden_out is None:
            raise adapter.missing("layer K-1's output", "the DART inputs probe")
        if "hidden_out" in names:
            out["hidden_out"] = take_positions(hidden_out, image_pos, dim=1).float()
        if any(n in names for n in ("dart_image", "dart_text")):
            out.update(dart_inputs(adapter, module, call, hidden_out, image_pos, query_pos, attention_mask, names))
    return out


def dart_inputs(adapter, module, call, hidden_out: torch.Tensor, image_pos: torch.Tensor, query_pos: torch.Tensor,
                attention_mask: torch.Tensor | None, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``dart_image`` / ``dart_text`` (see the module docstring) of a batch: positions are in each
    element's unpadded prompt (its first real token is 0); the text tokens are those after
    each element's last image token up to its last real token."""
    batch, seq_len, _ = hidden_out.shape
    key_l1 = adapter.attention_keys(module, call).float().abs().sum(dim=-1)  # [B, S]
    normed = adapter.final_norm(hidden_out).float()  # [B, S, D]
    first_real = torch.zeros(batch, dtype=torch.long, device=hidden_out.device)
    if attention_mask is not None and attention_mask.dim() == 2:
        first_real = attention_mask.to(hidden_out.device).long().argmax(dim=1)
    pos = (torch.arange(seq_len, device=hidden_out.device)[None] - first_real[:, None]).float()  # [B, S]
    out = {}
    if "dart_image" in names:
        out["dart_image"] = torch.cat([take_positions(pos, image_pos, dim=1)[..., None],
                                       take_positions(key_l1, image_pos, dim=1)[..., None],
                                       take_positions(normed, image_pos, dim=1)], dim=-1)
    if "dart_text" in names:
        last_image = image_pos.max(dim=1).values
        cols = torch.arange(seq_len, device=hidden_out.device)[None]
        text = (cols > last_image[:, None]) & (cols <= query_pos.reshape(batch, 1))
        if int(text.sum(dim=1).min()) < DART_TEXT_PIVOTS:
            raise ValueError(f"DART needs at least {DART_TEXT_PIVOTS} tokens after the image in every prompt")
        ranked = torch.where(text, key_l1, -torch.inf).sort(dim=1, descending=True, stable=True).indices
        top = ranked[:, :DART_TEXT_PIVOTS]  # [B, T]: topk order, ties to the earlier token
        out["dart_text"] = torch.cat([take_positions(pos, top, dim=1)[..., None],
                                      take_positions(normed, top, dim=1)], dim=-1)
    return out


STORE_OPTIONS = NAMES + ("layers",)
"""capture's ``--store`` choices: the named inputs above (per aggregation layer) and
``layers``, the last prompt token's image attention at every layer ``[L, H, N]`` (how the
ranking evolves with depth)."""


STORE_HINTS = {
    "attention_no_rope": "last token's rows without RoPE, H*N*b",
    "attention_text_mean": "rows averaged over the instruction, H*N*b",
    "attention_all_mean": "rows averaged over the prompt, H*N*b",
    "hidden_norm": "image tokens' residual norms, sinks, N*b",
    "sketch": "64-dim projection of the residual stream, N*64*b",
    "embeddings": "image tokens entering the LLM (DivPrune, CDPruner, pooling), N*D*b",
    "dart_image": "DART's per-token position, key L1, normed output, N*(D+2)*4",
    "dart_text": "DART's 4 text pivots, 4*(D+1)*4",
    "instruction": "CDPruner's instruction embedding, D*b",
    "attention_raters": "SparseVLM's raters' rows, H*N*b",
    "hidden_out": "residual stream entering layer K (SparseVLM's recycling), N*D*b",
    "vision_attention": "vision tower's CLS / mean-received attention (VisionZip, VisPruner), N*b",
    "vision_keys": "vision tower's head-mean keys (VisionZip), N*d*b",
    "vision_features": "vision features (VisPruner), N*Dv*b",
    "layers": "the last token's image rows at every layer, L*H*N*b",
}
"""One hint per :data:`STORE_OPTIONS` name for capture's help: what it is, and its bytes per
sample and K (H heads, N image tokens, D hidden size, d / Dv the vision tower's head / feature
width, L layers, b bytes of ``--store-dtype``)."""


def store_help() -> str:
    """capture ``--store``'s help: every :data:`STORE_OPTIONS` name with its hint."""
    missing = [n for n in STORE_OPTIONS if n not in STORE_HINTS]
    if missing:
        raise ValueError(f"probes.STORE_HINTS lacks {', '.join(missing)}")
    names = "; ".join(f"{n}: {STORE_HINTS[n]}" for n in STORE_OPTIONS)
    return (f"Also store, per K: {names}. Bytes per sample and K: H heads, N image tokens, D hidden size, "
            "d / Dv the vision tower's head / feature width, L layers, b bytes of --store-dtype. Comma list; "
            "bytes per sample printed.")


class InputsRecorder:
    """Record :func:`layer_inputs` at layers K-1 during the prefill of ``generate`` (capture).

    ``image_pos`` / ``n_image`` / ``attention_mask`` describe the batch that will run; the
    hooks are removed on exit and record nothing during decoding. Names read off layer K-1's
    output (:data:`NEEDS_OUTPUT`) are computed when layer K begins, the rest at K-1's attention.
    """

    def __init__(self, model, layers, names, image_pos, n_image, query_pos, attention_mask, image_sizes=None):
        from .adapters import get_adapter

        self.adapter = get_adapter(model)
        self.layers, self.names = [int(i) for i in layers], list(names)
        self.image_pos, self.n_image, self.query_pos, self.mask = image_pos, n_image, query_pos, attention_mask
        self.inputs: dict[int, dict[str, torch.Tensor]] = {}
        self._hidden: dict[int, torch.Tensor] = {}
        self._calls: dict[int, tuple] = {}
        self._handles: list = []
        self.after = any(n in NEEDS_OUTPUT for n in self.names)
        vision = [n for n in self.names if n in VISION_NAMES]
        self.vision = VisionTap(self.adapter, lambda: vision) if vision and self.layers else None
        if self.vision is not None:
            self.vision.image_sizes = image_sizes  # LLaVA-NeXT's tiles -> tokens
        if self.after and any(k + 1 >= self.adapter.num_layers for k in self.layers):
            raise ValueError(f"{', '.join(n for n in self.names if n in NEEDS_OUTPUT)} need a layer K after K-1: "
                             f"--agg-layers must be below {self.adapter.num_layers}")

    def _compute(self, layer: int, module, call, hidden_out=None) -> None:
        self.inputs[layer] = layer_inputs(self.adapter, module, call, self._hidden.get(layer), self.image_pos,
                                          self.n_image, self.query_pos, self.mask, self.names,
                                          embeds=self._hidden.get(-1), hidden_out=hidden_out, vision=self.vision)

    def _hook(self, layer: int) -> None:
        adapter = self.adapter

        def stash(module, args, kwargs):
            hidden = adapter.layer_call(args, kwargs).hidden_states
            if hidden.shape[1] > 1:
                self._hidden[layer] = hidden

        def record(module, args, kwargs, output):
            call = adapter.attention_call(args, kwargs)
            if call.hidden_states.shape[1] > 1:
                if self.after:
                    self._calls[layer] = (module, call)
                else:
                    self._compute(layer, module, call)

        def finish(module, args, kwargs):
            hidden = adapter.layer_call(args, kwargs).hidden_states
            if hidden.shape[1] > 1 and layer in self._calls:
                self._compute(layer, *self._calls.pop(layer), hidden_out=hidden)

        self._handles.append(adapter.layers[layer].register_forward_pre_hook(stash, with_kwargs=True))
        self._handles.append(adapter.attention(layer).register_forward_hook(record, with_kwargs=True))
        if self.after:
            self._handles.append(adapter.layers[layer + 1].register_forward_pre_hook(finish, with_kwargs=True))

    def __enter__(self) -> "InputsRecorder":
        if self.layers and any(n in NEEDS_EMBEDDINGS for n in self.names):
            def embeds(module, args, kwargs):
                hidden = self.adapter.layer_call(args, kwargs).hidden_states
                if hidden.shape[1] > 1:
                    self._hidden[-1] = hidden

            self._handles.append(self.adapter.layers[0].register_forward_pre_hook(embeds, with_kwargs=True))
        for layer in self.layers:
            self._hook(layer)
        if self.vision is not None:
            self._handles.extend(self.vision.install())
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._hidden, self._calls = [], {}, {}
