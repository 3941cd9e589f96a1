"""How each family's vision tower is read for the vision-side inputs (VisionZip, VisPruner):
the hooks :class:`~fastv_analysis.vision_probe.VisionTap` installs, by the adapter's
``vision_kind``. Attention rows are recomputed from the attention module's own q / k in a
forward hook (the tower keeps its SDPA kernel); only the rows needed are formed."""

from __future__ import annotations

import inspect

import torch


def feature_layer_index(num_layers: int, feature_layer: int) -> int:
    """``i`` with ``hidden_states[feature_layer] == hidden_states[i]`` (0: the embeddings, i >= 1:
    layer i - 1's output); a one-line ValueError outside the tower."""
    i = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= i <= num_layers:
        raise ValueError(f"vision_feature_layer {feature_layer} is outside this {num_layers}-layer vision tower")
    return i


def _first(args, kwargs, name):
    return kwargs[name] if name in kwargs else args[0]


def clip_cls_hooks(adapter, tap) -> list:
    """LLaVA-1.5 (CLIP, "default" selection drops CLS): the CLS row (head mean) and head-mean raw
    keys of the layer producing the feature layer (the authors' layer -2), or layer 0 where the
    features are the embeddings (a one-layer toy tower); features: the feature layer's patches."""
    tower = adapter.model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers  # CLIPVisionModel flattened in 5.x
    i = feature_layer_index(len(layers), int(adapter.model.config.vision_feature_layer))

    def attention(module, args, kwargs, output):
        if not {"vision_attention", "vision_keys"} & set(tap.wanted()):
            return
        hidden = _first(args, kwargs, "hidden_states")
        with torch.no_grad():
            b, s, _ = hidden.shape
            k = module.k_proj(hidden).view(b, s, module.num_heads, -1).float()  # [B, S, H, d]
            q = module.q_proj(hidden[:, :1]).view(b, 1, module.num_heads, -1).float() * module.scale
            row = torch.softmax(torch.einsum("bqhd,bshd->bhqs", q, k), dim=-1)[:, :, 0]  # [B, H, S]
            tap.part["vision_attention"] = row.mean(dim=1)[:, 1:]
            tap.part["vision_keys"] = k.mean(dim=2)[:, 1:]

    def features(hidden: torch.Tensor) -> None:
        if "vision_features" in tap.wanted():
            tap.part["vision_features"] = hidden[:, 1:].float()

    anyres = hasattr(adapter.model.model, "pack_image_features")

    def finish(module, args, output):
        if tap.wanted():
            parts, tap.part = tap.part, {}
            if anyres:  # tiles -> LLM tokens once the prompt's image_sizes are known
                tap.finish_later(lambda sizes: anyres_tokens(adapter.model, parts, sizes))
            else:
                tap.finish(parts)

    handles = [layers[max(i - 1, 0)].self_attn.register_forward_hook(attention, with_kwargs=True)]
    if i < len(layers):  # the input of layer i
        handles.append(layers[i].register_forward_pre_hook(
            lambda m, args, kwargs: features(_first(args, kwargs, "hidden_states")), with_kwargs=True))
    else:
        handles.append(layers[-1].register_forward_hook(
            lambda m, args, output: features(output[0] if isinstance(output, tuple) else output)))
    return handles + [tower.register_forward_hook(finish)]


