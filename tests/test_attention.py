"""AttentionRecorder rows equal eager attention's, while the model keeps SDPA."""

from __future__ import annotations

import pytest
import torch
from conftest import hook_snapshot, make_llava_inputs, make_tiny_llava

from fastv_analysis.adapters import SUPPORTED, get_adapter
from fastv_analysis.attention import AttentionRecorder, take_positions



@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only; a module-level set_grad_enabled would leak into other test files."""
    with torch.no_grad():
        yield


def eager_twin(model):
    """The same weights with eager attention (the ground truth for attention rows)."""
    kv = model.config.text_config.num_key_value_heads
    twin = make_tiny_llava(num_kv_heads=kv, attn_implementation="eager")
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def pair(request):
    sdpa = make_tiny_llava(num_kv_heads=request.param)
    return sdpa, eager_twin(sdpa)


@pytest.mark.parametrize("padded", [False, True], ids=["no-pad", "left-pad"])
def test_rows_equal_eager(pair, padded):
    sdpa, eager = pair
    if padded:
        inputs = make_llava_inputs(sdpa, before=[3, 6], after=[5, 1], left_pad=[0, 2])
    else:
        inputs = make_llava_inputs(sdpa, before=3, after=4, batch=2)
    layers = [0, 1, 3]
    with AttentionRecorder(sdpa, layers, "last") as rec:
        sdpa(**inputs)
    reference = eager(**inputs, output_attentions=True).attentions
    for layer in layers:
        assert rec.rows[layer].dtype == torch.float32
        assert rec.rows[layer].shape == reference[layer][:, :, -1:, :].shape
        assert (rec.rows[layer] - reference[layer][:, :, -1:, :]).abs().max() <= 1e-5


def test_rows_for_many_queries(pair):
    """Tensor [Q], per-element [B, Q] and callable query positions."""
    sdpa, eager = pair
    inputs = make_llava_inputs(sdpa, before=[2, 4], after=[6, 3], left_pad=[1, 0])
    reference = eager(**inputs, output_attentions=True).attentions[2]
    seq_len = inputs["input_ids"].shape[1]
    shared = torch.tensor([5, seq_len - 3, seq_len - 1])
    per_element = torch.tensor([[4, 20, 21], [7, 8, seq_len - 1]])
    for spelled, positions in [
        (shared, shared.expand(2, -1)),
        (per_element, per_element),
        (lambda batch, length: torch.arange(length - 4, length), torch.arange(seq_len - 4, seq_len).expand(2, -1)),
    ]:
        with AttentionRecorder(sdpa, [2], spelled) as rec:
            sdpa(**inputs)
        expected = take_positions(reference, positions, dim=2)
        assert (rec.rows[2] - expected).abs().max() <= 1e-5


def test_recorder_on_eager_model_float_mask(pair):
    """An eager model hands attention an additive float mask: same rows."""
    _, eager = pair
    inputs = make_llava_inputs(eager, before=[3, 6], after=[5, 1], left_pad=[0, 2])
    with AttentionRecorder(eager, [1], "last") as rec:
        out = eager(**inputs, output_attentions=True)
    assert (rec.rows[1] - out.attentions[1][:, :, -1:, :]).abs().max() <= 1e-5


def test_decode_steps_not_recorded_and_hooks_removed(pair):
    sdpa, _ = pair
    inputs = make_llava_inputs(sdpa)
    before = sdpa(**inputs).logits
    hooks = hook_snapshot(sdpa)
    with AttentionRecorder(sdpa, [1], "last") as rec:
        sdpa.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert rec.rows[1].shape[-1] == inputs["input_ids"].shape[1]
    assert hook_snapshot(sdpa) == hooks
    assert torch.equal(sdpa(**inputs).logits, before)


def test_rows_sum_to_one_and_are_causal(pair):
    sdpa, _ = pair
    inputs = make_llava_inputs(sdpa, before=3, after=4)
    with AttentionRecorder(sdpa, [0], torch.tensor([2, 10])) as rec:
        sdpa(**inputs)
    rows = rec.rows[0]
    assert torch.allclose(rows.sum(-1), torch.ones(()), atol=1e-6)
    assert rows[..., 0, 3:].abs().max() == 0 and rows[..., 1, 11:].abs().max() == 0


def test_bad_layers_and_positions(pair):
    sdpa, _ = pair
    with pytest.raises(ValueError, match="out of range"):
        AttentionRecorder(sdpa, [4])
    inputs = make_llava_inputs(sdpa)
    with pytest.raises(ValueError, match="query positions"):
        with AttentionRecorder(sdpa, [0], torch.tensor([999])):
            sdpa(**inputs)


def test_adapter(pair):
    sdpa, _ = pair
    adapter = get_adapter(sdpa)
    text = sdpa.config.text_config
    assert adapter.num_layers == 4 and adapter.num_heads == 4
    assert adapter.num_kv_heads == text.num_key_value_heads and adapter.head_dim == 8
    assert adapter.hidden_size == 32 and adapter.intermediate_size == 64
    assert adapter.image_token_id == sdpa.config.image_token_id
    assert adapter.attention(2) is sdpa.model.language_model.layers[2].self_attn
    with pytest.raises(ValueError, match="supported are " + SUPPORTED[0]):
        get_adapter(torch.nn.Linear(2, 2))
