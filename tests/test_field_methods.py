"""The field's methods (issue 23) against their authors' own selection functions.

The expected indices below are facts: the authors' functions, taken from their repositories
at the named commits and run unchanged on these tensors (torch 2.x CPU, float32), returned
them. The inputs are continuous random draws, so no ranking step meets a tie.
"""

import pytest
import torch

from fastv_analysis import strategies
from fastv_analysis.methods.dart import dart_keep, python_set_order
from fastv_analysis.methods.divprune import divprune_order


def divprune_fixture() -> torch.Tensor:
    return torch.randn(20, 6, generator=torch.Generator().manual_seed(23))


def test_divprune_picks_what_the_authors_function_picks():
    # vbdi/divprune@799e2d950aa01ba7860907f5a6d86061f885dca6, LLaVA/llava/model/llava_arch.py,
    # LlavaMetaForCausalLM.DivPrune(emb, 20, threshold_ratio=0.4) -> s (pick order)
    expected = [7, 1, 8, 11, 17, 3, 0, 19]
    emb = divprune_fixture()
    assert divprune_order(emb, 8).tolist() == expected
    assert divprune_order(emb[None].expand(3, -1, -1), 8).tolist() == [expected] * 3  # batched
    attention = torch.rand(1, 2, 20)
    sel = strategies.select(attention, "divprune", keep=8, inputs={"embeddings": emb[None]})
    assert sel.indices[0].tolist() == sorted(expected)
    ranking = strategies.rank(strategies.method_scores(attention, "divprune", inputs={"embeddings": emb[None]}))
    assert ranking[0, :8].tolist() == expected  # prefix-closed: the full ranking starts with the same picks


def dart_fixture():
    g = torch.Generator().manual_seed(7)
    start, n_img, n_txt, dim, heads, head_dim = 5, 30, 9, 8, 2, 4
    seq = start + n_img + n_txt
    last = torch.randn(1, seq, dim, generator=g)  # final-normed layer K-1 output
    keys = torch.randn(1, heads, seq, head_dim, generator=g)  # layer K-1 keys after RoPE [B, H, S, d]
    key_l1 = keys.permute(0, 2, 1, 3).reshape(1, seq, -1).abs().sum(dim=-1)[0]
    pos = torch.arange(seq, dtype=torch.float32)
    image = slice(start, start + n_img)
    dart_image = torch.cat([pos[image, None], key_l1[image, None], last[0, image]], dim=-1)
    text = torch.arange(start + n_img, seq)
    top = text[key_l1[text].sort(descending=True, stable=True).indices[:4]]
    dart_text = torch.cat([pos[top, None], last[0, top]], dim=-1)
    return dart_image[None], dart_text[None]


def test_dart_keeps_what_the_authors_function_keeps():
    # xqy1111111/DART@5a19452fc173017191c247848673e0bde755695a (Zichen Wen's last upstream commit),
    # llava/model/language_model/modeling_llama_self.py, DART.get_retained_image_token with
    # image_token_start_index=5, image_token_length=30, max_num_trunction=16, 4 + 4 pivots
    # (2 a pivot -> 4 + 16 = 20 kept), image indices = returned positions - 5:
    expected = [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 16, 17, 18, 20, 22, 24, 25, 27, 29]
    dart_image, dart_text = dart_fixture()
    assert dart_keep(dart_image, dart_text, 20).tolist() == [expected]
    sel = strategies.select(torch.rand(1, 2, 30), "dart", keep=20,
                            inputs={"dart_image": dart_image, "dart_text": dart_text})
    assert sel.indices[0].tolist() == expected


def test_dart_visits_pivots_in_python_set_order():
    positions = [34, 6, 40, 12, 38, 36, 41, 39]
    assert python_set_order(positions) == list(set(positions))
    dart_image, dart_text = dart_fixture()
    by_rank = dart_keep(dart_image, dart_text, 20).tolist()
    shifted = dart_image.clone()
    shifted[..., 0] += 27  # same tokens at other prompt positions: another visiting order
    assert dart_keep(shifted, dart_text + torch.tensor([27.0] + [0.0] * 8), 20).tolist() != by_rank


