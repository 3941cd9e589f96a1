"""One process per stage and run directory (issue 20, section 1): a live holder refuses a
second process in one line naming it; a killed holder (kill -9) is taken over."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from fastv_analysis.cli.main import main
from fastv_analysis.lock import RunLocked, StageLock, lock_path, stage_lock
from fastv_analysis.store import write_synthetic_run

HOLDER = textwrap.dedent("""
    import sys, time
    from fastv_analysis.lock import stage_lock
    with stage_lock(sys.argv[1], sys.argv[2]):
        print("held", flush=True)
        time.sleep(600)
""")


def _holder(root, stage):
    """A process that holds ``stage`` of ``root`` until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), stage], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _stage_args(stage, run):
    return {"capture": ["capture", "--out", str(run), "--quiet"],
            "select": ["select", str(run), "--keep", "4", "--quiet"],
            "eval": ["eval", str(run), "--quiet"],
            "report": ["report", str(run)]}[stage]


@pytest.mark.parametrize("stage", ["capture", "select", "eval", "report"])
def test_second_process_on_a_stage_is_refused_naming_the_holder(tmp_path, stage, capsys):
    run = tmp_path / "run"
    write_synthetic_run(run, {2: torch.rand(3, 2, 16)})
    before = sorted(p.name for p in run.iterdir())
    holder = _holder(run, stage)
    try:
        assert main(_stage_args(stage, run)) != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"pid {holder.pid} on {socket.gethostname()}, since " in err and f"fastv-analyze {stage}" in err
        assert sorted(p.name for p in run.iterdir()) == sorted(before + [f".{stage}.lock"])  # nothing else touched
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    write_synthetic_run(run, {2: torch.rand(3, 2, 16)})
    holder = _holder(run, "select")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert lock_path(run, "select").exists()  # kill -9 left the file behind ...
    assert main(_stage_args("select", run)) == 0, capsys.readouterr().err  # ... and it does not block
    assert not lock_path(run, "select").exists()


def test_other_stages_and_other_runs_are_not_blocked(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        write_synthetic_run(root, {2: torch.rand(3, 2, 16)})
    with stage_lock(a, "eval"):
        with stage_lock(a, "select"), stage_lock(b, "eval"):
            pass
        with pytest.raises(RunLocked, match="fastv-analyze eval"):
            with stage_lock(a, "eval"):
                pass
    assert not list(a.glob(".*.lock"))


def test_a_lock_file_removed_between_open_and_lock_is_not_held(tmp_path, monkeypatch):
    """The holder removes its file on release; a process that opened the old file must retry
    on the new one, or two processes would hold 'the' lock at once."""
    import fcntl

    first = StageLock(tmp_path, "eval")
    assert first.acquire() is None
    real_flock, calls = fcntl.flock, []

    def flock_after_release(fd, op):
        if not calls:
            calls.append(fd)
            first.release()  # the holder ends right between our open and our flock
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_release)
    second = StageLock(tmp_path, "eval")
    assert second.acquire() is None
    assert os.fstat(second.fd).st_ino == os.stat(lock_path(tmp_path, "eval")).st_ino
    second.release()


def test_a_failed_capture_removes_the_directory_its_lock_created(tmp_path, capsys):
    out = tmp_path / "new-run"
    assert main(["capture", "--out", str(out), "--data", str(tmp_path / "none.jsonl"), "--quiet"]) != 0
    assert not out.exists()  # the directory the lock created goes with the failed capture


def test_demo_takes_the_stage_locks_too(tmp_path, capsys):
    # demo runs the stages in one process; a stage held by another process stops it in one line
    out = tmp_path / "demo"
    out.mkdir()
    holder = _holder(out, "capture")
    try:
        assert main(["demo", "--out", str(out), "--limit", "2", "--no-report", "--quiet"]) != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pid {holder.pid} on {socket.gethostname()}" in err, err
    finally:
        holder.kill()
        holder.wait()
