"""SparseVLM's recycling applied: apply_fastv at its K merges the recycled clusters exactly.

The reference (the pattern of tests/test_merge.py's layer-K pooling tests): the unpruned
model's hidden states entering layer K, merged by hand with merge_tokens under the plan the
strategy chose, run through the model's own decoder layers, final norm and lm_head with
explicit positions (original: the anchors' own; compact: renumbered), every step recomputed.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from fastv_analysis.adapters import registry
from fastv_analysis.loading import build_prompt, load_model
from test_merge import (decoder_input, image_positions, pruned, reduce_compact, reduced_inputs,
                        reference_layers_greedy, same_greedy)

ARCHS = {"LlavaForConditionalGeneration": 64, "Qwen2_5_VLForConditionalGeneration": 8}  # keep: N 576 / 24
K = 2  # the authors cut at K = 3 (they read layer 2); the tiny models have 3 layers, and K needs a layer K


@pytest.fixture(scope="module", params=sorted(ARCHS))
def family(request, tmp_path_factory):
    arch = request.param
    path = registry()[arch].tiny(tmp_path_factory.mktemp(arch) / "m", seed=3)
    loaded = load_model(str(path), device="cpu", dtype="float32")
    image = Image.fromarray((np.random.default_rng(4).random((112, 168, 3)) * 255).astype("uint8"))
    proc = loaded.processor
    inputs = dict(proc(text=[build_prompt(proc, "what is in the picture?")], images=[image], return_tensors="pt"))
    return arch, loaded.model, inputs


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_sparsevlm_recycling_equals_the_decoder_layers_run_by_hand(family, positions):
    arch, model, inputs = family
    keep = ARCHS[arch]
    with torch.no_grad():
        first, tokens, sel = pruned(model, inputs, agg_layer=K, keep=keep, method="sparsevlm", positions=positions)
        indices, merge = sel.indices[0].cpu(), sel.merge
        assert merge is not None and int((merge.assign[0] >= 0).sum()) > keep  # clusters really merged
        _, ids = decoder_input(model, inputs)
        img_pos = image_positions(model, inputs)
        reduce = reduce_compact if positions == "compact" else reduced_inputs
        first_ref, tokens_ref = reference_layers_greedy(
            model, inputs, K, lambda h: reduce(h, ids, img_pos, indices, merge))
        dropped, _, _ = pruned(model, inputs, steps=1, agg_layer=K, keep=keep, kept=indices[None],
                               positions=positions)
    assert (first - first_ref).abs().max() < 1e-5 and same_greedy(model, tokens, tokens_ref), (arch, positions)
    assert (dropped - first).abs().max() > 1e-5  # the recycling changes the answer