def test_dart_budget_and_bad_params():
    dart_image, dart_text = dart_fixture()
    for keep in (0, 3, 4, 11, 30):
        kept = dart_keep(dart_image, dart_text, keep)
        assert kept.shape == (1, keep) and kept.unique().numel() == keep
    pivots = dart_image[0, :, 1].sort(descending=True).indices[:3].sort().values
    assert dart_keep(dart_image, dart_text, 3)[0].tolist() == pivots.tolist()
    with pytest.raises(ValueError, match="pivot_text"):
        strategies.select(torch.rand(1, 2, 30), "dart", keep=20, pivot_text=5,
                          inputs={"dart_image": dart_image, "dart_text": dart_text})
    with pytest.raises(ValueError, match="dart needs input 'dart_text'"):
        strategies.select(torch.rand(1, 2, 30), "dart", keep=20, inputs={"dart_image": dart_image})


def test_divprune_and_dart_are_registered_with_the_authors_defaults():
    assert strategies.strategy("divprune").kind == "ranking"
    assert strategies.strategy("divprune").needs == ("embeddings",)
    dart = strategies.strategy("dart")
    assert dart.kind == "set" and dict(dart.params) == {"pivot_image": 4, "pivot_text": 4}
    assert "original" in dart.doc and "compact" in strategies.strategy("divprune").doc


def test_pyramid_drop_preset_expands_to_the_authors_stages():
    # Cooperx521/PyramidDrop@6444f304aee4b7edcb022839fb9e8cd07859704a, scripts/v1_5/pdrop_eval/*.sh:
    # --layer_list '[8,16,24]' --image_token_ratio_list "[0.5,0.25,0.125]" (lambda 0.5), counts int(N * ratio)
    from fastv_analysis.pruning import FastVConfig, Stage, pyramid_drop
    from fastv_analysis.pruning.config import preset_stages

    cfg = pyramid_drop(576)
    assert (cfg["agg_layer"], cfg["keep"]) == (8, 288)
    assert cfg["stages"] == (Stage(16, 144, "avg_all_heads"), Stage(24, 72, "avg_all_heads"))
    assert [s.keep for s in pyramid_drop(2880)["stages"]] == [720, 360]
    assert FastVConfig(**cfg).stages[1].agg_layer == 24
    assert preset_stages("pdrop") == [(16, 0.5, "avg_all_heads"), (24, 0.5, "avg_all_heads")]
    with pytest.raises(ValueError, match="lambda"):
        pyramid_drop(576, lam=0.0)
    with pytest.raises(ValueError, match="unknown schedule preset 'pyr'"):
        preset_stages("pyr")


def test_eval_then_pdrop_passes_the_preset_stages(monkeypatch, tmp_path):
    import contextlib

    import fastv_analysis.evaluate as evaluate
    import fastv_analysis.lock as lock
    from fastv_analysis.cli.main import main

    seen = {}
    monkeypatch.setattr(evaluate, "run_eval", lambda cfg, **kw: seen.setdefault("then", cfg.then) and {})
    monkeypatch.setattr(lock, "run_lock", lambda *a, **k: contextlib.nullcontext())
    main(["eval", str(tmp_path), "--then", "pdrop", "--quiet"])
    assert seen["then"] == [(16, 0.5, "avg_all_heads"), (24, 0.5, "avg_all_heads")]


def test_merge_tokens_equals_a_hand_computed_weighted_sum_and_a_drop_is_a_gather():
    from fastv_analysis.strategies import Merge, merge_tokens

    x = torch.arange(30, dtype=torch.float32).view(2, 5, 3)
    idx = torch.tensor([[1, 3], [0, 4]])
    assert torch.equal(merge_tokens(x, idx, None), torch.stack([x[0, [1, 3]], x[1, [0, 4]]]))
    plan = Merge(torch.tensor([[0, 0, -1, 1, 1], [0, -1, -1, 1, 1]]),
                 torch.tensor([[0.5, 0.5, 0.0, 1.0, 2.0], [1.0, 0.0, 9.0, 0.25, 0.75]]))
    want = torch.stack([torch.stack([0.5 * x[0, 0] + 0.5 * x[0, 1], x[0, 3] + 2 * x[0, 4]]),
                        torch.stack([x[1, 0], 0.25 * x[1, 3] + 0.75 * x[1, 4]])])  # a dropped token's weight is ignored
    assert torch.equal(merge_tokens(x, idx, plan), want)