def anyres_tokens(model, parts: dict, image_sizes: torch.Tensor) -> dict:
    """LLaVA-NeXT: per-tile values ``{name: [tiles, 576, ...]}`` (all images' tiles) as
    ``{name: [images][n_tokens, ...]}`` in the LLM's token order: each image's tiles go through
    the model's own ``pack_image_features`` as their flat indices (unpadding included), and the
    ``image_newline`` tokens, which no patch feeds, get zeros."""
    modeling = inspect.getmodule(type(model.model))
    config = model.config
    counts = [modeling.image_size_to_num_patches(image_size=s, grid_pinpoints=config.image_grid_pinpoints,
                                                 patch_size=config.vision_config.image_size) for s in image_sizes]
    side = next(iter(parts.values())).shape[1]
    index = [torch.arange(1, c * side + 1, dtype=torch.float32).view(c, side, 1) for c in counts]
    with torch.no_grad():
        packed, _ = model.model.pack_image_features(index, image_sizes.cpu(), vision_feature_select_strategy="default",
                                                    image_newline=torch.zeros(1))
    out = {n: [] for n in parts}
    for tiles, source in zip(torch.split(torch.arange(sum(counts)), counts), packed):
        source = source[:, 0].round().long() - 1  # -1: a newline token
        for n, v in parts.items():
            flat = v[tiles.to(v.device)].flatten(0, 1)
            taken = flat[source.clamp(min=0).to(v.device)]
            mask = (source >= 0).to(v.device).view(-1, *([1] * (taken.dim() - 1)))
            out[n].append(taken * mask)
    return out


def qwen_merge_hooks(adapter, tap) -> list:
    """Qwen2-VL / Qwen2.5-VL (no CLS; as LightCompress): at the last block (full attention), the
    mean attention each patch receives (heads averaged, over all queries) and the head-mean
    keys after RoPE, both averaged over the patches merged into one LLM token; features: the
    merger's output (the LLM-input embeddings). The blocks run in window order: undone here."""
    visual = adapter.vision_tower
    merge = visual.spatial_merge_size ** 2

    def attention(module, args, kwargs, output):
        if not {"vision_attention", "vision_keys"} & set(tap.wanted()):
            return
        hidden, cu = _first(args, kwargs, "hidden_states"), kwargs["cu_seqlens"]
        cos, sin = kwargs["position_embeddings"]
        with torch.no_grad():
            s = hidden.shape[0]
            q, k, _ = module.qkv(hidden).reshape(s, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = inspect.getmodule(type(module)).apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k = q.float(), k.float()
            received = torch.zeros(s, device=hidden.device)
            for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):  # each image (the last block: full attention)
                p = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:e], k[a:e]) * module.scaling, dim=-1)
                received[a:e] = p.mean(dim=0).sum(dim=0) / s  # head mean, summed over queries, / all queries
            tap.part["vision_attention"] = received.view(-1, merge).mean(dim=1)
            tap.part["vision_keys"] = k.mean(dim=1).view(s // merge, merge, -1).mean(dim=1)

    def finish(module, args, kwargs, output):
        names = tap.wanted()
        if not names:
            return
        grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        order = torch.argsort(_window_index(visual, grid)).to(grid.device)
        parts, tap.part = {n: v[order] for n, v in tap.part.items()}, {}
        if "vision_features" in names:
            merged = getattr(output, "pooler_output", None)
            if merged is None:
                raise adapter.missing("the merger's output (pooler_output)", "the vision probe")
            parts["vision_features"] = merged.float()
        tap.finish(parts, counts=(grid.prod(dim=1) // merge).tolist())

    return [visual.blocks[-1].attn.register_forward_hook(attention, with_kwargs=True),
            visual.register_forward_hook(finish, with_kwargs=True)]


def _window_index(visual, grid: torch.Tensor) -> torch.Tensor:
    """The merged-patch order the blocks run in (Qwen2.5-VL's windows; Qwen2-VL: as is)."""
    if not hasattr(visual, "window_size"):
        return torch.arange(int((grid.prod(dim=1) // visual.spatial_merge_size ** 2).sum()), device=grid.device)
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                       window_size=visual.window_size, patch_size=visual.patch_size)
    return index


def unsupported_hooks(adapter, tap) -> list:
    """Families whose tower is not read (yet): a one-line error once a strategy needs it."""
    def refuse(module, args):
        if tap.wanted():
            raise ValueError(f"{adapter.architecture}: the vision inputs (vision_attention, vision_keys, "
                             "vision_features) are read for LLaVA-1.5 / LLaVA-NeXT (CLIP with CLS) and Qwen2-VL / "
                             "Qwen2.5-VL towers only")

    return [adapter.vision_tower.register_forward_pre_hook(refuse)]


HOOKS = {"clip_cls": clip_cls_hooks, "qwen_merge": qwen_merge_hooks, None: unsupported_hooks}
