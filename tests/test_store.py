"""The run directory: stacked per-part storage, read back per sample."""

import torch

from fastv_analysis.store import open_run, write_synthetic_run


def test_last_token_rows_cost_h_x_n_x_2_bytes_per_sample(tmp_path):
    g = torch.Generator().manual_seed(0)
    att = torch.rand(96, 4, 576, generator=g).half()
    run = write_synthetic_run(tmp_path / "r", {2: att}, part_size=32)
    stored = sum(p.stat().st_size for p in (tmp_path / "r" / "attention").glob("*.safetensors"))
    per_sample = stored / 96
    assert 4 * 576 * 2 <= per_sample <= 4 * 576 * 2 + 8  # the header is shared by a part's 32 samples
    for s in (0, 31, 32, 95):
        assert torch.equal(run.last_token_attention(s, 2), att[s].float())


def test_samples_of_one_part_come_back_in_their_own_rows(tmp_path):
    att = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4)
    write_synthetic_run(tmp_path / "r", {1: att, 2: att + 100}, part_size=2)
    run = open_run(tmp_path / "r")
    assert run.samples["part_row"].to_list() == [0, 1, 0]
    assert torch.equal(run.stack(2, [2, 0, 1]), (att + 100)[[2, 0, 1]])
