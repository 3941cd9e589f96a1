"""Capture under 2 CPU processes (torchrun, gloo) equals a single-process capture, bit for bit."""

import os
import socket
import subprocess
import sys

import torch

from fastv_analysis.cli.main import main
from fastv_analysis.store import STORAGE_COLUMNS, open_run

from conftest import write_questions

N_SAMPLES = 5  # odd: rank 0 captures 0, 2, 4 and rank 1 captures 1, 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cli(*args, timeout=120):
    """``fastv-analyze ARGS`` under torchrun: 2 CPU processes (gloo), offline, one thread each."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "CUDA_VISIBLE_DEVICES")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "fastv_analysis.cli.main", *[str(a) for a in args], "--device", "cpu", "--quiet"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _torchrun_capture(model, data, out, *extra, timeout=120):
    return torchrun_cli("capture", "--model", model, "--data", data, "--out", out, *extra, timeout=timeout)


def test_two_process_capture_equals_single_process(checkpoints, tmp_path):
    data = write_questions(tmp_path / "d", n=N_SAMPLES)
    # a stale run with other settings in the way: --overwrite must replace it on every rank
    # (rank 1 must not compare its settings with the old run.json before rank 0 replaced it)
    assert main(["capture", "--model", str(checkpoints["gqa"]), "--data", str(data), "--out", str(tmp_path / "dist"),
                 "--agg-layers", "1", "--limit", "2", "--quiet"]) == 0
    proc = _torchrun_capture(checkpoints["gqa"], data, tmp_path / "dist", "--overwrite")
    assert proc.returncode == 0, f"torchrun capture failed:\n{proc.stdout}\n{proc.stderr}"
    assert main(["capture", "--model", str(checkpoints["gqa"]), "--data", str(data), "--out", str(tmp_path / "one"),
                 "--device", "cpu", "--quiet"]) == 0

    dist, one = open_run(tmp_path / "dist"), open_run(tmp_path / "one")
    assert dist.agg_layers == [2]
    # each process really wrote its own parts, and rank 0 merged them all
    ranks = {s.split("-")[1] for s in dist.samples["shard"].to_list()}
    assert ranks == {"000", "001"}
    assert dist.samples.filter(dist.samples["shard"].str.starts_with("part-001"))["sample_id"].to_list() == [1, 3]
    assert not list((tmp_path / "dist" / "attention").glob(".*tmp*"))

    assert dist.samples["sample_id"].to_list() == list(range(N_SAMPLES))
    layout = (*STORAGE_COLUMNS, "capture_seconds")  # where and how fast, not what
    cols = [c for c in one.samples.columns if c not in layout]
    assert sorted(cols) == sorted(c for c in dist.samples.columns if c not in layout)
    assert dist.samples.select(cols).equals(one.samples.select(cols))
    for s in range(N_SAMPLES):
        a, b = dist.last_token_attention(s, 2), one.last_token_attention(s, 2)
        assert a.shape == b.shape and torch.equal(a, b), f"sample {s}: attention differs"
