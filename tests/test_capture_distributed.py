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


LAUNCHERS = {  # 2 CPU processes, as README gives them
    "torchrun": ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                 "--master-addr", "127.0.0.1", "--master-port", "{port}"],
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "{port}"],
    "accelerate --cpu": ["-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                         "--main_process_port", "{port}"],
}


def torchrun_cli(*args, timeout=120, launcher="torchrun"):
    """``fastv-analyze ARGS`` under a launcher: 2 CPU processes (gloo), offline, one thread each."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "CUDA_VISIBLE_DEVICES")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = [a.format(port=_free_port()) for a in LAUNCHERS[launcher]]
    cmd = [sys.executable, *start, "-m", "fastv_analysis.cli.main", *[str(a) for a in args], "--device", "cpu",
           "--quiet"]
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


def test_accelerate_launch_captures_and_evaluates_like_one_process(checkpoints, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 ... --device cpu` starts 2 gloo processes that
    write what one process writes; `accelerate launch --cpu --num_processes 2` starts one process
    (accelerate 1.15 runs several CPU processes only through mpirun): refused in one line."""
    import polars as pl

    data = write_questions(tmp_path / "d", n=3)
    args = ["--model", checkpoints["gqa"], "--data", data, "--max-new-tokens", "2"]
    proc = torchrun_cli("capture", *args, "--out", tmp_path / "alone", launcher="accelerate --cpu")
    assert proc.returncode != 0  # ours exits 2; accelerate's launcher turns that into 1
    err = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(err) == 1 and "torchrun --nproc_per_node N" in err[0] and "--multi_gpu" in err[0]
    assert not (tmp_path / "alone").exists()

    proc = torchrun_cli("capture", *args, "--out", tmp_path / "two", launcher="accelerate")
    assert proc.returncode == 0, f"accelerate capture failed:\n{proc.stdout}\n{proc.stderr}"
    assert main(["capture", *map(str, args), "--out", str(tmp_path / "one"), "--device", "cpu", "--quiet"]) == 0
    two, one = open_run(tmp_path / "two"), open_run(tmp_path / "one")
    assert {s.split("-")[1] for s in two.samples["shard"].to_list()} == {"000", "001"}
    layout = (*STORAGE_COLUMNS, "capture_seconds")
    assert two.samples.drop(layout).equals(one.samples.drop(layout))
    assert torch.equal(two.stack(2, [0, 1, 2]), one.stack(2, [0, 1, 2]))
    for run in ("two", "one"):
        assert main(["select", str(tmp_path / run), "--keep", "64,8", "--methods", "avg_all_heads,random",
                     "--quiet"]) == 0
    assert pl.read_parquet(tmp_path / "two" / "select" / "selections.parquet").equals(
        pl.read_parquet(tmp_path / "one" / "select" / "selections.parquet"))
    proc = torchrun_cli("eval", tmp_path / "two", "--timing-samples", "0", launcher="accelerate", timeout=180)
    assert proc.returncode == 0, f"accelerate eval failed:\n{proc.stdout}\n{proc.stderr}"
    assert main(["eval", str(tmp_path / "one"), "--timing-samples", "0", "--quiet"]) == 0
    cols = ["sample_id", "agg_layer", "config", "keep", "selection_id", "prediction", "correct"]
    assert pl.read_parquet(tmp_path / "two" / "eval" / "predictions.parquet").select(cols).equals(
        pl.read_parquet(tmp_path / "one" / "eval" / "predictions.parquet").select(cols))


def test_a_held_run_refuses_every_rank_of_a_launch(checkpoints, tmp_path):
    """rank 0 takes the lock for the launch and tells the others: all stop with the same line, none hangs."""
    from fastv_analysis.lock import stage_lock

    data = write_questions(tmp_path / "d", n=2)
    with stage_lock(tmp_path / "run", "capture"):
        proc = _torchrun_capture(checkpoints["gqa"], data, tmp_path / "run", timeout=90)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 2 and errors[0] == errors[1] and f"pid {os.getpid()}" in errors[0]
    assert not (tmp_path / "run").exists()
