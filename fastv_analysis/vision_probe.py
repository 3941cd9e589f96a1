"""The vision-side named inputs (VisionZip, VisPruner), read inside the vision tower.

One :class:`VisionTap` records them while the tower encodes, for capture (``--store``) and
for online pruning alike, per LLM image token (image order, then token order):

* ``vision_attention`` ``[N]``: attention at the layer whose output feeds the LLM, heads
  averaged. Towers with a CLS token (LLaVA-1.5's CLIP, feature layer -2 as the authors):
  the CLS row over the patches. Towers without one (Qwen2-VL / Qwen2.5-VL): the mean
  attention each patch receives (over all queries, at the last block, which is full
  attention in Qwen2.5-VL, as LightCompress), then averaged over the 2 x 2 patches the
  PatchMerger makes one LLM token.
* ``vision_keys`` ``[N, d]``: that layer's keys averaged over heads (CLIP: raw ``k_proj``
  as the authors' ``metric``; Qwen: after RoPE, as LightCompress), averaged over merged patches.
* ``vision_features`` ``[N, D]``: CLIP: the patch features of the feature layer (what the
  projector gets, VisPruner's de-duplication features); Qwen: the merger's output (the
  LLM-input embeddings, as LightCompress's VisPruner).

The attention rows are recomputed from the attention module's own q / k projections in a
forward hook (the tower keeps its SDPA kernel); only the rows needed are formed. Other
families (LLaVA-NeXT / OneVision tiles, InternVL, SigLIP towers) raise a one-line error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

NAMES = ("vision_attention", "vision_keys", "vision_features")


def feature_layer_index(num_layers: int, feature_layer: int) -> int:
    """The encoder layer whose output is ``hidden_states[feature_layer]`` (index 0: embeddings)."""
    i = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 1 <= i <= num_layers:
        raise ValueError(f"vision inputs read the attention of the layer producing vision_feature_layer "
                         f"{feature_layer}'s features; this tower has {num_layers} layer(s), so none does")
    return i - 1


class VisionTap:
    """Hooks on the vision tower recording :data:`NAMES` per encoded image.

    ``wanted()`` says, when the tower runs, which names to record (empty: nothing is
    computed); ``images`` holds, after a forward, one dict per image of ``[n_tokens, ...]``.
    """

    def __init__(self, adapter, wanted: Callable[[], Sequence[str]]):
        self.adapter, self.wanted = adapter, wanted
        self.images: list[dict[str, torch.Tensor]] = []
        self._part: dict[str, torch.Tensor] = {}

    def install(self) -> list:
        kind = getattr(self.adapter, "vision_kind", None)
        if kind == "clip_cls":
            return self._install_clip()
        if kind == "qwen_merge":
            return self._install_qwen()
        return [self.adapter.vision_tower.register_forward_pre_hook(self._unsupported)]

    def _unsupported(self, module, args):
        if self.wanted():
            raise ValueError(f"{self.adapter.architecture}: the vision inputs ({', '.join(NAMES)}) are read for "
                             "LLaVA-1.5 (CLIP with CLS) and Qwen2-VL / Qwen2.5-VL towers only")

    def __enter__(self) -> "VisionTap":
        self._handles = self.install()
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    # -- CLIP (LLaVA-1.5) ---------------------------------------------------------------------

    def _install_clip(self) -> list:
        model = self.adapter.model
        tower = model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers  # CLIPVisionModel flattened in 5.x
        config = model.config
        layer = layers[feature_layer_index(len(layers), int(config.vision_feature_layer))]

        def attention(module, args, kwargs, output):
            names = self.wanted()
            if not any(n in names for n in ("vision_attention", "vision_keys")):
                return
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            with torch.no_grad():
                b, s, _ = hidden.shape
                heads = module.num_heads
                k = module.k_proj(hidden).view(b, s, heads, -1).float()  # [B, S, H, d]
                q = (module.q_proj(hidden[:, :1]).view(b, 1, heads, -1).float() * module.scale)
                row = torch.softmax(torch.einsum("bqhd,bshd->bhqs", q, k), dim=-1)[:, :, 0]  # [B, H, S]
                self._part["vision_attention"] = row.mean(dim=1)[:, 1:]
                self._part["vision_keys"] = k.mean(dim=2)[:, 1:]

        def features(module, args, output):
            names = self.wanted()
            if not names:
                return
            out = output[0] if isinstance(output, tuple) else output
            part = dict(self._part)
            if "vision_features" in names:
                part["vision_features"] = out[:, 1:].float()
            self.images = [{n: v[i].detach() for n, v in part.items() if n in names} for i in range(out.shape[0])]
            self._part = {}

        return [layer.self_attn.register_forward_hook(attention, with_kwargs=True),
                layer.register_forward_hook(features)]

    # -- Qwen2-VL / Qwen2.5-VL ----------------------------------------------------------------

    def _install_qwen(self) -> list:
        visual = self.adapter.vision_tower
        block = visual.blocks[-1]
        merge = visual.spatial_merge_size ** 2

        def attention(module, args, kwargs, output):
            if not any(n in self.wanted() for n in ("vision_attention", "vision_keys")):
                return
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cu = kwargs["cu_seqlens"]
            cos, sin = kwargs["position_embeddings"]
            with torch.no_grad():
                s = hidden.shape[0]
                q, k, _ = module.qkv(hidden).reshape(s, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
                q, k = _rotary_vision(module)(q, k, cos, sin)
                q, k = q.float(), k.float()
                received = torch.zeros(s, device=hidden.device)
                for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):  # one block of full attention each
                    p = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:e], k[a:e]) * module.scaling, dim=-1)
                    received[a:e] = p.mean(dim=0).sum(dim=0) / s  # head mean, summed over queries, / all queries
                self._part["vision_attention"] = received.view(-1, merge).mean(dim=1)  # window order
                self._part["vision_keys"] = k.mean(dim=1).view(s // merge, merge, -1).mean(dim=1)

        def finish(module, args, kwargs, output):
            names = self.wanted()
            if not names:
                return
            grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
            order = torch.argsort(_window_index(visual, grid)).to(grid.device)
            part = {n: v[order] for n, v in self._part.items()}
            merged = getattr(output, "pooler_output", None)
            if "vision_features" in names:
                if merged is None:
                    raise self.adapter.missing("the merger's output (pooler_output)", "the vision probe")
                part["vision_features"] = merged.float()
            counts = (grid.prod(dim=1) // merge).tolist()
            splits = {n: v.split(counts) for n, v in part.items()}
            self.images = [{n: splits[n][i].detach() for n in names if n in splits} for i in range(len(counts))]
            self._part = {}

        return [block.attn.register_forward_hook(attention, with_kwargs=True),
                visual.register_forward_hook(finish, with_kwargs=True)]

    # -- per sample -----------------------------------------------------------------------------

    def per_sample(self, names: Sequence[str], n_image: Sequence[int], device=None) -> dict[str, torch.Tensor]:
        """``{name: [B, N_max, ...]}`` for a batch whose element b has ``n_image[b]`` image
        tokens from one image each (zero padding past N_b)."""
        names = [n for n in names if n in NAMES]
        if not names:
            return {}
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


def _rotary_vision(module) -> Callable:
    import inspect

    return inspect.getmodule(type(module)).apply_rotary_pos_emb_vision


def _window_index(visual, grid: torch.Tensor) -> torch.Tensor:
    """The patch-group order the blocks run in (Qwen2.5-VL's windows; Qwen2-VL: identity)."""
    if not hasattr(visual, "window_size"):
        return torch.arange(int((grid.prod(dim=1) // visual.spatial_merge_size ** 2).sum()), device=grid.device)
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                       window_size=visual.window_size, patch_size=visual.patch_size)
    return index
